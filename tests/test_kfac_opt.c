/*
 * Tests of the optimizer context (kfac_opt): its one validation, that its
 * step is exactly the documented composition of the block primitives
 * (update_cov, instantiate_factors + update_inverses on the schedule,
 * kfac_step with the scaled norm constraint), which are themselves tested
 * against dense references elsewhere; the whole-step skip on a non-finite
 * gradient, the failure counters and max_failures; the statistics hook; and
 * that its exported state makes a second context continue bit for bit, for
 * every damping type and precision.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kfac.h"
#include "kfac_naive.h"
#include "kfac_testutil.h"

/* Two layers: a conv with bias (groups 2) and a connected layer without
 * (batch norm: its shift gradients are an aux array). */
#define M 6
static const kfac_conv_geom *geom(void)
{
    static kfac_conv_geom g;
    g = tu_geom(4, 5, 5, 4, 3, 1, 1, 1, 2, 1, KFAC_PATCHES_GENERAL);
    return &g;
}
#define FC_IN 7
#define FC_OUT 3

typedef struct {
    float *w[2], *b0, *gw[2], *gb0, *aux1;
    size_t nw[2];
    float *x0, *d0, *x1, *d1; /* statistics inputs */
} net2;

static void net_alloc(net2 *n, naive_rng *r)
{
    const kfac_conv_geom *g = geom();
    n->nw[0] = (size_t)g->n * (g->c / g->groups) * g->size * g->size;
    n->nw[1] = (size_t)FC_IN * FC_OUT;
    for (int i = 0; i < 2; i++) {
        n->w[i] = naive_alloc(n->nw[i], sizeof(float));
        n->gw[i] = naive_alloc(n->nw[i], sizeof(float));
        for (size_t j = 0; j < n->nw[i]; j++) n->w[i][j] = (float)(0.5 * naive_rng_sym(r));
    }
    n->b0 = naive_alloc(g->n, sizeof(float));
    n->gb0 = naive_alloc(g->n, sizeof(float));
    n->aux1 = naive_alloc(FC_OUT, sizeof(float));
    n->x0 = naive_alloc((size_t)M * g->c * g->h * g->w, sizeof(float));
    n->d0 = naive_alloc((size_t)M * g->n * g->h * g->w, sizeof(float));
    n->x1 = naive_alloc((size_t)M * FC_IN, sizeof(float));
    n->d1 = naive_alloc((size_t)M * FC_OUT, sizeof(float));
}

static void net_free(net2 *n)
{
    for (int i = 0; i < 2; i++) { free(n->w[i]); free(n->gw[i]); }
    free(n->b0); free(n->gb0); free(n->aux1);
    free(n->x0); free(n->d0); free(n->x1); free(n->d1);
}

static void net_copy_params(net2 *dst, const net2 *src)
{
    for (int i = 0; i < 2; i++) memcpy(dst->w[i], src->w[i], src->nw[i] * sizeof(float));
    memcpy(dst->b0, src->b0, geom()->n * sizeof(float));
}

/* This step's gradients and statistics inputs, the same for every copy. */
static void fill_step(net2 *n, unsigned seed)
{
    const kfac_conv_geom *g = geom();
    naive_rng r;
    naive_rng_seed(&r, seed);
    for (int i = 0; i < 2; i++)
        for (size_t j = 0; j < n->nw[i]; j++) n->gw[i][j] = (float)(2 * naive_rng_sym(&r));
    for (int j = 0; j < g->n; j++) n->gb0[j] = (float)(2 * naive_rng_sym(&r));
    for (int j = 0; j < FC_OUT; j++) n->aux1[j] = (float)(2 * naive_rng_sym(&r));
    size_t nx0 = (size_t)M * g->c * g->h * g->w, nd0 = (size_t)M * g->n * g->h * g->w;
    for (size_t j = 0; j < nx0; j++) n->x0[j] = (float)(1 * naive_rng_sym(&r));
    for (size_t j = 0; j < nd0; j++) n->d0[j] = (float)(1 * naive_rng_sym(&r));
    for (size_t j = 0; j < (size_t)M * FC_IN; j++) n->x1[j] = (float)(1 * naive_rng_sym(&r));
    for (size_t j = 0; j < (size_t)M * FC_OUT; j++) n->d1[j] = (float)(1 * naive_rng_sym(&r));
}

static kfac_opt *opt_make(const kfac_config *cfg, net2 *n)
{
    kfac_opt *o = NULL;
    char err[256];
    assert_int_equal(kfac_opt_create(cfg, 0.9, 2, &o, err, sizeof err), KFAC_OK);
    kfac_opt_layer L;
    memset(&L, 0, sizeof L);
    L.id = 3;
    L.geom = geom();
    L.w = n->w[0]; L.grad_w = n->gw[0]; L.b = n->b0; L.grad_b = n->gb0;
    int slot = -1;
    assert_int_equal(kfac_opt_add_layer(o, &L, &slot), KFAC_OK);
    assert_int_equal(slot, 0);
    memset(&L, 0, sizeof L);
    L.id = 7;
    L.inputs = FC_IN; L.outputs = FC_OUT; L.bias = 0;
    L.w = n->w[1]; L.grad_w = n->gw[1];
    L.aux[0] = n->aux1; L.naux = 1; L.aux_n = FC_OUT;
    assert_int_equal(kfac_opt_add_layer(o, &L, &slot), KFAC_OK);
    assert_int_equal(slot, 1);
    return o;
}

