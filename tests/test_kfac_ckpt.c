/*
 * Checkpoint sidecars (kfac_ckpt_save / kfac_ckpt_load / _load_buffer):
 * bit-exact round trip of f32/f64/i64 arrays (negative zero, denormals,
 * extremes), the documented byte layout (little-endian fields, CRC-32 as
 * zlib's, checked here against an independent implementation), the atomic
 * write (an existing sidecar survives a failed write, no .tmp is left), every
 * refusal with its message (bad magic, version, truncation at every length,
 * a flipped byte anywhere, trailing data, other fingerprint, entry missing /
 * unexpected / of another type or count, structurally bad files with a valid
 * checksum), argument checks, and a deterministic mutation fuzz of the reader
 * (tens of thousands of inputs, half of them with the checksum recomputed so
 * the parser behind it is reached). Every refusal must leave the caller's
 * buffers byte for byte as they were.
 * Files live in a mkdtemp directory under /tmp per test (kfac_testutil.h),
 * removed after the test.
 */
#include <errno.h>
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>

#include "kfac.h"
#include "kfac_naive.h"
#include "kfac_testutil.h"

/* ------------------------------------------------------------ helpers */

/* Independent bitwise CRC-32 (IEEE, reflected), to check the library's
 * table-driven one and to forge files whose checksum is valid. */
static uint32_t crc32_ref(const unsigned char *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return c ^ 0xFFFFFFFFu;
}

static uint32_t rd32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t rd64(const unsigned char *p)
{
    return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32;
}

static void wr32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void wr64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* Makes a (possibly edited) image self-consistent again: length field and
 * trailer CRC. Needs at least the 24-byte header and the trailer. */
static void fix_up(unsigned char *p, size_t len)
{
    if (len < 28)
        return;
    wr64(p + 16, (uint64_t)len);
    wr32(p + len - 4, crc32_ref(p, len - 4));
}

/* Offsets of entry k of a valid image (walks the layout of kfac_ckpt.c). */
typedef struct {
    size_t name_len_at, name_at, type_at, count_at, data_at;
} entry_pos;

static entry_pos find_entry(const unsigned char *p, int k)
{
    entry_pos r;
    size_t pos = 24;
    pos += 4 + rd32(p + pos);
    for (int i = 0;; i++) {
        r.name_len_at = pos;
        r.name_at = pos + 4;
        uint32_t nl = rd32(p + pos);
        r.type_at = r.name_at + nl;
        r.count_at = r.type_at + 4;
        r.data_at = r.count_at + 8;
        if (i == k)
            return r;
        uint32_t type = rd32(p + r.type_at);
        pos = r.data_at + rd64(p + r.count_at) * (type == KFAC_CKPT_F32 ? 4 : 8);
    }
}

/* ---- the reference state: what a small net's sidecar could hold */

#define FP "cfg=tiny.cfg;L0:conv 3x3 4->4 g2;L1:fc 16->3"
#define NF32 7
#define NF64 6
#define NI64 4

static const float SRC_F32[NF32] = {1.5f, -0.0f, 0.0f, FLT_MAX, -FLT_MIN, 1.0e-45f /* denormal */,
                                    -3.25e7f};
static const double SRC_F64[NF64] = {3.141592653589793, -0.0, DBL_MAX, -DBL_MIN,
                                     4.9406564584124654e-324 /* denormal */, -1e-300};
static const int64_t SRC_I64[NI64] = {INT64_MIN, INT64_MAX, -1, 0x0102030405060708LL};

typedef struct {
    float f32[NF32];
    double f64[NF64];
    int64_t i64[NI64];
    float one[1];
} bufs;

/* Entries in save order: f32 "L0.A", f64 "L0.G", i64 "counters", an empty
 * array (data NULL) and a single float. */
static int make_entries(kfac_ckpt_entry *e, bufs *b)
{
    e[0] = (kfac_ckpt_entry){"L0.A", KFAC_CKPT_F32, NF32, b->f32};
    e[1] = (kfac_ckpt_entry){"L0.G", KFAC_CKPT_F64, NF64, b->f64};
    e[2] = (kfac_ckpt_entry){"counters", KFAC_CKPT_I64, NI64, b->i64};
    e[3] = (kfac_ckpt_entry){"L1.unused", KFAC_CKPT_F64, 0, NULL};
    e[4] = (kfac_ckpt_entry){"damping", KFAC_CKPT_F32, 1, b->one};
    return 5;
}

static void fill_source(bufs *b)
{
    memcpy(b->f32, SRC_F32, sizeof b->f32);
    memcpy(b->f64, SRC_F64, sizeof b->f64);
    memcpy(b->i64, SRC_I64, sizeof b->i64);
    b->one[0] = 0.001f;
}

static void fill_sentinel(bufs *b)
{
    memset(b, 0xA5, sizeof *b);
}

static int is_sentinel(const bufs *b)
{
    bufs s;
    fill_sentinel(&s);
    return memcmp(b, &s, sizeof s) == 0;
}

