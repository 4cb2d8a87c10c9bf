/*
 * K-FAC core: Fisher blocks for Darknet's connected and convolutional layers
 * (KFC, Grosse & Martens 2016), their statistics, damped inverses and powers,
 * and the optimizer step of kfac-semantics.md section 5.
 *
 * Memory model: everything a block will ever need per step is allocated in
 * kfac_*_create() and kfac_block_register_*(); per-step functions only use
 * that. Statistics are accumulated in float straight from Darknet's buffers
 * (BLAS syrk on the upper triangle), folded into double factors by
 * update_cov, and every decomposition is done in double. Inverses and
 * eigendecompositions are double-buffered ("live" and "stage") so that a
 * failed update_inverses leaves the last good inverse in place.
 */
#include "kfac.h"
#include "kfac_alloc.h"
#include "kfac_linalg.h"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define KFAC_MAX_MATPOWER 8
#define KFAC_CHOL_RETRIES 3

struct kfac_block {
    int is_conv;
    kfac_conv_geom geom;       /* conv only */
    int groups, n_g, k, kb, T, out_h, out_w, bias;
    size_t nparams;
    size_t bytes;
    kfac_damping_type dtype;
    double lam;
    int num_towers;

    /* Statistics of the current step: float, upper triangle only. */
    float *sumA, *sumG;        /* groups*kb*kb, groups*n_g*n_g */
    long mA, mG;               /* examples counted */
    float *patches;            /* k*T, GENERAL/IMAGE conv only */
    float *ones;               /* T: row sums of the patches (bias row of A) */

    double *A, *G;             /* factors, full symmetric, groups-major */
    int has_factors;

    double *v0, *v1, *v2;      /* n_g*kb product workspaces */

    /* What update_inverses computes. */
    int inv_registered;
    int nmat;
    double mat_exp[KFAC_MAX_MATPOWER];
    int has_inverse, has_eig;

    /* live/stage pairs, swapped on a successful update_inverses */
    double *Ainv, *Ginv, *Ainv_st, *Ginv_st;           /* factored inverse */
    /* precond_precision float: copies of the live factored inverse and the
     * product workspaces, so the per-step products run in sgemm */
    int float_inv;
    float *Ainv_f, *Ginv_f, *fv0, *fv1;
    double *EA, *dA, *EG, *dG, *EA_st, *dA_st, *EG_st, *dG_st; /* Q^T rows, eigvals */
    double *lamA, *lamG, *lamA_st, *lamG_st;           /* per group, as used */

    /* LAPACK workspace sized once for max(kb, n_g), plus eigen scratch for
     * the Cholesky fallback. */
    double *escr, *dscr, *lwork;
    int *liwork;
    int lwork_n, liwork_n;

    int retries;
};

/* ------------------------------------------------------------------ status */

const char *kfac_status_str(kfac_status s)
{
    switch (s) {
    case KFAC_OK: return "success";
    case KFAC_ERR_NULL: return "a required pointer was NULL";
    case KFAC_ERR_INVALID_ARG: return "invalid argument or inconsistent shape";
    case KFAC_ERR_NOMEM: return "out of memory";
    case KFAC_ERR_STATE: return "call made in the wrong state";
    case KFAC_ERR_NOT_FINITE: return "non-finite value in statistics, factors or update";
    case KFAC_ERR_LAPACK: return "matrix decomposition failed";
    case KFAC_ERR_PARSE: return "config value could not be parsed";
    case KFAC_ERR_UNKNOWN_KEY: return "unknown config key";
    case KFAC_ERR_IO: return "read/write failure";
    case KFAC_ERR_FORMAT: return "corrupt, truncated or mismatched serialized state";
    }
    return "unknown status";
}

/* ------------------------------------------------------------------ helpers */

static int mul_ok(size_t a, size_t b, size_t *out)
{
    if (a != 0 && b > SIZE_MAX / a)
        return 0;
    *out = a * b;
    return 1;
}

/* Zeroed allocation that also keeps the block's byte count. */
static void *balloc(kfac_block *b, size_t n, size_t sz)
{
    size_t total;
    if (n == 0)
        n = 1;
    if (!mul_ok(n, sz, &total))
        return NULL;
    void *p = KFAC_CALLOC(n, sz);
    if (p)
        b->bytes += total;
    return p;
}

static int all_finite_d(const double *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]))
            return 0;
    return 1;
}

static int all_finite_f(const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]))
            return 0;
    return 1;
}

/* A finite double may still overflow the float it is stored into (and that
 * conversion is undefined behaviour): results are checked against float's
 * range, which also rejects NaN. */
static int all_float_range(const double *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!(fabs(x[i]) <= FLT_MAX))
            return 0;
    return 1;
}

static size_t sqsz(int n) { return (size_t)n * (size_t)n; }
static double *grpA(const kfac_block *b, double *base, int j) { return base + (size_t)j * sqsz(b->kb); }
static double *grpG(const kfac_block *b, double *base, int j) { return base + (size_t)j * sqsz(b->n_g); }
static int maxdim(const kfac_block *b) { return b->kb > b->n_g ? b->kb : b->n_g; }

static kfac_damping_type cfg_dtype(const kfac_config *cfg)
{
    return cfg ? cfg->damping_type : KFAC_DAMPING_FACTORED;
}

/* ------------------------------------------------------------------ create */

void kfac_block_free(kfac_block *b)
{
    if (!b)
        return;
    double *dbufs[] = {b->A, b->G, b->v0, b->v1, b->v2, b->Ainv, b->Ginv, b->Ainv_st,
                       b->Ginv_st, b->EA, b->dA, b->EG, b->dG, b->EA_st, b->dA_st, b->EG_st,
                       b->dG_st, b->lamA, b->lamG, b->lamA_st, b->lamG_st, b->escr, b->dscr,
                       b->lwork};
    for (size_t i = 0; i < sizeof dbufs / sizeof dbufs[0]; i++)
        KFAC_FREE(dbufs[i]);
    float *fbufs[] = {b->sumA, b->sumG, b->Ainv_f, b->Ginv_f, b->fv0, b->fv1};
    for (size_t i = 0; i < sizeof fbufs / sizeof fbufs[0]; i++)
        KFAC_FREE(fbufs[i]);
    KFAC_FREE(b->patches);
    KFAC_FREE(b->ones);
    KFAC_FREE(b->liwork);
    KFAC_FREE(b);
}

/* Shapes are validated so that every BLAS dimension and leading dimension
 * (int) and every buffer size (size_t) is representable. */
static int shapes_ok(int groups, int n_g, int kb, int T)
{
    size_t a, g, t, p;
    if (!mul_ok(sqsz(kb), (size_t)groups, &a) || !mul_ok(sqsz(n_g), (size_t)groups, &g))
        return 0;
    if (!mul_ok((size_t)kb, (size_t)T, &t) || t > INT_MAX)
        return 0;
    if (!mul_ok((size_t)n_g, (size_t)T, &t) || t > INT_MAX)
        return 0;
    if (!mul_ok((size_t)n_g, (size_t)kb, &p) || !mul_ok(p, (size_t)groups, &p))
        return 0;
    /* full_fisher_block and dsyevd's 2n^2 workspace */
    if (!mul_ok(p, p, &t) || sqsz(kb) > INT_MAX / 4 || sqsz(n_g) > INT_MAX / 4)
        return 0;
    return a < SIZE_MAX / sizeof(double) && g < SIZE_MAX / sizeof(double);
}

