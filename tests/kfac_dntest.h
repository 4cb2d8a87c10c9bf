/*
 * Shared set-up of the Darknet glue tests (header only: the library tests,
 * which link every helper .c file of tests/, have no Darknet). Upstream
 * free_network() does not free every layer array; those leaks are Darknet's
 * and would fail every test binary that builds a network, so the sanitized
 * build runs without LeakSanitizer, and uses its own darknet binary. The
 * accessors read the glue's state and the optimizer context behind it.
 */
#ifndef KFAC_DNTEST_H
#define KFAC_DNTEST_H

#include "darknet.h"
#include "network.h"
#include "kfac.h"
#include "kfac_darknet_internal.h"

#ifdef __SANITIZE_ADDRESS__
const char *__asan_default_options(void) { return "detect_leaks=0"; }
#define DARKNET_BIN "build/darknet-san/darknet"
#else
#define DARKNET_BIN "build/darknet/darknet"
#endif

/* OpenBLAS: one thread, so that every gemm sums in one fixed order. */
void openblas_set_num_threads(int);

static inline kfac_net_state *dn_state(const network *net)
{
    return (kfac_net_state *)net->kfac;
}

static inline kfac_block *dn_block(const kfac_layer_state *ls)
{
    return kfac_opt_block(ls->net->opt, ls->slot);
}

static inline kfac_block_info dn_info(const kfac_layer_state *ls)
{
    kfac_block_info info;
    memset(&info, 0, sizeof info);
    kfac_block_info_get(dn_block(ls), &info);
    return info;
}

static inline kfac_opt_info dn_opt(const kfac_net_state *st)
{
    kfac_opt_info info;
    memset(&info, 0, sizeof info);
    kfac_opt_info_get(st->opt, &info);
    return info;
}

static inline float *dn_vel_w(const kfac_net_state *st, int k)
{
    float *w = NULL;
    kfac_opt_velocity(st->opt, st->layers[k].slot, &w, NULL);
    return w;
}

static inline float *dn_vel_b(const kfac_net_state *st, int k)
{
    float *b = NULL;
    kfac_opt_velocity(st->opt, st->layers[k].slot, NULL, &b);
    return b;
}

/* layers whose weights did not move in the last update */
static inline int dn_last_skipped(const kfac_net_state *st)
{
    return st->last.skipped_step ? st->nlayers : st->last.step.skipped;
}

#endif /* KFAC_DNTEST_H */