static void feed(kfac_block *b0, kfac_block *b1, const net2 *n)
{
    tu_feed(b0, 0, n->x0, n->d0, M);
    tu_feed(b1, 0, n->x1, n->d1, M);
}

static kfac_opt_step_args args_at(long step)
{
    kfac_opt_step_args a = { step, 0.05, 0.1, 5e-4, M, 0.0 };
    return a;
}

static kfac_config config(kfac_damping_type t, kfac_precision p)
{
    kfac_config c = tu_config(t, p);
    c.damping = 0.01;
    c.cov_ema_decay = 0.5;
    c.cov_update_every = 1;
    c.invert_every = 2;
    c.norm_constraint = 1e-3;
    c.norm_constraint_lr = KFAC_CLIP_LR_BASE;
    c.max_failures = 2;
    return c;
}

/* ------------------------------------------------------------ validation */

static void test_opt_create_checks(void **state)
{
    (void)state;
    kfac_config c;
    kfac_config_default(&c);
    kfac_opt *o = (kfac_opt *)&c;
    char err[256];
    c.damping = 0;
    assert_int_equal(kfac_opt_create(&c, 0.9, 1, &o, err, sizeof err), KFAC_ERR_INVALID_ARG);
    assert_null(o);
    tu_assert_contains(err, "damping");
    kfac_config_default(&c);
    assert_int_equal(kfac_opt_create(&c, 1.5, 1, &o, err, sizeof err), KFAC_ERR_INVALID_ARG);
    tu_assert_contains(err, "momentum 1.5 (from [net]) must be in [0, 1)");
    assert_int_equal(kfac_opt_create(NULL, 0.9, 1, &o, err, sizeof err), KFAC_ERR_NULL);

    /* a full context refuses another layer, and a layer without a buffer */
    assert_int_equal(kfac_opt_create(&c, 0.9, 1, &o, err, sizeof err), KFAC_OK);
    float w[FC_IN * FC_OUT], gw[FC_IN * FC_OUT], b[FC_OUT], gb[FC_OUT];
    kfac_opt_layer L;
    memset(&L, 0, sizeof L);
    L.inputs = FC_IN; L.outputs = FC_OUT; L.bias = 1;
    L.w = w; L.grad_w = gw; L.b = b;
    assert_int_equal(kfac_opt_add_layer(o, &L, NULL), KFAC_ERR_NULL); /* no grad_b */
    L.grad_b = gb;
    assert_int_equal(kfac_opt_add_layer(o, &L, NULL), KFAC_OK);
    assert_int_equal(kfac_opt_add_layer(o, &L, NULL), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_opt_num_layers(o), 1);
    kfac_opt_step_args a = args_at(0);
    kfac_opt_report r;
    a.batch = 0;
    assert_int_equal(kfac_opt_step(o, &a, &r), KFAC_ERR_INVALID_ARG);
    kfac_opt_info info;
    assert_int_equal(kfac_opt_info_get(o, &info), KFAC_OK);
    assert_int_equal(info.steps_run, 0);
    assert_true(info.momentum == 0.9 && info.damping == c.damping);
    kfac_opt_free(o);
}

/* ------------------------------------------------------------ composition */

/* Three steps through the context against the same steps done by hand with
 * the primitives on separate blocks: bit-identical weights and momentum. */
