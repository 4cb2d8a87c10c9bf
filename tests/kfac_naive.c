/*
 * Naive double-precision references for the K-FAC tests (interface and
 * conventions in kfac_naive.h). Written from the semantics page and the
 * public header, never from the library: every quantity is computed the
 * slowest obvious way so that a reader can check it against the formula.
 */
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "kfac_naive.h"

/* ------------------------------------------------------------ random */

void naive_rng_seed(naive_rng *r, uint64_t seed)
{
    r->s = seed;
}

uint64_t naive_rng_next(naive_rng *r)
{
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

double naive_rng_uniform(naive_rng *r)
{
    return (double)(naive_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

double naive_rng_sym(naive_rng *r)
{
    return 2.0 * naive_rng_uniform(r) - 1.0;
}

int naive_rng_int(naive_rng *r, int n)
{
    return (int)(naive_rng_next(r) % (uint64_t)n);
}

void naive_fill_float(naive_rng *r, float *x, size_t n, double scale)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(scale * naive_rng_sym(r));
}

void naive_fill_double(naive_rng *r, double *x, size_t n, double scale)
{
    for (size_t i = 0; i < n; i++)
        x[i] = scale * naive_rng_sym(r);
}

void *naive_alloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    assert_non_null(p);
    return p;
}

/* ------------------------------------------------------------ geometry */

int naive_out_dim(int in, int size, int stride, int pad, int dilation)
{
    return (in + 2 * pad - dilation * (size - 1) - 1) / stride + 1;
}

void naive_conv_dims(const kfac_conv_geom *g, int *k, int *kb, int *n_g, int *T, int *out_h,
                     int *out_w)
{
    int oh = naive_out_dim(g->h, g->size, g->stride, g->pad, g->dilation);
    int ow = naive_out_dim(g->w, g->size, g->stride, g->pad, g->dilation);
    int kk = g->c / g->groups * g->size * g->size;
    if (k) *k = kk;
    if (kb) *kb = kk + (g->bias ? 1 : 0);
    if (n_g) *n_g = g->n / g->groups;
    if (T) *T = oh * ow;
    if (out_h) *out_h = oh;
    if (out_w) *out_w = ow;
}

void naive_im2col(const float *x, const kfac_conv_geom *g, int group, double *cols)
{
    int k, T, oh, ow;
    naive_conv_dims(g, &k, NULL, NULL, &T, &oh, &ow);
    int cg = g->c / g->groups;
    for (int cl = 0; cl < cg; cl++) {
        int ch = group * cg + cl;
        for (int kh = 0; kh < g->size; kh++)
            for (int kw = 0; kw < g->size; kw++) {
                int row = (cl * g->size + kh) * g->size + kw;
                for (int oy = 0; oy < oh; oy++)
                    for (int ox = 0; ox < ow; ox++) {
                        int iy = oy * g->stride - g->pad + kh * g->dilation;
                        int ix = ox * g->stride - g->pad + kw * g->dilation;
                        double v = 0.0;
                        if (iy >= 0 && iy < g->h && ix >= 0 && ix < g->w)
                            v = x[((size_t)ch * g->h + iy) * g->w + ix];
                        cols[(size_t)row * T + oy * ow + ox] = v;
                    }
            }
    }
}

void naive_conv_factors(const kfac_conv_geom *g, const float *x, const float *d, int M,
                        int group, double *A, double *G)
{
    int k, kb, n_g, T;
    naive_conv_dims(g, &k, &kb, &n_g, &T, NULL, NULL);
    double *P = naive_alloc((size_t)kb * T, sizeof(double));
    memset(A, 0, sizeof(double) * kb * kb);
    memset(G, 0, sizeof(double) * n_g * n_g);
    for (int i = 0; i < M; i++) {
        naive_im2col(x + (size_t)i * g->c * g->h * g->w, g, group, P);
        if (g->bias)
            for (int t = 0; t < T; t++)
                P[(size_t)k * T + t] = 1.0; /* homogeneous coordinate, last */
        const float *Di = d + (size_t)i * g->n * T + (size_t)group * n_g * T;
        for (int t = 0; t < T; t++) {
            for (int a = 0; a < kb; a++)
                for (int b = 0; b < kb; b++)
                    A[a * kb + b] += P[(size_t)a * T + t] * P[(size_t)b * T + t];
            for (int r = 0; r < n_g; r++)
                for (int s = 0; s < n_g; s++)
                    G[r * n_g + s] += (double)Di[(size_t)r * T + t] * Di[(size_t)s * T + t];
        }
    }
    double norm = 1.0 / ((double)M * T);
    for (int i = 0; i < kb * kb; i++) A[i] *= norm;
    for (int i = 0; i < n_g * n_g; i++) G[i] *= norm;
    free(P);
}

void naive_fc_factors(int inputs, int outputs, int bias, const float *x, const float *d, int M,
                      double *A, double *G)
{
    int kb = inputs + (bias ? 1 : 0);
    memset(A, 0, sizeof(double) * kb * kb);
    memset(G, 0, sizeof(double) * outputs * outputs);
    for (int i = 0; i < M; i++) {
        for (int a = 0; a < kb; a++)
            for (int b = 0; b < kb; b++) {
                double xa = a < inputs ? x[(size_t)i * inputs + a] : 1.0;
                double xb = b < inputs ? x[(size_t)i * inputs + b] : 1.0;
                A[a * kb + b] += xa * xb;
            }
        for (int r = 0; r < outputs; r++)
            for (int s = 0; s < outputs; s++)
                G[r * outputs + s] += (double)d[(size_t)i * outputs + r] * d[(size_t)i * outputs + s];
    }
    for (int i = 0; i < kb * kb; i++) A[i] /= M;
    for (int i = 0; i < outputs * outputs; i++) G[i] /= M;
}

/* ------------------------------------------------------------ dense algebra */

void naive_eye(double *I, int n)
{
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++)
            I[i * n + j] = i == j;
}

