/*
 * Products with the damped K-FAC block (kfac.h, sem. 3-4): multiply,
 * multiply_inverse and multiply_matpower(0.5, -0.5, 2) against the dense
 * block built explicitly (full_fisher_block() plus damping for exact
 * damping, T*kron(G+lam_G I, A+lam_A I) for factored), solved by
 * Gauss-Jordan or powered through a Jacobi eigen solver written in
 * kfac_naive.c; conv blocks with groups and bias and connected blocks, with
 * factors set directly and from data; vectors V1 and V2; which factors an
 * inverse uses; and that a failed update_inverses keeps the last good one.
 * The first test checks the dense references themselves.
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

static kfac_conv_geom geom(int c, int h, int w, int n, int size, int stride, int pad,
                           int groups, int bias)
{
    return tu_geom(c, h, w, n, size, stride, pad, 1, groups, bias, KFAC_PATCHES_GENERAL);
}

/* The precision the next blocks are created with: the product tests run
 * once per precond_precision. */
static kfac_precision g_precision = KFAC_PRECISION_FLOAT;

static void blk_conv(tu_block *s, const kfac_conv_geom *g, kfac_damping_type type)
{
    kfac_config cfg = tu_config(type, g_precision);
    tu_block_conv(s, g, &cfg);
}

static void blk_fc(tu_block *s, int in, int out, int bias, kfac_damping_type type)
{
    kfac_config cfg = tu_config(type, g_precision);
    tu_block_fc(s, in, out, bias, &cfg);
}

/* Random factors per group; A and G on different scales so pi != 1. */
static void blk_set_random_factors(tu_block *s, naive_rng *r)
{
    tu_block_random_factors(s, r, 3.0, 1.0, 0.05, 0.05);
}

/* out = (damped block)^e v through the library, returned as a parameter vector. */
static kfac_status lib_power(tu_block *s, int which, double e, const float *vw, const float *vb,
                             double *flat)
{
    float *ow = naive_alloc(s->nw, sizeof(float));
    float *ob = s->bias ? naive_alloc(s->nbias, sizeof(float)) : NULL;
    kfac_status rc;
    if (which == 1)
        rc = kfac_block_multiply(s->b, vw, vb, ow, ob);
    else if (which == -1)
        rc = kfac_block_multiply_inverse(s->b, vw, vb, ow, ob);
    else
        rc = kfac_block_multiply_matpower(s->b, e, vw, vb, ow, ob);
    if (rc == KFAC_OK)
        tu_block_pack(s, ow, ob, flat);
    free(ow);
    free(ob);
    return rc;
}

/* A random (w, bias) pair, allocated here, and its parameter vector. */
static void random_vector(naive_rng *r, tu_block *s, float **vw, float **vb, double *flat)
{
    *vw = naive_alloc(s->nw, sizeof(float));
    *vb = s->bias ? naive_alloc(s->nbias, sizeof(float)) : NULL;
    tu_block_fill_params(s, r, 1.0, *vw, *vb, flat);
}

/* The library's (damped block)^e v (`which` as for lib_power) must succeed
 * and equal the dense D^e v within TOL_PRODUCT of its largest entry. */
static void expect_power(tu_block *s, const double *D, int which, double e, const float *vw,
                         const float *vb, const double *v, const char *what)
{
    double *want = naive_alloc(s->np, sizeof(double));
    double *got = naive_alloc(s->np, sizeof(double));
    naive_apply_power(D, s->np, e, v, want);
    assert_int_equal(lib_power(s, which, e, vw, vb, got), KFAC_OK);
    assert_close_arrays(got, want, s->np, TOL_PRODUCT * kfac_tol_max_abs(want, s->np),
                        TOL_PRODUCT, what);
    free(want);
    free(got);
}

