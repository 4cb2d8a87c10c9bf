/*
 * The K-FAC step over a set of layers (sem. 5): g = -grad/batch + wd*W,
 * Delta = F^-1 g per block, one norm-constraint coefficient nu over every
 * layer that is applied, then momentum and the weight update. Two passes, so
 * a layer whose g or Delta is not finite is known before anything moves and
 * the clip sums only the layers that do move. kfac_opt_step (kfac_opt.c)
 * runs this as the last phase of its step; kfac_step is the same for callers
 * that keep their own layers.
 */
#include "kfac_internal.h"

#include <math.h>
#include <string.h>


static size_t nw_of(const kfac_block *b) { return (size_t)b->groups * b->n_g * b->k; }
static size_t nb_of(const kfac_block *b) { return b->bias ? (size_t)b->groups * b->n_g : 0; }

static double dotf(const float *x, const float *y, size_t n)
{
    double s = 0.0;
    for (size_t i = 0; i < n; i++)
        s += (double)x[i] * y[i];
    return s;
}

/* <g, Delta> of one layer from its scratch buffers; non-finite marks a layer
 * that must be skipped (pass 1 poisons Delta for exactly those layers). */
static double layer_dot(const kfac_layer_ref *L)
{
    const kfac_block *b = L->block;
    double d = dotf(L->scratch_w, L->scratch2_w, nw_of(b));
    if (b->bias)
        d += dotf(L->scratch_b, L->scratch2_b, nb_of(b));
    return d;
}

static kfac_status check_layers(const kfac_layer_ref *layers, int n)
{
    if (n > 0 && !layers)
        return KFAC_ERR_NULL;
    if (n < 0)
        return KFAC_ERR_INVALID_ARG;
    for (int l = 0; l < n; l++) {
        const kfac_layer_ref *L = &layers[l];
        if (!L->block || !L->w || !L->grad_w || !L->vel_w || !L->scratch_w || !L->scratch2_w)
            return KFAC_ERR_NULL;
        if (L->block->bias &&
            (!L->b || !L->grad_b || !L->vel_b || !L->scratch_b || !L->scratch2_b))
            return KFAC_ERR_NULL;
    }
    return KFAC_OK;
}

/* Pass 1: g into scratch, Delta into scratch2, and the sum of <g, Delta>
 * over the layers that can be applied; a layer that cannot has Delta
 * poisoned (scratch2_w[0] = NaN). Nothing the caller sees changes. */
static double precondition(kfac_layer_ref *layers, int n, double inv_batch, double wd)
{
    double sum = 0.0;
    for (int l = 0; l < n; l++) {
        kfac_layer_ref *L = &layers[l];
        const size_t nw = nw_of(L->block), nb = nb_of(L->block);
        for (size_t i = 0; i < nw; i++)
            L->scratch_w[i] = (float)(-(double)L->grad_w[i] * inv_batch + wd * L->w[i]);
        for (size_t i = 0; i < nb; i++)
            L->scratch_b[i] = (float)(-(double)L->grad_b[i] * inv_batch);
        int ok = kfac_all_finite_f(L->scratch_w, nw) && kfac_all_finite_f(L->scratch_b, nb) &&
                 kfac_block_multiply_inverse(L->block, L->scratch_w, L->scratch_b,
                                             L->scratch2_w, L->scratch2_b) == KFAC_OK;
        if (!ok) {
            L->scratch2_w[0] = NAN;
            continue;
        }
        double d = layer_dot(L);
        if (isfinite(d))
            sum += d;
    }
    return sum;
}

