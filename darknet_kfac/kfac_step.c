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

kfac_status kfac_step(kfac_layer_ref *layers, int n, const kfac_step_args *args,
                      kfac_step_report *report)
{
    if (!args || (n > 0 && !layers))
        return KFAC_ERR_NULL;
    if (n < 0 || args->batch < 1 || !isfinite(args->learning_rate) ||
        !isfinite(args->momentum) || !isfinite(args->decay) ||
        !isfinite(args->norm_constraint) || args->norm_constraint < 0.0)
        return KFAC_ERR_INVALID_ARG;
    for (int l = 0; l < n; l++) {
        const kfac_layer_ref *L = &layers[l];
        if (!L->block || !L->w || !L->grad_w || !L->vel_w || !L->scratch_w || !L->scratch2_w)
            return KFAC_ERR_NULL;
        if (L->block->bias &&
            (!L->b || !L->grad_b || !L->vel_b || !L->scratch_b || !L->scratch2_b))
            return KFAC_ERR_NULL;
    }
    const double inv_batch = 1.0 / args->batch, wd = args->decay;

    /* Pass 1: g into scratch, Delta into scratch2, the clip sum over layers
     * that will be applied. Nothing the caller sees changes yet. */
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