/* The reference entries with the buffers they point into; e has room for
 * one entry more (alter_missing). Not to be copied: e points into b. */
typedef struct {
    bufs b;
    kfac_ckpt_entry e[6];
    int n;
} ref_set;

/* The reference entries over the source values (what is saved). */
static void ref_source(ref_set *r)
{
    fill_source(&r->b);
    r->n = make_entries(r->e, &r->b);
}

/* The reference entries over sentinel-filled buffers (what is loaded into). */
static void ref_sentinel(ref_set *r)
{
    fill_sentinel(&r->b);
    r->n = make_entries(r->e, &r->b);
}

/* Saves the reference sidecar to `path` and returns its image. */
static unsigned char *reference_image(const char *path, size_t *len)
{
    ref_set src;
    ref_source(&src);
    char err[256];
    assert_int_equal(kfac_ckpt_save(path, FP, src.e, src.n, err, sizeof err), KFAC_OK);
    return tu_read_file(path, len);
}

/* Loads an image into sentinel-filled reference buffers; on refusal checks
 * the buffers were not touched and the message mentions `needle`. */
static void expect_refusal(const unsigned char *img, size_t len, kfac_status want,
                           const char *needle)
{
    ref_set dst;
    ref_sentinel(&dst);
    char err[512];
    /* An exact-size heap copy so ASan sees any read past the end. */
    unsigned char *copy = malloc(len ? len : 1);
    assert_non_null(copy);
    if (len)
        memcpy(copy, img, len);
    kfac_status st = kfac_ckpt_load_buffer(copy, len, FP, dst.e, dst.n, err, sizeof err);
    free(copy);
    if (st != want) {
        print_error("len %zu: status %d, expected %d (%s)\n", len, (int)st, (int)want, err);
        fail();
    }
    assert_true(strlen(err) > 0);
    if (needle)
        tu_assert_contains(err, needle);
    assert_true(is_sentinel(&dst.b));
}

/* Loads the file at `path` with the reference entries, altered by `alter`
 * (if not NULL), into sentinel-filled buffers: it must be refused with
 * `want` and a message containing needle1 (and needle2 if not NULL), and
 * leave the buffers untouched. */
static void expect_load_refusal(const char *path, void (*alter)(kfac_ckpt_entry *e, int *n),
                                const char *fp, kfac_status want, const char *needle1,
                                const char *needle2)
{
    ref_set dst;
    ref_sentinel(&dst);
    if (alter)
        alter(dst.e, &dst.n);
    char err[512];
    assert_int_equal(kfac_ckpt_load(path, fp, dst.e, dst.n, err, sizeof err), want);
    tu_assert_contains(err, needle1);
    if (needle2)
        tu_assert_contains(err, needle2);
    assert_true(is_sentinel(&dst.b));
}

/* ------------------------------------------------------------ round trip */

static void test_crc_reference(void **state)
{
    (void)state;
    /* The standard check value of CRC-32/ISO-HDLC (zlib's crc32). */
    assert_int_equal(crc32_ref((const unsigned char *)"123456789", 9), 0xCBF43926u);
}

static void test_round_trip_bit_exact(void **state)
{
    (void)state;
    const char *path = tu_tmp_path("net.weights.kfac");
    size_t len;
    unsigned char *img = reference_image(path, &len);
    assert_false(tu_exists(tu_tmp_path("net.weights.kfac.tmp")));

    /* Load with the entries in another order: matching is by name. */
    ref_set dst;
    ref_sentinel(&dst);
    kfac_ckpt_entry r[5];
    for (int i = 0; i < dst.n; i++)
        r[i] = dst.e[dst.n - 1 - i];
    char err[256] = "junk";
    assert_int_equal(kfac_ckpt_load(path, FP, r, dst.n, err, sizeof err), KFAC_OK);
    assert_string_equal(err, "");
    bufs src;
    fill_source(&src);
    assert_memory_equal(dst.b.f32, src.f32, sizeof src.f32); /* bits: -0.0f stays -0.0f */
    assert_memory_equal(dst.b.f64, src.f64, sizeof src.f64);
    assert_memory_equal(dst.b.i64, src.i64, sizeof src.i64);
    assert_memory_equal(dst.b.one, src.one, sizeof src.one);
    assert_true(signbit(dst.b.f32[1]) && dst.b.f32[1] == 0.0f);
    assert_true(signbit(dst.b.f64[1]) && dst.b.f64[1] == 0.0);

    /* The same through the buffer reader. */
    fill_sentinel(&dst.b);
    assert_int_equal(kfac_ckpt_load_buffer(img, len, FP, dst.e, dst.n, err, sizeof err), KFAC_OK);
    assert_memory_equal(dst.b.f64, src.f64, sizeof src.f64);
    free(img);
}

/* The documented layout: little-endian header, length, CRC over all bytes
 * before the trailer, entries as written. */
