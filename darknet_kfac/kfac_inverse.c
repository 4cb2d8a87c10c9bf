/*
 * Damping and inverses of the Kronecker kind (sem. 4). Factored damping
 * splits lambda between the factors by the trace-norm pi and inverts
 * (A + lam_A I) and (G + lam_G I) by Cholesky in double; exact damping and
 * matrix powers use eigendecompositions. Results are computed into "stage"
 * buffers and swapped in only when every group succeeded, so a failed update
 * leaves the last good inverse in place. Workspaces are allocated when the
 * caller registers what it needs, never per step.
 */
#include "kfac_internal.h"
#include "kfac_alloc.h"
#include "kfac_linalg.h"

#include <math.h>
#include <string.h>

static double *grpA(const kfac_block *b, double *base, int j) { return base + (size_t)j * kfac_sq(b->kb); }
static double *grpG(const kfac_block *b, double *base, int j) { return base + (size_t)j * kfac_sq(b->n_g); }
static int maxdim(const kfac_block *b) { return b->kb > b->n_g ? b->kb : b->n_g; }

/* ------------------------------------------------------------------ damping */

void kron_damping_split(const kfac_block *b, int j, double lam, double *lamA, double *lamG,
                        double *pi_out)
{
    const kfac_kron *K = b->impl;
    const double *A = grpA(b, K->A, j), *G = grpG(b, K->G, j);
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
    kfac_status st = kron_group_check(b, group, 1);
    if (st != KFAC_OK)
        return st;
    kron_damping_split(b, group, b->lam, lam_A, lam_G, pi);
    return KFAC_OK;
}

/* ------------------------------------------------------------------ registration */

/* LAPACK workspace and eigen scratch for max(kb, n_g): needed by the eigen
 * path and by the factored inverse's eigen fallback. */
static kfac_status ensure_lapack_ws(kfac_block *b)
{
    kfac_kron *K = b->impl;
    if (K->lwork)
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
    escr = kfac_balloc(b, kfac_sq(maxdim(b)), sizeof(double));
    dscr = kfac_balloc(b, (size_t)maxdim(b), sizeof(double));
    lwork = kfac_balloc(b, (size_t)lw, sizeof(double));
    liwork = kfac_balloc(b, (size_t)liw, sizeof(int));
    if (!escr || !dscr || !lwork || !liwork)
        goto fail;
    K->escr = escr;
    K->dscr = dscr;
    K->lwork = lwork;
    K->liwork = liwork;
    K->lwork_n = lw;
    K->liwork_n = liw;
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
    kfac_kron *K = b->impl;
    if (K->EA)
        return KFAC_OK;
    kfac_status st = ensure_lapack_ws(b);
    if (st != KFAC_OK)
        return st;
    const size_t G = (size_t)b->groups;
    const size_t n[8] = {G * kfac_sq(b->kb), G * (size_t)b->kb, G * kfac_sq(b->n_g),
                         G * (size_t)b->n_g, G * kfac_sq(b->kb), G * (size_t)b->kb,
                         G * kfac_sq(b->n_g), G * (size_t)b->n_g};
    size_t before = b->bytes;
    double *p[8] = {0};
    for (int i = 0; i < 8; i++)
        if (!(p[i] = kfac_balloc(b, n[i], sizeof(double))))
            goto fail;
    K->EA = p[0]; K->dA = p[1]; K->EG = p[2]; K->dG = p[3];
    K->EA_st = p[4]; K->dA_st = p[5]; K->EG_st = p[6]; K->dG_st = p[7];
    return KFAC_OK;
fail:
    for (int i = 0; i < 8; i++)
        KFAC_FREE(p[i]);
    b->bytes = before;
    return KFAC_ERR_NOMEM;
}

static kfac_status ensure_inv(kfac_block *b)
{
    kfac_kron *K = b->impl;
    if (K->Ainv_st)
        return KFAC_OK;
    kfac_status st = ensure_lapack_ws(b);
    if (st != KFAC_OK)
        return st;
    const size_t G = (size_t)b->groups, nA = G * kfac_sq(b->kb), nG = G * kfac_sq(b->n_g);
    const size_t nv = (size_t)b->n_g * b->kb;
    size_t before = b->bytes;
    double *p[4] = {0};
    float *f[4] = {0};
    /* float products: the staged double inverse goes straight into the
     * float copy, so no live double inverse is kept */
    if (!b->float_inv) {
        p[0] = kfac_balloc(b, nA, sizeof(double));
        p[1] = kfac_balloc(b, nG, sizeof(double));
    }
    p[2] = kfac_balloc(b, nA, sizeof(double));
    p[3] = kfac_balloc(b, nG, sizeof(double));
    for (int i = 0; i < 4; i++)
        if (!p[i] && (i >= 2 || !b->float_inv))
            goto fail;
    if (b->float_inv) {
        f[0] = kfac_balloc(b, nA, sizeof(float));
        f[1] = kfac_balloc(b, nG, sizeof(float));
        f[2] = kfac_balloc(b, nv, sizeof(float));
        f[3] = kfac_balloc(b, nv, sizeof(float));
        for (int i = 0; i < 4; i++)
            if (!f[i])
                goto fail;
    }
    K->Ainv = p[0]; K->Ginv = p[1]; K->Ainv_st = p[2]; K->Ginv_st = p[3];
    K->Ainv_f = f[0]; K->Ginv_f = f[1]; K->fv0 = f[2]; K->fv1 = f[3];
    return KFAC_OK;
fail:
    for (int i = 0; i < 4; i++) {
        KFAC_FREE(p[i]);
        KFAC_FREE(f[i]);
    }
    b->bytes = before;
    return KFAC_ERR_NOMEM;
}

