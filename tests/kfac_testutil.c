/*
 * Shared test fixtures (interface and conventions in kfac_testutil.h).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <cmocka.h>

#include "kfac_testutil.h"

/* ------------------------------------------------------------ blocks */

kfac_conv_geom tu_geom(int c, int h, int w, int n, int size, int stride, int pad, int dilation,
                       int groups, int bias, kfac_patches patches)
{
    kfac_conv_geom g;
    memset(&g, 0, sizeof g);
    g.c = c; g.h = h; g.w = w; g.n = n; g.size = size; g.stride = stride; g.pad = pad;
    g.dilation = dilation; g.groups = groups; g.bias = bias; g.patches = patches;
    return g;
}

kfac_config tu_config(kfac_damping_type type, kfac_precision precision)
{
    kfac_config cfg;
    kfac_config_default(&cfg);
    cfg.damping_type = type;
    cfg.precond_precision = precision;
    return cfg;
}

kfac_block *tu_conv_block(const kfac_conv_geom *g, const kfac_config *cfg)
{
    kfac_block *b = NULL;
    assert_int_equal(kfac_conv_block_create(g, cfg, &b), KFAC_OK);
    assert_non_null(b);
    return b;
}

kfac_block *tu_fc_block(int inputs, int outputs, int bias, const kfac_config *cfg)
{
    kfac_block *b = NULL;
    assert_int_equal(kfac_fc_block_create(inputs, outputs, bias, cfg, &b), KFAC_OK);
    assert_non_null(b);
    return b;
}

void tu_block_wrap(tu_block *s, kfac_block *b, kfac_damping_type type)
{
    kfac_block_info info;
    memset(s, 0, sizeof *s);
    assert_non_null(b);
    assert_int_equal(kfac_block_info_get(b, &info), KFAC_OK);
    s->b = b;
    s->type = type;
    s->groups = info.groups;
    s->n_g = info.n_g;
    s->k = info.k;
    s->kb = info.kb;
    s->T = info.T;
    s->bias = info.kb - info.k;
    s->np = (int)info.nparams;
    s->nw = (size_t)s->groups * s->n_g * s->k;
    s->nbias = s->bias ? (size_t)s->groups * s->n_g : 0;
    s->A = naive_alloc((size_t)s->groups * s->kb * s->kb, sizeof(double));
    s->G = naive_alloc((size_t)s->groups * s->n_g * s->n_g, sizeof(double));
}

static kfac_damping_type cfg_type(const kfac_config *cfg)
{
    kfac_config def;
    if (cfg)
        return cfg->damping_type;
    kfac_config_default(&def);
    return def.damping_type;
}

void tu_block_conv(tu_block *s, const kfac_conv_geom *g, const kfac_config *cfg)
{
    tu_block_wrap(s, tu_conv_block(g, cfg), cfg_type(cfg));
}

void tu_block_fc(tu_block *s, int inputs, int outputs, int bias, const kfac_config *cfg)
{
    tu_block_wrap(s, tu_fc_block(inputs, outputs, bias, cfg), cfg_type(cfg));
}

void tu_block_free(tu_block *s)
{
    kfac_block_free(s->b);
    free(s->A);
    free(s->G);
    memset(s, 0, sizeof *s);
}

double *tu_block_A(const tu_block *s, int j)
{
    return s->A + (size_t)j * s->kb * s->kb;
}

double *tu_block_G(const tu_block *s, int j)
{
    return s->G + (size_t)j * s->n_g * s->n_g;
}

void tu_block_set_factors(tu_block *s)
{
    for (int j = 0; j < s->groups; j++)
        assert_int_equal(kfac_block_set_factors(s->b, j, tu_block_A(s, j), tu_block_G(s, j)),
                         KFAC_OK);
}

void tu_block_read_factors(tu_block *s)
{
    for (int j = 0; j < s->groups; j++)
        assert_int_equal(kfac_block_get_factors(s->b, j, tu_block_A(s, j), tu_block_G(s, j)),
                         KFAC_OK);
}

void tu_block_random_factors(tu_block *s, naive_rng *r, double a_scale, double a_step,
                             double g_scale, double g_step)
{
    for (int j = 0; j < s->groups; j++) {
        naive_random_spd(r, s->kb, a_scale + j * a_step, 0.3, tu_block_A(s, j));
        naive_random_spd(r, s->n_g, g_scale + j * g_step, 0.3, tu_block_G(s, j));
    }
    tu_block_set_factors(s);
}

void tu_block_register(tu_block *s, double lam, const double *exps, int nexp)
{
    assert_int_equal(kfac_block_instantiate_factors(s->b, lam), KFAC_OK);
    assert_int_equal(kfac_block_register_inverse(s->b), KFAC_OK);
    for (int i = 0; i < nexp; i++)
        assert_int_equal(kfac_block_register_matpower(s->b, exps[i]), KFAC_OK);
}

void tu_block_invert(tu_block *s, double lam)
{
    tu_block_register(s, lam, NULL, 0);
    assert_int_equal(kfac_block_update_inverses(s->b), KFAC_OK);
}

double *tu_block_dense_damped(const tu_block *s, double lam)
{
    double *D = naive_alloc((size_t)s->np * s->np, sizeof(double));
    naive_damped_block(s->type, s->groups, s->n_g, s->kb, s->T, s->A, s->G, lam, D);
    return D;
}

void tu_block_pack(const tu_block *s, const float *w, const float *bias, double *flat)
{
    naive_pack(s->groups, s->n_g, s->k, s->bias, w, bias, flat);
}

