/*
 * darknet-kfac public API.
 *
 * K-FAC (Martens & Grosse 2015) for connected layers and the KFC block for
 * convolutional layers (Grosse & Martens 2016, eq. 23; TensorFlow's
 * ConvKFCBasicFB), written for Darknet's memory layouts but with no Darknet
 * dependency: everything here builds and is tested against cblas/LAPACKE alone.
 * The maths and conventions are those of shared/reference/kfac-semantics.md;
 * section numbers below ("sem. 4") point there.
 *
 * Conventions used by every function:
 *  - Float in, float out at the API (Darknet's type); factors, inverses and
 *    eigendecompositions are kept in double.
 *  - Layouts are Darknet's: inputs NCHW, weights row-major n x k per group with
 *    columns ordered (channel, kh, kw), groups contiguous; biases a separate
 *    array of n floats.
 *  - "Parameter vector" of a block: for group j = 0..groups-1, for filter
 *    r = 0..n_g-1: the k weights of row r, then (if the block has a bias) b[r].
 *    That is the row-major flattening of Wb = [W | b] per group (sem. 1).
 *    full_fisher_block() and kfac_block_pack()/unpack() use this order.
 *  - Functions return a kfac_status; on anything but KFAC_OK the outputs are
 *    unspecified unless stated and the block's state is unchanged.
 *  - NULL: a NULL block/config pointer gives KFAC_ERR_NULL. A NULL bias
 *    pointer is allowed exactly when the block has no bias.
 *  - Allocation happens in kfac_*_create(), kfac_block_register_*(),
 *    kfac_conv_block_resize(), kfac_opt_create()/kfac_opt_add_layer() and
 *    the checkpoint functions; no function called per training step
 *    allocates.
 *  - Nothing in the library prints or exits; messages are returned.
 *
 * Two levels: the block API (one layer's Fisher block: statistics,
 * factors, damping, inverses, products; what tests and library users call)
 * and the optimizer context kfac_opt at the end of this header (a whole
 * network's K-FAC: it owns the blocks and everything kept between steps, and
 * runs the step). Darknet's glue uses the context.
 */
#ifndef KFAC_H
#define KFAC_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ status */

typedef enum {
    KFAC_OK = 0,
    KFAC_ERR_NULL,          /* a required pointer was NULL */
    KFAC_ERR_INVALID_ARG,   /* a value out of range or an inconsistent shape */
    KFAC_ERR_NOMEM,         /* allocation failed (create/register/resize, checkpoint load) */
    KFAC_ERR_STATE,         /* call made in the wrong state (e.g. no inverse yet) */
    KFAC_ERR_NOT_FINITE,    /* NaN/Inf in statistics, factors, inverse or update */
    KFAC_ERR_LAPACK,        /* a decomposition failed even after retries */
    KFAC_ERR_PARSE,         /* a config value could not be parsed */
    KFAC_ERR_UNKNOWN_KEY,   /* a config key that does not exist */
    KFAC_ERR_IO,            /* read/write failure (checkpoint helpers) */
    KFAC_ERR_FORMAT         /* corrupt, truncated or mismatched serialized state */
} kfac_status;

/* Static English description of a status; never NULL. */
const char *kfac_status_str(kfac_status s);

/* ------------------------------------------------------------------ config */

typedef enum {
    KFAC_DAMPING_FACTORED = 0, /* factored Tikhonov with trace-norm pi (sem. 4) */
    KFAC_DAMPING_EXACT         /* eigenbasis damping of the Kronecker product */
} kfac_damping_type;

typedef enum {
    KFAC_ESTIMATION_SAMPLED = 0, /* true Fisher: targets sampled from the model */
    KFAC_ESTIMATION_EMPIRICAL    /* data labels: the normal backward pass */
} kfac_estimation_mode;

typedef enum {
    KFAC_CLIP_LR_CURRENT = 0, /* nu from the step's learning rate (sem. 5) */
    KFAC_CLIP_LR_BASE         /* nu from the base learning rate */
} kfac_clip_lr;

typedef enum {
    KFAC_PRECISION_FLOAT = 0, /* factored inverses applied from float copies (sgemm) */
    KFAC_PRECISION_DOUBLE     /* applied in double (dgemm), as computed */
} kfac_precision;

typedef enum {
    KFAC_STEP_AUTO = 0,   /* learning rate and momentum from the quadratic model */
    KFAC_STEP_POLICY      /* the [net] learning rate, a fixed momentum, the norm constraint */
} kfac_step_size;

typedef enum {
    KFAC_CURVATURE_EXACT = 0, /* the quadratic model uses the network's own Gauss-Newton
                                 products where the caller provides them (kfac_curvature) */
    KFAC_CURVATURE_KFAC       /* the Kronecker blocks' approximation */
} kfac_curvature_kind;

#define KFAC_MAX_SKIP 64

