/*
 * What the library's files share about blocks (internal).
 *
 * A block is a generic part -- the layer's shapes, the statistics counts,
 * the damping and what the caller registered -- plus the state of its kind
 * (b->impl), reached only through the kind's table of operations. The public
 * kfac_block_* functions (kfac_block.c) validate their arguments and then
 * dispatch through b->kind; nothing outside a kind's own files looks inside
 * b->impl. The Kronecker kind (conv KFC and connected K-FAC) is the first:
 * its state is struct kfac_kron below, shared by kfac_stats.c (statistics),
 * kfac_inverse.c (damping and inverses), kfac_products.c (products) and
 * kfac_kron.c (its storage and serialised state).
 *
 * A new kind is one file defining a kfac_kind and one line in the kinds[]
 * table of kfac_block.c.
 */
#ifndef KFAC_INTERNAL_H
#define KFAC_INTERNAL_H

#include "kfac.h"

#include <stdint.h>

#define KFAC_MAX_MATPOWER 8
#define KFAC_CHOL_RETRIES 3

typedef struct kfac_kind kfac_kind;

struct kfac_block {
    const kfac_kind *kind;
    void *impl;                /* the kind's state */

    int is_conv;
    kfac_conv_geom geom;       /* conv only */
    int groups, n_g, k, kb, T, out_h, out_w, bias;
    size_t nparams;
    size_t bytes;              /* everything allocated for the block */
    kfac_damping_type dtype;
    int float_inv;             /* precond_precision float */
    double lam;                /* lambda as instantiated (sem. 4) */
    int num_towers;

    /* statistics of the current step */
    long mA, mG;               /* examples counted */
    float *patches;            /* k*T, GENERAL/IMAGE conv only */
    float *ones;               /* T: row sums of the patches (bias row of A) */
    int has_factors;

    /* what update_inverses computes */
    int inv_registered;
    int nmat;
    double mat_exp[KFAC_MAX_MATPOWER];
    int has_inverse;
    int retries;

    /* serialisation scratch for the int fields above (kfac_block_state) */
    int64_t ck[3];
};

/* Raw statistics of one step as the kind keeps them: count matrices of
 * dim x dim floats, row-major, the upper triangle holding the sums. */
typedef struct {
    float *data;
    int dim, count;
} kfac_raw_stats;

/* A kind's operations. b's generic fields are set and validated before
 * create; every other op is called only with arguments the dispatcher in
 * kfac_block.c has checked (non-NULL buffers, group in range, registration
 * rules), and only after create succeeded. */
struct kfac_kind {
    const char *name;
    /* allocates b->impl and the kind's buffers (counted in b->bytes) */
    kfac_status (*create)(kfac_block *b);
    void (*destroy)(kfac_block *b);
    /* nvec k-vectors of group `group` into the A statistics (x is k x nvec
     * row-major, vectors in columns, when rows == 0; nvec x k, vectors in
     * rows, when rows == 1); likewise n_g-vectors into G */
    void (*acc_a)(kfac_block *b, int group, const float *x, int nvec, int rows);
    void (*acc_g)(kfac_block *b, int group, const float *d, int nvec, int rows);
    void (*clear)(kfac_block *b);
    int (*raw_stats)(kfac_block *b, kfac_raw_stats *out, int max);
    /* statistics into factors (sem. 3): new = sums * inv_mt, EMA with decay
     * unless first; NOT_FINITE (factors unchanged) on non-finite sums */
    kfac_status (*fold)(kfac_block *b, double inv_mt, double decay, int first);
    /* registration: allocates what invert will need for the inverse
     * (exp == -1, inverse = 1) or for a matrix power exp */
    kfac_status (*prepare)(kfac_block *b, int inverse, double exp);
    kfac_status (*invert)(kfac_block *b);
    /* out = (damped block)^exp v: exp 1 multiply, -1 with the registered
     * inverse, otherwise a registered power */
    kfac_status (*apply)(kfac_block *b, double exp, const float *v_w, const float *v_b,
                         float *out_w, float *out_b);
    kfac_status (*dense)(const kfac_block *b, double *out);
    /* the kind's serialisable arrays (names relative to the block), at most
     * max; the return value is how many */
    int (*state)(kfac_block *b, kfac_ckpt_entry *e, int max);
    kfac_status (*state_loaded)(kfac_block *b);
};

extern const kfac_kind kfac_kind_kron;

/* The Kronecker kind's state: factors A (kb x kb) and G (n_g x n_g) per group. */
typedef struct {
    float *sumA, *sumG;        /* step statistics: groups*kb*kb, groups*n_g*n_g, upper */
    double *A, *G;             /* factors, full symmetric, groups-major */
    double *v0, *v1, *v2;      /* n_g*kb product workspaces */
    int has_eig;

    /* live/stage pairs, swapped on a successful update_inverses */
    double *Ainv, *Ginv, *Ainv_st, *Ginv_st;           /* factored inverse */
    /* precond_precision float: float copies of the live factored inverse and
     * the product workspaces, so the per-step products run in sgemm */
    float *Ainv_f, *Ginv_f, *fv0, *fv1;
    double *EA, *dA, *EG, *dG, *EA_st, *dA_st, *EG_st, *dG_st; /* Q^T rows, eigvals */
    double *lamA, *lamG, *lamA_st, *lamG_st;           /* per group, as used */

    /* LAPACK workspace sized once for max(kb, n_g), plus eigen scratch for
     * the Cholesky fallback */
    double *escr, *dscr, *lwork;
    int *liwork;
    int lwork_n, liwork_n;

    int64_t ck[1];             /* serialisation scratch: has_eig */
} kfac_kron;

