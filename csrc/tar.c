/* tar.c - decoding of tar headers for layer.c: ustar and GNU headers, octal and
 * base-256 numbers, GNU long names, PAX extended headers, and member-name
 * cleaning. No filesystem access here; layer.c decides what to do with entries.
 *
 * Format facts (POSIX.1-2001 pax, GNU tar manual): 512-byte blocks; header
 * fields name[100] mode[8] uid[8] gid[8] size[12] mtime[12] chksum[8] type[1]
 * linkname[100] magic[6] version[2] uname[32] gname[32] devmajor[8]
 * devminor[8] prefix[155]; the checksum is the byte sum of the header with
 * the checksum field read as spaces. PAX records are "LEN KEY=VALUE\n" where
 * LEN counts the whole record in decimal.
 */
#include <ctype.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "tar.h"

void tar_pending_clear(struct tar_pending *p) {
    free(p->path);
    free(p->link);
    free(p->xattrs);
    memset(p, 0, sizeof(*p));
}

void tar_entry_clear(struct tar_entry *e) {
    free(e->path);
    free(e->link);
    free(e->xattrs);
    memset(e, 0, sizeof(*e));
}

int tar_block_is_zero(const unsigned char *blk) {
    static const unsigned char zero[TAR_BLOCK];
    return memcmp(blk, zero, TAR_BLOCK) == 0;
}

const char *tar_show(const char *s, char *out, size_t n) {
    size_t i = 0;
    if (!s)
        s = "";
    for (; s[i] && i + 4 < n; i++)
        out[i] = (unsigned char)s[i] >= 0x20 && (unsigned char)s[i] < 0x7f ? s[i] : '?';
    if (s[i] && i + 4 >= n) {
        memcpy(out + i, "...", 3);
        i += 3;
    }
    out[i] = '\0';
    return out;
}

/* A numeric header field: octal text, or GNU base-256 when the high bit of
 * the first byte is set (two's complement, so 0xff... is negative). */
static int parse_number(const unsigned char *f, size_t n, int64_t *out) {
    if (f[0] & 0x80) {
        unsigned char inv = (f[0] & 0x40) ? 0xff : 0;
        uint64_t x = (uint64_t)((f[0] ^ inv) & 0x7f);
        for (size_t i = 1; i < n; i++) {
            if (x >> 55)
                return -1; /* does not fit 63 bits */
            x = (x << 8) | (uint64_t)(f[i] ^ inv);
        }
        if (x >> 63)
            return -1;
        *out = inv ? -(int64_t)x - 1 : (int64_t)x;
        return 0;
    }
    size_t i = 0;
    uint64_t x = 0;
    while (i < n && (f[i] == ' ' || f[i] == '\0')) {
        if (f[i] == '\0') { /* an all-NUL (or space-then-NUL) field reads as 0 */
            for (size_t j = i; j < n; j++)
                if (f[j] != '\0' && f[j] != ' ')
                    return -1;
            *out = 0;
            return 0;
        }
        i++;
    }
    for (; i < n && f[i] >= '0' && f[i] <= '7'; i++) {
        if (x >> 60)
            return -1;
        x = (x << 3) | (uint64_t)(f[i] - '0');
    }
    for (; i < n; i++) /* only terminators may follow the digits */
        if (f[i] != ' ' && f[i] != '\0')
            return -1;
    *out = (int64_t)x;
    return 0;
}

static size_t field_len(const unsigned char *f, size_t n) {
    const unsigned char *z = memchr(f, 0, n);
    return z ? (size_t)(z - f) : n;
}

static int checksum_ok(const unsigned char *blk) {
    int64_t want;
    if (parse_number(blk + 148, 8, &want) < 0)
        return 0;
    long usum = 0, ssum = 0;
    for (size_t i = 0; i < TAR_BLOCK; i++) {
        unsigned char c = (i >= 148 && i < 156) ? ' ' : blk[i];
        usum += c;
        ssum += (signed char)c;
    }
    /* historic writers summed signed chars; accept either reading */
    return want == usum || want == ssum;
}

