/* kfac_demo: trains a Darknet cfg on Fashion-MNIST and logs test accuracy
 * against iterations and training wall time, so SGD and K-FAC runs can be
 * compared curve against curve (scripts/demo.sh, scripts/bench.sh).
 *
 * It reads the IDX files (gzipped or not) straight into Darknet `data`, draws
 * minibatches with its own seeded sampler so that two runs with the same seed
 * see exactly the same examples in the same order whatever else consumes
 * rand() (K-FAC's sampled targets do), and can save/load the initial weights so
 * both methods start from the same point. `export` writes the same data as PNG
 * files + lists for `darknet classifier train cfg/fashion.data ...`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <zlib.h>

#include "darknet.h"
#include "kfac_darknet.h"

#define IMG_MAGIC 0x00000803u
#define LBL_MAGIC 0x00000801u
#define NCLASSES 10

/* Darknet's classifier finds a file's class by strstr(path, label) and needs
 * exactly one hit, so no label may be a substring of another ("shirt" vs
 * "t-shirt"): the T-shirt/top class is "tee". Same order as Fashion-MNIST. */
static const char *LABELS[NCLASSES] = {
    "tee", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "boot"
};

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "kfac_demo: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* train_network (network.c, with patch 0106's train_network_datum) with a
 * clock between the phases of each step: forward, backward (K-FAC's input
 * captures included), the sampled-Fisher pass, update (K-FAC's factor,
 * inverse and preconditioning work included). Keep in step with network.c. */
static float train_network_timed(network *net, data d, double phase[4])
{
    int batch = net->batch, n = d.X.rows / batch;
    float sum = 0;
    for (int i = 0; i < n; ++i) {
        get_next_batch(d, batch, i * batch, net->input, net->truth);
        *net->seen += net->batch;
        net->train = 1;
        double t0 = now_s();
        forward_network(net);
        double t1 = now_s();
        backward_network(net);
        double t2 = now_s();
        if (net->kfac) kfac_backward_network_cpu(net);
        double t3 = now_s();
        sum += *net->cost;
        if (((*net->seen) / net->batch) % net->subdivisions == 0) update_network(net);
        double t4 = now_s();
        phase[0] += t1 - t0; phase[1] += t2 - t1; phase[2] += t3 - t2; phase[3] += t4 - t3;
    }
    return sum / (n * batch);
}

/* ------------------------------------------------------------------ IDX */

/* Reads exactly n bytes or dies naming the file: a short read means a
 * truncated download, which must not turn into silently zero-filled data. */
static void gz_read_exact(gzFile f, const char *path, void *buf, size_t n, const char *what)
{
    unsigned char *p = buf;
    while (n > 0) {
        unsigned chunk = n > (1u << 30) ? (1u << 30) : (unsigned)n;
        int r = gzread(f, p, chunk);
        if (r < 0) {
            int err;
            const char *msg = gzerror(f, &err);
            die("%s: read error in %s: %s", path, what, msg);
        }
        if (r == 0) die("%s: truncated file (ended inside %s)", path, what);
        p += r;
        n -= (size_t)r;
    }
}

static uint32_t be32(const unsigned char *b)
{
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
}

static gzFile idx_open(const char *path)
{
    gzFile f = gzopen(path, "rb");
    if (!f) die("%s: cannot open: %s", path, errno ? strerror(errno) : "zlib error");
    return f;
}

/* Trailing bytes mean the header's count does not describe the file (a
 * concatenation or a wrong file), so the data cannot be trusted either. */
static void idx_expect_eof(gzFile f, const char *path)
{
    unsigned char extra;
    int r = gzread(f, &extra, 1);
    if (r < 0) {
        int err;
        die("%s: read error at end of data: %s", path, gzerror(f, &err));
    }
    if (r > 0) die("%s: trailing bytes after the %s declared by the header", path, "items");
    gzclose(f);
}