kfac_status kron_prepare(kfac_block *b, int inverse, double exp)
{
    (void)exp;
    if (inverse && b->dtype == KFAC_DAMPING_FACTORED)
        return ensure_inv(b);
    return ensure_eig(b);
}

/* ------------------------------------------------------------------ inverses */

/* out = (M + d I)^-1 for symmetric M (n x n): Cholesky, retried with d x10,
 * then the eigen path with eigenvalues clamped at 0 and the original d. */
static kfac_status damped_inverse(kfac_block *b, const double *M, int n, double d, double *out)
{
    kfac_kron *K = b->impl;
    const size_t nn = kfac_sq(n);
    double dd = d;
    for (int attempt = 0; attempt <= KFAC_CHOL_RETRIES; attempt++) {
        memcpy(out, M, sizeof(double) * nn);
        for (int i = 0; i < n; i++)
            out[(size_t)i * n + i] += dd;
        if (kl_dpotrf(n, out) == 0 && kl_dpotri(n, out) == 0) {
            kl_symmetrize_cm_upper(n, out);
            if (kfac_all_finite_d(out, nn))
                return KFAC_OK;
        }
        b->retries++; /* each further attempt, and finally the eigen fallback */
        dd *= 10.0;
    }
    memcpy(K->escr, M, sizeof(double) * nn);
    if (kl_dsyevd(n, K->escr, K->dscr, K->lwork, K->lwork_n, K->liwork, K->liwork_n) != 0)
        return KFAC_ERR_LAPACK;
    /* (M + dI)^-1 = S^T S with S = diag((max(w,0)+d)^-1/2) Q^T. */
    for (int i = 0; i < n; i++) {
        double e = fmax(K->dscr[i], 0.0) + d;
        if (!(e > 0.0) || !isfinite(e))
            return KFAC_ERR_LAPACK;
        double f = 1.0 / sqrt(e);
        for (int c = 0; c < n; c++)
            K->escr[(size_t)i * n + c] *= f;
    }
    kl_dgemm(1, 0, n, n, n, 1.0, K->escr, n, K->escr, n, 0.0, out, n);
    return kfac_all_finite_d(out, nn) ? KFAC_OK : KFAC_ERR_NOT_FINITE;
}

/* Eigendecomposition of a factor into E (rows = eigenvectors) and w, with
 * rounding-negative eigenvalues clamped to 0. */
static kfac_status eig_factor(kfac_block *b, const double *M, int n, double *E, double *w)
{
    kfac_kron *K = b->impl;
    memcpy(E, M, sizeof(double) * kfac_sq(n));
    if (kl_dsyevd(n, E, w, K->lwork, K->lwork_n, K->liwork, K->liwork_n) != 0)
        return KFAC_ERR_LAPACK;
    if (!kfac_all_finite_d(E, kfac_sq(n)) || !kfac_all_finite_d(w, (size_t)n))
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

kfac_status kron_invert(kfac_block *b)
{
    kfac_kron *K = b->impl;
    const int eig = b->nmat > 0 || (b->inv_registered && b->dtype == KFAC_DAMPING_EXACT);
    const int chol = b->inv_registered && b->dtype == KFAC_DAMPING_FACTORED;
    const size_t nA = (size_t)b->groups * kfac_sq(b->kb), nG = (size_t)b->groups * kfac_sq(b->n_g);
    if (!kfac_all_finite_d(K->A, nA) || !kfac_all_finite_d(K->G, nG))
        return KFAC_ERR_NOT_FINITE;
    for (int j = 0; j < b->groups; j++) {
        kfac_status st;
        kron_damping_split(b, j, b->lam, &K->lamA_st[j], &K->lamG_st[j], NULL);
        if (eig) {
            st = eig_factor(b, grpA(b, K->A, j), b->kb, grpA(b, K->EA_st, j),
                            K->dA_st + (size_t)j * b->kb);
            if (st == KFAC_OK)
                st = eig_factor(b, grpG(b, K->G, j), b->n_g, grpG(b, K->EG_st, j),
                                K->dG_st + (size_t)j * b->n_g);
            if (st != KFAC_OK)
                return st;
        }
        if (chol) {
            st = damped_inverse(b, grpA(b, K->A, j), b->kb, K->lamA_st[j], grpA(b, K->Ainv_st, j));
            if (st == KFAC_OK)
                st = damped_inverse(b, grpG(b, K->G, j), b->n_g, K->lamG_st[j],
                                    grpG(b, K->Ginv_st, j));
            if (st != KFAC_OK)
                return st;
        }
    }
    /* An inverse whose float copy would overflow is a failed update too. */
    if (chol && b->float_inv &&
        (!kfac_all_float_range(K->Ainv_st, nA) || !kfac_all_float_range(K->Ginv_st, nG)))
        return KFAC_ERR_NOT_FINITE;
    /* Everything succeeded: the staged results become the live ones. */
    SWAP(K->lamA, K->lamA_st);
    SWAP(K->lamG, K->lamG_st);
    if (eig) {
        SWAP(K->EA, K->EA_st);
        SWAP(K->dA, K->dA_st);
        SWAP(K->EG, K->EG_st);
        SWAP(K->dG, K->dG_st);
        K->has_eig = 1;
    }
    if (chol) {
        if (b->float_inv) {
            to_float(K->Ainv_st, K->Ainv_f, nA);
            to_float(K->Ginv_st, K->Ginv_f, nG);
        } else {
            SWAP(K->Ainv, K->Ainv_st);
            SWAP(K->Ginv, K->Ginv_st);
        }
    }
    return KFAC_OK;
}
