/*
 * The optimizer context (kfac_opt): the one owner of everything K-FAC keeps
 * between steps for a set of layers -- blocks, momentum buffers, scratch,
 * the current damping, the step and failure counters, the sampled-target
 * seed -- and the one place a whole step runs (kfac.h documents the order).
 * A framework's glue creates it from its cfg, adds each layer with pointers
 * to that layer's weights and gradient buffers, captures statistics into the
 * blocks, and calls kfac_opt_step where its optimizer would run. The
 * configuration is checked once, in kfac_opt_create.
 */
#include "kfac_internal.h"
#include "kfac_alloc.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

typedef struct {
    int id;
    kfac_block *block;
    size_t nw, nb;             /* floats in w and b (nb 0 without a bias) */
    float *aux[2];
    int naux;
    size_t aux_n;
    float *vel_w, *vel_b;      /* momentum */
    size_t bytes;
    int failures;
    int64_t ck[1];             /* serialisation scratch: failures */
} opt_layer;

struct kfac_opt {
    kfac_config cfg;
    double momentum;           /* effective */
    double damping;            /* current lambda */
    int cap, n;
    opt_layer *L;
    kfac_layer_ref *refs;      /* what kfac_step sees, filled once per layer */
    kfac_status *cov_st, *inv_st;
    kfac_stats_hook hook;
    void *hook_ctx;
    int has_curv;              /* exact curvature offered by the caller */
    kfac_curvature curv;
    float *z;                  /* 3 * curv.n_out */

    long steps_run;
    int consecutive_failures;
    long total_failures;
    int ready;
    unsigned long long seed;
    double rho;                /* last adaptation, NaN before the first */
    long applied_steps;        /* steps that moved weights (adaptation schedule) */
    int adapt_pending;         /* a step awaits kfac_opt_adapt_damping */
    double pending_predicted, pending_decay;
    int64_t ck[5];             /* serialisation scratch */
};

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* ------------------------------------------------------------------ lifecycle */

kfac_status kfac_opt_create(const kfac_config *cfg, double net_momentum, int max_layers,
                            kfac_opt **out, char *err, size_t errlen)
{
    seterr(err, errlen, "%s", "");
    if (out)
        *out = NULL;
    if (!cfg || !out) {
        seterr(err, errlen, "kfac_opt_create: NULL config or output");
        return KFAC_ERR_NULL;
    }
    const char *why = kfac_config_check(cfg);
    if (why) {
        seterr(err, errlen, "%s", why);
        return KFAC_ERR_INVALID_ARG;
    }
    double mu = cfg->momentum < 0 ? net_momentum : cfg->momentum;
    if (!(mu >= 0 && mu < 1)) {
        seterr(err, errlen, "momentum %g%s must be in [0, 1)", mu,
               cfg->momentum < 0 ? " (from [net])" : "");
        return KFAC_ERR_INVALID_ARG;
    }
    if (max_layers < 0) {
        seterr(err, errlen, "kfac_opt_create: max_layers %d < 0", max_layers);
        return KFAC_ERR_INVALID_ARG;
    }
    kfac_opt *o = KFAC_CALLOC(1, sizeof *o);
    if (!o)
        goto nomem;
    o->cfg = *cfg;
    o->momentum = mu;
    o->damping = cfg->damping;
    o->rho = NAN;
    o->cap = max_layers;
    size_t cap = max_layers ? (size_t)max_layers : 1;
    o->L = KFAC_CALLOC(cap, sizeof *o->L);
    o->refs = KFAC_CALLOC(cap, sizeof *o->refs);
    o->cov_st = KFAC_CALLOC(cap, sizeof *o->cov_st);
    o->inv_st = KFAC_CALLOC(cap, sizeof *o->inv_st);
    if (!o->L || !o->refs || !o->cov_st || !o->inv_st)
        goto nomem;
    *out = o;
    return KFAC_OK;
nomem:
    kfac_opt_free(o);
    seterr(err, errlen, "out of memory");
    return KFAC_ERR_NOMEM;
}