static kfac_status block_alloc_common(kfac_block *b, const kfac_config *cfg, size_t patch_floats)
{
    const int G = b->groups;
    b->nparams = (size_t)G * b->n_g * b->kb;
    b->dtype = cfg_dtype(cfg);
    b->lam = cfg ? cfg->damping : 0.001;
    b->float_inv = cfg ? cfg->precond_precision == KFAC_PRECISION_FLOAT : 1;
    b->num_towers = 1;
    b->sumA = balloc(b, (size_t)G * sqsz(b->kb), sizeof(float));
    b->sumG = balloc(b, (size_t)G * sqsz(b->n_g), sizeof(float));
    b->A = balloc(b, (size_t)G * sqsz(b->kb), sizeof(double));
    b->G = balloc(b, (size_t)G * sqsz(b->n_g), sizeof(double));
    b->v0 = balloc(b, (size_t)b->n_g * b->kb, sizeof(double));
    b->v1 = balloc(b, (size_t)b->n_g * b->kb, sizeof(double));
    b->v2 = balloc(b, (size_t)b->n_g * b->kb, sizeof(double));
    b->ones = balloc(b, (size_t)b->T, sizeof(float));
    b->lamA = balloc(b, (size_t)G, sizeof(double));
    b->lamG = balloc(b, (size_t)G, sizeof(double));
    b->lamA_st = balloc(b, (size_t)G, sizeof(double));
    b->lamG_st = balloc(b, (size_t)G, sizeof(double));
    if (patch_floats)
        b->patches = balloc(b, patch_floats, sizeof(float));
    if (!b->sumA || !b->sumG || !b->A || !b->G || !b->v0 || !b->v1 || !b->v2 || !b->ones ||
        !b->lamA || !b->lamG || !b->lamA_st || !b->lamG_st || (patch_floats && !b->patches))
        return KFAC_ERR_NOMEM;
    for (int i = 0; i < b->T; i++)
        b->ones[i] = 1.0f;
    return KFAC_OK;
}

kfac_status kfac_conv_block_create(const kfac_conv_geom *g, const kfac_config *cfg,
                                   kfac_block **out)
{
    kfac_status st;
    kfac_block *b = NULL;
    if (out)
        *out = NULL;
    if (!g || !out)
        return KFAC_ERR_NULL;
    if (cfg && kfac_config_check(cfg))
        return KFAC_ERR_INVALID_ARG;
    if (g->c < 1 || g->h < 1 || g->w < 1 || g->n < 1 || g->size < 1 || g->stride < 1 ||
        g->pad < 0 || g->dilation < 1 || g->groups < 1 || g->c % g->groups ||
        g->n % g->groups || (g->bias != 0 && g->bias != 1))
        return KFAC_ERR_INVALID_ARG;
    if (g->patches == KFAC_PATCHES_IMAGE) {
        if (g->dilation != 1)
            return KFAC_ERR_INVALID_ARG;
    } else if (g->patches == KFAC_PATCHES_POINTWISE) {
        if (g->size != 1 || g->stride != 1 || g->pad != 0 || g->dilation != 1)
            return KFAC_ERR_INVALID_ARG;
    } else if (g->patches != KFAC_PATCHES_GENERAL) {
        return KFAC_ERR_INVALID_ARG;
    }
    long long span = (long long)g->dilation * (g->size - 1) + 1;
    long long nh = (long long)g->h + 2LL * g->pad - span;
    long long nw = (long long)g->w + 2LL * g->pad - span;
    if (nh < 0 || nw < 0)
        return KFAC_ERR_INVALID_ARG;
    long long oh = nh / g->stride + 1, ow = nw / g->stride + 1;
    long long k = (long long)(g->c / g->groups) * g->size * g->size;
    if (oh * ow > INT_MAX || k + 1 > INT_MAX)
        return KFAC_ERR_INVALID_ARG;
    int T = (int)(oh * ow);
    int kb = (int)k + g->bias;
    if (!shapes_ok(g->groups, g->n / g->groups, kb, T))
        return KFAC_ERR_INVALID_ARG;
    /* Darknet indexes the input with int; keep one example addressable. */
    if ((long long)g->c * g->h * g->w > INT_MAX || (long long)g->n * T > INT_MAX)
        return KFAC_ERR_INVALID_ARG;

    b = KFAC_CALLOC(1, sizeof *b);
    if (!b)
        return KFAC_ERR_NOMEM;
    b->bytes = sizeof *b;
    b->is_conv = 1;
    b->geom = *g;
    b->groups = g->groups;
    b->n_g = g->n / g->groups;
    b->k = (int)k;
    b->kb = kb;
    b->bias = g->bias;
    b->T = T;
    b->out_h = (int)oh;
    b->out_w = (int)ow;
    st = block_alloc_common(b, cfg, g->patches == KFAC_PATCHES_POINTWISE ? 0 : (size_t)k * T);
    if (st != KFAC_OK)
        goto fail;
    *out = b;
    return KFAC_OK;
fail:
    kfac_block_free(b);
    return st;
}

kfac_status kfac_fc_block_create(int inputs, int outputs, int bias, const kfac_config *cfg,
                                 kfac_block **out)
{
    kfac_status st;
    kfac_block *b = NULL;
    if (out)
        *out = NULL;
    if (!out)
        return KFAC_ERR_NULL;
    if (cfg && kfac_config_check(cfg))
        return KFAC_ERR_INVALID_ARG;
    if (inputs < 1 || outputs < 1 || (bias != 0 && bias != 1) || inputs == INT_MAX ||
        !shapes_ok(1, outputs, inputs + bias, 1))
        return KFAC_ERR_INVALID_ARG;
    b = KFAC_CALLOC(1, sizeof *b);
    if (!b)
        return KFAC_ERR_NOMEM;
    b->bytes = sizeof *b;
    b->groups = 1;
    b->n_g = outputs;
    b->k = inputs;
    b->kb = inputs + bias;
    b->bias = bias;
    b->T = 1;
    b->out_h = b->out_w = 1;
    st = block_alloc_common(b, cfg, 0);
    if (st != KFAC_OK)
        goto fail;
    *out = b;
    return KFAC_OK;
fail:
    kfac_block_free(b);
    return st;
}

