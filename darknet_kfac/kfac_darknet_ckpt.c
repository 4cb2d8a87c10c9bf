/*
 * Darknet glue, checkpoints: the "<weights>.kfac" sidecar written next to
 * every whole-network weights file. It holds what a resumed run needs to
 * continue exactly where the saved one stopped: the optimizer context's own
 * state (kfac_opt_state: factors, live inverses and damping split, momentum,
 * counters, damping, seed), Darknet's iteration counter, and Darknet's
 * per-layer gradient accumulators (weight/bias/scale_updates, Adam moments),
 * which carry SGD momentum between steps and which Darknet itself never
 * saves. Every entry points at the live array it describes, so nothing is
 * copied on the way in or out; the container (kfac_ckpt_*) validates the
 * whole file before it writes any of them. The fingerprint says what must
 * match -- the layout of this file, the images seen of the weights file it
 * belongs to, the settings the factors were built with and every layer's
 * shapes -- and a refused sidecar is explained by the parts that differ.
 */
#include "kfac_darknet_internal.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "network.h"

/* Bumped when the set or meaning of the entries changes; first in the
 * fingerprint, so an older sidecar is refused by name rather than misread.
 * 2: the context's live inverses instead of the factors they came from. */
#define SIDECAR_LAYOUT 2
#define LAYOUT_TAG "darknet-kfac sidecar layout "

/* ------------------------------------------------------------ fingerprint */

/* Schedule and step settings (invert_every, cov_update_every,
 * norm_constraint, momentum, max_failures) may change on resume; spatial
 * sizes are left out (random=1 resizes them, and neither the factors nor the
 * weights depend on them). */
static void fingerprint(network *net, const kfac_net_state *st, char *fp, size_t len)
{
    const kfac_config *c = kfac_opt_config(st->opt);
    /* step_size: the velocity buffers hold v (policy) or the last step u (auto) */
    int pos = snprintf(fp, len, LAYOUT_TAG "%d; seen %zu; damping %.17g %s; precision %s; "
                       "cov_ema_decay %.17g; estimation %s; step_size %s; %d layers:",
                       SIDECAR_LAYOUT, *net->seen, c->damping,
                       c->damping_type == KFAC_DAMPING_EXACT ? "exact" : "factored",
                       c->precond_precision == KFAC_PRECISION_DOUBLE ? "double" : "float",
                       c->cov_ema_decay, st->sampled ? "sampled" : "empirical",
                       c->step_size == KFAC_STEP_AUTO ? "auto" : "policy", net->n);
    size_t head = (size_t)pos;
    int k = 0;
    for (int i = 0; i < net->n && (size_t)pos < len; ++i) {
        layer *l = &net->layers[i];
        int kf = k < st->nlayers && st->layers[k].index == i;
        if (kf) ++k;
        size_t nw, nb;
        kfac_dn_param_sizes(l, &nw, &nb);
        const char *t = kfac_dn_layer_name(l->type);
        if (l->type == CONVOLUTIONAL || l->type == DECONVOLUTIONAL)
            pos += snprintf(fp + pos, len - pos, " %d %s %d>%d k%d s%d p%d g%d bn%d%s;", i, t,
                            l->c, l->n, l->size, l->stride, l->pad, l->groups,
                            l->batch_normalize, kf ? " K" : "");
        else if (l->type == CONNECTED)
            pos += snprintf(fp + pos, len - pos, " %d connected %d>%d bn%d%s;", i, l->inputs,
                            l->outputs, l->batch_normalize, kf ? " K" : "");
        else if (nw || nb)
            pos += snprintf(fp + pos, len - pos, " %d %s %zu+%zu;", i, t, nw, nb);
        else
            pos += snprintf(fp + pos, len - pos, " %d %s;", i, t);
    }
    if ((size_t)pos >= len) {
        /* Too long for the container (deep networks): a hash of the same
         * description stands in for the layer list. */
        uint64_t h = 1469598103934665603ull;
        char one[160];
        k = 0;
        for (int i = 0; i < net->n; ++i) {
            layer *l = &net->layers[i];
            int kf = k < st->nlayers && st->layers[k].index == i;
            if (kf) ++k;
            size_t nw, nb;
            kfac_dn_param_sizes(l, &nw, &nb);
            int n = snprintf(one, sizeof one, "%d %d %d>%d k%d s%d p%d g%d bn%d %zu+%zu %d;", i,
                             (int)l->type, l->c, l->n, l->size, l->stride, l->pad, l->groups,
                             l->batch_normalize, nw, nb, kf);
            for (int c2 = 0; c2 < n; ++c2) h = (h ^ (unsigned char)one[c2]) * 1099511628211ull;
        }
        snprintf(fp + head, len - head, " FNV-1a %016llx", (unsigned long long)h);
    }
}

