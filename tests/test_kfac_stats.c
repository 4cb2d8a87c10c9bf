/*
 * Factor statistics of the K-FAC library (kfac.h, sem. 1-2): A and G of conv
 * and connected blocks compared with brute-force loops over examples and
 * locations (kfac_naive.c) on random geometries (stride, padding, kernel
 * 1/3/5, groups, dilation, bias on/off), the three patch paths against each
 * other, the zero-copy per-example/per-group calls against the batch calls,
 * towers against one concatenated batch, the EMA (first estimate as is) and
 * the semantics page's vectors V3 and V4. Seeds are fixed.
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

/* The random geometries of the issue: stride 2, pad 0/1, kernel 1/3/5,
 * groups 2-3, dilation 2, bias on/off. */
static const kfac_conv_geom *geometries(int *count)
{
    static kfac_conv_geom gs[8];
    gs[0] = tu_geom(4, 7, 6, 6, 3, 2, 1, 1, 2, 1, KFAC_PATCHES_GENERAL);
    gs[1] = tu_geom(3, 9, 8, 4, 5, 1, 0, 1, 1, 0, KFAC_PATCHES_GENERAL);
    gs[2] = tu_geom(4, 9, 9, 4, 3, 1, 1, 2, 2, 1, KFAC_PATCHES_GENERAL);
    gs[3] = tu_geom(2, 5, 5, 3, 1, 2, 0, 1, 1, 1, KFAC_PATCHES_GENERAL);
    gs[4] = tu_geom(6, 6, 7, 6, 3, 2, 0, 2, 3, 0, KFAC_PATCHES_GENERAL);
    gs[5] = tu_geom(2, 8, 7, 2, 5, 2, 1, 1, 1, 1, KFAC_PATCHES_GENERAL);
    gs[6] = tu_geom(4, 6, 5, 4, 3, 2, 0, 1, 2, 0, KFAC_PATCHES_GENERAL);
    gs[7] = tu_geom(2, 4, 6, 4, 5, 1, 2, 1, 2, 1, KFAC_PATCHES_GENERAL);
    *count = 8;
    return gs;
}

static double max_diag(const double *X, int n)
{
    double m = 0.0;
    for (int i = 0; i < n; i++)
        if (fabs(X[i * n + i]) > m)
            m = fabs(X[i * n + i]);
    return m;
}

/* Library factors of one group vs expected, tolerance scaled by the largest
 * diagonal entry (see TOL_STATS). */
static void check_group_factors(const kfac_block *b, int group, int kb, int n_g,
                                const double *A_exp, const double *G_exp, double tol,
                                const char *what)
{
    double *A = naive_alloc((size_t)kb * kb, sizeof(double));
    double *G = naive_alloc((size_t)n_g * n_g, sizeof(double));
    char name[160];
    assert_int_equal(kfac_block_get_factors(b, group, A, G), KFAC_OK);
    snprintf(name, sizeof name, "%s A (group %d)", what, group);
    assert_close_arrays(A, A_exp, (size_t)kb * kb, tol * max_diag(A_exp, kb), tol, name);
    snprintf(name, sizeof name, "%s G (group %d)", what, group);
    assert_close_arrays(G, G_exp, (size_t)n_g * n_g, tol * max_diag(G_exp, n_g), tol, name);
    free(A);
    free(G);
}

/* Checks every group of a conv block against the brute-force factors. */
static void check_conv_vs_naive(const kfac_block *b, const kfac_conv_geom *g, const float *x,
                                const float *d, int M, const char *what)
{
    int kb, n_g;
    naive_conv_dims(g, NULL, &kb, &n_g, NULL, NULL, NULL);
    double *A = naive_alloc((size_t)kb * kb, sizeof(double));
    double *G = naive_alloc((size_t)n_g * n_g, sizeof(double));
    for (int j = 0; j < g->groups; j++) {
        naive_conv_factors(g, x, d, M, j, A, G);
        check_group_factors(b, j, kb, n_g, A, G, TOL_STATS, what);
    }
    free(A);
    free(G);
}

/* Two blocks' factors against each other, group by group. */
static void check_same_factors(const kfac_block *b1, const kfac_block *b2, int groups, int kb,
                               int n_g, const char *what)
{
    double *A = naive_alloc((size_t)kb * kb, sizeof(double));
    double *G = naive_alloc((size_t)n_g * n_g, sizeof(double));
    for (int j = 0; j < groups; j++) {
        assert_int_equal(kfac_block_get_factors(b2, j, A, G), KFAC_OK);
        check_group_factors(b1, j, kb, n_g, A, G, TOL_SAME_SUMS, what);
    }
    free(A);
    free(G);
}