kfac_status kfac_conv_block_resize(kfac_block *b, int h, int w)
{
    if (!b)
        return KFAC_ERR_NULL;
    if (!b->is_conv || h < 1 || w < 1)
        return KFAC_ERR_INVALID_ARG;
    if (b->mA != 0 || b->mG != 0)
        return KFAC_ERR_STATE;
    const kfac_conv_geom *g = &b->geom;
    if (h == g->h && w == g->w)
        return KFAC_OK;
    /* Same validation as kfac_conv_block_create, for the new size only. */
    long long span = (long long)g->dilation * (g->size - 1) + 1;
    long long nh = (long long)h + 2LL * g->pad - span;
    long long nw = (long long)w + 2LL * g->pad - span;
    if (nh < 0 || nw < 0)
        return KFAC_ERR_INVALID_ARG;
    long long oh = nh / g->stride + 1, ow = nw / g->stride + 1;
    if (oh * ow > INT_MAX)
        return KFAC_ERR_INVALID_ARG;
    int T = (int)(oh * ow);
    if (!shapes_ok(b->groups, b->n_g, b->kb, T) || (long long)g->c * h * w > INT_MAX ||
        (long long)g->n * T > INT_MAX)
        return KFAC_ERR_INVALID_ARG;
    /* New buffers first, so that a failed allocation leaves the block as is. */
    size_t pf = g->patches == KFAC_PATCHES_POINTWISE ? 0 : (size_t)b->k * T;
    float *ones = KFAC_CALLOC((size_t)T, sizeof(float));
    float *patches = pf ? KFAC_CALLOC(pf, sizeof(float)) : NULL;
    if (!ones || (pf && !patches)) {
        KFAC_FREE(ones);
        KFAC_FREE(patches);
        return KFAC_ERR_NOMEM;
    }
    for (int i = 0; i < T; i++)
        ones[i] = 1.0f;
    size_t old_pf = b->patches ? (size_t)b->k * b->T : 0;
    b->bytes = b->bytes - sizeof(float) * ((size_t)b->T + old_pf) + sizeof(float) * ((size_t)T + pf);
    KFAC_FREE(b->ones);
    KFAC_FREE(b->patches);
    b->ones = ones;
    b->patches = patches;
    b->geom.h = h;
    b->geom.w = w;
    b->out_h = (int)oh;
    b->out_w = (int)ow;
    b->T = T;
    return KFAC_OK;
}

kfac_status kfac_block_info_get(const kfac_block *b, kfac_block_info *info)
{
    if (!b || !info)
        return KFAC_ERR_NULL;
    info->is_conv = b->is_conv;
    info->groups = b->groups;
    info->n_g = b->n_g;
    info->k = b->k;
    info->kb = b->kb;
    info->T = b->T;
    info->out_h = b->out_h;
    info->out_w = b->out_w;
    info->nparams = b->nparams;
    info->bytes = b->bytes;
    return KFAC_OK;
}

kfac_status kfac_block_tensors_to_compute_grads(const kfac_block *b, kfac_capture_spec *spec)
{
    if (!b || !spec)
        return KFAC_ERR_NULL;
    if (b->is_conv) {
        spec->input_floats = (size_t)b->geom.c * b->geom.h * b->geom.w;
        spec->output_grad_floats = (size_t)b->geom.n * b->T;
        spec->needs_patches = b->geom.patches != KFAC_PATCHES_POINTWISE;
    } else {
        spec->input_floats = (size_t)b->k;
        spec->output_grad_floats = (size_t)b->n_g;
        spec->needs_patches = 0;
    }
    return KFAC_OK;
}

kfac_status kfac_block_register_additional_tower(kfac_block *b)
{
    if (!b)
        return KFAC_ERR_NULL;
    if (b->num_towers == INT_MAX)
        return KFAC_ERR_INVALID_ARG;
    b->num_towers++;
    return KFAC_OK;
}

int kfac_block_num_registered_towers(const kfac_block *b)
{
    return b ? b->num_towers : 0;
}

/* ------------------------------------------------------------------ statistics */

/* The block's own patch extraction, with dilation; same row order and zero
 * padding as Darknet's im2col_cpu, rows skipped wholesale when they fall in
 * the padding. The IMAGE path is this with dilation 1 (checked at create), so
 * its buffer is exactly the one Darknet builds for accumulate_patches. */
static void im2col_general(const kfac_block *b, const float *im, float *col)
{
    const kfac_conv_geom *g = &b->geom;
    const int cg = g->c / g->groups, S = g->size, oh = b->out_h, ow = b->out_w;
    for (int ch = 0; ch < cg; ch++)
        for (int kh = 0; kh < S; kh++)
            for (int kw = 0; kw < S; kw++) {
                float *dst = col + ((size_t)(ch * S + kh) * S + kw) * (size_t)b->T;
                for (int y = 0; y < oh; y++) {
                    float *d = dst + (size_t)y * ow;
                    int iy = y * g->stride - g->pad + kh * g->dilation;
                    if (iy < 0 || iy >= g->h) {
                        memset(d, 0, sizeof(float) * (size_t)ow);
                        continue;
                    }
                    const float *src = im + ((size_t)ch * g->h + iy) * g->w;
                    for (int x = 0; x < ow; x++) {
                        int ix = x * g->stride - g->pad + kw * g->dilation;
                        d[x] = (ix >= 0 && ix < g->w) ? src[ix] : 0.0f;
                    }
                }
            }
}

/* sumA_j += [P;1][P;1]^T for one k x T patch matrix (upper triangle). */
static void acc_patches(kfac_block *b, int j, const float *P)
{
    float *S = b->sumA + (size_t)j * sqsz(b->kb);
    kl_ssyrk_acc(b->k, b->T, P, b->T, S, b->kb);
    if (b->bias) {
        kl_sgemv_acc(b->k, b->T, P, b->T, b->ones, S + (b->kb - 1), b->kb);
        S[sqsz(b->kb) - 1] += (float)b->T;
    }
}

static kfac_status check_tower(const kfac_block *b, int tower)
{
    return (tower < 0 || tower >= b->num_towers) ? KFAC_ERR_INVALID_ARG : KFAC_OK;
}

kfac_status kfac_block_accumulate_inputs(kfac_block *b, int tower, const float *x, int batch)
{
    if (!b || !x)
        return KFAC_ERR_NULL;
    if (check_tower(b, tower) != KFAC_OK || batch < 1)
        return KFAC_ERR_INVALID_ARG;
    if (!b->is_conv) {
        /* All examples in one syrk: X is batch x inputs. */
        float *S = b->sumA;
        kl_ssyrk_acc_t(b->k, batch, x, b->k, S, b->kb);
        if (b->bias) {
            for (int i = 0; i < batch; i++)
                kl_saxpy(b->k, 1.0f, x + (size_t)i * b->k, 1, S + (b->kb - 1), b->kb);
            S[sqsz(b->kb) - 1] += (float)batch;
        }
        b->mA += batch;
        return KFAC_OK;
    }
    const kfac_conv_geom *g = &b->geom;
    const size_t gsz = (size_t)(g->c / g->groups) * g->h * g->w;
    for (int i = 0; i < batch; i++)
        for (int j = 0; j < b->groups; j++) {
            const float *im = x + ((size_t)i * b->groups + j) * gsz;
            const float *P = im;
            if (g->patches != KFAC_PATCHES_POINTWISE) {
                im2col_general(b, im, b->patches);
                P = b->patches;
            }
            acc_patches(b, j, P);
        }
    b->mA += batch;
    return KFAC_OK;
}

kfac_status kfac_block_accumulate_patches(kfac_block *b, int tower, int group, const float *cols)
{
    if (!b || !cols)
        return KFAC_ERR_NULL;
    if (check_tower(b, tower) != KFAC_OK || group < 0 || group >= b->groups)
        return KFAC_ERR_INVALID_ARG;
    acc_patches(b, group, cols);
    if (group == 0)
        b->mA++;
    return KFAC_OK;
}

