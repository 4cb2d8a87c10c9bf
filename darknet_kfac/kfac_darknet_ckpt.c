/*
 * darknet-kfac checkpoints: the "<weights>.kfac" sidecar written next to every
 * Darknet weights file, and the guard that keeps non-finite weights out of
 * weights files. The sidecar holds everything a resumed run needs to continue
 * exactly where the saved one stopped: per K-FAC layer the running factors,
 * the factors the live inverse was computed from (the inverse is recomputed
 * from them on load, which reproduces it bit for bit rather than storing
 * O(kb^2) more doubles per derived array), the momentum buffers and failure
 * counts; the step counters and the sampled pass's seed; and Darknet's own
 * per-layer gradient accumulators (weight/bias/scale_updates, Adam moments),
 * which carry SGD momentum between steps and which Darknet itself never
 * saves. The container (kfac_ckpt_*) brings the atomic write, the checksum
 * and the all-or-nothing load; this file decides what goes in and checks
 * that a sidecar belongs to this cfg and to this very weights file.
 */
#include "kfac_darknet.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "network.h"

/* Bumped when the set or meaning of the entries changes; part of the
 * fingerprint, so an old sidecar is refused by name rather than misread. */
#define SIDECAR_LAYOUT 1

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static const char *type_name(LAYER_TYPE t)
{
    switch (t) {
    case CONVOLUTIONAL: return "conv";
    case DECONVOLUTIONAL: return "deconv";
    case CONNECTED: return "connected";
    default: return get_layer_string(t);
    }
}

/* ------------------------------------------------------------ layer arrays */

/* Darknet keeps recurrent layers' weights in sub-layers; both walks below
 * (parameters for the finiteness guard, accumulators for the sidecar) visit
 * them in save_weights_upto's order. */
typedef void (*array_fn)(void *ctx, const char *what, float *p, size_t n);

static void sublayers(layer *l, layer **sub, const char **names, int *n)
{
    *n = 0;
#define SUB(f) do { if (l->f) { sub[*n] = l->f; names[(*n)++] = #f; } } while (0)
    switch (l->type) {
    case RNN: case CRNN: SUB(input_layer); SUB(self_layer); SUB(output_layer); break;
    case LSTM: SUB(wi); SUB(wf); SUB(wo); SUB(wg); SUB(ui); SUB(uf); SUB(uo); SUB(ug); break;
    case GRU: SUB(wz); SUB(wr); SUB(wh); SUB(uz); SUB(ur); SUB(uh); break;
    default: break;
    }
#undef SUB
}

/* Floats in l.weights and in l.biases (0 for layers without them). */
static void param_sizes(const layer *l, size_t *nw, size_t *nb)
{
    *nw = *nb = 0;
    switch (l->type) {
    case CONVOLUTIONAL: case DECONVOLUTIONAL: *nw = (size_t)l->nweights; *nb = (size_t)l->n; break;
    case CONNECTED: *nw = (size_t)l->inputs * l->outputs; *nb = (size_t)l->outputs; break;
    case BATCHNORM: *nb = (size_t)l->c; break;
    case LOCAL:
        *nw = (size_t)l->size * l->size * l->c * l->n * l->out_w * l->out_h;
        *nb = (size_t)l->outputs; break;
    default: break;
    }
}

/* What save_weights_upto writes for one layer. */
static void walk_params(layer *l, const char *prefix, array_fn fn, void *ctx)
{
    size_t nw, nb;
    char name[128];
    layer *sub[8];
    const char *sn[8];
    int ns;
    sublayers(l, sub, sn, &ns);
    for (int i = 0; i < ns; ++i) {
        snprintf(name, sizeof name, "%s%s.", prefix, sn[i]);
        walk_params(sub[i], name, fn, ctx);
    }
    param_sizes(l, &nw, &nb);
    if (l->type == BATCHNORM) {
        fn(ctx, "scales", l->scales, nb);
        fn(ctx, "rolling_mean", l->rolling_mean, nb);
        fn(ctx, "rolling_variance", l->rolling_variance, nb);
        return;
    }
    if (!nw && !nb) return;
    fn(ctx, "biases", l->biases, nb);
    if (l->batch_normalize && l->type != LOCAL) {
        fn(ctx, "scales", l->scales, nb);
        fn(ctx, "rolling_mean", l->rolling_mean, nb);
        fn(ctx, "rolling_variance", l->rolling_variance, nb);
    }
    fn(ctx, "weights", l->weights, nw);
}

