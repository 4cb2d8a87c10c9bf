/*
 * Bad data files for the demo trainer (build/kfac_demo), table-driven: each
 * case writes a small Fashion-MNIST-shaped IDX set into a temporary folder,
 * breaks one thing, runs the trainer as a subprocess and asserts a non-zero
 * exit before any training, with a message that names the broken file and
 * says what is wrong. A last case checks that the same small set, unbroken,
 * trains (so the failures are the breakage's, not the harness's).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/wait.h>

#ifdef __SANITIZE_ADDRESS__
#define DEMO_BIN "build/san/kfac_demo"
#else
#define DEMO_BIN "build/kfac_demo"
#endif

#define N_IMAGES 24
#define SIDE 28

enum breakage {
    BREAK_NONE,
    BREAK_MISSING_LABELS,  /* train labels file absent */
    BREAK_IMAGE_MAGIC,     /* images file with a label-file magic */
    BREAK_LABEL_MAGIC,     /* labels file with garbage magic */
    BREAK_TRUNCATED,       /* images file cut inside the pixels */
    BREAK_SHORT_HEADER,    /* labels file of 5 bytes */
    BREAK_COUNT_MISMATCH,  /* 24 images, 23 labels */
    BREAK_BAD_LABEL,       /* a label of 10 */
    BREAK_TRAILING,        /* extra bytes after the declared items */
    BREAK_ZERO_DIMS        /* images header with 0 rows */
};

static void put_be32(FILE *f, uint32_t v)
{
    unsigned char b[4] = {(unsigned char)(v >> 24), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 8), (unsigned char)v};
    fwrite(b, 1, 4, f);
}

static void write_images(const char *path, uint32_t magic, uint32_t n, uint32_t rows,
                         size_t pixels, int trailing)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    put_be32(f, magic);
    put_be32(f, n);
    put_be32(f, rows);
    put_be32(f, SIDE);
    for (size_t i = 0; i < pixels; ++i) fputc((int)((i * 37) & 0xff), f);
    if (trailing) fputc(0, f);
    fclose(f);
}

static void write_labels(const char *path, uint32_t magic, uint32_t n, size_t present,
                         int bad_label, int trailing)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    put_be32(f, magic);
    put_be32(f, n);
    for (size_t i = 0; i < present; ++i) fputc(bad_label && i == 3 ? 10 : (int)(i % 10), f);
    if (trailing) fputc(1, f);
    fclose(f);
}

/* Writes train-* and t10k-* into dir, breaking the train set as asked. */
static void make_set(const char *dir, enum breakage br)
{
    char p[512];
    const size_t px = (size_t)N_IMAGES * SIDE * SIDE;
    snprintf(p, sizeof p, "%s/t10k-images-idx3-ubyte", dir);
    write_images(p, 0x803, N_IMAGES, SIDE, px, 0);
    snprintf(p, sizeof p, "%s/t10k-labels-idx1-ubyte", dir);
    write_labels(p, 0x801, N_IMAGES, N_IMAGES, 0, 0);

    snprintf(p, sizeof p, "%s/train-images-idx3-ubyte", dir);
    write_images(p, br == BREAK_IMAGE_MAGIC ? 0x801 : 0x803, N_IMAGES,
                 br == BREAK_ZERO_DIMS ? 0 : SIDE, br == BREAK_TRUNCATED ? px / 2 : px,
                 br == BREAK_TRAILING);
    snprintf(p, sizeof p, "%s/train-labels-idx1-ubyte", dir);
    if (br == BREAK_MISSING_LABELS) return;
    if (br == BREAK_SHORT_HEADER) {
        FILE *f = fopen(p, "wb");
        assert_non_null(f);
        fwrite("\0\0\x08\x01\0", 1, 5, f);
        fclose(f);
        return;
    }
    uint32_t n = br == BREAK_COUNT_MISMATCH ? N_IMAGES - 1 : N_IMAGES;
    write_labels(p, br == BREAK_LABEL_MAGIC ? 0xdeadbeef : 0x801, n, n, br == BREAK_BAD_LABEL, 0);
}

/* Runs the trainer on dir; returns its exit status, stderr in err. */
static int run_demo(const char *dir, char *err, size_t errlen)
{
    char cmd[1024], log[600];
    snprintf(log, sizeof log, "%s/stderr.txt", dir);
    snprintf(cmd, sizeof cmd,
             DEMO_BIN " train --cfg cfg/fashion_sgd.cfg --data-dir %s --iters 2 --eval-every 2"
             " --csv %s/out.csv >/dev/null 2>%s",
             dir, dir, log);
    int st = system(cmd);
    FILE *f = fopen(log, "r");
    size_t n = f ? fread(err, 1, errlen - 1, f) : 0;
    err[n] = 0;
    if (f) fclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static void rm_dir(const char *dir)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

static const struct {
    enum breakage br;
    const char *file;   /* the file the message must name */
    const char *says;   /* what it must say */
} cases[] = {
    {BREAK_MISSING_LABELS, "train-labels-idx1-ubyte", "not found"},
    {BREAK_IMAGE_MAGIC, "train-images-idx3-ubyte", "not an IDX image file"},
    {BREAK_LABEL_MAGIC, "train-labels-idx1-ubyte", "not an IDX label file"},
    {BREAK_TRUNCATED, "train-images-idx3-ubyte", "truncated"},
    {BREAK_SHORT_HEADER, "train-labels-idx1-ubyte", "truncated"},
    {BREAK_COUNT_MISMATCH, "train-labels-idx1-ubyte", "has 23 labels but"},
    {BREAK_BAD_LABEL, "train-labels-idx1-ubyte", "label 10 at index 3"},
    {BREAK_TRAILING, "train-images-idx3-ubyte", "trailing bytes"},
    {BREAK_ZERO_DIMS, "train-images-idx3-ubyte", "implausible dimensions"},
};

static void test_bad_data_files_refused(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
        char dir[] = "/tmp/kfac_data_XXXXXX";
        assert_non_null(mkdtemp(dir));
        make_set(dir, cases[i].br);
        char err[4096];
        int rc = run_demo(dir, err, sizeof err);
        char csv[600];
        snprintf(csv, sizeof csv, "%s/out.csv", dir);
        struct stat sb;
        int wrote_csv = stat(csv, &sb) == 0;
        if (rc == 0 || !strstr(err, cases[i].file) || !strstr(err, cases[i].says) || wrote_csv)
            fail_msg("case %zu (%s: %s): exit %d, csv written %d, stderr:\n%s", i, cases[i].file,
                     cases[i].says, rc, wrote_csv, err);
        rm_dir(dir);
    }
}

static void test_good_small_set_trains(void **state)
{
    (void)state;
    char dir[] = "/tmp/kfac_data_XXXXXX";
    assert_non_null(mkdtemp(dir));
    make_set(dir, BREAK_NONE);
    char err[4096];
    int rc = run_demo(dir, err, sizeof err);
    if (rc != 0) fail_msg("exit %d on a valid set, stderr:\n%s", rc, err);
    rm_dir(dir);
}

int main(void)
{
#ifdef __SANITIZE_ADDRESS__
    setenv("ASAN_OPTIONS", "detect_leaks=0", 0); /* Darknet's own leaks */
#endif
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_data_files_refused),
        cmocka_unit_test(test_good_small_set_trains),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
