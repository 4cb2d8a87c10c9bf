/*
 * BLAS/LAPACK wrappers for the K-FAC library: the only translation unit that
 * talks to cblas and LAPACKE. LAPACK is reached through the *_work entry points
 * with column-major layout so that LAPACKE never allocates: workspaces are
 * sized by kl_dsyevd_query when a block registers what it needs, and passed in
 * on every call.
 */
#include "kfac_linalg.h"

#include <cblas.h>
#include <lapacke.h>

void kl_ssyrk_acc(int n, int kd, const float *a, int lda, float *c, int ldc)
{
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, n, kd, 1.0f, a, lda, 1.0f, c, ldc);
}

void kl_ssyrk_acc_t(int n, int kd, const float *a, int lda, float *c, int ldc)
{
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, n, kd, 1.0f, a, lda, 1.0f, c, ldc);
}

void kl_sgemv_acc(int m, int n, const float *a, int lda, const float *x, float *y, int incy)
{
    cblas_sgemv(CblasRowMajor, CblasNoTrans, m, n, 1.0f, a, lda, x, 1, 1.0f, y, incy);
}

void kl_saxpy(int n, float alpha, const float *x, int incx, float *y, int incy)
{
    cblas_saxpy(n, alpha, x, incx, y, incy);
}

void kl_sgemm(int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
              const float *b, int ldb, float beta, float *c, int ldc)
{
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void kl_dgemm(int ta, int tb, int m, int n, int k, double alpha, const double *a, int lda,
              const double *b, int ldb, double beta, double *c, int ldc)
{
    cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

int kl_dpotrf(int n, double *a)
{
    return (int)LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U', n, a, n);
}

int kl_dpotri(int n, double *a)
{
    return (int)LAPACKE_dpotri_work(LAPACK_COL_MAJOR, 'U', n, a, n);
}

void kl_symmetrize_cm_upper(int n, double *a)
{
    /* Column-major upper (i <= j) is a[i + j*n]; mirror it to a[j + i*n]. */
    for (int j = 0; j < n; j++)
        for (int i = 0; i < j; i++)
            a[j + (size_t)i * n] = a[i + (size_t)j * n];
}

int kl_dsyevd_query(int n, int *lwork, int *liwork)
{
    double wq = 0.0;
    lapack_int iq = 0;
    double dummy_a = 0.0, dummy_w = 0.0;
    lapack_int info = LAPACKE_dsyevd_work(LAPACK_COL_MAJOR, 'V', 'U', n, &dummy_a, n > 0 ? n : 1,
                                          &dummy_w, &wq, -1, &iq, -1);
    if (info != 0)
        return (int)info;
    /* LAPACK documents these minima for jobz = 'V'; never trust a smaller
     * query answer, since a short workspace is a silent memory error. */
    long lw = (long)wq, liw = (long)iq;
    long lmin = 1 + 6L * n + 2L * n * n, limin = 3 + 5L * n;
    if (lw < lmin) lw = lmin;
    if (liw < limin) liw = limin;
    *lwork = (int)lw;
    *liwork = (int)liw;
    return 0;
}

int kl_dsyevd(int n, double *a, double *w, double *work, int lwork, int *iwork, int liwork)
{
    return (int)LAPACKE_dsyevd_work(LAPACK_COL_MAJOR, 'V', 'U', n, a, n, w, work, lwork,
                                    (lapack_int *)iwork, liwork);
}