static void test_opt_step_is_composition(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 11);
    net2 a, b;
    net_alloc(&a, &r);
    net_alloc(&b, &r);
    net_copy_params(&b, &a);
    kfac_config c = config(KFAC_DAMPING_FACTORED, KFAC_PRECISION_FLOAT);
    c.step_size = KFAC_STEP_POLICY;
    kfac_opt *o = opt_make(&c, &a);

    kfac_block *hb0 = tu_conv_block(geom(), &c), *hb1 = tu_fc_block(FC_IN, FC_OUT, 0, &c);
    kfac_block *hb[2] = { hb0, hb1 };
    kfac_layer_ref ref[2];
    for (int i = 0; i < 2; i++) {
        tu_block s;
        tu_block_wrap(&s, hb[i], c.damping_type);
        tu_layer_ref_alloc(&ref[i], &s);
        s.b = NULL; /* the block stays ours */
        tu_block_free(&s);
        assert_int_equal(kfac_block_instantiate_factors(hb[i], c.damping), KFAC_OK);
        assert_int_equal(kfac_block_register_inverse(hb[i]), KFAC_OK);
        free(ref[i].w); free(ref[i].grad_w); free(ref[i].b); free(ref[i].grad_b);
        ref[i].w = b.w[i];
        ref[i].grad_w = b.gw[i];
        ref[i].b = i == 0 ? b.b0 : NULL;
        ref[i].grad_b = i == 0 ? b.gb0 : NULL;
    }
    for (long step = 0; step < 3; step++) {
        fill_step(&a, 100 + (unsigned)step);
        fill_step(&b, 100 + (unsigned)step);
        feed(kfac_opt_block(o, 0), kfac_opt_block(o, 1), &a);
        kfac_opt_step_args sa = args_at(step);
        kfac_opt_report rep;
        assert_int_equal(kfac_opt_step(o, &sa, &rep), KFAC_OK);
        assert_false(rep.skipped_step);
        assert_int_equal(rep.step.applied, 2);
        /* by hand: statistics every step until ready (the first), then
         * cov_update_every=1; inverses at step 0 and every 2nd */
        feed(hb0, hb1, &b);
        for (int i = 0; i < 2; i++) {
            assert_int_equal(kfac_block_update_cov(hb[i], c.cov_ema_decay), KFAC_OK);
            if (step % c.invert_every == 0)
                assert_int_equal(kfac_block_update_inverses(hb[i]), KFAC_OK);
        }
        float q = (float)sa.learning_rate / (float)sa.base_learning_rate;
        kfac_step_args ka = { sa.learning_rate, 0.9, sa.decay, M, c.norm_constraint * q * q };
        kfac_step_report kr;
        assert_int_equal(kfac_step(ref, 2, &ka, &kr), KFAC_OK);
        assert_true(kr.nu == rep.step.nu && kr.nu < 1.0); /* the clip binds */
        for (int i = 0; i < 2; i++) {
            float *vw, *vb;
            assert_int_equal(kfac_opt_velocity(o, i, &vw, &vb), KFAC_OK);
            assert_memory_equal(a.w[i], b.w[i], a.nw[i] * sizeof(float));
            assert_memory_equal(vw, ref[i].vel_w, a.nw[i] * sizeof(float));
        }
        assert_memory_equal(a.b0, b.b0, geom()->n * sizeof(float));
    }
    kfac_opt_info info;
    kfac_opt_info_get(o, &info);
    assert_int_equal(info.steps_run, 3);
    assert_int_equal(info.ready, 1);
    assert_int_equal(info.total_failures, 0);
    for (int i = 0; i < 2; i++) {
        ref[i].w = ref[i].grad_w = ref[i].b = ref[i].grad_b = NULL;
        tu_layer_ref_free(&ref[i]);
        kfac_block_free(hb[i]);
    }
    kfac_opt_free(o);
    net_free(&a);
    net_free(&b);
}

/* ------------------------------------------------------------ failures */

static void test_opt_skips_whole_step(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 12);
    net2 a;
    net_alloc(&a, &r);
    kfac_config c = config(KFAC_DAMPING_FACTORED, KFAC_PRECISION_DOUBLE);
    kfac_opt *o = opt_make(&c, &a);
    fill_step(&a, 1);
    feed(kfac_opt_block(o, 0), kfac_opt_block(o, 1), &a);
    kfac_opt_step_args sa = args_at(0);
    kfac_opt_report rep;
    assert_int_equal(kfac_opt_step(o, &sa, &rep), KFAC_OK);
    assert_false(rep.failed);

    /* a NaN in the connected layer's aux gradient (batch-norm shift) stops
     * the conv layer too; every gradient is dropped */
    size_t n0 = a.nw[0], n1 = a.nw[1];
    float *w0 = malloc(n0 * sizeof(float)), *w1 = malloc(n1 * sizeof(float));
    for (int rep_i = 0; rep_i < 2; rep_i++) {
        fill_step(&a, 2 + rep_i);
        feed(kfac_opt_block(o, 0), kfac_opt_block(o, 1), &a);
        a.aux1[1] = NAN;
        memcpy(w0, a.w[0], n0 * sizeof(float));
        memcpy(w1, a.w[1], n1 * sizeof(float));
        sa = args_at(1 + rep_i);
        assert_int_equal(kfac_opt_step(o, &sa, &rep), KFAC_OK);
        assert_true(rep.skipped_step && rep.failed);
        assert_int_equal(rep.bad_grad_slot, 1);
        assert_int_equal(rep.first_bad_id, 7);
        assert_memory_equal(w0, a.w[0], n0 * sizeof(float));
        assert_memory_equal(w1, a.w[1], n1 * sizeof(float));
        for (size_t j = 0; j < n0; j++) assert_true(a.gw[0][j] == 0.0f);
        for (int j = 0; j < FC_OUT; j++) assert_true(a.aux1[j] == 0.0f);
        assert_int_equal(kfac_opt_layer_failures(o, 1), rep_i + 1);
        assert_int_equal(kfac_opt_layer_failures(o, 0), 0);
        /* max_failures = 2 */
        assert_int_equal(rep.stop, rep_i == 1);
    }
    kfac_opt_info info;
    kfac_opt_info_get(o, &info);
    assert_int_equal(info.consecutive_failures, 2);
    assert_int_equal(info.total_failures, 2);

    /* a good step resets the run of failures */
    fill_step(&a, 9);
    feed(kfac_opt_block(o, 0), kfac_opt_block(o, 1), &a);
    sa = args_at(3);
    assert_int_equal(kfac_opt_step(o, &sa, &rep), KFAC_OK);
    assert_false(rep.failed);
    kfac_opt_info_get(o, &info);
    assert_int_equal(info.consecutive_failures, 0);
    assert_int_equal(info.total_failures, 2);
    free(w0);
    free(w1);
    kfac_opt_free(o);
    net_free(&a);
}

