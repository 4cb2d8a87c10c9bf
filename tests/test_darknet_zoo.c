/*
 * Model-zoo tests: every cfg in cfg/zoo (upstream Darknet's classifiers and
 * detectors with a [kfac] section, made by scripts/zoo-cfgs.sh) must pass
 * `darknet kfac check` at full size with the default max_factor_dim policy,
 * and must train for a few steps with the real `darknet classifier train` /
 * `darknet detector train` binaries, as subprocesses, on a small synthetic
 * data set (scripts/zoo-data.sh), with a finite loss on every step and no
 * failed K-FAC step. Multi-scale training (random=1) is checked in process:
 * resize_network between steps, the blocks follow the new size.
 *
 * CI has two cores, so the training runs are reduced (docs/zoo.md states the
 * same): classifiers at 64x64 (a [crop] too), detectors at 96x96, batch 2,
 * 2 steps, max_factor_dim=512 so that inverses and preconditioning stay
 * cheap, and burn_in=0 with learning_rate=0.001 so that the weights do move
 * (upstream's lr 0.1 without its 1000-step burn-in makes Darknet's own SGD
 * diverge at batch 2, e.g. resnet101). Layer shapes are never changed. The full-size policy is what the check
 * test covers, and yolov3-tiny also trains once with the default policy.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <dirent.h>
#include <sys/wait.h>

#include "darknet.h"
#include "network.h"
#include "kfac.h"
#include "kfac_dntest.h"


#define ZOO_DIR "cfg/zoo"
#define ZOO_STEPS 2

static char tmpdir[64];
static const char *darknet_bin;

/* Which loss decides the training command: the same lists as
 * scripts/zoo-cfgs.sh, which the check test keeps in sync with cfg/zoo. */
static const char *classifiers[] = {
    "alexnet", "cifar", "darknet", "darknet19", "darknet19_448", "darknet53",
    "darknet53_448", "densenet201", "extraction", "extraction22k", "resnet18",
    "resnet34", "resnet50", "resnet101", "resnet152", "resnext50", "resnext101-32x4d",
    "resnext152-32x4d", "strided", "tiny", "vgg-16"};
static const char *detectors[] = {
    "yolov1-tiny", "yolov2-tiny", "yolov2-tiny-voc", "yolov2", "yolov2-voc",
    "yolov3-tiny", "yolov3", "yolov3-voc", "yolov3-spp"};
#define NCLS (int)(sizeof classifiers / sizeof classifiers[0])
#define NDET (int)(sizeof detectors / sizeof detectors[0])

/* ------------------------------------------------------------ helpers */