/* Gradient accumulators that live across steps: Darknet's update scales
 * them by momentum instead of clearing them, and Adam keeps its moments. */
static void walk_accums(layer *l, const char *prefix, array_fn fn, void *ctx)
{
    size_t nw, nb;
    char name[160];
    layer *sub[8];
    const char *sn[8];
    int ns;
    sublayers(l, sub, sn, &ns);
    for (int i = 0; i < ns; ++i) {
        snprintf(name, sizeof name, "%s%s.", prefix, sn[i]);
        walk_accums(sub[i], name, fn, ctx);
    }
    param_sizes(l, &nw, &nb);
#define ACC(f, n) do { if (l->f && (n)) { snprintf(name, sizeof name, "%s" #f, prefix); \
                                          fn(ctx, name, l->f, (n)); } } while (0)
    ACC(weight_updates, nw); ACC(bias_updates, nb); ACC(scale_updates, nb);
    ACC(m, nw); ACC(v, nw); ACC(bias_m, nb); ACC(bias_v, nb); ACC(scale_m, nb); ACC(scale_v, nb);
#undef ACC
}

/* ------------------------------------------------------------ finiteness guard */

typedef struct {
    int bad;
    const char *what;
    size_t at;
    float val;
} finite_ctx;

static void check_finite(void *vctx, const char *what, float *p, size_t n)
{
    finite_ctx *c = (finite_ctx *)vctx;
    if (c->bad || !p) return;
    for (size_t i = 0; i < n; ++i)
        if (!isfinite(p[i])) { c->bad = 1; c->what = what; c->at = i; c->val = p[i]; return; }
}

int kfac_darknet_weights_finite(network *net, int cutoff, char *err, size_t errlen)
{
    for (int i = 0; i < net->n && i < cutoff; ++i) {
        layer *l = &net->layers[i];
        if (l->dontsave) continue;
        finite_ctx c;
        memset(&c, 0, sizeof c);
        walk_params(l, "", check_finite, &c);
        if (c.bad) {
            seterr(err, errlen, "layer %d (%s) has a non-finite value in %s[%zu] (%g)", i,
                   type_name(l->type), c.what, c.at, c.val);
            return 0;
        }
    }
    return 1;
}

/* ------------------------------------------------------------ glue side */

static size_t nA(const kfac_layer_state *ls)
{
    return (size_t)ls->info.groups * ls->info.kb * ls->info.kb;
}

static size_t nG(const kfac_layer_state *ls)
{
    return (size_t)ls->info.groups * ls->info.n_g * ls->info.n_g;
}

int kfac_darknet_ckpt_alloc(kfac_layer_state *ls, size_t *bytes)
{
    ls->inv_A = (double *)calloc(nA(ls), sizeof(double));
    ls->inv_G = (double *)calloc(nG(ls), sizeof(double));
    if (!ls->inv_A || !ls->inv_G) return -1;
    *bytes += (nA(ls) + nG(ls)) * sizeof(double);
    return 0;
}

void kfac_darknet_ckpt_free(kfac_layer_state *ls)
{
    free(ls->inv_A);
    free(ls->inv_G);
    ls->inv_A = ls->inv_G = 0;
}

void kfac_darknet_note_inverse(kfac_layer_state *ls)
{
    size_t a = (size_t)ls->info.kb * ls->info.kb, g = (size_t)ls->info.n_g * ls->info.n_g;
    for (int j = 0; j < ls->info.groups; ++j)
        kfac_block_get_factors(ls->block, j, ls->inv_A + j * a, ls->inv_G + j * g);
    ls->inv_out_h = ls->info.out_h;
    ls->inv_out_w = ls->info.out_w;
}

/* ------------------------------------------------------------ fingerprint */

/* What must match for the saved numbers to mean the same thing here: the
 * settings the factors and inverses were built with, and every layer's
 * weight shapes (spatial sizes are left out: random=1 resizes them, and
 * neither the factors nor the weights depend on them). Schedule and step
 * settings (invert_every, cov_update_every, norm_constraint, momentum,
 * max_failures) may change on resume. */