void naive_psd(int n, double *out)
{
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++)
            out[i * n + j] = i == j ? i + 2.0 : 1.0;
}

void naive_random_spd(naive_rng *r, int n, double scale, double floor_, double *S)
{
    double *B = naive_alloc((size_t)n * n, sizeof(double));
    naive_fill_double(r, B, (size_t)n * n, 1.0);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            double t = 0.0;
            for (int l = 0; l < n; l++)
                t += B[i * n + l] * B[j * n + l];
            S[i * n + j] = scale * (t / n + (i == j ? floor_ : 0.0));
        }
    free(B);
}

void naive_kron(const double *X, int nx, const double *Y, int ny, double scale, double *out)
{
    int n = nx * ny;
    for (int r = 0; r < nx; r++)
        for (int s = 0; s < nx; s++)
            for (int a = 0; a < ny; a++)
                for (int b = 0; b < ny; b++)
                    out[(size_t)(r * ny + a) * n + s * ny + b] = scale * X[r * nx + s] * Y[a * ny + b];
}

void naive_matvec(const double *M, int n, const double *x, double *y)
{
    for (int i = 0; i < n; i++) {
        double s = 0.0;
        for (int j = 0; j < n; j++)
            s += M[(size_t)i * n + j] * x[j];
        y[i] = s;
    }
}

void naive_matmul(const double *X, const double *Y, int n, double *Z)
{
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            double s = 0.0;
            for (int l = 0; l < n; l++)
                s += X[(size_t)i * n + l] * Y[(size_t)l * n + j];
            Z[(size_t)i * n + j] = s;
        }
}

double naive_dot(const double *x, const double *y, size_t n)
{
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += x[i] * y[i];
    return s;
}

double naive_trace(const double *X, int n)
{
    double s = 0.0;
    for (int i = 0; i < n; i++)
        s += X[i * n + i];
    return s;
}