static void layer_free(opt_layer *L, kfac_layer_ref *r)
{
    kfac_block_free(L->block);
    KFAC_FREE(L->vel_w);
    KFAC_FREE(L->vel_b);
    KFAC_FREE(r->scratch_w);
    KFAC_FREE(r->scratch_b);
    KFAC_FREE(r->scratch2_w);
    KFAC_FREE(r->scratch2_b);
}

void kfac_opt_free(kfac_opt *o)
{
    if (!o)
        return;
    for (int k = 0; k < o->n; k++)
        layer_free(&o->L[k], &o->refs[k]);
    KFAC_FREE(o->L);
    KFAC_FREE(o->refs);
    KFAC_FREE(o->cov_st);
    KFAC_FREE(o->inv_st);
    KFAC_FREE(o->z);
    KFAC_FREE(o);
}

kfac_status kfac_opt_set_curvature(kfac_opt *o, const kfac_curvature *c)
{
    if (!o)
        return KFAC_ERR_NULL;
    if (c && (!c->outputs || !c->metric || c->n_out == 0 || c->n_out > SIZE_MAX / 12))
        return KFAC_ERR_INVALID_ARG;
    float *z = NULL;
    if (c && !(z = KFAC_CALLOC(3 * c->n_out, sizeof(float))))
        return KFAC_ERR_NOMEM;
    KFAC_FREE(o->z);
    o->z = z;
    o->has_curv = c != NULL;
    if (c)
        o->curv = *c;
    return KFAC_OK;
}

void kfac_opt_set_stats_hook(kfac_opt *o, kfac_stats_hook fn, void *ctx)
{
    if (!o)
        return;
    o->hook = fn;
    o->hook_ctx = ctx;
}

static float *floats(size_t n, size_t *bytes)
{
    if (!n)
        return NULL;
    *bytes += n * sizeof(float);
    return KFAC_CALLOC(n, sizeof(float));
}

kfac_status kfac_opt_add_layer(kfac_opt *o, const kfac_opt_layer *in, int *slot)
{
    if (!o || !in || !in->w || !in->grad_w)
        return KFAC_ERR_NULL;
    if (o->n >= o->cap || in->naux < 0 || in->naux > 2)
        return KFAC_ERR_INVALID_ARG;
    for (int i = 0; i < in->naux; i++)
        if (!in->aux[i])
            return KFAC_ERR_NULL;
    opt_layer *L = &o->L[o->n];
    kfac_layer_ref *r = &o->refs[o->n];
    memset(L, 0, sizeof *L);
    memset(r, 0, sizeof *r);
    kfac_status st = in->geom ? kfac_conv_block_new(in->geom, &o->cfg, &L->block)
                              : kfac_fc_block_new(in->inputs, in->outputs, in->bias, &o->cfg,
                                                  &L->block);
    if (st != KFAC_OK)
        return st;
    kfac_block *b = L->block;
    if (b->bias && (!in->b || !in->grad_b)) {
        st = KFAC_ERR_NULL;
        goto fail;
    }
    if ((st = kfac_block_instantiate_factors(b, o->damping)) != KFAC_OK ||
        (st = kfac_block_register_inverse(b)) != KFAC_OK)
        goto fail;
    L->id = in->id;
    L->nw = (size_t)b->groups * b->n_g * b->k;
    L->nb = b->bias ? (size_t)b->groups * b->n_g : 0;
    L->naux = in->naux;
    L->aux_n = in->aux_n;
    for (int i = 0; i < in->naux; i++)
        L->aux[i] = in->aux[i];
    size_t bytes = 0;
    L->vel_w = floats(L->nw, &bytes);
    r->scratch_w = floats(L->nw, &bytes);
    r->scratch2_w = floats(L->nw, &bytes);
    L->vel_b = floats(L->nb, &bytes);
    r->scratch_b = floats(L->nb, &bytes);
    r->scratch2_b = floats(L->nb, &bytes);
    st = KFAC_ERR_NOMEM;
    if (!L->vel_w || !r->scratch_w || !r->scratch2_w ||
        (L->nb && (!L->vel_b || !r->scratch_b || !r->scratch2_b)))
        goto fail;
    L->bytes = bytes + b->bytes;
    r->block = b;
    r->w = in->w;
    r->grad_w = in->grad_w;
    r->vel_w = L->vel_w;
    if (L->nb) {
        r->b = in->b;
        r->grad_b = in->grad_b;
        r->vel_b = L->vel_b;
    }
    if (slot)
        *slot = o->n;
    o->n++;
    return KFAC_OK;
fail:
    layer_free(L, r);
    memset(L, 0, sizeof *L);
    memset(r, 0, sizeof *r);
    return st;
}