int tar_decode_header(const unsigned char *blk, unsigned long long offset,
                      struct tar_pending *pending, struct tar_entry *out,
                      struct pycri_error *err) {
    int64_t size, mode, uid, gid, mtime, dmaj, dmin;
    memset(out, 0, sizeof(*out));
    if (!checksum_ok(blk))
        return pycri_fail(err, EINVAL,
                          "layer: bad tar header checksum at byte %llu (not a tar stream, "
                          "or corrupted)", offset);
    char type = (char)blk[156];
    if (type == '\0' || type == '7')
        type = '0';
    out->type = type;
    if (parse_number(blk + 124, 12, &size) < 0 || size < 0)
        return pycri_fail(err, EINVAL, "layer: bad size field in tar header at byte %llu",
                          offset);
    out->size = (uint64_t)size;
    switch (type) {
    case 'x': case 'g': case 'L': case 'K':
        return 0; /* meta header: layer.c reads its body */
    case '0': case '1': case '2': case '3': case '4': case '5': case '6':
        break;
    case 'S':
        return pycri_fail(err, EINVAL, "layer: GNU sparse entry at byte %llu: sparse files "
                          "are not supported in layers", offset);
    default:
        return pycri_fail(err, EINVAL, "layer: unsupported tar entry type '%c' (0x%02x) at "
                          "byte %llu", isprint((unsigned char)type) ? type : '?',
                          (unsigned char)type, offset);
    }

    if (parse_number(blk + 100, 8, &mode) < 0 || parse_number(blk + 108, 8, &uid) < 0 ||
        parse_number(blk + 116, 8, &gid) < 0 || parse_number(blk + 136, 12, &mtime) < 0 ||
        parse_number(blk + 329, 8, &dmaj) < 0 || parse_number(blk + 337, 8, &dmin) < 0)
        return pycri_fail(err, EINVAL, "layer: bad numeric field in tar header at byte %llu",
                          offset);
    int posix = memcmp(blk + 257, "ustar\0", 6) == 0;

    /* name: pending long name, else (POSIX ustar) prefix "/" name, else name */
    if (pending->path) {
        out->path = pending->path;
        pending->path = NULL;
    } else {
        size_t nl = field_len(blk, 100);
        size_t pl = posix ? field_len(blk + 345, 155) : 0;
        out->path = malloc(pl + nl + 2);
        if (!out->path)
            return pycri_fail(err, ENOMEM, "layer: allocating a name");
        char *w = out->path;
        if (pl) {
            memcpy(w, blk + 345, pl);
            w += pl;
            *w++ = '/';
        }
        memcpy(w, blk, nl);
        w[nl] = '\0';
    }
    if (pending->link) {
        out->link = pending->link;
        pending->link = NULL;
    } else {
        size_t ll = field_len(blk + 157, 100);
        out->link = strndup((const char *)blk + 157, ll);
        if (!out->link)
            return pycri_fail(err, ENOMEM, "layer: allocating a link name");
    }
    if (pending->has_size)
        out->size = pending->size;
    if (pending->has_uid)
        uid = (int64_t)pending->uid;
    if (pending->has_gid)
        gid = (int64_t)pending->gid;
    out->mtime = pending->has_mtime ? pending->mtime : mtime;
    out->mtime_nsec = pending->has_mtime ? pending->mtime_nsec : 0;
    out->xattrs = pending->xattrs;
    out->xattrs_len = pending->xattrs_len;
    pending->xattrs = NULL;
    tar_pending_clear(pending);

    char shown[160];
    tar_show(out->path, shown, sizeof(shown));
    if (uid < 0 || gid < 0 || uid > 0xfffffffeLL || gid > 0xfffffffeLL)
        return pycri_fail(err, EINVAL, "layer entry '%s': uid/gid %lld/%lld out of range",
                          shown, (long long)uid, (long long)gid);
    if (dmaj < 0 || dmin < 0 || dmaj > 0xfff || dmin > 0xfffff)
        return pycri_fail(err, EINVAL, "layer entry '%s': device number %lld:%lld out of range",
                          shown, (long long)dmaj, (long long)dmin);
    /* Only regular files carry data. Readers disagree about data after other
     * types (GNU tar skips it, Go's reader does not), so refuse the ambiguity. */
    if (type != '0' && out->size != 0)
        return pycri_fail(err, EINVAL, "layer entry '%s': type '%c' with a nonzero size (%llu)",
                          shown, type, (unsigned long long)out->size);
    out->mode = (uint32_t)mode & 07777;
    out->uid = (uint32_t)uid;
    out->gid = (uint32_t)gid;
    out->devmajor = (uint32_t)dmaj;
    out->devminor = (uint32_t)dmin;
    return 0;
}