/* The [kfac] cfg section. Plain data; fill with kfac_config_default(). */
typedef struct {
    double damping;            /* lambda > 0, default 0.001 */
    double cov_ema_decay;      /* 0 <= e < 1, default 0.95 */
    int    cov_update_every;   /* >= 1, default 10 */
    int    invert_every;       /* >= 1, default 20 */
    double norm_constraint;    /* C >= 0, 0 disables (default). policy: nu bounds
                                  eta^2 <g, Delta> by C (sem. 5); auto: u' C u */
    double momentum;           /* 0 <= mu < 1; < 0 means "use [net] momentum" (default -1) */
    kfac_estimation_mode estimation_mode;  /* default sampled */
    kfac_damping_type    damping_type;     /* default factored */
    int    skip[KFAC_MAX_SKIP]; /* layer indices left on SGD */
    int    nskip;
    int    max_factor_dim;     /* >= 0; a layer with a larger A or G factor stays on
                                  SGD (the caller's policy), 0 = no limit, default 8192 */
    int    max_failures;       /* consecutive failed steps before stopping, >= 1, default 10 */
    kfac_precision precond_precision; /* how multiply_inverse applies factored
                                  inverses (computed in double); float halves the
                                  products' time at a relative error ~cond * 1e-7.
                                  Default float */
    kfac_clip_lr norm_constraint_lr; /* policy: the rate nu is computed with.
                                  current (default, sem. 5): a clipped step is
                                  sqrt(C / <g, Delta>) whatever the schedule; base:
                                  nu uses the base rate eta_0 (C * (eta/eta_0)^2 to
                                  kfac_step), so a decaying rate scales clipped steps */
    int    cov_subsample;      /* >= 1, default 1: statistics from the first
                                  ceil(batch / cov_subsample) examples (the caller's
                                  policy; the library averages what it is given) */
    kfac_step_size step_size;  /* auto (default): each step's learning rate and
                                  momentum minimise the quadratic model over
                                  (Delta, previous step), scaled by the
                                  caller's schedule (eta/eta_0); policy: the
                                  caller's rate, `momentum`, and nu (sem. 5) */
    int    damping_adapt_every; /* >= 0, default 5: every that many steps the
                                  Levenberg-Marquardt rule adapts the damping
                                  from rho = actual / predicted loss change
                                  (kfac_opt_adapt_damping); 0 keeps it fixed */
    double damping_omega;      /* in (0, 1), default 0.77378 = (19/20)^5: the
                                  factor the damping is multiplied by when
                                  rho > 3/4 and divided by when rho < 1/4 */
    double min_damping, max_damping; /* bounds of the adapted damping (the first
                                  adaptation brings an initial `damping` outside
                                  them in), 0 < min <= max; defaults 1e-8, 1e4 */
    kfac_curvature_kind curvature; /* the quadratic model's curvature; default
                                  exact (kfac where the caller has no exact one) */
} kfac_config;

void kfac_config_default(kfac_config *cfg);

/* Sets one key from its cfg text ("damping", "0.01"). Parsing is strict (the
 * whole value must parse, no trailing junk) and range-checked. On failure
 * returns KFAC_ERR_UNKNOWN_KEY / KFAC_ERR_PARSE / KFAC_ERR_INVALID_ARG and, if
 * err != NULL, writes a one-line message naming the key and the accepted
 * values into err (always NUL-terminated, truncated to errlen). cfg is left
 * unchanged on failure. key/value must be non-NULL (else KFAC_ERR_NULL). */
kfac_status kfac_config_set(kfac_config *cfg, const char *key, const char *value,
                            char *err, size_t errlen);

/* Whole-config validation, liblinear style: NULL if valid, else a static
 * message naming the offending field. */
const char *kfac_config_check(const kfac_config *cfg);

/* ------------------------------------------------------------------ blocks */

typedef enum {
    KFAC_PATCHES_GENERAL = 0, /* "extract_convolution_patches": any size, stride,
                                 pad, dilation; the block's own im2col */
    KFAC_PATCHES_IMAGE,       /* "extract_image_patches": Darknet's im2col_cpu
                                 layout, dilation must be 1 */
    KFAC_PATCHES_POINTWISE    /* "extract_pointwise_conv2d_patches": size 1,
                                 stride 1, pad 0, dilation 1; reads the input
                                 in place, no copy */
} kfac_patches;

/* Geometry of a convolutional layer. pad is in pixels on every side
 * (Darknet's l.pad, i.e. already size/2 when the cfg says pad=1). */
typedef struct {
    int c, h, w;      /* input channels, height, width (>= 1) */
    int n;            /* filters (>= 1) */
    int size;         /* square kernel side (>= 1) */
    int stride;       /* >= 1 */
    int pad;          /* >= 0 */
    int dilation;     /* >= 1; 1 in pjreddie Darknet */
    int groups;       /* >= 1, divides c and n */
    int bias;         /* 1: block includes the bias (no batch norm); 0: none */
    kfac_patches patches;
} kfac_conv_geom;

