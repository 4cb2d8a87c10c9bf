/*
 * Blocks: their lifecycle (create, resize, free), shapes, towers, and the one
 * place where the public kfac_block_* calls are dispatched to the block's
 * kind. Every argument is validated here, once, so a kind's operations
 * (kfac_internal.h) only do arithmetic. Allocation happens in create,
 * register_* and resize; the per-step entry points use what exists.
 */
#include "kfac_internal.h"
#include "kfac_alloc.h"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <string.h>

/* The kinds a block can be. A new kind adds its line here. */
static const kfac_kind *const kinds[] = {
    &kfac_kind_kron,
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

int kfac_mul_ok(size_t a, size_t b, size_t *out)
{
    if (a != 0 && b > SIZE_MAX / a)
        return 0;
    *out = a * b;
    return 1;
}

void *kfac_balloc(kfac_block *b, size_t n, size_t sz)
{
    size_t total;
    if (n == 0)
        n = 1;
    if (!kfac_mul_ok(n, sz, &total))
        return NULL;
    void *p = KFAC_CALLOC(n, sz);
    if (p)
        b->bytes += total;
    return p;
}

int kfac_all_finite_d(const double *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]))
            return 0;
    return 1;
}

int kfac_all_finite_f(const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]))
            return 0;
    return 1;
}

int kfac_all_float_range(const double *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!(fabs(x[i]) <= FLT_MAX))
            return 0;
    return 1;
}

/* ------------------------------------------------------------------ create */

void kfac_block_free(kfac_block *b)
{
    if (!b)
        return;
    if (b->impl)
        b->kind->destroy(b);
    KFAC_FREE(b->patches);
    KFAC_FREE(b->ones);
    KFAC_FREE(b);
}

/* Shapes are validated so that every BLAS dimension and leading dimension
 * (int) and every buffer size (size_t) is representable. */
static int shapes_ok(int groups, int n_g, int kb, int T)
{
    size_t a, g, t, p;
    if (!kfac_mul_ok(kfac_sq(kb), (size_t)groups, &a) ||
        !kfac_mul_ok(kfac_sq(n_g), (size_t)groups, &g))
        return 0;
    if (!kfac_mul_ok((size_t)kb, (size_t)T, &t) || t > INT_MAX)
        return 0;
    if (!kfac_mul_ok((size_t)n_g, (size_t)T, &t) || t > INT_MAX)
        return 0;
    if (!kfac_mul_ok((size_t)n_g, (size_t)kb, &p) || !kfac_mul_ok(p, (size_t)groups, &p))
        return 0;
    /* full_fisher_block and dsyevd's 2n^2 workspace */
    if (!kfac_mul_ok(p, p, &t) || kfac_sq(kb) > INT_MAX / 4 || kfac_sq(n_g) > INT_MAX / 4)
        return 0;
    return a < SIZE_MAX / sizeof(double) && g < SIZE_MAX / sizeof(double);
}

/* Generic buffers, then the kind's. The config has been checked by the
 * caller (or is NULL: defaults). */
static kfac_status block_alloc(kfac_block *b, const kfac_config *cfg, size_t patch_floats)
{
    b->kind = kinds[0];
    b->nparams = (size_t)b->groups * b->n_g * b->kb;
    b->dtype = cfg ? cfg->damping_type : KFAC_DAMPING_FACTORED;
    b->lam = cfg ? cfg->damping : 0.001;
    b->float_inv = cfg ? cfg->precond_precision == KFAC_PRECISION_FLOAT : 1;
    b->num_towers = 1;
    b->ones = kfac_balloc(b, (size_t)b->T, sizeof(float));
    if (patch_floats)
        b->patches = kfac_balloc(b, patch_floats, sizeof(float));
    if (!b->ones || (patch_floats && !b->patches))
        return KFAC_ERR_NOMEM;
    for (int i = 0; i < b->T; i++)
        b->ones[i] = 1.0f;
    return b->kind->create(b);
}