kfac_status kfac_step(kfac_layer_ref *layers, int n, const kfac_step_args *args,
                      kfac_step_report *report)
{
    if (!args)
        return KFAC_ERR_NULL;
    kfac_status st = check_layers(layers, n);
    if (st != KFAC_OK)
        return st;
    if (args->batch < 1 || !isfinite(args->learning_rate) ||
        !isfinite(args->momentum) || !isfinite(args->decay) ||
        !isfinite(args->norm_constraint) || args->norm_constraint < 0.0)
        return KFAC_ERR_INVALID_ARG;
    const double sum = precondition(layers, n, 1.0 / args->batch, args->decay);
    double nu = 1.0;
    if (args->norm_constraint > 0.0 && sum > 0.0) {
        double t = sqrt(args->norm_constraint /
                        (args->learning_rate * args->learning_rate * sum));
        if (t < 1.0)
            nu = t;
    }

    /* Pass 2: apply or skip; gradients are consumed either way. */
    int applied = 0, skipped = 0, first = -1;
    const double mu = args->momentum, eta = args->learning_rate;
    for (int l = 0; l < n; l++) {
        kfac_layer_ref *L = &layers[l];
        const size_t nw = nw_of(L->block), nb = nb_of(L->block);
        if (isfinite(layer_dot(L))) {
            for (size_t i = 0; i < nw; i++) {
                L->vel_w[i] = (float)(mu * L->vel_w[i] + nu * L->scratch2_w[i]);
                L->w[i] = (float)(L->w[i] - eta * L->vel_w[i]);
            }
            for (size_t i = 0; i < nb; i++) {
                L->vel_b[i] = (float)(mu * L->vel_b[i] + nu * L->scratch2_b[i]);
                L->b[i] = (float)(L->b[i] - eta * L->vel_b[i]);
            }
            /* The header promises scratch ends up holding Delta. */
            memcpy(L->scratch_w, L->scratch2_w, sizeof(float) * nw);
            if (nb)
                memcpy(L->scratch_b, L->scratch2_b, sizeof(float) * nb);
            applied++;
        } else {
            if (first < 0)
                first = l;
            skipped++;
        }
        memset(L->grad_w, 0, sizeof(float) * nw);
        if (nb)
            memset(L->grad_b, 0, sizeof(float) * nb);
    }
    if (report) {
        report->nu = nu;
        report->gdotdelta = sum;
        report->applied = applied;
        report->skipped = skipped;
        report->first_skipped = first;
    }
    return KFAC_OK;
}

/* ------------------------------------------------------------------ automatic step size */

static double dotf_w(const kfac_layer_ref *L, const float *xw, const float *xb, const float *yw,
                     const float *yb)
{
    const kfac_block *b = L->block;
    double d = dotf(xw, yw, nw_of(b));
    if (b->bias)
        d += dotf(xb, yb, nb_of(b));
    return d;
}

/* The model's terms from the blocks' own products, per layer, kept only
 * when all of a layer's are finite (else the layer is marked skipped);
 * scratch (g) is reused for the products once g'D and g'u0 are in. */
static void kfac_terms(kfac_layer_ref *layers, int n, double wd, double m[3], double *r1,
                       double *r2)
{
    for (int l = 0; l < n; l++) {
        kfac_layer_ref *L = &layers[l];
        const size_t nw = nw_of(L->block);
        float *D_w = L->scratch2_w, *D_b = L->scratch2_b, *u_w = L->vel_w, *u_b = L->vel_b;
        if (!isfinite(D_w[0]))
            continue;
        double gD = layer_dot(L), gu = dotf_w(L, L->scratch_w, L->scratch_b, u_w, u_b);
        double t11 = 0, t12 = 0, t22 = 0;
        int ok = kfac_block_multiply(L->block, D_w, D_b, L->scratch_w, L->scratch_b) == KFAC_OK;
        if (ok) {
            t11 = dotf_w(L, D_w, D_b, L->scratch_w, L->scratch_b) + wd * dotf(D_w, D_w, nw);
            t12 = dotf_w(L, u_w, u_b, L->scratch_w, L->scratch_b) + wd * dotf(u_w, D_w, nw);
            ok = kfac_block_multiply(L->block, u_w, u_b, L->scratch_w, L->scratch_b) == KFAC_OK;
        }
        if (ok)
            t22 = dotf_w(L, u_w, u_b, L->scratch_w, L->scratch_b) + wd * dotf(u_w, u_w, nw);
        if (!ok || !isfinite(gD + gu + t11 + t12 + t22)) {
            D_w[0] = NAN;
            continue;
        }
        *r1 += gD; *r2 += gu; m[0] += t11; m[1] += t12; m[2] += t22;
    }
}

/* W <- W + eps v over the applied layers, the old W kept in scratch; or
 * back from scratch (restore), bit for bit. which: 0 Delta, 1 velocity. */
static void perturb(kfac_layer_ref *layers, int n, int which, double eps, int restore)
{
    for (int l = 0; l < n; l++) {
        kfac_layer_ref *L = &layers[l];
        const size_t nw = nw_of(L->block), nb = nb_of(L->block);
        if (!isfinite(L->scratch2_w[0]))
            continue;
        if (restore) {
            memcpy(L->w, L->scratch_w, sizeof(float) * nw);
            if (nb)
                memcpy(L->b, L->scratch_b, sizeof(float) * nb);
            continue;
        }
        const float *vw = which ? L->vel_w : L->scratch2_w, *vb = which ? L->vel_b : L->scratch2_b;
        memcpy(L->scratch_w, L->w, sizeof(float) * nw);
        for (size_t i = 0; i < nw; i++)
            L->w[i] = (float)(L->w[i] + eps * vw[i]);
        if (nb) {
            memcpy(L->scratch_b, L->b, sizeof(float) * nb);
            for (size_t i = 0; i < nb; i++)
                L->b[i] = (float)(L->b[i] + eps * vb[i]);
        }
    }
}

