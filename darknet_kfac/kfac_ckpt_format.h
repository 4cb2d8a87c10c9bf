/*
 * The checkpoint container's format, shared by its writer (kfac_ckpt.c) and
 * its reader (kfac_ckpt_read.c); internal. The layout is documented at the
 * top of kfac_ckpt.c.
 */
#ifndef KFAC_CKPT_FORMAT_H
#define KFAC_CKPT_FORMAT_H

#include "kfac.h"

#include <stddef.h>
#include <stdint.h>

#define CKPT_MAGIC     "KFACCKPT"
#define CKPT_MAGIC_LEN 8
#define CKPT_HDR_LEN   24 /* magic, version, entry count, length */
#define CKPT_CRC_LEN   4
#define CKPT_MIN_LEN   (CKPT_HDR_LEN + 4 + CKPT_CRC_LEN) /* empty fingerprint, no entries */

void kfac_ck_set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

typedef struct {
    uint32_t table[256];
    uint32_t crc;
} crc32_ctx;
void kfac_ck_crc32_init(crc32_ctx *c);
void kfac_ck_crc32_update(crc32_ctx *c, const unsigned char *p, size_t n);
uint32_t kfac_ck_crc32_final(const crc32_ctx *c);

void kfac_ck_put_u32(unsigned char *p, uint32_t v);
void kfac_ck_put_u64(unsigned char *p, uint64_t v);
uint32_t kfac_ck_get_u32(const unsigned char *p);
uint64_t kfac_ck_get_u64(const unsigned char *p);
/* bytes per element, 0 for an unknown type code */
size_t kfac_ck_elem_size(uint32_t type);
const char *kfac_ck_type_name(uint32_t type);
/* s[0..n) cut to outlen with "..." and non-printable bytes as '?' */
void kfac_ck_printable(const unsigned char *s, size_t n, char *out, size_t outlen);
/* the caller's arguments, checked before any file is touched */
kfac_status kfac_ck_check_args(const char *fingerprint, const kfac_ckpt_entry *e, int n,
                               char *err, size_t errlen);

#endif /* KFAC_CKPT_FORMAT_H */