kfac_status kfac_block_accumulate_output_grads(kfac_block *b, int tower, const float *d, int batch)
{
    if (!b || !d)
        return KFAC_ERR_NULL;
    if (check_tower(b, tower) != KFAC_OK || batch < 1)
        return KFAC_ERR_INVALID_ARG;
    if (!b->is_conv) {
        kl_ssyrk_acc_t(b->n_g, batch, d, b->n_g, b->sumG, b->n_g);
    } else {
        const size_t gsz = (size_t)b->n_g * b->T;
        for (int i = 0; i < batch; i++)
            for (int j = 0; j < b->groups; j++)
                kl_ssyrk_acc(b->n_g, b->T, d + ((size_t)i * b->groups + j) * gsz, b->T,
                             b->sumG + (size_t)j * sqsz(b->n_g), b->n_g);
    }
    b->mG += batch;
    return KFAC_OK;
}

kfac_status kfac_block_accumulate_output_grads_group(kfac_block *b, int tower, int group,
                                                     const float *d)
{
    if (!b || !d)
        return KFAC_ERR_NULL;
    if (check_tower(b, tower) != KFAC_OK || group < 0 || group >= b->groups)
        return KFAC_ERR_INVALID_ARG;
    kl_ssyrk_acc(b->n_g, b->T, d, b->T, b->sumG + (size_t)group * sqsz(b->n_g), b->n_g);
    if (group == 0)
        b->mG++;
    return KFAC_OK;
}

void kfac_block_clear_stats(kfac_block *b)
{
    if (!b)
        return;
    memset(b->sumA, 0, sizeof(float) * (size_t)b->groups * sqsz(b->kb));
    memset(b->sumG, 0, sizeof(float) * (size_t)b->groups * sqsz(b->n_g));
    b->mA = b->mG = 0;
}

static int upper_finite_f(const float *S, int n, int groups)
{
    for (int j = 0; j < groups; j++, S += sqsz(n))
        for (int r = 0; r < n; r++)
            if (!all_finite_f(S + (size_t)r * n + r, (size_t)(n - r)))
                return 0;
    return 1;
}

/* C <- e*C + (1-e)*S/scale, or S/scale on the first estimate; S upper only. */
static void fold(double *C, const float *S, int n, double inv_mt, double e, int first)
{
    for (int r = 0; r < n; r++)
        for (int c = r; c < n; c++) {
            double v = (double)S[(size_t)r * n + c] * inv_mt;
            if (!first)
                v = e * C[(size_t)r * n + c] + (1.0 - e) * v;
            C[(size_t)r * n + c] = v;
            C[(size_t)c * n + r] = v;
        }
}

kfac_status kfac_block_update_cov(kfac_block *b, double decay)
{
    if (!b)
        return KFAC_ERR_NULL;
    if (!isfinite(decay) || decay < 0.0 || decay >= 1.0)
        return KFAC_ERR_INVALID_ARG;
    if (b->mA == 0 || b->mA != b->mG)
        return KFAC_ERR_STATE;
    if (!upper_finite_f(b->sumA, b->kb, b->groups) || !upper_finite_f(b->sumG, b->n_g, b->groups)) {
        kfac_block_clear_stats(b);
        return KFAC_ERR_NOT_FINITE;
    }
    const double inv_mt = 1.0 / ((double)b->mA * (double)b->T);
    const int first = !b->has_factors;
    for (int j = 0; j < b->groups; j++) {
        fold(grpA(b, b->A, j), b->sumA + (size_t)j * sqsz(b->kb), b->kb, inv_mt, decay, first);
        fold(grpG(b, b->G, j), b->sumG + (size_t)j * sqsz(b->n_g), b->n_g, inv_mt, decay, first);
    }
    b->has_factors = 1;
    kfac_block_clear_stats(b);
    return KFAC_OK;
}

kfac_status kfac_block_get_factors(const kfac_block *b, int group, double *A, double *G)
{
    if (!b)
        return KFAC_ERR_NULL;
    if (group < 0 || group >= b->groups)
        return KFAC_ERR_INVALID_ARG;
    if (!b->has_factors)
        return KFAC_ERR_STATE;
    if (A)
        memcpy(A, grpA(b, b->A, group), sizeof(double) * sqsz(b->kb));
    if (G)
        memcpy(G, grpG(b, b->G, group), sizeof(double) * sqsz(b->n_g));
    return KFAC_OK;
}

static int symmetric(const double *M, int n)
{
    for (int r = 0; r < n; r++)
        for (int c = r + 1; c < n; c++) {
            double x = M[(size_t)r * n + c], y = M[(size_t)c * n + r];
            if (fabs(x - y) > 1e-12 * fmax(1.0, fmax(fabs(x), fabs(y))))
                return 0;
        }
    return 1;
}

kfac_status kfac_block_set_factors(kfac_block *b, int group, const double *A, const double *G)
{
    if (!b || !A || !G)
        return KFAC_ERR_NULL;
    if (group < 0 || group >= b->groups)
        return KFAC_ERR_INVALID_ARG;
    if (!all_finite_d(A, sqsz(b->kb)) || !all_finite_d(G, sqsz(b->n_g)))
        return KFAC_ERR_NOT_FINITE;
    if (!symmetric(A, b->kb) || !symmetric(G, b->n_g))
        return KFAC_ERR_INVALID_ARG;
    memcpy(grpA(b, b->A, group), A, sizeof(double) * sqsz(b->kb));
    memcpy(grpG(b, b->G, group), G, sizeof(double) * sqsz(b->n_g));
    b->has_factors = 1;
    return KFAC_OK;
}

/* ------------------------------------------------------------------ damping */

kfac_status kfac_block_instantiate_factors(kfac_block *b, double damping)
{
    if (!b)
        return KFAC_ERR_NULL;
    if (!isfinite(damping) || damping < 0.0 ||
        (b->dtype == KFAC_DAMPING_FACTORED && damping == 0.0))
        return KFAC_ERR_INVALID_ARG;
    b->lam = damping;
    return KFAC_OK;
}

/* Sem. 4 split of lam between the two factors; pi falls back to 1 when a
 * trace is not positive (e.g. all-zero inputs) so the split stays finite. */
static void damping_split(const kfac_block *b, int j, double lam, double *lamA, double *lamG,
                          double *pi_out)
{
    const double *A = grpA(b, b->A, j), *G = grpG(b, b->G, j);
    double trA = 0.0, trG = 0.0;
    for (int i = 0; i < b->kb; i++)
        trA += A[(size_t)i * b->kb + i];
    for (int i = 0; i < b->n_g; i++)
        trG += G[(size_t)i * b->n_g + i];
    trA /= b->kb;
    trG /= b->n_g;
    double pi = 1.0;
    if (isfinite(trA) && isfinite(trG) && trA > 0.0 && trG > 0.0) {
        pi = sqrt(trA / trG);
        if (!isfinite(pi) || pi <= 0.0)
            pi = 1.0;
    }
    double s = sqrt(lam / b->T);
    if (lamA) *lamA = s * pi;
    if (lamG) *lamG = s / pi;
    if (pi_out) *pi_out = pi;
}

