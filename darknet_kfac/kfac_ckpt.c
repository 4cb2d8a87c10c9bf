/*
 * Checkpoint sidecars: a small container of named typed arrays that holds the
 * optimizer's state next to a Darknet weights backup. The reader is the part
 * that matters: a sidecar may be truncated by a full disk, corrupted, or left
 * over from another cfg, and each of those must be refused with a message
 * rather than crash or half-restore the state. So the reader trusts no length
 * in the file, checks the whole image before writing any caller buffer, and
 * matches entries by name, type and count rather than by position.
 *
 * File layout (all integers little-endian, fixed width):
 *   0   8  magic "KFACCKPT"
 *   8   4  format version (KFAC_CKPT_VERSION)
 *   12  4  number of entries
 *   16  8  total file length in bytes, trailer included
 *   24  4  fingerprint length F, then F bytes (no NUL)
 *       per entry: 4 name length L, L name bytes (no NUL), 4 type code,
 *                  8 element count, count * element size data bytes
 *   end 4  CRC-32 (IEEE 802.3, as zlib) of every byte before it
 * The magic, version and length come first and are checked before the
 * checksum so that a foreign, newer or truncated file gets a precise message
 * instead of a generic "checksum mismatch".
 */
#include "kfac_ckpt_format.h"
#include "kfac_alloc.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

void kfac_ck_set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* ------------------------------------------------------------------ CRC-32 */

/* Table-driven, reflected polynomial 0xEDB88320. The table lives in the
 * context (1 KiB on the stack, 2k operations to build) rather than in a
 * lazily initialised static so the functions stay reentrant. CRC-32 detects
 * every error burst up to 32 bits, so a flipped byte is always caught. */

void kfac_ck_crc32_init(crc32_ctx *c)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t r = i;
        for (int k = 0; k < 8; k++)
            r = (r & 1u) ? (r >> 1) ^ 0xEDB88320u : r >> 1;
        c->table[i] = r;
    }
    c->crc = 0xFFFFFFFFu;
}

void kfac_ck_crc32_update(crc32_ctx *c, const unsigned char *p, size_t n)
{
    uint32_t r = c->crc;
    for (size_t i = 0; i < n; i++)
        r = c->table[(r ^ p[i]) & 0xFFu] ^ (r >> 8);
    c->crc = r;
}

uint32_t kfac_ck_crc32_final(const crc32_ctx *c)
{
    return c->crc ^ 0xFFFFFFFFu;
}

/* ---------------------------------------------------- little-endian coding */

void kfac_ck_put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

void kfac_ck_put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

uint32_t kfac_ck_get_u32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

