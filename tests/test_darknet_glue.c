/*
 * Tests of the Darknet glue (darknet_kfac/kfac_darknet_*.c and the patches that
 * call it) on tiny networks parsed from cfg strings, one thread, fixed seeds.
 * References are built independently in this file: finite differences of
 * net->cost for Darknet's gradients, a naive im2col and explicit sums for the
 * factors, and a dense damped Kronecker matrix solved by Gaussian elimination
 * for the K-FAC step. Cfg errors are checked end to end by running
 * `darknet kfac check` as a subprocess.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>

#include "darknet.h"
#include "network.h"
#include "kfac.h"
#include "kfac_dntest.h"
#include "kfac_tol.h"


/* Central differences of a float network in float: truncation ~eps^2*|f'''|
 * (~1e-4 with tanh/logistic and eps = 1e-2) plus cancellation
 * ~ulp(cost)/eps (~1e-5); gradients are O(0.1..1). */
#define FD_EPS 1e-2
#define TOL_FD_ABS 2e-3
#define TOL_FD_REL 2e-2
/* Darknet's weight_updates (float gemm, -Ofast) vs the same sum in double. */
#define TOL_GLUE_SUM_ABS 1e-5
#define TOL_GLUE_SUM_REL 1e-4
/* Factors from the library (float inputs, its own accumulation order) vs
 * explicit double sums over the same data. */
#define TOL_GLUE_FACTOR_REL 2e-5
/* One K-FAC step vs the dense double reference: the block solve in the
 * library goes through float g/Delta and Cholesky factors of well-damped
 * matrices (damping 0.05). */
#define TOL_GLUE_STEP_REL 2e-4
#define TOL_GLUE_NU 1e-4

/* ------------------------------------------------------------ helpers */

