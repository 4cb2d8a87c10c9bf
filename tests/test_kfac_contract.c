/*
 * The API contract of kfac.h apart from the numbers: NULL pointers, invalid
 * geometries and arguments, calls in the wrong state, kfac_status_str, the
 * [kfac] config (defaults, kfac_config_check, strict kfac_config_set parsing
 * of every key and enum) and a deterministic mutation fuzz of
 * kfac_config_set: tens of thousands of random and mutated key/value strings
 * that must never crash, never leave a rejected input's mark on the config,
 * never accept a value kfac_config_check would refuse, and always
 * NUL-terminate the error message within errlen.
 * Config keys are assumed to be spelled like the kfac_config fields
 * ("damping", "cov_ema_decay", ..., "skip" for the skip list).
 */
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "kfac.h"
#include "kfac_naive.h"
#include "kfac_testutil.h"
#include "kfac_tol.h"

static kfac_conv_geom good_geom(void)
{
    return tu_geom(4, 6, 6, 4, 3, 1, 1, 1, 2, 1, KFAC_PATCHES_GENERAL);
}

/* Field-by-field equality (padding bytes of a struct copy may differ). */
static int config_equal(const kfac_config *a, const kfac_config *b)
{
    if (memcmp(&a->damping, &b->damping, sizeof(double)) ||
        memcmp(&a->cov_ema_decay, &b->cov_ema_decay, sizeof(double)) ||
        memcmp(&a->norm_constraint, &b->norm_constraint, sizeof(double)) ||
        memcmp(&a->momentum, &b->momentum, sizeof(double)) ||
        memcmp(&a->damping_omega, &b->damping_omega, sizeof(double)) ||
        memcmp(&a->min_damping, &b->min_damping, sizeof(double)) ||
        memcmp(&a->max_damping, &b->max_damping, sizeof(double)))
        return 0;
    if (a->cov_update_every != b->cov_update_every || a->invert_every != b->invert_every ||
        a->estimation_mode != b->estimation_mode || a->damping_type != b->damping_type ||
        a->nskip != b->nskip || a->max_failures != b->max_failures ||
        a->max_factor_dim != b->max_factor_dim ||
        a->precond_precision != b->precond_precision || a->cov_subsample != b->cov_subsample ||
        a->norm_constraint_lr != b->norm_constraint_lr || a->step_size != b->step_size ||
        a->damping_adapt_every != b->damping_adapt_every || a->curvature != b->curvature)
        return 0;
    for (int i = 0; i < KFAC_MAX_SKIP; i++)
        if (a->skip[i] != b->skip[i])
            return 0;
    return 1;
}

/* ------------------------------------------------------------------ status */

static void test_status_str(void **state)
{
    (void)state;
    for (int s = KFAC_OK; s <= KFAC_ERR_FORMAT; s++) {
        const char *m = kfac_status_str((kfac_status)s);
        assert_non_null(m);
        assert_true(strlen(m) > 0);
        for (int t = KFAC_OK; t < s; t++)
            assert_string_not_equal(m, kfac_status_str((kfac_status)t));
    }
    assert_non_null(kfac_status_str((kfac_status)(KFAC_ERR_FORMAT + 1)));
    assert_non_null(kfac_status_str((kfac_status)999));
    assert_non_null(kfac_status_str((kfac_status)-1));
}

/* ------------------------------------------------------------------ config */