static void test_layout(void **state)
{
    (void)state;
    size_t len;
    unsigned char *img = reference_image(tu_tmp_path("s"), &len);
    assert_memory_equal(img, "KFACCKPT", 8);
    assert_int_equal(rd32(img + 8), KFAC_CKPT_VERSION);
    assert_int_equal(rd32(img + 12), 5);
    assert_int_equal(rd64(img + 16), len);
    assert_int_equal(rd32(img + 24), strlen(FP));
    assert_memory_equal(img + 28, FP, strlen(FP));
    assert_int_equal(rd32(img + len - 4), crc32_ref(img, len - 4));
    size_t expect = 24 + 4 + strlen(FP) + 4;
    const char *names[5] = {"L0.A", "L0.G", "counters", "L1.unused", "damping"};
    const size_t bytes[5] = {NF32 * 4, NF64 * 8, NI64 * 8, 0, 4};
    for (int i = 0; i < 5; i++)
        expect += 4 + strlen(names[i]) + 4 + 8 + bytes[i];
    assert_int_equal(len, expect);
    entry_pos c = find_entry(img, 2);
    assert_memory_equal(img + c.name_at, "counters", 8);
    assert_int_equal(rd32(img + c.type_at), KFAC_CKPT_I64);
    assert_int_equal(rd64(img + c.count_at), NI64);
    static const unsigned char le[8] = {8, 7, 6, 5, 4, 3, 2, 1};
    assert_memory_equal(img + c.data_at + 3 * 8, le, 8);
    entry_pos a = find_entry(img, 0);
    assert_int_equal(rd32(img + a.data_at), 0x3FC00000u); /* 1.5f */
    assert_int_equal(rd32(img + a.data_at + 4), 0x80000000u); /* -0.0f */
    free(img);
}

static void test_empty_container(void **state)
{
    (void)state;
    char err[128];
    assert_int_equal(kfac_ckpt_save(tu_tmp_path("e"), "", NULL, 0, err, sizeof err), KFAC_OK);
    assert_int_equal(kfac_ckpt_load(tu_tmp_path("e"), "", NULL, 0, err, sizeof err), KFAC_OK);
    assert_int_equal(kfac_ckpt_load(tu_tmp_path("e"), "x", NULL, 0, err, sizeof err),
                     KFAC_ERR_FORMAT);
    tu_assert_contains(err, "different cfg or layer shapes");
}

/* A larger array crosses the writer's 4 KiB chunks. */
static void test_round_trip_large(void **state)
{
    (void)state;
    size_t n = 100003;
    double *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
    float *f = malloc(n * sizeof *f), *g = malloc(n * sizeof *g);
    assert_true(a && b && f && g);
    for (size_t i = 0; i < n; i++) {
        a[i] = sin((double)i) * 1e3;
        f[i] = (float)cos((double)i);
    }
    kfac_ckpt_entry e[2] = {{"A", KFAC_CKPT_F64, n, a}, {"f", KFAC_CKPT_F32, n, f}};
    kfac_ckpt_entry d[2] = {{"A", KFAC_CKPT_F64, n, b}, {"f", KFAC_CKPT_F32, n, g}};
    char err[128];
    assert_int_equal(kfac_ckpt_save(tu_tmp_path("big"), "fp", e, 2, err, sizeof err), KFAC_OK);
    assert_int_equal(kfac_ckpt_load(tu_tmp_path("big"), "fp", d, 2, err, sizeof err), KFAC_OK);
    assert_memory_equal(a, b, n * sizeof *a);
    assert_memory_equal(f, g, n * sizeof *f);
    free(a); free(b); free(f); free(g);
}

/* ------------------------------------------------------------ atomic write */

static void test_save_replaces_and_ignores_stale_tmp(void **state)
{
    (void)state;
    const char *path = tu_tmp_path("w.kfac"), *tmp = tu_tmp_path("w.kfac.tmp");
    tu_write_file(path, "old contents", 12);
    tu_write_file(tmp, "left by a crash", 15);
    size_t len;
    unsigned char *img = reference_image(path, &len);
    assert_false(tu_exists(tmp));
    assert_memory_equal(img, "KFACCKPT", 8); /* the new file replaced the old one */
    ref_set dst;
    ref_sentinel(&dst);
    char err[256];
    assert_int_equal(kfac_ckpt_load(path, FP, dst.e, dst.n, err, sizeof err), KFAC_OK);
    assert_memory_equal(dst.b.i64, SRC_I64, sizeof SRC_I64);
    free(img);
}

static void test_save_into_missing_dir(void **state)
{
    (void)state;
    const char *path = tu_tmp_path("no/such/dir/w.kfac");
    ref_set src;
    ref_source(&src);
    char err[512];
    assert_int_equal(kfac_ckpt_save(path, FP, src.e, src.n, err, sizeof err), KFAC_ERR_IO);
    tu_assert_contains(err, "no/such/dir/w.kfac");
    tu_assert_contains(err, strerror(ENOENT));
    assert_false(tu_exists(tu_tmp_path("no")));
}