/* All products of a registered, inverted block against the dense block. */
static void check_all_products(tu_block *s, double lam, naive_rng *r, const char *what)
{
    double *D = tu_block_dense_damped(s, lam);
    double *v = naive_alloc(s->np, sizeof(double));
    float *vw, *vb;
    random_vector(r, s, &vw, &vb, v);
    char name[160];

    if (s->type == KFAC_DAMPING_FACTORED)
        for (int j = 0; j < s->groups; j++) {
            double la, lg, pi, xa, xg, xpi;
            naive_factored_damping(tu_block_A(s, j), s->kb, tu_block_G(s, j), s->n_g, s->T,
                                   lam, &xa, &xg, &xpi);
            assert_int_equal(kfac_block_factored_damping(s->b, j, &la, &lg, &pi), KFAC_OK);
            snprintf(name, sizeof name, "%s: pi group %d", what, j);
            assert_close_scalar(pi, xpi, 0, 1e-12, name);
            snprintf(name, sizeof name, "%s: lam_A group %d", what, j);
            assert_close_scalar(la, xa, 0, 1e-12, name);
            snprintf(name, sizeof name, "%s: lam_G group %d", what, j);
            assert_close_scalar(lg, xg, 0, 1e-12, name);
        }

    /* which: +1 multiply, -1 multiply_inverse, 0 matpower(e) */
    const struct { int which; double e; } cases[] = {
        {1, 1.0}, {-1, -1.0}, {0, 1.0}, {0, -1.0}, {0, 0.5}, {0, -0.5}, {0, 2.0},
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        snprintf(name, sizeof name, "%s: %s e=%g", what,
                 cases[c].which == 1 ? "multiply" : cases[c].which == -1 ? "multiply_inverse"
                                                                       : "multiply_matpower",
                 cases[c].e);
        expect_power(s, D, cases[c].which, cases[c].e, vw, vb, v, name);
    }

    /* out may alias v */
    {
        float *iw = naive_alloc(s->nw, sizeof(float));
        float *ib = s->bias ? naive_alloc(s->nbias, sizeof(float)) : NULL;
        float *ow = naive_alloc(s->nw, sizeof(float));
        float *ob = s->bias ? naive_alloc(s->nbias, sizeof(float)) : NULL;
        memcpy(iw, vw, sizeof(float) * s->nw);
        if (s->bias)
            memcpy(ib, vb, sizeof(float) * s->nbias);
        assert_int_equal(kfac_block_multiply_inverse(s->b, vw, vb, ow, ob), KFAC_OK);
        assert_int_equal(kfac_block_multiply_inverse(s->b, iw, ib, iw, ib), KFAC_OK);
        assert_memory_equal(iw, ow, sizeof(float) * s->nw);
        if (s->bias)
            assert_memory_equal(ib, ob, sizeof(float) * s->nbias);
        free(iw); free(ib); free(ow); free(ob);
    }
    free(D); free(v); free(vw); free(vb);
}

/* Damping lam, the inverse and the matpowers 0.5, -0.5 and 2 registered. */
static void register_all(tu_block *s, double lam)
{
    static const double exps[3] = {0.5, -0.5, 2.0};
    tu_block_register(s, lam, exps, 3);
}

/* ------------------------------------------------------------------ tests */

/* The dense references check each other: Jacobi reconstructs its input and
 * has orthonormal vectors, Gauss-Jordan and Cholesky agree and have small
 * residuals, matpower(0.5) squared is the input, and the kron ordering
 * satisfies F vec(V) = vec(T G V A) (sem. 3). */