typedef struct kfac_block kfac_block;

/* Creates a conv block, allocating factors, accumulators and workspace.
 * out_h = (h + 2*pad - dilation*(size-1) - 1)/stride + 1, likewise out_w;
 * T = out_h*out_w. KFAC_ERR_INVALID_ARG if the geometry is inconsistent
 * (groups not dividing c or n, out_h < 1, pointwise with size != 1, ...).
 * damping/type are taken from cfg (may be NULL: defaults). *out is NULL on
 * failure. Free with kfac_block_free(). */
kfac_status kfac_conv_block_create(const kfac_conv_geom *g, const kfac_config *cfg,
                                   kfac_block **out);

/* Connected layer: W is outputs x inputs row-major (Darknet's l.weights), T = 1. */
kfac_status kfac_fc_block_create(int inputs, int outputs, int bias,
                                 const kfac_config *cfg, kfac_block **out);

void kfac_block_free(kfac_block *b); /* NULL is a no-op */

/* Changes a conv block's input height and width, as Darknet's resize_network
 * does during multi-scale detector training (random=1). A and G do not depend
 * on h and w, so the factors, the last inverse and the damping are kept; out_h,
 * out_w, T and the patch workspace follow the new size (the next statistics
 * are normalised by the new T). Statistics must not be pending (mA = mG = 0,
 * i.e. at a step boundary): KFAC_ERR_STATE otherwise. KFAC_ERR_INVALID_ARG
 * for a connected block or a geometry conv_block_create would refuse;
 * KFAC_ERR_NOMEM if a larger workspace cannot be had. On any error the block
 * is unchanged. Allocates (only when the size changes). Until the next
 * update_inverses, factored damping keeps the lam_A/lam_G split computed with
 * the old T, so the effective damping is scaled by T_new/T_old; exact damping
 * uses the current T and lambda and is unaffected. */
kfac_status kfac_conv_block_resize(kfac_block *b, int h, int w);

/* Shapes and bookkeeping. */
typedef struct {
    int is_conv;
    int groups;
    int n_g;        /* rows of one group's Wb (filters per group / outputs) */
    int k;          /* weight columns per group (c/groups*size*size, or inputs) */
    int kb;         /* k + bias */
    int T;          /* output locations per example (1 for connected) */
    int out_h, out_w;
    size_t nparams; /* groups*n_g*kb */
    size_t bytes;   /* memory held by the block */
} kfac_block_info;
kfac_status kfac_block_info_get(const kfac_block *b, kfac_block_info *info);

/* What the caller must capture per tower and example (TF's
 * tensors_to_compute_grads): the layer input (NCHW c*h*w floats, or the
 * connected layer's `inputs` floats) and the gradient with respect to the
 * pre-activation output (before batch norm), n*out_h*out_w floats. */
typedef struct {
    size_t input_floats;       /* per example */
    size_t output_grad_floats; /* per example */
    int    needs_patches;      /* 1 if the input is expanded by im2col */
} kfac_capture_spec;
kfac_status kfac_block_tensors_to_compute_grads(const kfac_block *b, kfac_capture_spec *spec);

/* Towers (sem. 2: all towers concatenated). A block starts with one tower.
 * Statistics sent to tower t go into the same sums as the others; the tower
 * index is checked (KFAC_ERR_INVALID_ARG if t >= num_towers). */
kfac_status kfac_block_register_additional_tower(kfac_block *b);
int kfac_block_num_registered_towers(const kfac_block *b);

/* ---- statistics (accumulate within one optimizer step, then update_cov) */

/* Accumulates A from `batch` examples of raw input x (NCHW, batch*c*h*w
 * floats; for connected: batch*inputs). Uses the block's patch path.
 * batch >= 1 (else KFAC_ERR_INVALID_ARG), likewise for the output grads. */
kfac_status kfac_block_accumulate_inputs(kfac_block *b, int tower, const float *x, int batch);

/* Accumulates A from one example's already-expanded patches of one group:
 * cols is k x T row-major (the im2col_cpu buffer Darknet has filled, or the
 * raw input for 1x1). Zero-copy path for Darknet's glue. Counts one example
 * for group 0 only (so calling it for every group of an example counts the
 * example once). */
kfac_status kfac_block_accumulate_patches(kfac_block *b, int tower, int group,
                                          const float *cols);

/* Accumulates G from `batch` examples of output gradients d (batch*n*T floats,
 * NCHW; for connected batch*outputs). Sign and scale: the gradient of each
 * example's own loss; Darknet's l.delta (minus that) is fine (sem. 2). */
kfac_status kfac_block_accumulate_output_grads(kfac_block *b, int tower, const float *d, int batch);

/* One example, one group: d is n_g x T row-major (a slice of l.delta). Counts
 * the example for group 0 only, as accumulate_patches. */