/* A write that fails half way (file size limit, as a full disk would) keeps
 * the previous sidecar byte for byte and leaves no tmp file. */
static void test_save_failure_keeps_old_file(void **state)
{
    (void)state;
    const char *path = tu_tmp_path("w.kfac");
    size_t len;
    unsigned char *old = reference_image(path, &len);

    size_t n = 1 << 16;
    double *big = calloc(n, sizeof *big);
    assert_non_null(big);
    kfac_ckpt_entry e = {"huge", KFAC_CKPT_F64, n, big};

    struct rlimit saved, small;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &saved), 0);
    void (*oldsig)(int) = signal(SIGXFSZ, SIG_IGN);
    small = saved;
    small.rlim_cur = 8192;
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &small), 0);
    char err[512];
    kfac_status st = kfac_ckpt_save(path, FP, &e, 1, err, sizeof err);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &saved), 0);
    signal(SIGXFSZ, oldsig);

    assert_int_equal(st, KFAC_ERR_IO);
    tu_assert_contains(err, "w.kfac.tmp");
    tu_assert_contains(err, strerror(EFBIG));
    assert_false(tu_exists(tu_tmp_path("w.kfac.tmp")));
    size_t len2;
    unsigned char *now = tu_read_file(path, &len2);
    assert_int_equal(len2, len);
    assert_memory_equal(now, old, len);
    free(now); free(old); free(big);
}

/* rename() fails (the target is a non-empty directory): the target stays,
 * the tmp file goes. */
static void test_save_rename_failure(void **state)
{
    (void)state;
    const char *path = tu_tmp_path("w.kfac");
    assert_int_equal(mkdir(path, 0755), 0);
    tu_write_file(tu_tmp_path("w.kfac/inside"), "x", 1);
    ref_set src;
    ref_source(&src);
    char err[512];
    assert_int_equal(kfac_ckpt_save(path, FP, src.e, src.n, err, sizeof err), KFAC_ERR_IO);
    tu_assert_contains(err, "rename");
    assert_false(tu_exists(tu_tmp_path("w.kfac.tmp")));
    assert_true(tu_exists(tu_tmp_path("w.kfac/inside")));
}

/* A read-only directory: the save fails with EACCES and the old sidecar in
 * it stays as it was. */
static void test_save_readonly_dir(void **state)
{
    (void)state;
    char path[192]; /* tu_tmp_path() recycles its buffers: keep a copy */
    snprintf(path, sizeof path, "%s", tu_tmp_path("ro/w.kfac"));
    assert_int_equal(mkdir(tu_tmp_path("ro"), 0755), 0);
    size_t len;
    unsigned char *old = reference_image(path, &len);
    assert_int_equal(chmod(tu_tmp_path("ro"), 0555), 0);
    ref_set src;
    ref_source(&src);
    src.b.one[0] = 2.0f;
    char err[512];
    FILE *probe = fopen(tu_tmp_path("ro/probe"), "wb");
    if (!probe) {
        assert_int_equal(kfac_ckpt_save(path, FP, src.e, src.n, err, sizeof err), KFAC_ERR_IO);
        tu_assert_contains(err, strerror(EACCES));
    } else {
        /* Root ignores directory permissions: save from a child that has
         * dropped to "nobody" (the library is the same code either way). */
        fclose(probe);
        assert_int_equal(unlink(tu_tmp_path("ro/probe")), 0);
        assert_int_equal(chmod(tu_tmpdir(), 0755), 0); /* let nobody reach ro/ */
        fflush(NULL);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            if (setgid(65534) != 0 || setuid(65534) != 0)
                _exit(3);
            kfac_status st = kfac_ckpt_save(path, FP, src.e, src.n, err, sizeof err);
            _exit(st == KFAC_ERR_IO && strstr(err, strerror(EACCES)) ? 0 : 1);
        }
        int wst;
        assert_int_equal(waitpid(pid, &wst, 0), pid);
        if (WIFEXITED(wst) && WEXITSTATUS(wst) == 3) {
            free(old);
            skip(); /* cannot drop privileges here */
        }
        assert_true(WIFEXITED(wst) && WEXITSTATUS(wst) == 0);
    }
    assert_false(tu_exists(tu_tmp_path("ro/w.kfac.tmp")));
    size_t len2;
    unsigned char *now = tu_read_file(path, &len2);
    assert_int_equal(len2, len);
    assert_memory_equal(now, old, len);
    free(now); free(old);
}

/* ------------------------------------------------------------ refusals */

static void test_load_missing_file(void **state)
{
    (void)state;
    expect_load_refusal(tu_tmp_path("absent.kfac"), NULL, FP, KFAC_ERR_IO, "absent.kfac",
                        strerror(ENOENT));
    /* A directory is not a sidecar either. */
    expect_load_refusal(tu_tmpdir(), NULL, FP, KFAC_ERR_IO, "not a regular file", NULL);
}