/* ------------------------------------------------------------ hook */

typedef struct {
    int calls, fail_id;
    int dims[2][4];
    long examples[2];
} hook_log;

/* Doubles every sum and the example count: the factors must not change
 * (powers of two scale exactly). */
static kfac_status doubling_hook(void *ctx, int id, float *const *sums, const int *dim,
                                 const int *count, int nsums, long *examples)
{
    hook_log *h = ctx;
    int k = id == 3 ? 0 : 1;
    h->calls++;
    h->examples[k] = *examples;
    assert_int_equal(nsums, 2);
    for (int i = 0; i < nsums; i++) {
        h->dims[k][2 * i] = dim[i];
        h->dims[k][2 * i + 1] = count[i];
        for (size_t j = 0; j < (size_t)count[i] * dim[i] * dim[i]; j++) sums[i][j] *= 2.0f;
    }
    *examples *= 2;
    return id == h->fail_id ? KFAC_ERR_IO : KFAC_OK;
}

static void test_opt_stats_hook(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 13);
    net2 a, b;
    net_alloc(&a, &r);
    net_alloc(&b, &r);
    net_copy_params(&b, &a);
    kfac_config c = config(KFAC_DAMPING_EXACT, KFAC_PRECISION_DOUBLE);
    kfac_opt *o = opt_make(&c, &a), *p = opt_make(&c, &b);
    hook_log h = { 0, -1, {{0}}, {0} };
    kfac_opt_set_stats_hook(o, doubling_hook, &h);
    fill_step(&a, 5);
    fill_step(&b, 5);
    feed(kfac_opt_block(o, 0), kfac_opt_block(o, 1), &a);
    feed(kfac_opt_block(p, 0), kfac_opt_block(p, 1), &b);
    kfac_opt_step_args sa = args_at(0);
    kfac_opt_report rep;
    assert_int_equal(kfac_opt_step(o, &sa, &rep), KFAC_OK);
    assert_int_equal(kfac_opt_step(p, &sa, &rep), KFAC_OK);
    assert_int_equal(h.calls, 2);
    const kfac_conv_geom *g = geom();
    int kb0 = (g->c / g->groups) * g->size * g->size + 1;
    assert_int_equal(h.dims[0][0], kb0);
    assert_int_equal(h.dims[0][1], 2);
    assert_int_equal(h.dims[0][2], g->n / g->groups);
    assert_int_equal(h.dims[1][0], FC_IN);
    assert_int_equal(h.dims[1][2], FC_OUT);
    assert_int_equal(h.examples[0], M);
    assert_int_equal(h.examples[1], M);
    for (int k = 0; k < 2; k++) {
        kfac_block_info info;
        kfac_block_info_get(kfac_opt_block(o, k), &info);
        size_t na = (size_t)info.kb * info.kb, ng = (size_t)info.n_g * info.n_g;
        double *A1 = malloc(na * 8), *G1 = malloc(ng * 8), *A2 = malloc(na * 8), *G2 = malloc(ng * 8);
        for (int j = 0; j < info.groups; j++) {
            kfac_block_get_factors(kfac_opt_block(o, k), j, A1, G1);
            kfac_block_get_factors(kfac_opt_block(p, k), j, A2, G2);
            assert_memory_equal(A1, A2, na * 8);
            assert_memory_equal(G1, G2, ng * 8);
        }
        free(A1); free(G1); free(A2); free(G2);
        assert_memory_equal(a.w[k], b.w[k], a.nw[k] * sizeof(float));
    }
    /* a hook that fails rejects that layer's statistics and the step */
    h.fail_id = 7;
    fill_step(&a, 6);
    feed(kfac_opt_block(o, 0), kfac_opt_block(o, 1), &a);
    sa = args_at(1);
    assert_int_equal(kfac_opt_step(o, &sa, &rep), KFAC_OK);
    assert_int_equal(rep.cov_failed, 1);
    assert_int_equal(rep.cov_status[1], KFAC_ERR_IO);
    assert_true(rep.skipped_step);
    kfac_opt_free(o);
    kfac_opt_free(p);
    net_free(&a);
    net_free(&b);
}

/* ------------------------------------------------------------ automatic step */

/* One connected layer (4 -> 3, bias) whose statistics make a well-scaled
 * block; its weights, gradients and the opt's layer slot. */
typedef struct {
    float w[12], b[3], gw[12], gb[3];
    float x[M * 4], d[M * 3];
} fc1;

