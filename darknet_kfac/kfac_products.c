/*
 * Products of the Kronecker kind with (w, bias) vectors in Darknet's layout
 * (sem. 4): the damped block, its inverse (float or double factored
 * inverses, or the eigenbasis for exact damping) and its registered powers,
 * and the dense block for tests. Each group is loaded into an n_g x kb
 * matrix V, multiplied on both sides, and stored back, so out may alias v.
 * The (w, bias) <-> parameter-vector layout of kfac.h is here too.
 */
#include "kfac_internal.h"
#include "kfac_linalg.h"

#include <math.h>
#include <string.h>

/* ------------------------------------------------------------------ layout */

void kfac_load_group(const kfac_block *b, int j, const float *w, const float *bias, double *V)
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

void kfac_store_group(const kfac_block *b, int j, const double *V, float *w, float *bias)
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

void kfac_load_group_f(const kfac_block *b, int j, const float *w, const float *bias, float *V)
{
    for (int r = 0; r < b->n_g; r++) {
        memcpy(V + (size_t)r * b->kb, w + ((size_t)j * b->n_g + r) * b->k, sizeof(float) * b->k);
        if (b->bias)
            V[(size_t)r * b->kb + b->k] = bias[(size_t)j * b->n_g + r];
    }
}

void kfac_store_group_f(const kfac_block *b, int j, const float *V, float *w, float *bias)
{
    for (int r = 0; r < b->n_g; r++) {
        memcpy(w + ((size_t)j * b->n_g + r) * b->k, V + (size_t)r * b->kb, sizeof(float) * b->k);
        if (b->bias)
            bias[(size_t)j * b->n_g + r] = V[(size_t)r * b->kb + b->k];
    }
}

kfac_status kfac_block_pack(const kfac_block *b, const float *w, const float *bias, double *flat)
{
    if (!b || !w || !flat || (b->bias && !bias))
        return KFAC_ERR_NULL;
    for (int j = 0; j < b->groups; j++)
        kfac_load_group(b, j, w, bias, flat + (size_t)j * b->n_g * b->kb);
    return KFAC_OK;
}

kfac_status kfac_block_unpack(const kfac_block *b, const double *flat, float *w, float *bias)
{
    if (!b || !w || !flat || (b->bias && !bias))
        return KFAC_ERR_NULL;
    for (int j = 0; j < b->groups; j++)
        kfac_store_group(b, j, flat + (size_t)j * b->n_g * b->kb, w, bias);
    return KFAC_OK;
}

/* ------------------------------------------------------------------ Kronecker products */

enum eig_mode { EIG_EXACT, EIG_FACTORED };

/* v2 = QG [ (QG^T v0 QA) .* f ] QA^T with the live eigendecomposition of
 * group j; f = (T dG dA^T + lam)^e (exact) or T^e (dG+lamG)^e (dA+lamA)^e. */
static void eig_apply(kfac_block *b, int j, enum eig_mode mode, double e)
{
    kfac_kron *K = b->impl;
    const int m = b->n_g, n = b->kb;
    const double *EA = K->EA + (size_t)j * kfac_sq(n), *EG = K->EG + (size_t)j * kfac_sq(m);
    const double *dA = K->dA + (size_t)j * n, *dG = K->dG + (size_t)j * m;
    kl_dgemm(0, 0, m, n, m, 1.0, EG, m, K->v0, n, 0.0, K->v1, n);
    kl_dgemm(0, 1, m, n, n, 1.0, K->v1, n, EA, n, 0.0, K->v2, n);
    const double T = b->T;
    for (int r = 0; r < m; r++)
        for (int c = 0; c < n; c++) {
            double f;
            if (mode == EIG_EXACT) {
                double x = T * dG[r] * dA[c] + b->lam;
                f = e == -1.0 ? 1.0 / x : pow(x, e);
            } else {
                double x = T * (dG[r] + K->lamG[j]) * (dA[c] + K->lamA[j]);
                f = e == -1.0 ? 1.0 / x : pow(x, e);
            }
            K->v2[(size_t)r * n + c] *= f;
        }
    kl_dgemm(1, 0, m, n, m, 1.0, EG, m, K->v2, n, 0.0, K->v1, n);
    kl_dgemm(0, 0, m, n, n, 1.0, K->v1, n, EA, n, 0.0, K->v2, n);
}