kfac_status kfac_block_accumulate_output_grads_group(kfac_block *b, int tower, int group,
                                                     const float *d);

/* Folds the accumulated sums into the factors: A_new = sumA/(M*T) (likewise
 * G), C <- decay*C + (1-decay)*C_new, first estimate taken as is; then clears
 * the sums. Requires the same M for A and G (KFAC_ERR_STATE otherwise, or if
 * M == 0). KFAC_ERR_NOT_FINITE (factors unchanged, sums cleared) if the new
 * statistics are not finite. decay must be in [0, 1) (else INVALID_ARG). */
kfac_status kfac_block_update_cov(kfac_block *b, double decay);

/* Discards accumulated sums without touching the factors. */
void kfac_block_clear_stats(kfac_block *b);

/* Direct access for tests and checkpoints: copies the current factors of one
 * group into caller arrays (A: kb*kb, G: n_g*n_g, row-major, double). Either
 * output may be NULL. KFAC_ERR_STATE before the first update_cov. */
kfac_status kfac_block_get_factors(const kfac_block *b, int group, double *A, double *G);
/* Sets the factors of one group (symmetric, finite; else INVALID_ARG /
 * NOT_FINITE). Both A and G are required (KFAC_ERR_NULL). Marks the block as
 * having factors (other groups keep theirs; zero if never set). */
kfac_status kfac_block_set_factors(kfac_block *b, int group, const double *A, const double *G);

/* ---- damping, inverses, products */

/* TF's instantiate_factors(grads_list, damping): sets lambda (> 0 for
 * factored; >= 0 for exact) for later inverse updates/products. */
kfac_status kfac_block_instantiate_factors(kfac_block *b, double damping);
/* Damping kind is fixed at creation (cfg->damping_type). */

/* Requests the damped inverse (sem. 4) at each update_inverses. Factored:
 * Cholesky of (A + lam_A I), (G + lam_G I) in double; exact: eigen. */
kfac_status kfac_block_register_inverse(kfac_block *b);
/* Requests (F+damping)^exp for multiply_matpower; needs eigendecompositions
 * (allocated here). Up to 8 distinct exponents (a 9th: KFAC_ERR_INVALID_ARG;
 * registering one again is a no-op; exp == 1 needs nothing and is accepted). */
kfac_status kfac_block_register_matpower(kfac_block *b, double exp);

/* Recomputes everything registered from the current factors and damping.
 * Factors are checked for finiteness first. A failed Cholesky is retried with
 * the damping multiplied by 10 (up to 3 times), then through the eigen path.
 * On failure returns KFAC_ERR_NOT_FINITE/KFAC_ERR_LAPACK and keeps the last
 * good inverse. KFAC_ERR_STATE if there are no factors yet. With nothing
 * registered it does nothing and returns KFAC_OK. The eigen fallback inverts
 * Q diag(max(d,0) + lam_X) Q^T with the original (not multiplied) damping. */
kfac_status kfac_block_update_inverses(kfac_block *b);
/* 1 once update_inverses has succeeded at least once with register_inverse
 * in effect, i.e. exactly when multiply_inverse can work. */
int kfac_block_has_inverse(const kfac_block *b);
/* Number of Cholesky retries / eigen fallbacks since creation: each x10 retry
 * counts 1 and an eigen fallback counts 1 (so a factor that needs the
 * fallback adds 4). */
int kfac_block_num_retries(const kfac_block *b);

/* out = (damped block) * v, with current factors (sem. 4, e = +1). v and out
 * are (w, bias) pairs in Darknet layout: w has groups*n_g*k floats, bias n
 * floats (NULL when the block has no bias). out may alias v. */
kfac_status kfac_block_multiply(kfac_block *b, const float *v_w, const float *v_b,
                                float *out_w, float *out_b);
/* out = (damped block)^-1 v, with the factors of the last update_inverses.
 * Needs register_inverse + a successful update_inverses (else STATE).
 * KFAC_ERR_NOT_FINITE if the result is not finite or does not fit a float
 * (out unspecified). Factored damping uses lam_A/lam_G as of that update;
 * exact damping uses that update's eigendecomposition with the *current*
 * lambda (instantiate_factors), so lambda can change without refactoring.
 * With factored damping and precond_precision float (the default), the two
 * products use float copies of the double inverses (update_inverses fails
 * with NOT_FINITE, keeping the previous inverse, if one does not fit a
 * float); exact damping is always applied in double. */
kfac_status kfac_block_multiply_inverse(kfac_block *b, const float *v_w, const float *v_b,
                                        float *out_w, float *out_b);
/* out = (damped block)^exp v. exp == 1: multiply; exp == -1 with
 * register_inverse: multiply_inverse; otherwise exp must have been
 * registered, and the eigendecomposition of the last update_inverses is used
 * (KFAC_ERR_STATE if exp is not registered or no update_inverses has
 * succeeded since). Damping as for multiply_inverse (factored: lam_A/lam_G
 * of that update; exact: current lambda). */
