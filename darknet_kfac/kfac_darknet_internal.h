/*
 * What the Darknet glue's files share (internal; the glue's tests include it
 * too). The K-FAC state proper -- blocks, momentum, damping, counters --
 * lives in the library's kfac_opt context; the glue keeps only what is
 * about Darknet: which layer is which slot, the sampled pass's softmax and
 * saved accumulators, per-step timings and the last report for the
 * progress line.
 *
 * Files: kfac_darknet_setup.c ([kfac] section, layer policy, start-up
 * table), kfac_darknet_capture.c (statistics from the backward pass, the
 * sampled-Fisher pass), kfac_darknet_update.c (the update and the progress
 * line), kfac_darknet_ckpt.c (the sidecar), kfac_darknet_layers.c (the walk
 * over a layer's arrays that the finiteness guard, the sidecar and the
 * sampled pass share).
 */
#ifndef KFAC_DARKNET_INTERNAL_H
#define KFAC_DARKNET_INTERNAL_H

#include "kfac_darknet.h"

struct kfac_net_state;

/* layer.kfac of a layer preconditioned by K-FAC. */
typedef struct kfac_layer_state {
    struct kfac_net_state *net;
    int index;              /* layer index in the network */
    int slot;               /* its slot in net->opt */
    int bias;               /* 1 when the bias column is part of the block */
    int nweights, nbiases;  /* floats in l.weights / l.biases */
} kfac_layer_state;

/* One gradient accumulator saved around the sampled pass. */
typedef struct {
    float *live;            /* the layer's array */
    float *saved;           /* setup-time buffer of the same size */
    size_t n;
} kfac_snapshot;

/* network.kfac */
typedef struct kfac_net_state {
    kfac_opt *opt;          /* its kfac_opt_config() is the [kfac] section */
    char cfgfile[256];
    int sampled;            /* effective estimation mode: 1 sampled, 0 empirical */
    int softmax_index;      /* output softmax for the sampled pass, -1 if none */
    int nlayers;
    kfac_layer_state *layers;
    int nsnap;
    kfac_snapshot *snap;
    /* what the damping adaptation's extra forward pass changes and puts back
     * (batch-norm rolling statistics) */
    int neval;
    kfac_snapshot *eval_snap;
    size_t snap_bytes;

    int in_sampled_pass;    /* captures G only, accumulators are restored */
    double t_stats_acc;     /* capture time of the step being accumulated */
    /* the last update, for the progress line */
    kfac_opt_report last;
    long last_step;
    double t_stats, t_precond; /* captures + fold; preconditioning + batch norm */
    double t_adapt;         /* the adaptation's forward pass (0 when none ran) */
    /* exact curvature (kfac_curvature): the softmax the outputs feed, and its
     * probabilities at the pass the step's gradient came from */
    int curv_softmax;       /* layer index, -1: the blocks' products */
    float *p0;
    void *curv_ctx;         /* what the callbacks get */
    int pending_print;
} kfac_net_state;

/* ---- shared by the glue's files */

/* a one-line message into err (NULL/0: nothing) */
void kfac_dn_seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* "darknet-kfac: <message>" on stderr, exit 1 */
void kfac_dn_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
/* "conv", "connected", or Darknet's name of the layer type */
const char *kfac_dn_layer_name(LAYER_TYPE t);

/* The arrays of one layer, in save_weights_upto's order, recurrent layers'
 * sub-layers included ("input_layer." prefixes). kfac_dn_walk_params visits
 * what a weights file holds (biases, batch-norm scales and rolling
 * statistics, weights); kfac_dn_walk_accums the gradient accumulators that
 * live across steps (weight/bias/scale_updates, Adam's moments). */
typedef void (*kfac_dn_array_fn)(void *ctx, const char *name, float *p, size_t n);
void kfac_dn_walk_params(layer *l, kfac_dn_array_fn fn, void *ctx);
void kfac_dn_walk_accums(layer *l, kfac_dn_array_fn fn, void *ctx);
/* floats in l.weights and l.biases (0 for layers without them) */
void kfac_dn_param_sizes(const layer *l, size_t *nw, size_t *nb);

/* The damping adaptation's extra forward pass (kfac_darknet_capture.c): the
 * mean loss of the current mini-batch at the current weights, in training
 * mode like the pass it is compared with; every buffer the next step reads
 * (rolling statistics, *net->cost) is left as it was. */
double kfac_dn_eval_loss(network *net, kfac_net_state *st);
/* Offers the context the network's exact curvature (kfac_curvature) through
 * the softmax at layer sm: its inputs are the outputs, the cross-entropy's
 * Hessian the metric. Allocates; 0 or -1 out of memory. */
int kfac_dn_setup_curvature(network *net, kfac_net_state *st, int sm);

#endif /* KFAC_DARKNET_INTERNAL_H */