/* The ';'-separated parts of the stored fingerprint that differ from ours,
 * as "saved X, here Y" pairs; a sidecar of another layout or another save is
 * said so in words. */
static void explain_mismatch(const char *path, const char *ours, char *err, size_t errlen)
{
    char saved[KFAC_CKPT_MAX_FINGERPRINT + 1], why[256];
    if (kfac_ckpt_fingerprint(path, saved, sizeof saved, why, sizeof why) != KFAC_OK) {
        kfac_dn_seterr(err, errlen, "refusing K-FAC sidecar %s: %s", path, why);
        return;
    }
    size_t tag = strlen(LAYOUT_TAG);
    if (strncmp(saved, ours, tag + 1) != 0 || strncmp(saved, LAYOUT_TAG, tag) != 0) {
        kfac_dn_seterr(err, errlen, "refusing K-FAC sidecar %s: it was written by another "
                       "darknet-kfac version (sidecar layout %.8s, this build reads layout %d); "
                       "delete it to restart K-FAC from scratch on these weights", path,
                       strncmp(saved, LAYOUT_TAG, tag) == 0 ? saved + tag : "unknown",
                       SIDECAR_LAYOUT);
        return;
    }
    const char *sa = strstr(saved, "; seen "), *sb = strstr(ours, "; seen ");
    if (sa && sb && strtoull(sa + 7, NULL, 10) != strtoull(sb + 7, NULL, 10)) {
        kfac_dn_seterr(err, errlen, "refusing K-FAC sidecar %s: it was saved at %llu images "
                       "seen, but the weights file says %llu (left over from another save?); "
                       "delete it to restart K-FAC from scratch", path,
                       strtoull(sa + 7, NULL, 10), strtoull(sb + 7, NULL, 10));
        return;
    }
    int pos = snprintf(err, errlen, "refusing K-FAC sidecar %s: it was written for a different "
                       "cfg or layer shapes:", path);
    const char *a = saved, *b = ours;
    int shown = 0;
    while (*a && *b && (size_t)pos < errlen) {
        size_t la = strcspn(a, ";"), lb = strcspn(b, ";");
        if (la != lb || strncmp(a, b, la) != 0) {
            if (shown++ == 4) {
                pos += snprintf(err + pos, errlen - pos, " ...");
                break;
            }
            int sa2 = a[0] == ' ', sb2 = b[0] == ' ';
            pos += snprintf(err + pos, errlen - pos, " saved '%.*s', here '%.*s';",
                            (int)(la - sa2 > 120 ? 120 : la - sa2), a + sa2,
                            (int)(lb - sb2 > 120 ? 120 : lb - sb2), b + sb2);
        }
        a += la + (a[la] == ';');
        b += lb + (b[lb] == ';');
    }
    if ((size_t)pos < errlen)
        snprintf(err + pos, errlen - pos, " delete it to restart K-FAC from scratch");
}

/* ------------------------------------------------------------ entries */

typedef struct {
    kfac_ckpt_entry *e;
    char (*onames)[KFAC_STATE_NAME];
    char (*dnames)[160];
    int n, nopt, cap;
    int64_t t;             /* Darknet's *net->t */
    int layer;
} entries;

static void add_accum(void *vctx, const char *what, float *p, size_t n)
{
    entries *es = (entries *)vctx;
    if (es->e) {
        int i = es->n - es->nopt - 1;
        snprintf(es->dnames[i], sizeof es->dnames[0], "darknet.%d.%s", es->layer, what);
        es->e[es->n] = (kfac_ckpt_entry){ es->dnames[i], KFAC_CKPT_F32, n, p };
    }
    es->n++;
}

static void entries_free(entries *es)
{
    free(es->e);
    free(es->onames);
    free(es->dnames);
}

/* The one list of entries, for save and load alike: "net.t", the context's
 * state, then every layer's Darknet accumulators. */
static int build_entries(network *net, kfac_net_state *st, entries *es)
{
    memset(es, 0, sizeof *es);
    es->nopt = kfac_opt_state(st->opt, NULL, NULL, 0);
    es->n = 1 + es->nopt;
    for (es->layer = 0; es->layer < net->n; ++es->layer)
        kfac_dn_walk_accums(&net->layers[es->layer], add_accum, es);
    es->cap = es->n;
    es->e = (kfac_ckpt_entry *)calloc((size_t)es->cap, sizeof *es->e);
    es->onames = calloc((size_t)es->nopt + 1, sizeof *es->onames);
    es->dnames = calloc((size_t)(es->cap - es->nopt), sizeof *es->dnames);
    if (!es->e || !es->onames || !es->dnames || es->nopt < 0) return -1;
    es->t = net->t ? *net->t : 0;
    es->e[0] = (kfac_ckpt_entry){ "net.t", KFAC_CKPT_I64, 1, &es->t };
    if (kfac_opt_state(st->opt, es->e + 1, es->onames, es->nopt) != es->nopt) return -1;
    es->n = 1 + es->nopt;
    for (es->layer = 0; es->layer < net->n; ++es->layer)
        kfac_dn_walk_accums(&net->layers[es->layer], add_accum, es);
    return es->n == es->cap ? 0 : -1;
}

