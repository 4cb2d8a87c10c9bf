/*
 * Darknet glue, capture: the factor statistics K-FAC needs, taken inside
 * Darknet's CPU backward pass from buffers Darknet has already filled (the
 * im2col patches, l.delta before batch norm, the connected layer's input),
 * and the extra sampled-Fisher backward pass after backward_network, which
 * exists only to give G its targets drawn from the model (sem. 2) and puts
 * every gradient accumulator back bit for bit. Sign conventions: l.delta is
 * minus the gradient, which the factors do not mind.
 */
#include "kfac_darknet_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "network.h"
#include "utils.h"
#include "blas.h"

/* ------------------------------------------------------------ schedule */

long kfac_current_step(const network *net)
{
    size_t per = (size_t)net->batch * (size_t)net->subdivisions;
    if (!net->seen || *net->seen == 0 || per == 0) return 0;
    /* seen has already been advanced by this datum's batch */
    return (long)((*net->seen - 1) / per);
}

int kfac_is_stats_step(const network *net)
{
    const kfac_net_state *st = (const kfac_net_state *)net->kfac;
    return st && kfac_opt_is_stats_step(st->opt, kfac_current_step(net));
}

/* ------------------------------------------------------------ capture */

static void capture_failed(const kfac_layer_state *ls, const char *what, kfac_status s)
{
    kfac_dn_die("layer %d: K-FAC could not accumulate %s: %s", ls->index, what, kfac_status_str(s));
}

static int kfac_stats_examples(const kfac_net_state *st, int batch)
{
    int sub = kfac_opt_config(st->opt)->cov_subsample;
    return (batch + sub - 1) / sub;
}

int kfac_wants_weight_grad_cpu(network net)
{
    const kfac_net_state *st = (const kfac_net_state *)net.kfac;
    return !st || !st->in_sampled_pass;
}

void kfac_capture_conv_cpu(layer l, network net, int i, int j,
                           const float *cols, const float *delta)
{
    kfac_layer_state *ls = (kfac_layer_state *)l.kfac;
    kfac_net_state *st = ls->net;
    if (!net.train || !kfac_is_stats_step(&net)) return;
    kfac_block *b = kfac_opt_block(st->opt, ls->slot);
    kfac_block_info info;
    kfac_status s = kfac_block_info_get(b, &info);
    if (l.out_h != info.out_h || l.out_w != info.out_w) {
        /* resize_network (random=1) happens between steps, so no statistics
         * are pending here; only T and the patch workspace change. */
        if ((s = kfac_conv_block_resize(b, l.h, l.w)) != KFAC_OK ||
            (s = kfac_block_info_get(b, &info)) != KFAC_OK ||
            info.out_h != l.out_h || info.out_w != l.out_w)
            kfac_dn_die("layer %d: its K-FAC block cannot follow the new size %dx%d: %s", ls->index,
                     l.w, l.h, kfac_status_str(s));
    }
    /* cov_subsample: the first ceil(batch/s) examples, a random subset
     * since mini-batches are drawn at random */
    if (i >= kfac_stats_examples(st, l.batch)) return;
    double t0 = what_time_is_it_now();
    /* The sampled pass reuses the same inputs, so A is taken once, from the
     * normal pass; G comes from whichever pass carries the Fisher targets. */
    if (!st->in_sampled_pass &&
        (s = kfac_block_accumulate_patches(b, 0, j, cols)) != KFAC_OK)
        capture_failed(ls, "input patches", s);
    if ((st->in_sampled_pass || !st->sampled) &&
        (s = kfac_block_accumulate_output_grads_group(b, 0, j, delta)) != KFAC_OK)
        capture_failed(ls, "output gradients", s);
    st->t_stats_acc += what_time_is_it_now() - t0;
}