void tu_block_fill_params(const tu_block *s, naive_rng *r, double scale, float *w, float *bias,
                          double *flat)
{
    naive_fill_float(r, w, s->nw, scale);
    if (s->bias)
        naive_fill_float(r, bias, s->nbias, scale);
    tu_block_pack(s, w, bias, flat);
}

/* ------------------------------------------------------------ data */

void tu_batch_conv(tu_batch *bt, const kfac_conv_geom *g, int M, naive_rng *r, double x_scale,
                   double d_scale)
{
    memset(bt, 0, sizeof *bt);
    naive_conv_dims(g, &bt->k, &bt->kb, &bt->n_g, &bt->T, NULL, NULL);
    bt->M = M;
    bt->x_each = (size_t)g->c * g->h * g->w;
    bt->d_each = (size_t)g->n * bt->T;
    bt->x_len = (size_t)M * bt->x_each;
    bt->d_len = (size_t)M * bt->d_each;
    bt->x = naive_alloc(bt->x_len, sizeof(float));
    bt->d = naive_alloc(bt->d_len, sizeof(float));
    if (r)
        tu_batch_fill(bt, r, x_scale, d_scale);
}

void tu_batch_fill(tu_batch *bt, naive_rng *r, double x_scale, double d_scale)
{
    naive_fill_float(r, bt->x, bt->x_len, x_scale);
    naive_fill_float(r, bt->d, bt->d_len, d_scale);
}

void tu_batch_free(tu_batch *bt)
{
    free(bt->x);
    free(bt->d);
    memset(bt, 0, sizeof *bt);
}

void tu_feed(kfac_block *b, int tower, const float *x, const float *d, int M)
{
    assert_int_equal(kfac_block_accumulate_inputs(b, tower, x, M), KFAC_OK);
    assert_int_equal(kfac_block_accumulate_output_grads(b, tower, d, M), KFAC_OK);
}

kfac_status tu_feed_update_cov(kfac_block *b, const float *x, const float *d, int M,
                               double decay)
{
    tu_feed(b, 0, x, d, M);
    return kfac_block_update_cov(b, decay);
}

/* ------------------------------------------------------------ kfac_step */

void tu_layer_ref_alloc(kfac_layer_ref *ref, const tu_block *s)
{
    memset(ref, 0, sizeof *ref);
    ref->block = s->b;
    float **fw[5] = {&ref->w, &ref->grad_w, &ref->vel_w, &ref->scratch_w, &ref->scratch2_w};
    float **fb[5] = {&ref->b, &ref->grad_b, &ref->vel_b, &ref->scratch_b, &ref->scratch2_b};
    for (int i = 0; i < 5; i++) {
        *fw[i] = naive_alloc(s->nw, sizeof(float));
        *fb[i] = s->bias ? naive_alloc(s->nbias, sizeof(float)) : NULL;
    }
}

void tu_layer_ref_free(kfac_layer_ref *ref)
{
    free(ref->w); free(ref->b);
    free(ref->grad_w); free(ref->grad_b);
    free(ref->vel_w); free(ref->vel_b);
    free(ref->scratch_w); free(ref->scratch_b);
    free(ref->scratch2_w); free(ref->scratch2_b);
    memset(ref, 0, sizeof *ref);
}

/* ------------------------------------------------------------ temp files */

static char g_tmpdir[128];

const char *tu_tmpdir_create(const char *prefix)
{
    int n = snprintf(g_tmpdir, sizeof g_tmpdir, "/tmp/%s_XXXXXX", prefix);
    assert_true(n > 0 && (size_t)n < sizeof g_tmpdir);
    if (!mkdtemp(g_tmpdir)) {
        g_tmpdir[0] = '\0';
        fail_msg("mkdtemp /tmp/%s_XXXXXX failed", prefix);
    }
    return g_tmpdir;
}

const char *tu_tmpdir(void)
{
    return g_tmpdir;
}

const char *tu_tmp_path(const char *name)
{
    static char buf[8][256];
    static int k;
    k = (k + 1) % 8;
    int n = snprintf(buf[k], sizeof buf[k], "%s/%s", g_tmpdir, name);
    assert_true(n > 0 && (size_t)n < sizeof buf[k]);
    return buf[k];
}

int tu_tmpdir_remove(void)
{
    char cmd[2 * sizeof g_tmpdir + 64];
    if (!g_tmpdir[0])
        return -1;
    snprintf(cmd, sizeof cmd, "chmod -R u+w '%s' 2>/dev/null; rm -rf '%s'", g_tmpdir, g_tmpdir);
    int rc = system(cmd);
    g_tmpdir[0] = '\0';
    return rc == 0 ? 0 : -1;
}

int tu_tmpdir_setup(void **state)
{
    const char *prefix = state && *state ? (const char *)*state : "kfac_test";
    tu_tmpdir_create(prefix);
    return 0;
}

int tu_tmpdir_teardown(void **state)
{
    (void)state;
    return tu_tmpdir_remove();
}

int tu_exists(const char *path)
{
    struct stat sb;
    return lstat(path, &sb) == 0;
}

unsigned char *tu_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    assert_true(n >= 0);
    rewind(f);
    unsigned char *p = malloc((size_t)n + 1);
    assert_non_null(p);
    assert_int_equal(fread(p, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return p;
}

void tu_write_file(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

void tu_assert_contains(const char *hay, const char *needle)
{
    if (!strstr(hay, needle)) {
        print_error("message \"%s\" does not contain \"%s\"\n", hay, needle);
        fail();
    }
}