static void test_naive_references_self_check(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 2001);
    const int sizes[3] = {1, 7, 40};
    for (int si = 0; si < 3; si++) {
        int n = sizes[si];
        double *S = naive_alloc((size_t)n * n, sizeof(double));
        double *V = naive_alloc((size_t)n * n, sizeof(double));
        double *R = naive_alloc((size_t)n * n, sizeof(double));
        double *I = naive_alloc((size_t)n * n, sizeof(double));
        double *L = naive_alloc((size_t)n * n, sizeof(double));
        double *d = naive_alloc(n, sizeof(double));
        double *b = naive_alloc(n, sizeof(double));
        double *x1 = naive_alloc(n, sizeof(double));
        double *x2 = naive_alloc(n, sizeof(double));
        double *y = naive_alloc(n, sizeof(double));
        naive_random_spd(&r, n, 1.0, 0.1, S);
        naive_jacobi_eigen(S, n, d, V);
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) {
                double rec = 0.0, orth = 0.0;
                for (int l = 0; l < n; l++) {
                    rec += V[i * n + l] * d[l] * V[j * n + l];
                    orth += V[l * n + i] * V[l * n + j];
                }
                R[i * n + j] = rec;
                I[i * n + j] = orth;
            }
        assert_close_arrays(R, S, (size_t)n * n, TOL_DENSE, 0, "Jacobi reconstruction");
        naive_eye(L, n);
        assert_close_arrays(I, L, (size_t)n * n, TOL_DENSE, 0, "Jacobi orthonormality");
        naive_sym_matpower(S, n, 0.5, R);
        naive_matmul(R, R, n, I);
        assert_close_arrays(I, S, (size_t)n * n, TOL_DENSE, 0, "sqrt squared");
        naive_fill_double(&r, b, n, 1.0);
        assert_int_equal(naive_solve(S, n, b, x1), 0);
        assert_int_equal(naive_cholesky(S, n, L), 0);
        naive_cholesky_solve(L, n, b, x2);
        assert_close_arrays(x2, x1, n, TOL_DENSE, TOL_DENSE, "Cholesky vs Gauss-Jordan");
        naive_matvec(S, n, x1, y);
        assert_close_arrays(y, b, n, TOL_DENSE, 0, "Gauss-Jordan residual");
        free(S); free(V); free(R); free(I); free(L); free(d); free(b); free(x1); free(x2); free(y);
    }
    /* kron order: F vec(V) == vec(T * G V A), row-major vec of n_g x kb V */
    int ng = 3, kb = 4, T = 5, np = ng * kb;
    double G[9], A[16], F[144], V[12], GV[12], out[12], want[12];
    naive_random_spd(&r, ng, 1.0, 0.2, G);
    naive_random_spd(&r, kb, 1.0, 0.2, A);
    naive_fill_double(&r, V, np, 1.0);
    naive_full_fisher(1, ng, kb, T, A, G, F);
    naive_matvec(F, np, V, out);
    for (int i = 0; i < ng; i++)
        for (int c = 0; c < kb; c++) {
            double t = 0.0;
            for (int l = 0; l < ng; l++)
                t += G[i * ng + l] * V[l * kb + c];
            GV[i * kb + c] = t;
        }
    for (int i = 0; i < ng; i++)
        for (int c = 0; c < kb; c++) {
            double t = 0.0;
            for (int l = 0; l < kb; l++)
                t += GV[i * kb + l] * A[l * kb + c];
            want[i * kb + c] = T * t;
        }
    assert_close_arrays(out, want, np, TOL_DENSE, TOL_DENSE, "kron order");
}

/* pack/unpack follow the header's parameter-vector order exactly. */
static void test_pack_unpack(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 2002);
    for (int variant = 0; variant < 3; variant++) {
        tu_block s;
        if (variant == 0) {
            kfac_conv_geom g = geom(4, 5, 5, 6, 3, 1, 1, 2, 1);
            blk_conv(&s, &g, KFAC_DAMPING_FACTORED);
        } else if (variant == 1) {
            kfac_conv_geom g = geom(6, 4, 4, 3, 1, 1, 0, 3, 0);
            blk_conv(&s, &g, KFAC_DAMPING_FACTORED);
        } else {
            blk_fc(&s, 5, 4, 1, KFAC_DAMPING_FACTORED);
        }
        float *vw, *vb;
        double *want = naive_alloc(s.np, sizeof(double));
        double *flat = naive_alloc(s.np, sizeof(double));
        random_vector(&r, &s, &vw, &vb, want);
        assert_int_equal(kfac_block_pack(s.b, vw, vb, flat), KFAC_OK);
        assert_close_arrays(flat, want, s.np, 0, 0, "pack");
        float *uw = naive_alloc(s.nw, sizeof(float));
        float *ub = s.bias ? naive_alloc(s.nbias, sizeof(float)) : NULL;
        assert_int_equal(kfac_block_unpack(s.b, flat, uw, ub), KFAC_OK);
        assert_memory_equal(uw, vw, sizeof(float) * s.nw);
        if (s.bias)
            assert_memory_equal(ub, vb, sizeof(float) * s.nbias);
        free(vw); free(vb); free(uw); free(ub); free(want); free(flat);
        tu_block_free(&s);
    }
}

/* Factors set directly, both damping types, conv with groups+bias, conv
 * without, connected with and without bias. */