/* ---- shared helpers (kfac_block.c) */

/* kfac_conv_block_create / kfac_fc_block_create without the config check,
 * for a caller that has checked cfg already (NULL: defaults) */
kfac_status kfac_conv_block_new(const kfac_conv_geom *g, const kfac_config *cfg,
                                kfac_block **out);
kfac_status kfac_fc_block_new(int inputs, int outputs, int bias, const kfac_config *cfg,
                              kfac_block **out);

int kfac_mul_ok(size_t a, size_t b, size_t *out);
/* zeroed allocation counted in b->bytes; n == 0 allocates one element */
void *kfac_balloc(kfac_block *b, size_t n, size_t sz);
int kfac_all_finite_d(const double *x, size_t n);
int kfac_all_finite_f(const float *x, size_t n);
/* finite and representable as a float (a double -> float conversion out of
 * range is undefined behaviour) */
int kfac_all_float_range(const double *x, size_t n);
/* (kfac_products.c) the per-group parameter layout of kfac.h: group j of (w, bias) <-> V
 * (n_g x kb row-major) */
void kfac_load_group(const kfac_block *b, int j, const float *w, const float *bias, double *V);
void kfac_store_group(const kfac_block *b, int j, const double *V, float *w, float *bias);
void kfac_load_group_f(const kfac_block *b, int j, const float *w, const float *bias, float *V);
void kfac_store_group_f(const kfac_block *b, int j, const float *V, float *w, float *bias);

static inline size_t kfac_sq(int n) { return (size_t)n * (size_t)n; }

/* The Kronecker-only accessors' argument rule (get/set factors, the damping
 * split): NULL block, then a group out of range or another kind, then no
 * factors yet (when they are needed). */
static inline kfac_status kron_group_check(const kfac_block *b, int group, int need_factors)
{
    if (!b)
        return KFAC_ERR_NULL;
    if (group < 0 || group >= b->groups || b->kind != &kfac_kind_kron)
        return KFAC_ERR_INVALID_ARG;
    return need_factors && !b->has_factors ? KFAC_ERR_STATE : KFAC_OK;
}

/* ---- the automatic step (kfac_step.c) */

typedef struct {
    double scale;           /* the caller's schedule, eta/eta_0 (>= 0) */
    double decay;           /* weight decay, weights only */
    int batch;
    double norm_constraint; /* bound on u' C u, 0 disables */
    double max_decrease;    /* bound on the predicted decrease, 0 disables */
    const kfac_curvature *exact; /* NULL: the blocks' own products */
    double damping;         /* with exact: C = GN + (damping + decay) I */
    float *z0, *z1, *z2;    /* with exact: n_out floats each */
} kfac_auto_args;

typedef struct {
    double alpha, momentum; /* u = alpha Delta + momentum u_prev, scale and clip in */
    double predicted;       /* the model's change of the loss for u (< 0: a decrease) */
    double decay_change;    /* wd/2 (|W - u|^2 - |W|^2) over the weights */
    kfac_step_report step;  /* nu: the clip; gdotdelta: g'Delta; applied/skipped */
} kfac_auto_report;

/* kfac_step with the learning rate and momentum of the quadratic model
 * (kfac_config.step_size = auto); the velocity buffers hold the last step u. */
kfac_status kfac_step_auto(kfac_layer_ref *layers, int n, const kfac_auto_args *a,
                           kfac_auto_report *r);

/* ---- statistics (kfac_stats.c) */

/* Darknet's im2col_cpu layout with dilation: col is k x T for one group's
 * input planes im. */
void kfac_extract_patches(const kfac_block *b, const float *im, float *col);

/* ---- the Kronecker kind's operations, by file */

void kron_acc_a(kfac_block *b, int group, const float *x, int nvec, int rows);
void kron_acc_g(kfac_block *b, int group, const float *d, int nvec, int rows);
void kron_clear(kfac_block *b);
int kron_raw_stats(kfac_block *b, kfac_raw_stats *out, int max);
kfac_status kron_fold(kfac_block *b, double inv_mt, double decay, int first);

/* sem. 4 split of lam between the factors of group j (pi falls back to 1 for
 * a non-positive trace); any output may be NULL */
void kron_damping_split(const kfac_block *b, int j, double lam, double *lamA, double *lamG,
                        double *pi_out);
kfac_status kron_prepare(kfac_block *b, int inverse, double exp);
kfac_status kron_invert(kfac_block *b);

kfac_status kron_apply(kfac_block *b, double exp, const float *v_w, const float *v_b,
                       float *out_w, float *out_b);
kfac_status kron_dense(const kfac_block *b, double *out);

#endif /* KFAC_INTERNAL_H */
