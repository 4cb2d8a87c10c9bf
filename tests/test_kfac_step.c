/*
 * The K-FAC optimizer step (kfac_step, sem. 5) checked by hand: weight decay
 * on weights only, Delta = (damped block)^-1 g solved densely, the
 * norm-constraint (KL clipping) coefficient nu over all applied layers,
 * momentum over two consecutive steps, gradients zeroed; vector V5; and the
 * failure paths: a non-finite gradient, a block without an inverse (its first
 * statistics were not finite) or a non-finite Delta leave that layer's
 * weights, bias and velocity untouched, are reported, and the other layers
 * still step with nu computed from them alone. Bad arguments change nothing.
 */
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "kfac.h"
#include "kfac_naive.h"
#include "kfac_testutil.h"
#include "kfac_tol.h"

/* One layer: the block with its factors, the library's float arrays and the
 * reference's double copies in parameter-vector order. */
typedef struct {
    tu_block blk;
    kfac_layer_ref ref; /* ref.block == blk.b */
    double lam;
    double *D; /* dense damped block, after layer_factors */
    double *W, *V, *grad;
    unsigned char *mask;
} layer;

static void layer_init(layer *L, tu_block blk)
{
    memset(L, 0, sizeof *L);
    L->blk = blk;
    tu_layer_ref_alloc(&L->ref, &L->blk);
    int np = L->blk.np;
    L->W = naive_alloc(np, sizeof(double));
    L->V = naive_alloc(np, sizeof(double));
    L->grad = naive_alloc(np, sizeof(double));
    L->mask = naive_alloc(np, 1);
    naive_bias_mask(blk.groups, blk.n_g, blk.k, blk.bias, L->mask);
}

static void layer_conv(layer *L, int c, int h, int w, int n, int size, int groups, int bias,
                       kfac_damping_type type)
{
    kfac_conv_geom g = tu_geom(c, h, w, n, size, 1, size / 2, 1, groups, bias,
                               KFAC_PATCHES_GENERAL);
    kfac_config cfg = tu_config(type, KFAC_PRECISION_FLOAT);
    tu_block blk;
    tu_block_conv(&blk, &g, &cfg);
    layer_init(L, blk);
}

static void layer_fc(layer *L, int in, int out, int bias, kfac_damping_type type)
{
    kfac_config cfg = tu_config(type, KFAC_PRECISION_FLOAT);
    tu_block blk;
    tu_block_fc(&blk, in, out, bias, &cfg);
    layer_init(L, blk);
}

static void layer_free(layer *L)
{
    tu_layer_ref_free(&L->ref);
    tu_block_free(&L->blk);
    free(L->D);
    free(L->W); free(L->V); free(L->grad); free(L->mask);
}

/* Random SPD factors, damping lam, inverse computed; D = dense damped block. */
static void layer_factors(layer *L, naive_rng *r, double lam)
{
    tu_block_random_factors(&L->blk, r, 2.0, 0.0, 0.2, 0.0);
    L->lam = lam;
    tu_block_invert(&L->blk, lam);
    free(L->D);
    L->D = tu_block_dense_damped(&L->blk, lam);
}

/* Random weights (velocity zero) and mirrors for the reference. */
static void layer_weights(layer *L, naive_rng *r)
{
    tu_block_fill_params(&L->blk, r, 0.5, L->ref.w, L->ref.b, L->W);
    memset(L->ref.vel_w, 0, sizeof(float) * L->blk.nw);
    if (L->blk.bias)
        memset(L->ref.vel_b, 0, sizeof(float) * L->blk.nbias);
    memset(L->V, 0, sizeof(double) * L->blk.np);
}

/* New batch-summed gradients (Darknet's weight_updates sign: minus it). */
static void layer_grads(layer *L, naive_rng *r, double scale)
{
    tu_block_fill_params(&L->blk, r, scale, L->ref.grad_w, L->ref.grad_b, L->grad);
}

/* A connected 4 -> 3 layer with bias (factored damping) ready to step:
 * factors with lam 0.05, weights, gradients of the given scale. */
