/*
 * The [kfac] cfg section: defaults, strict key/value parsing and whole-config
 * validation. Parsing is strict because a typo in a cfg value ("0.0O1") must
 * stop training at start-up with a message, not silently become 0. The
 * ranges accepted by kfac_config_set are those kfac_config_check enforces, so
 * a config built key by key always passes the whole-config check.
 */
#include "kfac.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void kfac_config_default(kfac_config *cfg)
{
    if (!cfg)
        return;
    memset(cfg, 0, sizeof *cfg);
    cfg->damping = 0.001;
    cfg->cov_ema_decay = 0.95;
    cfg->cov_update_every = 10;
    cfg->invert_every = 20;
    /* off: the automatic step size bounds itself (kfac_opt_step_args.loss);
     * with step_size=policy a cfg says which C it wants */
    cfg->norm_constraint = 0.0;
    cfg->momentum = -1.0;
    cfg->estimation_mode = KFAC_ESTIMATION_SAMPLED;
    cfg->damping_type = KFAC_DAMPING_FACTORED;
    cfg->nskip = 0;
    cfg->max_failures = 10;
    /* Every factor in upstream Darknet's cfg/ is <= 4609 or >= 9216, so any
     * value in between gives the same split; see docs/zoo.md. */
    cfg->max_factor_dim = 8192;
    cfg->precond_precision = KFAC_PRECISION_FLOAT;
    cfg->cov_subsample = 1;
    cfg->norm_constraint_lr = KFAC_CLIP_LR_CURRENT;
    cfg->step_size = KFAC_STEP_AUTO;
    cfg->damping_adapt_every = 5;
    cfg->damping_omega = 0.77378093749999998; /* (19/20)^5, Martens & Grosse 2015 sec. 6.5 */
    cfg->min_damping = 1e-8;
    cfg->max_damping = 1e4;
    cfg->curvature = KFAC_CURVATURE_EXACT;
}

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Leading blanks are rejected too: strtod/strtol would skip them, but a value
 * that is not exactly a number is a cfg mistake worth reporting. */
static int parse_double(const char *s, double *out)
{
    if (*s == '\0' || isspace((unsigned char)*s))
        return 0;
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || errno == ERANGE || !isfinite(v))
        return 0;
    *out = v;
    return 1;
}

static int parse_int_n(const char *s, size_t len, int *out)
{
    char buf[32];
    if (len == 0 || len >= sizeof buf || isspace((unsigned char)s[0]))
        return 0;
    memcpy(buf, s, len);
    buf[len] = '\0';
    char *end = NULL;
    errno = 0;
    long v = strtol(buf, &end, 10);
    if (end == buf || *end != '\0' || errno == ERANGE || v < INT_MIN || v > INT_MAX)
        return 0;
    *out = (int)v;
    return 1;
}

static int parse_int(const char *s, int *out)
{
    return parse_int_n(s, strlen(s), out);
}

/* Parses "3,7,12" into skip[]; returns NULL or a static reason. */
static const char *parse_skip(const char *s, int *skip, int *nskip)
{
    int n = 0;
    if (*s == '\0') {
        *nskip = 0;
        return NULL;
    }
    const char *p = s;
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        int v;
        if (!parse_int_n(p, len, &v))
            return "not a comma-separated list of integers";
        if (v < 0)
            return "layer indices must be >= 0";
        for (int i = 0; i < n; i++)
            if (skip[i] == v)
                return "duplicate layer index";
        if (n >= KFAC_MAX_SKIP)
            return "too many layer indices";
        skip[n++] = v;
        if (!comma)
            break;
        p = comma + 1;
    }
    *nskip = n;
    return NULL;
}