static kfac_opt *fc1_make(kfac_config *c, fc1 *f, naive_rng *r)
{
    for (int i = 0; i < 12; i++) f->w[i] = (float)(0.5 * naive_rng_sym(r));
    for (int i = 0; i < 3; i++) f->b[i] = (float)(0.1 * naive_rng_sym(r));
    kfac_opt *o = NULL;
    assert_int_equal(kfac_opt_create(c, 0.9, 1, &o, NULL, 0), KFAC_OK);
    kfac_opt_layer L;
    memset(&L, 0, sizeof L);
    L.id = 0;
    L.inputs = 4; L.outputs = 3; L.bias = 1;
    L.w = f->w; L.b = f->b; L.grad_w = f->gw; L.grad_b = f->gb;
    assert_int_equal(kfac_opt_add_layer(o, &L, NULL), KFAC_OK);
    return o;
}

static void fc1_fill(fc1 *f, naive_rng *r, kfac_opt *o)
{
    for (int i = 0; i < 12; i++) f->gw[i] = (float)(M * naive_rng_sym(r));
    for (int i = 0; i < 3; i++) f->gb[i] = (float)(M * naive_rng_sym(r));
    for (int i = 0; i < M * 4; i++) f->x[i] = (float)naive_rng_sym(r);
    for (int i = 0; i < M * 3; i++) f->d[i] = (float)naive_rng_sym(r);
    tu_feed(kfac_opt_block(o, 0), 0, f->x, f->d, M);
}

/* Hand-worked Levenberg-Marquardt sequence (omega 0.5, bounds [1e-3, 0.1],
 * from 0.01): rho > 3/4 halves, rho < 1/4 or not finite doubles, between
 * keeps; the blocks see each new value. */
static void test_damping_rule(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 21);
    fc1 f;
    kfac_config c;
    kfac_config_default(&c);
    c.damping = 0.01;
    c.damping_omega = 0.5;
    c.min_damping = 1e-3;
    c.max_damping = 0.1;
    c.damping_adapt_every = 1;
    c.norm_constraint = 0;
    c.curvature = KFAC_CURVATURE_KFAC;
    kfac_opt *o = fc1_make(&c, &f, &r);
    const double rho[] = {0.9, 0.5, 0.1, -1.0, NAN, INFINITY, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8,
                          0.8, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.76, 0.74, 0.26, 0.24};
    const double want[] = {5e-3, 5e-3, 1e-2, 2e-2, 4e-2, 8e-2, 4e-2, 2e-2, 1e-2, 5e-3,
                           2.5e-3, 1.25e-3, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2,
                           0.1, 0.1, 0.05, 0.05, 0.05, 0.1};
    kfac_opt_report rep;
    double got;
    assert_int_equal(kfac_opt_adapt_damping(o, 1, 1, &got), KFAC_ERR_STATE);
    for (int i = 0; i < (int)(sizeof rho / sizeof *rho); i++) {
        fc1_fill(&f, &r, o);
        kfac_opt_step_args a = { i, 0.1, 0.1, 0.0, M, 0.0 };
        assert_int_equal(kfac_opt_step(o, &a, &rep), KFAC_OK);
        assert_true(rep.adapt_due && rep.predicted < 0);
        /* the loss after the step that gives this rho (no decay: wd = 0) */
        double before = 2.0, after = before + rho[i] * rep.predicted;
        if (isinf(rho[i])) after = INFINITY;
        assert_int_equal(kfac_opt_adapt_damping(o, before, after, &got), KFAC_OK);
        kfac_opt_info info;
        kfac_opt_info_get(o, &info);
        if (!(fabs(info.damping - want[i]) <= 1e-12 * want[i])) {
            print_error("rho %g: damping %.17g, want %.17g\n", rho[i], info.damping, want[i]);
            fail();
        }
        double lA, lG;
        assert_int_equal(kfac_block_factored_damping(kfac_opt_block(o, 0), 0, &lA, &lG, NULL), KFAC_OK);
        assert_true(fabs(lA * lG - want[i]) <= 1e-12 * want[i]); /* T = 1 */
        assert_int_equal(kfac_opt_adapt_damping(o, 1, 1, &got), KFAC_ERR_STATE);
    }
    kfac_opt_free(o);
}

/* The automatic step's safety bound: the model's predicted decrease stays
 * at most the loss the caller reports, by scaling the model's step t u*
 * with -M(t) = P (t - t^2/2); a loss the bound does not reach leaves the
 * step at the model's optimum (t = 1, -M = P/2). */
static void test_auto_step_loss_bound(void **state)
{
    (void)state;
    for (int bound = 0; bound < 2; bound++) {
        naive_rng r;
        naive_rng_seed(&r, 23);
        fc1 f;
        kfac_config c;
        kfac_config_default(&c);
        c.damping_adapt_every = 0;
        c.curvature = KFAC_CURVATURE_KFAC;
        kfac_opt *o = fc1_make(&c, &f, &r);
        fc1_fill(&f, &r, o);
        kfac_opt_step_args a = { 0, 0.1, 0.1, 0.0, M, bound ? 1e-4 : 1e6 };
        kfac_opt_report rep;
        assert_int_equal(kfac_opt_step(o, &a, &rep), KFAC_OK);
        /* first step, 1-d: unbounded, alpha = g'D / D'CD and the model
         * predicts -alpha g'D / 2 */
        if (bound) {
            assert_true(fabs(rep.predicted + 1e-4) <= 1e-9);
            assert_true(rep.step.nu < 1.0);
        } else {
            assert_true(rep.step.nu == 1.0);
            assert_true(fabs(rep.predicted + 0.5 * rep.alpha * rep.step.gdotdelta) <=
                        1e-12 * fabs(rep.predicted));
        }
        kfac_opt_free(o);
    }
}