static kfac_status multiply(kfac_block *b, const float *v_w, const float *v_b, float *out_w,
                            float *out_b)
{
    kfac_kron *K = b->impl;
    const int m = b->n_g, n = b->kb;
    const double T = b->T;
    const size_t mn = (size_t)m * n;
    for (int j = 0; j < b->groups; j++) {
        const double *A = K->A + (size_t)j * kfac_sq(n), *G = K->G + (size_t)j * kfac_sq(m);
        kfac_load_group(b, j, v_w, v_b, K->v0);
        if (b->dtype == KFAC_DAMPING_FACTORED) {
            double lA, lG;
            kron_damping_split(b, j, b->lam, &lA, &lG, NULL);
            /* v1 = (G + lG I) V ; v2 = T v1 (A + lA I) */
            memcpy(K->v1, K->v0, sizeof(double) * mn);
            kl_dgemm(0, 0, m, n, m, 1.0, G, m, K->v0, n, lG, K->v1, n);
            memcpy(K->v2, K->v1, sizeof(double) * mn);
            kl_dgemm(0, 0, m, n, n, T, K->v1, n, A, n, T * lA, K->v2, n);
        } else {
            /* v2 = T G V A + lam V */
            kl_dgemm(0, 0, m, n, m, 1.0, G, m, K->v0, n, 0.0, K->v1, n);
            memcpy(K->v2, K->v0, sizeof(double) * mn);
            kl_dgemm(0, 0, m, n, n, T, K->v1, n, A, n, b->lam, K->v2, n);
        }
        if (!kfac_all_float_range(K->v2, mn))
            return KFAC_ERR_NOT_FINITE;
        kfac_store_group(b, j, K->v2, out_w, out_b);
    }
    return KFAC_OK;
}

static kfac_status multiply_inverse(kfac_block *b, const float *v_w, const float *v_b,
                                    float *out_w, float *out_b)
{
    kfac_kron *K = b->impl;
    const int m = b->n_g, n = b->kb;
    const size_t mn = (size_t)m * n;
    if (b->dtype == KFAC_DAMPING_FACTORED && b->float_inv) {
        /* Group j is loaded before its rows of out are stored, and no other
         * group reads them, so out may alias v. */
        for (int j = 0; j < b->groups; j++) {
            kfac_load_group_f(b, j, v_w, v_b, K->fv0);
            kl_sgemm(0, 0, m, n, m, 1.0f, K->Ginv_f + (size_t)j * kfac_sq(m), m, K->fv0, n, 0.0f,
                     K->fv1, n);
            kl_sgemm(0, 0, m, n, n, (float)(1.0 / b->T), K->fv1, n,
                     K->Ainv_f + (size_t)j * kfac_sq(n), n, 0.0f, K->fv0, n);
            if (!kfac_all_finite_f(K->fv0, mn))
                return KFAC_ERR_NOT_FINITE;
            kfac_store_group_f(b, j, K->fv0, out_w, out_b);
        }
        return KFAC_OK;
    }
    for (int j = 0; j < b->groups; j++) {
        kfac_load_group(b, j, v_w, v_b, K->v0);
        if (b->dtype == KFAC_DAMPING_FACTORED) {
            kl_dgemm(0, 0, m, n, m, 1.0, K->Ginv + (size_t)j * kfac_sq(m), m, K->v0, n, 0.0,
                     K->v1, n);
            kl_dgemm(0, 0, m, n, n, 1.0 / b->T, K->v1, n, K->Ainv + (size_t)j * kfac_sq(n), n,
                     0.0, K->v2, n);
        } else {
            eig_apply(b, j, EIG_EXACT, -1.0);
        }
        if (!kfac_all_float_range(K->v2, mn))
            return KFAC_ERR_NOT_FINITE;
        kfac_store_group(b, j, K->v2, out_w, out_b);
    }
    return KFAC_OK;
}

kfac_status kron_apply(kfac_block *b, double exp, const float *v_w, const float *v_b,
                       float *out_w, float *out_b)
{
    kfac_kron *K = b->impl;
    if (exp == 1.0)
        return multiply(b, v_w, v_b, out_w, out_b);
    if (exp == -1.0 && b->inv_registered)
        return multiply_inverse(b, v_w, v_b, out_w, out_b);
    if (!K->has_eig)
        return KFAC_ERR_STATE;
    const size_t mn = (size_t)b->n_g * b->kb;
    for (int j = 0; j < b->groups; j++) {
        kfac_load_group(b, j, v_w, v_b, K->v0);
        eig_apply(b, j, b->dtype == KFAC_DAMPING_EXACT ? EIG_EXACT : EIG_FACTORED, exp);
        if (!kfac_all_float_range(K->v2, mn))
            return KFAC_ERR_NOT_FINITE;
        kfac_store_group(b, j, K->v2, out_w, out_b);
    }
    return KFAC_OK;
}

kfac_status kron_dense(const kfac_block *b, double *out)
{
    const kfac_kron *K = b->impl;
    const size_t N = b->nparams, gp = (size_t)b->n_g * b->kb;
    memset(out, 0, sizeof(double) * N * N);
    for (int j = 0; j < b->groups; j++) {
        const double *A = K->A + (size_t)j * kfac_sq(b->kb), *G = K->G + (size_t)j * kfac_sq(b->n_g);
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
