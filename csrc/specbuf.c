/* specbuf.c - a struct pycri_spawn_spec as one flat, relocatable buffer.
 *
 * pycri_launch sends the spec to the launcher (a separate executable) through a
 * socket, so every pointer in it has to become data. Layout, all offsets from the
 * start of the buffer:
 *
 *   header      magic, version, total length, sizeof(struct pycri_spawn_spec)
 *   image       a copy of the spec whose pointer fields hold offsets (0 = NULL)
 *   data        strings (NUL-terminated), string lists (8-byte slots holding
 *               string offsets, a 0 slot last), int / rlimit / bind arrays (binds
 *               with their two string fields as offsets), the seccomp program
 *
 * Decoding checks every offset against the length and every string for its NUL,
 * then rewrites the offsets into pointers in place: the decoded spec points into
 * the buffer and needs no other memory. Both ends are built from this file at the
 * same time, so the image is the compiler's struct layout (the header carries its
 * size as a check).
 */
#include <stdint.h>
#include <string.h>

#include "internal.h"

#define SPEC_MAGIC 0x70637273u /* "pcrs" */
#define SPEC_VERSION 1u

_Static_assert(sizeof(void *) == sizeof(uint64_t), "offset slots hold pointers");

struct spec_header {
    uint32_t magic, version, total, spec_size;
};

struct enc {
    unsigned char *buf;
    size_t cap, len;
};

/* Reserve n bytes at the next multiple of align; copy p there when given and it
 * fits, else zero the space (when it fits). Returns the offset. */
static uint64_t reserve(struct enc *e, const void *p, size_t n, size_t align) {
    e->len = (e->len + align - 1) & ~(align - 1);
    size_t off = e->len;
    if (e->buf && off + n <= e->cap) {
        if (p)
            memcpy(e->buf + off, p, n);
        else
            memset(e->buf + off, 0, n);
    }
    e->len += n;
    return off;
}

static void store_u64(struct enc *e, size_t off, uint64_t v) {
    if (e->buf && off + sizeof(v) <= e->cap)
        memcpy(e->buf + off, &v, sizeof(v));
}

static uint64_t put_str(struct enc *e, const char *s) {
    return s ? reserve(e, s, strlen(s) + 1, 1) : 0;
}

static uint64_t put_strv(struct enc *e, const char *const *v) {
    if (!v)
        return 0;
    size_t n = 0;
    while (v[n])
        n++;
    uint64_t slots = reserve(e, NULL, (n + 1) * sizeof(uint64_t), 8);
    for (size_t i = 0; i < n; i++)
        store_u64(e, slots + i * sizeof(uint64_t), put_str(e, v[i]));
    return slots;
}

static uint64_t put_array(struct enc *e, const void *p, size_t elem, int n) {
    return p ? reserve(e, p, elem * (size_t)(n > 0 ? n : 0), 8) : 0;
}

#define AS_PTR(off) ((void *)(uintptr_t)(off))

PYCRI_EXPORT int pycri_spec_encode(const struct pycri_spawn_spec *s, unsigned char *buf,
                                   size_t cap, struct pycri_error *err) {
    struct enc e = {.buf = buf, .cap = cap, .len = 0};
    uint64_t hdr_off = reserve(&e, NULL, sizeof(struct spec_header), 8);
    uint64_t img_off = reserve(&e, NULL, sizeof(*s), 8);
    struct pycri_spawn_spec img = *s;

    img.argv = AS_PTR(put_strv(&e, s->argv));
    img.envp = AS_PTR(put_strv(&e, s->envp));
    img.exec_path = AS_PTR(put_str(&e, s->exec_path));
    img.cwd = AS_PTR(put_str(&e, s->cwd));
    img.groups = AS_PTR(put_array(&e, s->groups, sizeof(*s->groups), s->n_groups));
    img.seccomp_bpf = AS_PTR(put_array(&e, s->seccomp_bpf, 8, (int)s->seccomp_len));
    img.rlimits = AS_PTR(put_array(&e, s->rlimits, sizeof(*s->rlimits), s->n_rlimits));
    img.hostname = AS_PTR(put_str(&e, s->hostname));
    img.sysctls = AS_PTR(put_strv(&e, s->sysctls));
    img.keep_fds = AS_PTR(put_array(&e, s->keep_fds, sizeof(*s->keep_fds), s->n_keep_fds));
    for (int k = 0; k < PYCRI_NS_COUNT; k++)
        img.ns_path[k] = AS_PTR(put_str(&e, s->ns_path[k]));
    img.cgroup_procs = AS_PTR(put_strv(&e, s->cgroup_procs));
    img.rootfs = AS_PTR(put_str(&e, s->rootfs));
    img.overlay_lower = AS_PTR(put_str(&e, s->overlay_lower));
    img.overlay_upper = AS_PTR(put_str(&e, s->overlay_upper));
    img.overlay_work = AS_PTR(put_str(&e, s->overlay_work));
    img.shm_path = AS_PTR(put_str(&e, s->shm_path));
    img.etc_hostname = AS_PTR(put_str(&e, s->etc_hostname));
    img.etc_hosts = AS_PTR(put_str(&e, s->etc_hosts));
    img.etc_resolv = AS_PTR(put_str(&e, s->etc_resolv));
    if (s->binds) {
        int n = s->n_binds > 0 ? s->n_binds : 0;
        uint64_t arr = reserve(&e, NULL, sizeof(struct pycri_bind) * (size_t)n, 8);
        for (int i = 0; i < n; i++) {
            struct pycri_bind b = s->binds[i];
            b.source = AS_PTR(put_str(&e, s->binds[i].source));
            b.target = AS_PTR(put_str(&e, s->binds[i].target));
            size_t at = arr + (size_t)i * sizeof(b);
            if (e.buf && at + sizeof(b) <= e.cap)
                memcpy(e.buf + at, &b, sizeof(b));
        }
        img.binds = AS_PTR(arr);
    } else {
        img.binds = NULL;
    }
    img.masked_paths = AS_PTR(put_strv(&e, s->masked_paths));
    img.readonly_paths = AS_PTR(put_strv(&e, s->readonly_paths));

    if (e.len > (size_t)INT32_MAX)
        return pycri_fail(err, E2BIG, "spec encode: %zu bytes", e.len);
    if (buf && e.len <= cap) {
        struct spec_header h = {SPEC_MAGIC, SPEC_VERSION, (uint32_t)e.len, (uint32_t)sizeof(img)};
        memcpy(buf + hdr_off, &h, sizeof(h));
        memcpy(buf + img_off, &img, sizeof(img));
    }
    return (int)e.len;
}