static void fingerprint(network *net, const kfac_net_state *st, char *fp, size_t len)
{
    int pos = snprintf(fp, len, "darknet-kfac sidecar layout %d; damping %.17g %s; "
                       "cov_ema_decay %.17g; estimation %s; %d layers:", SIDECAR_LAYOUT,
                       st->cfg.damping,
                       st->cfg.damping_type == KFAC_DAMPING_EXACT ? "exact" : "factored",
                       st->cfg.cov_ema_decay, st->sampled ? "sampled" : "empirical", net->n);
    size_t head = (size_t)pos;
    int k = 0;
    for (int i = 0; i < net->n && (size_t)pos < len; ++i) {
        layer *l = &net->layers[i];
        int kf = k < st->nlayers && st->layers[k].index == i;
        if (kf) ++k;
        size_t nw, nb;
        param_sizes(l, &nw, &nb);
        if (l->type == CONVOLUTIONAL || l->type == DECONVOLUTIONAL)
            pos += snprintf(fp + pos, len - pos, " %d %s %d>%d k%d s%d p%d g%d bn%d%s;", i,
                            type_name(l->type), l->c, l->n, l->size, l->stride, l->pad,
                            l->groups, l->batch_normalize, kf ? " K" : "");
        else if (l->type == CONNECTED)
            pos += snprintf(fp + pos, len - pos, " %d connected %d>%d bn%d%s;", i, l->inputs,
                            l->outputs, l->batch_normalize, kf ? " K" : "");
        else if (nw || nb)
            pos += snprintf(fp + pos, len - pos, " %d %s %zu+%zu;", i, type_name(l->type), nw, nb);
        else
            pos += snprintf(fp + pos, len - pos, " %d %s;", i, type_name(l->type));
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
            param_sizes(l, &nw, &nb);
            int n = snprintf(one, sizeof one, "%d %d %d>%d k%d s%d p%d g%d bn%d %zu+%zu %d;", i,
                             (int)l->type, l->c, l->n, l->size, l->stride, l->pad, l->groups,
                             l->batch_normalize, nw, nb, kf);
            for (int c = 0; c < n; ++c) h = (h ^ (unsigned char)one[c]) * 1099511628211ull;
        }
        snprintf(fp + head, len - head, " FNV-1a %016llx", (unsigned long long)h);
    }
}

/* ------------------------------------------------------------ entries */

typedef struct {
    kfac_ckpt_entry *e;
    char (*names)[192];
    int n, cap;
    int oom;
} entries;

static void add(entries *es, const char *name, kfac_ckpt_type type, size_t count, void *data)
{
    if (es->oom || !count) return;
    if (es->n == es->cap) {
        int cap = es->cap ? 2 * es->cap : 64;
        kfac_ckpt_entry *e = (kfac_ckpt_entry *)realloc(es->e, cap * sizeof *e);
        if (!e) { es->oom = 1; return; }
        es->e = e;
        char (*nm)[192] = realloc(es->names, cap * sizeof *nm);
        if (!nm) { es->oom = 1; return; }
        es->names = nm;
        /* names moved: re-point the entries already made */
        for (int i = 0; i < es->n; ++i) es->e[i].name = es->names[i];
        es->cap = cap;
    }
    snprintf(es->names[es->n], sizeof es->names[0], "%s", name);
    es->e[es->n].name = es->names[es->n];
    es->e[es->n].type = type;
    es->e[es->n].count = count;
    es->e[es->n].data = data;
    es->n++;
}

typedef struct {
    entries *es;
    int layer;
} accum_ctx;

static void add_accum(void *vctx, const char *what, float *p, size_t n)
{
    accum_ctx *c = (accum_ctx *)vctx;
    char name[192];
    snprintf(name, sizeof name, "darknet.%d.%s", c->layer, what);
    add(c->es, name, KFAC_CKPT_F32, n, p);
}

/* Net-level counters, in this order. */
enum { G_SEEN, G_T, G_STEPS_RUN, G_CONSEC, G_TOTAL, G_SEED, G_N };
/* Per K-FAC layer. */
enum { L_HAS_FACTORS, L_HAS_INVERSE, L_INV_OUT_H, L_INV_OUT_W, L_FAILURES, L_N };