uint64_t kfac_ck_get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* Bytes per element; 0 for a type code that does not exist (the file's type
 * field is untrusted, and so is a caller's enum value). */
size_t kfac_ck_elem_size(uint32_t type)
{
    switch (type) {
    case KFAC_CKPT_F32: return 4;
    case KFAC_CKPT_F64: return 8;
    case KFAC_CKPT_I64: return 8;
    default: return 0;
    }
}

const char *kfac_ck_type_name(uint32_t type)
{
    switch (type) {
    case KFAC_CKPT_F32: return "f32";
    case KFAC_CKPT_F64: return "f64";
    case KFAC_CKPT_I64: return "i64";
    default: return "?";
    }
}

/* A name or fingerprint read from the file goes into a message: cut it short
 * and replace bytes that are not kfac_ck_printable ASCII, so a corrupt file cannot
 * put control characters or an unterminated string into the caller's log. */
void kfac_ck_printable(const unsigned char *s, size_t n, char *out, size_t outlen)
{
    size_t cap = outlen - 1, j = 0;
    int cut = n > cap;
    if (cut && cap >= 3)
        cap -= 3;
    for (size_t i = 0; i < n && j < cap; i++)
        out[j++] = (s[i] >= 0x20 && s[i] < 0x7f) ? (char)s[i] : '?';
    if (cut && outlen - 1 >= 3)
        for (int k = 0; k < 3; k++)
            out[j++] = '.';
    out[j] = '\0';
}

/* ------------------------------------------------- caller-side validation */

/* Everything about the caller's arguments that does not depend on the file,
 * checked before any file is opened so argument mistakes never touch disk. */
kfac_status kfac_ck_check_args(const char *fingerprint, const kfac_ckpt_entry *e, int n,
                              char *err, size_t errlen)
{
    if (!fingerprint) {
        kfac_ck_set_err(err, errlen, "checkpoint: fingerprint is NULL");
        return KFAC_ERR_NULL;
    }
    if (n < 0) {
        kfac_ck_set_err(err, errlen, "checkpoint: negative entry count %d", n);
        return KFAC_ERR_INVALID_ARG;
    }
    if (n > 0 && !e) {
        kfac_ck_set_err(err, errlen, "checkpoint: entry array is NULL");
        return KFAC_ERR_NULL;
    }
    if (strlen(fingerprint) > KFAC_CKPT_MAX_FINGERPRINT) {
        kfac_ck_set_err(err, errlen, "checkpoint: fingerprint longer than %d bytes",
                KFAC_CKPT_MAX_FINGERPRINT);
        return KFAC_ERR_INVALID_ARG;
    }
    for (int i = 0; i < n; i++) {
        if (!e[i].name) {
            kfac_ck_set_err(err, errlen, "checkpoint: entry %d has a NULL name", i);
            return KFAC_ERR_NULL;
        }
        size_t len = strlen(e[i].name);
        if (len == 0 || len > KFAC_CKPT_MAX_NAME) {
            kfac_ck_set_err(err, errlen, "checkpoint: entry %d: name must be 1..%d bytes", i,
                    KFAC_CKPT_MAX_NAME);
            return KFAC_ERR_INVALID_ARG;
        }
        size_t esz = kfac_ck_elem_size((uint32_t)e[i].type);
        if (esz == 0) {
            kfac_ck_set_err(err, errlen, "checkpoint: entry '%s': unknown type %d", e[i].name,
                    (int)e[i].type);
            return KFAC_ERR_INVALID_ARG;
        }
        /* The byte size must fit both size_t (for pointer arithmetic) and the
         * file's 64-bit length field. */
        if (e[i].count > SIZE_MAX / esz || (uint64_t)e[i].count > UINT64_MAX / 16 / esz) {
            kfac_ck_set_err(err, errlen, "checkpoint: entry '%s': %zu elements is too many",
                    e[i].name, e[i].count);
            return KFAC_ERR_INVALID_ARG;
        }
        if (e[i].count > 0 && !e[i].data) {
            kfac_ck_set_err(err, errlen, "checkpoint: entry '%s' has NULL data", e[i].name);
            return KFAC_ERR_NULL;
        }
        /* Quadratic, but n is a few entries per layer: hundreds at most. */
        for (int j = 0; j < i; j++)
            if (strcmp(e[j].name, e[i].name) == 0) {
                kfac_ck_set_err(err, errlen, "checkpoint: entry name '%s' used twice", e[i].name);
                return KFAC_ERR_INVALID_ARG;
            }
    }
    return KFAC_OK;
}

/* ------------------------------------------------------------------ writer */

typedef struct {
    FILE *f;
    crc32_ctx crc;
    int err_no; /* first failing errno, 0 while all is well */
} writer;

static void w_bytes(writer *w, const void *p, size_t n)
{
    if (w->err_no || n == 0)
        return;
    kfac_ck_crc32_update(&w->crc, p, n);
    errno = 0;
    if (fwrite(p, 1, n, w->f) != n)
        w->err_no = errno ? errno : EIO;
}

static void w_u32(writer *w, uint32_t v)
{
    unsigned char b[4];
    kfac_ck_put_u32(b, v);
    w_bytes(w, b, 4);
}

static void w_u64(writer *w, uint64_t v)
{
    unsigned char b[8];
    kfac_ck_put_u64(b, v);
    w_bytes(w, b, 8);
}

/* Data goes through a fixed chunk so the encoding is little-endian on any
 * host without allocating a copy of arrays that may be hundreds of MB. */
static void w_data(writer *w, const kfac_ckpt_entry *e)
{
    unsigned char chunk[4096];
    size_t esz = kfac_ck_elem_size((uint32_t)e->type), per = sizeof chunk / esz;
    for (size_t i = 0; i < e->count && !w->err_no; i += per) {
        size_t m = e->count - i < per ? e->count - i : per;
        for (size_t j = 0; j < m; j++) {
            if (esz == 4) {
                uint32_t v;
                memcpy(&v, (const unsigned char *)e->data + (i + j) * 4, 4);
                kfac_ck_put_u32(chunk + j * 4, v);
            } else {
                uint64_t v;
                memcpy(&v, (const unsigned char *)e->data + (i + j) * 8, 8);
                kfac_ck_put_u64(chunk + j * 8, v);
            }
        }
        w_bytes(w, chunk, m * esz);
    }
}

/* fsync of the directory makes the rename itself durable. Best effort: some
 * filesystems refuse it, and the data is already safe in the renamed file. */
static void sync_dir(char *buf, const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash) {
        strcpy(buf, ".");
    } else if (slash == path) {
        strcpy(buf, "/");
    } else {
        memcpy(buf, path, (size_t)(slash - path));
        buf[slash - path] = '\0';
    }
    int fd = open(buf, O_RDONLY);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
}

