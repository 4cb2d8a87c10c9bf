/*
 * Checkpoint/resume and fault tests of the Darknet glue (kfac_darknet_ckpt.c,
 * the failed-step rules of the optimizer context, patches/0110-0112): a run
 * interrupted by save_weights and resumed from the weights file and its "<weights>.kfac"
 * sidecar in a freshly parsed network must end with the very bits of an
 * uninterrupted run; a missing sidecar starts K-FAC fresh with a warning; a
 * corrupt, truncated, stale or foreign sidecar is refused with a message and
 * exit status 1, never a crash; NaN planted in a captured gradient, a factor
 * or an update leaves every K-FAC weight of that step alone and training goes
 * on; and no weights file with a NaN or Inf in it is ever written. Tiny
 * network, one thread, training data generated from the step number.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "darknet.h"
#include "network.h"
#include "kfac.h"
#include "kfac_dntest.h"



/* Steps before the save and after it. invert_every=3 does not divide N, so
 * the first resumed step runs on an inverse computed two steps before the
 * save (restored from its factor snapshot); cov_update_every=2 makes step N
 * a non-statistics step. BN conv (scales/shifts on Darknet's SGD with
 * momentum) and a skipped 1x1 conv (plain SGD) make Darknet's own momentum
 * accumulators part of what must survive the resume; subdivisions=2 puts
 * two datums in each step of the sampled pass. */
#define N_BEFORE 5
#define M_AFTER 4

#define NET_HEAD                                                                      \
    "[net]\nbatch=4\nsubdivisions=2\nheight=6\nwidth=6\nchannels=2\n"                   \
    "learning_rate=0.05\nmomentum=0.9\ndecay=0.0005\nmax_batches=1000\n\n"             \
    "[convolutional]\nbatch_normalize=1\nfilters=3\nsize=3\nstride=1\npad=1\nactivation=leaky\n\n" \
    "[convolutional]\nfilters=3\nsize=1\nstride=1\npad=0\nactivation=leaky\n\n"        \
    "[maxpool]\nsize=2\nstride=2\n\n"                                                  \
    "[connected]\noutput=4\nactivation=linear\n\n"                                     \
    "[softmax]\n\n"

static const char *cfg_resume =
    NET_HEAD "[kfac]\nestimation_mode=sampled\ndamping=0.01\ncov_ema_decay=0.9\n"
    "cov_update_every=2\ninvert_every=3\nskip=1\nnorm_constraint=0.01\n";
/* The same network with another damping: a sidecar of cfg_resume is foreign. */
static const char *cfg_other_damping =
    NET_HEAD "[kfac]\nestimation_mode=sampled\ndamping=0.02\ncov_ema_decay=0.9\n"
    "cov_update_every=2\ninvert_every=3\nskip=1\nnorm_constraint=0.01\n";
/* Another shape (4 filters in the first conv). */
static const char *cfg_other_shape =
    "[net]\nbatch=4\nsubdivisions=2\nheight=6\nwidth=6\nchannels=2\n"
    "learning_rate=0.05\nmomentum=0.9\ndecay=0.0005\nmax_batches=1000\n\n"
    "[convolutional]\nbatch_normalize=1\nfilters=4\nsize=3\nstride=1\npad=1\nactivation=leaky\n\n"
    "[convolutional]\nfilters=3\nsize=1\nstride=1\npad=0\nactivation=leaky\n\n"
    "[maxpool]\nsize=2\nstride=2\n\n"
    "[connected]\noutput=4\nactivation=linear\n\n"
    "[softmax]\n\n"
    "[kfac]\nestimation_mode=sampled\ndamping=0.01\ncov_ema_decay=0.9\n"
    "cov_update_every=2\ninvert_every=3\nskip=1\nnorm_constraint=0.01\n";
/* Faults: an inverse at every step (a bad factor is used at once), new
 * statistics every other step taken as they are (cov_ema_decay=0, so the
 * next statistics step replaces a planted factor). */
static const char *cfg_fault =
    NET_HEAD "[kfac]\nestimation_mode=sampled\ndamping=0.01\ncov_ema_decay=0\n"
    "cov_update_every=2\ninvert_every=1\nskip=1\nmax_failures=5\n";
static const char *cfg_plain = NET_HEAD;

/* ------------------------------------------------------------ helpers */

static char tmpdir[64];