kfac_status kfac_block_factored_damping(const kfac_block *b, int group, double *lam_A,
                                        double *lam_G, double *pi)
{
    if (!b)
        return KFAC_ERR_NULL;
    if (group < 0 || group >= b->groups)
        return KFAC_ERR_INVALID_ARG;
    if (!b->has_factors)
        return KFAC_ERR_STATE;
    damping_split(b, group, b->lam, lam_A, lam_G, pi);
    return KFAC_OK;
}

/* ------------------------------------------------------------------ registration */

/* LAPACK workspace and eigen scratch for max(kb, n_g): needed by the eigen
 * path and by the factored inverse's eigen fallback. */
static kfac_status ensure_lapack_ws(kfac_block *b)
{
    if (b->lwork)
        return KFAC_OK;
    kfac_status st = KFAC_ERR_NOMEM;
    double *escr = NULL, *dscr = NULL, *lwork = NULL;
    int *liwork = NULL;
    int lw = 0, liw = 0, lw2 = 0, liw2 = 0;
    size_t before = b->bytes;
    if (kl_dsyevd_query(b->kb, &lw, &liw) != 0 || kl_dsyevd_query(b->n_g, &lw2, &liw2) != 0) {
        st = KFAC_ERR_LAPACK;
        goto fail;
    }
    if (lw2 > lw) lw = lw2;
    if (liw2 > liw) liw = liw2;
    escr = balloc(b, sqsz(maxdim(b)), sizeof(double));
    dscr = balloc(b, (size_t)maxdim(b), sizeof(double));
    lwork = balloc(b, (size_t)lw, sizeof(double));
    liwork = balloc(b, (size_t)liw, sizeof(int));
    if (!escr || !dscr || !lwork || !liwork)
        goto fail;
    b->escr = escr;
    b->dscr = dscr;
    b->lwork = lwork;
    b->liwork = liwork;
    b->lwork_n = lw;
    b->liwork_n = liw;
    return KFAC_OK;
fail:
    KFAC_FREE(escr);
    KFAC_FREE(dscr);
    KFAC_FREE(lwork);
    KFAC_FREE(liwork);
    b->bytes = before;
    return st;
}

static kfac_status ensure_eig(kfac_block *b)
{
    if (b->EA)
        return KFAC_OK;
    kfac_status st = ensure_lapack_ws(b);
    if (st != KFAC_OK)
        return st;
    const size_t G = (size_t)b->groups;
    size_t before = b->bytes;
    double *p[8] = {0};
    p[0] = balloc(b, G * sqsz(b->kb), sizeof(double));
    p[1] = balloc(b, G * (size_t)b->kb, sizeof(double));
    p[2] = balloc(b, G * sqsz(b->n_g), sizeof(double));
    p[3] = balloc(b, G * (size_t)b->n_g, sizeof(double));
    p[4] = balloc(b, G * sqsz(b->kb), sizeof(double));
    p[5] = balloc(b, G * (size_t)b->kb, sizeof(double));
    p[6] = balloc(b, G * sqsz(b->n_g), sizeof(double));
    p[7] = balloc(b, G * (size_t)b->n_g, sizeof(double));
    for (int i = 0; i < 8; i++)
        if (!p[i])
            goto fail;
    b->EA = p[0]; b->dA = p[1]; b->EG = p[2]; b->dG = p[3];
    b->EA_st = p[4]; b->dA_st = p[5]; b->EG_st = p[6]; b->dG_st = p[7];
    return KFAC_OK;
fail:
    for (int i = 0; i < 8; i++)
        KFAC_FREE(p[i]);
    b->bytes = before;
    return KFAC_ERR_NOMEM;
}

static kfac_status ensure_inv(kfac_block *b)
{
    if (b->Ainv_st)
        return KFAC_OK;
    kfac_status st = ensure_lapack_ws(b);
    if (st != KFAC_OK)
        return st;
    const size_t G = (size_t)b->groups, nA = G * sqsz(b->kb), nG = G * sqsz(b->n_g);
    const size_t nv = (size_t)b->n_g * b->kb;
    size_t before = b->bytes;
    double *p[4] = {0};
    float *f[4] = {0};
    /* float products: the staged double inverse goes straight into the
     * float copy, so no live double inverse is kept */
    if (!b->float_inv) {
        p[0] = balloc(b, nA, sizeof(double));
        p[1] = balloc(b, nG, sizeof(double));
    }
    p[2] = balloc(b, nA, sizeof(double));
    p[3] = balloc(b, nG, sizeof(double));
    for (int i = 0; i < 4; i++)
        if (!p[i] && (i >= 2 || !b->float_inv))
            goto fail;
    if (b->float_inv) {
        f[0] = balloc(b, nA, sizeof(float));
        f[1] = balloc(b, nG, sizeof(float));
        f[2] = balloc(b, nv, sizeof(float));
        f[3] = balloc(b, nv, sizeof(float));
        for (int i = 0; i < 4; i++)
            if (!f[i])
                goto fail;
    }
    b->Ainv = p[0]; b->Ginv = p[1]; b->Ainv_st = p[2]; b->Ginv_st = p[3];
    b->Ainv_f = f[0]; b->Ginv_f = f[1]; b->fv0 = f[2]; b->fv1 = f[3];
    return KFAC_OK;
fail:
    for (int i = 0; i < 4; i++) {
        KFAC_FREE(p[i]);
        KFAC_FREE(f[i]);
    }
    b->bytes = before;
    return KFAC_ERR_NOMEM;
}

static int needs_eig(const kfac_block *b)
{
    return b->nmat > 0 || (b->inv_registered && b->dtype == KFAC_DAMPING_EXACT);
}

kfac_status kfac_block_register_inverse(kfac_block *b)
{
    if (!b)
        return KFAC_ERR_NULL;
    kfac_status st = b->dtype == KFAC_DAMPING_EXACT ? ensure_eig(b) : ensure_inv(b);
    if (st != KFAC_OK)
        return st;
    b->inv_registered = 1;
    return KFAC_OK;
}

kfac_status kfac_block_register_matpower(kfac_block *b, double exp)
{
    if (!b)
        return KFAC_ERR_NULL;
    if (!isfinite(exp))
        return KFAC_ERR_INVALID_ARG;
    if (exp == 1.0) /* plain multiply: nothing to precompute */
        return KFAC_OK;
    for (int i = 0; i < b->nmat; i++)
        if (b->mat_exp[i] == exp)
            return KFAC_OK;
    if (b->nmat >= KFAC_MAX_MATPOWER)
        return KFAC_ERR_INVALID_ARG;
    kfac_status st = ensure_eig(b);
    if (st != KFAC_OK)
        return st;
    b->mat_exp[b->nmat++] = exp;
    return KFAC_OK;
}

/* ------------------------------------------------------------------ inverses */

/* out = (M + d I)^-1 for symmetric M (n x n): Cholesky, retried with d x10,
 * then the eigen path with eigenvalues clamped at 0 and the original d. */