/* A linear "network" for the exact-curvature callbacks: outputs z = Mx theta
 * (theta = [W | b] of the layer, row-major), metric a' H b with H SPD. The
 * library's forward difference of a linear map is exact up to float
 * rounding, so its 2x2 model must match the dense one built from Mx' H Mx. */
#define NZ 5
typedef struct {
    fc1 *f;
    double Mx[NZ * 15], H[NZ * NZ];
    int runs;
} lin_model;

static kfac_status lin_outputs(void *ctx, int run, float *out)
{
    lin_model *m = ctx;
    m->runs += run;
    for (int o = 0; o < NZ; o++) {
        double z = 0;
        for (int q = 0; q < 3; q++) {
            for (int k = 0; k < 4; k++) z += m->Mx[o * 15 + q * 5 + k] * m->f->w[q * 4 + k];
            z += m->Mx[o * 15 + q * 5 + 4] * m->f->b[q];
        }
        out[o] = (float)z;
    }
    return KFAC_OK;
}

static double lin_metric(void *ctx, const float *a, const float *b)
{
    lin_model *m = ctx;
    double s = 0;
    for (int i = 0; i < NZ; i++)
        for (int j = 0; j < NZ; j++) s += a[i] * m->H[i * NZ + j] * b[j];
    return s;
}

static void test_auto_step_exact_linear(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 22);
    fc1 f;
    kfac_config c;
    kfac_config_default(&c);
    c.damping = 0.05;
    c.invert_every = 1;
    c.damping_adapt_every = 0;
    c.norm_constraint = 0;
    kfac_opt *o = fc1_make(&c, &f, &r);
    lin_model m;
    memset(&m, 0, sizeof m);
    m.f = &f;
    for (int i = 0; i < NZ * 15; i++) m.Mx[i] = naive_rng_sym(&r);
    double L[NZ * NZ];
    for (int i = 0; i < NZ * NZ; i++) L[i] = naive_rng_sym(&r);
    for (int i = 0; i < NZ; i++)
        for (int j = 0; j < NZ; j++) {
            double h = i == j ? 0.5 : 0.0;
            for (int k = 0; k < NZ; k++) h += L[i * NZ + k] * L[j * NZ + k] / NZ;
            m.H[i * NZ + j] = h;
        }
    kfac_curvature cv = { lin_outputs, lin_metric, &m, NZ };
    assert_int_equal(kfac_opt_set_curvature(o, &cv), KFAC_OK);
    const double wd = 1e-3;
    double u0[15] = {0};
    for (int step = 0; step < 3; step++) {
        fc1_fill(&f, &r, o);
        float w0[12], b0[3], gw[12], gb[3];
        memcpy(w0, f.w, sizeof w0); memcpy(b0, f.b, sizeof b0);
        memcpy(gw, f.gw, sizeof gw); memcpy(gb, f.gb, sizeof gb);
        kfac_opt_step_args a = { step, 0.1, 0.1, wd, M, 0.0 };
        kfac_opt_report rep;
        int runs = m.runs;
        assert_int_equal(kfac_opt_step(o, &a, &rep), KFAC_OK);
        assert_int_equal(m.runs - runs, step == 0 ? 1 : 2); /* one pass per direction */
        /* reference: g, Delta = the block's inverse (tested against dense
         * solves elsewhere) on g, the dense model */
        float g_w[12], g_b[3], D_w[12], D_b[3];
        for (int i = 0; i < 12; i++) g_w[i] = (float)(-(double)gw[i] / M + wd * w0[i]);
        for (int i = 0; i < 3; i++) g_b[i] = (float)(-(double)gb[i] / M);
        assert_int_equal(kfac_block_multiply_inverse(kfac_opt_block(o, 0), g_w, g_b, D_w, D_b), KFAC_OK);
        double g[15], D[15], JD[NZ] = {0}, JU[NZ] = {0};
        for (int q = 0; q < 3; q++) {
            for (int k = 0; k < 4; k++) { g[q * 5 + k] = g_w[q * 4 + k]; D[q * 5 + k] = D_w[q * 4 + k]; }
            g[q * 5 + 4] = g_b[q];
            D[q * 5 + 4] = D_b[q];
        }
        for (int o2 = 0; o2 < NZ; o2++)
            for (int p = 0; p < 15; p++) { JD[o2] += m.Mx[o2 * 15 + p] * D[p]; JU[o2] += m.Mx[o2 * 15 + p] * u0[p]; }
        double mm[3] = {0}, r1 = 0, r2 = 0;
        for (int i = 0; i < NZ; i++)
            for (int j = 0; j < NZ; j++) {
                mm[0] += JD[i] * m.H[i * NZ + j] * JD[j];
                mm[1] += JD[i] * m.H[i * NZ + j] * JU[j];
                mm[2] += JU[i] * m.H[i * NZ + j] * JU[j];
            }
        for (int p = 0; p < 15; p++) {
            double dec = p % 5 < 4 ? wd : 0.0;
            mm[0] += (c.damping + dec) * D[p] * D[p];
            mm[1] += (c.damping + dec) * D[p] * u0[p];
            mm[2] += (c.damping + dec) * u0[p] * u0[p];
            r1 += g[p] * D[p];
            r2 += g[p] * u0[p];
        }
        double al = r1 / mm[0], mu = 0;
        if (step > 0) {
            double det = mm[0] * mm[2] - mm[1] * mm[1];
            al = (r1 * mm[2] - r2 * mm[1]) / det;
            mu = (mm[0] * r2 - mm[1] * r1) / det;
        }
        /* float outputs of a linear map: the difference quotient carries
         * ~1e-7 |z| / (1e-3 |theta| |Delta| / |Delta|) ~ 1e-4 relative */
        if (!(fabs(rep.alpha - al) <= 1e-3 * fabs(al)) || !(fabs(rep.momentum - mu) <= 1e-3 * fabs(al))) {
            print_error("step %d: alpha %.8g momentum %.8g, dense %.8g %.8g\n", step, rep.alpha,
                        rep.momentum, al, mu);
            fail();
        }
        assert_true(fabs(rep.predicted + 0.5 * (al * r1 + mu * r2)) <= 1e-3 * fabs(al * r1));
        for (int q = 0; q < 3; q++) {
            for (int k = 0; k < 4; k++) {
                double u = (double)w0[q * 4 + k] - f.w[q * 4 + k];
                double want = rep.alpha * D[q * 5 + k] + rep.momentum * u0[q * 5 + k];
                assert_true(fabs(u - want) <= 1e-5 * (fabs(want) + fabs(w0[q * 4 + k])));
                u0[q * 5 + k] = u;
            }
            double u = (double)b0[q] - f.b[q];
            u0[q * 5 + 4] = u;
        }
    }
    kfac_opt_free(o);
}

