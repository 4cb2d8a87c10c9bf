/*
 * Checkpoint container, reader: validates a whole sidecar image before it
 * writes any caller buffer (all-or-nothing), trusting no length in the file,
 * and matches entries by name, type and count. kfac_ckpt_fingerprint reads
 * just the stored fingerprint, so a caller can say how a refused sidecar
 * differs from what it expected.
 */
#include "kfac_ckpt_format.h"
#include "kfac_alloc.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------ reader */

/* Validates the image p[0..len) against the caller's entries and, only when
 * all of it is good, copies the arrays out. where[i] records the offset of
 * e[i]'s data found in the first pass; offset 0 cannot hold data (it is the
 * magic), so 0 means "not seen yet". */
static kfac_status parse(const unsigned char *p, size_t len, const char *fingerprint,
                         const kfac_ckpt_entry *e, int n, char *err, size_t errlen)
{
    kfac_status st = KFAC_ERR_FORMAT;
    size_t *where = NULL;
    char shown[80], shown2[80];

    if (len < CKPT_MAGIC_LEN) {
        kfac_ck_set_err(err, errlen, "truncated sidecar: %zu bytes, too short for a header", len);
        return KFAC_ERR_FORMAT;
    }
    if (memcmp(p, CKPT_MAGIC, CKPT_MAGIC_LEN) != 0) {
        kfac_ck_set_err(err, errlen, "not a K-FAC sidecar (bad magic)");
        return KFAC_ERR_FORMAT;
    }
    if (len < CKPT_HDR_LEN) {
        kfac_ck_set_err(err, errlen, "truncated sidecar: %zu bytes, too short for a header", len);
        return KFAC_ERR_FORMAT;
    }
    uint32_t version = kfac_ck_get_u32(p + 8);
    if (version != KFAC_CKPT_VERSION) {
        kfac_ck_set_err(err, errlen, "unsupported sidecar format version %u (this build reads %u)",
                (unsigned)version, (unsigned)KFAC_CKPT_VERSION);
        return KFAC_ERR_FORMAT;
    }
    uint64_t stated = kfac_ck_get_u64(p + 16);
    if (stated != (uint64_t)len) {
        kfac_ck_set_err(err, errlen, "%s sidecar: header says %llu bytes, found %zu",
                stated > (uint64_t)len ? "truncated" : "trailing data in",
                (unsigned long long)stated, len);
        return KFAC_ERR_FORMAT;
    }
    if (len < CKPT_MIN_LEN) {
        kfac_ck_set_err(err, errlen, "truncated sidecar: %zu bytes, too short for a header", len);
        return KFAC_ERR_FORMAT;
    }
    {
        crc32_ctx c;
        kfac_ck_crc32_init(&c);
        kfac_ck_crc32_update(&c, p, len - CKPT_CRC_LEN);
        if (kfac_ck_crc32_final(&c) != kfac_ck_get_u32(p + len - CKPT_CRC_LEN)) {
            kfac_ck_set_err(err, errlen, "sidecar checksum mismatch (file is corrupted)");
            return KFAC_ERR_FORMAT;
        }
    }

    /* From here on the bytes are what the writer wrote, unless the file was
     * crafted; the structure is still checked as if it were hostile. Every
     * length is compared against what remains (end - pos) before use, so no
     * addition or multiplication below can overflow. */
    const size_t end = len - CKPT_CRC_LEN;
    size_t pos = CKPT_HDR_LEN;
    uint32_t nfile = kfac_ck_get_u32(p + 12);

    uint32_t fplen = kfac_ck_get_u32(p + pos);
    pos += 4;
    if (fplen > KFAC_CKPT_MAX_FINGERPRINT || fplen > end - pos) {
        kfac_ck_set_err(err, errlen, "malformed sidecar: fingerprint length %u out of range",
                (unsigned)fplen);
        return KFAC_ERR_FORMAT;
    }
    if (fplen != strlen(fingerprint) || memcmp(p + pos, fingerprint, fplen) != 0) {
        kfac_ck_printable(p + pos, fplen, shown, sizeof shown);
        kfac_ck_printable((const unsigned char *)fingerprint, strlen(fingerprint), shown2,
                  sizeof shown2);
        kfac_ck_set_err(err, errlen,
                "sidecar was written for a different cfg or layer shapes "
                "(sidecar fingerprint \"%s\", current \"%s\")", shown, shown2);
        return KFAC_ERR_FORMAT;
    }
    pos += fplen;

    where = KFAC_CALLOC(n > 0 ? (size_t)n : 1, sizeof *where);
    if (!where) {
        kfac_ck_set_err(err, errlen, "checkpoint: out of memory");
        st = KFAC_ERR_NOMEM;
        goto fail;
    }

    for (uint32_t k = 0; k < nfile; k++) {
        if (end - pos < 4) {
            kfac_ck_set_err(err, errlen, "malformed sidecar: entry %u of %u cut short",
                    (unsigned)k, (unsigned)nfile);
            goto fail;
        }
        uint32_t nl = kfac_ck_get_u32(p + pos);
        pos += 4;
        if (nl == 0 || nl > KFAC_CKPT_MAX_NAME || nl > end - pos) {
            kfac_ck_set_err(err, errlen, "malformed sidecar: entry %u name length %u out of range",
                    (unsigned)k, (unsigned)nl);
            goto fail;
        }
        const unsigned char *name = p + pos;
        pos += nl;
        kfac_ck_printable(name, nl, shown, sizeof shown);
        if (end - pos < 12) {
            kfac_ck_set_err(err, errlen, "malformed sidecar: entry '%s' cut short", shown);
            goto fail;
        }
        uint32_t type = kfac_ck_get_u32(p + pos);
        uint64_t count = kfac_ck_get_u64(p + pos + 4);
        pos += 12;
        size_t esz = kfac_ck_elem_size(type);
        if (esz == 0) {
            kfac_ck_set_err(err, errlen, "malformed sidecar: entry '%s' has unknown type code %u",
                    shown, (unsigned)type);
            goto fail;
        }
        if (count > (uint64_t)((end - pos) / esz)) {
            kfac_ck_set_err(err, errlen,
                    "malformed sidecar: entry '%s' claims %llu elements, more than the file holds",
                    shown, (unsigned long long)count);
            goto fail;
        }
        int i;
        for (i = 0; i < n; i++)
            if (strlen(e[i].name) == nl && memcmp(e[i].name, name, nl) == 0)
                break;
        if (i == n) {
            kfac_ck_set_err(err, errlen, "sidecar has an entry '%s' this network does not expect "
                    "(different cfg or layer shapes?)", shown);
            goto fail;
        }
        if (where[i]) {
            kfac_ck_set_err(err, errlen, "malformed sidecar: entry '%s' appears twice", shown);
            goto fail;
        }
        if (type != (uint32_t)e[i].type) {
            kfac_ck_set_err(err, errlen, "sidecar entry '%s' is %s, expected %s", shown,
                    kfac_ck_type_name(type), kfac_ck_type_name((uint32_t)e[i].type));
            goto fail;
        }
        if (count != (uint64_t)e[i].count) {
            kfac_ck_set_err(err, errlen, "sidecar entry '%s' has %llu elements, expected %zu "
                    "(different cfg or layer shapes?)", shown,
                    (unsigned long long)count, e[i].count);
            goto fail;
        }
        where[i] = pos;
        pos += (size_t)count * esz;
    }
    if (pos != end) {
        kfac_ck_set_err(err, errlen, "malformed sidecar: %zu unexpected bytes after the last entry",
                end - pos);
        goto fail;
    }
    for (int i = 0; i < n; i++)
        if (!where[i]) {
            kfac_ck_set_err(err, errlen, "sidecar has no entry '%s' (different cfg or layer shapes?)",
                    e[i].name);
            goto fail;
        }

    /* Everything checked: only now touch the caller's buffers. */
    for (int i = 0; i < n; i++) {
        const unsigned char *src = p + where[i];
        unsigned char *dst = e[i].data;
        if (kfac_ck_elem_size((uint32_t)e[i].type) == 4) {
            for (size_t j = 0; j < e[i].count; j++) {
                uint32_t v = kfac_ck_get_u32(src + 4 * j);
                memcpy(dst + 4 * j, &v, 4);
            }
        } else {
            for (size_t j = 0; j < e[i].count; j++) {
                uint64_t v = kfac_ck_get_u64(src + 8 * j);
                memcpy(dst + 8 * j, &v, 8);
            }
        }
    }
    kfac_ck_set_err(err, errlen, "%s", "");
    st = KFAC_OK;
fail:
    KFAC_FREE(where);
    return st;
}