/* Runs a shell command, returns its exit status and (malloc'd) output. */
static int run(char **out, const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    strncat(cmd, " 2>&1", sizeof cmd - strlen(cmd) - 1);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    assert_non_null(buf);
    size_t r;
    while ((r = fread(buf + n, 1, cap - n - 1, p)) > 0) {
        n += r;
        if (cap - n < 4096) {
            cap *= 2;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
    }
    buf[n] = 0;
    int st = pclose(p);
    *out = buf;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
}

static void dump_tail(const char *what, const char *out)
{
    size_t n = strlen(out);
    print_error("--- %s: last output ---\n%s\n", what, n > 3000 ? out + n - 3000 : out);
}

/* Outputs of the last conv/connected layer: the classes the data file must
 * declare for a classifier (its softmax width). */
static int head_outputs(const char *cfg)
{
    FILE *fp = fopen(cfg, "r");
    assert_non_null(fp);
    char line[512];
    int in_layer = 0, last = 0;
    while (fgets(line, sizeof line, fp)) {
        if (line[0] == '[')
            in_layer = !strncmp(line, "[conv", 5) || !strncmp(line, "[connected]", 11);
        int v;
        if (in_layer && (sscanf(line, "filters=%d", &v) == 1 || sscanf(line, "output=%d", &v) == 1))
            last = v;
    }
    fclose(fp);
    return last;
}

/* Every training line has a finite loss, there are `steps` of them, and the
 * K-FAC progress lines say no step failed. */
static void check_training(const char *name, const char *out, int detector, int steps)
{
    int losses = 0, kfac_lines = 0, bad = 0;
    const char *s = out;
    while (s && *s) {
        const char *e = strchr(s, '\n');
        char line[1024];
        size_t len = e ? (size_t)(e - s) : strlen(s);
        if (len >= sizeof line) len = sizeof line - 1;
        memcpy(line, s, len);
        line[len] = 0;
        long it;
        float x, loss, avg;
        int ok = detector ? sscanf(line, "%ld: %f, %f avg", &it, &loss, &avg) == 3
                          : sscanf(line, "%ld, %f: %f, %f avg", &it, &x, &loss, &avg) == 4;
        if (ok) {
            ++losses;
            if (!isfinite(loss) || !isfinite(avg)) ++bad;
        }
        if (!strncmp(line, "kfac ", 5)) {
            ++kfac_lines;
            if (!strstr(line, "failed steps 0 in a row/0 total")) ++bad;
        }
        s = e ? e + 1 : 0;
    }
    if (losses != steps || bad || kfac_lines < steps - 1) {
        dump_tail(name, out);
        fail_msg("%s: %d loss lines (want %d), %d K-FAC lines, %d non-finite or failed",
                 name, losses, steps, kfac_lines, bad);
    }
}

/* ------------------------------------------------------------ setup */

static int group_setup(void **state)
{
    (void)state;
    darknet_bin = getenv("DARKNET_BIN") ? getenv("DARKNET_BIN") : DARKNET_BIN;
    if (access(darknet_bin, X_OK) != 0) {
        fprintf(stderr, "test_darknet_zoo: %s not found (run from the repository root after "
                "make darknet)\n", darknet_bin);
        return -1;
    }
    snprintf(tmpdir, sizeof tmpdir, "/tmp/dnzoo_XXXXXX");
    if (!mkdtemp(tmpdir)) return -1;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "scripts/zoo-data.sh %s 16 64 >/dev/null", tmpdir);
    if (system(cmd) != 0) return -1;
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

/* ------------------------------------------------------------ check */

/* cfg/zoo is what the generator makes from upstream, and every cfg passes
 * `kfac check` at full size with the default policy announced. */
static void test_zoo_check_all(void **state)
{
    (void)state;
    char *out;
    int rc = run(&out, "scripts/zoo-cfgs.sh build/darknet-src/cfg %s/gen && diff -r %s %s/gen",
                 tmpdir, ZOO_DIR, tmpdir);
    if (rc) { dump_tail("zoo-cfgs.sh", out); fail_msg("cfg/zoo is out of date: rerun scripts/zoo-cfgs.sh"); }
    free(out);
    int n = 0;
    for (int d = 0; d < 2; ++d) {
        const char **names = d ? detectors : classifiers;
        for (int i = 0; i < (d ? NDET : NCLS); ++i, ++n) {
            rc = run(&out, "%s kfac check %s/%s.cfg", darknet_bin, ZOO_DIR, names[i]);
            if (rc || !strstr(out, "K-FAC training can start") ||
                !strstr(out, "max_factor_dim 8192 (larger layers: Darknet's SGD)") ||
                !strstr(out, "batch-norm scales/shifts keep Darknet's own SGD") ||
                (d && !strstr(out, "using the empirical Fisher"))) {
                dump_tail(names[i], out);
                fail_msg("kfac check %s: exit %d", names[i], rc);
            }
            free(out);
        }
    }
    assert_int_equal(n, NCLS + NDET);
}

/* ------------------------------------------------------------ training */

static void train_one(const char *name, int detector, const char *extra)
{
    char cfg[256], data[256], *out;
    snprintf(cfg, sizeof cfg, "%s/%s.cfg", tmpdir, name);
    int rc = run(&out, "scripts/zoo-reduce.sh %s/%s.cfg %s width=%d height=%d batch=2 "
                 "subdivisions=1 max_batches=%d burn_in=0 learning_rate=0.001 %s",
                 ZOO_DIR, name, cfg, detector ? 96 : 64, detector ? 96 : 64, ZOO_STEPS, extra);
    if (rc) { dump_tail("zoo-reduce.sh", out); fail_msg("cannot reduce %s", name); }
    free(out);
    snprintf(data, sizeof data, "%s/%s.data", tmpdir, name);
    FILE *fp = fopen(data, "w");
    assert_non_null(fp);
    if (detector)
        fprintf(fp, "classes=80\ntrain=%s/detector.list\nbackup=%s/backup\n", tmpdir, tmpdir);
    else
        fprintf(fp, "classes=%d\ntrain=%s/classifier.list\nlabels=%s/labels.txt\nbackup=%s/backup\n",
                head_outputs(cfg), tmpdir, tmpdir, tmpdir);
    fclose(fp);
    rc = run(&out, "%s %s train %s %s", darknet_bin, detector ? "detector" : "classifier", data, cfg);
    if (rc) { dump_tail(name, out); fail_msg("%s train %s: exit %d", detector ? "detector" : "classifier", name, rc); }
    check_training(name, out, detector, ZOO_STEPS);
    free(out);
    /* the weights Darknet saves at the end are not needed */
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -f %s/backup/*", tmpdir);
    assert_int_equal(system(cmd), 0);
}

static void test_train_classifier(void **state)
{
    train_one((const char *)*state, 0, "kfac.max_factor_dim=512 kfac.invert_every=1");
}

static void test_train_detector(void **state)
{
    train_one((const char *)*state, 1, "kfac.max_factor_dim=512 kfac.invert_every=1");
}

/* yolov3-tiny once with the default policy: every layer on K-FAC, the
 * largest factors 4608 (3x3x512). */
static void test_train_yolov3_tiny_default_policy(void **state)
{
    (void)state;
    train_one("yolov3-tiny", 1, "");
}

/* ------------------------------------------------------------ random=1 */

static const char *resize_cfg =
    "[net]\nbatch=2\nsubdivisions=1\nwidth=32\nheight=32\nchannels=3\nlearning_rate=0.01\n"
    "momentum=0.9\ndecay=0.0005\nmax_batches=100\npolicy=constant\n"
    "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride=1\npad=1\nactivation=leaky\n"
    "[maxpool]\nsize=2\nstride=2\n"
    "[convolutional]\nfilters=4\nsize=3\nstride=2\npad=1\nactivation=leaky\n"
    "[convolutional]\nfilters=8\nsize=1\nstride=1\npad=0\nactivation=leaky\n"
    "[avgpool]\n"
    "[softmax]\n"
    "[kfac]\ninvert_every=1\ndamping=0.01\ncov_update_every=1\n"; /* every step follows the size */

/* resize_network between steps, as detector/classifier training does with
 * random=1: each conv block follows its layer's new T, the factors keep their
 * size, and training stays finite. */
static void test_random_resize(void **state)
{
    (void)state;
    char path[128];
    snprintf(path, sizeof path, "%s/resize.cfg", tmpdir);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs(resize_cfg, fp);
    fclose(fp);
    srand(7);
    network *net = parse_network_cfg(path);
    assert_non_null(net->kfac);
    kfac_net_state *st = (kfac_net_state *)net->kfac;
    assert_int_equal(st->nlayers, 3);

    static const int sizes[] = {32, 64, 48, 32, 96};
    for (int s = 0; s < (int)(sizeof sizes / sizeof sizes[0]); ++s) {
        if (s) resize_network(net, sizes[s], sizes[s]);
        int n = net->batch, in = net->inputs, cls = net->outputs;
        float *X = calloc((size_t)n * in, sizeof(float)), *Y = calloc((size_t)n * cls, sizeof(float));
        for (int i = 0; i < n * in; ++i) X[i] = rand_uniform(-1, 1);
        for (int b = 0; b < n; ++b) Y[b * cls + rand() % cls] = 1;
        data dd = {0};
        dd.X.rows = n; dd.X.cols = in; dd.X.vals = calloc(n, sizeof(float *));
        dd.y.rows = n; dd.y.cols = cls; dd.y.vals = calloc(n, sizeof(float *));
        for (int b = 0; b < n; ++b) { dd.X.vals[b] = X + b * in; dd.y.vals[b] = Y + b * cls; }
        float loss = train_network(net, dd);
        assert_true(isfinite(loss));
        for (int k = 0; k < st->nlayers; ++k) {
            layer *l = &net->layers[st->layers[k].index];
            kfac_block_info info;
            assert_int_equal(kfac_block_info_get(kfac_opt_block(st->opt, st->layers[k].slot), &info), KFAC_OK);
            assert_int_equal(info.out_h, l->out_h);
            assert_int_equal(info.out_w, l->out_w);
            assert_int_equal(info.T, l->out_h * l->out_w);
        }
        assert_int_equal(dn_opt(st).consecutive_failures, 0);
        free(dd.X.vals); free(dd.y.vals); free(X); free(Y);
    }
    assert_int_equal(dn_opt(st).total_failures, 0);
    free_network(net);
    unlink(path);
}

/* ------------------------------------------------------------ main */

/* Under the sanitizers every run is several times slower; a subset that
 * still covers each loss, grouped convs, route/shortcut/upsample and connected
 * layers keeps `make test SANITIZE=1` within the CI budget. */
static int selected(const char *name)
{
#ifdef __SANITIZE_ADDRESS__
    static const char *subset[] = {"cifar", "alexnet", "resnext50", "yolov2-tiny", "yolov3-tiny"};
    for (size_t i = 0; i < sizeof subset / sizeof subset[0]; ++i)
        if (!strcmp(subset[i], name)) return 1;
    return 0;
#else
    (void)name;
    return 1;
#endif
}

int main(void)
{
#ifdef __SANITIZE_ADDRESS__
    /* the darknet children are sanitized too, and leak as upstream does */
    setenv("ASAN_OPTIONS", "detect_leaks=0", 0);
#endif
    int n = 0, cap = 3 + NCLS + NDET;
    struct CMUnitTest *t = calloc((size_t)cap, sizeof *t);
    static char names[64][64];
    t[n++] = (struct CMUnitTest)cmocka_unit_test(test_zoo_check_all);
    t[n++] = (struct CMUnitTest)cmocka_unit_test(test_random_resize);
    for (int i = 0; i < NCLS; ++i) {
        if (!selected(classifiers[i])) continue;
        snprintf(names[n], sizeof names[n], "train_classifier_%s", classifiers[i]);
        t[n] = (struct CMUnitTest)cmocka_unit_test_prestate(test_train_classifier, (void *)classifiers[i]);
        t[n].name = names[n];
        ++n;
    }
    for (int i = 0; i < NDET; ++i) {
        if (!selected(detectors[i])) continue;
        snprintf(names[n], sizeof names[n], "train_detector_%s", detectors[i]);
        t[n] = (struct CMUnitTest)cmocka_unit_test_prestate(test_train_detector, (void *)detectors[i]);
        t[n].name = names[n];
        ++n;
    }
    t[n++] = (struct CMUnitTest)cmocka_unit_test(test_train_yolov3_tiny_default_policy);
    int r = _cmocka_run_group_tests("darknet_zoo", t, (size_t)n, group_setup, group_teardown);
    free(t);
    return r;
}
