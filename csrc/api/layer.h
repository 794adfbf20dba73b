/* api/layer.h - apply one uncompressed layer tar stream into a directory.
 *
 * Python feeds tar bytes in chunks of any size; C parses them as they arrive,
 * creates every entry inside the layer root (openat2 RESOLVE_IN_ROOT for the
 * parent, *at() + O_NOFOLLOW for the last component), turns OCI whiteouts into
 * overlay whiteouts, and hashes the stream (the diff_id) in the same pass.
 *
 *   open -> feed* -> finish -> close      (close is idempotent and always needed)
 *
 * Errors: malformed archive -> EINVAL / EILSEQ, path escape -> EXDEV,
 * hardlink to a directory -> EPERM, a limit hit -> EFBIG; every message names
 * the entry ("layer entry 'a/b': ...") and the failing syscall.
 */

/* Zero fields take the defaults given beside them. */
struct pycri_layer_limits {
    unsigned long long max_entries;      /* entries in the archive (1,000,000) */
    unsigned long long max_bytes;        /* uncompressed tar bytes (64 GiB) */
    unsigned long long max_meta_size;    /* one PAX / GNU long-name header (1 MiB) */
    unsigned int max_path_len;           /* a path or link name after cleaning (4096) */
};

struct pycri_layer_stats {
    unsigned long long bytes;            /* tar bytes fed (hashed) so far */
    unsigned long long entries;          /* entries applied, whiteouts included */
    unsigned long long files;
    unsigned long long dirs;
    unsigned long long symlinks;
    unsigned long long hardlinks;
    unsigned long long devices;          /* char, block and FIFO nodes */
    unsigned long long whiteouts;        /* .wh.NAME and .wh..wh..opq entries */
    unsigned long long xattrs_dropped;   /* xattrs refused by policy (trusted.* ...) */
    unsigned long long lower_copies;     /* hardlinks satisfied by copying from a lower */
};

#define PYCRI_LAYER_MAX_LOWERS 128

/* open flags. HASH_SEPARATELY: feed does not hash; the caller passes the same
 * bytes, in the same order, to pycri_layer_hash (typically from the thread that
 * decompresses, so hashing overlaps with writing files). finish checks that
 * both saw the same number of bytes. */
#define PYCRI_LAYER_HASH_SEPARATELY 1

struct pycri_layer {
    void *impl;                          /* private; allocated by open, freed by close */
    struct pycri_layer_stats stats;      /* kept current by feed and finish */
};

/* Open the layer root dest (relative to dirfd, AT_FDCWD = -100 for a plain path);
 * it should be an empty directory the caller created. lower_fds (may be NULL
 * when nlowers is 0) are directories of the layers below, top first, used only
 * for hardlinks whose target is not in this layer; they are duplicated, the
 * caller keeps its own. limits may be NULL for the defaults. */
int pycri_layer_open(struct pycri_layer *l, int dirfd, const char *dest,
                     const struct pycri_layer_limits *limits, const int *lower_fds,
                     int nlowers, unsigned int flags, struct pycri_error *err);

/* Consume the next len bytes of the tar stream. After a failure every later
 * feed or finish fails too: the caller should close and discard dest. */
int pycri_layer_feed(struct pycri_layer *l, const unsigned char *buf, size_t len,
                     struct pycri_error *err);

/* With PYCRI_LAYER_HASH_SEPARATELY: add the next len stream bytes to the
 * diff_id. It touches only the digest state, so one thread may call it while
 * another is inside feed; never call it concurrently with itself or finish. */
int pycri_layer_hash(struct pycri_layer *l, const unsigned char *buf, size_t len,
                     struct pycri_error *err);

/* Check that the archive ended properly (at least one zero block at an entry
 * boundary), apply directory mtimes (deepest last-created first), and write the
 * diff_id as 64 hex digits + NUL into diff_id_hex (65 bytes). */
int pycri_layer_finish(struct pycri_layer *l, char *diff_id_hex, struct pycri_error *err);

/* Release fds and buffers; safe to call more than once or after a failed open. */
void pycri_layer_close(struct pycri_layer *l);

/* rm -rf path, never following a symlink (a missing path is fine): what the
 * trash thread deletes removed containers' trees with, in one call. */
int pycri_remove_tree(const char *path, struct pycri_error *err);

/* mkdir paths[0..n) in order with modes[i] (the umask applies), stopping at the
 * first failure; *made says how many were made. One call for a record dir's or a
 * cgroup's several directories. */
int pycri_mkdir_each(const char *const *paths, const int *modes, int n, int *made,
                     struct pycri_error *err);