/* Buffers the entries point at for what is not a live float array. */
typedef struct {
    int64_t glob[G_N];
    int64_t *lay;          /* nlayers * L_N */
    double **A, **G;       /* current factors per K-FAC layer */
    double **iA, **iG;     /* inverse snapshot: the glue's own for save, scratch for load */
    int own_inv;
} scratch;

static void scratch_free(scratch *s, int nl)
{
    for (int k = 0; k < nl; ++k) {
        if (s->A) free(s->A[k]);
        if (s->G) free(s->G[k]);
        if (s->own_inv && s->iA) free(s->iA[k]);
        if (s->own_inv && s->iG) free(s->iG[k]);
    }
    free(s->A); free(s->G); free(s->iA); free(s->iG); free(s->lay);
}

static int scratch_alloc(scratch *s, const kfac_net_state *st, int own_inv)
{
    int nl = st->nlayers;
    memset(s, 0, sizeof *s);
    s->own_inv = own_inv;
    s->lay = (int64_t *)calloc((size_t)nl * L_N, sizeof(int64_t));
    s->A = (double **)calloc((size_t)nl, sizeof(double *));
    s->G = (double **)calloc((size_t)nl, sizeof(double *));
    s->iA = (double **)calloc((size_t)nl, sizeof(double *));
    s->iG = (double **)calloc((size_t)nl, sizeof(double *));
    if (!s->lay || !s->A || !s->G || !s->iA || !s->iG) return -1;
    for (int k = 0; k < nl; ++k) {
        const kfac_layer_state *ls = &st->layers[k];
        s->A[k] = (double *)calloc(nA(ls), sizeof(double));
        s->G[k] = (double *)calloc(nG(ls), sizeof(double));
        if (!s->A[k] || !s->G[k]) return -1;
        if (own_inv) {
            s->iA[k] = (double *)calloc(nA(ls), sizeof(double));
            s->iG[k] = (double *)calloc(nG(ls), sizeof(double));
            if (!s->iA[k] || !s->iG[k]) return -1;
        } else {
            s->iA[k] = ls->inv_A;
            s->iG[k] = ls->inv_G;
        }
    }
    return 0;
}

/* The one list of entries, used by save and load alike, so the two cannot
 * disagree about names, types or counts. */