kfac_status kfac_conv_block_new(const kfac_conv_geom *g, const kfac_config *cfg,
                                kfac_block **out)
{
    kfac_status st;
    kfac_block *b = NULL;
    if (out)
        *out = NULL;
    if (!g || !out)
        return KFAC_ERR_NULL;
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
    st = block_alloc(b, cfg, g->patches == KFAC_PATCHES_POINTWISE ? 0 : (size_t)k * T);
    if (st != KFAC_OK)
        goto fail;
    *out = b;
    return KFAC_OK;
fail:
    kfac_block_free(b);
    return st;
}

kfac_status kfac_fc_block_new(int inputs, int outputs, int bias, const kfac_config *cfg,
                              kfac_block **out)
{
    kfac_status st;
    kfac_block *b = NULL;
    if (out)
        *out = NULL;
    if (!out)
        return KFAC_ERR_NULL;
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
    st = block_alloc(b, cfg, 0);
    if (st != KFAC_OK)
        goto fail;
    *out = b;
    return KFAC_OK;
fail:
    kfac_block_free(b);
    return st;
}

/* The public constructors check the config; the optimizer context, which
 * checked it once at its creation, calls the _new functions directly. */
kfac_status kfac_conv_block_create(const kfac_conv_geom *g, const kfac_config *cfg,
                                   kfac_block **out)
{
    if (out)
        *out = NULL;
    if (g && out && cfg && kfac_config_check(cfg))
        return KFAC_ERR_INVALID_ARG;
    return kfac_conv_block_new(g, cfg, out);
}

kfac_status kfac_fc_block_create(int inputs, int outputs, int bias, const kfac_config *cfg,
                                 kfac_block **out)
{
    if (out)
        *out = NULL;
    if (out && cfg && kfac_config_check(cfg))
        return KFAC_ERR_INVALID_ARG;
    return kfac_fc_block_new(inputs, outputs, bias, cfg, out);
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
        /* all examples at once: X is batch x inputs */
        b->kind->acc_a(b, 0, x, batch, 1);
        b->mA += batch;
        return KFAC_OK;
    }
    const kfac_conv_geom *g = &b->geom;
    const size_t gsz = (size_t)(g->c / g->groups) * g->h * g->w;
    for (int i = 0; i < batch; i++)
        for (int j = 0; j < b->groups; j++) {
            const float *P = x + ((size_t)i * b->groups + j) * gsz;
            if (g->patches != KFAC_PATCHES_POINTWISE) {
                kfac_extract_patches(b, P, b->patches);
                P = b->patches;
            }
            b->kind->acc_a(b, j, P, b->T, 0);
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
    b->kind->acc_a(b, group, cols, b->T, 0);
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
        b->kind->acc_g(b, 0, d, batch, 1);
    } else {
        const size_t gsz = (size_t)b->n_g * b->T;
        for (int i = 0; i < batch; i++)
            for (int j = 0; j < b->groups; j++)
                b->kind->acc_g(b, j, d + ((size_t)i * b->groups + j) * gsz, b->T, 0);
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
    b->kind->acc_g(b, group, d, b->T, 0);
    if (group == 0)
        b->mG++;
    return KFAC_OK;
}

void kfac_block_clear_stats(kfac_block *b)
{
    if (!b)
        return;
    b->kind->clear(b);
    b->mA = b->mG = 0;
}

kfac_status kfac_block_update_cov(kfac_block *b, double decay)
{
    if (!b)
        return KFAC_ERR_NULL;
    if (!isfinite(decay) || decay < 0.0 || decay >= 1.0)
        return KFAC_ERR_INVALID_ARG;
    if (b->mA == 0 || b->mA != b->mG)
        return KFAC_ERR_STATE;
    const double inv_mt = 1.0 / ((double)b->mA * (double)b->T);
    kfac_status st = b->kind->fold(b, inv_mt, decay, !b->has_factors);
    if (st == KFAC_OK)
        b->has_factors = 1;
    kfac_block_clear_stats(b);
    return st;
}

/* ------------------------------------------------------------------ damping, inverses */

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