static int parse_decimal(const char *s, size_t n, uint64_t *out) {
    uint64_t x = 0;
    if (n == 0 || n > 19)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        x = x * 10 + (uint64_t)(s[i] - '0');
    }
    *out = x;
    return 0;
}

/* "[-]SECONDS[.FRACTION]"; fraction digits past nanoseconds are dropped. */
static int parse_pax_time(const char *s, size_t n, int64_t *sec, long *nsec) {
    int neg = n > 0 && s[0] == '-';
    const char *p = s + neg, *end = s + n;
    const char *dot = memchr(p, '.', (size_t)(end - p));
    uint64_t whole;
    if (parse_decimal(p, (size_t)((dot ? dot : end) - p), &whole) < 0 || whole > INT64_MAX / 2)
        return -1;
    long frac = 0;
    if (dot) {
        int digits = 0;
        for (const char *q = dot + 1; q < end; q++) {
            if (*q < '0' || *q > '9')
                return -1;
            if (digits < 9) {
                frac = frac * 10 + (*q - '0');
                digits++;
            }
        }
        for (; digits < 9; digits++)
            frac *= 10;
    }
    if (neg && frac) { /* -1.25 is 2 s before ... minus 0.75: keep nsec positive */
        *sec = -(int64_t)whole - 1;
        *nsec = 1000000000L - frac;
    } else {
        *sec = neg ? -(int64_t)whole : (int64_t)whole;
        *nsec = frac;
    }
    return 0;
}

static int set_pax_string(char **slot, const char *v, size_t n, const char *key,
                          struct pycri_error *err) {
    if (memchr(v, 0, n))
        return pycri_fail(err, EILSEQ, "layer: PAX '%s' contains a NUL byte", key);
    free(*slot);
    *slot = n ? strndup(v, n) : NULL; /* an empty value unsets the field */
    if (n && !*slot)
        return pycri_fail(err, ENOMEM, "layer: allocating a PAX value");
    return 0;
}

static int add_xattr(struct tar_pending *p, const char *name, size_t nl, const char *v,
                     size_t vl, struct pycri_error *err) {
    if (nl == 0 || nl > 255 || memchr(name, 0, nl))
        return pycri_fail(err, EINVAL, "layer: PAX xattr with an empty, NUL-bearing or "
                          "over-long name");
    if (vl > 65536)
        return pycri_fail(err, EINVAL, "layer: PAX xattr value over 64 KiB");
    uint32_t len32 = (uint32_t)vl;
    size_t need = p->xattrs_len + nl + 1 + sizeof(len32) + vl;
    unsigned char *b = realloc(p->xattrs, need);
    if (!b)
        return pycri_fail(err, ENOMEM, "layer: allocating xattrs");
    unsigned char *w = b + p->xattrs_len;
    memcpy(w, name, nl);
    w[nl] = 0;
    memcpy(w + nl + 1, &len32, sizeof(len32));
    memcpy(w + nl + 1 + sizeof(len32), v, vl);
    p->xattrs = b;
    p->xattrs_len = need;
    return 0;
}