int naive_solve(const double *M, int n, const double *b, double *x)
{
    /* augmented [M | b], reduced to [I | x] */
    int w = n + 1;
    double *a = naive_alloc((size_t)n * w, sizeof(double));
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < n; j++)
            a[(size_t)i * w + j] = M[(size_t)i * n + j];
        a[(size_t)i * w + n] = b[i];
    }
    int rc = 0;
    for (int col = 0; col < n && rc == 0; col++) {
        int piv = col;
        for (int i = col + 1; i < n; i++)
            if (fabs(a[(size_t)i * w + col]) > fabs(a[(size_t)piv * w + col]))
                piv = i;
        if (a[(size_t)piv * w + col] == 0.0) {
            rc = -1;
            break;
        }
        if (piv != col)
            for (int j = 0; j < w; j++) {
                double t = a[(size_t)col * w + j];
                a[(size_t)col * w + j] = a[(size_t)piv * w + j];
                a[(size_t)piv * w + j] = t;
            }
        double p = a[(size_t)col * w + col];
        for (int j = 0; j < w; j++)
            a[(size_t)col * w + j] /= p;
        for (int i = 0; i < n; i++) {
            if (i == col)
                continue;
            double f = a[(size_t)i * w + col];
            if (f != 0.0)
                for (int j = 0; j < w; j++)
                    a[(size_t)i * w + j] -= f * a[(size_t)col * w + j];
        }
    }
    if (rc == 0)
        for (int i = 0; i < n; i++)
            x[i] = a[(size_t)i * w + n];
    free(a);
    return rc;
}

int naive_cholesky(const double *M, int n, double *L)
{
    memset(L, 0, sizeof(double) * n * n);
    for (int j = 0; j < n; j++) {
        double s = M[(size_t)j * n + j];
        for (int l = 0; l < j; l++)
            s -= L[(size_t)j * n + l] * L[(size_t)j * n + l];
        if (!(s > 0.0))
            return -1;
        L[(size_t)j * n + j] = sqrt(s);
        for (int i = j + 1; i < n; i++) {
            double t = M[(size_t)i * n + j];
            for (int l = 0; l < j; l++)
                t -= L[(size_t)i * n + l] * L[(size_t)j * n + l];
            L[(size_t)i * n + j] = t / L[(size_t)j * n + j];
        }
    }
    return 0;
}

void naive_cholesky_solve(const double *L, int n, const double *b, double *x)
{
    double *y = naive_alloc(n, sizeof(double));
    for (int i = 0; i < n; i++) {
        double s = b[i];
        for (int l = 0; l < i; l++)
            s -= L[(size_t)i * n + l] * y[l];
        y[i] = s / L[(size_t)i * n + i];
    }
    for (int i = n - 1; i >= 0; i--) {
        double s = y[i];
        for (int l = i + 1; l < n; l++)
            s -= L[(size_t)l * n + i] * x[l];
        x[i] = s / L[(size_t)i * n + i];
    }
    free(y);
}