/* ------------------------------------------------------------ state */

/* K steps on A, its state saved; B built alike from A's weights loads it;
 * then both run the same steps and must agree bit for bit. */
static void roundtrip(kfac_damping_type t, kfac_precision prec, const double *matpower)
{
    naive_rng r;
    naive_rng_seed(&r, 14);
    net2 a, b;
    net_alloc(&a, &r);
    net_alloc(&b, &r);
    kfac_config c = config(t, prec);
    c.cov_update_every = 2;
    kfac_opt *o = opt_make(&c, &a), *p = opt_make(&c, &b);
    if (matpower)
        for (int k = 0; k < 2; k++) {
            assert_int_equal(kfac_block_register_matpower(kfac_opt_block(o, k), *matpower), KFAC_OK);
            assert_int_equal(kfac_block_register_matpower(kfac_opt_block(p, k), *matpower), KFAC_OK);
        }
    kfac_opt_set_seed(o, 0x0123456789abcdefull);
    kfac_opt_report rep;
    for (long s = 0; s < 3; s++) {
        fill_step(&a, 200 + (unsigned)s);
        if (kfac_opt_is_stats_step(o, s)) feed(kfac_opt_block(o, 0), kfac_opt_block(o, 1), &a);
        kfac_opt_step_args sa = args_at(s);
        assert_int_equal(kfac_opt_step(o, &sa, &rep), KFAC_OK);
    }
    int n = kfac_opt_state(o, NULL, NULL, 0);
    assert_true(n > 2);
    assert_int_equal(kfac_opt_state(p, NULL, NULL, 0), n);
    kfac_ckpt_entry *e = calloc((size_t)n, sizeof *e);
    char (*names)[KFAC_STATE_NAME] = calloc((size_t)n, sizeof *names);
    assert_int_equal(kfac_opt_state(o, e, names, n - 1), -1);
    assert_int_equal(kfac_opt_state(o, e, names, n), n);
    const char *path = tu_tmp_path("opt.kfac");
    char err[512];
    assert_int_equal(kfac_ckpt_save(path, "fp", e, n, err, sizeof err), KFAC_OK);
    assert_int_equal(kfac_opt_state(p, e, names, n), n);
    assert_int_equal(kfac_ckpt_load(path, "fp", e, n, err, sizeof err), KFAC_OK);
    assert_int_equal(kfac_opt_state_loaded(p), KFAC_OK);
    net_copy_params(&b, &a);
    kfac_opt_info ia, ib;
    kfac_opt_info_get(o, &ia);
    kfac_opt_info_get(p, &ib);
    assert_true(ia.steps_run == ib.steps_run && ia.seed == ib.seed && ib.ready == 1);
    if (matpower) {
        /* the restored eigendecomposition serves the power as the saved one */
        float *v = calloc(a.nw[1], sizeof(float)), *o1 = calloc(a.nw[1], sizeof(float));
        float *o2 = calloc(a.nw[1], sizeof(float));
        for (size_t j = 0; j < a.nw[1]; j++) v[j] = (float)(1 * naive_rng_sym(&r));
        assert_int_equal(kfac_block_multiply_matpower(kfac_opt_block(o, 1), *matpower, v, NULL, o1, NULL), KFAC_OK);
        assert_int_equal(kfac_block_multiply_matpower(kfac_opt_block(p, 1), *matpower, v, NULL, o2, NULL), KFAC_OK);
        assert_memory_equal(o1, o2, a.nw[1] * sizeof(float));
        free(v); free(o1); free(o2);
    }
    float *va, *vb;
    for (long s = 3; s < 6; s++) {
        fill_step(&a, 300 + (unsigned)s);
        fill_step(&b, 300 + (unsigned)s);
        assert_int_equal(kfac_opt_is_stats_step(o, s), kfac_opt_is_stats_step(p, s));
        if (kfac_opt_is_stats_step(o, s)) {
            feed(kfac_opt_block(o, 0), kfac_opt_block(o, 1), &a);
            feed(kfac_opt_block(p, 0), kfac_opt_block(p, 1), &b);
        }
        kfac_opt_step_args sa = args_at(s);
        assert_int_equal(kfac_opt_step(o, &sa, &rep), KFAC_OK);
        assert_int_equal(kfac_opt_step(p, &sa, &rep), KFAC_OK);
        for (int k = 0; k < 2; k++) {
            assert_memory_equal(a.w[k], b.w[k], a.nw[k] * sizeof(float));
            kfac_opt_velocity(o, k, &va, NULL);
            kfac_opt_velocity(p, k, &vb, NULL);
            assert_memory_equal(va, vb, a.nw[k] * sizeof(float));
        }
        assert_memory_equal(a.b0, b.b0, geom()->n * sizeof(float));
    }
    free(e);
    free(names);
    kfac_opt_free(o);
    kfac_opt_free(p);
    net_free(&a);
    net_free(&b);
}