static kfac_status damped_inverse(kfac_block *b, const double *M, int n, double d, double *out)
{
    const size_t nn = sqsz(n);
    double dd = d;
    for (int attempt = 0; attempt <= KFAC_CHOL_RETRIES; attempt++) {
        memcpy(out, M, sizeof(double) * nn);
        for (int i = 0; i < n; i++)
            out[(size_t)i * n + i] += dd;
        if (kl_dpotrf(n, out) == 0 && kl_dpotri(n, out) == 0) {
            kl_symmetrize_cm_upper(n, out);
            if (all_finite_d(out, nn))
                return KFAC_OK;
        }
        b->retries++; /* each further attempt, and finally the eigen fallback */
        dd *= 10.0;
    }
    memcpy(b->escr, M, sizeof(double) * nn);
    if (kl_dsyevd(n, b->escr, b->dscr, b->lwork, b->lwork_n, b->liwork, b->liwork_n) != 0)
        return KFAC_ERR_LAPACK;
    /* (M + dI)^-1 = S^T S with S = diag((max(w,0)+d)^-1/2) Q^T. */
    for (int i = 0; i < n; i++) {
        double e = fmax(b->dscr[i], 0.0) + d;
        if (!(e > 0.0) || !isfinite(e))
            return KFAC_ERR_LAPACK;
        double f = 1.0 / sqrt(e);
        for (int c = 0; c < n; c++)
            b->escr[(size_t)i * n + c] *= f;
    }
    kl_dgemm(1, 0, n, n, n, 1.0, b->escr, n, b->escr, n, 0.0, out, n);
    return all_finite_d(out, nn) ? KFAC_OK : KFAC_ERR_NOT_FINITE;
}

/* Eigendecomposition of a factor into E (rows = eigenvectors) and w, with
 * rounding-negative eigenvalues clamped to 0. */
static kfac_status eig_factor(kfac_block *b, const double *M, int n, double *E, double *w)
{
    memcpy(E, M, sizeof(double) * sqsz(n));
    if (kl_dsyevd(n, E, w, b->lwork, b->lwork_n, b->liwork, b->liwork_n) != 0)
        return KFAC_ERR_LAPACK;
    if (!all_finite_d(E, sqsz(n)) || !all_finite_d(w, (size_t)n))
        return KFAC_ERR_NOT_FINITE;
    for (int i = 0; i < n; i++)
        if (w[i] < 0.0)
            w[i] = 0.0;
    return KFAC_OK;
}

static void to_float(const double *x, float *y, size_t n)
{
    for (size_t i = 0; i < n; i++)
        y[i] = (float)x[i];
}

#define SWAP(x, y) do { double *t_ = (x); (x) = (y); (y) = t_; } while (0)

kfac_status kfac_block_update_inverses(kfac_block *b)
{
    if (!b)
        return KFAC_ERR_NULL;
    if (!b->has_factors)
        return KFAC_ERR_STATE;
    const int eig = needs_eig(b);
    const int chol = b->inv_registered && b->dtype == KFAC_DAMPING_FACTORED;
    if (!eig && !chol)
        return KFAC_OK;
    if (!all_finite_d(b->A, (size_t)b->groups * sqsz(b->kb)) ||
        !all_finite_d(b->G, (size_t)b->groups * sqsz(b->n_g)))
        return KFAC_ERR_NOT_FINITE;
    for (int j = 0; j < b->groups; j++) {
        kfac_status st;
        damping_split(b, j, b->lam, &b->lamA_st[j], &b->lamG_st[j], NULL);
        if (eig) {
            st = eig_factor(b, grpA(b, b->A, j), b->kb, grpA(b, b->EA_st, j),
                            b->dA_st + (size_t)j * b->kb);
            if (st == KFAC_OK)
                st = eig_factor(b, grpG(b, b->G, j), b->n_g, grpG(b, b->EG_st, j),
                                b->dG_st + (size_t)j * b->n_g);
            if (st != KFAC_OK)
                return st;
        }
        if (chol) {
            st = damped_inverse(b, grpA(b, b->A, j), b->kb, b->lamA_st[j],
                                grpA(b, b->Ainv_st, j));
            if (st == KFAC_OK)
                st = damped_inverse(b, grpG(b, b->G, j), b->n_g, b->lamG_st[j],
                                    grpG(b, b->Ginv_st, j));
            if (st != KFAC_OK)
                return st;
        }
    }
    /* An inverse whose float copy would overflow is a failed update too. */
    if (chol && b->float_inv &&
        (!all_float_range(b->Ainv_st, (size_t)b->groups * sqsz(b->kb)) ||
         !all_float_range(b->Ginv_st, (size_t)b->groups * sqsz(b->n_g))))
        return KFAC_ERR_NOT_FINITE;
    /* Everything succeeded: the staged results become the live ones. */
    SWAP(b->lamA, b->lamA_st);
    SWAP(b->lamG, b->lamG_st);
    if (eig) {
        SWAP(b->EA, b->EA_st);
        SWAP(b->dA, b->dA_st);
        SWAP(b->EG, b->EG_st);
        SWAP(b->dG, b->dG_st);
        b->has_eig = 1;
    }
    if (chol) {
        if (b->float_inv) {
            to_float(b->Ainv_st, b->Ainv_f, (size_t)b->groups * sqsz(b->kb));
            to_float(b->Ginv_st, b->Ginv_f, (size_t)b->groups * sqsz(b->n_g));
        } else {
            SWAP(b->Ainv, b->Ainv_st);
            SWAP(b->Ginv, b->Ginv_st);
        }
    }
    if (b->inv_registered)
        b->has_inverse = 1;
    return KFAC_OK;
}

int kfac_block_has_inverse(const kfac_block *b)
{
    return b ? b->has_inverse : 0;
}

int kfac_block_num_retries(const kfac_block *b)
{
    return b ? b->retries : 0;
}

/* ------------------------------------------------------------------ products */

/* Group j of (w, bias) in Darknet layout <-> V (n_g x kb, row-major double). */
static void load_group(const kfac_block *b, int j, const float *w, const float *bias, double *V)
{
    for (int r = 0; r < b->n_g; r++) {
        const float *src = w + ((size_t)j * b->n_g + r) * b->k;
        double *dst = V + (size_t)r * b->kb;
        for (int c = 0; c < b->k; c++)
            dst[c] = src[c];
        if (b->bias)
            dst[b->k] = bias[(size_t)j * b->n_g + r];
    }
}

static void store_group(const kfac_block *b, int j, const double *V, float *w, float *bias)
{
    for (int r = 0; r < b->n_g; r++) {
        float *dst = w + ((size_t)j * b->n_g + r) * b->k;
        const double *src = V + (size_t)r * b->kb;
        for (int c = 0; c < b->k; c++)
            dst[c] = (float)src[c];
        if (b->bias)
            bias[(size_t)j * b->n_g + r] = (float)src[b->k];
    }
}

/* The float twins of load_group/store_group, for the float product path. */
static void load_group_f(const kfac_block *b, int j, const float *w, const float *bias, float *V)
{
    for (int r = 0; r < b->n_g; r++) {
        memcpy(V + (size_t)r * b->kb, w + ((size_t)j * b->n_g + r) * b->k, sizeof(float) * b->k);
        if (b->bias)
            V[(size_t)r * b->kb + b->k] = bias[(size_t)j * b->n_g + r];
    }
}

