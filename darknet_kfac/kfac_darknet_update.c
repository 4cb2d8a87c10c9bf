/*
 * Darknet glue, update: replaces SGD for the K-FAC layers inside
 * update_network. Darknet's schedule (learning rate after its policy, the
 * step index from *net->seen) goes into one kfac_opt_step, which does the
 * K-FAC work; this file turns its report into Darknet-style messages, runs
 * Darknet's own SGD lines for the batch-norm scales and shifts (they are not
 * in the block), stops training after max_failures failed steps in a row,
 * and prints the progress line.
 */
#include "kfac_darknet_internal.h"

#include <stdio.h>
#include <string.h>

#include "utils.h"
#include "blas.h"

/* Darknet's update_convolutional_layer / update_connected_layer lines for
 * scales and shifts. They run only on a step the context applied, when
 * every gradient was finite. */
static void update_batchnorm(network *net, kfac_net_state *st, update_args a)
{
    for (int k = 0; k < st->nlayers; ++k) {
        kfac_layer_state *ls = &st->layers[k];
        layer *l = &net->layers[ls->index];
        if (ls->bias) continue;
        int n = ls->nbiases;
        float lr = a.learning_rate * l->learning_rate_scale;
        axpy_cpu(n, lr / a.batch, l->bias_updates, 1, l->biases, 1);
        scal_cpu(n, a.momentum, l->bias_updates, 1);
        if (l->scales && l->scale_updates) {
            axpy_cpu(n, lr / a.batch, l->scale_updates, 1, l->scales, 1);
            scal_cpu(n, a.momentum, l->scale_updates, 1);
        }
    }
}

static void report_trouble(const kfac_net_state *st, const kfac_opt_report *r, long step)
{
    for (int k = 0; k < st->nlayers; ++k) {
        const kfac_layer_state *ls = &st->layers[k];
        if (r->cov_status[ls->slot] != KFAC_OK)
            fprintf(stderr, "K-FAC: layer %d: new statistics rejected (%s), keeping the "
                    "previous factors\n", ls->index, kfac_status_str(r->cov_status[ls->slot]));
    }
    for (int k = 0; k < st->nlayers; ++k) {
        const kfac_layer_state *ls = &st->layers[k];
        if (r->inv_status[ls->slot] != KFAC_OK)
            fprintf(stderr, "K-FAC: layer %d: inverse update failed (%s), %s\n", ls->index,
                    kfac_status_str(r->inv_status[ls->slot]),
                    kfac_block_has_inverse(kfac_opt_block(st->opt, ls->slot))
                    ? "keeping the last good inverse" : "the layer waits for one");
    }
    if (r->skipped_step) {
        char why[128];
        snprintf(why, sizeof why, "%s%s", r->cov_failed ? ", statistics rejected" : "",
                 r->inv_failed ? ", inverse failed" : "");
        if (r->bad_grad_slot >= 0)
            snprintf(why + strlen(why), sizeof why - strlen(why),
                     ", non-finite gradient in layer %d",
                     kfac_opt_layer_id(st->opt, r->bad_grad_slot));
        fprintf(stderr, "K-FAC: step %ld skipped (%s): no K-FAC weight changed\n", step, why + 2);
    }
    if (r->step.skipped > 0)
        fprintf(stderr, "K-FAC: %d layer(s) skipped this step (first: layer %d): non-finite "
                "gradient/update or no inverse yet; their weights are unchanged\n",
                r->step.skipped, kfac_opt_layer_id(st->opt, r->step.first_skipped));
}

void kfac_update_network_cpu(network *net, update_args a)
{
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    if (!st) return;
    /* a caller that does not print progress still gets every line, late */
    if (st->pending_print) kfac_print_progress(net);

    kfac_opt_step_args sa;
    sa.step = kfac_current_step(net);
    sa.learning_rate = a.learning_rate;
    sa.base_learning_rate = net->learning_rate;
    sa.decay = a.decay;
    sa.batch = a.batch;
    sa.loss = *net->cost / net->batch; /* the last datum's, at these weights */
    kfac_opt_report *r = &st->last;
    kfac_status s = kfac_opt_step(st->opt, &sa, r);
    if (s != KFAC_OK)
        kfac_dn_die("K-FAC step rejected its arguments (step %ld, learning rate %g, batch %d): %s",
                    sa.step, sa.learning_rate, sa.batch, kfac_status_str(s));
    report_trouble(st, r, sa.step);

    /* Levenberg-Marquardt: the loss of this mini-batch after the K-FAC step,
     * before Darknet moves anything else, against the loss the forward pass
     * of this datum found before it (the last datum's, with subdivisions) */
    double t0 = what_time_is_it_now();
    st->t_adapt = 0;
    if (r->adapt_due) {
        double before = *net->cost / net->batch;
        double after = kfac_dn_eval_loss(net, st);
        kfac_opt_adapt_damping(st->opt, before, after, NULL);
        st->t_adapt = what_time_is_it_now() - t0;
        t0 += st->t_adapt;
    }
    if (!r->skipped_step) update_batchnorm(net, st, a);
    st->t_stats = st->t_stats_acc + r->t_fold;
    st->t_stats_acc = 0;
    st->t_precond = r->t_precond + (what_time_is_it_now() - t0);
    st->last_step = sa.step;
    st->pending_print = 1;

    if (r->stop) {
        kfac_opt_info oi;
        kfac_opt_info_get(st->opt, &oi);
        kfac_dn_die("%d consecutive K-FAC steps failed (max_failures=%d; last trouble in layer %d): "
                    "stopping before non-finite values reach the weights. Lower the learning rate "
                    "or raise damping in [kfac] of %s", oi.consecutive_failures,
                    kfac_opt_config(st->opt)->max_failures, r->first_bad_id, st->cfgfile);
    }
}

void kfac_print_progress(network *net)
{
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    if (!st || !st->pending_print) return;
    st->pending_print = 0;
    int retries = 0;
    for (int k = 0; k < st->nlayers; ++k)
        retries += kfac_block_num_retries(kfac_opt_block(st->opt, k));
    kfac_opt_info oi;
    kfac_opt_info_get(st->opt, &oi);
    const kfac_opt_report *r = &st->last;
    if (kfac_opt_config(st->opt)->step_size == KFAC_STEP_AUTO)
        printf("kfac %ld: damping %g, rho %.3g, lr %.4g, momentum %.3g, model %.3g, nu %.4g, "
               "skipped %d, failed steps %d in a row/%ld total", st->last_step, oi.damping,
               oi.rho, r->alpha, r->momentum, r->predicted, r->step.nu,
               r->skipped_step ? st->nlayers : r->step.skipped, oi.consecutive_failures,
               oi.total_failures);
    else
        printf("kfac %ld: damping %g, nu %.4g, skipped %d, failed steps %d in a row/%ld total",
               st->last_step, oi.damping, r->step.nu,
               r->skipped_step ? st->nlayers : r->step.skipped, oi.consecutive_failures,
               oi.total_failures);
    if (retries) printf(", inverse retries %d", retries);
    printf("; seconds: stats %.3g, inverses %.3g, precond %.3g", st->t_stats, r->t_inv,
           st->t_precond);
    if (st->t_adapt > 0) printf(", adapt %.3g", st->t_adapt);
    printf("\n");
}