kfac_status kfac_block_multiply_matpower(kfac_block *b, double exp, const float *v_w,
                                         const float *v_b, float *out_w, float *out_b);

/* The dense undamped block F = T*kron(G, A) per group, block-diagonal over
 * groups, in parameter-vector order: out is nparams x nparams row-major
 * doubles. For tests only (it can be huge). */
kfac_status kfac_block_full_fisher_block(const kfac_block *b, double *out);

/* (w, bias) <-> parameter vector (nparams doubles). */
kfac_status kfac_block_pack(const kfac_block *b, const float *w, const float *bias, double *flat);
kfac_status kfac_block_unpack(const kfac_block *b, const double *flat, float *w, float *bias);

/* The factored-damping split of sem. 4 for one group from the current
 * factors: lam_A, lam_G and pi (any output may be NULL). */
kfac_status kfac_block_factored_damping(const kfac_block *b, int group,
                                        double *lam_A, double *lam_G, double *pi);

/* ------------------------------------------------------------ optimizer */

/* One K-FAC layer's parameters as the optimizer sees them (Darknet's layer
 * fields). grad_w/grad_b hold minus the batch-summed gradient (Darknet's
 * weight_updates / bias_updates). vel_w/vel_b are the momentum buffers
 * (owned by the caller, nparams-shaped like w/b, zero at start). Biases are
 * NULL when the block has none. */
typedef struct {
    kfac_block *block;
    float *w, *b;
    float *grad_w, *grad_b;
    float *vel_w, *vel_b;
    float *scratch_w, *scratch_b; /* caller-owned, same sizes as w/b: holds
                                     g, then (applied layers) Delta */
    float *scratch2_w, *scratch2_b; /* caller-owned workspace, same sizes */
} kfac_layer_ref;

typedef struct {
    double learning_rate; /* eta, after Darknet's policy */
    double momentum;      /* mu */
    double decay;         /* wd, weights only */
    int    batch;         /* net.batch*net.subdivisions */
    double norm_constraint; /* C; 0 disables clipping */
} kfac_step_args;

typedef struct {
    double nu;          /* clip coefficient used (1 when not clipped) */
    double gdotdelta;   /* sum over applied layers of <g, Delta> */
    int    applied;     /* layers whose weights moved */
    int    skipped;     /* layers skipped for a non-finite g/Delta or no inverse */
    int    first_skipped; /* index into the layers array of the first skipped, -1 */
} kfac_step_report;

/* Sem. 5 over `n` layers: g = -grad/batch + wd*W (no decay on bias),
 * Delta = multiply_inverse(g), nu from the norm constraint over all applied
 * layers, v = mu*v + nu*Delta, W -= eta*v, grad <- 0. A layer whose g or
 * Delta is not finite (or has no inverse) is skipped: its weights, biases and
 * velocity are untouched, its grad is zeroed, and it is counted in report.
 * Returns KFAC_OK even when layers were skipped (see report); KFAC_ERR_* for
 * bad arguments, in which case nothing is changed. */
kfac_status kfac_step(kfac_layer_ref *layers, int n, const kfac_step_args *args,
                      kfac_step_report *report);

/* ------------------------------------------------------------ checkpoints */

/* The sidecar written next to each Darknet weights backup: a container of
 * named typed arrays (factors, inverses, momentum buffers, counters, the
 * [kfac] settings -- which arrays is the caller's choice) plus a fingerprint
 * string, a format version and a CRC-32. Encoding is little-endian and
 * fixed-width whatever the host; values are copied bit for bit (-0.0 stays
 * -0.0). The file is written to "<path>.tmp" and renamed over <path>, so a
 * crash leaves either the old sidecar or the new one, never half of one. */

#define KFAC_CKPT_VERSION          1u
#define KFAC_CKPT_MAX_NAME         255  /* bytes in an entry name, excl. NUL */
#define KFAC_CKPT_MAX_FINGERPRINT  4096 /* bytes in the fingerprint, excl. NUL */

typedef enum {
    KFAC_CKPT_F32 = 0, /* data is float[count] */
    KFAC_CKPT_F64 = 1, /* data is double[count] */
    KFAC_CKPT_I64 = 2  /* data is int64_t[count] */
} kfac_ckpt_type;

/* One named array. The caller owns name and data; the library never keeps
 * either past the call. name: non-empty NUL-terminated string of at most
 * KFAC_CKPT_MAX_NAME bytes, unique within one call. data may be NULL only
 * when count == 0. */
typedef struct {
    const char *name;
    kfac_ckpt_type type;
    size_t count;   /* elements, not bytes */
    void *data;     /* read by save, written by load */
} kfac_ckpt_entry;