static void store_group_f(const kfac_block *b, int j, const float *V, float *w, float *bias)
{
    for (int r = 0; r < b->n_g; r++) {
        memcpy(w + ((size_t)j * b->n_g + r) * b->k, V + (size_t)r * b->kb, sizeof(float) * b->k);
        if (b->bias)
            bias[(size_t)j * b->n_g + r] = V[(size_t)r * b->kb + b->k];
    }
}

static kfac_status check_vec_args(const kfac_block *b, const float *v_w, const float *v_b,
                                  const float *out_w, const float *out_b)
{
    if (!b || !v_w || !out_w)
        return KFAC_ERR_NULL;
    if (b->bias && (!v_b || !out_b))
        return KFAC_ERR_NULL;
    return KFAC_OK;
}

enum eig_mode { EIG_EXACT, EIG_FACTORED };

/* v2 = QG [ (QG^T v0 QA) .* f ] QA^T with the live eigendecomposition of
 * group j; f = (T dG dA^T + lam)^e (exact) or T^e (dG+lamG)^e (dA+lamA)^e. */
static void eig_apply(kfac_block *b, int j, enum eig_mode mode, double e)
{
    const int m = b->n_g, n = b->kb;
    const double *EA = grpA(b, b->EA, j), *EG = grpG(b, b->EG, j);
    const double *dA = b->dA + (size_t)j * n, *dG = b->dG + (size_t)j * m;
    kl_dgemm(0, 0, m, n, m, 1.0, EG, m, b->v0, n, 0.0, b->v1, n);
    kl_dgemm(0, 1, m, n, n, 1.0, b->v1, n, EA, n, 0.0, b->v2, n);
    const double T = b->T;
    for (int r = 0; r < m; r++)
        for (int c = 0; c < n; c++) {
            double f;
            if (mode == EIG_EXACT) {
                double x = T * dG[r] * dA[c] + b->lam;
                f = e == -1.0 ? 1.0 / x : pow(x, e);
            } else {
                double x = T * (dG[r] + b->lamG[j]) * (dA[c] + b->lamA[j]);
                f = e == -1.0 ? 1.0 / x : pow(x, e);
            }
            b->v2[(size_t)r * n + c] *= f;
        }
    kl_dgemm(1, 0, m, n, m, 1.0, EG, m, b->v2, n, 0.0, b->v1, n);
    kl_dgemm(0, 0, m, n, n, 1.0, b->v1, n, EA, n, 0.0, b->v2, n);
}

kfac_status kfac_block_multiply(kfac_block *b, const float *v_w, const float *v_b,
                                float *out_w, float *out_b)
{
    kfac_status st = check_vec_args(b, v_w, v_b, out_w, out_b);
    if (st != KFAC_OK)
        return st;
    if (!b->has_factors)
        return KFAC_ERR_STATE;
    const int m = b->n_g, n = b->kb;
    const double T = b->T;
    const size_t mn = (size_t)m * n;
    for (int j = 0; j < b->groups; j++) {
        const double *A = grpA(b, b->A, j), *G = grpG(b, b->G, j);
        load_group(b, j, v_w, v_b, b->v0);
        if (b->dtype == KFAC_DAMPING_FACTORED) {
            double lA, lG;
            damping_split(b, j, b->lam, &lA, &lG, NULL);
            /* v1 = (G + lG I) V ; v2 = T v1 (A + lA I) */
            memcpy(b->v1, b->v0, sizeof(double) * mn);
            kl_dgemm(0, 0, m, n, m, 1.0, G, m, b->v0, n, lG, b->v1, n);
            memcpy(b->v2, b->v1, sizeof(double) * mn);
            kl_dgemm(0, 0, m, n, n, T, b->v1, n, A, n, T * lA, b->v2, n);
        } else {
            /* v2 = T G V A + lam V */
            kl_dgemm(0, 0, m, n, m, 1.0, G, m, b->v0, n, 0.0, b->v1, n);
            memcpy(b->v2, b->v0, sizeof(double) * mn);
            kl_dgemm(0, 0, m, n, n, T, b->v1, n, A, n, b->lam, b->v2, n);
        }
        if (!all_float_range(b->v2, mn))
            return KFAC_ERR_NOT_FINITE;
        store_group(b, j, b->v2, out_w, out_b);
    }
    return KFAC_OK;
}

kfac_status kfac_block_multiply_inverse(kfac_block *b, const float *v_w, const float *v_b,
                                        float *out_w, float *out_b)
{
    kfac_status st = check_vec_args(b, v_w, v_b, out_w, out_b);
    if (st != KFAC_OK)
        return st;
    if (!b->has_inverse)
        return KFAC_ERR_STATE;
    const int m = b->n_g, n = b->kb;
    const size_t mn = (size_t)m * n;
    if (b->dtype == KFAC_DAMPING_FACTORED && b->float_inv) {
        /* Group j is loaded before its rows of out are stored, and no other
         * group reads them, so out may alias v. */
        for (int j = 0; j < b->groups; j++) {
            load_group_f(b, j, v_w, v_b, b->fv0);
            kl_sgemm(0, 0, m, n, m, 1.0f, b->Ginv_f + (size_t)j * sqsz(m), m, b->fv0, n, 0.0f,
                     b->fv1, n);
            kl_sgemm(0, 0, m, n, n, (float)(1.0 / b->T), b->fv1, n,
                     b->Ainv_f + (size_t)j * sqsz(n), n, 0.0f, b->fv0, n);
            if (!all_finite_f(b->fv0, mn))
                return KFAC_ERR_NOT_FINITE;
            store_group_f(b, j, b->fv0, out_w, out_b);
        }
        return KFAC_OK;
    }
    for (int j = 0; j < b->groups; j++) {
        load_group(b, j, v_w, v_b, b->v0);
        if (b->dtype == KFAC_DAMPING_FACTORED) {
            kl_dgemm(0, 0, m, n, m, 1.0, grpG(b, b->Ginv, j), m, b->v0, n, 0.0, b->v1, n);
            kl_dgemm(0, 0, m, n, n, 1.0 / b->T, b->v1, n, grpA(b, b->Ainv, j), n, 0.0, b->v2, n);
        } else {
            eig_apply(b, j, EIG_EXACT, -1.0);
        }
        if (!all_float_range(b->v2, mn))
            return KFAC_ERR_NOT_FINITE;
        store_group(b, j, b->v2, out_w, out_b);
    }
    return KFAC_OK;
}

kfac_status kfac_block_multiply_matpower(kfac_block *b, double exp, const float *v_w,
                                         const float *v_b, float *out_w, float *out_b)
{
    kfac_status st = check_vec_args(b, v_w, v_b, out_w, out_b);
    if (st != KFAC_OK)
        return st;
    if (!isfinite(exp))
        return KFAC_ERR_INVALID_ARG;
    if (exp == 1.0)
        return kfac_block_multiply(b, v_w, v_b, out_w, out_b);
    if (exp == -1.0 && b->inv_registered)
        return kfac_block_multiply_inverse(b, v_w, v_b, out_w, out_b);
    int found = 0;
    for (int i = 0; i < b->nmat; i++)
        found |= b->mat_exp[i] == exp;
    if (!found || !b->has_eig)
        return KFAC_ERR_STATE;
    const size_t mn = (size_t)b->n_g * b->kb;
    for (int j = 0; j < b->groups; j++) {
        load_group(b, j, v_w, v_b, b->v0);
        eig_apply(b, j, b->dtype == KFAC_DAMPING_EXACT ? EIG_EXACT : EIG_FACTORED, exp);
        if (!all_float_range(b->v2, mn))
            return KFAC_ERR_NOT_FINITE;
        store_group(b, j, b->v2, out_w, out_b);
    }
    return KFAC_OK;
}