static void layer_fc_ready(layer *L, naive_rng *r, uint64_t seed, double grad_scale)
{
    naive_rng_seed(r, seed);
    layer_fc(L, 4, 3, 1, KFAC_DAMPING_FACTORED);
    layer_factors(L, r, 0.05);
    layer_weights(L, r);
    layer_grads(L, r, grad_scale);
}

static naive_step_layer naive_layer(layer *L)
{
    naive_step_layer n = {L->blk.np, L->D, L->mask, L->W, L->V, L->grad};
    return n;
}

/* Library weights/velocity vs the reference; gradients zeroed. */
static void check_layer(layer *L, const char *what)
{
    int np = L->blk.np;
    double *flat = naive_alloc(np, sizeof(double));
    char name[128];
    tu_block_pack(&L->blk, L->ref.w, L->ref.b, flat);
    snprintf(name, sizeof name, "%s: weights+bias", what);
    assert_close_arrays(flat, L->W, np, TOL_STEP * kfac_tol_max_abs(L->W, np), TOL_STEP, name);
    tu_block_pack(&L->blk, L->ref.vel_w, L->ref.vel_b, flat);
    snprintf(name, sizeof name, "%s: velocity", what);
    assert_close_arrays(flat, L->V, np, TOL_STEP * kfac_tol_max_abs(L->V, np), TOL_STEP, name);
    for (size_t i = 0; i < L->blk.nw; i++)
        assert_true(L->ref.grad_w[i] == 0.0f);
    for (size_t i = 0; i < L->blk.nbias; i++)
        assert_true(L->ref.grad_b[i] == 0.0f);
    free(flat);
}

/* sum <g, Delta> of the reference without changing anything. */
static double reference_gdd(layer *Ls, int n, double wd, int batch)
{
    naive_step_layer *nl = naive_alloc(n, sizeof *nl);
    double **Wc = naive_alloc(n, sizeof(double *)), **Vc = naive_alloc(n, sizeof(double *));
    for (int i = 0; i < n; i++) {
        nl[i] = naive_layer(&Ls[i]);
        Wc[i] = naive_alloc(Ls[i].blk.np, sizeof(double));
        Vc[i] = naive_alloc(Ls[i].blk.np, sizeof(double));
        memcpy(Wc[i], Ls[i].W, sizeof(double) * Ls[i].blk.np);
        memcpy(Vc[i], Ls[i].V, sizeof(double) * Ls[i].blk.np);
        nl[i].W = Wc[i];
        nl[i].V = Vc[i];
    }
    double gdd;
    naive_kfac_step(nl, n, 0.1, 0.0, wd, batch, 0.0, NULL, &gdd);
    for (int i = 0; i < n; i++) {
        free(Wc[i]);
        free(Vc[i]);
    }
    free(Wc); free(Vc); free(nl);
    return gdd;
}

/* Snapshot of a layer's float state for "untouched" checks. */
typedef struct { float *w, *b, *vw, *vb; } snap;
static snap take_snap(const layer *L)
{
    size_t nw = L->blk.nw, nbias1 = L->blk.nbias + 1;
    snap s = {naive_alloc(nw, sizeof(float)), naive_alloc(nbias1, sizeof(float)),
              naive_alloc(nw, sizeof(float)), naive_alloc(nbias1, sizeof(float))};
    memcpy(s.w, L->ref.w, sizeof(float) * L->blk.nw);
    memcpy(s.vw, L->ref.vel_w, sizeof(float) * L->blk.nw);
    if (L->blk.bias) {
        memcpy(s.b, L->ref.b, sizeof(float) * L->blk.nbias);
        memcpy(s.vb, L->ref.vel_b, sizeof(float) * L->blk.nbias);
    }
    return s;
}
static void check_untouched(const layer *L, snap s)
{
    assert_memory_equal(L->ref.w, s.w, sizeof(float) * L->blk.nw);
    assert_memory_equal(L->ref.vel_w, s.vw, sizeof(float) * L->blk.nw);
    if (L->blk.bias) {
        assert_memory_equal(L->ref.b, s.b, sizeof(float) * L->blk.nbias);
        assert_memory_equal(L->ref.vel_b, s.vb, sizeof(float) * L->blk.nbias);
    }
    free(s.w); free(s.b); free(s.vw); free(s.vb);
}