/* Rules shared by the three functions below:
 *  - fingerprint: the caller's description or hash of what the state belongs
 *    to (cfg + layer shapes); non-NULL, at most KFAC_CKPT_MAX_FINGERPRINT
 *    bytes, may be empty. Compared byte for byte on load.
 *  - e/n: n >= 0 entries (e may be NULL when n == 0). NULL path, fingerprint,
 *    e (n > 0), name or data (count > 0): KFAC_ERR_NULL. n < 0, an empty,
 *    over-long or repeated name, an unknown type or a byte size that
 *    overflows: KFAC_ERR_INVALID_ARG. Nothing is read or written then.
 *  - err: if non-NULL and errlen > 0, receives a one-line message on failure
 *    (always NUL-terminated, truncated to errlen) and "" on success.
 *  - Only the tiny bookkeeping of load (n size_t) and the file image of
 *    kfac_ckpt_load are allocated, and freed before returning. */

/* Writes e[0..n-1] and fingerprint to "<path>.tmp" (a stale one is
 * overwritten), fsyncs it, renames it over <path> and fsyncs the directory
 * (best effort). On any failure returns KFAC_ERR_IO with a message naming the
 * file and the system error, removes the tmp file if it created it, and
 * leaves an existing <path> untouched. Entry order is kept but not
 * significant to load. */
kfac_status kfac_ckpt_save(const char *path, const char *fingerprint,
                           const kfac_ckpt_entry *e, int n, char *err, size_t errlen);

/* Reads <path> whole and validates all of it before writing any e[i].data
 * (all-or-nothing: on any failure no caller buffer has been touched), then
 * fills every e[i].data. Entries are matched by name, in any order.
 *  KFAC_ERR_IO      <path> cannot be opened or read, or is not a regular
 *                   file (message names the file and the system error; the
 *                   caller may treat ENOENT as "no sidecar, start fresh").
 *  KFAC_ERR_FORMAT  bad magic, unsupported version, truncated file or
 *                   trailing bytes, checksum mismatch, malformed contents,
 *                   a different fingerprint ("sidecar was written for a
 *                   different cfg or layer shapes"), or an entry missing,
 *                   unexpected, repeated, or of another type or count
 *                   (the message names the entry).
 *  KFAC_ERR_NOMEM   the file image (its size) could not be allocated.
 * Lengths in the file are never trusted: every one is bounds- and
 * overflow-checked against the bytes actually present. */
kfac_status kfac_ckpt_load(const char *path, const char *fingerprint,
                           const kfac_ckpt_entry *e, int n, char *err, size_t errlen);

/* kfac_ckpt_load on an in-memory image of a sidecar file (buf: len bytes,
 * non-NULL even when len == 0, only read). Same checks, results and
 * all-or-nothing rule, minus KFAC_ERR_IO. */
kfac_status kfac_ckpt_load_buffer(const void *buf, size_t len, const char *fingerprint,
                                  const kfac_ckpt_entry *e, int n, char *err, size_t errlen);

/* The fingerprint stored in <path>, as printable text (bytes outside
 * printable ASCII as '?', cut to outlen-1 with "..."), read from the header
 * alone and not checked against the checksum: for explaining a refusal, not
 * for trusting. KFAC_ERR_IO if the file cannot be opened, KFAC_ERR_FORMAT
 * if it has no readable header of this format version. */
kfac_status kfac_ckpt_fingerprint(const char *path, char *out, size_t outlen, char *err,
                                  size_t errlen);

/* ------------------------------------------------------------ state */

/* A block's resumable state as named arrays pointing into its own storage
 * (factors, live damping split and inverse, flags), for kfac_ckpt_save/load.
 * Names are relative ("A", "G_inverse_f32"): callers with several blocks
 * prefix them. The list depends only on shapes, damping type, precision and
 * registrations. Returns the count; fills e[0..min(count, max)-1] (e NULL,
 * max 0: count only). Pointers are valid until the block next changes. */
int kfac_block_state(kfac_block *b, kfac_ckpt_entry *e, int max);
/* After kfac_ckpt_load filled the arrays of kfac_block_state: checks the
 * flags (KFAC_ERR_FORMAT if inconsistent) and makes them current; pending
 * statistics are cleared. */
kfac_status kfac_block_state_loaded(kfac_block *b);

/* ------------------------------------------------------------ optimizer context */

/* The whole K-FAC optimizer for a set of layers, in the style of ggml-opt:
 * one opaque context created from a checked kfac_config, owning the blocks,
 * momentum buffers, scratch, the current damping, the step counters and the
 * failure counts, and running the whole step (statistics into factors,
 * inverses on their schedule, preconditioning, norm constraint, momentum,
 * weights). The caller owns the layers' weights and gradient buffers and
 * hands them over once per layer; it captures statistics into
 * kfac_opt_block() between steps. Nothing here prints. */
typedef struct kfac_opt kfac_opt;