/* Images: magic 0x803, count, rows, cols, then count*rows*cols bytes. */
static unsigned char *idx_read_images(const char *path, int *count, int *rows, int *cols)
{
    gzFile f = idx_open(path);
    unsigned char h[16];
    gz_read_exact(f, path, h, 16, "the header");
    uint32_t magic = be32(h);
    if (magic != IMG_MAGIC)
        die("%s: not an IDX image file (magic 0x%08x, want 0x%08x)", path, magic, IMG_MAGIC);
    uint32_t n = be32(h + 4), r = be32(h + 8), c = be32(h + 12);
    if (n == 0 || n > 10000000u || r == 0 || c == 0 || r > 4096 || c > 4096)
        die("%s: implausible dimensions %u x %u x %u", path, n, r, c);
    size_t bytes = (size_t)n * r * c;
    unsigned char *px = malloc(bytes);
    if (!px) die("%s: out of memory for %zu bytes", path, bytes);
    gz_read_exact(f, path, px, bytes, "the pixel data");
    idx_expect_eof(f, path);
    *count = (int)n; *rows = (int)r; *cols = (int)c;
    return px;
}

/* Labels: magic 0x801, count, then count bytes, each < NCLASSES. */
static unsigned char *idx_read_labels(const char *path, int *count)
{
    gzFile f = idx_open(path);
    unsigned char h[8];
    gz_read_exact(f, path, h, 8, "the header");
    uint32_t magic = be32(h);
    if (magic != LBL_MAGIC)
        die("%s: not an IDX label file (magic 0x%08x, want 0x%08x)", path, magic, LBL_MAGIC);
    uint32_t n = be32(h + 4);
    if (n == 0 || n > 10000000u) die("%s: implausible label count %u", path, n);
    unsigned char *lb = malloc(n);
    if (!lb) die("%s: out of memory", path);
    gz_read_exact(f, path, lb, n, "the labels");
    idx_expect_eof(f, path);
    for (uint32_t i = 0; i < n; ++i)
        if (lb[i] >= NCLASSES) die("%s: label %u at index %u is not in 0..%d", path, lb[i], i, NCLASSES - 1);
    *count = (int)n;
    return lb;
}

typedef struct {
    int n, rows, cols;
    unsigned char *px, *lb;
} idx_set;

/* Finds <dir>/<stem>-{images-idx3,labels-idx1}-ubyte[.gz], preferring .gz
 * (what the Debian package ships), and cross-checks the two files. */
static void idx_path(char *out, size_t sz, const char *dir, const char *stem, const char *kind)
{
    struct stat st;
    snprintf(out, sz, "%s/%s-%s-ubyte.gz", dir, stem, kind);
    if (stat(out, &st) == 0) return;
    snprintf(out, sz, "%s/%s-%s-ubyte", dir, stem, kind);
    if (stat(out, &st) == 0) return;
    die("%s/%s-%s-ubyte[.gz]: not found (install dataset-fashion-mnist or pass --data-dir)", dir, stem, kind);
}

static idx_set idx_load(const char *dir, const char *stem)
{
    char ip[4096], lp[4096];
    idx_path(ip, sizeof ip, dir, stem, "images-idx3");
    idx_path(lp, sizeof lp, dir, stem, "labels-idx1");
    idx_set s;
    int nl;
    s.px = idx_read_images(ip, &s.n, &s.rows, &s.cols);
    s.lb = idx_read_labels(lp, &nl);
    if (nl != s.n) die("%s has %d labels but %s has %d images", lp, nl, ip, s.n);
    return s;
}

/* Darknet layout: one row per example, channel planes of h*w floats in [0,1];
 * a grey image is replicated into every channel the network asks for (the
 * cfgs use 3 so that `darknet classifier`, which always loads RGB, matches). */
static data idx_to_data(idx_set s, int channels)
{
    data d = {0};
    int hw = s.rows * s.cols;
    d.w = s.cols; d.h = s.rows;
    d.X = make_matrix(s.n, hw * channels);
    d.y = make_matrix(s.n, NCLASSES);
    for (int i = 0; i < s.n; ++i) {
        const unsigned char *p = s.px + (size_t)i * hw;
        for (int c = 0; c < channels; ++c)
            for (int k = 0; k < hw; ++k) d.X.vals[i][c * hw + k] = p[k] / 255.0f;
        d.y.vals[i][s.lb[i]] = 1;
    }
    return d;
}