static void test_config_default_and_check(void **state)
{
    (void)state;
    kfac_config c;
    memset(&c, 0x7f, sizeof c);
    kfac_config_default(&c);
    assert_true(c.damping == 0.001);
    assert_true(c.cov_ema_decay == 0.95);
    assert_int_equal(c.cov_update_every, 10);
    assert_int_equal(c.invert_every, 20);
    assert_true(c.norm_constraint == 0.0);
    assert_true(c.momentum < 0.0);
    assert_int_equal(c.estimation_mode, KFAC_ESTIMATION_SAMPLED);
    assert_int_equal(c.damping_type, KFAC_DAMPING_FACTORED);
    assert_int_equal(c.nskip, 0);
    assert_int_equal(c.max_failures, 10);
    assert_int_equal(c.max_factor_dim, 8192);
    assert_int_equal(c.precond_precision, KFAC_PRECISION_FLOAT);
    assert_int_equal(c.cov_subsample, 1);
    assert_int_equal(c.norm_constraint_lr, KFAC_CLIP_LR_CURRENT);
    assert_int_equal(c.step_size, KFAC_STEP_AUTO);
    assert_int_equal(c.damping_adapt_every, 5);
    assert_true(fabs(c.damping_omega - pow(19.0 / 20.0, 5)) < 1e-15);
    assert_true(c.min_damping == 1e-8 && c.max_damping == 1e4);
    assert_int_equal(c.curvature, KFAC_CURVATURE_EXACT);
    assert_null(kfac_config_check(&c));

    /* each field out of range: a message naming that field */
    static const char *const bad_field[] = {
        "damping", "damping", "damping", "cov_ema_decay", "cov_ema_decay", "cov_update_every",
        "invert_every", "norm_constraint", "momentum", "estimation_mode", "damping_type",
        "skip", "skip", "max_failures", "max_factor_dim", "precond_precision", "cov_subsample",
        "norm_constraint_lr", "step_size", "damping_adapt_every", "damping_omega",
        "damping_omega", "min_damping", "min_damping", "curvature",
    };
    for (int i = 0; i < (int)(sizeof bad_field / sizeof *bad_field); i++) {
        kfac_config_default(&c);
        switch (i) {
        case 0: c.damping = 0.0; break;
        case 1: c.damping = -1.0; break;
        case 2: c.damping = NAN; break;
        case 3: c.cov_ema_decay = 1.0; break;
        case 4: c.cov_ema_decay = -0.1; break;
        case 5: c.cov_update_every = 0; break;
        case 6: c.invert_every = 0; break;
        case 7: c.norm_constraint = -0.5; break;
        case 8: c.momentum = 1.0; break;
        case 9: c.estimation_mode = (kfac_estimation_mode)7; break;
        case 10: c.damping_type = (kfac_damping_type)5; break;
        case 11: c.nskip = -1; break;
        case 12: c.nskip = KFAC_MAX_SKIP + 1; break;
        case 13: c.max_failures = 0; break;
        case 14: c.max_factor_dim = -1; break;
        case 15: c.precond_precision = (kfac_precision)2; break;
        case 16: c.cov_subsample = 0; break;
        case 17: c.norm_constraint_lr = (kfac_clip_lr)3; break;
        case 18: c.step_size = (kfac_step_size)4; break;
        case 19: c.damping_adapt_every = -1; break;
        case 20: c.damping_omega = 1.0; break;
        case 21: c.damping_omega = 0.0; break;
        case 22: c.min_damping = 0.0; break;
        case 23: c.min_damping = 2 * c.max_damping; break;
        case 24: c.curvature = (kfac_curvature_kind)9; break;
        }
        const char *m = kfac_config_check(&c);
        if (!m)
            print_error("kfac_config_check accepted bad %s (case %d)\n", bad_field[i], i);
        assert_non_null(m);
        if (!strstr(m, bad_field[i]))
            print_error("message for %s: \"%s\"\n", bad_field[i], m);
        assert_non_null(strstr(m, bad_field[i]));
    }
    /* in-range corners are valid */
    kfac_config_default(&c);
    c.cov_ema_decay = 0.0;
    c.norm_constraint = 0.0;
    c.momentum = 0.0;
    c.max_failures = 1;
    c.damping_type = KFAC_DAMPING_EXACT;
    c.estimation_mode = KFAC_ESTIMATION_EMPIRICAL;
    c.nskip = KFAC_MAX_SKIP;
    for (int i = 0; i < KFAC_MAX_SKIP; i++)
        c.skip[i] = 3 * i; /* distinct: a duplicate index may be refused */
    assert_null(kfac_config_check(&c));
}

typedef struct {
    const char *key, *value;
    kfac_status want;   /* KFAC_OK, or the error expected */
    int either;         /* 1: PARSE and INVALID_ARG are both acceptable */
} set_case;