/* Two layers (grouped conv with bias, connected without), two consecutive
 * steps: clipping active on the first, momentum carrying the first into the
 * second, weight decay on weights only. */
static void test_step_clipping_and_momentum(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 3001);
    layer Ls[2];
    layer_conv(&Ls[0], 4, 4, 4, 4, 3, 2, 1, KFAC_DAMPING_FACTORED);
    layer_fc(&Ls[1], 5, 3, 0, KFAC_DAMPING_FACTORED);
    layer_factors(&Ls[0], &r, 0.05);
    layer_factors(&Ls[1], &r, 0.02);
    for (int i = 0; i < 2; i++)
        layer_weights(&Ls[i], &r);
    const double eta = 0.1, mu = 0.9, wd = 0.01;
    const int batch = 8;
    double C = 0.0;
    for (int step = 0; step < 2; step++) {
        for (int i = 0; i < 2; i++)
            layer_grads(&Ls[i], &r, 4.0);
        double gdd0 = reference_gdd(Ls, 2, wd, batch);
        if (step == 0)
            C = 0.3 * eta * eta * gdd0; /* nu = sqrt(0.3) on the first step */
        naive_step_layer nl[2] = {naive_layer(&Ls[0]), naive_layer(&Ls[1])};
        double nu, gdd;
        naive_kfac_step(nl, 2, eta, mu, wd, batch, C, &nu, &gdd);
        if (step == 0)
            assert_close_scalar(nu, sqrt(0.3), 1e-12, 0, "reference nu");

        kfac_layer_ref refs[2] = {Ls[0].ref, Ls[1].ref};
        kfac_step_args args = {eta, mu, wd, batch, C};
        kfac_step_report rep;
        memset(&rep, 0x55, sizeof rep);
        assert_int_equal(kfac_step(refs, 2, &args, &rep), KFAC_OK);
        char what[64];
        snprintf(what, sizeof what, "step %d nu", step);
        assert_close_scalar(rep.nu, nu, 0, TOL_SCALAR, what);
        snprintf(what, sizeof what, "step %d <g,Delta>", step);
        assert_close_scalar(rep.gdotdelta, gdd, 0, TOL_SCALAR, what);
        assert_int_equal(rep.applied, 2);
        assert_int_equal(rep.skipped, 0);
        assert_int_equal(rep.first_skipped, -1);
        snprintf(what, sizeof what, "step %d conv", step);
        check_layer(&Ls[0], what);
        snprintf(what, sizeof what, "step %d fc", step);
        check_layer(&Ls[1], what);
    }
    layer_free(&Ls[0]);
    layer_free(&Ls[1]);
}

/* Without a norm constraint (C = 0) nu is 1; exact damping; no momentum. */
static void test_step_unclipped_exact(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 3002);
    layer Ls[2];
    layer_fc(&Ls[0], 6, 4, 1, KFAC_DAMPING_EXACT);
    layer_conv(&Ls[1], 2, 3, 3, 2, 1, 1, 1, KFAC_DAMPING_EXACT);
    layer_factors(&Ls[0], &r, 0.1);
    layer_factors(&Ls[1], &r, 0.03);
    for (int i = 0; i < 2; i++) {
        layer_weights(&Ls[i], &r);
        layer_grads(&Ls[i], &r, 2.0);
    }
    naive_step_layer nl[2] = {naive_layer(&Ls[0]), naive_layer(&Ls[1])};
    double nu, gdd;
    naive_kfac_step(nl, 2, 0.05, 0.0, 0.0005, 4, 0.0, &nu, &gdd);
    kfac_layer_ref refs[2] = {Ls[0].ref, Ls[1].ref};
    kfac_step_args args = {0.05, 0.0, 0.0005, 4, 0.0};
    kfac_step_report rep;
    assert_int_equal(kfac_step(refs, 2, &args, &rep), KFAC_OK);
    assert_close_scalar(rep.nu, 1.0, 0, 0, "nu without constraint");
    assert_close_scalar(rep.gdotdelta, gdd, 0, TOL_SCALAR, "<g,Delta>");
    assert_int_equal(rep.applied, 2);
    check_layer(&Ls[0], "exact fc");
    check_layer(&Ls[1], "exact conv");
    layer_free(&Ls[0]);
    layer_free(&Ls[1]);
}