static void test_refuse_magic_version(void **state)
{
    (void)state;
    size_t len;
    unsigned char *img = reference_image(tu_tmp_path("s"), &len);
    img[0] = 'X';
    expect_refusal(img, len, KFAC_ERR_FORMAT, "bad magic");
    img[0] = 'K';
    wr32(img + 8, KFAC_CKPT_VERSION + 1);
    fix_up(img, len); /* a genuine newer file has a valid checksum */
    expect_refusal(img, len, KFAC_ERR_FORMAT, "unsupported sidecar format version 2");
    /* Through the file reader the message also names the file. */
    tu_write_file(tu_tmp_path("s"), img, len);
    expect_load_refusal(tu_tmp_path("s"), NULL, FP, KFAC_ERR_FORMAT, tu_tmp_path("s"), "version");
    free(img);
}

static void test_refuse_truncated_every_length(void **state)
{
    (void)state;
    size_t len;
    unsigned char *img = reference_image(tu_tmp_path("s"), &len);
    for (size_t l = 0; l < len; l++)
        expect_refusal(img, l, KFAC_ERR_FORMAT, "truncated");
    /* And through the file reader, at a few lengths. */
    for (size_t l = 0; l < len; l += 37) {
        tu_write_file(tu_tmp_path("t"), img, l);
        expect_load_refusal(tu_tmp_path("t"), NULL, FP, KFAC_ERR_FORMAT, "truncated", NULL);
    }
    /* Trailing bytes are refused as well. */
    unsigned char *longer = malloc(len + 3);
    assert_non_null(longer);
    memcpy(longer, img, len);
    memset(longer + len, 0, 3);
    expect_refusal(longer, len + 3, KFAC_ERR_FORMAT, "trailing data");
    free(longer);
    free(img);
}

/* Every byte, flipped: the header fields read before the checksum give their
 * own message, anything else is a checksum mismatch. */
static void test_refuse_flipped_byte_anywhere(void **state)
{
    (void)state;
    size_t len;
    unsigned char *img = reference_image(tu_tmp_path("s"), &len);
    static const unsigned char masks[3] = {0x01, 0x80, 0xFF};
    for (size_t i = 0; i < len; i++)
        for (int m = 0; m < 3; m++) {
            img[i] ^= masks[m];
            const char *needle = i < 8 ? "bad magic"
                               : i < 12 ? "version"
                               : (i >= 16 && i < 24) ? "header says"
                               : "checksum mismatch";
            expect_refusal(img, len, KFAC_ERR_FORMAT, needle);
            img[i] ^= masks[m];
        }
    free(img);
}

static double g_extra[3];
static void alter_rename(kfac_ckpt_entry *e, int *n) { (void)n; e[1].name = "L0.G_inv"; }
static void alter_type(kfac_ckpt_entry *e, int *n) { (void)n; e[2].type = KFAC_CKPT_F64; }
static void alter_count(kfac_ckpt_entry *e, int *n) { (void)n; e[0].count = NF32 - 1; }
static void alter_missing(kfac_ckpt_entry *e, int *n)
{
    e[(*n)++] = (kfac_ckpt_entry){"L2.momentum", KFAC_CKPT_F64, 3, g_extra};
}
static void alter_extra(kfac_ckpt_entry *e, int *n)
{
    e[2] = e[*n - 1];
    (*n)--; /* "counters" no longer expected */
}

static void test_refuse_mismatch(void **state)
{
    (void)state;
    size_t len;
    free(reference_image(tu_tmp_path("s"), &len));
    const char *p = tu_tmp_path("s");
    const kfac_status F = KFAC_ERR_FORMAT;
    expect_load_refusal(p, NULL, "cfg=other.cfg", F,
                        "sidecar was written for a different cfg or layer shapes", "other.cfg");
    expect_load_refusal(p, NULL, FP "x", F, "different cfg or layer shapes", NULL);
    expect_load_refusal(p, alter_rename, FP, F, "'L0.G'", "does not expect");
    expect_load_refusal(p, alter_type, FP, F, "'counters'", "is i64, expected f64");
    expect_load_refusal(p, alter_count, FP, F, "'L0.A'", "has 7 elements, expected 6");
    expect_load_refusal(p, alter_missing, FP, F, "no entry 'L2.momentum'", NULL);
    expect_load_refusal(p, alter_extra, FP, F, "'counters'", "does not expect");
}

/* Files with a valid checksum whose structure is wrong: only a crafted or
 * buggy writer produces these, and the parser must still refuse them. */