static void test_config_set_strict(void **state)
{
    (void)state;
    const set_case cases[] = {
        {"damping", "0.01", KFAC_OK, 0},
        {"damping", "1e-5", KFAC_OK, 0},
        {"damping", "0", KFAC_ERR_INVALID_ARG, 0},
        {"damping", "-0.1", KFAC_ERR_INVALID_ARG, 0},
        {"damping", "abc", KFAC_ERR_PARSE, 0},
        {"damping", "0.01x", KFAC_ERR_PARSE, 0},
        {"damping", "0.01 0.02", KFAC_ERR_PARSE, 0},
        {"damping", "", KFAC_ERR_PARSE, 0},
        {"damping", "1e", KFAC_ERR_PARSE, 0},
        {"damping", "--1", KFAC_ERR_PARSE, 0},
        {"damping", "nan", KFAC_ERR_PARSE, 1},
        {"damping", "inf", KFAC_ERR_PARSE, 1},
        {"damping", "1e999", KFAC_ERR_PARSE, 1},
        {"cov_ema_decay", "0", KFAC_OK, 0},
        {"cov_ema_decay", "0.99", KFAC_OK, 0},
        {"cov_ema_decay", "1", KFAC_ERR_INVALID_ARG, 0},
        {"cov_ema_decay", "-0.01", KFAC_ERR_INVALID_ARG, 0},
        {"cov_ema_decay", "0.9.", KFAC_ERR_PARSE, 0},
        {"cov_update_every", "5", KFAC_OK, 0},
        {"cov_update_every", "0", KFAC_ERR_INVALID_ARG, 0},
        {"cov_update_every", "-3", KFAC_ERR_INVALID_ARG, 0},
        {"cov_update_every", "1.5", KFAC_ERR_PARSE, 0},
        {"cov_update_every", "2x", KFAC_ERR_PARSE, 0},
        {"cov_update_every", "1e3", KFAC_ERR_PARSE, 0},
        {"cov_update_every", "", KFAC_ERR_PARSE, 0},
        {"cov_update_every", "99999999999999999999", KFAC_ERR_PARSE, 1},
        {"invert_every", "100", KFAC_OK, 0},
        {"invert_every", "0", KFAC_ERR_INVALID_ARG, 0},
        {"invert_every", "ten", KFAC_ERR_PARSE, 0},
        {"norm_constraint", "0", KFAC_OK, 0},
        {"norm_constraint", "0.5", KFAC_OK, 0},
        {"norm_constraint", "-1", KFAC_ERR_INVALID_ARG, 0},
        {"norm_constraint", "0.5;", KFAC_ERR_PARSE, 0},
        {"momentum", "0.9", KFAC_OK, 0},
        {"momentum", "0", KFAC_OK, 0},
        {"momentum", "-1", KFAC_OK, 0},
        {"momentum", "1", KFAC_ERR_INVALID_ARG, 0},
        {"momentum", "1.2", KFAC_ERR_INVALID_ARG, 0},
        {"momentum", "0.9m", KFAC_ERR_PARSE, 0},
        {"estimation_mode", "empirical", KFAC_OK, 0},
        {"estimation_mode", "sampled", KFAC_OK, 0},
        {"estimation_mode", "bogus", KFAC_ERR_PARSE, 1},
        {"estimation_mode", "sampledx", KFAC_ERR_PARSE, 1},
        {"estimation_mode", "", KFAC_ERR_PARSE, 1},
        {"estimation_mode", "1", KFAC_ERR_PARSE, 1},
        {"damping_type", "exact", KFAC_OK, 0},
        {"damping_type", "factored", KFAC_OK, 0},
        {"damping_type", "exactly", KFAC_ERR_PARSE, 1},
        {"damping_type", "fact", KFAC_ERR_PARSE, 1},
        {"cov_subsample", "4", KFAC_OK, 0},
        {"cov_subsample", "0", KFAC_ERR_INVALID_ARG, 0},
        {"cov_subsample", "0.5", KFAC_ERR_PARSE, 0},
        {"precond_precision", "double", KFAC_OK, 0},
        {"precond_precision", "float", KFAC_OK, 0},
        {"precond_precision", "half", KFAC_ERR_PARSE, 1},
        {"norm_constraint_lr", "base", KFAC_OK, 0},
        {"norm_constraint_lr", "current", KFAC_OK, 0},
        {"norm_constraint_lr", "0.1", KFAC_ERR_PARSE, 1},
        {"precond_precision", "", KFAC_ERR_PARSE, 1},
        {"max_failures", "3", KFAC_OK, 0},
        {"max_failures", "0", KFAC_ERR_INVALID_ARG, 0},
        {"max_failures", "3.0", KFAC_ERR_PARSE, 0},
        {"max_factor_dim", "0", KFAC_OK, 0},
        {"max_factor_dim", "512", KFAC_OK, 0},
        {"max_factor_dim", "-1", KFAC_ERR_INVALID_ARG, 0},
        {"max_factor_dim", "1e3", KFAC_ERR_PARSE, 0},
        {"step_size", "policy", KFAC_OK, 0},
        {"step_size", "automatic", KFAC_ERR_PARSE, 1},
        {"curvature", "kfac", KFAC_OK, 0},
        {"curvature", "gauss-newton", KFAC_ERR_PARSE, 1},
        {"damping_adapt_every", "0", KFAC_OK, 0},
        {"damping_adapt_every", "-5", KFAC_ERR_INVALID_ARG, 0},
        {"damping_omega", "0.5", KFAC_OK, 0},
        {"damping_omega", "1", KFAC_ERR_INVALID_ARG, 0},
        {"damping_omega", "0", KFAC_ERR_INVALID_ARG, 0},
        {"min_damping", "1e-4", KFAC_OK, 0},
        {"min_damping", "1e5", KFAC_ERR_INVALID_ARG, 0}, /* above max_damping 1e4 */
        {"max_damping", "1e-9", KFAC_ERR_INVALID_ARG, 0}, /* below min_damping 1e-8 */
        {"max_damping", "10", KFAC_OK, 0},
        {"skip", "x", KFAC_ERR_PARSE, 1},
        {"skip", "1,x", KFAC_ERR_PARSE, 1},
        {"dampingx", "0.01", KFAC_ERR_UNKNOWN_KEY, 0},
        {"learning_rate", "0.01", KFAC_ERR_UNKNOWN_KEY, 0},
        {"", "0.01", KFAC_ERR_UNKNOWN_KEY, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const set_case *t = &cases[i];
        kfac_config c, before;
        kfac_config_default(&c);
        if (!strcmp(t->key, "momentum") || !strcmp(t->key, "damping_type") ||
            !strcmp(t->key, "estimation_mode") || !strcmp(t->key, "precond_precision") ||
            !strcmp(t->key, "norm_constraint_lr")) {
            /* move off the default so an accepted value is visible */
            c.momentum = 0.5;
            c.precond_precision = !strcmp(t->value, "double") ? KFAC_PRECISION_FLOAT
                                                              : KFAC_PRECISION_DOUBLE;
            c.norm_constraint_lr = !strcmp(t->value, "base") ? KFAC_CLIP_LR_CURRENT
                                                             : KFAC_CLIP_LR_BASE;
            c.damping_type = !strcmp(t->value, "exact") ? KFAC_DAMPING_FACTORED : KFAC_DAMPING_EXACT;
            c.estimation_mode = !strcmp(t->value, "empirical") ? KFAC_ESTIMATION_SAMPLED
                                                                : KFAC_ESTIMATION_EMPIRICAL;
        }
        before = c;
        char err[256];
        memset(err, 'Z', sizeof err);
        kfac_status rc = kfac_config_set(&c, t->key, t->value, err, sizeof err);
        int ok = rc == t->want ||
                 (t->either && (rc == KFAC_ERR_PARSE || rc == KFAC_ERR_INVALID_ARG));
        if (!ok)
            print_error("kfac_config_set(\"%s\", \"%s\") = %d (%s), want %d\n", t->key, t->value,
                        rc, kfac_status_str(rc), t->want);
        assert_true(ok);
        if (rc != KFAC_OK) {
            assert_true(config_equal(&c, &before));
            assert_non_null(memchr(err, '\0', sizeof err));
            if (rc != KFAC_ERR_UNKNOWN_KEY || t->key[0]) {
                if (!strstr(err, t->key))
                    print_error("message does not name \"%s\": \"%s\"\n", t->key, err);
                assert_non_null(strstr(err, t->key));
            }
            continue;
        }
        assert_null(kfac_config_check(&c));
        double v = strtod(t->value, NULL);
        const char *k = t->key;
        if (!strcmp(k, "damping")) assert_true(c.damping == v);
        else if (!strcmp(k, "cov_ema_decay")) assert_true(c.cov_ema_decay == v);
        else if (!strcmp(k, "cov_update_every")) assert_int_equal(c.cov_update_every, (int)v);
        else if (!strcmp(k, "invert_every")) assert_int_equal(c.invert_every, (int)v);
        else if (!strcmp(k, "norm_constraint")) assert_true(c.norm_constraint == v);
        else if (!strcmp(k, "momentum")) assert_true(c.momentum == v);
        else if (!strcmp(k, "max_failures")) assert_int_equal(c.max_failures, (int)v);
        else if (!strcmp(k, "max_factor_dim")) assert_int_equal(c.max_factor_dim, (int)v);
        else if (!strcmp(k, "cov_subsample")) assert_int_equal(c.cov_subsample, (int)v);
        else if (!strcmp(k, "damping_adapt_every")) assert_int_equal(c.damping_adapt_every, (int)v);
        else if (!strcmp(k, "damping_omega")) assert_true(c.damping_omega == v);
        else if (!strcmp(k, "min_damping")) assert_true(c.min_damping == v);
        else if (!strcmp(k, "max_damping")) assert_true(c.max_damping == v);
        else if (!strcmp(k, "step_size")) assert_int_equal(c.step_size, KFAC_STEP_POLICY);
        else if (!strcmp(k, "curvature")) assert_int_equal(c.curvature, KFAC_CURVATURE_KFAC);
        else if (!strcmp(k, "norm_constraint_lr"))
            assert_int_equal(c.norm_constraint_lr, !strcmp(t->value, "base")
                                                       ? KFAC_CLIP_LR_BASE
                                                       : KFAC_CLIP_LR_CURRENT);
        else if (!strcmp(k, "precond_precision"))
            assert_int_equal(c.precond_precision, !strcmp(t->value, "double")
                                                      ? KFAC_PRECISION_DOUBLE
                                                      : KFAC_PRECISION_FLOAT);
        else if (!strcmp(k, "estimation_mode"))
            assert_int_equal(c.estimation_mode, !strcmp(t->value, "empirical")
                                                    ? KFAC_ESTIMATION_EMPIRICAL
                                                    : KFAC_ESTIMATION_SAMPLED);
        else if (!strcmp(k, "damping_type"))
            assert_int_equal(c.damping_type, !strcmp(t->value, "exact") ? KFAC_DAMPING_EXACT
                                                                         : KFAC_DAMPING_FACTORED);
        else
            fail_msg("unhandled key %s", k);
    }
}

/* The skip list: comma-separated layer indices. */
static void test_config_set_skip(void **state)
{
    (void)state;
    kfac_config c;
    kfac_config_default(&c);
    assert_int_equal(kfac_config_set(&c, "skip", "3", NULL, 0), KFAC_OK);
    assert_int_equal(c.nskip, 1);
    assert_int_equal(c.skip[0], 3);
    assert_int_equal(kfac_config_set(&c, "skip", "0,5,12", NULL, 0), KFAC_OK);
    assert_int_equal(c.nskip, 3);
    assert_int_equal(c.skip[0], 0);
    assert_int_equal(c.skip[1], 5);
    assert_int_equal(c.skip[2], 12);
    /* more than KFAC_MAX_SKIP entries cannot fit */
    char big[KFAC_MAX_SKIP * 4 + 8] = "";
    for (int i = 0; i <= KFAC_MAX_SKIP; i++)
        snprintf(big + strlen(big), sizeof big - strlen(big), i ? ",%d" : "%d", i);
    kfac_config before = c;
    assert_true(kfac_config_set(&c, "skip", big, NULL, 0) != KFAC_OK);
    assert_true(config_equal(&c, &before));
    assert_true(kfac_config_set(&c, "skip", "-1", NULL, 0) != KFAC_OK);
    assert_true(config_equal(&c, &before));
}

/* NULL handling and message truncation. */
static void test_config_set_null_and_truncation(void **state)
{
    (void)state;
    kfac_config c, before;
    kfac_config_default(&c);
    before = c;
    char err[64];
    assert_int_equal(kfac_config_set(NULL, "damping", "0.1", err, sizeof err), KFAC_ERR_NULL);
    assert_int_equal(kfac_config_set(&c, NULL, "0.1", err, sizeof err), KFAC_ERR_NULL);
    assert_int_equal(kfac_config_set(&c, "damping", NULL, err, sizeof err), KFAC_ERR_NULL);
    assert_true(config_equal(&c, &before));
    /* err may be NULL */
    assert_int_equal(kfac_config_set(&c, "damping", "x", NULL, 0), KFAC_ERR_PARSE);
    assert_int_equal(kfac_config_set(&c, "damping", "x", NULL, 100), KFAC_ERR_PARSE);
    /* truncated to errlen, always terminated; exact-size heap buffers let
     * ASan see any write past errlen */
    for (size_t len = 1; len <= 12; len++) {
        char *e = malloc(len);
        assert_non_null(e);
        memset(e, 'Z', len);
        assert_int_equal(kfac_config_set(&c, "cov_update_every", "1.5", e, len), KFAC_ERR_PARSE);
        assert_non_null(memchr(e, '\0', len));
        free(e);
    }
    char one = 'Z';
    assert_int_equal(kfac_config_set(&c, "damping", "-1", &one, 0), KFAC_ERR_INVALID_ARG);
    assert_int_equal(one, 'Z'); /* errlen 0: nothing written */
    assert_true(config_equal(&c, &before));
}

/* ---- fuzz */

static const char *const fuzz_keys[] = {
    "damping", "cov_ema_decay", "cov_update_every", "invert_every", "norm_constraint",
    "momentum", "estimation_mode", "damping_type", "skip", "max_failures", "max_factor_dim",
    "step_size", "damping_adapt_every", "damping_omega", "min_damping", "max_damping",
    "curvature",
};
#define N_FUZZ_KEYS ((int)(sizeof fuzz_keys / sizeof *fuzz_keys))
static const char *const fuzz_values[] = {
    "0.01", "1", "0", "-1", "0.5", "0.999", "1e-3", "1e3", "20", "64", "sampled", "empirical",
    "factored", "exact", "auto", "policy", "kfac", "1,2,3", "0,63", "nan", "inf", "-inf", "1e309", "-0", "0x10", "+1",
    ".5", "5.", "1e", "--1", " 1", "1 ", "\t0.1", "0.1\n", "2147483647", "2147483648",
    "-2147483649", "4.9e-324", "1.7976931348623157e308", "", ",", "1,,2", "9,-1",
};

static void mutate(naive_rng *r, char *s, size_t cap)
{
    size_t len = strlen(s);
    int ops = 1 + naive_rng_int(r, 3);
    for (int o = 0; o < ops; o++) {
        int op = naive_rng_int(r, 6);
        char ch = (char)(1 + naive_rng_int(r, 255)); /* any byte but NUL */
        if (naive_rng_int(r, 2))
            ch = "0123456789.-+eE,xn \t"[naive_rng_int(r, 20)];
        if (op == 0 && len + 1 < cap) { /* insert */
            size_t p = len ? (size_t)naive_rng_int(r, (int)len + 1) : 0;
            memmove(s + p + 1, s + p, len - p + 1);
            s[p] = ch;
            len++;
        } else if (op == 1 && len) { /* delete */
            size_t p = (size_t)naive_rng_int(r, (int)len);
            memmove(s + p, s + p + 1, len - p);
            len--;
        } else if (op == 2 && len) { /* replace */
            s[naive_rng_int(r, (int)len)] = ch;
        } else if (op == 3 && len) { /* truncate */
            len = (size_t)naive_rng_int(r, (int)len);
            s[len] = '\0';
        } else if (op == 4 && 2 * len + 1 < cap) { /* duplicate */
            memcpy(s + len, s, len);
            len *= 2;
            s[len] = '\0';
        } else if (len + 1 < cap) { /* append */
            s[len++] = ch;
            s[len] = '\0';
        }
    }
}

static void random_string(naive_rng *r, char *s, size_t cap)
{
    size_t len = (size_t)naive_rng_int(r, (int)(cap < 40 ? cap : 40));
    for (size_t i = 0; i < len; i++)
        s[i] = (char)(1 + naive_rng_int(r, 255));
    s[len] = '\0';
}

static void test_config_set_fuzz(void **state)
{
    (void)state;
    naive_rng r;
    naive_rng_seed(&r, 4001);
    kfac_config c, before;
    kfac_config_default(&c);
    char key[128], value[256];
    long accepted = 0, rejected = 0;
    const int N = 60000;
    for (int it = 0; it < N; it++) {
        int kc = naive_rng_int(&r, 10);
        if (kc < 7) {
            snprintf(key, sizeof key, "%s", fuzz_keys[naive_rng_int(&r, N_FUZZ_KEYS)]);
        } else if (kc < 9) {
            snprintf(key, sizeof key, "%s", fuzz_keys[naive_rng_int(&r, N_FUZZ_KEYS)]);
            mutate(&r, key, sizeof key);
        } else {
            random_string(&r, key, sizeof key);
        }
        int vc = naive_rng_int(&r, 10);
        if (vc < 3) {
            snprintf(value, sizeof value, "%s",
                     fuzz_values[naive_rng_int(&r, sizeof fuzz_values / sizeof *fuzz_values)]);
        } else if (vc < 5) {
            /* numbers over many magnitudes, both signs */
            double v = naive_rng_sym(&r) * pow(10.0, naive_rng_int(&r, 24) - 12);
            if (naive_rng_int(&r, 2))
                snprintf(value, sizeof value, "%.*g", 1 + naive_rng_int(&r, 17), v);
            else
                snprintf(value, sizeof value, "%d", naive_rng_int(&r, 200) - 20);
        } else if (vc < 9) {
            snprintf(value, sizeof value, "%s",
                     fuzz_values[naive_rng_int(&r, sizeof fuzz_values / sizeof *fuzz_values)]);
            mutate(&r, value, sizeof value);
        } else {
            random_string(&r, value, sizeof value);
        }
        size_t errlen = (size_t)naive_rng_int(&r, 48);
        char *err = malloc(errlen ? errlen : 1);
        assert_non_null(err);
        memset(err, 'Z', errlen ? errlen : 1);
        before = c;
        int give_err = naive_rng_int(&r, 8) != 0; /* sometimes NULL: allowed */
        kfac_status rc = kfac_config_set(&c, key, value, give_err ? err : NULL, errlen);
        if (rc == KFAC_OK) {
            accepted++;
            const char *m = kfac_config_check(&c);
            if (m)
                print_error("accepted \"%s\" = \"%s\" but check says: %s\n", key, value, m);
            assert_null(m);
        } else {
            rejected++;
            if (!(rc == KFAC_ERR_PARSE || rc == KFAC_ERR_INVALID_ARG ||
                  rc == KFAC_ERR_UNKNOWN_KEY))
                print_error("\"%s\" = \"%s\": status %d\n", key, value, rc);
            assert_true(rc == KFAC_ERR_PARSE || rc == KFAC_ERR_INVALID_ARG ||
                        rc == KFAC_ERR_UNKNOWN_KEY);
            if (!config_equal(&c, &before))
                print_error("rejected \"%s\" = \"%s\" changed the config\n", key, value);
            assert_true(config_equal(&c, &before));
        }
        if (give_err && errlen && rc != KFAC_OK && !memchr(err, '\0', errlen))
            print_error("\"%s\" = \"%s\" (status %d, errlen %zu): message not "
                        "NUL-terminated within errlen\n", key, value, rc, errlen);
        if (give_err && errlen && rc != KFAC_OK)
            assert_non_null(memchr(err, '\0', errlen));
        if (errlen == 0 || !give_err)
            assert_int_equal(err[0], 'Z'); /* nothing written */
        free(err);
        if (naive_rng_int(&r, 64) == 0)
            kfac_config_default(&c);
    }
    /* the corpus must exercise both outcomes substantially */
    assert_true(accepted > N / 50);
    assert_true(rejected > N / 4);
}

/* ------------------------------------------------------------------ blocks */

static void test_null_pointers(void **state)
{
    (void)state;
    kfac_conv_geom g = good_geom();
    kfac_block *b = (kfac_block *)0x1;
    assert_int_equal(kfac_conv_block_create(NULL, NULL, &b), KFAC_ERR_NULL);
    assert_int_equal(kfac_conv_block_create(&g, NULL, NULL), KFAC_ERR_NULL);
    assert_int_equal(kfac_fc_block_create(3, 2, 1, NULL, NULL), KFAC_ERR_NULL);
    kfac_block_free(NULL);

    b = NULL;
    assert_int_equal(kfac_conv_block_create(&g, NULL, &b), KFAC_OK);
    kfac_block_info info;
    kfac_capture_spec spec;
    float buf[4096];
    double dbuf[4096];
    memset(buf, 0, sizeof buf);
    memset(dbuf, 0, sizeof dbuf);
    kfac_config cfg;
    kfac_config_default(&cfg);

    assert_int_equal(kfac_block_info_get(NULL, &info), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_info_get(b, NULL), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_tensors_to_compute_grads(NULL, &spec), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_tensors_to_compute_grads(b, NULL), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_register_additional_tower(NULL), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_accumulate_inputs(NULL, 0, buf, 1), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_accumulate_inputs(b, 0, NULL, 1), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_accumulate_patches(NULL, 0, 0, buf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_accumulate_patches(b, 0, 0, NULL), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_accumulate_output_grads(NULL, 0, buf, 1), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_accumulate_output_grads(b, 0, NULL, 1), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_accumulate_output_grads_group(NULL, 0, 0, buf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_accumulate_output_grads_group(b, 0, 0, NULL), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_update_cov(NULL, 0.9), KFAC_ERR_NULL);
    kfac_block_clear_stats(NULL);
    assert_int_equal(kfac_block_get_factors(NULL, 0, dbuf, dbuf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_set_factors(NULL, 0, dbuf, dbuf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_set_factors(b, 0, NULL, dbuf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_set_factors(b, 0, dbuf, NULL), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_instantiate_factors(NULL, 0.1), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_register_inverse(NULL), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_register_matpower(NULL, 0.5), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_update_inverses(NULL), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_multiply(NULL, buf, buf, buf, buf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_multiply(b, NULL, buf, buf, buf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_multiply(b, buf, buf, NULL, buf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_multiply_inverse(NULL, buf, buf, buf, buf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_multiply_matpower(NULL, 0.5, buf, buf, buf, buf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_full_fisher_block(NULL, dbuf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_pack(NULL, buf, buf, dbuf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_pack(b, NULL, buf, dbuf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_pack(b, buf, buf, NULL), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_unpack(NULL, dbuf, buf, buf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_unpack(b, NULL, buf, buf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_factored_damping(NULL, 0, dbuf, dbuf, dbuf), KFAC_ERR_NULL);

    /* this block has a bias: a NULL bias pointer is an error */
    assert_int_equal(kfac_block_pack(b, buf, NULL, dbuf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_unpack(b, dbuf, buf, NULL), KFAC_ERR_NULL);

    /* with factors and an inverse, the bias rule on the products */
    double A[19 * 19], G[2 * 2];
    naive_eye(A, 19);
    naive_eye(G, 2);
    assert_int_equal(kfac_block_info_get(b, &info), KFAC_OK);
    assert_int_equal(info.kb, 19);
    for (int j = 0; j < 2; j++)
        assert_int_equal(kfac_block_set_factors(b, j, A, G), KFAC_OK);
    assert_int_equal(kfac_block_register_inverse(b), KFAC_OK);
    assert_int_equal(kfac_block_update_inverses(b), KFAC_OK);
    assert_int_equal(kfac_block_multiply(b, buf, NULL, buf, buf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_multiply(b, buf, buf, buf, NULL), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_multiply_inverse(b, buf, NULL, buf, buf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_multiply_inverse(b, NULL, buf, buf, buf), KFAC_ERR_NULL);
    assert_int_equal(kfac_block_multiply_inverse(b, buf, buf, buf, NULL), KFAC_ERR_NULL);
    kfac_block_free(b);

    /* a block without bias takes NULL biases */
    b = NULL;
    assert_int_equal(kfac_fc_block_create(3, 2, 0, NULL, &b), KFAC_OK);
    float w[6] = {1, 2, 3, 4, 5, 6}, out[6];
    double flat[6], A3[9], G2[4];
    assert_int_equal(kfac_block_pack(b, w, NULL, flat), KFAC_OK);
    assert_int_equal(kfac_block_unpack(b, flat, out, NULL), KFAC_OK);
    naive_eye(A3, 3);
    naive_eye(G2, 2);
    assert_int_equal(kfac_block_set_factors(b, 0, A3, G2), KFAC_OK);
    assert_int_equal(kfac_block_multiply(b, w, NULL, out, NULL), KFAC_OK);
    kfac_block_free(b);
}

static void test_invalid_geometry(void **state)
{
    (void)state;
    struct { const char *what; kfac_conv_geom g; } cases[24];
    int n = 0;
#define CASE(desc, stmt) do { kfac_conv_geom g_ = good_geom(); stmt; cases[n].what = desc; cases[n].g = g_; n++; } while (0)
    CASE("c = 0", g_.c = 0);
    CASE("h = 0", g_.h = 0);
    CASE("w = 0", g_.w = 0);
    CASE("n = 0", g_.n = 0);
    CASE("size = 0", g_.size = 0);
    CASE("stride = 0", g_.stride = 0);
    CASE("pad < 0", g_.pad = -1);
    CASE("dilation = 0", g_.dilation = 0);
    CASE("groups = 0", g_.groups = 0);
    CASE("groups does not divide c", (g_.c = 3, g_.groups = 2));
    CASE("groups does not divide n", (g_.n = 3, g_.groups = 2));
    CASE("out_h < 1", (g_.size = 5, g_.pad = 0, g_.h = 4));
    CASE("out_w < 1", (g_.size = 3, g_.pad = 0, g_.dilation = 3, g_.w = 6));
    CASE("IMAGE with dilation 2", (g_.patches = KFAC_PATCHES_IMAGE, g_.dilation = 2));
    CASE("POINTWISE with size 3", (g_.patches = KFAC_PATCHES_POINTWISE));
    CASE("POINTWISE with stride 2", (g_.patches = KFAC_PATCHES_POINTWISE, g_.size = 1, g_.pad = 0, g_.stride = 2));
    CASE("POINTWISE with pad 1", (g_.patches = KFAC_PATCHES_POINTWISE, g_.size = 1, g_.pad = 1));
    CASE("POINTWISE with dilation 2", (g_.patches = KFAC_PATCHES_POINTWISE, g_.size = 1, g_.pad = 0, g_.dilation = 2));
    CASE("unknown patches", g_.patches = (kfac_patches)42);
#undef CASE
    for (int i = 0; i < n; i++) {
        kfac_block *b = (kfac_block *)0x1;
        kfac_status rc = kfac_conv_block_create(&cases[i].g, NULL, &b);
        if (rc != KFAC_ERR_INVALID_ARG)
            print_error("%s: status %d\n", cases[i].what, rc);
        assert_int_equal(rc, KFAC_ERR_INVALID_ARG);
        assert_null(b);
        if (rc == KFAC_OK)
            kfac_block_free(b);
    }
    kfac_block *b = (kfac_block *)0x1;
    assert_int_equal(kfac_fc_block_create(0, 3, 1, NULL, &b), KFAC_ERR_INVALID_ARG);
    assert_null(b);
    b = (kfac_block *)0x1;
    assert_int_equal(kfac_fc_block_create(3, 0, 0, NULL, &b), KFAC_ERR_INVALID_ARG);
    assert_null(b);
    b = (kfac_block *)0x1;
    assert_int_equal(kfac_fc_block_create(-2, 3, 0, NULL, &b), KFAC_ERR_INVALID_ARG);
    assert_null(b);
    /* boundary that is valid: out_h exactly 1 */
    kfac_conv_geom g = good_geom();
    g.size = 5; g.pad = 0; g.h = 5; g.w = 5;
    b = NULL;
    assert_int_equal(kfac_conv_block_create(&g, NULL, &b), KFAC_OK);
    kfac_block_info info;
    assert_int_equal(kfac_block_info_get(b, &info), KFAC_OK);
    assert_int_equal(info.T, 1);
    kfac_block_free(b);
}

/* Invalid arguments on a valid block, and calls in the wrong state. */
static void test_invalid_arguments_and_state(void **state)
{
    (void)state;
    kfac_conv_geom g = good_geom(); /* groups 2, kb 19, n_g 2 */
    kfac_block *b = NULL;
    assert_int_equal(kfac_conv_block_create(&g, NULL, &b), KFAC_OK);
    float buf[4096];
    double A[19 * 19], G[4], dbuf[64 * 64];
    memset(buf, 0, sizeof buf);
    naive_eye(A, 19);
    naive_eye(G, 2);

    /* wrong state: nothing yet */
    assert_int_equal(kfac_block_get_factors(b, 0, A, G), KFAC_ERR_STATE);
    assert_int_equal(kfac_block_update_cov(b, 0.9), KFAC_ERR_STATE);
    assert_int_equal(kfac_block_register_inverse(b), KFAC_OK);
    assert_int_equal(kfac_block_update_inverses(b), KFAC_ERR_STATE);
    assert_int_equal(kfac_block_has_inverse(b), 0);
    assert_int_equal(kfac_block_multiply_inverse(b, buf, buf, buf + 2048, buf + 4000), KFAC_ERR_STATE);

    naive_eye(A, 19);
    /* group, tower, batch out of range */
    assert_int_equal(kfac_block_set_factors(b, 2, A, G), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_block_set_factors(b, -1, A, G), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_block_accumulate_patches(b, 0, 2, buf), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_block_accumulate_output_grads_group(b, 0, -1, buf), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_block_accumulate_patches(b, 1, 0, buf), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_block_accumulate_inputs(b, 0, buf, -1), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_block_accumulate_inputs(b, 0, buf, 0), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_block_accumulate_output_grads(b, 0, buf, -1), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_block_accumulate_output_grads(b, 0, buf, 0), KFAC_ERR_INVALID_ARG);

    /* factors must be symmetric and finite */
    double As[19 * 19];
    memcpy(As, A, sizeof A);
    As[1] = 0.5; /* A[0][1] != A[1][0] */
    assert_int_equal(kfac_block_set_factors(b, 0, As, G), KFAC_ERR_INVALID_ARG);
    memcpy(As, A, sizeof A);
    As[20] = NAN;
    assert_int_equal(kfac_block_set_factors(b, 0, As, G), KFAC_ERR_NOT_FINITE);
    double Gi[4] = {1, 0, 0, INFINITY};
    assert_int_equal(kfac_block_set_factors(b, 0, A, Gi), KFAC_ERR_NOT_FINITE);
    assert_int_equal(kfac_block_get_factors(b, 0, dbuf, NULL), KFAC_ERR_STATE); /* still none */

    assert_int_equal(kfac_block_set_factors(b, 0, A, G), KFAC_OK);
    assert_int_equal(kfac_block_get_factors(b, 2, dbuf, NULL), KFAC_ERR_INVALID_ARG);
    /* a group never set reads back as zero */
    double G1[4] = {9, 9, 9, 9};
    memset(dbuf, 0x55, sizeof(double) * 19 * 19);
    assert_int_equal(kfac_block_get_factors(b, 1, dbuf, G1), KFAC_OK);
    for (int i = 0; i < 19 * 19; i++)
        assert_true(dbuf[i] == 0.0);
    for (int i = 0; i < 4; i++)
        assert_true(G1[i] == 0.0);

    /* update_cov's decay must be in [0, 1) */
    for (int i = 0; i < 2; i++) {
        assert_int_equal(kfac_block_accumulate_inputs(b, 0, buf, 1), KFAC_OK);
        assert_int_equal(kfac_block_accumulate_output_grads(b, 0, buf, 1), KFAC_OK);
    }
    assert_int_equal(kfac_block_update_cov(b, 1.0), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_block_update_cov(b, -0.1), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_block_update_cov(b, NAN), KFAC_ERR_INVALID_ARG);
    kfac_block_clear_stats(b);
    assert_int_equal(kfac_block_factored_damping(b, 5, dbuf, NULL, NULL), KFAC_ERR_INVALID_ARG);

    /* damping: > 0 for factored */
    assert_int_equal(kfac_block_instantiate_factors(b, 0.0), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_block_instantiate_factors(b, -1.0), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_block_instantiate_factors(b, NAN), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_block_instantiate_factors(b, 0.01), KFAC_OK);
    kfac_block_free(b);

    /* >= 0 for exact */
    kfac_config cfg;
    kfac_config_default(&cfg);
    cfg.damping_type = KFAC_DAMPING_EXACT;
    b = NULL;
    assert_int_equal(kfac_fc_block_create(3, 2, 1, &cfg, &b), KFAC_OK);
    assert_int_equal(kfac_block_instantiate_factors(b, 0.0), KFAC_OK);
    assert_int_equal(kfac_block_instantiate_factors(b, -0.1), KFAC_ERR_INVALID_ARG);
    /* a matpower that was never registered */
    double A4[16], G2[4];
    naive_eye(A4, 4);
    naive_eye(G2, 2);
    assert_int_equal(kfac_block_set_factors(b, 0, A4, G2), KFAC_OK);
    assert_int_equal(kfac_block_register_inverse(b), KFAC_OK);
    assert_int_equal(kfac_block_update_inverses(b), KFAC_OK);
    assert_int_equal(kfac_block_multiply_matpower(b, 0.5, buf, buf, buf + 100, buf + 200),
                     KFAC_ERR_STATE);
    kfac_block_free(b);

    /* multiply_inverse without register_inverse */
    b = NULL;
    assert_int_equal(kfac_fc_block_create(3, 2, 1, NULL, &b), KFAC_OK);
    assert_int_equal(kfac_block_set_factors(b, 0, A4, G2), KFAC_OK);
    assert_int_equal(kfac_block_update_inverses(b), KFAC_OK); /* nothing registered: no-op */
    assert_int_equal(kfac_block_has_inverse(b), 0);
    assert_int_equal(kfac_block_register_matpower(b, 0.5), KFAC_OK);
    assert_int_equal(kfac_block_update_inverses(b), KFAC_OK);
    assert_int_equal(kfac_block_has_inverse(b), 0);
    assert_int_equal(kfac_block_multiply_inverse(b, buf, buf, buf + 100, buf + 200), KFAC_ERR_STATE);
    /* matpower registered but asked before any update_inverses since */
    assert_int_equal(kfac_block_register_matpower(b, -0.5), KFAC_OK);
    assert_int_equal(kfac_block_multiply_matpower(b, 0.5, buf, buf, buf + 100, buf + 200), KFAC_OK);
    kfac_block_free(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_str),
        cmocka_unit_test(test_config_default_and_check),
        cmocka_unit_test(test_config_set_strict),
        cmocka_unit_test(test_config_set_skip),
        cmocka_unit_test(test_config_set_null_and_truncation),
        cmocka_unit_test(test_config_set_fuzz),
        cmocka_unit_test(test_null_pointers),
        cmocka_unit_test(test_invalid_geometry),
        cmocka_unit_test(test_invalid_arguments_and_state),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