static void products_with_set_factors(kfac_damping_type type, uint64_t seed)
{
    naive_rng r;
    naive_rng_seed(&r, seed);
    const double lams[4] = {0.05, 0.3, 0.02, 0.1};
    for (int variant = 0; variant < 4; variant++) {
        tu_block s;
        char what[96];
        if (variant == 0) {
            kfac_conv_geom g = geom(4, 5, 5, 6, 3, 1, 1, 2, 1); /* np 114, T 25 */
            blk_conv(&s, &g, type);
        } else if (variant == 1) {
            kfac_conv_geom g = geom(3, 4, 4, 2, 3, 2, 1, 1, 0); /* np 54, T 4 */
            blk_conv(&s, &g, type);
        } else if (variant == 2) {
            blk_fc(&s, 6, 4, 1, type);
        } else {
            blk_fc(&s, 5, 3, 0, type);
        }
        snprintf(what, sizeof what, "%s variant %d",
                 type == KFAC_DAMPING_EXACT ? "exact" : "factored", variant);
        blk_set_random_factors(&s, &r);
        register_all(&s, lams[variant]);
        assert_int_equal(kfac_block_has_inverse(s.b), 0);
        assert_int_equal(kfac_block_update_inverses(s.b), KFAC_OK);
        assert_int_equal(kfac_block_has_inverse(s.b), 1);
        assert_int_equal(kfac_block_num_retries(s.b), 0);

        /* the undamped dense block the damped references are built on */
        double *F = naive_alloc((size_t)s.np * s.np, sizeof(double));
        double *Fexp = naive_alloc((size_t)s.np * s.np, sizeof(double));
        assert_int_equal(kfac_block_full_fisher_block(s.b, F), KFAC_OK);
        naive_full_fisher(s.groups, s.n_g, s.kb, s.T, s.A, s.G, Fexp);
        assert_close_arrays(F, Fexp, (size_t)s.np * s.np, 1e-12 * kfac_tol_max_abs(Fexp, (size_t)s.np * s.np),
                            1e-12, "full_fisher_block");
        if (type == KFAC_DAMPING_EXACT) {
            /* Exact damping is checked against full_fisher_block() + lam I
             * itself, as the issue asks. */
            double *D = F, *v = naive_alloc(s.np, sizeof(double));
            float *vw, *vb;
            for (int i = 0; i < s.np; i++)
                D[(size_t)i * s.np + i] += lams[variant];
            random_vector(&r, &s, &vw, &vb, v);
            expect_power(&s, D, -1, -1.0, vw, vb, v,
                         "exact: multiply_inverse vs solve(full_fisher_block + lam I)");
            free(v); free(vw); free(vb);
        }
        free(F);
        free(Fexp);
        check_all_products(&s, lams[variant], &r, what);
        tu_block_free(&s);
    }
}

static void test_products_factored(void **state)
{
    (void)state;
    g_precision = KFAC_PRECISION_DOUBLE;
    products_with_set_factors(KFAC_DAMPING_FACTORED, 2003);
    g_precision = KFAC_PRECISION_FLOAT;
    products_with_set_factors(KFAC_DAMPING_FACTORED, 2003);
}

static void test_products_exact(void **state)
{
    (void)state;
    products_with_set_factors(KFAC_DAMPING_EXACT, 2004);
}

/* End to end: factors from data on a grouped conv with bias (27 locations
 * for kb = 19, so A is far from the identity and the damping split matters). */
static void test_products_from_data(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 2005);
    for (int t = 0; t < 3; t++) {
        /* factored in both precisions, then exact (always double) */
        kfac_damping_type type = t == 2 ? KFAC_DAMPING_EXACT : KFAC_DAMPING_FACTORED;
        g_precision = t == 1 ? KFAC_PRECISION_DOUBLE : KFAC_PRECISION_FLOAT;
        kfac_conv_geom g = geom(4, 6, 5, 4, 3, 2, 1, 2, 1);
        tu_block s;
        blk_conv(&s, &g, type);
        tu_batch bt;
        tu_batch_conv(&bt, &g, 3, &r, 1.0, 1.0);
        assert_int_equal(tu_feed_update_cov(s.b, bt.x, bt.d, bt.M, 0.95), KFAC_OK);
        /* The dense reference uses the library's own factors (checked against
         * brute force in test_kfac_stats) so that only the products are tested
         * here; a bit of data check anyway: */
        tu_block_read_factors(&s);
        double *A0 = naive_alloc((size_t)s.kb * s.kb, sizeof(double));
        double *G0 = naive_alloc((size_t)s.n_g * s.n_g, sizeof(double));
        naive_conv_factors(&g, bt.x, bt.d, bt.M, 1, A0, G0);
        assert_close_arrays(tu_block_A(&s, 1), A0, (size_t)s.kb * s.kb, TOL_STATS * 2.0,
                            TOL_STATS, "A group 1");
        register_all(&s, 0.1);
        assert_int_equal(kfac_block_update_inverses(s.b), KFAC_OK);
        check_all_products(&s, 0.1, &r, t == 2 ? "data exact" : t ? "data factored double"
                                                                  : "data factored float");
        free(A0); free(G0);
        tu_batch_free(&bt);
        tu_block_free(&s);
    }
}

