/*
 * Thin BLAS/LAPACK wrappers for the K-FAC library (internal).
 *
 * kfac_linalg.c is the only file that includes <cblas.h> and <lapacke.h>, so
 * the choice of BLAS, the integer types and the layout flags are decided in
 * one place. Float routines accumulate statistics; double routines work on
 * factors. Matrices are row-major unless a name says otherwise; the LAPACK
 * routines only ever see symmetric matrices, for which row- and column-major
 * storage coincide, so they are called column-major (no transposition copies
 * inside LAPACKE) and the caller symmetrizes afterwards.
 */
#ifndef KFAC_LINALG_H
#define KFAC_LINALG_H

/* C[upper, row-major, n x n] += A A^T, A n x kd with leading dimension lda. */
void kl_ssyrk_acc(int n, int kd, const float *a, int lda, float *c, int ldc);
/* C[upper] += A^T A, A kd x n with leading dimension lda. */
void kl_ssyrk_acc_t(int n, int kd, const float *a, int lda, float *c, int ldc);
/* y[0], y[incy], ... += A x, A m x n row-major. */
void kl_sgemv_acc(int m, int n, const float *a, int lda, const float *x, float *y, int incy);
/* y += alpha x with strides. */
void kl_saxpy(int n, float alpha, const float *x, int incx, float *y, int incy);

/* Row-major C = alpha op(A) op(B) + beta C; ta/tb nonzero mean transpose. */
void kl_sgemm(int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
              const float *b, int ldb, float beta, float *c, int ldc);
void kl_dgemm(int ta, int tb, int m, int n, int k, double alpha, const double *a, int lda,
              const double *b, int ldb, double beta, double *c, int ldc);

/* Cholesky factor and inverse of a symmetric n x n matrix in place. The
 * result is valid in the column-major upper triangle only (row-major lower);
 * kl_symmetrize_cm_upper fills the rest. Return LAPACK's info. */
int kl_dpotrf(int n, double *a);
int kl_dpotri(int n, double *a);
void kl_symmetrize_cm_upper(int n, double *a);

/* Workspace sizes for kl_dsyevd on an n x n matrix (vectors wanted). Returns
 * LAPACK's info of the query. */
int kl_dsyevd_query(int n, int *lwork, int *liwork);
/* Eigen-decomposition in place with caller workspace: on return, w holds the
 * eigenvalues ascending and row i of `a` (read row-major) is the eigenvector
 * of w[i], i.e. `a` row-major is Q^T. Returns LAPACK's info. */
int kl_dsyevd(int n, double *a, double *w, double *work, int lwork, int *iwork, int liwork);

#endif /* KFAC_LINALG_H */