/* J v of the network's outputs by a forward difference: (z(W + eps v) - z0)
 * / eps into z, eps = 1e-3 (1 + |W|) / |v| (a relative perturbation of
 * 1e-3: float rounding of the outputs, ~1e-7 relative, stays far below the
 * difference, and the second-order error is ~1e-3 of the first). */
static kfac_status jvp(kfac_layer_ref *layers, int n, const kfac_auto_args *a, int which,
                       double wnorm, double vnorm, float *z)
{
    const kfac_curvature *c = a->exact;
    double eps = 1e-3 * (1.0 + wnorm) / vnorm;
    perturb(layers, n, which, eps, 0);
    kfac_status st = c->outputs(c->ctx, 1, z);
    perturb(layers, n, which, eps, 1);
    if (st != KFAC_OK)
        return st;
    for (size_t i = 0; i < c->n_out; i++)
        z[i] = (float)(((double)z[i] - a->z0[i]) / eps);
    return KFAC_OK;
}

/* The model's terms from the network's own Gauss-Newton products (sem. of
 * kfac_curvature) plus (damping + decay) I: one forward pass per direction. */
static kfac_status exact_terms(kfac_layer_ref *layers, int n, const kfac_auto_args *a,
                               double m[3], double *r1, double *r2)
{
    const kfac_curvature *c = a->exact;
    double w2 = 0, d2 = 0, u2 = 0, du = 0, dw2 = 0, uw2 = 0, duw = 0;
    for (int l = 0; l < n; l++) {
        kfac_layer_ref *L = &layers[l];
        const size_t nw = nw_of(L->block);
        if (!isfinite(L->scratch2_w[0]))
            continue;
        double gD = layer_dot(L), gu = dotf_w(L, L->scratch_w, L->scratch_b, L->vel_w, L->vel_b);
        if (!isfinite(gD + gu)) {
            L->scratch2_w[0] = NAN;
            continue;
        }
        *r1 += gD;
        *r2 += gu;
        w2 += dotf_w(L, L->w, L->b, L->w, L->b);
        d2 += dotf_w(L, L->scratch2_w, L->scratch2_b, L->scratch2_w, L->scratch2_b);
        u2 += dotf_w(L, L->vel_w, L->vel_b, L->vel_w, L->vel_b);
        du += dotf_w(L, L->scratch2_w, L->scratch2_b, L->vel_w, L->vel_b);
        dw2 += dotf(L->scratch2_w, L->scratch2_w, nw);
        uw2 += dotf(L->vel_w, L->vel_w, nw);
        duw += dotf(L->scratch2_w, L->vel_w, nw);
    }
    if (!(d2 > 0.0) || !isfinite(w2 + d2 + u2))
        return KFAC_OK; /* nothing to model: the solve below finds no step */
    kfac_status st = c->outputs(c->ctx, 0, a->z0);
    if (st == KFAC_OK)
        st = jvp(layers, n, a, 0, sqrt(w2), sqrt(d2), a->z1);
    if (st != KFAC_OK)
        return st;
    const double lam = a->damping, wd = a->decay;
    m[0] = c->metric(c->ctx, a->z1, a->z1) + lam * d2 + wd * dw2;
    if (u2 > 0.0) {
        if ((st = jvp(layers, n, a, 1, sqrt(w2), sqrt(u2), a->z2)) != KFAC_OK)
            return st;
        m[1] = c->metric(c->ctx, a->z1, a->z2) + lam * du + wd * duw;
        m[2] = c->metric(c->ctx, a->z2, a->z2) + lam * u2 + wd * uw2;
    }
    return KFAC_OK;
}

/* Martens & Grosse 2015, sec. 7: u = a Delta + m u0 (u0 the previous step)
 * minimising M(u) = -g^T u + u^T C u / 2 with C the damped block plus the
 * weight decay (weights only), i.e. the 2x2 system
 *   [D'CD  D'Cu0] [a]   [g'D ]
 *   [u0'CD u0'Cu0][m] = [g'u0],
 * whose optimum predicts M = -(a g'D + m g'u0)/2. C is the network's own
 * Gauss-Newton matrix plus the damping (a->exact), or the blocks' damped
 * Kronecker products (kfac_block_multiply: current factors and damping). */