static char *write_cfg(const char *text)
{
    static char path[64];
    snprintf(path, sizeof path, "/tmp/test_darknet_glue_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *fp = fdopen(fd, "w");
    assert_non_null(fp);
    fputs(text, fp);
    fclose(fp);
    return path;
}

static network *build(const char *cfg)
{
    char *path = write_cfg(cfg);
    srand(12345);
    network *net = parse_network_cfg(path);
    unlink(path);
    return net;
}

static unsigned lcg_state;
static float lcg_uniform(void)
{
    lcg_state = lcg_state * 1664525u + 1013904223u;
    return (float)((lcg_state >> 8) / 16777216.0) * 2.f - 1.f;
}

/* Deterministic input and one-hot labels. */
static void fill_batch(network *net, unsigned seed)
{
    lcg_state = seed;
    for (int i = 0; i < net->inputs * net->batch; ++i) net->input[i] = lcg_uniform();
    memset(net->truth, 0, sizeof(float) * net->truths * net->batch);
    for (int b = 0; b < net->batch; ++b) net->truth[b * net->truths + (b * 2 + 1) % net->truths] = 1;
}

static void zero_updates(network *net)
{
    for (int i = 0; i < net->n; ++i) {
        layer *l = &net->layers[i];
        if (l->type == CONVOLUTIONAL) {
            memset(l->weight_updates, 0, sizeof(float) * l->nweights);
            memset(l->bias_updates, 0, sizeof(float) * l->n);
            if (l->scale_updates) memset(l->scale_updates, 0, sizeof(float) * l->n);
        } else if (l->type == CONNECTED) {
            memset(l->weight_updates, 0, sizeof(float) * l->inputs * l->outputs);
            memset(l->bias_updates, 0, sizeof(float) * l->outputs);
            if (l->scale_updates) memset(l->scale_updates, 0, sizeof(float) * l->outputs);
        }
    }
}

static void clear_all_stats(network *net)
{
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    for (int k = 0; k < st->nlayers; ++k) kfac_block_clear_stats(kfac_opt_block(st->opt, st->layers[k].slot));
}

/* One training datum's forward+backward at step 0, as train_network_datum
 * does it but without the update, so the test can look at everything. */
static void forward_backward(network *net)
{
    *net->seen = net->batch;
    net->train = 1;
    forward_network(net);
    backward_network(net);
}

static float cost_at(network *net)
{
    net->train = 1;
    forward_network(net);
    return *net->cost;
}

static const float *layer_input(network *net, int i)
{
    return i == 0 ? net->input : net->layers[i - 1].output;
}

/* Darknet's im2col for one example and group, written from the definition:
 * row (ch, kh, kw), column (oy, ox), zero outside the image; plus the row of
 * ones when the block has a bias. Returns a kb x T double matrix. */
static double *ref_patches(const layer *l, const float *in_example, int group, int bias)
{
    int cg = l->c / l->groups, k = cg * l->size * l->size, T = l->out_h * l->out_w;
    double *P = calloc((size_t)(k + bias) * T, sizeof(double));
    for (int ch = 0; ch < cg; ++ch)
        for (int kh = 0; kh < l->size; ++kh)
            for (int kw = 0; kw < l->size; ++kw)
                for (int oy = 0; oy < l->out_h; ++oy)
                    for (int ox = 0; ox < l->out_w; ++ox) {
                        int iy = oy * l->stride - l->pad + kh, ix = ox * l->stride - l->pad + kw;
                        int row = (ch * l->size + kh) * l->size + kw;
                        double v = 0;
                        if (iy >= 0 && iy < l->h && ix >= 0 && ix < l->w)
                            v = in_example[((group * cg + ch) * l->h + iy) * l->w + ix];
                        P[(size_t)row * T + oy * l->out_w + ox] = v;
                    }
    if (bias)
        for (int t = 0; t < T; ++t) P[(size_t)k * T + t] = 1;
    return P;
}

/* Brute-force A (kb x kb), G (n_g x n_g) and sum_i D_i P_i^T (n_g x k, the
 * batch-summed weight_updates) for one group of a conv or connected layer,
 * from the layer's input and its l.delta as the backward left them. The
 * factors average the first ceil(batch/sub) examples (cov_subsample), the
 * gradient sum covers the whole batch. */
static void ref_stats_sub(network *net, int li, int group, int bias, int sub, double *A,
                          double *G, double *DPt)
{
    layer *l = &net->layers[li];
    const float *x = layer_input(net, li);
    int conv = l->type == CONVOLUTIONAL;
    int ng = conv ? l->n / l->groups : l->outputs;
    int k = conv ? l->c / l->groups * l->size * l->size : l->inputs;
    int kb = k + bias, T = conv ? l->out_h * l->out_w : 1, M = l->batch;
    int Mu = (M + sub - 1) / sub;
    memset(A, 0, sizeof(double) * kb * kb);
    memset(G, 0, sizeof(double) * ng * ng);
    memset(DPt, 0, sizeof(double) * ng * k);
    for (int i = 0; i < M; ++i) {
        double *P;
        if (conv) {
            P = ref_patches(l, x + (size_t)i * l->c * l->h * l->w, group, bias);
        } else {
            P = calloc((size_t)kb, sizeof(double));
            for (int r = 0; r < k; ++r) P[r] = x[(size_t)i * k + r];
            if (bias) P[k] = 1;
        }
        const float *D = l->delta + ((size_t)i * (conv ? l->groups : 1) + group) * ng * T;
        for (int r = 0; r < kb && i < Mu; ++r)
            for (int s = 0; s < kb; ++s) {
                double acc = 0;
                for (int t = 0; t < T; ++t) acc += P[(size_t)r * T + t] * P[(size_t)s * T + t];
                A[r * kb + s] += acc / ((double)Mu * T);
            }
        for (int r = 0; r < ng && i < Mu; ++r)
            for (int s = 0; s < ng; ++s) {
                double acc = 0;
                for (int t = 0; t < T; ++t) acc += (double)D[r * T + t] * D[s * T + t];
                G[r * ng + s] += acc / ((double)Mu * T);
            }
        for (int r = 0; r < ng; ++r)
            for (int s = 0; s < k; ++s) {
                double acc = 0;
                for (int t = 0; t < T; ++t) acc += (double)D[r * T + t] * P[(size_t)s * T + t];
                DPt[r * k + s] += acc;
            }
        free(P);
    }
}

static void ref_stats(network *net, int li, int group, int bias, double *A, double *G,
                      double *DPt)
{
    ref_stats_sub(net, li, group, bias, 1, A, G, DPt);
}

static double max_abs_diag(const double *X, int n)
{
    double m = 0;
    for (int i = 0; i < n; ++i) m = fmax(m, fabs(X[i * n + i]));
    return m;
}

/* Checks the block's factors and Darknet's weight_updates of layer li
 * against ref_stats_sub, group by group. Call after update_cov. */
static void check_layer_stats_sub(network *net, int li, int sub)
{
    layer *l = &net->layers[li];
    kfac_layer_state *ls = (kfac_layer_state *)l->kfac;
    assert_non_null(ls);
    int kb = dn_info(ls).kb, ng = dn_info(ls).n_g, k = dn_info(ls).k;
    double *A = malloc(sizeof(double) * kb * kb), *G = malloc(sizeof(double) * ng * ng);
    double *A2 = malloc(sizeof(double) * kb * kb), *G2 = malloc(sizeof(double) * ng * ng);
    double *DPt = malloc(sizeof(double) * ng * k);
    for (int g = 0; g < dn_info(ls).groups; ++g) {
        ref_stats_sub(net, li, g, ls->bias, sub, A, G, DPt);
        assert_int_equal(kfac_block_get_factors(dn_block(ls), g, A2, G2), KFAC_OK);
        double sa = max_abs_diag(A, kb), sg = max_abs_diag(G, ng);
        assert_true(sg > 0);
        assert_close_arrays(A2, A, (size_t)kb * kb, TOL_GLUE_FACTOR_REL * sa, TOL_GLUE_FACTOR_REL,
                            "A factor vs brute force");
        assert_close_arrays(G2, G, (size_t)ng * ng, TOL_GLUE_FACTOR_REL * sg, TOL_GLUE_FACTOR_REL,
                            "G factor vs brute force");
        /* Darknet's weight_updates are -grad (checked by finite differences
         * elsewhere); the same deltas and patches must reproduce them. */
        const float *wu = l->weight_updates + (size_t)g * ng * k;
        double m = 0;
        for (int i = 0; i < ng * k; ++i) m = fmax(m, fabs(DPt[i]));
        assert_close_arrays_f(wu, DPt, (size_t)ng * k, TOL_GLUE_SUM_ABS * (1 + m), TOL_GLUE_SUM_REL,
                              "weight_updates vs sum_i D_i P_i^T");
    }
    free(A); free(G); free(A2); free(G2); free(DPt);
}

static void check_layer_stats(network *net, int li)
{
    check_layer_stats_sub(net, li, 1);
}

/* ------------------------------------------------------------ networks */

/* BN conv with IMAGE patches (3x3, stride 2, pad 1), a grouped pointwise conv
 * with bias, a connected layer with bias and a softmax. Smooth activations
 * so finite differences are clean. */
#define NET_A_HEAD \
    "[net]\nbatch=3\nsubdivisions=1\nheight=5\nwidth=5\nchannels=2\n"          \
    "momentum=0.9\ndecay=0.0005\nlearning_rate=0.1\npolicy=constant\n\n"       \
    "[convolutional]\nbatch_normalize=1\nfilters=4\nsize=3\nstride=2\npad=1\n" \
    "activation=tanh\n\n"                                                        \
    "[convolutional]\nfilters=4\nsize=1\nstride=1\npad=0\ngroups=2\n"           \
    "activation=logistic\n\n"                                                    \
    "[connected]\noutput=3\nactivation=linear\n\n"                              \
    "[softmax]\n\n"

static const char *cfg_a_empirical = NET_A_HEAD "[kfac]\nestimation_mode=empirical\n";
static const char *cfg_a_sampled = NET_A_HEAD "[kfac]\nestimation_mode=sampled\n";
static const char *cfg_a_subsample =
    NET_A_HEAD "[kfac]\nestimation_mode=empirical\ncov_subsample=2\n";

/* ------------------------------------------------------------ (a) */

static void fd_check(network *net, float *param, float *updates, int n, const char *what)
{
    double *fd = malloc(sizeof(double) * n);
    float *upd = malloc(sizeof(float) * n);
    memcpy(upd, updates, sizeof(float) * n);
    for (int i = 0; i < n; ++i) {
        float keep = param[i];
        param[i] = keep + (float)FD_EPS;
        double cp = cost_at(net);
        param[i] = keep - (float)FD_EPS;
        double cm = cost_at(net);
        param[i] = keep;
        /* Darknet's updates are minus the gradient of the batch-summed loss */
        fd[i] = -(cp - cm) / (2 * FD_EPS);
    }
    assert_close_arrays_f(upd, fd, (size_t)n, TOL_FD_ABS, TOL_FD_REL, what);
    free(fd);
    free(upd);
}

static void test_gradients_and_factors(void **state)
{
    (void)state;
    network *net = build(cfg_a_empirical);
    assert_non_null(net->kfac);
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    assert_int_equal(st->nlayers, 3);
    assert_int_equal(st->sampled, 0);
    fill_batch(net, 7);

    /* (1) Darknet's accumulators are minus the batch-summed gradient of
     * net->cost (softmax cross-entropy summed over the batch). */
    zero_updates(net);
    forward_backward(net);
    layer *c0 = &net->layers[0], *c1 = &net->layers[1], *fc = &net->layers[2];
    fd_check(net, c0->weights, c0->weight_updates, c0->nweights, "conv0 weights (BN)");
    fd_check(net, c0->scales, c0->scale_updates, c0->n, "conv0 BN scales");
    fd_check(net, c1->weights, c1->weight_updates, c1->nweights, "conv1 weights (grouped 1x1)");
    fd_check(net, c1->biases, c1->bias_updates, c1->n, "conv1 biases");
    fd_check(net, fc->weights, fc->weight_updates, fc->inputs * fc->outputs, "connected weights");
    fd_check(net, fc->biases, fc->bias_updates, fc->outputs, "connected biases");

    /* (2) the captured statistics of exactly one backward equal the
     * brute-force factors of the same inputs and deltas */
    clear_all_stats(net);
    zero_updates(net);
    forward_backward(net);
    for (int k = 0; k < st->nlayers; ++k)
        assert_int_equal(kfac_block_update_cov(kfac_opt_block(st->opt, st->layers[k].slot), 0.95), KFAC_OK);
    check_layer_stats(net, 0);
    check_layer_stats(net, 1);
    check_layer_stats(net, 2);
    free_network(net);
}

/* cov_subsample=2 with batch 3: factors from the first 2 examples, Darknet's
 * gradient (the weight_updates check) still from all 3. */
static void test_cov_subsample(void **state)
{
    (void)state;
    network *net = build(cfg_a_subsample);
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    assert_int_equal(kfac_opt_config(st->opt)->cov_subsample, 2);
    fill_batch(net, 13);
    clear_all_stats(net);
    zero_updates(net);
    forward_backward(net);
    for (int k = 0; k < st->nlayers; ++k)
        assert_int_equal(kfac_block_update_cov(kfac_opt_block(st->opt, st->layers[k].slot), 0.95), KFAC_OK);
    for (int k = 0; k < st->nlayers; ++k)
        check_layer_stats_sub(net, st->layers[k].index, 2);
    free_network(net);
}

/* ------------------------------------------------------------ (c) */

typedef struct { float *p; size_t n; } arr;

static int collect_accumulators(network *net, arr *out)
{
    int m = 0;
    for (int i = 0; i < net->n; ++i) {
        layer *l = &net->layers[i];
        size_t nw = 0, nb = 0;
        if (l->type == CONVOLUTIONAL) { nw = l->nweights; nb = l->n; }
        else if (l->type == CONNECTED) { nw = (size_t)l->inputs * l->outputs; nb = l->outputs; }
        else continue;
        out[m].p = l->weight_updates; out[m++].n = nw;
        out[m].p = l->bias_updates; out[m++].n = nb;
        if (l->scale_updates) { out[m].p = l->scale_updates; out[m++].n = nb; }
    }
    return m;
}

static void test_sampled_pass(void **state)
{
    (void)state;
    network *net = build(cfg_a_sampled);
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    assert_non_null(st);
    assert_int_equal(st->sampled, 1);
    assert_int_equal(st->softmax_index, 3);
    fill_batch(net, 11);
    clear_all_stats(net);
    zero_updates(net);
    forward_backward(net);

    arr acc[16];
    int m = collect_accumulators(net, acc);
    float *saved[16];
    for (int i = 0; i < m; ++i) {
        saved[i] = malloc(sizeof(float) * acc[i].n);
        memcpy(saved[i], acc[i].p, sizeof(float) * acc[i].n);
    }
    srand(99);
    kfac_backward_network_cpu(net);
    for (int i = 0; i < m; ++i) {
        assert_memory_equal(saved[i], acc[i].p, sizeof(float) * acc[i].n);
        free(saved[i]);
    }

    /* The softmax delta is onehot(y) - p for one sampled y per example. */
    layer *sm = &net->layers[3];
    for (int b = 0; b < sm->batch; ++b) {
        int ones = 0;
        for (int c = 0; c < sm->inputs; ++c) {
            float d = sm->delta[b * sm->inputs + c], p = sm->output[b * sm->inputs + c];
            if (d == 1 - p && d > 0) ++ones;
            else assert_true(d == -p);
        }
        assert_int_equal(ones, 1);
    }

    /* A from the normal pass, G from the sampled pass (whose deltas are
     * still in l.delta): both must match brute force on that data. */
    for (int k = 0; k < st->nlayers; ++k)
        assert_int_equal(kfac_block_update_cov(kfac_opt_block(st->opt, st->layers[k].slot), 0.95), KFAC_OK);
    for (int k = 0; k < st->nlayers; ++k) {
        /* the weight_updates check inside uses the sampled deltas, so only
         * the factors are compared here */
        kfac_layer_state *ls = &st->layers[k];
        int kb = dn_info(ls).kb, ng = dn_info(ls).n_g, kk = dn_info(ls).k;
        double *A = malloc(sizeof(double) * kb * kb), *G = malloc(sizeof(double) * ng * ng);
        double *A2 = malloc(sizeof(double) * kb * kb), *G2 = malloc(sizeof(double) * ng * ng);
        double *DPt = malloc(sizeof(double) * ng * kk);
        for (int g = 0; g < dn_info(ls).groups; ++g) {
            ref_stats(net, ls->index, g, ls->bias, A, G, DPt);
            assert_int_equal(kfac_block_get_factors(dn_block(ls), g, A2, G2), KFAC_OK);
            double sa = max_abs_diag(A, kb), sg = max_abs_diag(G, ng);
            assert_close_arrays(A2, A, (size_t)kb * kb, TOL_GLUE_FACTOR_REL * sa,
                                TOL_GLUE_FACTOR_REL, "A (normal pass) vs brute force");
            assert_close_arrays(G2, G, (size_t)ng * ng, TOL_GLUE_FACTOR_REL * sg,
                                TOL_GLUE_FACTOR_REL, "G (sampled pass) vs brute force");
        }
        free(A); free(G); free(A2); free(G2); free(DPt);
    }
    free_network(net);
}

/* ------------------------------------------------------------ (b) */

/* Solves X x = b in place (n x n, partial pivoting); b becomes x. */
static void dense_solve(double *X, double *b, int n)
{
    for (int c = 0; c < n; ++c) {
        int p = c;
        for (int r = c + 1; r < n; ++r)
            if (fabs(X[r * n + c]) > fabs(X[p * n + c])) p = r;
        if (p != c) {
            for (int j = 0; j < n; ++j) { double t = X[c * n + j]; X[c * n + j] = X[p * n + j]; X[p * n + j] = t; }
            double t = b[c]; b[c] = b[p]; b[p] = t;
        }
        for (int r = c + 1; r < n; ++r) {
            double f = X[r * n + c] / X[c * n + c];
            for (int j = c; j < n; ++j) X[r * n + j] -= f * X[c * n + j];
            b[r] -= f * b[c];
        }
    }
    for (int c = n - 1; c >= 0; --c) {
        double s = b[c];
        for (int j = c + 1; j < n; ++j) s -= X[c * n + j] * b[j];
        b[c] = s / X[c * n + c];
    }
}

#define STEP_LR 0.1
#define STEP_DECAY 0.0005
#define STEP_DAMPING 0.05
#define STEP_NORM 1e-4
#define STEP_EMA 0.5
#define STEP_MOMENTUM 0.5 /* [kfac] momentum; [net] says 0.9 and must lose */

static const char *cfg_step =
    "[net]\nbatch=4\nsubdivisions=1\nheight=4\nwidth=4\nchannels=2\n"
    "momentum=0.9\ndecay=0.0005\nlearning_rate=0.1\npolicy=constant\n\n"
    "[convolutional]\nfilters=3\nsize=3\nstride=1\npad=1\nactivation=tanh\n\n"
    "[connected]\noutput=3\nactivation=linear\n\n"
    "[softmax]\n\n"
    "[kfac]\nestimation_mode=empirical\ndamping=0.05\nnorm_constraint=0.0001\n"
    "invert_every=1\nmomentum=0.5\ncov_ema_decay=0.5\nstep_size=policy\ncov_update_every=1\n";

/* Dense reference state of one layer (one group, with bias): running
 * factors, this step's g, Delta and the velocity, all in double and in the
 * row-major [W | b] order. */
typedef struct {
    layer *l;
    int ng, k, kb, T, n;
    double *A, *G;     /* running factors */
    double *g, *delta, *v;
    float *W, *b;      /* weights before the current step */
} ref_layer;

static void ref_init(ref_layer *r, layer *l)
{
    int conv = l->type == CONVOLUTIONAL;
    r->l = l;
    r->ng = conv ? l->n : l->outputs;
    r->k = conv ? l->c * l->size * l->size : l->inputs;
    r->kb = r->k + 1;
    r->T = conv ? l->out_h * l->out_w : 1;
    r->n = r->ng * r->kb;
    r->A = calloc((size_t)r->kb * r->kb, sizeof(double));
    r->G = calloc((size_t)r->ng * r->ng, sizeof(double));
    r->g = calloc((size_t)r->n, sizeof(double));
    r->delta = calloc((size_t)r->n, sizeof(double));
    r->v = calloc((size_t)r->n, sizeof(double));
    r->W = malloc(sizeof(float) * r->ng * r->k);
    r->b = malloc(sizeof(float) * r->ng);
}

static void ref_free(ref_layer *r)
{
    free(r->A); free(r->G); free(r->g); free(r->delta); free(r->v); free(r->W); free(r->b);
}

static void ref_save_weights(ref_layer *r)
{
    memcpy(r->W, r->l->weights, sizeof(float) * r->ng * r->k);
    memcpy(r->b, r->l->biases, sizeof(float) * r->ng);
}

/* After a training datum: folds this step's brute-force statistics into the
 * running factors (first step taken as is), builds g from the deltas and
 * patches, and solves the damped dense system for Delta. */
static void ref_step(network *net, int li, ref_layer *r, int first)
{
    int ng = r->ng, k = r->k, kb = r->kb, T = r->T, n = r->n, B = r->l->batch;
    double *A = malloc(sizeof(double) * kb * kb), *G = malloc(sizeof(double) * ng * ng);
    double *DPt = malloc(sizeof(double) * ng * k);
    ref_stats(net, li, 0, 1, A, G, DPt);
    for (int i = 0; i < kb * kb; ++i) r->A[i] = first ? A[i] : STEP_EMA * r->A[i] + (1 - STEP_EMA) * A[i];
    for (int i = 0; i < ng * ng; ++i) r->G[i] = first ? G[i] : STEP_EMA * r->G[i] + (1 - STEP_EMA) * G[i];
    for (int q = 0; q < ng; ++q) {
        double gb = 0;
        for (int i = 0; i < B; ++i)
            for (int t = 0; t < T; ++t) gb += r->l->delta[((size_t)i * ng + q) * T + t];
        for (int s = 0; s < k; ++s)
            r->g[q * kb + s] = -DPt[q * k + s] / B + STEP_DECAY * r->W[q * k + s];
        r->g[q * kb + k] = -gb / B;
    }
    double trA = 0, trG = 0;
    for (int i = 0; i < kb; ++i) trA += r->A[i * kb + i];
    for (int i = 0; i < ng; ++i) trG += r->G[i * ng + i];
    double lam = STEP_DAMPING / T, pi = sqrt((trA / kb) / (trG / ng));
    double lamA = sqrt(lam) * pi, lamG = sqrt(lam) / pi;
    double *F = malloc(sizeof(double) * n * n);
    for (int q = 0; q < ng; ++q)
        for (int s = 0; s < kb; ++s)
            for (int q2 = 0; q2 < ng; ++q2)
                for (int s2 = 0; s2 < kb; ++s2)
                    F[(size_t)(q * kb + s) * n + q2 * kb + s2] =
                        T * (r->G[q * ng + q2] + (q == q2) * lamG) *
                        (r->A[s * kb + s2] + (s == s2) * lamA);
    memcpy(r->delta, r->g, sizeof(double) * n);
    dense_solve(F, r->delta, n);
    free(A); free(G); free(DPt); free(F);
}

static double ref_dot(const ref_layer *r)
{
    double d = 0;
    for (int i = 0; i < r->n; ++i) d += r->g[i] * r->delta[i];
    return d;
}

/* v = mu*v + nu*Delta; W -= lr*v; compares the change of the network's
 * weights and biases with the reference change. */
static void ref_apply_and_compare(ref_layer *r, double nu, double mu, double lr)
{
    int ng = r->ng, k = r->k, kb = r->kb;
    double *dw = malloc(sizeof(double) * ng * k), *db = malloc(sizeof(double) * ng);
    float *aw = malloc(sizeof(float) * ng * k), *ab = malloc(sizeof(float) * ng);
    double ms = 0, mw = 0;
    for (int i = 0; i < r->n; ++i) r->v[i] = mu * r->v[i] + nu * r->delta[i];
    for (int q = 0; q < ng; ++q) {
        for (int s = 0; s < k; ++s) {
            dw[q * k + s] = -lr * r->v[q * kb + s];
            aw[q * k + s] = r->l->weights[q * k + s] - r->W[q * k + s];
            ms = fmax(ms, fabs(dw[q * k + s]));
            mw = fmax(mw, fabs(r->W[q * k + s]));
        }
        db[q] = -lr * r->v[q * kb + k];
        ab[q] = r->l->biases[q] - r->b[q];
        ms = fmax(ms, fabs(db[q]));
    }
    assert_true(ms > 0);
    /* float W_new - W_old carries ~ulp(W) on top of the step's own error */
    double abs_tol = TOL_GLUE_STEP_REL * ms + 4 * TOL_FLOAT_EPS * (mw + 1);
    assert_close_arrays_f(aw, dw, (size_t)ng * k, abs_tol, TOL_GLUE_STEP_REL, "K-FAC weight step vs dense");
    assert_close_arrays_f(ab, db, (size_t)ng, abs_tol, TOL_GLUE_STEP_REL, "K-FAC bias step vs dense");
    for (int i = 0; i < ng * k; ++i) assert_true(r->l->weight_updates[i] == 0);
    free(dw); free(db); free(aw); free(ab);
}

/* The same net with a steps policy (lr 0.1, then 0.025 from step 1) and
 * norm_constraint_lr=base: nu is computed with the base rate, so the clipped
 * second step is a quarter of what the current-rate clip would give. */
static const char *cfg_step_base =
    "[net]\nbatch=4\nsubdivisions=1\nheight=4\nwidth=4\nchannels=2\n"
    "momentum=0.9\ndecay=0.0005\nlearning_rate=0.1\npolicy=steps\nsteps=2\nscales=0.25\n\n"
    "[convolutional]\nfilters=3\nsize=3\nstride=1\npad=1\nactivation=tanh\n\n"
    "[connected]\noutput=3\nactivation=linear\n\n"
    "[softmax]\n\n"
    "[kfac]\nestimation_mode=empirical\ndamping=0.05\nnorm_constraint=0.0001\n"
    "invert_every=1\nmomentum=0.5\ncov_ema_decay=0.5\nnorm_constraint_lr=base\nstep_size=policy\ncov_update_every=1\n";

static void steps_match_dense(const char *cfg, int clip_base)
{
    network *net = build(cfg);
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    assert_non_null(st);
    assert_int_equal(st->nlayers, 2);
    assert_true(dn_opt(st).momentum == STEP_MOMENTUM);
    ref_layer r[2];
    ref_init(&r[0], &net->layers[0]);
    ref_init(&r[1], &net->layers[1]);
    *net->seen = 0;

    /* step 0: first factors as is, v = nu*Delta; step 1: EMA factors, fresh
     * inverse (invert_every=1), momentum on the previous velocity */
    for (int step = 0; step < 2; ++step) {
        double lr = clip_base && step == 1 ? STEP_LR * 0.25 : STEP_LR;
        double lr_clip = clip_base ? STEP_LR : lr;
        fill_batch(net, 3 + 10 * step);
        ref_save_weights(&r[0]);
        ref_save_weights(&r[1]);
        train_network_datum(net); /* forward, backward, K-FAC update */
        assert_int_equal(dn_opt(st).steps_run, step + 1);
        assert_int_equal(dn_last_skipped(st), 0);
        /* outputs and deltas survive the update: rebuild the step from them */
        ref_step(net, 0, &r[0], step == 0);
        ref_step(net, 1, &r[1], step == 0);
        double gd = ref_dot(&r[0]) + ref_dot(&r[1]);
        double nu = fmin(1.0, sqrt(STEP_NORM / (lr_clip * lr_clip * gd)));
        assert_true(nu < 1); /* the cfg is meant to exercise clipping */
        if (!(fabs(st->last.step.nu - nu) <= TOL_GLUE_NU * nu)) {
            print_error("step %d: nu %.8g, reference %.8g\n", step, st->last.step.nu, nu);
            fail();
        }
        ref_apply_and_compare(&r[0], nu, STEP_MOMENTUM, lr);
        ref_apply_and_compare(&r[1], nu, STEP_MOMENTUM, lr);
    }
    ref_free(&r[0]);
    ref_free(&r[1]);
    free_network(net);
}

static void test_kfac_steps_match_dense(void **state)
{
    (void)state;
    steps_match_dense(cfg_step, 0);
    steps_match_dense(cfg_step_base, 1);
}

/* step_size=auto with the network's exact curvature: the step the context
 * takes is u = a Delta + b u0 with (a, b) solving the 2x2 model built from
 * a dense Gauss-Newton matrix J' H J / B (J by central differences of the
 * softmax inputs, one parameter at a time; H = diag p - p p' per example)
 * plus (damping + decay) I, and Delta the dense damped Kronecker solve.
 * Tolerance: the library's J v is a forward difference with a 1e-3 relative
 * perturbation (first-order error ~1e-3 of J v), the reference's a central
 * difference with h = 4e-3 (~1e-5), both through float forward passes. */
#define TOL_GLUE_AUTO_REL 2e-2
static const char *cfg_auto =
    "[net]\nbatch=4\nsubdivisions=1\nheight=4\nwidth=4\nchannels=2\n"
    "momentum=0.9\ndecay=0.0005\nlearning_rate=0.1\npolicy=constant\n\n"
    "[convolutional]\nfilters=3\nsize=3\nstride=1\npad=1\nactivation=tanh\n\n"
    "[connected]\noutput=3\nactivation=linear\n\n"
    "[softmax]\n\n"
    "[kfac]\nestimation_mode=empirical\ndamping=0.05\nnorm_constraint=0\n"
    "invert_every=1\ncov_ema_decay=0.5\ndamping_adapt_every=0\ncov_update_every=1\n";

static float *param_at(ref_layer *r, int p)
{
    int q = p / r->kb, s = p % r->kb;
    return s < r->k ? &r->l->weights[q * r->k + s] : &r->l->biases[q];
}

/* J (n_out x P, P the parameters of both layers in [W | b] order) of the
 * softmax inputs; leaves the network's outputs those of the weights as
 * they are. */
static double *dense_jacobian(network *net, ref_layer *r, int nl, int *P_out, size_t *n_out)
{
    layer *sm = &net->layers[net->n - 1];
    const float *z = net->layers[net->n - 2].output;
    size_t no = (size_t)sm->inputs * sm->batch;
    int P = 0;
    for (int i = 0; i < nl; ++i) P += r[i].n;
    double *J = calloc(no * P, sizeof(double));
    float *zp = malloc(no * sizeof(float));
    const float h = 4e-3f;
    int col = 0;
    for (int i = 0; i < nl; ++i)
        for (int p = 0; p < r[i].n; ++p, ++col) {
            float *w = param_at(&r[i], p), w0 = *w;
            *w = w0 + h;
            forward_network(net);
            memcpy(zp, z, no * sizeof(float));
            *w = w0 - h;
            forward_network(net);
            for (size_t o = 0; o < no; ++o) J[o * P + col] = ((double)zp[o] - z[o]) / (2.0 * h);
            *w = w0;
        }
    forward_network(net);
    free(zp);
    *P_out = P;
    *n_out = no;
    return J;
}

/* a' H b for output-space vectors of the whole batch, mean over examples */
static double gn_metric(const layer *sm, const double *a, const double *b)
{
    double sum = 0;
    for (int i = 0; i < sm->batch; ++i) {
        const float *p = sm->output + (size_t)i * sm->inputs;
        const double *ai = a + (size_t)i * sm->inputs, *bi = b + (size_t)i * sm->inputs;
        double abp = 0, ap = 0, bp = 0;
        for (int c = 0; c < sm->inputs; ++c) {
            abp += ai[c] * bi[c] * p[c];
            ap += ai[c] * p[c];
            bp += bi[c] * p[c];
        }
        sum += abp - ap * bp;
    }
    return sum / sm->batch;
}

static void test_auto_step_matches_dense(void **state)
{
    (void)state;
    network *net = build(cfg_auto);
    kfac_net_state *st = dn_state(net);
    assert_true(st->curv_softmax == 2);
    ref_layer r[2];
    ref_init(&r[0], &net->layers[0]);
    ref_init(&r[1], &net->layers[1]);
    layer *sm = &net->layers[2];
    for (int step = 0; step < 2; ++step) {
        fill_batch(net, 7 + 10 * step);
        ref_save_weights(&r[0]);
        ref_save_weights(&r[1]);
        *net->seen = (size_t)(step + 1) * net->batch;
        net->train = 1;
        forward_network(net);
        backward_network(net);
        ref_step(net, 0, &r[0], step == 0);
        ref_step(net, 1, &r[1], step == 0);
        int P;
        size_t no;
        double *J = dense_jacobian(net, r, 2, &P, &no);
        /* the directions: Delta and the previous step u0, stacked */
        double *D = calloc(P, sizeof(double)), *U = calloc(P, sizeof(double));
        double *JD = calloc(no, sizeof(double)), *JU = calloc(no, sizeof(double));
        double r1 = 0, r2 = 0, d2 = 0, u2 = 0, du = 0, dw2 = 0, uw2 = 0, duw = 0;
        int c = 0;
        for (int i = 0; i < 2; ++i)
            for (int p = 0; p < r[i].n; ++p, ++c) {
                D[c] = r[i].delta[p];
                U[c] = r[i].v[p];
                r1 += r[i].g[p] * D[c];
                r2 += r[i].g[p] * U[c];
                d2 += D[c] * D[c];
                u2 += U[c] * U[c];
                du += D[c] * U[c];
                if (p % r[i].kb < r[i].k) {
                    dw2 += D[c] * D[c];
                    uw2 += U[c] * U[c];
                    duw += D[c] * U[c];
                }
            }
        for (size_t o = 0; o < no; ++o)
            for (int q = 0; q < P; ++q) {
                JD[o] += J[o * P + q] * D[q];
                JU[o] += J[o * P + q] * U[q];
            }
        double m11 = gn_metric(sm, JD, JD) + STEP_DAMPING * d2 + STEP_DECAY * dw2;
        double m12 = gn_metric(sm, JD, JU) + STEP_DAMPING * du + STEP_DECAY * duw;
        double m22 = gn_metric(sm, JU, JU) + STEP_DAMPING * u2 + STEP_DECAY * uw2;
        double a = r1 / m11, b = 0;
        if (step > 0) {
            double det = m11 * m22 - m12 * m12;
            a = (r1 * m22 - r2 * m12) / det;
            b = (m11 * r2 - m12 * r1) / det;
        }
        update_network(net);
        assert_int_equal(dn_last_skipped(st), 0);
        if (!(fabs(st->last.alpha - a) <= TOL_GLUE_AUTO_REL * fabs(a)) ||
            (step > 0 && !(fabs(st->last.momentum - b) <= TOL_GLUE_AUTO_REL * fabs(b) + 1e-3))) {
            print_error("step %d: alpha %.6g momentum %.6g, dense %.6g %.6g\n", step,
                        st->last.alpha, st->last.momentum, a, b);
            fail();
        }
        assert_true(step == 0 ? st->last.momentum == 0 : fabs(b) > 1e-3);
        /* the weights moved by u = a Delta + b u0 (the reference's u0 is the
         * step the network really took, so errors do not compound) */
        c = 0;
        double mx = 0;
        for (int i = 0; i < 2; ++i)
            for (int p = 0; p < r[i].n; ++p) mx = fmax(mx, fabs(a * r[i].delta[p] + b * r[i].v[p]));
        for (int i = 0; i < 2; ++i)
            for (int p = 0; p < r[i].n; ++p) {
                int q = p / r[i].kb, s2 = p % r[i].kb;
                float before = s2 < r[i].k ? r[i].W[q * r[i].k + s2] : r[i].b[q];
                double u = (double)before - *param_at(&r[i], p);
                double want = a * r[i].delta[p] + b * r[i].v[p];
                if (!(fabs(u - want) <= TOL_GLUE_AUTO_REL * mx)) {
                    print_error("layer %d param %d: step %.6g, dense %.6g\n", i, p, u, want);
                    fail();
                }
                r[i].v[p] = u;
            }
        free(J); free(D); free(U); free(JD); free(JU);
    }
    ref_free(&r[0]);
    ref_free(&r[1]);
    free_network(net);
}

/* Every array a layer keeps across steps (weights file contents, rolling
 * statistics, accumulators), *net->cost, input and truth, in one buffer. */
typedef struct { float *v; size_t n, cap; } flat;
static void flat_add(void *ctx, const char *name, float *p, size_t n)
{
    (void)name;
    flat *f = ctx;
    if (f->n + n > f->cap) {
        f->cap = 2 * (f->n + n);
        f->v = realloc(f->v, f->cap * sizeof(float));
    }
    memcpy(f->v + f->n, p, n * sizeof(float));
    f->n += n;
}
static flat flat_state(network *net)
{
    flat f = { 0, 0, 0 };
    for (int i = 0; i < net->n; ++i) {
        kfac_dn_walk_params(&net->layers[i], flat_add, &f);
        kfac_dn_walk_accums(&net->layers[i], flat_add, &f);
    }
    flat_add(&f, "cost", net->cost, 1);
    flat_add(&f, "input", net->input, (size_t)net->inputs * net->batch);
    flat_add(&f, "truth", net->truth, (size_t)net->truths * net->batch);
    return f;
}

/* The damping adaptation's extra forward pass and the exact curvature's
 * passes leave every buffer the next step reads bit-identical (a
 * training-mode pass moves the batch-norm rolling statistics: they are put
 * back), and the pass's loss is the network's loss at those weights. */
static void test_extra_passes_leave_state(void **state)
{
    (void)state;
    network *net = build(NET_A_HEAD "[kfac]\nestimation_mode=empirical\ndamping_adapt_every=1\n");
    kfac_net_state *st = dn_state(net);
    assert_true(st->neval >= 2); /* the BN conv's rolling mean and variance */
    assert_true(st->curv_softmax == 3);
    fill_batch(net, 31);
    forward_backward(net);
    float cost = *net->cost;
    flat a = flat_state(net);
    double loss = kfac_dn_eval_loss(net, st);
    flat b = flat_state(net);
    assert_int_equal(a.n, b.n);
    assert_memory_equal(a.v, b.v, a.n * sizeof(float));
    assert_true(loss == cost / net->batch); /* same weights, same batch statistics */
    free(b.v);

    /* a whole step with adaptation and exact curvature: the rolling
     * statistics are those of the datum's own forward pass */
    flat roll0 = { 0, 0, 0 }, roll1 = { 0, 0, 0 };
    layer *c0 = &net->layers[0];
    flat_add(&roll0, "", c0->rolling_mean, c0->n);
    flat_add(&roll0, "", c0->rolling_variance, c0->n);
    update_network(net);
    assert_true(st->last.adapt_due && st->last.step.applied == 3);
    assert_true(isfinite(dn_opt(st).rho));
    flat_add(&roll1, "", c0->rolling_mean, c0->n);
    flat_add(&roll1, "", c0->rolling_variance, c0->n);
    assert_memory_equal(roll0.v, roll1.v, roll0.n * sizeof(float));
    assert_true(*net->cost == cost);
    free(a.v); free(roll0.v); free(roll1.v);
    free_network(net);
}

/* A BN conv keeps Darknet's SGD for its scales/shifts; sampled mode trains
 * a few steps without NaN through train_network_datum. */
static void test_train_steps_finite(void **state)
{
    (void)state;
    network *net = build(cfg_a_sampled);
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    fill_batch(net, 5);
    layer *c0 = &net->layers[0];
    float s0 = c0->scales[0];
    *net->seen = 0;
    for (int it = 0; it < 5; ++it) train_network_datum(net);
    assert_int_equal(dn_opt(st).steps_run, 5);
    assert_int_equal(dn_opt(st).total_failures, 0);
    assert_true(c0->scales[0] != s0);
    for (int i = 0; i < net->n; ++i) {
        layer *l = &net->layers[i];
        if (l->type == CONVOLUTIONAL)
            for (int j = 0; j < l->nweights; ++j) assert_true(isfinite(l->weights[j]));
    }
    free_network(net);
}

/* Non-finite statistics: the step is counted as failed, no K-FAC weight or
 * BN scale moves, and max_failures consecutive failures stop the program. */
static void test_failures_counted_and_stop(void **state)
{
    (void)state;
    char cfg[2048];
    snprintf(cfg, sizeof cfg, "%s", NET_A_HEAD "[kfac]\nmax_failures=3\n");
    network *net = build(cfg);
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    fill_batch(net, 5);
    *net->seen = 0;
    train_network_datum(net); /* one good step: every block has an inverse */
    assert_int_equal(dn_opt(st).total_failures, 0);

    size_t nsave = 0;
    for (int k = 0; k < st->nlayers; ++k) nsave += st->layers[k].nweights + st->layers[k].nbiases;
    float *before = malloc(sizeof(float) * nsave), *p = before;
    for (int k = 0; k < st->nlayers; ++k) {
        layer *l = &net->layers[st->layers[k].index];
        memcpy(p, l->weights, sizeof(float) * st->layers[k].nweights); p += st->layers[k].nweights;
        memcpy(p, l->biases, sizeof(float) * st->layers[k].nbiases); p += st->layers[k].nbiases;
    }
    float scale0 = net->layers[0].scales[0];
    for (int i = 0; i < net->inputs * net->batch; ++i) net->input[i] = NAN;
    train_network_datum(net);
    train_network_datum(net);
    assert_int_equal(dn_opt(st).consecutive_failures, 2);
    assert_int_equal(dn_opt(st).total_failures, 2);
    p = before;
    for (int k = 0; k < st->nlayers; ++k) {
        layer *l = &net->layers[st->layers[k].index];
        assert_memory_equal(p, l->weights, sizeof(float) * st->layers[k].nweights);
        p += st->layers[k].nweights;
        assert_memory_equal(p, l->biases, sizeof(float) * st->layers[k].nbiases);
        p += st->layers[k].nbiases;
    }
    assert_true(net->layers[0].scales[0] == scale0);
    free(before);

    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        train_network_datum(net); /* third failure in a row: must exit(1) */
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 1);
    free_network(net);
}

