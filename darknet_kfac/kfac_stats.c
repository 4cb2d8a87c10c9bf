/*
 * Statistics: patch extraction for conv layers and the Kronecker kind's
 * factor statistics. A step's statistics are accumulated in float straight
 * from Darknet's buffers (BLAS syrk on the upper triangle only, sem. 2) and
 * folded into double factors by an exponential moving average (sem. 3), the
 * first estimate taken as is.
 */
#include "kfac_internal.h"
#include "kfac_linalg.h"

#include <math.h>
#include <string.h>

/* The block's own patch extraction, with dilation; same row order and zero
 * padding as Darknet's im2col_cpu, rows skipped wholesale when they fall in
 * the padding. The IMAGE path is this with dilation 1 (checked at create), so
 * its buffer is exactly the one Darknet builds for accumulate_patches. */
void kfac_extract_patches(const kfac_block *b, const float *im, float *col)
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

/* sumA_j += [x;1][x;1]^T over the nvec vectors (upper triangle). */
void kron_acc_a(kfac_block *b, int group, const float *x, int nvec, int rows)
{
    kfac_kron *K = b->impl;
    float *S = K->sumA + (size_t)group * kfac_sq(b->kb);
    if (rows) {
        kl_ssyrk_acc_t(b->k, nvec, x, b->k, S, b->kb);
        if (b->bias) {
            for (int i = 0; i < nvec; i++)
                kl_saxpy(b->k, 1.0f, x + (size_t)i * b->k, 1, S + (b->kb - 1), b->kb);
            S[kfac_sq(b->kb) - 1] += (float)nvec;
        }
        return;
    }
    kl_ssyrk_acc(b->k, nvec, x, nvec, S, b->kb);
    if (b->bias) {
        /* the row sums come from the block's ones, sized T */
        kl_sgemv_acc(b->k, nvec, x, nvec, b->ones, S + (b->kb - 1), b->kb);
        S[kfac_sq(b->kb) - 1] += (float)nvec;
    }
}

void kron_acc_g(kfac_block *b, int group, const float *d, int nvec, int rows)
{
    kfac_kron *K = b->impl;
    float *S = K->sumG + (size_t)group * kfac_sq(b->n_g);
    if (rows)
        kl_ssyrk_acc_t(b->n_g, nvec, d, b->n_g, S, b->n_g);
    else
        kl_ssyrk_acc(b->n_g, nvec, d, nvec, S, b->n_g);
}

void kron_clear(kfac_block *b)
{
    kfac_kron *K = b->impl;
    memset(K->sumA, 0, sizeof(float) * (size_t)b->groups * kfac_sq(b->kb));
    memset(K->sumG, 0, sizeof(float) * (size_t)b->groups * kfac_sq(b->n_g));
}

int kron_raw_stats(kfac_block *b, kfac_raw_stats *out, int max)
{
    kfac_kron *K = b->impl;
    if (max >= 2) {
        out[0].data = K->sumA;
        out[0].dim = b->kb;
        out[0].count = b->groups;
        out[1].data = K->sumG;
        out[1].dim = b->n_g;
        out[1].count = b->groups;
    }
    return 2;
}

static int upper_finite_f(const float *S, int n, int groups)
{
    for (int j = 0; j < groups; j++, S += kfac_sq(n))
        for (int r = 0; r < n; r++)
            if (!kfac_all_finite_f(S + (size_t)r * n + r, (size_t)(n - r)))
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

kfac_status kron_fold(kfac_block *b, double inv_mt, double decay, int first)
{
    kfac_kron *K = b->impl;
    if (!upper_finite_f(K->sumA, b->kb, b->groups) || !upper_finite_f(K->sumG, b->n_g, b->groups))
        return KFAC_ERR_NOT_FINITE;
    for (int j = 0; j < b->groups; j++) {
        fold(K->A + (size_t)j * kfac_sq(b->kb), K->sumA + (size_t)j * kfac_sq(b->kb), b->kb,
             inv_mt, decay, first);
        fold(K->G + (size_t)j * kfac_sq(b->n_g), K->sumG + (size_t)j * kfac_sq(b->n_g), b->n_g,
             inv_mt, decay, first);
    }
    return KFAC_OK;
}

/* ------------------------------------------------------------------ factor access */

kfac_status kfac_block_get_factors(const kfac_block *b, int group, double *A, double *G)
{
    kfac_status st = kron_group_check(b, group, 1);
    if (st != KFAC_OK)
        return st;
    const kfac_kron *K = b->impl;
    if (A)
        memcpy(A, K->A + (size_t)group * kfac_sq(b->kb), sizeof(double) * kfac_sq(b->kb));
    if (G)
        memcpy(G, K->G + (size_t)group * kfac_sq(b->n_g), sizeof(double) * kfac_sq(b->n_g));
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
    if (!A || !G)
        return KFAC_ERR_NULL;
    kfac_status st = kron_group_check(b, group, 0);
    if (st != KFAC_OK)
        return st;
    if (!kfac_all_finite_d(A, kfac_sq(b->kb)) || !kfac_all_finite_d(G, kfac_sq(b->n_g)))
        return KFAC_ERR_NOT_FINITE;
    if (!symmetric(A, b->kb) || !symmetric(G, b->n_g))
        return KFAC_ERR_INVALID_ARG;
    kfac_kron *K = b->impl;
    memcpy(K->A + (size_t)group * kfac_sq(b->kb), A, sizeof(double) * kfac_sq(b->kb));
    memcpy(K->G + (size_t)group * kfac_sq(b->n_g), G, sizeof(double) * kfac_sq(b->n_g));
    b->has_factors = 1;
    return KFAC_OK;
}