static int setup_dir(void **state)
{
    (void)state;
    openblas_set_num_threads(1);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test_darknet_resume_XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown_dir(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

/* A path in the test's directory; one buffer per name slot, so paths that
 * live across calls never share storage. */
static const char *tmp_path(const char *name)
{
    static char buf[16][128];
    static const char *names[16];
    int i = 0;
    while (i < 16 && names[i] && strcmp(names[i], name) != 0) ++i;
    assert_true(i < 16);
    names[i] = name;
    snprintf(buf[i], sizeof buf[0], "%s/%s", tmpdir, name);
    return buf[i];
}

static network *build(const char *cfg, unsigned seed)
{
    const char *path = tmp_path("net.cfg");
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs(cfg, fp);
    fclose(fp);
    srand(seed);
    network *net = parse_network_cfg((char *)path);
    unlink(path);
    return net;
}

static int exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    unsigned char *buf = malloc((size_t)n + 1);
    assert_int_equal(fread(buf, 1, (size_t)n, fp), (size_t)n);
    fclose(fp);
    *len = (size_t)n;
    return buf;
}

static void spit(const char *path, const unsigned char *buf, size_t len)
{
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(buf, 1, len, fp), len);
    fclose(fp);
}

/* stderr into a file for the span of a call, so its messages can be read. */
static int saved_stderr = -1;
static void capture_begin(void)
{
    fflush(stderr);
    saved_stderr = dup(2);
    int fd = open(tmp_path("stderr.txt"), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    dup2(fd, 2);
    close(fd);
}

static char *capture_end(void)
{
    static char text[8192];
    fflush(stderr);
    dup2(saved_stderr, 2);
    close(saved_stderr);
    size_t n;
    unsigned char *buf = slurp(tmp_path("stderr.txt"), &n);
    if (n >= sizeof text) n = sizeof text - 1;
    memcpy(text, buf, n);
    text[n] = 0;
    free(buf);
    return text;
}

static void expect_in(const char *text, const char *needle)
{
    if (!strstr(text, needle)) {
        print_error("expected '%s' in:\n%s\n", needle, text);
        fail();
    }
}

/* The training data of step s: a pure function of s, as a data loader
 * replaying the same epoch would give. */
static data step_data(network *net, int s)
{
    int rows = net->batch * net->subdivisions;
    data d;
    memset(&d, 0, sizeof d);
    d.X = make_matrix(rows, net->inputs);
    d.y = make_matrix(rows, net->outputs);
    unsigned x = 2654435761u * (unsigned)(s + 1);
    for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < net->inputs; ++c) {
            x = x * 1664525u + 1013904223u;
            d.X.vals[r][c] = (float)((x >> 8) / 16777216.0) * 2.f - 1.f;
        }
        d.y.vals[r][(r * 3 + s) % net->outputs] = 1;
    }
    return d;
}

static void train_steps(network *net, int from, int to)
{
    for (int s = from; s < to; ++s) {
        data d = step_data(net, s);
        train_network(net, d);
        free_data(d);
    }
}

/* Every value save_weights writes, plus the arrays that carry momentum
 * (Darknet's accumulators, K-FAC's velocities), in one buffer. */
typedef struct {
    float *v;
    size_t n, cap;
} blob;

static void put(blob *b, const float *p, size_t n)
{
    if (!p || !n) return;
    if (b->n + n > b->cap) {
        b->cap = 2 * (b->n + n);
        b->v = realloc(b->v, b->cap * sizeof(float));
    }
    memcpy(b->v + b->n, p, n * sizeof(float));
    b->n += n;
}

static blob snapshot(network *net, int with_momentum)
{
    blob b = {0, 0, 0};
    for (int i = 0; i < net->n; ++i) {
        layer *l = &net->layers[i];
        size_t nw = 0, nb = 0;
        if (l->type == CONVOLUTIONAL) { nw = l->nweights; nb = l->n; }
        else if (l->type == CONNECTED) { nw = (size_t)l->inputs * l->outputs; nb = l->outputs; }
        else continue;
        put(&b, l->weights, nw);
        put(&b, l->biases, nb);
        if (l->batch_normalize) {
            put(&b, l->scales, nb);
            put(&b, l->rolling_mean, nb);
            put(&b, l->rolling_variance, nb);
        }
        if (with_momentum) {
            put(&b, l->weight_updates, nw);
            put(&b, l->bias_updates, nb);
            put(&b, l->scale_updates, nb);
        }
    }
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    for (int k = 0; with_momentum && st && k < st->nlayers; ++k) {
        put(&b, dn_vel_w(st, k), st->layers[k].nweights);
        if (st->layers[k].bias) put(&b, dn_vel_b(st, k), st->layers[k].nbiases);
    }
    return b;
}