/* ------------------------------------------------------------ (d) */

static const char *darknet_bin(void)
{
    const char *env = getenv("KFAC_DARKNET");
    return env ? env : DARKNET_BIN;
}

/* Runs `darknet kfac check cfg`; returns the exit status, stderr in err. */
static int run_check(const char *cfg, char *err, size_t errlen)
{
    char *path = write_cfg(cfg);
    char errpath[64], cmd[512];
    snprintf(errpath, sizeof errpath, "%s.err", path);
    snprintf(cmd, sizeof cmd, "ASAN_OPTIONS=detect_leaks=0 %s kfac check %s >/dev/null 2>%s",
             darknet_bin(), path, errpath);
    if (access(darknet_bin(), X_OK) != 0) {
        print_error("darknet binary %s not found (set KFAC_DARKNET)\n", darknet_bin());
        fail();
    }
    int rc = system(cmd);
    FILE *fp = fopen(errpath, "r");
    size_t n = fp ? fread(err, 1, errlen - 1, fp) : 0;
    err[n] = 0;
    if (fp) fclose(fp);
    unlink(errpath);
    unlink(path);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

#define CHECK_HEAD \
    "[net]\nbatch=2\nheight=4\nwidth=4\nchannels=1\n\n"                      \
    "[convolutional]\nfilters=2\nsize=3\npad=1\nactivation=leaky\n\n"      \
    "[maxpool]\nsize=2\nstride=2\n\n"                                        \
    "[connected]\noutput=2\n\n"                                              \
    "[softmax]\n\n"
/* CHECK_HEAD is 21 lines; [kfac] is line 22. */

static void expect_error(const char *cfg, const char *needle1, const char *needle2)
{
    char err[8192];
    int rc = run_check(cfg, err, sizeof err);
    if (rc == 0 || !strstr(err, needle1) || (needle2 && !strstr(err, needle2))) {
        print_error("exit %d, expected non-zero and stderr with '%s' and '%s':\n%s\n", rc,
                    needle1, needle2 ? needle2 : "", err);
        fail();
    }
}

static void test_cfg_errors(void **state)
{
    (void)state;
    char err[8192];
    int rc = run_check(CHECK_HEAD "[kfac]\ndamping=0.01\n", err, sizeof err);
    if (rc != 0) {
        print_error("valid cfg rejected (exit %d):\n%s\n", rc, err);
        fail();
    }
    expect_error(CHECK_HEAD "[kfac]\ndamping=0.01\ndampnig=0.1\n", ":24:", "dampnig");
    expect_error(CHECK_HEAD "[kfac]\ninvert_every=often\n", ":23:", "invert_every");
    expect_error(CHECK_HEAD "[kfac]\ndamping=0.01\n\n[kfac]\nskip=0\n", ":25:", "second [kfac]");
    expect_error(CHECK_HEAD "[kfac]\nskip=7\n", ":23:", "layer 7 does not exist");
    expect_error(CHECK_HEAD "[kfac]\nskip=1\n", ":23:", "layer 1 is max");
    expect_error(CHECK_HEAD "[kfac]\nskip=0,2\n", ":22:", "no layer can use K-FAC");
    expect_error(CHECK_HEAD, "no [kfac] section", NULL);
}


/* ------------------------------------------------------------ 1x1 + shortcut */

/* A 1x1 conv whose input also feeds a shortcut: upstream's CPU backward wrote
 * the 1x1 input gradient with BETA 0 and so discarded the shortcut's share
 * (patches/0001). Finite differences through both paths catch that. */
static const char *cfg_conv1x1_shortcut =
    "[net]\nbatch=2\nsubdivisions=1\nheight=4\nwidth=4\nchannels=2\n\n"
    "[convolutional]\nfilters=3\nsize=3\nstride=1\npad=1\nactivation=tanh\n\n"
    "[convolutional]\nfilters=3\nsize=1\nstride=1\npad=0\nactivation=tanh\n\n"
    "[shortcut]\nfrom=-2\nactivation=linear\n\n"
    "[connected]\noutput=3\nactivation=linear\n\n"
    "[softmax]\n";

static void test_conv1x1_backward_adds_to_shortcut_gradient(void **state)
{
    (void)state;
    network *net = build(cfg_conv1x1_shortcut);
    assert_null(net->kfac); /* plain Darknet: the fix is upstream behaviour */
    fill_batch(net, 11);
    zero_updates(net);
    forward_backward(net);
    layer *c0 = &net->layers[0];
    fd_check(net, c0->weights, c0->weight_updates, c0->nweights, "conv0 weights under a 1x1 + shortcut");
    fd_check(net, c0->biases, c0->bias_updates, c0->n, "conv0 biases under a 1x1 + shortcut");
    free_network(net);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gradients_and_factors),
        cmocka_unit_test(test_sampled_pass),
        cmocka_unit_test(test_cov_subsample),
        cmocka_unit_test(test_kfac_steps_match_dense),
        cmocka_unit_test(test_auto_step_matches_dense),
        cmocka_unit_test(test_extra_passes_leave_state),
        cmocka_unit_test(test_train_steps_finite),
        cmocka_unit_test(test_failures_counted_and_stop),
        cmocka_unit_test(test_cfg_errors),
        cmocka_unit_test(test_conv1x1_backward_adds_to_shortcut_gradient),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