static void test_refuse_forged_structure(void **state)
{
    (void)state;
    size_t len;
    unsigned char *ref = reference_image(tu_tmp_path("s"), &len);
    if (len < 64 || len > 4096) /* also tells gcc the edits below stay in bounds */
        abort();
    unsigned char *img = malloc(len + 16);
    assert_non_null(img);
    entry_pos e0 = find_entry(ref, 0), e1 = find_entry(ref, 1), e4 = find_entry(ref, 4);

#define FORGE(edit, needle)                                                   \
    do {                                                                      \
        memcpy(img, ref, len);                                                \
        size_t l = len;                                                       \
        edit;                                                                 \
        fix_up(img, l);                                                       \
        expect_refusal(img, l, KFAC_ERR_FORMAT, needle);                      \
    } while (0)

    FORGE(memcpy(img + e1.name_at, "L0.A", 4), "'L0.A' appears twice");
    FORGE(wr32(img + e0.type_at, 7), "unknown type code 7");
    FORGE(wr64(img + e0.count_at, (uint64_t)1 << 62), "more than the file holds");
    FORGE(wr64(img + e0.count_at, UINT64_MAX), "more than the file holds");
    FORGE(wr32(img + e0.name_len_at, 0), "name length 0");
    FORGE(wr32(img + e0.name_len_at, 0xFFFFFFFFu), "name length");
    FORGE(wr32(img + e4.name_len_at, 1000), "name length 1000");
    FORGE(wr32(img + 24, 0xFFFFFFF0u), "fingerprint length");
    FORGE(wr32(img + 12, 6), "cut short");
    FORGE(wr32(img + 12, 0xFFFFFFFFu), "cut short");
    FORGE(wr32(img + 12, 4), "unexpected bytes after the last entry");
    FORGE((memmove(img + len, img + len - 4, 4), memset(img + len - 4, 0, 4), l = len + 4),
          "4 unexpected bytes");
    /* A forged name with control bytes is shown sanitized. */
    FORGE(memcpy(img + e0.name_at, "\n\x01\x7f", 3), "'\?\?\?A'");
    /* Entry count 0: nothing parsed, the first expected entry is missing. */
    FORGE((wr32(img + 12, 0), memmove(img + e0.name_len_at, img + len - 4, 4),
           l = e0.name_len_at + 4), "no entry 'L0.A'");
#undef FORGE
    free(img);
    free(ref);
}

/* ------------------------------------------------------------ arguments */

