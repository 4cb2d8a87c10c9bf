/*
 * Cost of K-FAC's inverse paths on the demo model's layers (`make bench`).
 *
 * For each K-FAC layer of cfg/fashion_kfac.cfg (the geometries are repeated
 * here so the benchmark needs no Darknet), builds factors from random
 * statistics the way training does, then times update_inverses with factored
 * damping (Cholesky) and exact damping (eigendecomposition), and one
 * multiply_inverse, each the median of several repetitions. Prints one line
 * per layer and path; the numbers say where inverse time goes, not whether a
 * test passes.
 */
#include "kfac.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static float frand(unsigned *s)
{
    *s = *s * 1664525u + 1013904223u;
    return (float)(*s >> 8) / 16777216.0f - 0.5f;
}

#define REPS 5

typedef struct {
    const char *name;
    int is_conv;
    kfac_conv_geom g; /* conv */
    int inputs, outputs; /* connected */
} layer_desc;

/* The demo model: 28x28x3 -> conv32 3x3 -> max -> conv32 3x3 -> max ->
 * connected 128 -> connected 10, biases in every block (no batch norm). */
static const layer_desc layers[] = {
    {"0 conv 3->32 3x3 @28x28", 1, {3, 28, 28, 32, 3, 1, 1, 1, 1, 1, KFAC_PATCHES_IMAGE}, 0, 0},
    {"2 conv 32->32 3x3 @14x14", 1, {32, 14, 14, 32, 3, 1, 1, 1, 1, 1, KFAC_PATCHES_IMAGE}, 0, 0},
    {"4 connected 1568->128", 0, {0}, 1568, 128},
    {"5 connected 128->10", 0, {0}, 128, 10},
};

static int bench(const layer_desc *L, kfac_damping_type type, kfac_precision prec)
{
    kfac_config cfg;
    kfac_config_default(&cfg);
    cfg.damping_type = type;
    cfg.precond_precision = prec;
    kfac_block *b = NULL;
    kfac_status s = L->is_conv ? kfac_conv_block_create(&L->g, &cfg, &b)
                               : kfac_fc_block_create(L->inputs, L->outputs, 1, &cfg, &b);
    if (s != KFAC_OK) { fprintf(stderr, "%s: create: %s\n", L->name, kfac_status_str(s)); return 1; }
    kfac_block_info info;
    kfac_capture_spec spec;
    kfac_block_info_get(b, &info);
    kfac_block_tensors_to_compute_grads(b, &spec);
    const int batch = 32;
    float *x = malloc(sizeof(float) * spec.input_floats * batch);
    float *d = malloc(sizeof(float) * spec.output_grad_floats * batch);
    float *v = malloc(sizeof(float) * info.nparams), *out = malloc(sizeof(float) * info.nparams);
    unsigned seed = 7;
    for (size_t i = 0; i < spec.input_floats * batch; ++i) x[i] = frand(&seed);
    for (size_t i = 0; i < spec.output_grad_floats * batch; ++i) d[i] = frand(&seed);
    for (size_t i = 0; i < info.nparams; ++i) v[i] = frand(&seed);
    int n_g = info.n_g, kb = info.kb, groups = info.groups;
    size_t nw = (size_t)groups * n_g * info.k;

    double t_stats = now_s();
    kfac_block_accumulate_inputs(b, 0, x, batch);
    kfac_block_accumulate_output_grads(b, 0, d, batch);
    kfac_block_update_cov(b, 0.95);
    t_stats = now_s() - t_stats;
    kfac_block_instantiate_factors(b, cfg.damping);
    kfac_block_register_inverse(b);

    double ti[REPS], tm[REPS];
    for (int r = 0; r < REPS; ++r) {
        double t0 = now_s();
        if ((s = kfac_block_update_inverses(b)) != KFAC_OK) {
            fprintf(stderr, "%s: update_inverses: %s\n", L->name, kfac_status_str(s));
            return 1;
        }
        double t1 = now_s();
        kfac_block_multiply_inverse(b, v, v + nw, out, out + nw); /* every block has a bias */
        tm[r] = now_s() - t1;
        ti[r] = t1 - t0;
    }
    qsort(ti, REPS, sizeof ti[0], cmp_double);
    qsort(tm, REPS, sizeof tm[0], cmp_double);
    printf("  %-26s A %4dx%-4d G %3dx%-3d %-15s inverse %9.3f ms  multiply_inverse %7.3f ms"
           "  (statistics, batch %d: %.3f ms)\n",
           L->name, kb, kb, n_g, n_g, type == KFAC_DAMPING_EXACT ? "exact"
                                      : prec == KFAC_PRECISION_DOUBLE ? "factored double"
                                                                      : "factored float",
           1e3 * ti[REPS / 2], 1e3 * tm[REPS / 2], batch, 1e3 * t_stats);
    free(x); free(d); free(v); free(out);
    kfac_block_free(b);
    return 0;
}

int main(void)
{
    int rc = 0;
    printf("inverse paths on the demo model's layers (median of %d):\n", REPS);
    for (size_t i = 0; i < sizeof layers / sizeof layers[0]; ++i) {
        rc |= bench(&layers[i], KFAC_DAMPING_FACTORED, KFAC_PRECISION_FLOAT);
        rc |= bench(&layers[i], KFAC_DAMPING_FACTORED, KFAC_PRECISION_DOUBLE);
        rc |= bench(&layers[i], KFAC_DAMPING_EXACT, KFAC_PRECISION_DOUBLE);
    }
    return rc;
}