/* V1: A = I(8), G = I(2), T = 4, lam = 0.5 -> pi = 1, lam_A = lam_G =
 * 0.353553, multiply_inverse(V) = 0.136454929 V. */
static void test_vector_v1(void **state)
{
    (void)state;
    kfac_conv_geom g = geom(8, 2, 2, 2, 1, 1, 0, 1, 0); /* k = 8, n = 2, T = 4 */
    tu_block s;
    blk_conv(&s, &g, KFAC_DAMPING_FACTORED);
    assert_int_equal(s.T, 4);
    naive_eye(s.A, 8);
    naive_eye(s.G, 2);
    tu_block_set_factors(&s);
    tu_block_invert(&s, 0.5);
    double la, lg, pi;
    assert_int_equal(kfac_block_factored_damping(s.b, 0, &la, &lg, &pi), KFAC_OK);
    assert_close_scalar(pi, 1.0, 1e-12, 0, "V1 pi");
    assert_close_scalar(la, 0.353553, TOL_VECTOR_ABS, 0, "V1 lam_A");
    assert_close_scalar(lg, 0.353553, TOL_VECTOR_ABS, 0, "V1 lam_G");
    float v[16], out[16];
    double want[16];
    for (int i = 0; i < 16; i++) {
        v[i] = (float)(i - 7.5) * 0.37f;
        want[i] = v[i] * 0.136454929;
    }
    assert_int_equal(kfac_block_multiply_inverse(s.b, v, NULL, out, NULL), KFAC_OK);
    assert_close_arrays_f(out, want, 16, 1e-9, 1e-6, "V1 multiply_inverse");
    tu_block_free(&s);
}

/* V2: A = psd(8), G = psd(2), T = 4, lam = 0 (exact damping) and the
 * published multiply_inverse; also equal to solving full_fisher_block(). */
static void test_vector_v2(void **state)
{
    (void)state;
    kfac_conv_geom g = geom(8, 2, 2, 2, 1, 1, 0, 1, 0);
    tu_block s;
    blk_conv(&s, &g, KFAC_DAMPING_EXACT);
    double F[256], vd[16], sol[16];
    naive_psd(8, s.A);
    naive_psd(2, s.G);
    tu_block_set_factors(&s);
    tu_block_invert(&s, 0.0);
    float v[16], out[16];
    for (int c = 0; c < 8; c++) {
        v[c] = (float)(2 * c);         /* row 0: 0, 2, ..., 14 */
        v[8 + c] = (float)(2 * c + 1); /* row 1: 1, 3, ..., 15 */
    }
    const double want[16] = {
        -0.297598, -0.048799, 0.034134, 0.0756,   0.10048,  0.117067, 0.128915, 0.1378,
        -0.115178, -0.007589, 0.028274, 0.046206, 0.056964, 0.064137, 0.06926,  0.073103};
    assert_int_equal(kfac_block_multiply_inverse(s.b, v, NULL, out, NULL), KFAC_OK);
    assert_close_arrays_f(out, want, 16, TOL_VECTOR_ABS, 0, "V2 multiply_inverse");
    /* the published numbers are the dense solve (checks the reference too) */
    assert_int_equal(kfac_block_full_fisher_block(s.b, F), KFAC_OK);
    for (int i = 0; i < 16; i++)
        vd[i] = v[i];
    assert_int_equal(naive_solve(F, 16, vd, sol), 0);
    assert_close_arrays(sol, want, 16, TOL_VECTOR_ABS, 0, "V2 dense solve");
    assert_close_arrays_f(out, sol, 16, 1e-6 * kfac_tol_max_abs(sol, 16), 1e-6,
                          "V2 vs dense solve");
    tu_block_free(&s);
}

/* multiply uses the current factors, multiply_inverse/matpower those of the
 * last update_inverses (sem. 4). */