/* V5: sum <g, Delta> = 174 (a connected layer whose damped block is the
 * identity: exact damping, lam = 0, A = I, G = 1, g = [13, 2, 1]), eta = 0.1:
 * C = 10 -> nu = 1, C = 0.5 -> nu = 0.536056. */
static void test_vector_v5(void **state)
{
    (void)state;
    const double Cs[3] = {10.0, 0.5, 0.0}, nus[3] = {1.0, 0.536056, 1.0};
    for (int c = 0; c < 3; c++) {
        layer L;
        layer_fc(&L, 3, 1, 0, KFAC_DAMPING_EXACT);
        naive_eye(L.blk.A, 3);
        L.blk.G[0] = 1.0;
        tu_block_set_factors(&L.blk);
        tu_block_invert(&L.blk, 0.0);
        const float g[3] = {13, 2, 1};
        for (int i = 0; i < 3; i++) {
            L.ref.grad_w[i] = -g[i]; /* batch 1: g = -grad */
            L.ref.w[i] = 0.0f;
        }
        kfac_step_args args = {0.1, 0.0, 0.0, 1, Cs[c]};
        kfac_step_report rep;
        assert_int_equal(kfac_step(&L.ref, 1, &args, &rep), KFAC_OK);
        assert_close_scalar(rep.gdotdelta, 174.0, 0, 1e-6, "V5 <g,Delta>");
        assert_close_scalar(rep.nu, nus[c], TOL_VECTOR_ABS, 0, "V5 nu");
        double want[3];
        for (int i = 0; i < 3; i++)
            want[i] = -0.1 * nus[c] * g[i];
        assert_close_arrays_f(L.ref.w, want, 3, 1e-5, 0, "V5 weights");
        layer_free(&L);
    }
}

/* Shared body of the skip tests: layer 1 is broken by `breaker`; layer 0
 * must step exactly as if it were alone, layer 1 must not move. */
typedef void (*breaker_fn)(layer *L, naive_rng *r);

static void run_skip_case(breaker_fn breaker, kfac_damping_type type1, uint64_t seed,
                          const char *what)
{
    naive_rng r;
    naive_rng_seed(&r, seed);
    layer Ls[2];
    layer_conv(&Ls[0], 2, 4, 4, 4, 3, 2, 1, KFAC_DAMPING_FACTORED);
    layer_fc(&Ls[1], 4, 3, 1, type1);
    layer_factors(&Ls[0], &r, 0.05);
    for (int i = 0; i < 2; i++) {
        layer_weights(&Ls[i], &r);
        layer_grads(&Ls[i], &r, 3.0);
    }
    /* non-zero velocity on the broken layer so "untouched" is meaningful */
    naive_fill_float(&r, Ls[1].ref.vel_w, Ls[1].blk.nw, 0.2);
    if (Ls[1].blk.bias)
        naive_fill_float(&r, Ls[1].ref.vel_b, Ls[1].blk.nbias, 0.2);
    breaker(&Ls[1], &r);

    const double eta = 0.2, mu = 0.5, wd = 0.001;
    const int batch = 4;
    double C = 0.2 * eta * eta * reference_gdd(Ls, 1, wd, batch); /* clip on layer 0 alone */
    naive_step_layer nl = naive_layer(&Ls[0]);
    double nu, gdd;
    naive_kfac_step(&nl, 1, eta, mu, wd, batch, C, &nu, &gdd);

    snap s1 = take_snap(&Ls[1]);
    kfac_layer_ref refs[2] = {Ls[0].ref, Ls[1].ref};
    kfac_step_args args = {eta, mu, wd, batch, C};
    kfac_step_report rep;
    assert_int_equal(kfac_step(refs, 2, &args, &rep), KFAC_OK);
    assert_int_equal(rep.applied, 1);
    assert_int_equal(rep.skipped, 1);
    assert_int_equal(rep.first_skipped, 1);
    char name[96];
    snprintf(name, sizeof name, "%s: nu from the applied layer only", what);
    assert_close_scalar(rep.nu, nu, 0, TOL_SCALAR, name);
    snprintf(name, sizeof name, "%s: <g,Delta> of the applied layer", what);
    assert_close_scalar(rep.gdotdelta, gdd, 0, TOL_SCALAR, name);
    check_layer(&Ls[0], what);
    check_untouched(&Ls[1], s1);
    for (size_t i = 0; i < Ls[1].blk.nw; i++)
        assert_true(Ls[1].ref.grad_w[i] == 0.0f);
    for (size_t i = 0; i < Ls[1].blk.nbias; i++)
        assert_true(Ls[1].ref.grad_b[i] == 0.0f);
    layer_free(&Ls[0]);
    layer_free(&Ls[1]);
}