static void test_state_factored_float(void **state) { (void)state; roundtrip(KFAC_DAMPING_FACTORED, KFAC_PRECISION_FLOAT, NULL); }
static void test_state_factored_double(void **state) { (void)state; roundtrip(KFAC_DAMPING_FACTORED, KFAC_PRECISION_DOUBLE, NULL); }
static void test_state_exact(void **state) { (void)state; roundtrip(KFAC_DAMPING_EXACT, KFAC_PRECISION_FLOAT, NULL); }
static void test_state_matpower(void **state)
{
    (void)state;
    const double e = -0.5;
    roundtrip(KFAC_DAMPING_FACTORED, KFAC_PRECISION_FLOAT, &e);
}

/* A state of one precision does not load into a context of the other: the
 * entry names differ, and the container says which. */
static void test_state_other_precision_refused(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 15);
    net2 a;
    net_alloc(&a, &r);
    kfac_config c1 = config(KFAC_DAMPING_FACTORED, KFAC_PRECISION_FLOAT);
    kfac_config c2 = config(KFAC_DAMPING_FACTORED, KFAC_PRECISION_DOUBLE);
    kfac_opt *o = opt_make(&c1, &a), *p = opt_make(&c2, &a);
    int n = kfac_opt_state(o, NULL, NULL, 0);
    kfac_ckpt_entry *e = calloc((size_t)n, sizeof *e);
    char (*names)[KFAC_STATE_NAME] = calloc((size_t)n, sizeof *names);
    kfac_opt_state(o, e, names, n);
    const char *path = tu_tmp_path("opt.kfac");
    char err[512];
    assert_int_equal(kfac_ckpt_save(path, "fp", e, n, err, sizeof err), KFAC_OK);
    assert_int_equal(kfac_opt_state(p, NULL, NULL, 0), n);
    kfac_opt_state(p, e, names, n);
    assert_int_equal(kfac_ckpt_load(path, "fp", e, n, err, sizeof err), KFAC_ERR_FORMAT);
    tu_assert_contains(err, "A_inverse");
    free(e);
    free(names);
    kfac_opt_free(o);
    kfac_opt_free(p);
    net_free(&a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_opt_create_checks),
        cmocka_unit_test(test_opt_step_is_composition),
        cmocka_unit_test(test_opt_skips_whole_step),
        cmocka_unit_test(test_opt_stats_hook),
        cmocka_unit_test(test_damping_rule),
        cmocka_unit_test(test_auto_step_loss_bound),
        cmocka_unit_test(test_auto_step_exact_linear),
        cmocka_unit_test_setup_teardown(test_state_factored_float, tu_tmpdir_setup, tu_tmpdir_teardown),
        cmocka_unit_test_setup_teardown(test_state_factored_double, tu_tmpdir_setup, tu_tmpdir_teardown),
        cmocka_unit_test_setup_teardown(test_state_exact, tu_tmpdir_setup, tu_tmpdir_teardown),
        cmocka_unit_test_setup_teardown(test_state_matpower, tu_tmpdir_setup, tu_tmpdir_teardown),
        cmocka_unit_test_setup_teardown(test_state_other_precision_refused, tu_tmpdir_setup, tu_tmpdir_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