/* Only what K-FAC moves: K-FAC layers' weights, biases and BN scales. */
static blob kfac_params(network *net)
{
    blob b = {0, 0, 0};
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    for (int k = 0; k < st->nlayers; ++k) {
        layer *l = &net->layers[st->layers[k].index];
        put(&b, l->weights, st->layers[k].nweights);
        put(&b, l->biases, st->layers[k].nbiases);
        if (l->scales) put(&b, l->scales, st->layers[k].nbiases);
    }
    return b;
}

static int blob_equal(const blob *a, const blob *b)
{
    return a->n == b->n && memcmp(a->v, b->v, a->n * sizeof(float)) == 0;
}

/* ------------------------------------------------------------ (a) resume */

/* Bit-for-bit, not within a tolerance: with one BLAS thread every float
 * operation of the resumed run is the same operation on the same bits as in
 * the uninterrupted one (weights, BN statistics, Darknet's momentum
 * accumulators, K-FAC factors, velocities and counters are restored bit for
 * bit, the inverse is recomputed by the same code from the same factors,
 * and the sampled labels are a function of seed, step and example). */
static void test_resume_bit_exact(void **state)
{
    (void)state;
    const char *w = tmp_path("resume.weights");
    char side[160];
    snprintf(side, sizeof side, "%s.kfac", w);

    network *a = build(cfg_resume, 1);
    kfac_net_state *sa = (kfac_net_state *)a->kfac;
    assert_non_null(sa);
    assert_int_equal(sa->sampled, 1);
    assert_int_equal(sa->nlayers, 2);
    train_steps(a, 0, N_BEFORE);
    assert_int_equal(dn_opt(sa).steps_run, N_BEFORE);
    assert_int_equal(dn_opt(sa).total_failures, 0);
    /* the adaptation state is part of what must survive: damping_adapt_every
     * (default 5) has adapted the damping at least once by now */
    const double damping_saved = dn_opt(sa).damping, rho_saved = dn_opt(sa).rho;
    assert_true(isfinite(rho_saved));
    save_weights(a, (char *)w);
    assert_true(exists(w));
    assert_true(exists(side));
    char tmp[200];
    snprintf(tmp, sizeof tmp, "%s.tmp", w);
    assert_false(exists(tmp));
    snprintf(tmp, sizeof tmp, "%s.tmp", side);
    assert_false(exists(tmp));
    train_steps(a, N_BEFORE, N_BEFORE + M_AFTER);
    blob w1 = snapshot(a, 1);

    /* another seed: the parse's random init and the setup's own seed are
     * overwritten by the weights file and the sidecar */
    network *b = build(cfg_resume, 2);
    kfac_net_state *sb = (kfac_net_state *)b->kfac;
    capture_begin();
    load_weights(b, (char *)w);
    char *msg = capture_end();
    expect_in(msg, "state restored");
    assert_int_equal(*b->seen, (size_t)N_BEFORE * 4);
    assert_int_equal(dn_opt(sb).steps_run, N_BEFORE);
    assert_int_equal(dn_opt(sb).ready, 1);
    assert_true(dn_opt(sb).seed == dn_opt(sa).seed);
    assert_true(dn_opt(sb).damping == damping_saved && dn_opt(sb).rho == rho_saved);
    train_steps(b, N_BEFORE, N_BEFORE + M_AFTER);
    blob w2 = snapshot(b, 1);
    assert_int_equal(w1.n, w2.n);
    assert_memory_equal(w1.v, w2.v, w1.n * sizeof(float));
    assert_int_equal(dn_opt(sb).steps_run, dn_opt(sa).steps_run);
    assert_int_equal(*b->seen, *a->seen);
    assert_int_equal(*b->t, *a->t);
    assert_true(dn_opt(sb).damping == dn_opt(sa).damping);

    /* (b) without the sidecar the same weights resume with a fresh K-FAC:
     * a warning, training works, and the result differs, which shows the
     * sidecar is what made the runs agree. */
    assert_int_equal(rename(side, tmp_path("kept.kfac")), 0);
    network *c = build(cfg_resume, 3);
    kfac_net_state *sc = (kfac_net_state *)c->kfac;
    capture_begin();
    load_weights(c, (char *)w);
    msg = capture_end();
    expect_in(msg, "warning");
    expect_in(msg, "starts fresh");
    assert_int_equal(dn_opt(sc).steps_run, 0);
    assert_int_equal(dn_opt(sc).ready, 0);
    train_steps(c, N_BEFORE, N_BEFORE + M_AFTER);
    assert_int_equal(dn_opt(sc).steps_run, M_AFTER);
    assert_int_equal(dn_opt(sc).total_failures, 0);
    blob w3 = snapshot(c, 1);
    for (size_t i = 0; i < w3.n; ++i) assert_true(isfinite(w3.v[i]));
    assert_false(blob_equal(&w1, &w3));
    assert_int_equal(rename(tmp_path("kept.kfac"), side), 0);

    free(w1.v); free(w2.v); free(w3.v);
    free_network(a);
    free_network(b);
    free_network(c);
}