/* ------------------------------------------------------------------ queries */

int kfac_opt_num_layers(const kfac_opt *o) { return o ? o->n : 0; }

const kfac_config *kfac_opt_config(const kfac_opt *o) { return o ? &o->cfg : NULL; }

static int slot_ok(const kfac_opt *o, int k) { return o && k >= 0 && k < o->n; }

kfac_block *kfac_opt_block(const kfac_opt *o, int slot)
{
    return slot_ok(o, slot) ? o->L[slot].block : NULL;
}

int kfac_opt_layer_id(const kfac_opt *o, int slot)
{
    return slot_ok(o, slot) ? o->L[slot].id : -1;
}

kfac_status kfac_opt_velocity(const kfac_opt *o, int slot, float **vel_w, float **vel_b)
{
    if (!slot_ok(o, slot))
        return KFAC_ERR_INVALID_ARG;
    if (vel_w)
        *vel_w = o->L[slot].vel_w;
    if (vel_b)
        *vel_b = o->L[slot].vel_b;
    return KFAC_OK;
}

size_t kfac_opt_layer_bytes(const kfac_opt *o, int slot)
{
    return slot_ok(o, slot) ? o->L[slot].bytes : 0;
}

int kfac_opt_layer_failures(const kfac_opt *o, int slot)
{
    return slot_ok(o, slot) ? o->L[slot].failures : 0;
}

kfac_status kfac_opt_info_get(const kfac_opt *o, kfac_opt_info *info)
{
    if (!o || !info)
        return KFAC_ERR_NULL;
    info->damping = o->damping;
    info->momentum = o->momentum;
    info->steps_run = o->steps_run;
    info->consecutive_failures = o->consecutive_failures;
    info->total_failures = o->total_failures;
    info->ready = o->ready;
    info->nlayers = o->n;
    info->bytes = 0;
    for (int k = 0; k < o->n; k++)
        info->bytes += o->L[k].bytes;
    info->seed = o->seed;
    info->rho = o->rho;
    return KFAC_OK;
}

void kfac_opt_set_seed(kfac_opt *o, unsigned long long seed)
{
    if (o)
        o->seed = seed;
}

int kfac_opt_is_stats_step(const kfac_opt *o, long step)
{
    if (!o)
        return 0;
    if (!o->ready)
        return 1;
    return step % o->cfg.cov_update_every == 0;
}

/* ------------------------------------------------------------------ step */

/* Statistics into factors, through the hook where raw sums are final. */
static kfac_status fold_layer(kfac_opt *o, opt_layer *L)
{
    kfac_block *b = L->block;
    if (o->hook && b->mA > 0 && b->mA == b->mG) {
        kfac_raw_stats rs[4];
        float *sums[4];
        int dim[4], count[4];
        int n = b->kind->raw_stats(b, rs, 4);
        if (n > 4)
            n = 4;
        for (int i = 0; i < n; i++) {
            sums[i] = rs[i].data;
            dim[i] = rs[i].dim;
            count[i] = rs[i].count;
        }
        long m = b->mA;
        kfac_status st = o->hook(o->hook_ctx, L->id, sums, dim, count, n, &m);
        if (st == KFAC_OK && m < 1)
            st = KFAC_ERR_STATE;
        if (st != KFAC_OK) {
            kfac_block_clear_stats(b);
            return st;
        }
        b->mA = b->mG = m;
    }
    return kfac_block_update_cov(b, o->cfg.cov_ema_decay);
}

static int finite_or_null(const float *x, size_t n)
{
    return !x || kfac_all_finite_f(x, n);
}

static void zero(float *x, size_t n)
{
    if (x && n)
        memset(x, 0, sizeof(float) * n);
}

