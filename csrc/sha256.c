/* sha256.c - digests through libcrypto's SHA256_* (declared here so that building
 * needs no OpenSSL headers). The low-level API is deprecated in OpenSSL 3 but is
 * exported and runs the same SHA-NI/AVX2 assembly as EVP, without heap state. */
#include <stddef.h>
#include <string.h>

#include "internal.h"

int SHA256_Init(void *c);
int SHA256_Update(void *c, const void *data, size_t len);
int SHA256_Final(unsigned char *md, void *c);

_Static_assert(sizeof(struct pycri_sha256) >= 112, "SHA256_CTX does not fit");

PYCRI_EXPORT int pycri_sha256_init(struct pycri_sha256 *h, struct pycri_error *err) {
    if (SHA256_Init(h->opaque) != 1)
        return pycri_fail(err, EINVAL, "SHA256_Init failed");
    return 0;
}

PYCRI_EXPORT int pycri_sha256_update(struct pycri_sha256 *h, const unsigned char *data,
                                     size_t len, struct pycri_error *err) {
    if (len && SHA256_Update(h->opaque, data, len) != 1)
        return pycri_fail(err, EINVAL, "SHA256_Update failed");
    return 0;
}

PYCRI_EXPORT int pycri_sha256_final(struct pycri_sha256 *h, char *hex, struct pycri_error *err) {
    static const char digits[] = "0123456789abcdef";
    unsigned char md[32];
    if (SHA256_Final(md, h->opaque) != 1)
        return pycri_fail(err, EINVAL, "SHA256_Final failed");
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = digits[md[i] >> 4];
        hex[2 * i + 1] = digits[md[i] & 15];
    }
    hex[64] = '\0';
    return 0;
}

PYCRI_EXPORT int pycri_sha256_fd(int fd, char *hex, unsigned long long *nbytes,
                                 struct pycri_error *err) {
    struct pycri_sha256 h;
    cleanup_free unsigned char *buf = malloc(1 << 20);
    unsigned long long total = 0;
    if (!buf)
        return pycri_fail(err, ENOMEM, "sha256: allocating read buffer");
    if (pycri_sha256_init(&h, err) < 0)
        return -1;
    for (;;) {
        ssize_t n = read(fd, buf, 1 << 20);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return pycri_fail(err, errno, "sha256: read fd %d", fd);
        }
        if (n == 0)
            break;
        SHA256_Update(h.opaque, buf, (size_t)n);
        total += (unsigned long long)n;
    }
    if (nbytes)
        *nbytes = total;
    return pycri_sha256_final(&h, hex, err);
}