static void build_entries(network *net, kfac_net_state *st, scratch *s, entries *es)
{
    char name[192];
    add(es, "net.counters", KFAC_CKPT_I64, G_N, s->glob);
    for (int k = 0; k < st->nlayers; ++k) {
        kfac_layer_state *ls = &st->layers[k];
        int i = ls->index;
        snprintf(name, sizeof name, "kfac.%d.counters", i);
        add(es, name, KFAC_CKPT_I64, L_N, s->lay + (size_t)k * L_N);
        snprintf(name, sizeof name, "kfac.%d.A", i);
        add(es, name, KFAC_CKPT_F64, nA(ls), s->A[k]);
        snprintf(name, sizeof name, "kfac.%d.G", i);
        add(es, name, KFAC_CKPT_F64, nG(ls), s->G[k]);
        snprintf(name, sizeof name, "kfac.%d.A_of_inverse", i);
        add(es, name, KFAC_CKPT_F64, nA(ls), s->iA[k]);
        snprintf(name, sizeof name, "kfac.%d.G_of_inverse", i);
        add(es, name, KFAC_CKPT_F64, nG(ls), s->iG[k]);
        snprintf(name, sizeof name, "kfac.%d.velocity_w", i);
        add(es, name, KFAC_CKPT_F32, (size_t)ls->nweights, ls->vel_w);
        if (ls->bias) {
            snprintf(name, sizeof name, "kfac.%d.velocity_b", i);
            add(es, name, KFAC_CKPT_F32, (size_t)ls->nbiases, ls->vel_b);
        }
    }
    for (int i = 0; i < net->n; ++i) {
        accum_ctx c = { es, i };
        walk_accums(&net->layers[i], "", add_accum, &c);
    }
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

    scratch s;
    entries es;
    memset(&es, 0, sizeof es);
    int rc = -1;
    if (scratch_alloc(&s, st, 0)) { seterr(err, errlen, "%s: out of memory", path); goto out; }
    s.glob[G_SEEN] = (int64_t)*net->seen;
    s.glob[G_T] = net->t ? *net->t : 0;
    s.glob[G_STEPS_RUN] = st->steps_run;
    s.glob[G_CONSEC] = st->consecutive_failures;
    s.glob[G_TOTAL] = st->total_failures;
    memcpy(&s.glob[G_SEED], &st->seed, sizeof(int64_t));
    for (int k = 0; k < st->nlayers; ++k) {
        kfac_layer_state *ls = &st->layers[k];
        int64_t *c = s.lay + (size_t)k * L_N;
        size_t a = (size_t)ls->info.kb * ls->info.kb, g = (size_t)ls->info.n_g * ls->info.n_g;
        c[L_HAS_FACTORS] = 1;
        for (int j = 0; j < ls->info.groups; ++j)
            if (kfac_block_get_factors(ls->block, j, s.A[k] + j * a, s.G[k] + j * g) != KFAC_OK)
                c[L_HAS_FACTORS] = 0;
        c[L_HAS_INVERSE] = kfac_block_has_inverse(ls->block);
        c[L_INV_OUT_H] = ls->inv_out_h;
        c[L_INV_OUT_W] = ls->inv_out_w;
        c[L_FAILURES] = ls->failures;
    }
    build_entries(net, st, &s, &es);
    if (es.oom) { seterr(err, errlen, "%s: out of memory", path); goto out; }
    if (kfac_ckpt_save(path, fp, es.e, es.n, err, errlen) != KFAC_OK) goto out;
    rc = 0;
out:
    scratch_free(&s, st->nlayers);
    free(es.e);
    free(es.names);
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

/* Input size giving a conv block the output size out (a block's T, which
 * is all its damping needs from the geometry), or 0 if none. */
static int input_for_output(const layer *l, int out)
{
    int h = (out - 1) * l->stride + l->size - 2 * l->pad;
    if (h < 1) h = 1;
    for (int tries = 0; tries < l->stride + 1; ++tries, ++h)
        if ((h + 2 * l->pad - l->size) / l->stride + 1 == out) return h;
    return 0;
}

/* Recomputes the inverse from the factors it was made from, at the output
 * size it was made for, then puts the current factors back. */
static kfac_status restore_block(network *net, kfac_layer_state *ls, const int64_t *c,
                                 const double *A, const double *G, const double *iA,
                                 const double *iG)
{
    size_t a = (size_t)ls->info.kb * ls->info.kb, g = (size_t)ls->info.n_g * ls->info.n_g;
    layer *l = &net->layers[ls->index];
    kfac_status s = KFAC_OK;
    if (c[L_HAS_INVERSE]) {
        for (int j = 0; j < ls->info.groups && s == KFAC_OK; ++j)
            s = kfac_block_set_factors(ls->block, j, iA + j * a, iG + j * g);
        int oh = (int)c[L_INV_OUT_H], ow = (int)c[L_INV_OUT_W];
        int resized = ls->info.is_conv && (oh != ls->info.out_h || ow != ls->info.out_w);
        if (s == KFAC_OK && resized) {
            int h = input_for_output(l, oh), w = input_for_output(l, ow);
            s = h && w ? kfac_conv_block_resize(ls->block, h, w) : KFAC_ERR_INVALID_ARG;
        }
        if (s == KFAC_OK) s = kfac_block_update_inverses(ls->block);
        if (s == KFAC_OK && resized) s = kfac_conv_block_resize(ls->block, l->h, l->w);
        if (s == KFAC_OK) s = kfac_block_info_get(ls->block, &ls->info);
        if (s != KFAC_OK) return s;
        memcpy(ls->inv_A, iA, nA(ls) * sizeof(double));
        memcpy(ls->inv_G, iG, nG(ls) * sizeof(double));
        ls->inv_out_h = oh;
        ls->inv_out_w = ow;
    }
    if (c[L_HAS_FACTORS])
        for (int j = 0; j < ls->info.groups && s == KFAC_OK; ++j)
            s = kfac_block_set_factors(ls->block, j, A + j * a, G + j * g);
    ls->failures = (int)c[L_FAILURES];
    return s;
}

int kfac_darknet_load_sidecar_err(network *net, const char *weightsfile, char *err, size_t errlen)
{
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    seterr(err, errlen, "%s", "");
    if (!st) return 1;
    char path[4096], fp[KFAC_CKPT_MAX_FINGERPRINT + 1];
    sidecar_path(weightsfile, path, sizeof path);
    struct stat sb;
    if (stat(path, &sb) != 0 && errno == ENOENT) {
        seterr(err, errlen, "no K-FAC sidecar %s", path);
        return 1;
    }
    fingerprint(net, st, fp, sizeof fp);

    scratch s;
    entries es;
    memset(&es, 0, sizeof es);
    int rc = -1;
    char msg[1024];
    /* Everything loads into scratch or straight into live arrays: the
     * container validates the whole file before it writes anything, so a
     * refused sidecar leaves the network as load_weights left it. */
    if (scratch_alloc(&s, st, 1)) { seterr(err, errlen, "%s: out of memory", path); goto out; }
    size_t seen = *net->seen;
    build_entries(net, st, &s, &es);
    if (es.oom) { seterr(err, errlen, "%s: out of memory", path); goto out; }
    /* The live accumulators are loaded only once the sidecar is known to
     * belong to these weights: first validate into nothing but scratch. */
    int nlive = 0;
    for (int i = 0; i < es.n; ++i)
        if (es.e[i].type == KFAC_CKPT_F32) ++nlive;
    float **live = (float **)calloc((size_t)nlive + 1, sizeof(float *));
    float **copy = (float **)calloc((size_t)nlive + 1, sizeof(float *));
    int m = 0, ok = live && copy;
    for (int i = 0; ok && i < es.n; ++i) {
        if (es.e[i].type != KFAC_CKPT_F32) continue;
        live[m] = (float *)es.e[i].data;
        copy[m] = (float *)malloc(es.e[i].count * sizeof(float));
        if (!copy[m]) ok = 0;
        else es.e[i].data = copy[m];
        ++m;
    }
    if (!ok) {
        seterr(err, errlen, "%s: out of memory", path);
    } else if (kfac_ckpt_load(path, fp, es.e, es.n, msg, sizeof msg) != KFAC_OK) {
        seterr(err, errlen, "refusing K-FAC sidecar %s: %s", path, msg);
    } else if ((size_t)s.glob[G_SEEN] != seen) {
        seterr(err, errlen, "refusing K-FAC sidecar %s: it was saved at %lld images seen, but "
               "the weights file says %zu (left over from another save?); delete it to "
               "restart K-FAC from scratch", path, (long long)s.glob[G_SEEN], seen);
    } else {
        m = 0;
        for (int i = 0; i < es.n; ++i) {
            if (es.e[i].type != KFAC_CKPT_F32) continue;
            memcpy(live[m], copy[m], es.e[i].count * sizeof(float));
            ++m;
        }
        for (int k = 0; k < st->nlayers; ++k) {
            kfac_layer_state *ls = &st->layers[k];
            kfac_status r = restore_block(net, ls, s.lay + (size_t)k * L_N, s.A[k], s.G[k],
                                          s.iA[k], s.iG[k]);
            if (r != KFAC_OK) {
                seterr(err, errlen, "K-FAC sidecar %s: restoring layer %d failed: %s", path,
                       ls->index, kfac_status_str(r));
                goto freecopies;
            }
        }
        if (net->t) *net->t = (int)s.glob[G_T];
        st->steps_run = (long)s.glob[G_STEPS_RUN];
        st->consecutive_failures = (int)s.glob[G_CONSEC];
        st->total_failures = (long)s.glob[G_TOTAL];
        memcpy(&st->seed, &s.glob[G_SEED], sizeof st->seed);
        st->ready = 1;
        for (int k = 0; k < st->nlayers; ++k)
            if (!kfac_block_has_inverse(st->layers[k].block)) st->ready = 0;
        st->pending_print = 0;
        rc = 0;
    }
freecopies:
    for (int i = 0; copy && i < m; ++i) free(copy[i]);
    free(live);
    free(copy);
out:
    scratch_free(&s, st->nlayers);
    free(es.e);
    free(es.names);
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
        fprintf(stderr, "K-FAC: state restored from %s.kfac (step %ld)\n", weightsfile,
                ((kfac_net_state *)net->kfac)->steps_run);
    }
}