static void note_bad(kfac_opt_report *r, const opt_layer *L)
{
    if (r->first_bad_id < 0)
        r->first_bad_id = L->id;
}

kfac_status kfac_opt_step(kfac_opt *o, const kfac_opt_step_args *a, kfac_opt_report *r)
{
    if (!o || !a || !r)
        return KFAC_ERR_NULL;
    if (a->step < 0 || a->batch < 1 || !isfinite(a->learning_rate) ||
        !isfinite(a->base_learning_rate) || !isfinite(a->decay))
        return KFAC_ERR_INVALID_ARG;
    memset(r, 0, sizeof *r);
    r->bad_grad_slot = -1;
    r->first_bad_id = -1;
    r->step.first_skipped = -1;
    r->cov_status = o->cov_st;
    r->inv_status = o->inv_st;
    for (int k = 0; k < o->n; k++)
        o->cov_st[k] = o->inv_st[k] = KFAC_OK;
    kfac_status st;

    double t0 = now_s();
    r->stats_step = kfac_opt_is_stats_step(o, a->step);
    for (int k = 0; r->stats_step && k < o->n; k++) {
        opt_layer *L = &o->L[k];
        if ((st = fold_layer(o, L)) != KFAC_OK) {
            o->cov_st[k] = st;
            r->cov_failed++;
            L->failures++;
            note_bad(r, L);
        }
    }
    double t1 = now_s();
    r->t_fold = t1 - t0;

    for (int k = 0; k < o->n; k++) {
        opt_layer *L = &o->L[k];
        if (a->step % o->cfg.invert_every != 0 && o->steps_run != 0 &&
            kfac_block_has_inverse(L->block))
            continue;
        st = kfac_block_instantiate_factors(L->block, o->damping);
        if (st == KFAC_OK)
            st = kfac_block_update_inverses(L->block);
        if (st != KFAC_OK) {
            o->inv_st[k] = st;
            r->inv_failed++;
            L->failures++;
            note_bad(r, L);
        }
    }
    double t2 = now_s();
    r->t_inv = t2 - t1;

    for (int k = 0; k < o->n && r->bad_grad_slot < 0; k++) {
        const opt_layer *L = &o->L[k];
        const kfac_layer_ref *R = &o->refs[k];
        int ok = finite_or_null(R->grad_w, L->nw) && finite_or_null(R->grad_b, L->nb);
        for (int i = 0; i < L->naux; i++)
            ok = ok && finite_or_null(L->aux[i], L->aux_n);
        if (!ok)
            r->bad_grad_slot = k;
    }
    r->skipped_step = r->cov_failed || r->inv_failed || r->bad_grad_slot >= 0;
    if (r->skipped_step) {
        if (r->bad_grad_slot >= 0) {
            o->L[r->bad_grad_slot].failures++;
            note_bad(r, &o->L[r->bad_grad_slot]);
        }
        /* the gradients are dropped with the step rather than carried into
         * the next one */
        for (int k = 0; k < o->n; k++) {
            opt_layer *L = &o->L[k];
            zero(o->refs[k].grad_w, L->nw);
            zero(o->refs[k].grad_b, L->nb);
            for (int i = 0; i < L->naux; i++)
                zero(L->aux[i], L->aux_n);
        }
    } else if (o->cfg.step_size == KFAC_STEP_AUTO) {
        kfac_auto_args aa;
        kfac_auto_report ar;
        aa.scale = a->base_learning_rate > 0 ? a->learning_rate / a->base_learning_rate : 1.0;
        aa.decay = a->decay;
        aa.batch = a->batch;
        aa.norm_constraint = o->cfg.norm_constraint;
        /* a nonnegative loss cannot decrease by more than itself */
        aa.max_decrease = isfinite(a->loss) && a->loss > 0 ? a->loss : 0.0;
        aa.exact = o->has_curv && o->cfg.curvature == KFAC_CURVATURE_EXACT ? &o->curv : NULL;
        aa.damping = o->damping;
        aa.z0 = o->z;
        aa.z1 = o->z ? o->z + o->curv.n_out : NULL;
        aa.z2 = o->z ? o->z + 2 * o->curv.n_out : NULL;
        if ((st = kfac_step_auto(o->refs, o->n, &aa, &ar)) != KFAC_OK)
            return st;
        r->step = ar.step;
        r->alpha = ar.alpha;
        r->momentum = ar.momentum;
        r->predicted = ar.predicted;
        if (r->step.first_skipped >= 0) {
            o->L[r->step.first_skipped].failures++;
            note_bad(r, &o->L[r->step.first_skipped]);
        }
        if (r->step.applied > 0) {
            int every = o->cfg.damping_adapt_every;
            r->adapt_due = every > 0 && o->applied_steps % every == 0;
            o->applied_steps++;
            o->adapt_pending = r->adapt_due;
            o->pending_predicted = ar.predicted;
            o->pending_decay = ar.decay_change;
        }
    } else {
        kfac_step_args sa;
        sa.learning_rate = a->learning_rate;
        sa.momentum = o->momentum;
        sa.decay = a->decay;
        sa.batch = a->batch;
        sa.norm_constraint = o->cfg.norm_constraint;
        if (o->cfg.norm_constraint_lr == KFAC_CLIP_LR_BASE && a->base_learning_rate > 0) {
            /* nu = min(1, sqrt(C / (eta_0^2 <g, Delta>))), so the policy's
             * decay (steps, poly, burn_in, ...) scales clipped steps too.
             * The ratio is taken in float: the rates are Darknet's floats,
             * and this keeps every step bit-identical to earlier releases. */
            double q = (float)a->learning_rate / (float)a->base_learning_rate;
            sa.norm_constraint *= q * q;
        }
        if ((st = kfac_step(o->refs, o->n, &sa, &r->step)) != KFAC_OK)
            return st; /* only for arguments checked above: nothing moved */
        r->alpha = sa.learning_rate * r->step.nu;
        r->momentum = sa.momentum;
        if (r->step.first_skipped >= 0) {
            o->L[r->step.first_skipped].failures++;
            note_bad(r, &o->L[r->step.first_skipped]);
        }
    }
    r->t_precond = now_s() - t2;

    r->failed = r->skipped_step || r->step.skipped > 0;
    o->consecutive_failures = r->failed ? o->consecutive_failures + 1 : 0;
    if (r->failed)
        o->total_failures++;
    o->steps_run++;
    o->ready = 1;
    for (int k = 0; k < o->n; k++)
        if (!kfac_block_has_inverse(o->L[k].block))
            o->ready = 0;
    r->stop = o->consecutive_failures >= o->cfg.max_failures;
    return KFAC_OK;
}