static void test_inverse_uses_factors_of_last_update(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 2006);
    for (int t = 0; t < 2; t++) {
        kfac_damping_type type = t ? KFAC_DAMPING_EXACT : KFAC_DAMPING_FACTORED;
        tu_block s;
        kfac_conv_geom g = geom(4, 4, 4, 4, 3, 1, 1, 2, 1);
        blk_conv(&s, &g, type);
        float *vw, *vb;
        double *v = naive_alloc(s.np, sizeof(double));
        double *y1 = naive_alloc(s.np, sizeof(double)), *y2 = naive_alloc(s.np, sizeof(double));
        double *ym1 = naive_alloc(s.np, sizeof(double)), *ym2 = naive_alloc(s.np, sizeof(double));
        random_vector(&r, &s, &vw, &vb, v);
        blk_set_random_factors(&s, &r);
        register_all(&s, 0.05);
        assert_int_equal(lib_power(&s, -1, -1, vw, vb, y1), KFAC_ERR_STATE);
        assert_int_equal(lib_power(&s, 0, 0.5, vw, vb, y1), KFAC_ERR_STATE);
        assert_int_equal(kfac_block_update_inverses(s.b), KFAC_OK);
        assert_int_equal(lib_power(&s, -1, -1, vw, vb, y1), KFAC_OK);
        assert_int_equal(lib_power(&s, 0, -0.5, vw, vb, ym1), KFAC_OK);
        blk_set_random_factors(&s, &r); /* new factors, no update_inverses */
        assert_int_equal(lib_power(&s, -1, -1, vw, vb, y2), KFAC_OK);
        assert_memory_equal(y2, y1, sizeof(double) * s.np);
        assert_int_equal(lib_power(&s, 0, -0.5, vw, vb, ym2), KFAC_OK);
        assert_memory_equal(ym2, ym1, sizeof(double) * s.np);
        double *D = tu_block_dense_damped(&s, 0.05);
        expect_power(&s, D, 1, 1.0, vw, vb, v, "multiply with current factors");
        assert_int_equal(kfac_block_update_inverses(s.b), KFAC_OK);
        expect_power(&s, D, -1, -1.0, vw, vb, v, "multiply_inverse after the second update");
        free(D); free(v); free(y1); free(y2); free(ym1); free(ym2); free(vw); free(vb);
        tu_block_free(&s);
    }
}

/* A failed update_inverses keeps the last good inverse. The trigger is
 * A = 1.7e308 * ones (symmetric and finite, so set_factors takes it) whose
 * trace and largest eigenvalue, kb*1.7e308, are beyond double range: sem. 4's
 * pi and the double-precision decomposition cannot be formed. (A factor with
 * a negative trace is not used: sem. 4 leaves pi undefined there and a
 * library may guard it.) */
static void test_failed_update_keeps_previous_inverse(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 2007);
    tu_block s;
    blk_fc(&s, 4, 3, 1, KFAC_DAMPING_FACTORED);
    float *vw, *vb;
    double *v = naive_alloc(s.np, sizeof(double));
    double *y1 = naive_alloc(s.np, sizeof(double)), *y2 = naive_alloc(s.np, sizeof(double));
    double *m1 = naive_alloc(s.np, sizeof(double)), *m2 = naive_alloc(s.np, sizeof(double));
    random_vector(&r, &s, &vw, &vb, v);
    blk_set_random_factors(&s, &r);
    register_all(&s, 0.01);
    assert_int_equal(kfac_block_update_inverses(s.b), KFAC_OK);
    assert_int_equal(lib_power(&s, -1, -1, vw, vb, y1), KFAC_OK);
    assert_int_equal(lib_power(&s, 0, 0.5, vw, vb, m1), KFAC_OK);

    double A[25], G[9];
    for (int i = 0; i < 25; i++)
        A[i] = 1.7e308;
    naive_eye(G, 3);
    assert_int_equal(kfac_block_set_factors(s.b, 0, A, G), KFAC_OK);
    kfac_status rc = kfac_block_update_inverses(s.b);
    if (rc == KFAC_OK)
        print_error("update_inverses accepted A = 1.7e308 * ones(5)\n");
    assert_true(rc == KFAC_ERR_NOT_FINITE || rc == KFAC_ERR_LAPACK);
    assert_int_equal(kfac_block_has_inverse(s.b), 1);
    assert_int_equal(lib_power(&s, -1, -1, vw, vb, y2), KFAC_OK);
    assert_memory_equal(y2, y1, sizeof(double) * s.np);
    assert_int_equal(lib_power(&s, 0, 0.5, vw, vb, m2), KFAC_OK);
    assert_memory_equal(m2, m1, sizeof(double) * s.np);

    /* good factors again: the inverse follows them */
    blk_set_random_factors(&s, &r);
    assert_int_equal(kfac_block_update_inverses(s.b), KFAC_OK);
    double *D = tu_block_dense_damped(&s, 0.01);
    expect_power(&s, D, -1, -1.0, vw, vb, v, "inverse after recovery");
    free(D); free(v); free(y1); free(y2); free(m1); free(m2); free(vw); free(vb);
    tu_block_free(&s);
}

