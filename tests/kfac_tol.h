/*
 * Mixed absolute + relative tolerance checks for the K-FAC library tests.
 * The library takes and returns float while its references here run in
 * double, so every comparison needs a tolerance; the named constants below
 * say where each value comes from, and a failing comparison prints the number
 * of mismatches and the first few of them (index, actual, expected, diff)
 * before failing the cmocka test at the caller's line.
 */
#ifndef KFAC_TOL_H
#define KFAC_TOL_H

#include <stddef.h>

/* float's unit roundoff (2^-24); the library's float API rounds every input
 * and output once at this level. */
#define TOL_FLOAT_EPS 5.96e-8

/* Factor statistics: the library may accumulate sum_i P_i P_i^T in float
 * (sgemm over the T locations of an example) before going to double. For the
 * geometries used here M*T <= ~250 terms, so the worst-case float
 * accumulation error is ~250*eps_f ~ 1.5e-5 of sum|terms|; by Cauchy-Schwarz
 * sum|terms|/(M*T) <= max diagonal entry. Tests scale the absolute tolerance
 * by max|diag| and use the same number as the relative one. Typical errors
 * (random signs) are ~sqrt(M*T)*eps_f ~ 1e-6, so 2e-5 still catches any
 * wrong term (one missing location changes an entry by ~1/(M*T) >= 4e-3). */
#define TOL_STATS 2e-5

/* Same sums in a different order (towers vs one batch, per-example patches
 * vs the batch call, IMAGE vs GENERAL im2col): only rounding may differ. */
#define TOL_SAME_SUMS 2e-5

/* Products with the damped block (multiply, multiply_inverse, matpower):
 * v is float, factors/inverses are double, the output is rounded to float.
 * The references use well-conditioned factors (condition number of the
 * damped block <= ~1e3), so a double-precision implementation is off by a
 * few float ulps of the largest output; 2e-5 of max|expected| leaves room
 * for float rounding of intermediate (W V A)-style products of length <= 80,
 * while a wrong damping term or transposed factor changes outputs by > 1%.
 * precond_precision=float (the default) applies float copies of the inverses
 * with sgemm: error ~ cond * length * eps ~ 1e3 * 80 * 6e-8 in the worst
 * case, ~ 1e-5 in practice, so the same bound holds for both paths and each
 * product test runs with both. */
#define TOL_PRODUCT 2e-5

/* Optimizer step: g, Delta, v and W are float arrays; each goes through a
 * handful of float roundings after a double-precision solve. */
#define TOL_STEP 2e-5

/* Scalars computed in double from float data (nu, <g, Delta>, pi, lam_A). */
#define TOL_SCALAR 1e-5

/* The published test vectors of the semantics page are printed with 6
 * significant digits/decimals: half a unit of the last digit plus float
 * output rounding. */
#define TOL_VECTOR_ABS 1.5e-6

/* Dense double-precision references among themselves (Jacobi vs Gauss-Jordan
 * vs reconstruction): only double rounding, amplified by cond <= ~1e4. */
#define TOL_DENSE 1e-9

/* Returns the number of i with !(|a-e| <= abs_tol + rel_tol*|e|) (NaN/Inf in
 * actual counts as a mismatch unless expected is the same value) and prints a
 * report if nonzero. */
size_t kfac_tol_count_mismatches(const double *actual, const double *expected, size_t n,
                                 double abs_tol, double rel_tol, const char *what,
                                 const char *file, int line);
size_t kfac_tol_count_mismatches_f(const float *actual, const double *expected, size_t n,
                                   double abs_tol, double rel_tol, const char *what,
                                   const char *file, int line);
void kfac_tol_fail(const char *file, int line);

/* Fails the current cmocka test at the caller's line if any element differs. */
#define assert_close_arrays(actual, expected, n, abs_tol, rel_tol, what)                  \
    do {                                                                               \
        if (kfac_tol_count_mismatches((actual), (expected), (n), (abs_tol), (rel_tol),   \
                                      (what), __FILE__, __LINE__))                      \
            kfac_tol_fail(__FILE__, __LINE__);                                          \
    } while (0)

/* float actual vs double expected. */
#define assert_close_arrays_f(actual, expected, n, abs_tol, rel_tol, what)                \
    do {                                                                               \
        if (kfac_tol_count_mismatches_f((actual), (expected), (n), (abs_tol), (rel_tol), \
                                        (what), __FILE__, __LINE__))                    \
            kfac_tol_fail(__FILE__, __LINE__);                                          \
    } while (0)

#define assert_close_scalar(actual, expected, abs_tol, rel_tol, what)                      \
    do {                                                                               \
        double kfac_tol_a_ = (actual), kfac_tol_e_ = (expected);                        \
        assert_close_arrays(&kfac_tol_a_, &kfac_tol_e_, 1, (abs_tol), (rel_tol), (what)); \
    } while (0)

/* max |x_i| (0 for n == 0): used to scale absolute tolerances. */
double kfac_tol_max_abs(const double *x, size_t n);

#endif