kfac_status kfac_opt_adapt_damping(kfac_opt *o, double loss_before, double loss_after,
                                   double *rho)
{
    if (!o)
        return KFAC_ERR_NULL;
    if (!o->adapt_pending)
        return KFAC_ERR_STATE;
    o->adapt_pending = 0;
    double q = (loss_after - loss_before + o->pending_decay) / o->pending_predicted;
    const double w = o->cfg.damping_omega;
    double lam = o->damping;
    if (!isfinite(q) || q < 0.25)
        lam /= w;
    else if (q > 0.75)
        lam *= w;
    if (lam < o->cfg.min_damping)
        lam = o->cfg.min_damping;
    if (lam > o->cfg.max_damping)
        lam = o->cfg.max_damping;
    o->rho = q;
    if (rho)
        *rho = q;
    if (lam != o->damping) {
        o->damping = lam;
        for (int k = 0; k < o->n; k++)
            kfac_block_instantiate_factors(o->L[k].block, lam);
    }
    return KFAC_OK;
}

/* ------------------------------------------------------------------ state */

enum { C_STEPS, C_CONSEC, C_TOTAL, C_SEED, C_APPLIED, C_N };

static int put(kfac_ckpt_entry *e, char (*names)[KFAC_STATE_NAME], int n, int i,
               const char *name, kfac_ckpt_type t, size_t count, void *data)
{
    if (e && i < n) {
        snprintf(names[i], KFAC_STATE_NAME, "%s", name);
        e[i].name = names[i];
        e[i].type = t;
        e[i].count = count;
        e[i].data = data;
    }
    return i + 1;
}