/* The reference im2col itself, on a case small enough to do by hand: a 3x3
 * single-channel image 1..9, 3x3 kernel, pad 1, stride 2 -> 2x2 outputs at
 * input centres (0,0), (0,2), (2,0), (2,2). */
static void test_naive_im2col_by_hand(void **state)
{
    (void)state;
    kfac_conv_geom g = tu_geom(1, 3, 3, 1, 3, 2, 1, 1, 1, 0, KFAC_PATCHES_GENERAL);
    float x[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    double cols[9 * 4];
    naive_im2col(x, &g, 0, cols);
    const double centre[4] = {1, 3, 7, 9};     /* tap (1,1) */
    const double corner[4] = {0, 0, 0, 5};     /* tap (0,0): up-left of each centre */
    const double right[4] = {2, 0, 8, 0};      /* tap (1,2) */
    assert_close_arrays(cols + 4 * 4, centre, 4, 0, 0, "tap(1,1)");
    assert_close_arrays(cols + 0 * 4, corner, 4, 0, 0, "tap(0,0)");
    assert_close_arrays(cols + 5 * 4, right, 4, 0, 0, "tap(1,2)");
    /* dilation 2, pad 2, size 3 on the same image: a single output at centre
     * (0,0) of the padded grid reading rows/cols -2, 0, 2 */
    g = tu_geom(1, 3, 3, 1, 3, 1, 2, 2, 1, 0, KFAC_PATCHES_GENERAL);
    int T;
    naive_conv_dims(&g, NULL, NULL, NULL, &T, NULL, NULL);
    assert_int_equal(T, 9);
    double c2[9 * 9];
    naive_im2col(x, &g, 0, c2);
    /* output (1,1) (t = 4) reads rows/cols 1-2+2*kh = -1, 1, 3: only tap (1,1)
     * (row 4) is inside the image */
    const double t4[9] = {0, 0, 0, 0, 5, 0, 0, 0, 0};
    double got[9];
    for (int r = 0; r < 9; r++)
        got[r] = c2[r * 9 + 4];
    assert_close_arrays(got, t4, 9, 0, 0, "dilated taps of output (1,1)");
}

/* GENERAL path on every geometry: info fields, capture spec, factors. */
static void test_conv_factors_general(void **state)
{
    (void)state;
    int ng_count;
    const kfac_conv_geom *gs = geometries(&ng_count);
    naive_rng rng;
    naive_rng_seed(&rng, 1001);
    for (int gi = 0; gi < ng_count; gi++) {
        const kfac_conv_geom *g = &gs[gi];
        int k, kb, n_g, T, oh, ow, M = 3;
        naive_conv_dims(g, &k, &kb, &n_g, &T, &oh, &ow);
        kfac_block *b = tu_conv_block(g, NULL);

        kfac_block_info info;
        assert_int_equal(kfac_block_info_get(b, &info), KFAC_OK);
        assert_int_equal(info.is_conv, 1);
        assert_int_equal(info.groups, g->groups);
        assert_int_equal(info.n_g, n_g);
        assert_int_equal(info.k, k);
        assert_int_equal(info.kb, kb);
        assert_int_equal(info.T, T);
        assert_int_equal(info.out_h, oh);
        assert_int_equal(info.out_w, ow);
        assert_int_equal(info.nparams, (size_t)g->groups * n_g * kb);
        assert_true(info.bytes > 0);

        kfac_capture_spec spec;
        assert_int_equal(kfac_block_tensors_to_compute_grads(b, &spec), KFAC_OK);
        assert_int_equal(spec.input_floats, (size_t)g->c * g->h * g->w);
        assert_int_equal(spec.output_grad_floats, (size_t)g->n * T);
        if (g->size > 1)
            assert_int_equal(spec.needs_patches, 1);

        tu_batch bt;
        tu_batch_conv(&bt, g, M, &rng, 1.0, 0.5);
        assert_int_equal(tu_feed_update_cov(b, bt.x, bt.d, M, 0.95), KFAC_OK);
        char what[64];
        snprintf(what, sizeof what, "geometry %d GENERAL", gi);
        check_conv_vs_naive(b, g, bt.x, bt.d, M, what);
        kfac_block_free(b);
        tu_batch_free(&bt);
    }
}

/* IMAGE (Darknet im2col_cpu) path on every dilation-1 geometry: equal to the
 * brute force and to the GENERAL path fed the same data. */
static void test_conv_factors_image_vs_general(void **state)
{
    (void)state;
    int ng_count, tested = 0;
    const kfac_conv_geom *gs = geometries(&ng_count);
    naive_rng rng;
    naive_rng_seed(&rng, 1002);
    for (int gi = 0; gi < ng_count; gi++) {
        if (gs[gi].dilation != 1)
            continue;
        kfac_conv_geom gg = gs[gi], gim = gs[gi];
        gim.patches = KFAC_PATCHES_IMAGE;
        kfac_block *bg = tu_conv_block(&gg, NULL), *bi = tu_conv_block(&gim, NULL);
        tu_batch bt;
        tu_batch_conv(&bt, &gg, 2, &rng, 2.0, 1.0);
        tu_feed(bg, 0, bt.x, bt.d, bt.M);
        tu_feed(bi, 0, bt.x, bt.d, bt.M);
        assert_int_equal(kfac_block_update_cov(bg, 0.5), KFAC_OK);
        assert_int_equal(kfac_block_update_cov(bi, 0.5), KFAC_OK);
        char what[64];
        snprintf(what, sizeof what, "geometry %d IMAGE", gi);
        check_conv_vs_naive(bi, &gim, bt.x, bt.d, bt.M, what);
        snprintf(what, sizeof what, "geometry %d IMAGE vs GENERAL", gi);
        check_same_factors(bi, bg, gg.groups, bt.kb, bt.n_g, what);
        kfac_block_free(bg);
        kfac_block_free(bi);
        tu_batch_free(&bt);
        tested++;
    }
    assert_true(tested >= 4);
}

/* A 1x1 conv through all three paths (with groups and bias, then without). */
static void test_pointwise_three_paths(void **state)
{
    (void)state;
    naive_rng rng;
    naive_rng_seed(&rng, 1003);
    for (int variant = 0; variant < 2; variant++) {
        int groups = variant ? 1 : 2, bias = variant ? 0 : 1;
        kfac_patches paths[3] = {KFAC_PATCHES_GENERAL, KFAC_PATCHES_IMAGE, KFAC_PATCHES_POINTWISE};
        kfac_block *bl[3];
        kfac_conv_geom g[3];
        int M = 4;
        for (int p = 0; p < 3; p++) {
            g[p] = tu_geom(6, 5, 4, 4, 1, 1, 0, 1, groups, bias, paths[p]);
            bl[p] = tu_conv_block(&g[p], NULL);
        }
        tu_batch bt;
        tu_batch_conv(&bt, &g[0], M, &rng, 1.0, 1.0);
        kfac_capture_spec spec;
        assert_int_equal(kfac_block_tensors_to_compute_grads(bl[2], &spec), KFAC_OK);
        assert_int_equal(spec.needs_patches, 0);
        for (int p = 0; p < 3; p++) {
            assert_int_equal(tu_feed_update_cov(bl[p], bt.x, bt.d, M, 0.9), KFAC_OK);
            check_conv_vs_naive(bl[p], &g[p], bt.x, bt.d, M, p == 0 ? "1x1 GENERAL"
                                                     : p == 1 ? "1x1 IMAGE" : "1x1 POINTWISE");
        }
        check_same_factors(bl[2], bl[0], groups, bt.kb, bt.n_g, "POINTWISE vs GENERAL");
        check_same_factors(bl[1], bl[0], groups, bt.kb, bt.n_g, "IMAGE vs GENERAL");
        for (int p = 0; p < 3; p++)
            kfac_block_free(bl[p]);
        tu_batch_free(&bt);
    }
}

/* accumulate_patches / accumulate_output_grads_group per example and group
 * (the zero-copy calls of Darknet's glue) == the batch calls == brute force. */
static void test_per_example_calls_equal_batch(void **state)
{
    (void)state;
    naive_rng rng;
    naive_rng_seed(&rng, 1004);
    kfac_conv_geom cases[3] = {
        tu_geom(4, 7, 6, 6, 3, 2, 1, 1, 2, 1, KFAC_PATCHES_GENERAL),
        tu_geom(4, 7, 6, 6, 3, 2, 1, 1, 2, 1, KFAC_PATCHES_IMAGE),
        tu_geom(6, 3, 5, 6, 1, 1, 0, 1, 3, 1, KFAC_PATCHES_POINTWISE),
    };
    for (int ci = 0; ci < 3; ci++) {
        const kfac_conv_geom *g = &cases[ci];
        tu_batch bt;
        tu_batch_conv(&bt, g, 3, &rng, 1.0, 1.0);
        const int k = bt.k, n_g = bt.n_g, T = bt.T;
        kfac_block *batch = tu_conv_block(g, NULL), *each = tu_conv_block(g, NULL);
        tu_feed(batch, 0, bt.x, bt.d, bt.M);

        double *colsd = naive_alloc((size_t)k * T, sizeof(double));
        float *cols = naive_alloc((size_t)k * T, sizeof(float));
        for (int i = 0; i < bt.M; i++)
            for (int j = 0; j < g->groups; j++) {
                if (g->patches == KFAC_PATCHES_POINTWISE) {
                    /* 1x1: the group's channels of the raw input are the patches */
                    memcpy(cols, bt.x + i * bt.x_each + (size_t)j * k * T,
                           sizeof(float) * k * T);
                } else {
                    naive_im2col(bt.x + i * bt.x_each, g, j, colsd);
                    for (int e = 0; e < k * T; e++)
                        cols[e] = (float)colsd[e];
                }
                assert_int_equal(kfac_block_accumulate_patches(each, 0, j, cols), KFAC_OK);
                assert_int_equal(kfac_block_accumulate_output_grads_group(
                                     each, 0, j, bt.d + i * bt.d_each + (size_t)j * n_g * T),
                                 KFAC_OK);
            }
        assert_int_equal(kfac_block_update_cov(batch, 0.95), KFAC_OK);
        assert_int_equal(kfac_block_update_cov(each, 0.95), KFAC_OK);
        check_conv_vs_naive(each, g, bt.x, bt.d, bt.M, "per-example calls");
        check_same_factors(each, batch, g->groups, bt.kb, n_g, "per-example vs batch");
        kfac_block_free(batch);
        kfac_block_free(each);
        free(colsd);
        free(cols);
        tu_batch_free(&bt);
    }
}

static void test_fc_factors(void **state)
{
    (void)state;
    naive_rng rng;
    naive_rng_seed(&rng, 1005);
    for (int bias = 0; bias < 2; bias++) {
        int in = 7, out = 5, M = 6, kb = in + bias;
        kfac_block *b = NULL;
        assert_int_equal(kfac_fc_block_create(in, out, bias, NULL, &b), KFAC_OK);
        kfac_block_info info;
        assert_int_equal(kfac_block_info_get(b, &info), KFAC_OK);
        assert_int_equal(info.is_conv, 0);
        assert_int_equal(info.groups, 1);
        assert_int_equal(info.n_g, out);
        assert_int_equal(info.k, in);
        assert_int_equal(info.kb, kb);
        assert_int_equal(info.T, 1);
        assert_int_equal(info.nparams, (size_t)out * kb);
        kfac_capture_spec spec;
        assert_int_equal(kfac_block_tensors_to_compute_grads(b, &spec), KFAC_OK);
        assert_int_equal(spec.input_floats, (size_t)in);
        assert_int_equal(spec.output_grad_floats, (size_t)out);
        assert_int_equal(spec.needs_patches, 0);

        float x[6 * 7], d[6 * 5];
        naive_fill_float(&rng, x, sizeof x / sizeof *x, 1.5);
        naive_fill_float(&rng, d, sizeof d / sizeof *d, 0.7);
        assert_int_equal(tu_feed_update_cov(b, x, d, M, 0.95), KFAC_OK);
        double A[8 * 8], G[5 * 5];
        naive_fc_factors(in, out, bias, x, d, M, A, G);
        check_group_factors(b, 0, kb, out, A, G, TOL_STATS, bias ? "fc bias" : "fc no bias");
        kfac_block_free(b);
    }
}

/* Sem. 2: first estimate taken as is, then C <- e*C + (1-e)*C_new, for a
 * sequence of steps with different decays; sums cleared after each fold. */
static void test_ema_over_several_updates(void **state)
{
    (void)state;
    naive_rng rng;
    naive_rng_seed(&rng, 1006);
    kfac_conv_geom g = tu_geom(4, 5, 5, 4, 3, 1, 1, 1, 2, 1, KFAC_PATCHES_GENERAL);
    tu_batch bt;
    tu_batch_conv(&bt, &g, 2, NULL, 0, 0);
    const int kb = bt.kb, n_g = bt.n_g;
    double *A = naive_alloc((size_t)g.groups * kb * kb, sizeof(double));
    double *G = naive_alloc((size_t)g.groups * n_g * n_g, sizeof(double));
    double *An = naive_alloc((size_t)kb * kb, sizeof(double));
    double *Gn = naive_alloc((size_t)n_g * n_g, sizeof(double));
    kfac_block *b = tu_conv_block(&g, NULL);
    double *Ag = naive_alloc((size_t)kb * kb, sizeof(double));
    assert_int_equal(kfac_block_get_factors(b, 0, Ag, NULL), KFAC_ERR_STATE);

    const double decays[5] = {0.8, 0.8, 0.5, 0.0, 0.95};
    for (int step = 0; step < 5; step++) {
        /* data with a step-dependent scale so a stale or missing fold shows */
        tu_batch_fill(&bt, &rng, 1.0 + step, 0.5 + 0.25 * step);
        assert_int_equal(tu_feed_update_cov(b, bt.x, bt.d, bt.M, decays[step]), KFAC_OK);
        double e = decays[step];
        for (int j = 0; j < g.groups; j++) {
            naive_conv_factors(&g, bt.x, bt.d, bt.M, j, An, Gn);
            double *Aj = A + (size_t)j * kb * kb, *Gj = G + (size_t)j * n_g * n_g;
            for (int i = 0; i < kb * kb; i++)
                Aj[i] = step == 0 ? An[i] : e * Aj[i] + (1 - e) * An[i];
            for (int i = 0; i < n_g * n_g; i++)
                Gj[i] = step == 0 ? Gn[i] : e * Gj[i] + (1 - e) * Gn[i];
            char what[64];
            snprintf(what, sizeof what, "EMA step %d", step);
            check_group_factors(b, j, kb, n_g, Aj, Gj, TOL_STATS, what);
        }
    }
    kfac_block_free(b);
    tu_batch_free(&bt);
    free(A); free(G); free(An); free(Gn); free(Ag);
}

/* V3: 1x1 conv on two 1x1 single-channel examples with values 1 and 2. */
static void test_vector_v3(void **state)
{
    (void)state;
    for (int bias = 0; bias < 2; bias++) {
        kfac_conv_geom g = tu_geom(1, 1, 1, 1, 1, 1, 0, 1, 1, bias, KFAC_PATCHES_GENERAL);
        kfac_block *b = tu_conv_block(&g, NULL);
        const float x[2] = {1, 2}, d[2] = {0.5f, -1};
        assert_int_equal(tu_feed_update_cov(b, x, d, 2, 0.95), KFAC_OK);
        double A[4], G[1];
        assert_int_equal(kfac_block_get_factors(b, 0, A, G), KFAC_OK);
        const double A_bias[4] = {2.5, 1.5, 1.5, 1.0}, A_nobias[1] = {2.5}, G_exp[1] = {0.625};
        if (bias)
            assert_close_arrays(A, A_bias, 4, 1e-12, 1e-7, "V3 A with bias");
        else
            assert_close_arrays(A, A_nobias, 1, 1e-12, 1e-7, "V3 A without bias");
        assert_close_arrays(G, G_exp, 1, 1e-12, 1e-7, "V3 G");
        kfac_block_free(b);
    }
}

/* V4: eight location vectors [1,2], ..., [15,16] of a 2-filter layer (one
 * example, T = 8): G_new = [[85,93],[93,102]] taken as is on a fresh block;
 * from C = I with decay 0.5: [[43,46.5],[46.5,51.5]]. */
static void test_vector_v4(void **state)
{
    (void)state;
    kfac_conv_geom g = tu_geom(1, 2, 4, 2, 1, 1, 0, 1, 1, 0, KFAC_PATCHES_GENERAL);
    float d[16], x[8];
    for (int t = 0; t < 8; t++) {
        d[0 * 8 + t] = (float)(2 * t + 1); /* filter 0 at location t */
        d[1 * 8 + t] = (float)(2 * t + 2); /* filter 1 */
        x[t] = 1.0f;
    }
    const double G_first[4] = {85, 93, 93, 102}, G_ema[4] = {43, 46.5, 46.5, 51.5};
    double G[4], A[1];

    kfac_block *b = tu_conv_block(&g, NULL);
    assert_int_equal(tu_feed_update_cov(b, x, d, 1, 0.5), KFAC_OK);
    assert_int_equal(kfac_block_get_factors(b, 0, NULL, G), KFAC_OK);
    assert_close_arrays(G, G_first, 4, 1e-9, 1e-9, "V4 first estimate");
    kfac_block_free(b);

    b = tu_conv_block(&g, NULL);
    const double I1[1] = {1}, I2[4] = {1, 0, 0, 1};
    assert_int_equal(kfac_block_set_factors(b, 0, I1, I2), KFAC_OK);
    assert_int_equal(tu_feed_update_cov(b, x, d, 1, 0.5), KFAC_OK);
    assert_int_equal(kfac_block_get_factors(b, 0, A, G), KFAC_OK);
    assert_close_arrays(G, G_ema, 4, 1e-9, 1e-9, "V4 EMA from I");
    const double A_exp[1] = {1.0}; /* 0.5*1 + 0.5*1 */
    assert_close_arrays(A, A_exp, 1, 1e-12, 1e-12, "V4 A");
    kfac_block_free(b);
}

/* Sem. 2: statistics of several towers are those of the concatenated batch,
 * whatever the split (inputs and gradients are split differently on purpose). */
static void test_towers_equal_concatenated_batch(void **state)
{
    (void)state;
    naive_rng rng;
    naive_rng_seed(&rng, 1007);
    kfac_conv_geom g = tu_geom(4, 6, 6, 4, 3, 2, 1, 1, 2, 1, KFAC_PATCHES_GENERAL);
    tu_batch bt;
    tu_batch_conv(&bt, &g, 5, &rng, 1.0, 1.0);
    const float *x = bt.x, *d = bt.d;
    const size_t xs = bt.x_each, ds = bt.d_each;

    for (int ntow = 2; ntow <= 3; ntow++) {
        kfac_block *one = tu_conv_block(&g, NULL), *tw = tu_conv_block(&g, NULL);
        assert_int_equal(kfac_block_num_registered_towers(tw), 1);
        for (int t = 1; t < ntow; t++)
            assert_int_equal(kfac_block_register_additional_tower(tw), KFAC_OK);
        assert_int_equal(kfac_block_num_registered_towers(tw), ntow);
        assert_int_equal(kfac_block_num_registered_towers(one), 1);

        /* out-of-range towers are rejected and change nothing */
        assert_int_equal(kfac_block_accumulate_inputs(tw, ntow, x, 1), KFAC_ERR_INVALID_ARG);
        assert_int_equal(kfac_block_accumulate_inputs(tw, -1, x, 1), KFAC_ERR_INVALID_ARG);
        assert_int_equal(kfac_block_accumulate_output_grads(tw, ntow, d, 1), KFAC_ERR_INVALID_ARG);
        assert_int_equal(kfac_block_accumulate_output_grads_group(tw, ntow, 0, d),
                         KFAC_ERR_INVALID_ARG);
        assert_int_equal(kfac_block_accumulate_inputs(one, 1, x, 1), KFAC_ERR_INVALID_ARG);

        tu_feed(one, 0, x, d, bt.M);
        /* inputs: examples {0,1} {2} {3,4} (2 towers: {0,1} {2,3,4});
         * gradients: {0} {1,2,3} {4} (2 towers: {0,1,2,3} {4}) */
        if (ntow == 3) {
            assert_int_equal(kfac_block_accumulate_inputs(tw, 0, x, 2), KFAC_OK);
            assert_int_equal(kfac_block_accumulate_inputs(tw, 1, x + 2 * xs, 1), KFAC_OK);
            assert_int_equal(kfac_block_accumulate_inputs(tw, 2, x + 3 * xs, 2), KFAC_OK);
            assert_int_equal(kfac_block_accumulate_output_grads(tw, 0, d, 1), KFAC_OK);
            assert_int_equal(kfac_block_accumulate_output_grads(tw, 1, d + ds, 3), KFAC_OK);
            assert_int_equal(kfac_block_accumulate_output_grads(tw, 2, d + 4 * ds, 1), KFAC_OK);
        } else {
            assert_int_equal(kfac_block_accumulate_inputs(tw, 0, x, 2), KFAC_OK);
            assert_int_equal(kfac_block_accumulate_inputs(tw, 1, x + 2 * xs, 3), KFAC_OK);
            assert_int_equal(kfac_block_accumulate_output_grads(tw, 0, d, 4), KFAC_OK);
            assert_int_equal(kfac_block_accumulate_output_grads(tw, 1, d + 4 * ds, 1), KFAC_OK);
        }
        assert_int_equal(kfac_block_update_cov(one, 0.9), KFAC_OK);
        assert_int_equal(kfac_block_update_cov(tw, 0.9), KFAC_OK);
        check_conv_vs_naive(tw, &g, x, d, bt.M, "towers vs brute force");
        check_same_factors(tw, one, g.groups, bt.kb, bt.n_g, "towers vs one batch");
        kfac_block_free(one);
        kfac_block_free(tw);
    }
    tu_batch_free(&bt);
}

/* Connected layer, batch size 1: the K-FAC block is exactly the per-example
 * Fisher vec(g) vec(g)^T with g = d a^T, a = [x; 1]. */
static void test_fc_batch1_exact_fisher(void **state)
{
    (void)state;
    naive_rng rng;
    naive_rng_seed(&rng, 1008);
    int in = 5, out = 3, kb = in + 1, np = out * kb;
    float x[5], d[3];
    naive_fill_float(&rng, x, 5, 1.0);
    naive_fill_float(&rng, d, 3, 1.0);
    double gv[18], Fexp[18 * 18], F[18 * 18];
    for (int r = 0; r < out; r++)
        for (int c = 0; c < kb; c++)
            gv[r * kb + c] = (double)d[r] * (c < in ? (double)x[c] : 1.0);
    for (int i = 0; i < np; i++)
        for (int j = 0; j < np; j++)
            Fexp[i * np + j] = gv[i] * gv[j];
    kfac_block *b = tu_fc_block(in, out, 1, NULL);
    assert_int_equal(tu_feed_update_cov(b, x, d, 1, 0.95), KFAC_OK);
    assert_int_equal(kfac_block_full_fisher_block(b, F), KFAC_OK);
    /* one product of two floats per factor entry: a few ulps */
    assert_close_arrays(F, Fexp, (size_t)np * np, 1e-7 * kfac_tol_max_abs(Fexp, np * np), 1e-6,
                        "batch-1 Fisher");
    kfac_block_free(b);
}

/* The dense block of a grouped conv with bias from data: T*kron(G_j, A_j),
 * block-diagonal, in parameter-vector order. */
static void test_full_fisher_block_conv(void **state)
{
    (void)state;
    naive_rng rng;
    naive_rng_seed(&rng, 1009);
    kfac_conv_geom g = tu_geom(4, 5, 4, 4, 3, 2, 1, 1, 2, 1, KFAC_PATCHES_GENERAL);
    tu_batch bt;
    tu_batch_conv(&bt, &g, 3, &rng, 1.0, 1.0);
    const int kb = bt.kb, n_g = bt.n_g, np = g.groups * n_g * kb;
    double *A = naive_alloc((size_t)g.groups * kb * kb, sizeof(double));
    double *G = naive_alloc((size_t)g.groups * n_g * n_g, sizeof(double));
    for (int j = 0; j < g.groups; j++)
        naive_conv_factors(&g, bt.x, bt.d, bt.M, j, A + (size_t)j * kb * kb,
                           G + (size_t)j * n_g * n_g);
    double *Fexp = naive_alloc((size_t)np * np, sizeof(double));
    double *F = naive_alloc((size_t)np * np, sizeof(double));
    naive_full_fisher(g.groups, n_g, kb, bt.T, A, G, Fexp);
    kfac_block *b = tu_conv_block(&g, NULL);
    assert_int_equal(tu_feed_update_cov(b, bt.x, bt.d, bt.M, 0.95), KFAC_OK);
    assert_int_equal(kfac_block_full_fisher_block(b, F), KFAC_OK);
    /* A and G each carry TOL_STATS; their product about twice that */
    assert_close_arrays(F, Fexp, (size_t)np * np,
                        2 * TOL_STATS * kfac_tol_max_abs(Fexp, (size_t)np * np), 2 * TOL_STATS,
                        "full_fisher_block");
    kfac_block_free(b);
    tu_batch_free(&bt);
    free(A); free(G); free(Fexp); free(F);
}

/* update_cov bookkeeping: nothing accumulated, or different example counts
 * for A and G, is a state error; NaN in a captured gradient is NOT_FINITE,
 * leaves the factors as they were and clears the sums (the next good step
 * folds only its own data). */
static void test_update_cov_state_and_non_finite(void **state)
{
    (void)state;
    naive_rng rng;
    naive_rng_seed(&rng, 1010);
    kfac_conv_geom g = tu_geom(2, 4, 4, 2, 3, 1, 1, 1, 1, 1, KFAC_PATCHES_GENERAL);
    tu_batch bt;
    tu_batch_conv(&bt, &g, 2, &rng, 1.0, 1.0);
    const int kb = bt.kb, n_g = bt.n_g;
    kfac_block *b = tu_conv_block(&g, NULL);

    assert_int_equal(kfac_block_update_cov(b, 0.9), KFAC_ERR_STATE); /* M == 0 */
    assert_int_equal(kfac_block_accumulate_inputs(b, 0, bt.x, 2), KFAC_OK);
    assert_int_equal(kfac_block_accumulate_output_grads(b, 0, bt.d, 1), KFAC_OK);
    assert_int_equal(kfac_block_update_cov(b, 0.9), KFAC_ERR_STATE); /* 2 vs 1 */
    kfac_block_clear_stats(b);
    assert_int_equal(kfac_block_update_cov(b, 0.9), KFAC_ERR_STATE); /* cleared */

    double *A0 = naive_alloc((size_t)kb * kb, sizeof(double));
    double *G0 = naive_alloc((size_t)n_g * n_g, sizeof(double));
    double *A1 = naive_alloc((size_t)kb * kb, sizeof(double));
    double *G1 = naive_alloc((size_t)n_g * n_g, sizeof(double));
    assert_int_equal(tu_feed_update_cov(b, bt.x, bt.d, bt.M, 0.9), KFAC_OK);
    naive_conv_factors(&g, bt.x, bt.d, bt.M, 0, A0, G0);
    check_group_factors(b, 0, kb, n_g, A0, G0, TOL_STATS, "after clear_stats");
    assert_int_equal(kfac_block_get_factors(b, 0, A0, G0), KFAC_OK);

    float *dn = naive_alloc(bt.d_len, sizeof(float));
    memcpy(dn, bt.d, sizeof(float) * bt.d_len);
    dn[bt.d_len / 2] = NAN;
    assert_int_equal(tu_feed_update_cov(b, bt.x, dn, bt.M, 0.9), KFAC_ERR_NOT_FINITE);
    assert_int_equal(kfac_block_get_factors(b, 0, A1, G1), KFAC_OK);
    assert_memory_equal(A1, A0, sizeof(double) * kb * kb);
    assert_memory_equal(G1, G0, sizeof(double) * n_g * n_g);

    /* Inf in an input likewise */
    float *xn = naive_alloc(bt.x_len, sizeof(float));
    memcpy(xn, bt.x, sizeof(float) * bt.x_len);
    xn[3] = INFINITY;
    assert_int_equal(tu_feed_update_cov(b, xn, bt.d, bt.M, 0.9), KFAC_ERR_NOT_FINITE);
    assert_int_equal(kfac_block_get_factors(b, 0, A1, G1), KFAC_OK);
    assert_memory_equal(A1, A0, sizeof(double) * kb * kb);
    assert_memory_equal(G1, G0, sizeof(double) * n_g * n_g);

    /* sums were cleared: this fold sees only the new (good) batch */
    naive_fill_float(&rng, bt.x, bt.x_len, 2.0);
    assert_int_equal(tu_feed_update_cov(b, bt.x, bt.d, bt.M, 0.5), KFAC_OK);
    naive_conv_factors(&g, bt.x, bt.d, bt.M, 0, A1, G1);
    for (int i = 0; i < kb * kb; i++) A1[i] = 0.5 * A0[i] + 0.5 * A1[i];
    for (int i = 0; i < n_g * n_g; i++) G1[i] = 0.5 * G0[i] + 0.5 * G1[i];
    check_group_factors(b, 0, kb, n_g, A1, G1, TOL_STATS, "after rejected updates");

    /* a fresh block whose first statistics are not finite has no factors */
    kfac_block *b2 = tu_conv_block(&g, NULL);
    assert_int_equal(tu_feed_update_cov(b2, bt.x, dn, bt.M, 0.9), KFAC_ERR_NOT_FINITE);
    assert_int_equal(kfac_block_get_factors(b2, 0, A1, G1), KFAC_ERR_STATE);
    kfac_block_free(b2);

    kfac_block_free(b);
    tu_batch_free(&bt);
    free(dn); free(xn); free(A0); free(G0); free(A1); free(G1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_naive_im2col_by_hand),
        cmocka_unit_test(test_conv_factors_general),
        cmocka_unit_test(test_conv_factors_image_vs_general),
        cmocka_unit_test(test_pointwise_three_paths),
        cmocka_unit_test(test_per_example_calls_equal_batch),
        cmocka_unit_test(test_fc_factors),
        cmocka_unit_test(test_ema_over_several_updates),
        cmocka_unit_test(test_vector_v3),
        cmocka_unit_test(test_vector_v4),
        cmocka_unit_test(test_towers_equal_concatenated_batch),
        cmocka_unit_test(test_fc_batch1_exact_fisher),
        cmocka_unit_test(test_full_fisher_block_conv),
        cmocka_unit_test(test_update_cov_state_and_non_finite),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
