/* api/digest.h - SHA-256 over OpenSSL's libcrypto (SHA-NI where the CPU has it). */

/* Caller-owned state; holds an OpenSSL SHA256_CTX (112 bytes). */
struct pycri_sha256 {
    unsigned long long opaque[16];
};

int pycri_sha256_init(struct pycri_sha256 *h, struct pycri_error *err);
int pycri_sha256_update(struct pycri_sha256 *h, const unsigned char *data, size_t len,
                        struct pycri_error *err);
/* Writes 64 lowercase hex digits and a NUL into hex. */
int pycri_sha256_final(struct pycri_sha256 *h, char *hex, struct pycri_error *err);
/* Hash everything readable from fd (from its current offset) into hex. */
int pycri_sha256_fd(int fd, char *hex, unsigned long long *nbytes, struct pycri_error *err);
