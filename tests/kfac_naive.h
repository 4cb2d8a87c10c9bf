/*
 * Independent double-precision references for the K-FAC tests, written from
 * shared/reference/kfac-semantics.md and kfac.h only: naive im2col, factor
 * statistics by brute force over examples and locations, dense Kronecker
 * blocks in the header's parameter-vector order, Gauss-Jordan and Cholesky
 * solves, a cyclic Jacobi eigen solver, symmetric matrix powers and the
 * section-5 optimizer step. Everything is plain loops; speed is irrelevant,
 * obviousness is the point. Matrices are row-major doubles.
 */
#ifndef KFAC_NAIVE_H
#define KFAC_NAIVE_H

#include <stddef.h>
#include <stdint.h>

#include "kfac.h"

/* ---- deterministic random numbers (splitmix64) */
typedef struct { uint64_t s; } naive_rng;
void     naive_rng_seed(naive_rng *r, uint64_t seed);
uint64_t naive_rng_next(naive_rng *r);
double   naive_rng_uniform(naive_rng *r);          /* [0, 1) */
double   naive_rng_sym(naive_rng *r);              /* [-1, 1) */
int      naive_rng_int(naive_rng *r, int n);       /* [0, n) */
void     naive_fill_float(naive_rng *r, float *x, size_t n, double scale);
void     naive_fill_double(naive_rng *r, double *x, size_t n, double scale);

/* calloc that fails the test on NULL; free with free(). */
void *naive_alloc(size_t n, size_t size);

/* ---- convolution geometry */
int naive_out_dim(int in, int size, int stride, int pad, int dilation);
/* k = c/groups*size*size, kb = k + bias, n_g = n/groups, T = out_h*out_w */
void naive_conv_dims(const kfac_conv_geom *g, int *k, int *kb, int *n_g, int *T,
                     int *out_h, int *out_w);

/* im2col of one example, one group: cols is k x T, rows (channel, kh, kw),
 * zero where the kernel tap falls in the padding. */
void naive_im2col(const float *x_example, const kfac_conv_geom *g, int group, double *cols);

/* Factors of one group (sem. 2) by brute force: A (kb x kb) with the bias
 * homogeneous coordinate last, G (n_g x n_g); both divided by M*T.
 * x: M*c*h*w floats NCHW; d: M*n*T floats NCHW. */
void naive_conv_factors(const kfac_conv_geom *g, const float *x, const float *d, int M,
                        int group, double *A, double *G);
/* Connected layer: x M*inputs, d M*outputs, T = 1. */
void naive_fc_factors(int inputs, int outputs, int bias, const float *x, const float *d,
                      int M, double *A, double *G);

/* ---- dense linear algebra */
void naive_eye(double *I, int n);
void naive_psd(int n, double *out);          /* ones, diagonal 2, 3, ..., n+1 */
/* S = scale * (B B^T/n + floor*I) with B n x n uniform in [-1, 1) drawn row by
 * row from r: SPD with eigenvalues in [floor*scale, ~(1+floor)*scale*n/3],
 * i.e. well conditioned. */
void naive_random_spd(naive_rng *r, int n, double scale, double floor_, double *S);
void naive_kron(const double *X, int nx, const double *Y, int ny, double scale, double *out);
void naive_matvec(const double *M, int n, const double *x, double *y);
void naive_matmul(const double *X, const double *Y, int n, double *Z); /* square */
double naive_dot(const double *x, const double *y, size_t n);
double naive_trace(const double *X, int n);
/* Gauss-Jordan with partial pivoting: x = M^-1 b. Returns 0, or -1 if singular. */
int naive_solve(const double *M, int n, const double *b, double *x);
/* L L^T = M, L lower (upper part zeroed). Returns 0, or -1 if not PD. */
int naive_cholesky(const double *M, int n, double *L);
/* Solves L L^T x = b with a factor from naive_cholesky. */
void naive_cholesky_solve(const double *L, int n, const double *b, double *x);
/* Cyclic Jacobi: S = V diag(d) V^T, column j of V (V[i*n+j]) is eigenvector j. */
void naive_jacobi_eigen(const double *S, int n, double *d, double *V);
/* S^e for symmetric S via Jacobi, eigenvalues below zero clamped to zero. */
void naive_sym_matpower(const double *S, int n, double e, double *out);

/* ---- K-FAC block references */

/* Sem. 4: pi, lam_A, lam_G for one group. */
void naive_factored_damping(const double *A, int kb, const double *G, int n_g, int T,
                            double lam, double *lam_A, double *lam_G, double *pi);

/* Dense undamped F = T*kron(G_j, A_j), block-diagonal over groups, nparams =
 * groups*n_g*kb. A_all: groups consecutive kb*kb matrices, G_all: n_g*n_g. */
void naive_full_fisher(int groups, int n_g, int kb, int T, const double *A_all,
                       const double *G_all, double *F);

/* Dense damped block per sem. 4: factored -> blockdiag_j T*kron(G_j + lam_G I,
 * A_j + lam_A I) with the pi split of each group; exact -> F + lam I. */
void naive_damped_block(kfac_damping_type type, int groups, int n_g, int kb, int T,
                        const double *A_all, const double *G_all, double lam, double *D);

/* Darknet (w, bias) <-> parameter vector (kfac.h "Parameter vector"). */
void naive_pack(int groups, int n_g, int k, int bias, const float *w, const float *b,
                double *flat);
void naive_unpack(int groups, int n_g, int k, int bias, const double *flat, double *w,
                  double *b);
/* 1 at parameter-vector positions that are biases. */
void naive_bias_mask(int groups, int n_g, int k, int bias, unsigned char *mask);

/* out = D^e v on the dense damped block, e = +1 (matvec), -1 (Gauss-Jordan)
 * or anything else (Jacobi power). */
void naive_apply_power(const double *D, int n, double e, const double *v, double *out);

/* Sem. 5 for one optimizer step over several layers, in parameter-vector
 * order. D: dense damped block (n x n); W, V updated in place; grad is
 * minus the batch-summed gradient; its entries are not modified here. */
typedef struct {
    int n;
    const double *D;
    const unsigned char *is_bias;
    double *W;
    double *V;
    const double *grad;
} naive_step_layer;
void naive_kfac_step(naive_step_layer *layers, int nl, double eta, double mu, double wd,
                     int batch, double C, double *nu_out, double *gdd_out);

#endif