/* ------------------------------------------------------------------ sampler */

/* splitmix64: independent of libc rand(), so the example order is a function
 * of --seed only, identical for SGD and K-FAC runs. */
static uint64_t rng_state;
static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Epochs of a shuffled permutation (sampling without replacement), the usual
 * minibatch SGD regime and what the accuracy-vs-epoch literature assumes. */
typedef struct { int *perm; int n, pos; } sampler;

static void sampler_shuffle(sampler *s)
{
    for (int i = s->n - 1; i > 0; --i) {
        int j = (int)(rng_next() % (uint64_t)(i + 1));
        int t = s->perm[i]; s->perm[i] = s->perm[j]; s->perm[j] = t;
    }
    s->pos = 0;
}

static int sampler_next(sampler *s)
{
    if (s->pos == s->n) sampler_shuffle(s);
    return s->perm[s->pos++];
}

/* ------------------------------------------------------------------ train */

typedef struct {
    const char *cfg, *data_dir, *csv, *method, *init, *save_init, *save_final;
    int iters, eval_every, seed, train_limit;
    double max_seconds;
} train_opts;

static float evaluate(network *net, data test)
{
    matrix pred = network_predict_data(net, test);
    float acc = matrix_topk_accuracy(test.y, pred, 1);
    free_matrix(pred);
    return acc;
}

static const char *basename_noext(const char *path, char *buf, size_t sz)
{
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    snprintf(buf, sz, "%s", b);
    char *dot = strrchr(buf, '.');
    if (dot && dot != buf) *dot = 0;
    return buf;
}

static int cmd_train(train_opts o)
{
    srand(o.seed);
    network *net = parse_network_cfg((char *)o.cfg);
    if (o.save_init) {
        save_weights(net, (char *)o.save_init);
        fprintf(stderr, "kfac_demo: saved initial weights to %s\n", o.save_init);
    }
    if (o.init) {
        FILE *t = fopen(o.init, "rb");
        if (!t) die("%s: cannot open initial weights: %s", o.init, strerror(errno));
        fclose(t);
        load_weights(net, (char *)o.init);
    }
    if (net->w * net->h != 28 * 28 || (net->c != 1 && net->c != 3))
        die("%s: input must be width=28 height=28 channels=1 or 3 (got %dx%dx%d)", o.cfg, net->w, net->h, net->c);
    if (net->outputs != NCLASSES)
        die("%s: the network must end in %d outputs (has %d)", o.cfg, NCLASSES, net->outputs);

    idx_set tr = idx_load(o.data_dir, "train"), te = idx_load(o.data_dir, "t10k");
    if (tr.rows != 28 || tr.cols != 28 || te.rows != 28 || te.cols != 28)
        die("%s: images are %dx%d / %dx%d, expected 28x28", o.data_dir, tr.rows, tr.cols, te.rows, te.cols);
    if (o.train_limit > 0 && o.train_limit < tr.n) tr.n = o.train_limit;
    data train = idx_to_data(tr, net->c), test = idx_to_data(te, net->c);
    free(tr.px); free(tr.lb); free(te.px); free(te.lb);

    /* Re-seed after data loading so anything in training that uses rand()
     * (K-FAC's sampled targets) starts from the same state in every run. */
    srand(o.seed + 1);
    rng_state = (uint64_t)o.seed * 0x2545F4914F6CDD1Dull + 12345;
    sampler smp = { calloc(train.X.rows, sizeof(int)), train.X.rows, 0 };
    for (int i = 0; i < smp.n; ++i) smp.perm[i] = i;
    sampler_shuffle(&smp);

    int step = net->batch * net->subdivisions;  /* examples per optimizer step */
    data mb = {0};
    mb.shallow = 1;
    mb.X.rows = mb.y.rows = step;
    mb.X.cols = train.X.cols; mb.y.cols = train.y.cols;
    mb.X.vals = calloc(step, sizeof(float *));
    mb.y.vals = calloc(step, sizeof(float *));

    FILE *csv = fopen(o.csv, "a");
    if (!csv) die("%s: cannot open for appending: %s", o.csv, strerror(errno));
    fseek(csv, 0, SEEK_END);
    if (ftell(csv) == 0) fprintf(csv, "method,iteration,seconds,train_loss,test_accuracy\n");

    char mbuf[256];
    const char *method = o.method ? o.method : basename_noext(o.cfg, mbuf, sizeof mbuf);
    fprintf(stderr, "kfac_demo: %s: %s, batch %d, lr %g, momentum %g, decay %g, %d train / %d test\n",
            method, o.cfg, step, net->learning_rate, net->momentum, net->decay, train.X.rows, test.X.rows);

    double train_s = 0, loss_sum = 0, phase[4] = {0};
    int loss_n = 0, it;
    for (it = 1; it <= o.iters; ++it) {
        for (int b = 0; b < step; ++b) {
            int k = sampler_next(&smp);
            mb.X.vals[b] = train.X.vals[k];
            mb.y.vals[b] = train.y.vals[k];
        }
        double t0 = now_s();
        float loss = train_network_timed(net, mb, phase);
        train_s += now_s() - t0;
        if (!isfinite(loss)) {
            fprintf(csv, "%s,%d,%.3f,%g,%.4f\n", method, it, train_s, loss, 0.0);
            fclose(csv);
            die("%s: training diverged at iteration %d (loss %g)", method, it, loss);
        }
        loss_sum += loss; loss_n++;
        int last = it == o.iters || (o.max_seconds > 0 && train_s >= o.max_seconds);
        if (it % o.eval_every == 0 || last) {
            float acc = evaluate(net, test);
            fprintf(csv, "%s,%d,%.3f,%.5f,%.4f\n", method, it, train_s, loss_sum / loss_n, acc);
            fflush(csv);
            fprintf(stderr, "%s it %6d  %8.2fs  loss %.4f  test acc %.4f\n", method, it, train_s, loss_sum / loss_n, acc);
            loss_sum = 0; loss_n = 0;
        }
        if (last) break;
    }
    fclose(csv);
    int steps = it > o.iters ? o.iters : it;
    /* read by scripts/bench.sh: where each method's step time goes */
    printf("phases %s (seconds per step over %d steps): forward %.4f, backward %.4f, "
           "sampled %.4f, update %.4f\n", method, steps, phase[0] / steps, phase[1] / steps,
           phase[2] / steps, phase[3] / steps);
    if (o.save_final) save_weights(net, (char *)o.save_final);
    free(mb.X.vals); free(mb.y.vals); free(smp.perm);
    free_data(train); free_data(test);
    free_network(net);
    return 0;
}