/* Called on every statistics step for every block, after the last
 * accumulate and before the sums become factors: the one place where
 * data-parallel training sums the raw statistics of all processes. sums[i]
 * holds count[i] square dim[i] x dim[i] matrices (upper triangles
 * meaningful), *examples the examples they were summed over (equal for every
 * array; the hook may change it, e.g. to the global count). */
typedef kfac_status (*kfac_stats_hook)(void *ctx, int layer_id, float *const *sums,
                                       const int *dim, const int *count, int nsums,
                                       long *examples);

/* Creates a context for at most max_layers layers. cfg is checked once
 * (kfac_config_check) together with the effective momentum (cfg->momentum,
 * or net_momentum when cfg->momentum < 0; must be in [0, 1)); on failure
 * returns KFAC_ERR_INVALID_ARG with a one-line message in err. cfg is
 * copied. Free with kfac_opt_free (NULL is a no-op). */
kfac_status kfac_opt_create(const kfac_config *cfg, double net_momentum, int max_layers,
                            kfac_opt **out, char *err, size_t errlen);
void kfac_opt_free(kfac_opt *o);

/* Exact curvature for step_size=auto, curvature=exact: the quadratic model
 * uses the network's Gauss-Newton matrix (softmax cross-entropy: the Fisher),
 * one forward pass per direction (J v by a finite difference). The caller
 * provides:
 *  - outputs(ctx, run, out): the network's outputs on the step's
 *    mini-batch (the loss's inputs, n_out floats: logits) into out; run == 0:
 *    those of the forward pass already done at the current weights (no
 *    work); run == 1: a new forward pass at the weights as they are now,
 *    which must leave every buffer the next step reads as it was;
 *  - metric(ctx, a, b): the mean over examples of a_i' H_i b_i, H_i the
 *    Hessian of example i's loss in its outputs, at the pass already done.
 * The context perturbs and restores (bit for bit) the layers' weights around
 * each run == 1 call. */
typedef struct {
    kfac_status (*outputs)(void *ctx, int run, float *out);
    double (*metric)(void *ctx, const float *a, const float *b);
    void *ctx;
    size_t n_out;
} kfac_curvature;
/* Copies c (NULL: back to the blocks' products) and allocates 3 n_out
 * floats; KFAC_ERR_INVALID_ARG without both functions or n_out. */
kfac_status kfac_opt_set_curvature(kfac_opt *o, const kfac_curvature *c);

/* Optional statistics hook (NULL: none). */
void kfac_opt_set_stats_hook(kfac_opt *o, kfac_stats_hook fn, void *ctx);

/* One layer: a conv block (geom != NULL) or a connected block (inputs,
 * outputs, bias). w/grad_w: the layer's weights and minus the batch-summed
 * gradient, Darknet layout (kfac.h top); b/grad_b the same for the bias
 * when the block has one (else NULL). aux[0..naux-1] (naux <= 2, aux_n
 * floats each) are further gradient accumulators of the layer that the
 * context does not update but checks for finiteness and clears on a skipped
 * step (batch-norm shifts and scales). id is the caller's name for the layer
 * (its index in the network), used in state names and reports. The block is
 * created with the context's damping type, precision and current damping,
 * and its inverse registered. Returns the slot (0, 1, ...) in *slot. */
typedef struct {
    int id;
    const kfac_conv_geom *geom;   /* NULL for a connected layer */
    int inputs, outputs, bias;    /* connected only */
    float *w, *b, *grad_w, *grad_b;
    float *aux[2];
    int naux;
    size_t aux_n;
} kfac_opt_layer;
kfac_status kfac_opt_add_layer(kfac_opt *o, const kfac_opt_layer *L, int *slot);

int kfac_opt_num_layers(const kfac_opt *o);
/* the context's copy of the config it was created with */
const kfac_config *kfac_opt_config(const kfac_opt *o);
kfac_block *kfac_opt_block(const kfac_opt *o, int slot);   /* NULL if out of range */
int kfac_opt_layer_id(const kfac_opt *o, int slot);        /* -1 if out of range */
/* momentum buffers of a slot (vel_b NULL without bias); KFAC_ERR_INVALID_ARG
 * out of range */
kfac_status kfac_opt_velocity(const kfac_opt *o, int slot, float **vel_w, float **vel_b);
/* bytes allocated for a slot (block and buffers), and failed steps it caused */
size_t kfac_opt_layer_bytes(const kfac_opt *o, int slot);
int kfac_opt_layer_failures(const kfac_opt *o, int slot);

typedef struct {
    double damping;          /* current lambda */
    double momentum;         /* effective mu */
    long   steps_run;        /* kfac_opt_step calls that ran (counted when skipped too) */
    int    consecutive_failures;
    long   total_failures;
    int    ready;            /* every block has an inverse */
    int    nlayers;
    size_t bytes;            /* all slots */
    unsigned long long seed; /* the caller's key for sampled targets (state) */
    double rho;              /* the last adaptation's rho, NaN before the first */
} kfac_opt_info;
kfac_status kfac_opt_info_get(const kfac_opt *o, kfac_opt_info *info);
/* The seed is state the caller keys its sampled targets with: saved and
 * restored with the rest. */