void naive_jacobi_eigen(const double *S, int n, double *d, double *V)
{
    double *a = naive_alloc((size_t)n * n, sizeof(double));
    memcpy(a, S, sizeof(double) * n * n);
    naive_eye(V, n);
    double total = 0.0;
    for (int i = 0; i < n * n; i++)
        total += a[i] * a[i];
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0.0;
        for (int p = 0; p < n; p++)
            for (int q = p + 1; q < n; q++)
                off += a[(size_t)p * n + q] * a[(size_t)p * n + q];
        if (off <= 1e-32 * total || off == 0.0)
            break;
        for (int p = 0; p < n; p++)
            for (int q = p + 1; q < n; q++) {
                double apq = a[(size_t)p * n + q];
                if (apq == 0.0)
                    continue;
                /* rotation angle phi with cot(2 phi) = theta zeroes a_pq */
                double theta = (a[(size_t)q * n + q] - a[(size_t)p * n + p]) / (2.0 * apq);
                double t;
                if (fabs(theta) > 1e150)
                    t = 0.5 / theta;
                else
                    t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
                double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
                for (int k = 0; k < n; k++) { /* columns: A J */
                    double akp = a[(size_t)k * n + p], akq = a[(size_t)k * n + q];
                    a[(size_t)k * n + p] = c * akp - s * akq;
                    a[(size_t)k * n + q] = s * akp + c * akq;
                }
                for (int k = 0; k < n; k++) { /* rows: J^T (A J) */
                    double apk = a[(size_t)p * n + k], aqk = a[(size_t)q * n + k];
                    a[(size_t)p * n + k] = c * apk - s * aqk;
                    a[(size_t)q * n + k] = s * apk + c * aqk;
                }
                for (int k = 0; k < n; k++) { /* V J */
                    double vkp = V[(size_t)k * n + p], vkq = V[(size_t)k * n + q];
                    V[(size_t)k * n + p] = c * vkp - s * vkq;
                    V[(size_t)k * n + q] = s * vkp + c * vkq;
                }
            }
    }
    for (int i = 0; i < n; i++)
        d[i] = a[(size_t)i * n + i];
    free(a);
}

void naive_sym_matpower(const double *S, int n, double e, double *out)
{
    double *d = naive_alloc(n, sizeof(double));
    double *V = naive_alloc((size_t)n * n, sizeof(double));
    naive_jacobi_eigen(S, n, d, V);
    for (int j = 0; j < n; j++)
        d[j] = pow(d[j] < 0.0 ? 0.0 : d[j], e);
    for (int i = 0; i < n; i++)
        for (int l = 0; l < n; l++) {
            double s = 0.0;
            for (int j = 0; j < n; j++)
                s += V[(size_t)i * n + j] * d[j] * V[(size_t)l * n + j];
            out[(size_t)i * n + l] = s;
        }
    free(d);
    free(V);
}

/* ------------------------------------------------------------ K-FAC block */

void naive_factored_damping(const double *A, int kb, const double *G, int n_g, int T,
                            double lam, double *lam_A, double *lam_G, double *pi)
{
    double p = sqrt((naive_trace(A, kb) / kb) / (naive_trace(G, n_g) / n_g));
    double root = sqrt(lam / T);
    if (pi) *pi = p;
    if (lam_A) *lam_A = root * p;
    if (lam_G) *lam_G = root / p;
}

void naive_full_fisher(int groups, int n_g, int kb, int T, const double *A_all,
                       const double *G_all, double *F)
{
    int nb = n_g * kb, n = groups * nb;
    double *blk = naive_alloc((size_t)nb * nb, sizeof(double));
    memset(F, 0, sizeof(double) * n * n);
    for (int j = 0; j < groups; j++) {
        naive_kron(G_all + (size_t)j * n_g * n_g, n_g, A_all + (size_t)j * kb * kb, kb, T, blk);
        for (int r = 0; r < nb; r++)
            for (int s = 0; s < nb; s++)
                F[(size_t)(j * nb + r) * n + j * nb + s] = blk[(size_t)r * nb + s];
    }
    free(blk);
}