/* ------------------------------------------------------------------ export */

static void mkdir_p(const char *path)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; ++p) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0755) && errno != EEXIST) die("%s: cannot create: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0755) && errno != EEXIST) die("%s: cannot create: %s", buf, strerror(errno));
}

/* Darknet's classifier assigns a class only when exactly one label occurs in
 * the path; a directory named after a class would break that silently. */
static void check_one_label(const char *path, int want)
{
    int hits = 0, which = -1;
    for (int i = 0; i < NCLASSES; ++i)
        if (strstr(path, LABELS[i])) { hits++; which = i; }
    if (hits != 1 || which != want)
        die("%s: Darknet would not read class '%s' from this path (a directory name contains a label?); choose another --out",
            path, LABELS[want]);
}

static void export_split(idx_set s, const char *out, const char *split)
{
    char dir[4096], list[4096], path[4200];
    snprintf(dir, sizeof dir, "%s/%s", out, split);
    mkdir_p(dir);
    snprintf(list, sizeof list, "%s/%s.list", out, split);
    FILE *lf = fopen(list, "w");
    if (!lf) die("%s: cannot write: %s", list, strerror(errno));
    image im = make_image(s.cols, s.rows, 1);
    for (int i = 0; i < s.n; ++i) {
        const unsigned char *p = s.px + (size_t)i * s.rows * s.cols;
        for (int k = 0; k < s.rows * s.cols; ++k) im.data[k] = p[k] / 255.0f;
        snprintf(path, sizeof path, "%s/%05d_%s", dir, i, LABELS[s.lb[i]]);
        check_one_label(path, s.lb[i]);
        /* lossless, and the extension the list names (save_image would write JPEG) */
        save_image_options(im, path, PNG, 0);
        fprintf(lf, "%s.png\n", path);
    }
    free_image(im);
    if (fclose(lf)) die("%s: write error", list);
    fprintf(stderr, "kfac_demo: wrote %d images and %s\n", s.n, list);
}