/* ------------------------------------------------------------ (c) refusals */

/* load_weights in a child: a refused sidecar must end the process with
 * status 1 and a message, not with abort() or a signal. */
static void expect_load_exits(const char *cfg, const char *weights, const char *needle)
{
    network *net = build(cfg, 5);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open(tmp_path("child.txt"), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        dup2(fd, 2);
        load_weights(net, (char *)weights);
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    size_t n;
    unsigned char *text = slurp(tmp_path("child.txt"), &n);
    text = realloc(text, n + 1);
    text[n] = 0;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 1) {
        print_error("child: %s %d, stderr:\n%s\n", WIFEXITED(status) ? "exit" : "signal",
                    WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status), (char *)text);
        fail();
    }
    expect_in((char *)text, "refusing K-FAC sidecar");
    expect_in((char *)text, needle);
    free(text);
    free_network(net);
}

/* The non-exiting entry point must refuse and leave the state as it was. */
static void expect_refused(const char *cfg, const char *weights, const char *needle)
{
    network *net = build(cfg, 6);
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    *net->seen = (size_t)N_BEFORE * 4;
    blob before = snapshot(net, 1);
    char err[2048];
    assert_int_equal(kfac_darknet_load_sidecar_err(net, weights, err, sizeof err), -1);
    expect_in(err, needle);
    blob after = snapshot(net, 1);
    assert_true(blob_equal(&before, &after));
    assert_int_equal(dn_opt(st).steps_run, 0);
    assert_int_equal(dn_opt(st).ready, 0);
    free(before.v);
    free(after.v);
    free_network(net);
}

static void test_sidecar_refused(void **state)
{
    (void)state;
    const char *w = tmp_path("refuse.weights");
    char side[160];
    snprintf(side, sizeof side, "%s.kfac", w);
    network *a = build(cfg_resume, 1);
    train_steps(a, 0, N_BEFORE);
    capture_begin();
    save_weights(a, (char *)w);
    capture_end();
    free_network(a);
    size_t len;
    unsigned char *good = slurp(side, &len);

    /* a sidecar from another cfg or other shapes */
    expect_refused(cfg_other_damping, w, "different cfg or layer shapes");
    expect_refused(cfg_other_shape, w, "different cfg or layer shapes");
    expect_load_exits(cfg_other_damping, w, "different cfg or layer shapes");
    /* the message names the setting that differs, not just "different" */
    expect_refused(cfg_other_damping, w, "saved 'damping 0.01 factored', here 'damping 0.02 factored'");

    /* a sidecar of the previous layout (inputs of the inverse, not the
     * inverse) is refused by its version, whatever else it holds */
    assert_int_equal(kfac_ckpt_save(side, "darknet-kfac sidecar layout 1; damping 0.05 "
                                    "factored; cov_ema_decay 0.5", NULL, 0, NULL, 0), KFAC_OK);
    expect_refused(cfg_resume, w, "another darknet-kfac version (sidecar layout 1;");
    spit(side, good, len);

    /* one flipped byte, in the data and in the header */
    unsigned char *bad = malloc(len);
    memcpy(bad, good, len);
    bad[len / 2] ^= 0x10;
    spit(side, bad, len);
    expect_refused(cfg_resume, w, "checksum mismatch");
    expect_load_exits(cfg_resume, w, "corrupted");
    memcpy(bad, good, len);
    bad[0] ^= 0xff;
    spit(side, bad, len);
    expect_refused(cfg_resume, w, "bad magic");

    /* truncated, as by a full disk, and empty */
    spit(side, good, len / 3);
    expect_refused(cfg_resume, w, "truncated");
    expect_load_exits(cfg_resume, w, "truncated");
    spit(side, good, 0);
    expect_refused(cfg_resume, w, "truncated");

    /* a sidecar left over from an earlier save of the same file: the
     * weights say another number of images seen */
    spit(side, good, len);
    network *n = build(cfg_resume, 7);
    *n->seen = (size_t)(N_BEFORE + 1) * 4;
    char err[2048];
    assert_int_equal(kfac_darknet_load_sidecar_err(n, w, err, sizeof err), -1);
    expect_in(err, "images seen");
    assert_int_equal(dn_opt(dn_state(n)).steps_run, 0);
    free_network(n);

    /* and the intact file still loads */
    n = build(cfg_resume, 7);
    *n->seen = (size_t)N_BEFORE * 4;
    assert_int_equal(kfac_darknet_load_sidecar_err(n, w, err, sizeof err), 0);
    assert_int_equal(dn_opt(dn_state(n)).steps_run, N_BEFORE);
    free_network(n);
    free(bad);
    free(good);
}