kfac_status kfac_step_auto(kfac_layer_ref *layers, int n, const kfac_auto_args *a,
                           kfac_auto_report *r)
{
    if (!a || !r)
        return KFAC_ERR_NULL;
    kfac_status st = check_layers(layers, n);
    if (st != KFAC_OK)
        return st;
    if (a->batch < 1 || !isfinite(a->scale) || a->scale < 0.0 || !isfinite(a->decay) ||
        !isfinite(a->norm_constraint) || a->norm_constraint < 0.0)
        return KFAC_ERR_INVALID_ARG;
    memset(r, 0, sizeof *r);
    r->step.first_skipped = -1;
    const double wd = a->decay;
    precondition(layers, n, 1.0 / a->batch, wd);

    double m[3] = {0, 0, 0}, r1 = 0, r2 = 0;
    if (a->exact)
        st = exact_terms(layers, n, a, m, &r1, &r2);
    else
        kfac_terms(layers, n, wd, m, &r1, &r2);
    if (st != KFAC_OK)
        return st;
    const double m11 = m[0], m12 = m[1], m22 = m[2];
    double al = 0.0, mu = 0.0;
    if (m11 > 0.0 && r1 > 0.0) {
        al = r1 / m11;
        double det = m11 * m22 - m12 * m12;
        if (m22 > 0.0 && det > 1e-12 * m11 * m22) {
            double a2 = (r1 * m22 - r2 * m12) / det, m2 = (m11 * r2 - m12 * r1) / det;
            /* the 2-d optimum must decrease the model more than the 1-d one */
            if (isfinite(a2) && isfinite(m2) && a2 * r1 + m2 * r2 > al * r1) {
                al = a2;
                mu = m2;
            }
        }
    }
    const double P = al * r1 + mu * r2; /* = u*' C u*, twice the predicted decrease */
    /* t u*: the model's change is -P (t - t^2/2). Safety bounds, both
     * tuning-free by default: the predicted decrease at most max_decrease
     * (the caller: the current loss, which cannot go below 0), and,
     * when given, u' C u = t^2 P at most the norm constraint. */
    double s = a->scale, nu = 1.0;
    if (s > 1.0)
        s = 1.0; /* a schedule above its base rate does not pass the model's optimum */
    if (a->max_decrease > 0.0 && P > 0.0 && P * (s - 0.5 * s * s) > a->max_decrease) {
        double q = 2.0 * a->max_decrease / P; /* < 2s - s^2 <= 1 */
        nu = (1.0 - sqrt(1.0 - q)) / s;
    }
    if (a->norm_constraint > 0.0 && (s * nu) * (s * nu) * P > a->norm_constraint)
        nu = sqrt(a->norm_constraint / P) / s;
    s *= nu;
    r->alpha = s * al;
    r->momentum = s * mu;
    r->predicted = -s * P + 0.5 * s * s * P;
    r->step.nu = nu;
    r->step.gdotdelta = r1;

    /* Apply u = alpha Delta + momentum u0 where the model had every term;
     * the velocity buffer keeps u, the next step's u0. */
    double dec = 0.0;
    for (int l = 0; l < n; l++) {
        kfac_layer_ref *L = &layers[l];
        const size_t nw = nw_of(L->block), nb = nb_of(L->block);
        if (P > 0.0 && isfinite(P) && isfinite(L->scratch2_w[0])) {
            for (size_t i = 0; i < nw; i++) {
                double u = r->alpha * L->scratch2_w[i] + r->momentum * L->vel_w[i];
                dec += u * (u - 2.0 * L->w[i]);
                L->vel_w[i] = (float)u;
                L->w[i] = (float)(L->w[i] - u);
            }
            for (size_t i = 0; i < nb; i++) {
                double u = r->alpha * L->scratch2_b[i] + r->momentum * L->vel_b[i];
                L->vel_b[i] = (float)u;
                L->b[i] = (float)(L->b[i] - u);
            }
            r->step.applied++;
        } else {
            if (r->step.first_skipped < 0)
                r->step.first_skipped = l;
            r->step.skipped++;
        }
        memset(L->grad_w, 0, sizeof(float) * nw);
        if (nb)
            memset(L->grad_b, 0, sizeof(float) * nb);
    }
    r->decay_change = 0.5 * wd * dec;
    return KFAC_OK;
}