static int cmd_export(const char *data_dir, const char *out)
{
    idx_set tr = idx_load(data_dir, "train"), te = idx_load(data_dir, "t10k");
    mkdir_p(out);
    export_split(tr, out, "train");
    export_split(te, out, "test");
    char lp[4096];
    snprintf(lp, sizeof lp, "%s/labels.txt", out);
    FILE *f = fopen(lp, "w");
    if (!f) die("%s: cannot write: %s", lp, strerror(errno));
    for (int i = 0; i < NCLASSES; ++i) fprintf(f, "%s\n", LABELS[i]);
    fclose(f);
    return 0;
}

/* ------------------------------------------------------------------ main */

static void usage(void)
{
    fprintf(stderr,
        "usage: kfac_demo train --cfg FILE [--data-dir DIR] [--iters N] [--eval-every E]\n"
        "                       [--csv FILE] [--method NAME] [--seed S] [--init WEIGHTS]\n"
        "                       [--save-init WEIGHTS] [--save-final WEIGHTS]\n"
        "                       [--max-seconds S] [--train-limit N]\n"
        "       kfac_demo export [--data-dir DIR] [--out DIR]\n"
        "DIR defaults to /usr/share/datasets/fashion-mnist (train-*/t10k-* IDX, .gz or not).\n"
        "The CSV gets method,iteration,seconds,train_loss,test_accuracy; seconds is\n"
        "training wall time without evaluation, train_loss the mean since the last row.\n");
    exit(2);
}

static int parse_int(const char *s, const char *name, int min)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < min || v > 1000000000L) die("--%s: bad value '%s'", name, s);
    return (int)v;
}

int main(int argc, char **argv)
{
    if (argc < 2) usage();
    const char *cmd = argv[1];
    train_opts o = {0};
    o.data_dir = "/usr/share/datasets/fashion-mnist";
    o.csv = "results.csv";
    o.iters = 1000; o.eval_every = 100; o.seed = 1;
    const char *out = "build/data/fashion";
    static struct option lo[] = {
        {"cfg", 1, 0, 'c'}, {"data-dir", 1, 0, 'd'}, {"iters", 1, 0, 'n'}, {"eval-every", 1, 0, 'e'},
        {"csv", 1, 0, 'o'}, {"method", 1, 0, 'm'}, {"seed", 1, 0, 's'}, {"init", 1, 0, 'i'},
        {"save-init", 1, 0, 'I'}, {"save-final", 1, 0, 'F'}, {"max-seconds", 1, 0, 't'},
        {"train-limit", 1, 0, 'l'}, {"out", 1, 0, 'O'}, {"help", 0, 0, 'h'}, {0, 0, 0, 0}
    };
    int ch;
    optind = 2;
    while ((ch = getopt_long(argc, argv, "", lo, 0)) != -1) {
        switch (ch) {
        case 'c': o.cfg = optarg; break;
        case 'd': o.data_dir = optarg; break;
        case 'n': o.iters = parse_int(optarg, "iters", 1); break;
        case 'e': o.eval_every = parse_int(optarg, "eval-every", 1); break;
        case 'o': o.csv = optarg; break;
        case 'm': o.method = optarg; break;
        case 's': o.seed = parse_int(optarg, "seed", 0); break;
        case 'i': o.init = optarg; break;
        case 'I': o.save_init = optarg; break;
        case 'F': o.save_final = optarg; break;
        case 't': o.max_seconds = atof(optarg); break;
        case 'l': o.train_limit = parse_int(optarg, "train-limit", 1); break;
        case 'O': out = optarg; break;
        default: usage();
        }
    }
    if (optind != argc) usage();
    if (!strcmp(cmd, "train")) {
        if (!o.cfg) die("train needs --cfg");
        return cmd_train(o);
    }
    if (!strcmp(cmd, "export")) return cmd_export(o.data_dir, out);
    usage();
}