void kfac_opt_set_seed(kfac_opt *o, unsigned long long seed);

/* 1 when step `step` (the caller's 0-based update index) gathers statistics:
 * every cov_update_every-th step, and every step until all blocks have an
 * inverse (first steps, a resume without state). */
int kfac_opt_is_stats_step(const kfac_opt *o, long step);

typedef struct {
    long   step;                /* 0-based index of this update (schedules) */
    double learning_rate;       /* eta after the caller's policy */
    double base_learning_rate;  /* the policy's base rate (norm_constraint_lr=base) */
    double decay;               /* weight decay, weights only */
    int    batch;               /* examples the gradients are summed over */
    double loss;                /* mean loss of the step's (last) mini-batch at the
                                   current weights; step_size=auto keeps the model's
                                   predicted decrease at most this (a nonnegative
                                   loss cannot decrease by more). NaN or <= 0: no
                                   such bound */
} kfac_opt_step_args;

typedef struct {
    int stats_step;          /* statistics were folded into the factors */
    int cov_failed;          /* layers whose statistics were rejected */
    int inv_failed;          /* layers whose inverse update failed */
    int bad_grad_slot;       /* first slot with a non-finite gradient, -1 */
    int skipped_step;        /* nothing moved: cov_failed, inv_failed or bad grad */
    kfac_step_report step;   /* the preconditioned step (zero when skipped) */
    int failed;              /* this step counts as failed */
    int stop;                /* consecutive failures reached max_failures */
    int first_bad_id;        /* layer id of the first trouble, -1 */
    /* per slot, this step: status of the statistics fold and of the inverse
     * update (KFAC_OK when not attempted); owned by the context */
    const kfac_status *cov_status, *inv_status;
    double t_fold, t_inv, t_precond; /* seconds in each phase */
    /* the step actually taken, u = alpha Delta + momentum u_prev: with
     * step_size=auto the quadratic model's choice (schedule scale and clip
     * included), with policy eta*nu and mu */
    double alpha, momentum;
    double predicted;        /* auto: the model's loss change for u (< 0), else 0 */
    int adapt_due;           /* call kfac_opt_adapt_damping with the loss before and
                                after this step (auto, damping_adapt_every > 0,
                                every that many applied steps) */
} kfac_opt_report;

/* One optimizer step over every slot, on gradients the caller has summed:
 * on a statistics step the accumulated statistics become factors (through
 * the hook); inverses are recomputed every invert_every steps (and while a
 * block has none) with the current damping; then, unless statistics or an
 * inverse were rejected or a gradient (w, b or aux) is not finite -- which
 * skips the whole step, clears every gradient and moves nothing, so no
 * layer moves on a step another one rejected -- the step: step_size=auto,
 * the quadratic model's (kfac_step_auto, exact curvature when set); policy,
 * kfac_step with C scaled by (eta/eta_0)^2 under norm_constraint_lr=base.
 * Returns NULL/INVALID_ARG for bad arguments (nothing changed), a curvature
 * callback's error as it is, else KFAC_OK even when the step failed. */
kfac_status kfac_opt_step(kfac_opt *o, const kfac_opt_step_args *args, kfac_opt_report *rep);

/* Levenberg-Marquardt damping after a step whose report said adapt_due:
 * loss_before / loss_after are the caller's mean loss on that step's
 * mini-batch at the weights before and after the step (nothing else moved
 * in between). rho = (loss_after - loss_before + weight-decay change) /
 * predicted; the damping is multiplied by damping_omega when rho > 3/4,
 * divided by it when rho < 1/4 or rho is not finite (a non-finite loss
 * included), and kept within [min_damping, max_damping]; the blocks use the
 * new value from the next product on (factored inverses from their next
 * update). *rho may be NULL. KFAC_ERR_STATE if no adaptation is due. */
kfac_status kfac_opt_adapt_damping(kfac_opt *o, double loss_before, double loss_after,
                                   double *rho);

/* The context's resumable state (every block's kfac_block_state, momentum,
 * counters, damping, seed) as checkpoint entries named "kfac.<id>.<name>"
 * and "opt.<name>" into names (the caller's buffer of n names), pointing
 * into the context's storage. Returns the number of entries (call with
 * e == NULL, n == 0 to count), or -1 if names/e are too small. After
 * kfac_ckpt_load into them, kfac_opt_state_loaded makes them current
 * (KFAC_ERR_FORMAT if inconsistent). */
#define KFAC_STATE_NAME 64
int kfac_opt_state(kfac_opt *o, kfac_ckpt_entry *e, char (*names)[KFAC_STATE_NAME], int n);
kfac_status kfac_opt_state_loaded(kfac_opt *o);

#ifdef __cplusplus
}
#endif
#endif /* KFAC_H */