kfac_status kfac_block_register_inverse(kfac_block *b)
{
    if (!b)
        return KFAC_ERR_NULL;
    kfac_status st = b->kind->prepare(b, 1, -1.0);
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
    kfac_status st = b->kind->prepare(b, 0, exp);
    if (st != KFAC_OK)
        return st;
    b->mat_exp[b->nmat++] = exp;
    return KFAC_OK;
}

kfac_status kfac_block_update_inverses(kfac_block *b)
{
    if (!b)
        return KFAC_ERR_NULL;
    if (!b->has_factors)
        return KFAC_ERR_STATE;
    if (!b->inv_registered && b->nmat == 0)
        return KFAC_OK;
    kfac_status st = b->kind->invert(b);
    if (st == KFAC_OK && b->inv_registered)
        b->has_inverse = 1;
    return st;
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

static kfac_status check_vec_args(const kfac_block *b, const float *v_w, const float *v_b,
                                  const float *out_w, const float *out_b)
{
    if (!b || !v_w || !out_w)
        return KFAC_ERR_NULL;
    if (b->bias && (!v_b || !out_b))
        return KFAC_ERR_NULL;
    return KFAC_OK;
}

kfac_status kfac_block_multiply(kfac_block *b, const float *v_w, const float *v_b,
                                float *out_w, float *out_b)
{
    kfac_status st = check_vec_args(b, v_w, v_b, out_w, out_b);
    if (st != KFAC_OK)
        return st;
    if (!b->has_factors)
        return KFAC_ERR_STATE;
    return b->kind->apply(b, 1.0, v_w, v_b, out_w, out_b);
}

kfac_status kfac_block_multiply_inverse(kfac_block *b, const float *v_w, const float *v_b,
                                        float *out_w, float *out_b)
{
    kfac_status st = check_vec_args(b, v_w, v_b, out_w, out_b);
    if (st != KFAC_OK)
        return st;
    if (!b->has_inverse)
        return KFAC_ERR_STATE;
    return b->kind->apply(b, -1.0, v_w, v_b, out_w, out_b);
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
    if (!found)
        return KFAC_ERR_STATE;
    /* the kind says STATE when no update_inverses has computed the power */
    return b->kind->apply(b, exp, v_w, v_b, out_w, out_b);
}

kfac_status kfac_block_full_fisher_block(const kfac_block *b, double *out)
{
    if (!b || !out)
        return KFAC_ERR_NULL;
    if (!b->has_factors)
        return KFAC_ERR_STATE;
    return b->kind->dense(b, out);
}

/* ------------------------------------------------------------------ state */

int kfac_block_state(kfac_block *b, kfac_ckpt_entry *e, int max)
{
    if (!b || max < 1 || !e)
        return b ? 1 + b->kind->state(b, NULL, 0) : 0;
    b->ck[0] = b->has_factors;
    b->ck[1] = b->has_inverse;
    b->ck[2] = b->retries;
    e[0].name = "block";
    e[0].type = KFAC_CKPT_I64;
    e[0].count = 3;
    e[0].data = b->ck;
    return 1 + b->kind->state(b, e + 1, max - 1);
}

kfac_status kfac_block_state_loaded(kfac_block *b)
{
    if (!b)
        return KFAC_ERR_NULL;
    if ((b->ck[0] != 0 && b->ck[0] != 1) || (b->ck[1] != 0 && b->ck[1] != 1) ||
        b->ck[2] < 0 || b->ck[2] > INT_MAX || (b->ck[1] && (!b->ck[0] || !b->inv_registered)))
        return KFAC_ERR_FORMAT;
    kfac_status st = b->kind->state_loaded(b);
    if (st != KFAC_OK)
        return st;
    b->has_factors = (int)b->ck[0];
    b->has_inverse = (int)b->ck[1];
    b->retries = (int)b->ck[2];
    /* statistics of a step in progress are not state: a save happens at a
     * step boundary */
    kfac_block_clear_stats(b);
    return KFAC_OK;
}