void kfac_capture_connected_cpu(layer l, network net)
{
    kfac_layer_state *ls = (kfac_layer_state *)l.kfac;
    kfac_net_state *st = ls->net;
    if (!net.train || !kfac_is_stats_step(&net)) return;
    kfac_block *b = kfac_opt_block(st->opt, ls->slot);
    double t0 = what_time_is_it_now();
    kfac_status s;
    int rows = kfac_stats_examples(st, l.batch);
    if (!st->in_sampled_pass &&
        (s = kfac_block_accumulate_inputs(b, 0, net.input, rows)) != KFAC_OK)
        capture_failed(ls, "inputs", s);
    if ((st->in_sampled_pass || !st->sampled) &&
        (s = kfac_block_accumulate_output_grads(b, 0, l.delta, rows)) != KFAC_OK)
        capture_failed(ls, "output gradients", s);
    st->t_stats_acc += what_time_is_it_now() - t0;
}

/* ------------------------------------------------------------ sampled pass */

/* splitmix64's finaliser: the label draws are a pure function of (seed,
 * step, example, softmax group), so a resumed run draws what an
 * uninterrupted one would have, whatever else called rand() meanwhile. */
static unsigned long long mix64(unsigned long long x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

void kfac_backward_network_cpu(network *netp)
{
    kfac_net_state *st = (kfac_net_state *)netp->kfac;
    if (!st || !st->sampled || !netp->train || !kfac_is_stats_step(netp)) return;
    double t0 = what_time_is_it_now(), before = st->t_stats_acc;
    int i;

    /* The pass exists only for G: every accumulator the layers' backward
     * adds into is put back afterwards, bit for bit. */
    for (i = 0; i < st->nsnap; ++i)
        memcpy(st->snap[i].saved, st->snap[i].live, st->snap[i].n * sizeof(float));

    for (i = 0; i < netp->n; ++i) {
        layer *l = &netp->layers[i];
        if (l->delta) fill_cpu(l->outputs * l->batch, 0, l->delta, 1);
    }

    /* onehot(y) - p with y ~ Categorical(p), per example and softmax group:
     * Darknet's delta sign (truth - p), the gradient of that example's own
     * log-likelihood of a target drawn from the model. */
    layer sm = netp->layers[st->softmax_index];
    int groups = sm.groups > 0 ? sm.groups : 1;
    int gs = sm.inputs / groups;
    long step = kfac_current_step(netp);
    /* first example of this datum within its step (subdivisions) */
    unsigned long long ex0 = (unsigned long long)(*netp->seen - netp->batch) -
                             (unsigned long long)step * netp->batch * netp->subdivisions;
    kfac_opt_info oi;
    kfac_opt_info_get(st->opt, &oi);
    unsigned long long key = mix64(oi.seed ^ mix64((unsigned long long)step));
    for (int b = 0; b < sm.batch; ++b) {
        for (int g = 0; g < groups; ++g) {
            const float *p = sm.output + (size_t)b * sm.inputs + (size_t)g * gs;
            float *d = sm.delta + (size_t)b * sm.inputs + (size_t)g * gs;
            unsigned long long r = mix64(key ^ mix64((ex0 + b) * (unsigned long long)groups + g));
            float u = (float)(r >> 40) * (1.0f / 16777216.0f), cum = 0; /* [0, 1) */
            int y = gs - 1;
            for (int c = 0; c < gs; ++c) {
                cum += p[c];
                if (u < cum) { y = c; break; }
            }
            for (int c = 0; c < gs; ++c) d[c] = (c == y) - p[c];
        }
    }

    /* backward_network's loop, started at the softmax layer */
    st->in_sampled_pass = 1;
    network net = *netp;
    network orig = net;
    for (i = st->softmax_index; i >= 0; --i) {
        layer l = net.layers[i];
        if (l.stopbackward) break;
        if (i == 0) {
            net = orig;
        } else {
            layer prev = net.layers[i - 1];
            net.input = prev.output;
            net.delta = prev.delta;
        }
        net.index = i;
        l.backward(l, net);
    }
    st->in_sampled_pass = 0;

    for (i = 0; i < st->nsnap; ++i)
        memcpy(st->snap[i].live, st->snap[i].saved, st->snap[i].n * sizeof(float));
    /* the captures inside the pass timed themselves; count the pass once */
    st->t_stats_acc = before + (what_time_is_it_now() - t0);
}


/* ------------------------------------------------------------ extra forward passes */

/* A forward pass at the weights as they are, in training mode like the pass
 * it is compared with (batch statistics, not rolling ones), that puts back
 * what a training-mode pass moves and the next step reads: batch-norm
 * rolling statistics and *net->cost. Its outputs stay in the layers. */
static float forward_restoring(network *net, kfac_net_state *st)
{
    int i;
    float cost = *net->cost;
    for (i = 0; i < st->neval; ++i)
        memcpy(st->eval_snap[i].saved, st->eval_snap[i].live, st->eval_snap[i].n * sizeof(float));
    forward_network(net);
    float after = *net->cost;
    for (i = 0; i < st->neval; ++i)
        memcpy(st->eval_snap[i].live, st->eval_snap[i].saved, st->eval_snap[i].n * sizeof(float));
    *net->cost = cost;
    return after;
}

double kfac_dn_eval_loss(network *net, kfac_net_state *st)
{
    return forward_restoring(net, st) / net->batch;
}

typedef struct {
    network *net;
    kfac_net_state *st;
} curv_ctx;

static kfac_status curv_outputs(void *vctx, int run, float *out)
{
    curv_ctx *c = (curv_ctx *)vctx;
    network *net = c->net;
    layer *sm = &net->layers[c->st->curv_softmax];
    size_t n = (size_t)sm->inputs * sm->batch;
    if (run) {
        forward_restoring(net, c->st);
    } else {
        /* the metric is taken at these probabilities, before any run */
        memcpy(c->st->p0, sm->output, n * sizeof(float));
    }
    const float *z = c->st->curv_softmax == 0 ? net->input : net->layers[c->st->curv_softmax - 1].output;
    memcpy(out, z, n * sizeof(float));
    return KFAC_OK;
}

/* Softmax cross-entropy in the logits z (p = softmax(z / temperature) per
 * group): H = (diag p - p p') / temperature^2, so a' H b per group is
 * sum a b p - (sum a p)(sum b p), over temperature^2; mean over examples. */
static double curv_metric(void *vctx, const float *a, const float *b)
{
    curv_ctx *c = (curv_ctx *)vctx;
    layer *sm = &c->net->layers[c->st->curv_softmax];
    const int groups = sm->groups > 0 ? sm->groups : 1, gs = sm->inputs / groups;
    const float *p = c->st->p0;
    double sum = 0.0;
    for (size_t g = 0; g < (size_t)sm->batch * groups; ++g) {
        const size_t o = g * gs;
        double abp = 0, ap = 0, bp = 0;
        for (int k = 0; k < gs; ++k) {
            abp += (double)a[o + k] * b[o + k] * p[o + k];
            ap += (double)a[o + k] * p[o + k];
            bp += (double)b[o + k] * p[o + k];
        }
        sum += abp - ap * bp;
    }
    double t = sm->temperature > 0 ? sm->temperature : 1.0;
    return sum / (t * t) / sm->batch;
}

int kfac_dn_setup_curvature(network *net, kfac_net_state *st, int sm)
{
    layer *l = &net->layers[sm];
    size_t n = (size_t)l->inputs * l->batch;
    curv_ctx *c = (curv_ctx *)calloc(1, sizeof *c);
    st->p0 = (float *)calloc(n, sizeof(float));
    if (!c || !st->p0) { free(c); return -1; }
    c->net = net;
    c->st = st;
    st->curv_ctx = c;
    st->curv_softmax = sm;
    st->snap_bytes += n * sizeof(float);
    kfac_curvature k = { curv_outputs, curv_metric, c, n };
    return kfac_opt_set_curvature(st->opt, &k) == KFAC_OK ? 0 : -1;
}