kfac_status kfac_ckpt_save(const char *path, const char *fingerprint,
                           const kfac_ckpt_entry *e, int n, char *err, size_t errlen)
{
    kfac_status st;
    char *tmp = NULL;
    writer w;
    w.f = NULL;
    w.err_no = 0;
    int created = 0, renaming = 0;

    if (!path) {
        kfac_ck_set_err(err, errlen, "checkpoint: path is NULL");
        return KFAC_ERR_NULL;
    }
    st = kfac_ck_check_args(fingerprint, e, n, err, errlen);
    if (st != KFAC_OK)
        return st;

    /* Total length, written into the header so the reader can tell a
     * truncated file from a corrupt one. kfac_ck_check_args bounded each entry to
     * UINT64_MAX/16 bytes, so only the sum needs checking. */
    size_t fplen = strlen(fingerprint);
    uint64_t total = CKPT_HDR_LEN + 4 + (uint64_t)fplen + CKPT_CRC_LEN;
    for (int i = 0; i < n; i++) {
        uint64_t bytes = 4 + (uint64_t)strlen(e[i].name) + 4 + 8 +
                         (uint64_t)e[i].count * kfac_ck_elem_size((uint32_t)e[i].type);
        if (total > UINT64_MAX - bytes) {
            kfac_ck_set_err(err, errlen, "checkpoint: entries too large for one file");
            return KFAC_ERR_INVALID_ARG;
        }
        total += bytes;
    }

    size_t plen = strlen(path);
    st = KFAC_ERR_IO; /* until the rename has succeeded */
    tmp = KFAC_MALLOC(plen + 5);
    if (!tmp) {
        kfac_ck_set_err(err, errlen, "checkpoint: out of memory");
        st = KFAC_ERR_NOMEM;
        goto fail;
    }
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);

    w.f = fopen(tmp, "wb");
    if (!w.f) {
        w.err_no = errno ? errno : EIO;
        goto fail;
    }
    created = 1;
    kfac_ck_crc32_init(&w.crc);

    unsigned char hdr[CKPT_HDR_LEN];
    memcpy(hdr, CKPT_MAGIC, CKPT_MAGIC_LEN);
    kfac_ck_put_u32(hdr + 8, KFAC_CKPT_VERSION);
    kfac_ck_put_u32(hdr + 12, (uint32_t)n);
    kfac_ck_put_u64(hdr + 16, total);
    w_bytes(&w, hdr, sizeof hdr);
    w_u32(&w, (uint32_t)fplen);
    w_bytes(&w, fingerprint, fplen);
    for (int i = 0; i < n && !w.err_no; i++) {
        size_t nl = strlen(e[i].name);
        w_u32(&w, (uint32_t)nl);
        w_bytes(&w, e[i].name, nl);
        w_u32(&w, (uint32_t)e[i].type);
        w_u64(&w, (uint64_t)e[i].count);
        w_data(&w, &e[i]);
    }
    if (!w.err_no) {
        /* The trailer is not part of its own checksum: write it directly. */
        unsigned char c[4];
        kfac_ck_put_u32(c, kfac_ck_crc32_final(&w.crc));
        errno = 0;
        if (fwrite(c, 1, 4, w.f) != 4)
            w.err_no = errno ? errno : EIO;
    }
    /* Buffered write errors (ENOSPC, EFBIG) surface only at flush/close.
     * fsync before rename: otherwise a crash soon after could leave the new
     * name pointing at a file whose blocks never reached the disk. */
    if (!w.err_no && fflush(w.f) != 0)
        w.err_no = errno ? errno : EIO;
    if (!w.err_no && fsync(fileno(w.f)) != 0 && errno != EINVAL && errno != EROFS)
        w.err_no = errno;
    {
        FILE *f = w.f;
        w.f = NULL;
        if (fclose(f) != 0 && !w.err_no)
            w.err_no = errno ? errno : EIO;
    }
    if (w.err_no)
        goto fail;
    if (rename(tmp, path) != 0) {
        w.err_no = errno ? errno : EIO;
        renaming = 1;
        goto fail;
    }
    created = 0;
    sync_dir(tmp, path); /* tmp's buffer is long enough for the directory */
    kfac_ck_set_err(err, errlen, "%s", "");
    st = KFAC_OK;

fail:
    if (st != KFAC_OK && w.err_no) {
        st = KFAC_ERR_IO;
        if (renaming)
            kfac_ck_set_err(err, errlen, "cannot rename '%s' to '%s': %s", tmp, path,
                    strerror(w.err_no));
        else
            kfac_ck_set_err(err, errlen, "cannot write sidecar '%s': %s", tmp, strerror(w.err_no));
    }
    if (w.f)
        fclose(w.f);
    if (created)
        unlink(tmp); /* only a tmp file we made: never someone else's */
    KFAC_FREE(tmp);
    return st;
}

