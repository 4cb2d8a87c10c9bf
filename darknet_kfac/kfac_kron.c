/*
 * The Kronecker kind (conv KFC and connected K-FAC): its storage, its
 * serialisable state and its table of operations. The operations themselves
 * live with their concept: statistics in kfac_stats.c, damping and inverses
 * in kfac_inverse.c, products in kfac_products.c.
 *
 * Serialised state is what the next step reads: the running factors, the
 * damping split and the inverse (or eigendecomposition) exactly as they are
 * live, so a resumed run multiplies by the very same numbers without
 * recomputing anything. Stage buffers and workspaces are scratch.
 */
#include "kfac_internal.h"
#include "kfac_alloc.h"

#include <string.h>

static void kron_destroy(kfac_block *b)
{
    kfac_kron *K = b->impl;
    double *d[] = {K->A, K->G, K->v0, K->v1, K->v2, K->Ainv, K->Ginv, K->Ainv_st, K->Ginv_st,
                   K->EA, K->dA, K->EG, K->dG, K->EA_st, K->dA_st, K->EG_st, K->dG_st,
                   K->lamA, K->lamG, K->lamA_st, K->lamG_st, K->escr, K->dscr, K->lwork};
    for (size_t i = 0; i < sizeof d / sizeof d[0]; i++)
        KFAC_FREE(d[i]);
    float *f[] = {K->sumA, K->sumG, K->Ainv_f, K->Ginv_f, K->fv0, K->fv1};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        KFAC_FREE(f[i]);
    KFAC_FREE(K->liwork);
    KFAC_FREE(K);
    b->impl = NULL;
}

static kfac_status kron_create(kfac_block *b)
{
    const size_t G = (size_t)b->groups, nv = (size_t)b->n_g * b->kb;
    kfac_kron *K = kfac_balloc(b, 1, sizeof *K);
    if (!K)
        return KFAC_ERR_NOMEM;
    b->impl = K;
    K->sumA = kfac_balloc(b, G * kfac_sq(b->kb), sizeof(float));
    K->sumG = kfac_balloc(b, G * kfac_sq(b->n_g), sizeof(float));
    K->A = kfac_balloc(b, G * kfac_sq(b->kb), sizeof(double));
    K->G = kfac_balloc(b, G * kfac_sq(b->n_g), sizeof(double));
    K->v0 = kfac_balloc(b, nv, sizeof(double));
    K->v1 = kfac_balloc(b, nv, sizeof(double));
    K->v2 = kfac_balloc(b, nv, sizeof(double));
    K->lamA = kfac_balloc(b, G, sizeof(double));
    K->lamG = kfac_balloc(b, G, sizeof(double));
    K->lamA_st = kfac_balloc(b, G, sizeof(double));
    K->lamG_st = kfac_balloc(b, G, sizeof(double));
    if (!K->sumA || !K->sumG || !K->A || !K->G || !K->v0 || !K->v1 || !K->v2 || !K->lamA ||
        !K->lamG || !K->lamA_st || !K->lamG_st)
        return KFAC_ERR_NOMEM; /* the caller frees the block, and with it K */
    return KFAC_OK;
}

static void entry(kfac_ckpt_entry *e, int max, int *n, const char *name, kfac_ckpt_type t,
                  size_t count, void *data)
{
    if (e && *n < max) {
        e[*n].name = name;
        e[*n].type = t;
        e[*n].count = count;
        e[*n].data = data;
    }
    ++*n;
}

/* Which arrays exist depends only on the damping type, the precision and
 * what was registered, all fixed by the cfg, so a save and a load of the
 * same cfg list the same entries. */
static int kron_state(kfac_block *b, kfac_ckpt_entry *e, int max)
{
    kfac_kron *K = b->impl;
    const size_t G = (size_t)b->groups, nA = G * kfac_sq(b->kb), nG = G * kfac_sq(b->n_g);
    int n = 0;
    entry(e, max, &n, "A", KFAC_CKPT_F64, nA, K->A);
    entry(e, max, &n, "G", KFAC_CKPT_F64, nG, K->G);
    entry(e, max, &n, "lam_A", KFAC_CKPT_F64, G, K->lamA);
    entry(e, max, &n, "lam_G", KFAC_CKPT_F64, G, K->lamG);
    if (K->Ainv_f) {
        entry(e, max, &n, "A_inverse_f32", KFAC_CKPT_F32, nA, K->Ainv_f);
        entry(e, max, &n, "G_inverse_f32", KFAC_CKPT_F32, nG, K->Ginv_f);
    } else if (K->Ainv) {
        entry(e, max, &n, "A_inverse", KFAC_CKPT_F64, nA, K->Ainv);
        entry(e, max, &n, "G_inverse", KFAC_CKPT_F64, nG, K->Ginv);
    }
    if (K->EA) {
        K->ck[0] = K->has_eig;
        entry(e, max, &n, "eig", KFAC_CKPT_I64, 1, K->ck);
        entry(e, max, &n, "A_eigvec", KFAC_CKPT_F64, nA, K->EA);
        entry(e, max, &n, "A_eigval", KFAC_CKPT_F64, G * (size_t)b->kb, K->dA);
        entry(e, max, &n, "G_eigvec", KFAC_CKPT_F64, nG, K->EG);
        entry(e, max, &n, "G_eigval", KFAC_CKPT_F64, G * (size_t)b->n_g, K->dG);
    }
    return n;
}

static kfac_status kron_state_loaded(kfac_block *b)
{
    kfac_kron *K = b->impl;
    if (K->EA) {
        if (K->ck[0] != 0 && K->ck[0] != 1)
            return KFAC_ERR_FORMAT;
        K->has_eig = (int)K->ck[0];
    }
    return KFAC_OK;
}

const kfac_kind kfac_kind_kron = {
    .name = "kronecker",
    .create = kron_create,
    .destroy = kron_destroy,
    .acc_a = kron_acc_a,
    .acc_g = kron_acc_g,
    .clear = kron_clear,
    .raw_stats = kron_raw_stats,
    .fold = kron_fold,
    .prepare = kron_prepare,
    .invert = kron_invert,
    .apply = kron_apply,
    .dense = kron_dense,
    .state = kron_state,
    .state_loaded = kron_state_loaded,
};
