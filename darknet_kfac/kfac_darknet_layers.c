/*
 * The one walk over a Darknet layer's arrays, and what the glue's files
 * share besides: messages, layer names, and the guard that keeps non-finite
 * weights out of weights files. The walk knows which arrays a layer type has
 * and how long they are, in the order save_weights_upto writes them, with
 * recurrent layers' sub-layers; the finiteness guard, the sidecar (Darknet's
 * accumulators) and the sampled pass (accumulators saved around it) all use
 * it rather than each knowing the layer types.
 */
#include "kfac_darknet_internal.h"

#include "network.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

void kfac_dn_seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

void kfac_dn_die(const char *fmt, ...)
{
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "darknet-kfac: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    exit(EXIT_FAILURE);
}

const char *kfac_dn_layer_name(LAYER_TYPE t)
{
    switch (t) {
    case CONVOLUTIONAL: return "conv";
    case DECONVOLUTIONAL: return "deconv";
    case CONNECTED: return "connected";
    default: return get_layer_string(t);
    }
}

/* ------------------------------------------------------------ the walk */

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

void kfac_dn_param_sizes(const layer *l, size_t *nw, size_t *nb)
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

typedef struct {
    kfac_dn_array_fn fn;
    void *ctx;
    const char *prefix;
} visit;

static void emit(const visit *v, const char *field, float *p, size_t n)
{
    char name[160];
    if (!p || !n) return;
    snprintf(name, sizeof name, "%s%s", v->prefix, field);
    v->fn(v->ctx, name, p, n);
}

static void walk(layer *l, const char *prefix, int accums, kfac_dn_array_fn fn, void *ctx)
{
    layer *sub[8];
    const char *sn[8];
    int ns;
    char name[128];
    sublayers(l, sub, sn, &ns);
    for (int i = 0; i < ns; ++i) {
        snprintf(name, sizeof name, "%s%s.", prefix, sn[i]);
        walk(sub[i], name, accums, fn, ctx);
    }
    size_t nw, nb;
    kfac_dn_param_sizes(l, &nw, &nb);
    visit v = { fn, ctx, prefix };
    if (accums) {
        /* Darknet's update scales these by momentum instead of clearing
         * them, and Adam keeps its moments: they carry state across steps */
        emit(&v, "weight_updates", l->weight_updates, nw);
        emit(&v, "bias_updates", l->bias_updates, nb);
        emit(&v, "scale_updates", l->scale_updates, nb);
        emit(&v, "m", l->m, nw);
        emit(&v, "v", l->v, nw);
        emit(&v, "bias_m", l->bias_m, nb);
        emit(&v, "bias_v", l->bias_v, nb);
        emit(&v, "scale_m", l->scale_m, nb);
        emit(&v, "scale_v", l->scale_v, nb);
        return;
    }
    if (l->type == BATCHNORM) {
        emit(&v, "scales", l->scales, nb);
        emit(&v, "rolling_mean", l->rolling_mean, nb);
        emit(&v, "rolling_variance", l->rolling_variance, nb);
        return;
    }
    if (!nw && !nb) return;
    emit(&v, "biases", l->biases, nb);
    if (l->batch_normalize && l->type != LOCAL) {
        emit(&v, "scales", l->scales, nb);
        emit(&v, "rolling_mean", l->rolling_mean, nb);
        emit(&v, "rolling_variance", l->rolling_variance, nb);
    }
    emit(&v, "weights", l->weights, nw);
}

void kfac_dn_walk_params(layer *l, kfac_dn_array_fn fn, void *ctx) { walk(l, "", 0, fn, ctx); }
void kfac_dn_walk_accums(layer *l, kfac_dn_array_fn fn, void *ctx) { walk(l, "", 1, fn, ctx); }

/* ------------------------------------------------------------ finiteness guard */

typedef struct {
    int bad;
    char what[160];
    size_t at;
    float val;
} finite_ctx;

static void check_finite(void *vctx, const char *what, float *p, size_t n)
{
    finite_ctx *c = (finite_ctx *)vctx;
    if (c->bad) return;
    for (size_t i = 0; i < n; ++i)
        if (!isfinite(p[i])) {
            c->bad = 1;
            snprintf(c->what, sizeof c->what, "%s", what);
            c->at = i;
            c->val = p[i];
            return;
        }
}

int kfac_darknet_weights_finite(network *net, int cutoff, char *err, size_t errlen)
{
    for (int i = 0; i < net->n && i < cutoff; ++i) {
        layer *l = &net->layers[i];
        if (l->dontsave) continue;
        finite_ctx c = { 0 };
        kfac_dn_walk_params(l, check_finite, &c);
        if (c.bad) {
            kfac_dn_seterr(err, errlen, "layer %d (%s) has a non-finite value in %s[%zu] (%g)", i,
                           kfac_dn_layer_name(l->type), c.what, c.at, c.val);
            return 0;
        }
    }
    return 1;
}