/* ------------------------------------------------------------ (d) faults */

enum { PLANT_NONE, PLANT_CAPTURED_GRADIENT, PLANT_UPDATE };
static int plant;
static void (*real_backward)(layer, network);

/* Wraps the connected layer's backward. A NaN in its l.delta during the
 * sampled pass reaches only what the pass captures (the G statistics of it
 * and of the conv below; the pass restores every accumulator); a NaN in
 * weight_updates after the normal pass reaches only the update. */
static void planting_backward(layer l, network net)
{
    kfac_net_state *st = (kfac_net_state *)net.kfac;
    if (plant == PLANT_CAPTURED_GRADIENT && st->in_sampled_pass) l.delta[1] = NAN;
    real_backward(l, net);
    if (plant == PLANT_UPDATE && !st->in_sampled_pass) l.weight_updates[2] = NAN;
}

/* One step that must fail: no K-FAC weight moves, one more failure. */
static void expect_failed_step(network *net, int step, const char *needle)
{
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    long total = dn_opt(st).total_failures;
    blob before = kfac_params(net);
    capture_begin();
    train_steps(net, step, step + 1);
    char *msg = capture_end();
    expect_in(msg, needle);
    expect_in(msg, "no K-FAC weight changed");
    blob after = kfac_params(net);
    assert_true(blob_equal(&before, &after));
    assert_int_equal(dn_opt(st).total_failures, total + 1);
    assert_int_equal(dn_opt(st).consecutive_failures, 1);
    for (int k = 0; k < st->nlayers; ++k) {
        layer *l = &net->layers[st->layers[k].index];
        for (int i = 0; i < st->layers[k].nweights; ++i) assert_true(l->weight_updates[i] == 0);
    }
    free(before.v);
    free(after.v);
}

/* The next good step: every K-FAC weight finite, some moved. */
static void expect_good_step(network *net, int step)
{
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    long total = dn_opt(st).total_failures;
    blob before = kfac_params(net);
    capture_begin();
    train_steps(net, step, step + 1);
    capture_end();
    blob after = kfac_params(net);
    assert_false(blob_equal(&before, &after));
    for (size_t i = 0; i < after.n; ++i) assert_true(isfinite(after.v[i]));
    assert_int_equal(dn_opt(st).total_failures, total);
    assert_int_equal(dn_opt(st).consecutive_failures, 0);
    free(before.v);
    free(after.v);
}