int kfac_opt_state(kfac_opt *o, kfac_ckpt_entry *e, char (*names)[KFAC_STATE_NAME], int n)
{
    if (!o || (e && !names))
        return -1;
    char nm[KFAC_STATE_NAME];
    int i = 0;
    o->ck[C_STEPS] = o->steps_run;
    o->ck[C_CONSEC] = o->consecutive_failures;
    o->ck[C_TOTAL] = o->total_failures;
    memcpy(&o->ck[C_SEED], &o->seed, sizeof(int64_t));
    o->ck[C_APPLIED] = o->applied_steps;
    i = put(e, names, n, i, "opt.counters", KFAC_CKPT_I64, C_N, o->ck);
    i = put(e, names, n, i, "opt.damping", KFAC_CKPT_F64, 1, &o->damping);
    i = put(e, names, n, i, "opt.rho", KFAC_CKPT_F64, 1, &o->rho);
    for (int k = 0; k < o->n; k++) {
        opt_layer *L = &o->L[k];
        L->ck[0] = L->failures;
        snprintf(nm, sizeof nm, "kfac.%d.failures", L->id);
        i = put(e, names, n, i, nm, KFAC_CKPT_I64, 1, L->ck);
        snprintf(nm, sizeof nm, "kfac.%d.velocity_w", L->id);
        i = put(e, names, n, i, nm, KFAC_CKPT_F32, L->nw, L->vel_w);
        if (L->nb) {
            snprintf(nm, sizeof nm, "kfac.%d.velocity_b", L->id);
            i = put(e, names, n, i, nm, KFAC_CKPT_F32, L->nb, L->vel_b);
        }
        kfac_ckpt_entry be[16];
        int nb = kfac_block_state(L->block, be, 16);
        if (nb > 16)
            return -1; /* a kind with more arrays than this walk expects */
        for (int j = 0; j < nb; j++) {
            snprintf(nm, sizeof nm, "kfac.%d.%s", L->id, be[j].name);
            i = put(e, names, n, i, nm, be[j].type, be[j].count, be[j].data);
        }
    }
    return e && i > n ? -1 : i;
}

kfac_status kfac_opt_state_loaded(kfac_opt *o)
{
    if (!o)
        return KFAC_ERR_NULL;
    if (o->ck[C_STEPS] < 0 || o->ck[C_CONSEC] < 0 || o->ck[C_CONSEC] > o->ck[C_STEPS] ||
        o->ck[C_TOTAL] < o->ck[C_CONSEC] || o->ck[C_CONSEC] > 1 << 30 ||
        o->ck[C_APPLIED] < 0 || o->ck[C_APPLIED] > o->ck[C_STEPS] ||
        !isfinite(o->damping) || o->damping < 0.0 ||
        (o->cfg.damping_type == KFAC_DAMPING_FACTORED && o->damping == 0.0))
        return KFAC_ERR_FORMAT;
    /* the bounds may have changed with the cfg since the save */
    if (o->damping < o->cfg.min_damping) o->damping = o->cfg.min_damping;
    if (o->damping > o->cfg.max_damping) o->damping = o->cfg.max_damping;
    for (int k = 0; k < o->n; k++) {
        opt_layer *L = &o->L[k];
        if (L->ck[0] < 0 || L->ck[0] > 1 << 30)
            return KFAC_ERR_FORMAT;
        kfac_status st = kfac_block_state_loaded(L->block);
        if (st == KFAC_OK)
            st = kfac_block_instantiate_factors(L->block, o->damping);
        if (st != KFAC_OK)
            return st;
        L->failures = (int)L->ck[0];
    }
    o->steps_run = (long)o->ck[C_STEPS];
    o->consecutive_failures = (int)o->ck[C_CONSEC];
    o->total_failures = (long)o->ck[C_TOTAL];
    memcpy(&o->seed, &o->ck[C_SEED], sizeof o->seed);
    o->applied_steps = (long)o->ck[C_APPLIED];
    o->adapt_pending = 0; /* a save happens after a step's adaptation */
    o->ready = 1;
    for (int k = 0; k < o->n; k++)
        if (!kfac_block_has_inverse(o->L[k].block))
            o->ready = 0;
    return KFAC_OK;
}