static void break_nan_grad(layer *L, naive_rng *r)
{
    layer_factors(L, r, 0.05);
    L->ref.grad_w[2] = NAN;
}

static void break_inf_bias_grad(layer *L, naive_rng *r)
{
    layer_factors(L, r, 0.05);
    L->ref.grad_b[1] = -INFINITY;
}

/* The block's only statistics had a NaN planted in a captured gradient:
 * update_cov refuses them, so the block never gets factors or an inverse. */
static void break_nan_statistics(layer *L, naive_rng *r)
{
    float x[2 * 4], d[2 * 3];
    naive_fill_float(r, x, 8, 1.0);
    naive_fill_float(r, d, 6, 1.0);
    d[4] = NAN;
    assert_int_equal(tu_feed_update_cov(L->blk.b, x, d, 2, 0.95), KFAC_ERR_NOT_FINITE);
    assert_int_equal(kfac_block_register_inverse(L->blk.b), KFAC_OK);
    assert_int_equal(kfac_block_update_inverses(L->blk.b), KFAC_ERR_STATE);
    assert_int_equal(kfac_block_has_inverse(L->blk.b), 0);
}

/* Exact damping with lam = 0 and A = 0 (finite, symmetric, accepted):
 * the damped block is singular, so either update_inverses fails (no inverse)
 * or Delta = (T dG dA + 0)^-1 ... is not finite. Both must skip the layer. */
static void break_singular_block(layer *L, naive_rng *r)
{
    (void)r;
    memset(L->blk.A, 0, sizeof(double) * 25);
    naive_eye(L->blk.G, 3);
    tu_block_set_factors(&L->blk);
    tu_block_register(&L->blk, 0.0, NULL, 0);
    kfac_status rc = kfac_block_update_inverses(L->blk.b);
    assert_true(rc == KFAC_OK || rc == KFAC_ERR_NOT_FINITE || rc == KFAC_ERR_LAPACK);
}

static void test_step_skips_nan_gradient(void **state)
{
    (void)state;
    run_skip_case(break_nan_grad, KFAC_DAMPING_FACTORED, 3003, "NaN weight gradient");
    run_skip_case(break_inf_bias_grad, KFAC_DAMPING_FACTORED, 3004, "Inf bias gradient");
}

static void test_step_skips_block_without_inverse(void **state)
{
    (void)state;
    run_skip_case(break_nan_statistics, KFAC_DAMPING_FACTORED, 3005, "NaN in statistics");
}

static void test_step_skips_non_finite_delta(void **state)
{
    (void)state;
    run_skip_case(break_singular_block, KFAC_DAMPING_EXACT, 3006, "singular exact block");
}

/* A live layer offered non-finite factors (NaN through set_factors, NaN in a
 * captured gradient through update_cov) refuses them, keeps its factors and
 * inverse, and the next step is exactly the step with the old block. */