static void sidecar_path(const char *weightsfile, char *out, size_t len)
{
    snprintf(out, len, "%s.kfac", weightsfile);
}

/* ------------------------------------------------------------ save */

int kfac_darknet_save_sidecar_err(network *net, const char *weightsfile, char *err, size_t errlen)
{
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    if (!st) return 0;
    char path[4096], fp[KFAC_CKPT_MAX_FINGERPRINT + 1];
    sidecar_path(weightsfile, path, sizeof path);
    fingerprint(net, st, fp, sizeof fp);
    entries es;
    int rc = -1;
    if (build_entries(net, st, &es))
        kfac_dn_seterr(err, errlen, "%s: out of memory", path);
    else if (kfac_ckpt_save(path, fp, es.e, es.n, err, errlen) == KFAC_OK)
        rc = 0;
    entries_free(&es);
    return rc;
}

void kfac_darknet_save_sidecar(network *net, const char *weightsfile)
{
    char err[1024];
    if (!net->kfac) return;
    if (kfac_darknet_save_sidecar_err(net, weightsfile, err, sizeof err)) {
        fflush(stdout);
        fprintf(stderr, "darknet-kfac: %s\n", err);
        exit(EXIT_FAILURE);
    }
    fprintf(stderr, "K-FAC: state saved to %s.kfac\n", weightsfile);
}

/* ------------------------------------------------------------ load */

int kfac_darknet_load_sidecar_err(network *net, const char *weightsfile, char *err, size_t errlen)
{
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    kfac_dn_seterr(err, errlen, "%s", "");
    if (!st) return 1;
    char path[4096], fp[KFAC_CKPT_MAX_FINGERPRINT + 1], msg[1024];
    sidecar_path(weightsfile, path, sizeof path);
    struct stat sb;
    if (stat(path, &sb) != 0 && errno == ENOENT) {
        kfac_dn_seterr(err, errlen, "no K-FAC sidecar %s", path);
        return 1;
    }
    fingerprint(net, st, fp, sizeof fp);
    entries es;
    int rc = -1;
    kfac_status s;
    if (build_entries(net, st, &es)) {
        kfac_dn_seterr(err, errlen, "%s: out of memory", path);
    } else if ((s = kfac_ckpt_load(path, fp, es.e, es.n, msg, sizeof msg)) != KFAC_OK) {
        if (s == KFAC_ERR_FORMAT && strstr(msg, "different cfg or layer shapes (sidecar fingerprint"))
            explain_mismatch(path, fp, err, errlen);
        else
            kfac_dn_seterr(err, errlen, "refusing K-FAC sidecar %s: %s", path, msg);
    } else if ((s = kfac_opt_state_loaded(st->opt)) != KFAC_OK) {
        kfac_dn_seterr(err, errlen, "K-FAC sidecar %s: its state is inconsistent (%s)", path,
                       kfac_status_str(s));
    } else {
        if (net->t) *net->t = (int)es.t;
        st->pending_print = 0;
        rc = 0;
    }
    entries_free(&es);
    return rc;
}

void kfac_darknet_load_sidecar(network *net, const char *weightsfile)
{
    char err[1536];
    if (!net->kfac) return;
    int r = kfac_darknet_load_sidecar_err(net, weightsfile, err, sizeof err);
    if (r == 1) {
        fprintf(stderr, "K-FAC: warning: %s: K-FAC starts fresh (factors, inverses and "
                "momentum from zero) on the loaded weights\n", err);
    } else if (r < 0) {
        fflush(stdout);
        fprintf(stderr, "darknet-kfac: %s\n", err);
        fprintf(stderr, "darknet-kfac: to train on these weights with a fresh K-FAC state, move "
                "%s.kfac away\n", weightsfile);
        exit(EXIT_FAILURE);
    } else {
        kfac_opt_info oi;
        kfac_opt_info_get(((kfac_net_state *)net->kfac)->opt, &oi);
        fprintf(stderr, "K-FAC: state restored from %s.kfac (step %ld)\n", weightsfile,
                oi.steps_run);
    }
}