/* An inverse that is fine in double but does not fit a float: A = G =
 * 1e-60 I with lam = 1e-80 gives pi = 1, lam_A = lam_G = 1e-40 and inverse
 * entries ~1e40 > FLT_MAX. With precond_precision=float the update fails
 * (NOT_FINITE) and keeps the previous inverse; with double it succeeds. */
static void test_float_inverse_out_of_range(void **state)
{
    (void)state;
    for (int prec = 0; prec < 2; prec++) {
        g_precision = prec ? KFAC_PRECISION_DOUBLE : KFAC_PRECISION_FLOAT;
        tu_block s;
        blk_fc(&s, 2, 2, 0, KFAC_DAMPING_FACTORED);
        float v[4] = {1, 2, 3, 4}, y1[4], y2[4];
        naive_eye(s.A, 2);
        naive_eye(s.G, 2);
        tu_block_set_factors(&s);
        tu_block_invert(&s, 1e-80);
        assert_int_equal(kfac_block_multiply_inverse(s.b, v, NULL, y1, NULL), KFAC_OK);
        s.A[0] = s.A[3] = s.G[0] = s.G[3] = 1e-60;
        tu_block_set_factors(&s);
        kfac_status rc = kfac_block_update_inverses(s.b);
        assert_int_equal(rc, prec ? KFAC_OK : KFAC_ERR_NOT_FINITE);
        rc = kfac_block_multiply_inverse(s.b, v, NULL, y2, NULL);
        if (prec) {
            /* the double product itself does not fit a float either */
            assert_int_equal(rc, KFAC_ERR_NOT_FINITE);
        } else {
            assert_int_equal(rc, KFAC_OK);
            assert_memory_equal(y2, y1, sizeof y1);
        }
        tu_block_free(&s);
    }
    g_precision = KFAC_PRECISION_FLOAT;
}

/* A factor whose damped Cholesky fails for the damping and all three x10
 * retries (indefinite A with a positive trace: A = diag(1e5, 1e5, -1e4),
 * G = I, lam = 1e-4, T = 1 -> pi = 251.7, lam_A = 2.517; even 1000*lam_A <
 * 1e4) takes the eigen fallback, which per kfac.h inverts
 * Q diag(max(d,0) + lam_A) Q^T with the original damping: the result is the
 * dense solve with A replaced by diag(1e5 + lam_A, 1e5 + lam_A, lam_A), and
 * the retry counter says 3 retries + 1 fallback. */
static void test_cholesky_retry_and_eigen_fallback(void **state)
{
    (void)state;
    tu_block s;
    blk_fc(&s, 3, 2, 0, KFAC_DAMPING_FACTORED);
    double A[9] = {1e5, 0, 0, 0, 1e5, 0, 0, 0, -1e4}, G[4] = {1, 0, 0, 1};
    const double lam = 1e-4;
    assert_int_equal(kfac_block_set_factors(s.b, 0, A, G), KFAC_OK);
    tu_block_register(&s, lam, NULL, 0);
    assert_int_equal(kfac_block_num_retries(s.b), 0);
    assert_int_equal(kfac_block_update_inverses(s.b), KFAC_OK);
    assert_int_equal(kfac_block_num_retries(s.b), 4);
    double la, lg, pi;
    naive_factored_damping(A, 3, G, 2, 1, lam, &la, &lg, &pi);
    double Ad[9] = {1e5 + la, 0, 0, 0, 1e5 + la, 0, 0, 0, la};
    double Gd[4] = {1 + lg, 0, 0, 1 + lg}, D[36], v[6], want[6], got[6];
    naive_full_fisher(1, 2, 3, 1, Ad, Gd, D);
    float vw[6] = {1, -2, 3, 0.5f, 5, -6}, ow[6];
    for (int i = 0; i < 6; i++)
        v[i] = vw[i];
    assert_int_equal(naive_solve(D, 6, v, want), 0);
    assert_int_equal(kfac_block_multiply_inverse(s.b, vw, NULL, ow, NULL), KFAC_OK);
    for (int i = 0; i < 6; i++)
        got[i] = ow[i];
    assert_close_arrays(got, want, 6, TOL_PRODUCT * kfac_tol_max_abs(want, 6), TOL_PRODUCT,
                        "eigen fallback inverse");
    tu_block_free(&s);
}

