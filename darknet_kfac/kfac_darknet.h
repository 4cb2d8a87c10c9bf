/*
 * darknet-kfac glue: connects the Darknet-independent K-FAC library (kfac.h)
 * to pjreddie Darknet. The patches in patches/ call the hooks below from
 * parser.c (setup from the [kfac] cfg section), convolutional_layer.c and
 * connected_layer.c (statistics captured inside the CPU backward pass, from
 * buffers Darknet has already filled), network.c (the sampled-Fisher pass
 * after backward_network and the K-FAC update inside update_network) and
 * examples/ (progress line, `darknet kfac check`). With net->kfac == NULL
 * every hook is skipped and Darknet behaves exactly as upstream.
 *
 * The glue's state (kfac_darknet_internal.h) is private to the glue and its
 * tests; the K-FAC state itself lives in the library's kfac_opt context.
 */
#ifndef KFAC_DARKNET_H
#define KFAC_DARKNET_H

#include <stddef.h>
#include "darknet.h"
#include "kfac.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- called by the patched Darknet (CPU only) ---- */

/* parser.c: builds net->kfac from the [kfac] section's options once every
 * layer exists. On any cfg error prints "cfgfile:LINE: ..." to stderr and
 * exits with status 1; never returns with a half-built state. */
void kfac_setup_network(network *net, list *options, const char *cfgfile);
/* parser.c: a second [kfac] section; prints its line and exits 1. */
void kfac_error_second_section(const char *cfgfile);

/* The same setup without exiting: 0 on success, else -1 with a one-line
 * message in err. net->kfac is left NULL on failure. */
int kfac_setup_network_err(network *net, list *options, const char *cfgfile,
                           char *err, size_t errlen);

/* convolutional_layer.c, backward, per example i and group j: cols is the
 * k x T patch matrix Darknet has filled (the input itself for 1x1), delta
 * the n_g x T slice of l.delta (pre-batch-norm output gradient). In the
 * sampled pass cols is not filled (only delta is read). */
void kfac_capture_conv_cpu(layer l, network net, int i, int j,
                           const float *cols, const float *delta);
/* connected_layer.c, backward: net.input and l.delta for the whole batch. */
void kfac_capture_connected_cpu(layer l, network net);
/* 0 inside the sampled-Fisher pass: a K-FAC layer's backward then skips its
 * weight-gradient gemm (and im2col), whose result would be discarded. */
int kfac_wants_weight_grad_cpu(network net);

/* network.c, train_network_datum, after backward_network: the sampled-Fisher
 * backward pass (only when it is a statistics step in sampled mode). */
void kfac_backward_network_cpu(network *net);

/* network.c, update_network: updates every K-FAC layer (weights, its bias
 * column, and Darknet's own SGD lines for batch-norm scales/shifts). */
void kfac_update_network_cpu(network *net, update_args a);

/* One line to stdout about the last K-FAC step. */
void kfac_print_progress(network *net);

/* Frees net->kfac and clears every layer's kfac pointer. */
void kfac_free_network(network *net);

/* ---- checkpoints (kfac_darknet_ckpt.c) ---- */

/* parser.c, save_weights_upto, after the weights file is in place: writes
 * "<weights>.kfac" atomically (tmp + rename). Nothing without net->kfac. On
 * a write failure prints the reason and exits 1, as Darknet does for the
 * weights file itself. */
void kfac_darknet_save_sidecar(network *net, const char *weightsfile);
/* parser.c, load_weights_upto, after a whole-network load: restores the
 * state from "<weights>.kfac". Missing: a warning, K-FAC starts fresh.
 * Corrupt, truncated, stale or from another cfg: message and exit 1. */
void kfac_darknet_load_sidecar(network *net, const char *weightsfile);
/* The same without printing or exiting: 0 loaded, 1 no sidecar (state
 * untouched), -1 refused with a one-line message in err (state untouched
 * unless the message says the restore itself failed). */
int kfac_darknet_load_sidecar_err(network *net, const char *weightsfile,
                                  char *err, size_t errlen);
int kfac_darknet_save_sidecar_err(network *net, const char *weightsfile,
                                  char *err, size_t errlen);
/* 1 when every weight, bias, scale and rolling statistic that
 * save_weights_upto(net, cutoff) writes is finite; else 0 and a message
 * naming the first bad layer and array. Used with or without K-FAC. */
int kfac_darknet_weights_finite(network *net, int cutoff, char *err, size_t errlen);
/* ---- helpers shared with the CLI and tests ---- */

/* Step index (0-based) of the update the current datum belongs to. */
long kfac_current_step(const network *net);
/* 1 when this step accumulates factor statistics. */
int kfac_is_stats_step(const network *net);
/* Line number (1-based) of the occurrence-th (0-based) line in cfgfile whose
 * stripped text is `header` ("[kfac]"), or 0 if not found. */
int kfac_cfg_section_line(const char *cfgfile, const char *header, int occurrence);

#ifdef __cplusplus
}
#endif
#endif /* KFAC_DARKNET_H */