kfac_status kfac_ckpt_load_buffer(const void *buf, size_t len, const char *fingerprint,
                                  const kfac_ckpt_entry *e, int n, char *err, size_t errlen)
{
    if (!buf) {
        kfac_ck_set_err(err, errlen, "checkpoint: buffer is NULL");
        return KFAC_ERR_NULL;
    }
    kfac_status st = kfac_ck_check_args(fingerprint, e, n, err, errlen);
    if (st != KFAC_OK)
        return st;
    return parse(buf, len, fingerprint, e, n, err, errlen);
}

kfac_status kfac_ckpt_load(const char *path, const char *fingerprint,
                           const kfac_ckpt_entry *e, int n, char *err, size_t errlen)
{
    kfac_status st;
    unsigned char *img = NULL;
    int fd = -1;
    char msg[512];

    if (!path) {
        kfac_ck_set_err(err, errlen, "checkpoint: path is NULL");
        return KFAC_ERR_NULL;
    }
    st = kfac_ck_check_args(fingerprint, e, n, err, errlen);
    if (st != KFAC_OK)
        return st;

    fd = open(path, O_RDONLY);
    if (fd < 0) {
        kfac_ck_set_err(err, errlen, "cannot open sidecar '%s': %s", path, strerror(errno));
        st = KFAC_ERR_IO;
        goto fail;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        kfac_ck_set_err(err, errlen, "cannot stat sidecar '%s': %s", path, strerror(errno));
        st = KFAC_ERR_IO;
        goto fail;
    }
    if (!S_ISREG(sb.st_mode)) {
        kfac_ck_set_err(err, errlen, "sidecar '%s' is not a regular file", path);
        st = KFAC_ERR_IO;
        goto fail;
    }
    if (sb.st_size < 0 || (uint64_t)sb.st_size >= SIZE_MAX) {
        kfac_ck_set_err(err, errlen, "sidecar '%s' is too large to load", path);
        st = KFAC_ERR_FORMAT;
        goto fail;
    }
    /* Read exactly what fstat promised; a file that shrank meanwhile is
     * parsed as the shorter image and refused as truncated. */
    size_t want = (size_t)sb.st_size, got = 0;
    img = KFAC_MALLOC(want ? want : 1);
    if (!img) {
        kfac_ck_set_err(err, errlen, "cannot load sidecar '%s': out of memory (%zu bytes)", path, want);
        st = KFAC_ERR_NOMEM;
        goto fail;
    }
    while (got < want) {
        ssize_t r = read(fd, img + got, want - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            kfac_ck_set_err(err, errlen, "cannot read sidecar '%s': %s", path, strerror(errno));
            st = KFAC_ERR_IO;
            goto fail;
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    st = parse(img, got, fingerprint, e, n, msg, sizeof msg);
    if (st != KFAC_OK)
        kfac_ck_set_err(err, errlen, "%s: %s", path, msg);
    else
        kfac_ck_set_err(err, errlen, "%s", "");
fail:
    if (fd >= 0)
        close(fd);
    KFAC_FREE(img);
    return st;
}

kfac_status kfac_ckpt_fingerprint(const char *path, char *out, size_t outlen, char *err,
                                  size_t errlen)
{
    unsigned char hdr[CKPT_HDR_LEN + 4];
    if (!path || !out || !outlen) {
        kfac_ck_set_err(err, errlen, "checkpoint: NULL path or output");
        return KFAC_ERR_NULL;
    }
    out[0] = '\0';
    FILE *f = fopen(path, "rb");
    if (!f) {
        kfac_ck_set_err(err, errlen, "cannot open sidecar '%s': %s", path, strerror(errno));
        return KFAC_ERR_IO;
    }
    kfac_status st = KFAC_ERR_FORMAT;
    uint32_t fplen = 0;
    if (fread(hdr, 1, sizeof hdr, f) != sizeof hdr ||
        memcmp(hdr, CKPT_MAGIC, CKPT_MAGIC_LEN) != 0 ||
        kfac_ck_get_u32(hdr + 8) != KFAC_CKPT_VERSION ||
        (fplen = kfac_ck_get_u32(hdr + CKPT_HDR_LEN)) > KFAC_CKPT_MAX_FINGERPRINT) {
        kfac_ck_set_err(err, errlen, "'%s' has no readable sidecar header", path);
        goto out;
    }
    unsigned char fp[KFAC_CKPT_MAX_FINGERPRINT];
    if (fread(fp, 1, fplen, f) != fplen) {
        kfac_ck_set_err(err, errlen, "truncated sidecar '%s'", path);
        goto out;
    }
    /* unchecked by the CRC: good for messages, not for trusting */
    kfac_ck_printable(fp, fplen, out, outlen);
    st = KFAC_OK;
out:
    fclose(f);
    return st;
}
