/*
 * Tolerance helpers for the K-FAC tests (see kfac_tol.h for the constants and
 * why they have the values they have). Printing goes through cmocka's
 * print_error so it lands next to the failing test in the log.
 */
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "kfac_tol.h"

#define KFAC_TOL_SHOW 8

static int close_enough(double a, double e, double abs_tol, double rel_tol)
{
    if (isnan(e))
        return isnan(a);
    if (isinf(e))
        return a == e;
    if (!isfinite(a))
        return 0;
    return fabs(a - e) <= abs_tol + rel_tol * fabs(e);
}

static size_t report(size_t n, size_t bad, double abs_tol, double rel_tol, const char *what,
                     const char *file, int line)
{
    if (bad)
        print_error("%s:%d: %s: %zu of %zu elements differ (abs_tol %.3g, rel_tol %.3g)\n",
                    file, line, what ? what : "arrays", bad, n, abs_tol, rel_tol);
    return bad;
}

size_t kfac_tol_count_mismatches(const double *actual, const double *expected, size_t n,
                                 double abs_tol, double rel_tol, const char *what,
                                 const char *file, int line)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (close_enough(actual[i], expected[i], abs_tol, rel_tol))
            continue;
        if (bad < KFAC_TOL_SHOW)
            print_error("  %s[%zu]: actual %.9g expected %.9g diff %.3g\n", what ? what : "x",
                        i, actual[i], expected[i], actual[i] - expected[i]);
        bad++;
    }
    return report(n, bad, abs_tol, rel_tol, what, file, line);
}

size_t kfac_tol_count_mismatches_f(const float *actual, const double *expected, size_t n,
                                   double abs_tol, double rel_tol, const char *what,
                                   const char *file, int line)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        double a = actual[i];
        if (close_enough(a, expected[i], abs_tol, rel_tol))
            continue;
        if (bad < KFAC_TOL_SHOW)
            print_error("  %s[%zu]: actual %.9g expected %.9g diff %.3g\n", what ? what : "x",
                        i, a, expected[i], a - expected[i]);
        bad++;
    }
    return report(n, bad, abs_tol, rel_tol, what, file, line);
}

void kfac_tol_fail(const char *file, int line)
{
    _fail(file, line);
}

double kfac_tol_max_abs(const double *x, size_t n)
{
    double m = 0.0;
    for (size_t i = 0; i < n; i++)
        if (fabs(x[i]) > m)
            m = fabs(x[i]);
    return m;
}