kfac_status kfac_config_set(kfac_config *cfg, const char *key, const char *value,
                            char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = '\0';
    if (!cfg || !key || !value) {
        set_err(err, errlen, "kfac: NULL config, key or value");
        return KFAC_ERR_NULL;
    }
    double d;
    int i;

#define DOUBLE_KEY(name, cond, allowed)                                                   \
    if (strcmp(key, #name) == 0) {                                                        \
        if (!parse_double(value, &d)) {                                                   \
            set_err(err, errlen, "kfac: %s: '%s' is not a number (allowed: %s)", key,     \
                    value, allowed);                                                      \
            return KFAC_ERR_PARSE;                                                        \
        }                                                                                 \
        if (!(cond)) {                                                                    \
            set_err(err, errlen, "kfac: %s: %s is out of range (allowed: %s)", key,       \
                    value, allowed);                                                      \
            return KFAC_ERR_INVALID_ARG;                                                  \
        }                                                                                 \
        cfg->name = d;                                                                    \
        return KFAC_OK;                                                                   \
    }
#define INT_KEY(name, cond, allowed)                                                      \
    if (strcmp(key, #name) == 0) {                                                        \
        if (!parse_int(value, &i)) {                                                      \
            set_err(err, errlen, "kfac: %s: '%s' is not an integer (allowed: %s)", key,   \
                    value, allowed);                                                      \
            return KFAC_ERR_PARSE;                                                        \
        }                                                                                 \
        if (!(cond)) {                                                                    \
            set_err(err, errlen, "kfac: %s: %s is out of range (allowed: %s)", key,       \
                    value, allowed);                                                      \
            return KFAC_ERR_INVALID_ARG;                                                  \
        }                                                                                 \
        cfg->name = i;                                                                    \
        return KFAC_OK;                                                                   \
    }

    DOUBLE_KEY(damping, d > 0.0, "a number > 0")
    DOUBLE_KEY(cov_ema_decay, d >= 0.0 && d < 1.0, "a number in [0, 1)")
    INT_KEY(cov_update_every, i >= 1, "an integer >= 1")
    INT_KEY(invert_every, i >= 1, "an integer >= 1")
    DOUBLE_KEY(norm_constraint, d >= 0.0, "a number >= 0, 0 disables")
    DOUBLE_KEY(momentum, d < 1.0, "a number in [0, 1), or < 0 for the [net] momentum")
    INT_KEY(max_failures, i >= 1, "an integer >= 1")
    INT_KEY(max_factor_dim, i >= 0, "an integer >= 0, 0 for no limit")
    INT_KEY(cov_subsample, i >= 1, "an integer >= 1")
    INT_KEY(damping_adapt_every, i >= 0, "an integer >= 0, 0 keeps the damping fixed")
    DOUBLE_KEY(damping_omega, d > 0.0 && d < 1.0, "a number in (0, 1)")
    /* each bound is checked against the other as it stands, so a config
     * set key by key always passes kfac_config_check */
    DOUBLE_KEY(min_damping, d > 0.0 && d <= cfg->max_damping,
               "a number > 0 and <= max_damping (set max_damping first to raise both)")
    DOUBLE_KEY(max_damping, d > 0.0 && d >= cfg->min_damping,
               "a number > 0 and >= min_damping")
/* A key with two named values. */
#define ENUM_KEY(name, a, va, b, vb)                                                      \
    if (strcmp(key, #name) == 0) {                                                        \
        if (strcmp(value, a) == 0)                                                        \
            cfg->name = va;                                                               \
        else if (strcmp(value, b) == 0)                                                   \
            cfg->name = vb;                                                               \
        else {                                                                            \
            set_err(err, errlen, "kfac: %s: '%s' is not valid (allowed: %s, %s)", key,    \
                    value, a, b);                                                         \
            return KFAC_ERR_PARSE;                                                        \
        }                                                                                 \
        return KFAC_OK;                                                                   \
    }
#undef DOUBLE_KEY
#undef INT_KEY

    ENUM_KEY(estimation_mode, "sampled", KFAC_ESTIMATION_SAMPLED, "empirical", KFAC_ESTIMATION_EMPIRICAL)
    ENUM_KEY(damping_type, "factored", KFAC_DAMPING_FACTORED, "exact", KFAC_DAMPING_EXACT)
    ENUM_KEY(precond_precision, "float", KFAC_PRECISION_FLOAT, "double", KFAC_PRECISION_DOUBLE)
    ENUM_KEY(norm_constraint_lr, "current", KFAC_CLIP_LR_CURRENT, "base", KFAC_CLIP_LR_BASE)
    ENUM_KEY(step_size, "auto", KFAC_STEP_AUTO, "policy", KFAC_STEP_POLICY)
    ENUM_KEY(curvature, "exact", KFAC_CURVATURE_EXACT, "kfac", KFAC_CURVATURE_KFAC)
#undef ENUM_KEY
    if (strcmp(key, "skip") == 0) {
        int tmp[KFAC_MAX_SKIP], n = 0;
        const char *why = parse_skip(value, tmp, &n);
        if (why) {
            set_err(err, errlen,
                    "kfac: %s: '%s': %s (allowed: up to %d distinct comma-separated "
                    "layer indices >= 0)",
                    key, value, why, KFAC_MAX_SKIP);
            /* A malformed list is a parse error; a well-formed one that breaks
             * a rule (negative, duplicate, too long) is a range error. */
            return strcmp(why, "not a comma-separated list of integers") == 0
                       ? KFAC_ERR_PARSE : KFAC_ERR_INVALID_ARG;
        }
        memcpy(cfg->skip, tmp, sizeof(int) * (size_t)n);
        cfg->nskip = n;
        return KFAC_OK;
    }
    set_err(err, errlen,
            "kfac: unknown key '%s' (allowed: damping, cov_ema_decay, cov_update_every, "
            "invert_every, norm_constraint, momentum, estimation_mode, damping_type, skip, "
            "max_factor_dim, max_failures, precond_precision, cov_subsample, "
            "norm_constraint_lr, step_size, damping_adapt_every, damping_omega, "
            "min_damping, max_damping, curvature)",
            key);
    return KFAC_ERR_UNKNOWN_KEY;
}

const char *kfac_config_check(const kfac_config *cfg)
{
    if (!cfg)
        return "kfac config is NULL";
    if (!isfinite(cfg->damping) || !(cfg->damping > 0.0))
        return "damping must be a finite number > 0";
    if (!isfinite(cfg->cov_ema_decay) || cfg->cov_ema_decay < 0.0 || cfg->cov_ema_decay >= 1.0)
        return "cov_ema_decay must be in [0, 1)";
    if (cfg->cov_update_every < 1)
        return "cov_update_every must be >= 1";
    if (cfg->invert_every < 1)
        return "invert_every must be >= 1";
    if (!isfinite(cfg->norm_constraint) || cfg->norm_constraint < 0.0)
        return "norm_constraint must be a finite number >= 0";
    if (!isfinite(cfg->momentum) || cfg->momentum >= 1.0)
        return "momentum must be < 1 (negative: use the [net] momentum)";
    if (cfg->estimation_mode != KFAC_ESTIMATION_SAMPLED &&
        cfg->estimation_mode != KFAC_ESTIMATION_EMPIRICAL)
        return "estimation_mode must be sampled or empirical";
    if (cfg->damping_type != KFAC_DAMPING_FACTORED && cfg->damping_type != KFAC_DAMPING_EXACT)
        return "damping_type must be factored or exact";
    if (cfg->nskip < 0 || cfg->nskip > KFAC_MAX_SKIP)
        return "nskip must be in [0, KFAC_MAX_SKIP]";
    for (int i = 0; i < cfg->nskip; i++) {
        if (cfg->skip[i] < 0)
            return "skip holds a negative layer index";
        for (int j = 0; j < i; j++)
            if (cfg->skip[i] == cfg->skip[j])
                return "skip holds a duplicate layer index";
    }
    if (cfg->max_failures < 1)
        return "max_failures must be >= 1";
    if (cfg->max_factor_dim < 0)
        return "max_factor_dim must be >= 0";
    if (cfg->precond_precision != KFAC_PRECISION_FLOAT &&
        cfg->precond_precision != KFAC_PRECISION_DOUBLE)
        return "precond_precision must be float or double";
    if (cfg->cov_subsample < 1)
        return "cov_subsample must be >= 1";
    if (cfg->norm_constraint_lr != KFAC_CLIP_LR_CURRENT &&
        cfg->norm_constraint_lr != KFAC_CLIP_LR_BASE)
        return "norm_constraint_lr must be current or base";
    if (cfg->step_size != KFAC_STEP_AUTO && cfg->step_size != KFAC_STEP_POLICY)
        return "step_size must be auto or policy";
    if (cfg->curvature != KFAC_CURVATURE_EXACT && cfg->curvature != KFAC_CURVATURE_KFAC)
        return "curvature must be exact or kfac";
    if (cfg->damping_adapt_every < 0)
        return "damping_adapt_every must be >= 0";
    if (!isfinite(cfg->damping_omega) || !(cfg->damping_omega > 0.0 && cfg->damping_omega < 1.0))
        return "damping_omega must be in (0, 1)";
    if (!isfinite(cfg->min_damping) || !isfinite(cfg->max_damping) || !(cfg->min_damping > 0.0) ||
        cfg->min_damping > cfg->max_damping)
        return "min_damping and max_damping must be finite, > 0, min_damping <= max_damping";
    return NULL;
}