/* --- decode ------------------------------------------------------------------ */

struct dec {
    unsigned char *buf;
    size_t len;
    int bad;
};

static const char *get_str(struct dec *d, const void *field) {
    uint64_t off = (uint64_t)(uintptr_t)field;
    if (!off)
        return NULL;
    if (off >= d->len || !memchr(d->buf + off, 0, d->len - off)) {
        d->bad = 1;
        return NULL;
    }
    return (const char *)d->buf + off;
}

static const char *const *get_strv(struct dec *d, const void *field) {
    uint64_t off = (uint64_t)(uintptr_t)field;
    if (!off)
        return NULL;
    if (off % 8) {
        d->bad = 1;
        return NULL;
    }
    for (size_t at = off;; at += 8) {
        if (at + 8 > d->len) {
            d->bad = 1;
            return NULL;
        }
        uint64_t v;
        memcpy(&v, d->buf + at, 8);
        if (!v)
            break;
        const char *s = get_str(d, AS_PTR(v));
        if (!s) {
            d->bad = 1;
            return NULL;
        }
        memcpy(d->buf + at, &s, sizeof(s));
    }
    return (const char *const *)(void *)(d->buf + off);
}

static void *get_array(struct dec *d, const void *field, size_t elem, long long n) {
    uint64_t off = (uint64_t)(uintptr_t)field;
    if (!off)
        return NULL;
    if (n < 0 || off % 8 || off > d->len || (d->len - off) / elem < (unsigned long long)n) {
        d->bad = 1;
        return NULL;
    }
    return d->buf + off;
}

PYCRI_EXPORT int pycri_spec_decode(unsigned char *buf, size_t len, struct pycri_spawn_spec *out,
                                   struct pycri_error *err) {
    struct spec_header h;
    size_t img_off = (sizeof(h) + 7) & ~(size_t)7;
    if ((uintptr_t)buf % 8 || len < img_off + sizeof(*out))
        return pycri_fail(err, EINVAL, "spec decode: short or misaligned buffer (%zu bytes)", len);
    memcpy(&h, buf, sizeof(h));
    if (h.magic != SPEC_MAGIC || h.version != SPEC_VERSION || h.total != len ||
        h.spec_size != sizeof(*out))
        return pycri_fail(err, EPROTO,
                          "spec decode: header does not match (magic %x version %u, %u of %zu "
                          "bytes, spec of %u bytes, expected %zu)",
                          h.magic, h.version, h.total, len, h.spec_size, sizeof(*out));
    struct pycri_spawn_spec s;
    memcpy(&s, buf + img_off, sizeof(s));
    struct dec d = {.buf = buf, .len = len, .bad = 0};

    s.argv = get_strv(&d, s.argv);
    s.envp = get_strv(&d, s.envp);
    s.exec_path = get_str(&d, s.exec_path);
    s.cwd = get_str(&d, s.cwd);
    s.groups = get_array(&d, s.groups, sizeof(*s.groups), s.n_groups);
    s.seccomp_bpf = get_array(&d, s.seccomp_bpf, 8, s.seccomp_len);
    s.rlimits = get_array(&d, s.rlimits, sizeof(*s.rlimits), s.n_rlimits);
    s.hostname = get_str(&d, s.hostname);
    s.sysctls = get_strv(&d, s.sysctls);
    s.keep_fds = get_array(&d, s.keep_fds, sizeof(*s.keep_fds), s.n_keep_fds);
    for (int k = 0; k < PYCRI_NS_COUNT; k++)
        s.ns_path[k] = get_str(&d, s.ns_path[k]);
    s.cgroup_procs = get_strv(&d, s.cgroup_procs);
    s.rootfs = get_str(&d, s.rootfs);
    s.overlay_lower = get_str(&d, s.overlay_lower);
    s.overlay_upper = get_str(&d, s.overlay_upper);
    s.overlay_work = get_str(&d, s.overlay_work);
    s.shm_path = get_str(&d, s.shm_path);
    s.etc_hostname = get_str(&d, s.etc_hostname);
    s.etc_hosts = get_str(&d, s.etc_hosts);
    s.etc_resolv = get_str(&d, s.etc_resolv);
    struct pycri_bind *binds = get_array(&d, s.binds, sizeof(struct pycri_bind), s.n_binds);
    for (int i = 0; binds && !d.bad && i < s.n_binds; i++) {
        binds[i].source = get_str(&d, binds[i].source);
        binds[i].target = get_str(&d, binds[i].target);
    }
    s.binds = binds;
    s.masked_paths = get_strv(&d, s.masked_paths);
    s.readonly_paths = get_strv(&d, s.readonly_paths);
    if (d.bad)
        return pycri_fail(err, EPROTO, "spec decode: an offset points outside the buffer");
    *out = s;
    return 0;
}