void naive_damped_block(kfac_damping_type type, int groups, int n_g, int kb, int T,
                        const double *A_all, const double *G_all, double lam, double *D)
{
    int n = groups * n_g * kb;
    if (type == KFAC_DAMPING_EXACT) {
        naive_full_fisher(groups, n_g, kb, T, A_all, G_all, D);
        for (int i = 0; i < n; i++)
            D[(size_t)i * n + i] += lam;
        return;
    }
    double *Ad = naive_alloc((size_t)groups * kb * kb, sizeof(double));
    double *Gd = naive_alloc((size_t)groups * n_g * n_g, sizeof(double));
    for (int j = 0; j < groups; j++) {
        const double *A = A_all + (size_t)j * kb * kb, *G = G_all + (size_t)j * n_g * n_g;
        double la, lg;
        naive_factored_damping(A, kb, G, n_g, T, lam, &la, &lg, NULL);
        for (int i = 0; i < kb * kb; i++)
            Ad[(size_t)j * kb * kb + i] = A[i] + (i % (kb + 1) == 0 ? la : 0.0);
        for (int i = 0; i < n_g * n_g; i++)
            Gd[(size_t)j * n_g * n_g + i] = G[i] + (i % (n_g + 1) == 0 ? lg : 0.0);
    }
    naive_full_fisher(groups, n_g, kb, T, Ad, Gd, D);
    free(Ad);
    free(Gd);
}

void naive_pack(int groups, int n_g, int k, int bias, const float *w, const float *b,
                double *flat)
{
    size_t p = 0;
    for (int j = 0; j < groups; j++)
        for (int r = 0; r < n_g; r++) {
            int f = j * n_g + r;
            for (int c = 0; c < k; c++)
                flat[p++] = w[(size_t)f * k + c];
            if (bias)
                flat[p++] = b[f];
        }
}

void naive_unpack(int groups, int n_g, int k, int bias, const double *flat, double *w, double *b)
{
    size_t p = 0;
    for (int j = 0; j < groups; j++)
        for (int r = 0; r < n_g; r++) {
            int f = j * n_g + r;
            for (int c = 0; c < k; c++)
                w[(size_t)f * k + c] = flat[p++];
            if (bias)
                b[f] = flat[p++];
        }
}

void naive_bias_mask(int groups, int n_g, int k, int bias, unsigned char *mask)
{
    size_t p = 0;
    for (int j = 0; j < groups; j++)
        for (int r = 0; r < n_g; r++) {
            for (int c = 0; c < k; c++)
                mask[p++] = 0;
            if (bias)
                mask[p++] = 1;
        }
}

void naive_apply_power(const double *D, int n, double e, const double *v, double *out)
{
    if (e == 1.0) {
        naive_matvec(D, n, v, out);
    } else if (e == -1.0) {
        int rc = naive_solve(D, n, v, out);
        assert_int_equal(rc, 0);
    } else {
        double *P = naive_alloc((size_t)n * n, sizeof(double));
        naive_sym_matpower(D, n, e, P);
        naive_matvec(P, n, v, out);
        free(P);
    }
}

void naive_kfac_step(naive_step_layer *L, int nl, double eta, double mu, double wd, int batch,
                     double C, double *nu_out, double *gdd_out)
{
    double **g = naive_alloc(nl, sizeof(double *));
    double **delta = naive_alloc(nl, sizeof(double *));
    double gdd = 0.0;
    for (int l = 0; l < nl; l++) {
        int n = L[l].n;
        g[l] = naive_alloc(n, sizeof(double));
        delta[l] = naive_alloc(n, sizeof(double));
        for (int i = 0; i < n; i++)
            g[l][i] = -L[l].grad[i] / batch + (L[l].is_bias[i] ? 0.0 : wd * L[l].W[i]);
        assert_int_equal(naive_solve(L[l].D, n, g[l], delta[l]), 0);
        gdd += naive_dot(g[l], delta[l], n);
    }
    double nu = 1.0;
    if (C > 0.0) {
        nu = sqrt(C / (eta * eta * gdd));
        if (nu > 1.0)
            nu = 1.0;
    }
    for (int l = 0; l < nl; l++) {
        for (int i = 0; i < L[l].n; i++) {
            L[l].V[i] = mu * L[l].V[i] + nu * delta[l][i];
            L[l].W[i] -= eta * L[l].V[i];
        }
        free(g[l]);
        free(delta[l]);
    }
    free(g);
    free(delta);
    if (nu_out) *nu_out = nu;
    if (gdd_out) *gdd_out = gdd;
}