/* Changing lambda without update_inverses: exact damping uses the current
 * lambda with the last eigendecomposition, factored keeps the lam_A/lam_G of
 * the last update (kfac.h, multiply_inverse). */
static void test_damping_change_without_update(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 2009);
    for (int t = 0; t < 2; t++) {
        kfac_damping_type type = t ? KFAC_DAMPING_EXACT : KFAC_DAMPING_FACTORED;
        tu_block s;
        kfac_conv_geom g = geom(2, 4, 4, 4, 3, 1, 1, 2, 1);
        blk_conv(&s, &g, type);
        blk_set_random_factors(&s, &r);
        register_all(&s, 0.05);
        assert_int_equal(kfac_block_update_inverses(s.b), KFAC_OK);
        float *vw, *vb;
        double *v = naive_alloc(s.np, sizeof(double));
        random_vector(&r, &s, &vw, &vb, v);
        assert_int_equal(kfac_block_instantiate_factors(s.b, 0.4), KFAC_OK);
        double *D = tu_block_dense_damped(&s, t ? 0.4 : 0.05);
        const double exps[3] = {-1.0, -0.5, 2.0};
        for (int i = 0; i < 3; i++)
            expect_power(&s, D, i ? 0 : -1, exps[i], vw, vb, v,
                         t ? "exact: current lambda" : "factored: lambda of the update");
        /* multiply always uses the current lambda */
        free(D);
        D = tu_block_dense_damped(&s, 0.4);
        expect_power(&s, D, 1, 1.0, vw, vb, v, "multiply: current lambda");
        free(D); free(v); free(vw); free(vb);
        tu_block_free(&s);
    }
}

/* Exponent bookkeeping: +1 and -1 need no matpower registration, other
 * exponents do (else STATE), at most 8 distinct ones (a 9th: INVALID_ARG). */
static void test_matpower_registration(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 2008);
    tu_block s;
    blk_fc(&s, 4, 3, 1, KFAC_DAMPING_FACTORED);
    blk_set_random_factors(&s, &r);
    tu_block_invert(&s, 0.1);
    float *vw, *vb;
    double *v = naive_alloc(s.np, sizeof(double)), *y = naive_alloc(s.np, sizeof(double));
    random_vector(&r, &s, &vw, &vb, v);
    double *D = tu_block_dense_damped(&s, 0.1);
    expect_power(&s, D, 0, 1.0, vw, vb, v, "e=1");
    expect_power(&s, D, 0, -1.0, vw, vb, v, "e=-1");
    assert_int_equal(lib_power(&s, 0, 0.5, vw, vb, y), KFAC_ERR_STATE); /* never registered */
    assert_int_equal(kfac_block_register_matpower(s.b, 1.0), KFAC_OK);  /* needs nothing */

    const double ex[9] = {0.5, -0.5, 2, 0.25, -0.25, 3, -2, 1.5, 0.75};
    for (int i = 0; i < 8; i++)
        assert_int_equal(kfac_block_register_matpower(s.b, ex[i]), KFAC_OK);
    assert_int_equal(kfac_block_register_matpower(s.b, 0.5), KFAC_OK); /* not new */
    assert_int_equal(kfac_block_register_matpower(s.b, ex[8]), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_block_register_matpower(s.b, 1.0), KFAC_OK);
    assert_int_equal(kfac_block_update_inverses(s.b), KFAC_OK);
    for (int i = 0; i < 8; i++)
        expect_power(&s, D, 0, ex[i], vw, vb, v, "registered exponent");
    free(D); free(v); free(y); free(vw); free(vb);
    tu_block_free(&s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_naive_references_self_check),
        cmocka_unit_test(test_pack_unpack),
        cmocka_unit_test(test_products_factored),
        cmocka_unit_test(test_products_exact),
        cmocka_unit_test(test_products_from_data),
        cmocka_unit_test(test_vector_v1),
        cmocka_unit_test(test_vector_v2),
        cmocka_unit_test(test_inverse_uses_factors_of_last_update),
        cmocka_unit_test(test_failed_update_keeps_previous_inverse),
        cmocka_unit_test(test_float_inverse_out_of_range),
        cmocka_unit_test(test_cholesky_retry_and_eigen_fallback),
        cmocka_unit_test(test_damping_change_without_update),
        cmocka_unit_test(test_matpower_registration),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