static void test_step_after_rejected_factors(void **state)
{
    (void)state;
    naive_rng r;
    layer L;
    layer_fc_ready(&L, &r, 3008, 2.0);
    double A0[25], G0[9], A1[25], G1[9];
    assert_int_equal(kfac_block_get_factors(L.blk.b, 0, A0, G0), KFAC_OK);

    double An[25], Gn[9];
    memcpy(An, A0, sizeof An);
    memcpy(Gn, G0, sizeof Gn);
    An[6] = NAN;
    assert_int_equal(kfac_block_set_factors(L.blk.b, 0, An, G0), KFAC_ERR_NOT_FINITE);
    Gn[0] = INFINITY;
    assert_int_equal(kfac_block_set_factors(L.blk.b, 0, A0, Gn), KFAC_ERR_NOT_FINITE);
    float x[2 * 4], d[2 * 3];
    naive_fill_float(&r, x, 8, 1.0);
    naive_fill_float(&r, d, 6, 1.0);
    d[1] = NAN;
    assert_int_equal(tu_feed_update_cov(L.blk.b, x, d, 2, 0.5), KFAC_ERR_NOT_FINITE);
    assert_int_equal(kfac_block_get_factors(L.blk.b, 0, A1, G1), KFAC_OK);
    assert_memory_equal(A1, A0, sizeof A0);
    assert_memory_equal(G1, G0, sizeof G0);
    assert_int_equal(kfac_block_update_inverses(L.blk.b), KFAC_OK);

    naive_step_layer nl = naive_layer(&L);
    double nu, gdd;
    naive_kfac_step(&nl, 1, 0.1, 0.9, 0.001, 2, 0.0, &nu, &gdd);
    kfac_step_args args = {0.1, 0.9, 0.001, 2, 0.0};
    kfac_step_report rep;
    assert_int_equal(kfac_step(&L.ref, 1, &args, &rep), KFAC_OK);
    assert_int_equal(rep.applied, 1);
    assert_int_equal(rep.skipped, 0);
    assert_close_scalar(rep.gdotdelta, gdd, 0, TOL_SCALAR, "<g,Delta> with the old block");
    check_layer(&L, "step with the old block");
    layer_free(&L);
}

/* Bad arguments: an error, and nothing changed (gradients not zeroed either). */
static void test_step_bad_arguments(void **state)
{
    (void)state;
    naive_rng r;
    layer L;
    layer_fc_ready(&L, &r, 3007, 1.0);
    float *gw0 = naive_alloc(L.blk.nw, sizeof(float));
    memcpy(gw0, L.ref.grad_w, sizeof(float) * L.blk.nw);
    snap s = take_snap(&L);
    kfac_layer_ref ref = L.ref;
    kfac_step_args args = {0.1, 0.9, 0.0, 8, 0.001};
    kfac_step_report rep;

    assert_int_equal(kfac_step(NULL, 1, &args, &rep), KFAC_ERR_NULL);
    assert_int_equal(kfac_step(&ref, 1, NULL, &rep), KFAC_ERR_NULL);
    kfac_step_args bad = args;
    bad.batch = 0;
    assert_int_equal(kfac_step(&ref, 1, &bad, &rep), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_step(&ref, -1, &args, &rep), KFAC_ERR_INVALID_ARG);
    kfac_layer_ref nb = ref;
    nb.b = NULL; /* the block has a bias */
    assert_int_equal(kfac_step(&nb, 1, &args, &rep), KFAC_ERR_NULL);
    nb = ref;
    nb.w = NULL;
    assert_int_equal(kfac_step(&nb, 1, &args, &rep), KFAC_ERR_NULL);
    nb = ref;
    nb.block = NULL;
    assert_int_equal(kfac_step(&nb, 1, &args, &rep), KFAC_ERR_NULL);
    assert_memory_equal(L.ref.grad_w, gw0, sizeof(float) * L.blk.nw);
    check_untouched(&L, s);
    free(gw0);
    layer_free(&L);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_step_clipping_and_momentum),
        cmocka_unit_test(test_step_unclipped_exact),
        cmocka_unit_test(test_vector_v5),
        cmocka_unit_test(test_step_skips_nan_gradient),
        cmocka_unit_test(test_step_skips_block_without_inverse),
        cmocka_unit_test(test_step_skips_non_finite_delta),
        cmocka_unit_test(test_step_after_rejected_factors),
        cmocka_unit_test(test_step_bad_arguments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