int tar_parse_pax(const char *buf, size_t len, int global, struct tar_pending *p,
                  struct pycri_error *err) {
    size_t pos = 0;
    while (pos < len) {
        /* a writer may pad the body with NULs */
        if (buf[pos] == '\0') {
            for (size_t i = pos; i < len; i++)
                if (buf[i])
                    return pycri_fail(err, EINVAL, "layer: PAX header: data after NUL padding");
            break;
        }
        const char *sp = memchr(buf + pos, ' ', len - pos < 21 ? len - pos : 21);
        uint64_t rl;
        if (!sp || parse_decimal(buf + pos, (size_t)(sp - (buf + pos)), &rl) < 0 ||
            rl > len - pos || rl < (uint64_t)(sp - (buf + pos)) + 3)
            return pycri_fail(err, EINVAL, "layer: malformed PAX record length at offset %zu",
                              pos);
        const char *rec_end = buf + pos + rl - 1; /* the '\n' */
        if (*rec_end != '\n')
            return pycri_fail(err, EINVAL, "layer: PAX record at offset %zu does not end in "
                              "a newline", pos);
        const char *key = sp + 1;
        const char *eq = memchr(key, '=', (size_t)(rec_end - key));
        if (!eq || eq == key || memchr(key, 0, (size_t)(eq - key)))
            return pycri_fail(err, EINVAL, "layer: malformed PAX record at offset %zu", pos);
        size_t kl = (size_t)(eq - key);
        const char *v = eq + 1;
        size_t vl = (size_t)(rec_end - v);
        pos += rl;
#define KEY_IS(s) (kl == sizeof(s) - 1 && memcmp(key, s, kl) == 0)
        if (kl >= 11 && memcmp(key, "GNU.sparse.", 11) == 0)
            return pycri_fail(err, EINVAL, "layer: PAX sparse file records: sparse files are "
                              "not supported in layers");
        if (global)
            continue; /* validated; global defaults are not honoured */
        if (KEY_IS("path")) {
            if (set_pax_string(&p->path, v, vl, "path", err) < 0)
                return -1;
        } else if (KEY_IS("linkpath")) {
            if (set_pax_string(&p->link, v, vl, "linkpath", err) < 0)
                return -1;
        } else if (KEY_IS("size") || KEY_IS("uid") || KEY_IS("gid")) {
            uint64_t x;
            if (parse_decimal(v, vl, &x) < 0 || x > (uint64_t)INT64_MAX)
                return pycri_fail(err, EINVAL, "layer: bad PAX %.*s value", (int)kl, key);
            if (key[0] == 's') {
                p->size = x;
                p->has_size = 1;
            } else if (key[0] == 'u') {
                p->uid = x;
                p->has_uid = 1;
            } else {
                p->gid = x;
                p->has_gid = 1;
            }
        } else if (KEY_IS("mtime")) {
            if (parse_pax_time(v, vl, &p->mtime, &p->mtime_nsec) < 0)
                return pycri_fail(err, EINVAL, "layer: bad PAX mtime value");
            p->has_mtime = 1;
        } else if (kl > 13 && memcmp(key, "SCHILY.xattr.", 13) == 0) {
            if (add_xattr(p, key + 13, kl - 13, v, vl, err) < 0)
                return -1;
        }
        /* atime, ctime, uname, gname, charset, comment, vendor keys: ignored */
#undef KEY_IS
    }
    return 0;
}

int tar_clean_path(char *p, size_t max_len, const char *what, struct pycri_error *err) {
    char shown[160];
    tar_show(p, shown, sizeof(shown));
    char *r = p, *w = p;
    while (*r) {
        while (*r == '/')
            r++;
        if (!*r)
            break;
        char *seg = r;
        while (*r && *r != '/')
            r++;
        size_t n = (size_t)(r - seg);
        if (n == 1 && seg[0] == '.')
            continue;
        if (n == 2 && seg[0] == '.' && seg[1] == '.')
            return pycri_fail(err, EXDEV, "%s '%s': path escapes the layer root ('..' "
                              "component)", what, shown);
        if (n > NAME_MAX)
            return pycri_fail(err, ENAMETOOLONG, "%s '%s': a name component is longer than "
                              "%d bytes", what, shown, NAME_MAX);
        if (w != p)
            *w++ = '/';
        memmove(w, seg, n);
        w += n;
    }
    *w = '\0';
    if ((size_t)(w - p) > max_len)
        return pycri_fail(err, ENAMETOOLONG, "%s '%s': path longer than %zu bytes", what,
                          shown, max_len);
    return 0;
}
