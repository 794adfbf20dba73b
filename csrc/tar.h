/* tar.h - tar header, PAX and path parsing used by layer.c (cffi never sees it). */
#ifndef PYCRI_TAR_H
#define PYCRI_TAR_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"

#define TAR_BLOCK 512u

/* Overrides collected from PAX 'x' and GNU 'L'/'K' headers for the next entry. */
struct tar_pending {
    char *path;                 /* malloc'd, NUL-free */
    char *link;
    int has_size, has_uid, has_gid, has_mtime;
    uint64_t size, uid, gid;
    int64_t mtime;
    long mtime_nsec;
    /* xattr records, each: name NUL, 4-byte native length, value bytes */
    unsigned char *xattrs;
    size_t xattrs_len;
};

/* One entry, ready to apply. Strings point into malloc'd memory owned here. */
struct tar_entry {
    char type;                  /* '0' file, '1' hardlink, '2' symlink, '3' chr,
                                   '4' blk, '5' dir, '6' fifo */
    char *path;
    char *link;
    uint64_t size;
    uint32_t mode;              /* 07777 bits */
    uint32_t uid, gid;
    int64_t mtime;
    long mtime_nsec;
    uint32_t devmajor, devminor;
    unsigned char *xattrs;
    size_t xattrs_len;
};

void tar_pending_clear(struct tar_pending *p);
void tar_entry_clear(struct tar_entry *e);

/* Is this 512-byte block all zeros? */
int tar_block_is_zero(const unsigned char *blk);

/* Decode a header block (checksum verified) merged with the pending overrides
 * (which it consumes). Meta types ('x','g','L','K') only get type and size.
 * offset is the block's position in the stream, for messages. */
int tar_decode_header(const unsigned char *blk, unsigned long long offset,
                      struct tar_pending *pending, struct tar_entry *out,
                      struct pycri_error *err);

/* Parse a PAX extended header body into pending (global=1: validate, keep nothing). */
int tar_parse_pax(const char *buf, size_t len, int global, struct tar_pending *pending,
                  struct pycri_error *err);

/* Clean a member name in place: drop leading '/' and "./", collapse "//" and
 * "/./", drop a trailing '/'. Refuse ".." components (EXDEV), components over
 * NAME_MAX and names over max_len (ENAMETOOLONG). "" means the layer root. */
int tar_clean_path(char *p, size_t max_len, const char *what, struct pycri_error *err);

/* Copy s into out (size n) with non-printable bytes as '?', for messages. */
const char *tar_show(const char *s, char *out, size_t n);

#endif