static void test_fault_injection(void **state)
{
    (void)state;
    network *net = build(cfg_fault, 1);
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    layer *fc = &net->layers[3];
    real_backward = fc->backward;
    fc->backward = planting_backward;
    kfac_layer_state *conv = &st->layers[0], *conn = &st->layers[1];
    assert_int_equal(conv->index, 0);
    assert_int_equal(conn->index, 3);

    train_steps(net, 0, 2);
    assert_int_equal(dn_opt(st).total_failures, 0);

    /* step 2 collects statistics: NaN in the captured output gradient */
    plant = PLANT_CAPTURED_GRADIENT;
    expect_failed_step(net, 2, "new statistics rejected");
    plant = PLANT_NONE;
    assert_true(st->last.cov_failed == 2);
    assert_true(kfac_opt_layer_failures(st->opt, conv->slot) == 1 && kfac_opt_layer_failures(st->opt, conn->slot) == 1);
    expect_good_step(net, 3);

    /* step 5 only inverts: a factor at the edge of double range (every
     * entry 1e308; set_factors keeps NaN/Inf out of a factor, so this is as
     * bad as one can be made through the API: its trace overflows inside the
     * damping split) makes the inverse fail; the last good one is kept */
    expect_good_step(net, 4);
    kfac_block_info info = dn_info(conn);
    size_t na = (size_t)info.kb * info.kb, ng = (size_t)info.n_g * info.n_g;
    double *A = malloc(na * sizeof(double)), *G = malloc(ng * sizeof(double));
    assert_int_equal(kfac_block_get_factors(dn_block(conn), 0, A, G), KFAC_OK);
    for (size_t i = 0; i < na; ++i) A[i] = 1e308;
    assert_int_equal(kfac_block_set_factors(dn_block(conn), 0, A, G), KFAC_OK);
    expect_failed_step(net, 5, "inverse update failed");
    assert_int_equal(st->last.inv_failed, 1);
    assert_int_equal(kfac_opt_layer_failures(st->opt, conn->slot), 2);
    assert_true(kfac_block_has_inverse(dn_block(conn)));
    /* step 6 collects statistics that replace the factor (cov_ema_decay=0) */
    expect_good_step(net, 6);
    free(A);
    free(G);

    /* NaN in one layer's weight_updates: the whole step is skipped */
    plant = PLANT_UPDATE;
    expect_failed_step(net, 7, "non-finite gradient");
    plant = PLANT_NONE;
    assert_int_equal(kfac_opt_layer_failures(st->opt, conn->slot), 3);
    expect_good_step(net, 8);
    assert_int_equal(dn_opt(st).total_failures, 3);
    assert_int_equal(dn_opt(st).steps_run, 9);

    fc->backward = real_backward;
    free_network(net);
}

/* ------------------------------------------------------------ (e) guard */

static void expect_not_written(network *net, const char *w, const char *needle)
{
    capture_begin();
    save_weights(net, (char *)w);
    char *msg = capture_end();
    expect_in(msg, "Not saving weights");
    expect_in(msg, needle);
    char tmp[200];
    snprintf(tmp, sizeof tmp, "%s.tmp", w);
    assert_false(exists(tmp));
}

/* With or without K-FAC: a NaN or Inf anywhere in what save_weights writes
 * means no file at all, or the previous file left as it was. */
static void test_nonfinite_weights_not_saved(void **state)
{
    (void)state;
    const char *w = tmp_path("guard.weights");
    char side[160];
    snprintf(side, sizeof side, "%s.kfac", w);

    network *plain = build(cfg_plain, 1);
    assert_null(plain->kfac);
    plain->layers[3].weights[5] = NAN;
    expect_not_written(plain, w, "layer 3 (connected)");
    assert_false(exists(w));
    free_network(plain);

    network *net = build(cfg_resume, 1);
    train_steps(net, 0, 2);
    capture_begin();
    save_weights(net, (char *)w);
    capture_end();
    size_t len, slen, len2, slen2;
    unsigned char *good = slurp(w, &len), *sgood = slurp(side, &slen);
    train_steps(net, 2, 3);
    float keep = net->layers[0].rolling_variance[1];
    net->layers[0].rolling_variance[1] = INFINITY;
    expect_not_written(net, w, "layer 0 (conv) has a non-finite value in rolling_variance[1]");
    unsigned char *now = slurp(w, &len2), *snow = slurp(side, &slen2);
    assert_int_equal(len, len2);
    assert_memory_equal(good, now, len);
    assert_int_equal(slen, slen2);
    assert_memory_equal(sgood, snow, slen);
    net->layers[0].rolling_variance[1] = keep;
    net->layers[0].weights[0] = NAN;
    expect_not_written(net, w, "weights[0]");
    free(now); free(snow);
    now = slurp(w, &len2);
    assert_memory_equal(good, now, len);
    free(good); free(sgood); free(now);
    free_network(net);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_resume_bit_exact),
        cmocka_unit_test(test_sidecar_refused),
        cmocka_unit_test(test_fault_injection),
        cmocka_unit_test(test_nonfinite_weights_not_saved),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