static void test_arguments(void **state)
{
    (void)state;
    const char *path = tu_tmp_path("a");
    ref_set src;
    ref_source(&src);
    const kfac_ckpt_entry *e = src.e;
    const int n = src.n;
    char err[256];
    unsigned char dummy[32] = {0};

    assert_int_equal(kfac_ckpt_save(NULL, FP, e, n, err, sizeof err), KFAC_ERR_NULL);
    assert_int_equal(kfac_ckpt_save(path, NULL, e, n, err, sizeof err), KFAC_ERR_NULL);
    assert_int_equal(kfac_ckpt_save(path, FP, NULL, n, err, sizeof err), KFAC_ERR_NULL);
    assert_int_equal(kfac_ckpt_save(path, FP, e, -1, err, sizeof err), KFAC_ERR_INVALID_ARG);
    assert_int_equal(kfac_ckpt_load(NULL, FP, e, n, err, sizeof err), KFAC_ERR_NULL);
    assert_int_equal(kfac_ckpt_load_buffer(NULL, 0, FP, e, n, err, sizeof err), KFAC_ERR_NULL);
    assert_int_equal(kfac_ckpt_load_buffer(dummy, 0, NULL, e, n, err, sizeof err), KFAC_ERR_NULL);

    kfac_ckpt_entry bad[5];
    memcpy(bad, e, sizeof bad);
    bad[1].name = NULL;
    assert_int_equal(kfac_ckpt_save(path, FP, bad, n, err, sizeof err), KFAC_ERR_NULL);
    memcpy(bad, e, sizeof bad);
    bad[1].data = NULL;
    assert_int_equal(kfac_ckpt_save(path, FP, bad, n, err, sizeof err), KFAC_ERR_NULL);
    tu_assert_contains(err, "'L0.G'");
    memcpy(bad, e, sizeof bad);
    bad[1].name = "";
    assert_int_equal(kfac_ckpt_save(path, FP, bad, n, err, sizeof err), KFAC_ERR_INVALID_ARG);
    memcpy(bad, e, sizeof bad);
    bad[4].name = "L0.A";
    assert_int_equal(kfac_ckpt_save(path, FP, bad, n, err, sizeof err), KFAC_ERR_INVALID_ARG);
    tu_assert_contains(err, "used twice");
    assert_int_equal(kfac_ckpt_load_buffer(dummy, sizeof dummy, FP, bad, n, err, sizeof err),
                     KFAC_ERR_INVALID_ARG);
    memcpy(bad, e, sizeof bad);
    bad[2].type = (kfac_ckpt_type)9;
    assert_int_equal(kfac_ckpt_save(path, FP, bad, n, err, sizeof err), KFAC_ERR_INVALID_ARG);
    memcpy(bad, e, sizeof bad);
    bad[0].count = SIZE_MAX / 2;
    assert_int_equal(kfac_ckpt_save(path, FP, bad, n, err, sizeof err), KFAC_ERR_INVALID_ARG);
    char longname[KFAC_CKPT_MAX_NAME + 2];
    memset(longname, 'n', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    memcpy(bad, e, sizeof bad);
    bad[0].name = longname;
    assert_int_equal(kfac_ckpt_save(path, FP, bad, n, err, sizeof err), KFAC_ERR_INVALID_ARG);
    longname[KFAC_CKPT_MAX_NAME] = '\0'; /* exactly the limit is fine */
    assert_int_equal(kfac_ckpt_save(path, FP, bad, n, err, sizeof err), KFAC_OK);
    char *longfp = malloc(KFAC_CKPT_MAX_FINGERPRINT + 2);
    assert_non_null(longfp);
    memset(longfp, 'f', KFAC_CKPT_MAX_FINGERPRINT + 1);
    longfp[KFAC_CKPT_MAX_FINGERPRINT + 1] = '\0';
    assert_int_equal(kfac_ckpt_save(path, longfp, e, n, err, sizeof err), KFAC_ERR_INVALID_ARG);
    longfp[KFAC_CKPT_MAX_FINGERPRINT] = '\0';
    assert_int_equal(kfac_ckpt_save(path, longfp, e, n, err, sizeof err), KFAC_OK);
    assert_int_equal(kfac_ckpt_load(path, longfp, e, n, err, sizeof err), KFAC_OK);
    free(longfp);

    /* No file appears after refused arguments, and err may be NULL / tiny. */
    const char *p2 = tu_tmp_path("b");
    assert_int_equal(kfac_ckpt_save(p2, FP, e, -1, NULL, 0), KFAC_ERR_INVALID_ARG);
    char tiny[6];
    memset(tiny, 'x', sizeof tiny);
    assert_int_equal(kfac_ckpt_load(p2, FP, e, n, tiny, sizeof tiny), KFAC_ERR_IO);
    assert_int_equal(strlen(tiny), sizeof tiny - 1);
    assert_false(tu_exists(p2));
}

/* ------------------------------------------------------------ fuzz */

/* splitmix64 (kfac_naive.h): deterministic, good enough to pick mutations */
static naive_rng g_rng;
static uint64_t rnd(void) { return naive_rng_next(&g_rng); }
static size_t rnd_below(size_t n) { return n ? (size_t)(rnd() % n) : 0; }

#define FUZZ_INPUTS 100000
#define FUZZ_MAXLEN 2048

/* One random edit of img[0..*len) (capacity FUZZ_MAXLEN). */
static void mutate(unsigned char *img, size_t *len)
{
    static const uint64_t interesting[] = {0, 1, 2, 4, 7, 8, 0x7F, 0x80, 0xFF, 0x100,
                                           0xFFFF, 0x7FFFFFFF, 0x80000000u, 0xFFFFFFFFu,
                                           (uint64_t)1 << 32, (uint64_t)1 << 61,
                                           (uint64_t)1 << 62, INT64_MAX, UINT64_MAX};
    size_t l = *len;
    switch (rnd_below(8)) {
    case 0: /* bit flip */
        if (l)
            img[rnd_below(l)] ^= (unsigned char)(1u << rnd_below(8));
        break;
    case 1: /* random byte */
        if (l)
            img[rnd_below(l)] = (unsigned char)rnd();
        break;
    case 2: /* truncate */
        l = rnd_below(l + 1);
        break;
    case 3: { /* insert 1..16 random bytes */
        size_t k = 1 + rnd_below(16), at = rnd_below(l + 1);
        if (l + k > FUZZ_MAXLEN)
            break;
        memmove(img + at + k, img + at, l - at);
        for (size_t i = 0; i < k; i++)
            img[at + i] = (unsigned char)rnd();
        l += k;
        break;
    }
    case 4: { /* delete a range */
        if (!l)
            break;
        size_t at = rnd_below(l), k = 1 + rnd_below(l - at < 16 ? l - at : 16);
        memmove(img + at, img + at + k, l - at - k);
        l -= k;
        break;
    }
    case 5: /* interesting 32-bit value (length, type, count fields) */
        if (l >= 4)
            wr32(img + rnd_below(l - 3), (uint32_t)interesting[rnd_below(19)]);
        break;
    case 6: /* interesting 64-bit value */
        if (l >= 8)
            wr64(img + rnd_below(l - 7), interesting[rnd_below(19)]);
        break;
    default: { /* copy a chunk over another place (duplicated entries) */
        if (l < 2)
            break;
        size_t from = rnd_below(l), to = rnd_below(l), k = 1 + rnd_below(32);
        if (k > l - from) k = l - from;
        if (k > l - to) k = l - to;
        memmove(img + to, img + from, k);
        break;
    }
    }
    *len = l;
}

static void test_fuzz_reader(void **state)
{
    (void)state;
    /* Seeds: the reference file, one with other entry order, and files that
     * differ from what the caller expects (fingerprint, entry set). */
    unsigned char *seeds[5];
    size_t seed_len[5];
    seeds[0] = reference_image(tu_tmp_path("s0"), &seed_len[0]);
    {
        ref_set src;
        ref_source(&src);
        kfac_ckpt_entry *e = src.e, r[6];
        int n = src.n;
        char err[256];
        for (int i = 0; i < n; i++)
            r[i] = e[(i + 2) % n];
        assert_int_equal(kfac_ckpt_save(tu_tmp_path("s1"), FP, r, n, err, sizeof err), KFAC_OK);
        assert_int_equal(kfac_ckpt_save(tu_tmp_path("s2"), "other", e, n, err, sizeof err),
                         KFAC_OK);
        alter_missing(e, &n);
        assert_int_equal(kfac_ckpt_save(tu_tmp_path("s3"), FP, e, n, err, sizeof err), KFAC_OK);
        n = make_entries(e, &src.b);
        e[4].count = 0;
        assert_int_equal(kfac_ckpt_save(tu_tmp_path("s4"), FP, e, n, err, sizeof err), KFAC_OK);
        for (int i = 1; i < 5; i++) {
            char name[4] = {'s', (char)('0' + i), 0, 0};
            seeds[i] = tu_read_file(tu_tmp_path(name), &seed_len[i]);
        }
    }

    naive_rng_seed(&g_rng, 0x6B666163ull); /* "kfac" */
    unsigned char *work = malloc(FUZZ_MAXLEN);
    assert_non_null(work);
    size_t ok = 0, deep = 0, refused = 0, fixed = 0;
    ref_set dst;
    ref_sentinel(&dst);
    for (int it = 0; it < FUZZ_INPUTS; it++) {
        int s = (int)rnd_below(5);
        size_t len = seed_len[s];
        memcpy(work, seeds[s], len);
        int edits = 1 + (int)rnd_below(4);
        for (int k = 0; k < edits; k++)
            mutate(work, &len);
        int fix = (int)(rnd() & 1);
        if (fix) {
            fix_up(work, len);
            fixed++;
        }
        /* Exact-size heap copy: any over-read is an ASan report. */
        unsigned char *in = malloc(len ? len : 1);
        assert_non_null(in);
        memcpy(in, work, len);
        fill_sentinel(&dst.b);
        char err[160];
        size_t errlen = (it % 7 == 0) ? 1 + rnd_below(24) : sizeof err;
        memset(err, 'Z', sizeof err);
        kfac_status st = kfac_ckpt_load_buffer(in, len, FP, dst.e, dst.n, err, errlen);
        free(in);
        assert_true(memchr(err, '\0', errlen) != NULL);
        if (st == KFAC_OK) {
            ok++;
            continue;
        }
        if (st != KFAC_ERR_FORMAT) {
            print_error("input %d: status %d (%s)\n", it, (int)st, err);
            fail();
        }
        refused++;
        if (errlen > 1 && err[0] == '\0') {
            print_error("input %d: empty message\n", it);
            fail();
        }
        if (errlen == sizeof err && !strstr(err, "checksum") && !strstr(err, "truncated") &&
            !strstr(err, "magic") && !strstr(err, "version") && !strstr(err, "trailing"))
            deep++; /* refused by the parser behind the checksum */
        if (!is_sentinel(&dst.b)) {
            print_error("input %d: refused (%s) but caller buffers were written\n", it, err);
            fail();
        }
    }
    print_message("fuzz: %d inputs (%zu with checksum recomputed): %zu accepted, %zu refused, "
                  "%zu of them past the checksum\n", FUZZ_INPUTS, fixed, ok, refused, deep);
    /* The recomputed checksums must actually reach the structural checks. */
    assert_true(deep > FUZZ_INPUTS / 10);
    assert_true(ok > 0);
    free(work);
    for (int i = 0; i < 5; i++)
        free(seeds[i]);
}

/* Every test but the first runs in a fresh temporary directory of its own
 * (tu_tmp_path), removed after it. */
#define IN_TMPDIR(f) cmocka_unit_test_prestate_setup_teardown(f, tu_tmpdir_setup, \
                                                               tu_tmpdir_teardown, "kfac_ckpt")

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc_reference),
        IN_TMPDIR(test_round_trip_bit_exact),
        IN_TMPDIR(test_layout),
        IN_TMPDIR(test_empty_container),
        IN_TMPDIR(test_round_trip_large),
        IN_TMPDIR(test_save_replaces_and_ignores_stale_tmp),
        IN_TMPDIR(test_save_into_missing_dir),
        IN_TMPDIR(test_save_failure_keeps_old_file),
        IN_TMPDIR(test_save_rename_failure),
        IN_TMPDIR(test_save_readonly_dir),
        IN_TMPDIR(test_load_missing_file),
        IN_TMPDIR(test_refuse_magic_version),
        IN_TMPDIR(test_refuse_truncated_every_length),
        IN_TMPDIR(test_refuse_flipped_byte_anywhere),
        IN_TMPDIR(test_refuse_mismatch),
        IN_TMPDIR(test_refuse_forged_structure),
        IN_TMPDIR(test_arguments),
        IN_TMPDIR(test_fuzz_reader),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