kfac_status kfac_block_full_fisher_block(const kfac_block *b, double *out)
{
    if (!b || !out)
        return KFAC_ERR_NULL;
    if (!b->has_factors)
        return KFAC_ERR_STATE;
    const size_t N = b->nparams, gp = (size_t)b->n_g * b->kb;
    memset(out, 0, sizeof(double) * N * N);
    for (int j = 0; j < b->groups; j++) {
        const double *A = grpA(b, b->A, j), *G = grpG(b, b->G, j);
        const size_t off = (size_t)j * gp;
        for (int r = 0; r < b->n_g; r++)
            for (int a = 0; a < b->kb; a++) {
                double *row = out + (off + (size_t)r * b->kb + a) * N + off;
                for (int s = 0; s < b->n_g; s++) {
                    double t = b->T * G[(size_t)r * b->n_g + s];
                    for (int c = 0; c < b->kb; c++)
                        row[(size_t)s * b->kb + c] = t * A[(size_t)a * b->kb + c];
                }
            }
    }
    return KFAC_OK;
}

kfac_status kfac_block_pack(const kfac_block *b, const float *w, const float *bias, double *flat)
{
    if (!b || !w || !flat || (b->bias && !bias))
        return KFAC_ERR_NULL;
    for (int j = 0; j < b->groups; j++)
        load_group(b, j, w, bias, flat + (size_t)j * b->n_g * b->kb);
    return KFAC_OK;
}

kfac_status kfac_block_unpack(const kfac_block *b, const double *flat, float *w, float *bias)
{
    if (!b || !w || !flat || (b->bias && !bias))
        return KFAC_ERR_NULL;
    for (int j = 0; j < b->groups; j++)
        store_group(b, j, flat + (size_t)j * b->n_g * b->kb, w, bias);
    return KFAC_OK;
}

/* ------------------------------------------------------------------ optimizer */

static size_t nw_of(const kfac_block *b) { return (size_t)b->groups * b->n_g * b->k; }
static size_t nb_of(const kfac_block *b) { return b->bias ? (size_t)b->groups * b->n_g : 0; }

static double dotf(const float *x, const float *y, size_t n)
{
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += (double)x[i] * y[i];
    return s;
}

/* <g, Delta> of one layer from its scratch buffers; non-finite marks a layer
 * that must be skipped (pass 1 poisons Delta for exactly those layers). */
static double layer_dot(const kfac_layer_ref *L)
{
    const kfac_block *b = L->block;
    double d = dotf(L->scratch_w, L->scratch2_w, nw_of(b));
    if (b->bias)
        d += dotf(L->scratch_b, L->scratch2_b, nb_of(b));
    return d;
}

kfac_status kfac_step(kfac_layer_ref *layers, int n, const kfac_step_args *args,
                      kfac_step_report *report)
{
    if (!args || (n > 0 && !layers))
        return KFAC_ERR_NULL;
    if (n < 0 || args->batch < 1 || !isfinite(args->learning_rate) ||
        !isfinite(args->momentum) || !isfinite(args->decay) ||
        !isfinite(args->norm_constraint) || args->norm_constraint < 0.0)
        return KFAC_ERR_INVALID_ARG;
    for (int l = 0; l < n; l++) {
        const kfac_layer_ref *L = &layers[l];
        if (!L->block || !L->w || !L->grad_w || !L->vel_w || !L->scratch_w || !L->scratch2_w)
            return KFAC_ERR_NULL;
        if (L->block->bias &&
            (!L->b || !L->grad_b || !L->vel_b || !L->scratch_b || !L->scratch2_b))
            return KFAC_ERR_NULL;
    }
    const double inv_batch = 1.0 / args->batch, wd = args->decay;

    /* Pass 1: g into scratch, Delta into scratch2, the clip sum over layers
     * that will be applied. Nothing the caller sees changes yet. */
    double sum = 0.0;
    for (int l = 0; l < n; l++) {
        kfac_layer_ref *L = &layers[l];
        const size_t nw = nw_of(L->block), nb = nb_of(L->block);
        for (size_t i = 0; i < nw; i++)
            L->scratch_w[i] = (float)(-(double)L->grad_w[i] * inv_batch + wd * L->w[i]);
        for (size_t i = 0; i < nb; i++)
            L->scratch_b[i] = (float)(-(double)L->grad_b[i] * inv_batch);
        int ok = all_finite_f(L->scratch_w, nw) && all_finite_f(L->scratch_b, nb) &&
                 kfac_block_multiply_inverse(L->block, L->scratch_w, L->scratch_b,
                                             L->scratch2_w, L->scratch2_b) == KFAC_OK;
        if (!ok) {
            L->scratch2_w[0] = NAN;
            continue;
        }
        double d = layer_dot(L);
        if (isfinite(d))
            sum += d;
    }
    double nu = 1.0;
    if (args->norm_constraint > 0.0 && sum > 0.0) {
        double t = sqrt(args->norm_constraint /
                        (args->learning_rate * args->learning_rate * sum));
        if (t < 1.0)
            nu = t;
    }

    /* Pass 2: apply or skip; gradients are consumed either way. */
    int applied = 0, skipped = 0, first = -1;
    const double mu = args->momentum, eta = args->learning_rate;
    for (int l = 0; l < n; l++) {
        kfac_layer_ref *L = &layers[l];
        const size_t nw = nw_of(L->block), nb = nb_of(L->block);
        if (isfinite(layer_dot(L))) {
            for (size_t i = 0; i < nw; i++) {
                L->vel_w[i] = (float)(mu * L->vel_w[i] + nu * L->scratch2_w[i]);
                L->w[i] = (float)(L->w[i] - eta * L->vel_w[i]);
            }
            for (size_t i = 0; i < nb; i++) {
                L->vel_b[i] = (float)(mu * L->vel_b[i] + nu * L->scratch2_b[i]);
                L->b[i] = (float)(L->b[i] - eta * L->vel_b[i]);
            }
            /* The header promises scratch ends up holding Delta. */
            memcpy(L->scratch_w, L->scratch2_w, sizeof(float) * nw);
            if (nb)
                memcpy(L->scratch_b, L->scratch2_b, sizeof(float) * nb);
            applied++;
        } else {
            if (first < 0)
                first = l;
            skipped++;
        }
        memset(L->grad_w, 0, sizeof(float) * nw);
        if (nb)
            memset(L->grad_b, 0, sizeof(float) * nb);
    }
    if (report) {
        report->nu = nu;
        report->gdotdelta = sum;
        report->applied = applied;
        report->skipped = skipped;
        report->first_skipped = first;
    }
    return KFAC_OK;
}
