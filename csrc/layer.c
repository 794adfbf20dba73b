/* layer.c - apply an uncompressed layer tar stream into a layer root.
 *
 * A push parser: feed() takes chunks of any size, so the tar bytes never need
 * to be in memory at once and Python can decompress the next chunk while C
 * writes this one (cffi drops the GIL for the call). The stream is hashed as it
 * arrives, which yields the diff_id in the same pass.
 *
 * Safety model: the archive is hostile. Every parent directory is opened with
 * openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV) from the
 * root fd, so symlinks and ".." planted by earlier entries resolve inside the
 * root; the last component is created with *at() calls that never follow it
 * (O_EXCL / O_NOFOLLOW / AT_SYMLINK_NOFOLLOW); owner, mode, xattrs and times go
 * through the fd we created, through an O_PATH fd (+ /proc/self/fd for chmod of
 * device nodes), or *at(..., AT_SYMLINK_NOFOLLOW) for symlinks. ".." components
 * are refused outright, absolute names are taken relative to the root.
 *
 * xattr policy: user.*, security.capability and system.posix_acl_* are kept;
 * trusted.* (which steers overlayfs on the host: opaque, redirect, metacopy)
 * and other security.* labels are dropped and counted. The only trusted.*
 * xattr written is trusted.overlay.opaque, from a .wh..wh..opq entry.
 */
#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <time.h>

#include "tar.h"

enum { ST_HEADER, ST_META, ST_DATA, ST_SKIP, ST_PAD, ST_END };

#define WH_PREFIX ".wh."
#define WH_OPAQUE ".wh..wh..opq"

struct dir_time {
    char *path;
    dev_t dev;
    ino_t ino;
    size_t order;
    struct timespec ts[2];
};

struct layer {
    int root_fd;
    int lower_fds[PYCRI_LAYER_MAX_LOWERS];
    int nlowers;
    struct pycri_layer_limits lim;
    struct pycri_sha256 sha;
    unsigned int flags;
    unsigned long long hashed;          /* bytes given to pycri_layer_hash */
    int state, failed, finished, zeros;
    unsigned long long offset;          /* stream bytes consumed by the parser */
    unsigned char hdr[TAR_BLOCK];
    size_t hdr_len;
    uint64_t remaining, pad;
    char meta_type;
    char *meta;
    size_t meta_len, meta_want;
    struct tar_pending pending;
    struct tar_entry cur;               /* the regular file being written */
    int out_fd;
    char *pcache_path;                  /* last parent resolved, and its fd */
    int pcache_fd;
    /* Fast path for the common file: when the owner a new file gets anyway and
     * the mode open() gives it (umask) are already right, skip fchown/fchmod.
     * *_newgid: the group a file created in that dir gets (setgid dirs pass
     * theirs on), or -1 when unknown. umask -1: unknown, no fast path. */
    long long pcache_newgid, root_newgid;
    int umask;
    uid_t euid;
    gid_t egid;
    int cur_owner_ok, cur_mode_ok;      /* for L->cur */
    struct dir_time *dirs;
    size_t ndirs, dirs_cap;
    char shown[200];                    /* printable name of the current entry */
};

#define FAIL(code, fmt, ...) \
    pycri_fail(err, (code), "layer entry '%s': " fmt, L->shown, ##__VA_ARGS__)

static int open_in_root(int root, const char *path, int flags) {
    struct open_how how = {
        .flags = (unsigned long long)(flags | O_CLOEXEC),
        .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV,
    };
    for (int i = 0;; i++) { /* EAGAIN: a concurrent rename; retry a little */
        int fd = (int)syscall(SYS_openat2, root, *path ? path : ".", &how, sizeof(how));
        if (fd >= 0 || errno != EAGAIN || i == 16)
            return fd;
    }
}

static void drop_parent_cache(struct layer *L) {
    if (L->pcache_fd >= 0)
        close(L->pcache_fd);
    L->pcache_fd = -1;
    L->pcache_newgid = -1;
    free(L->pcache_path);
    L->pcache_path = NULL;
}

/* rm -rf of one name inside dfd, never following symlinks. */
static int remove_tree(int dfd, const char *name, int depth) {
    if (unlinkat(dfd, name, 0) == 0)
        return 0;
    if (errno != EISDIR || depth > 4096)
        return -1;
    for (int pass = 0; pass < 4; pass++) {
        int fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
            return -1;
        DIR *d = fdopendir(fd);
        if (!d) {
            close(fd);
            return -1;
        }
        struct dirent *de;
        while ((de = readdir(d))) {
            if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
                continue;
            if (remove_tree(dirfd(d), de->d_name, depth + 1) < 0 && errno != ENOENT) {
                closedir(d);
                return -1;
            }
        }
        closedir(d);
        if (unlinkat(dfd, name, AT_REMOVEDIR) == 0)
            return 0;
        if (errno != ENOTEMPTY) /* readdir may miss names removed under it: go again */
            return -1;
    }
    return -1;
}

static int remove_existing(struct layer *L, int dfd, const char *base, struct pycri_error *err) {
    /* Removing a child of the cached parent leaves the parent itself valid; any
     * other removal may take the cached directory (or a path to it) away. */
    if (dfd != L->pcache_fd)
        drop_parent_cache(L);
    if (remove_tree(dfd, base, 0) < 0 && errno != ENOENT)
        return FAIL(errno, "removing the existing '%s' to replace it", base);
    return 0;
}

/* Create the missing directories of parent (a cleaned, non-empty path), 0755.
 * Below the first directory this creates, everything is new and empty, so the
 * rest is opened with openat(O_NOFOLLOW) from the previous fd: linear in the
 * depth instead of quadratic. */
static int make_parents(struct layer *L, char *parent, struct pycri_error *err) {
    int prev = L->root_fd;
    int fresh = 0;
    char *comp = parent;
    for (;;) {
        char *slash = strchr(comp, '/');
        if (slash)
            *slash = '\0';
        int fd;
        if (fresh) {
            if (mkdirat(prev, comp, 0755) < 0 ||
                (fd = openat(prev, comp, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)) < 0) {
                int e = errno;
                close(prev);
                return FAIL(e, "creating parent '%s'", parent);
            }
            fchmod(fd, 0755);
            close(prev);
            prev = fd;
            if (!slash)
                return fd;
            *slash = '/';
            comp = slash + 1;
            continue;
        }
        fd = open_in_root(L->root_fd, parent, O_RDONLY | O_DIRECTORY);
        if (fd < 0 && errno == ENOENT) {
            int made = mkdirat(prev, comp, 0755) == 0;
            if (!made && errno != EEXIST) {
                int e = errno;
                if (prev != L->root_fd)
                    close(prev);
                return FAIL(e, "mkdirat '%s'", parent);
            }
            fd = open_in_root(L->root_fd, parent, O_RDONLY | O_DIRECTORY);
            if (fd >= 0) {
                if (made) {
                    fchmod(fd, 0755); /* not subject to the umask */
                    fresh = 1;
                }
            } else if (errno == ENOENT || errno == ENOTDIR) {
                if (prev != L->root_fd)
                    close(prev);
                return FAIL(ENOENT, "parent '%s' is a symlink that resolves to nothing inside "
                            "the layer root (dangling, or aimed outside it)", parent);
            }
        }
        if (fd < 0) {
            int e = errno;
            if (prev != L->root_fd)
                close(prev);
            return FAIL(e, "parent '%s': openat2", parent);
        }
        if (prev != L->root_fd)
            close(prev);
        prev = fd;
        if (!slash)
            return fd;
        *slash = '/';
        comp = slash + 1;
    }
}

/* The group a file created in dir gets, or -1 if that cannot be told. */
static long long new_file_gid(struct layer *L, int dir) {
    struct stat st;
    if (fstat(dir, &st) < 0)
        return -1;
    return (st.st_mode & S_ISGID) ? (long long)st.st_gid : (long long)L->egid;
}

/* The parent directory of path (a borrowed fd: do not close) and its last
 * component in *base. path must be cleaned and non-empty. */
static int parent_fd(struct layer *L, char *path, const char **base, struct pycri_error *err) {
    char *slash = strrchr(path, '/');
    if (!slash) {
        *base = path;
        return L->root_fd;
    }
    *base = slash + 1;
    *slash = '\0';
    if (L->pcache_fd >= 0 && strcmp(L->pcache_path, path) == 0) {
        *slash = '/';
        return L->pcache_fd;
    }
    drop_parent_cache(L);
    int fd = open_in_root(L->root_fd, path, O_RDONLY | O_DIRECTORY);
    if (fd < 0 && errno == ENOENT)
        fd = make_parents(L, path, err);
    else if (fd < 0)
        fd = FAIL(errno, "parent '%s': openat2", path);
    if (fd >= 0) {
        L->pcache_path = strdup(path);
        if (L->pcache_path)
            L->pcache_fd = fd;
        L->pcache_newgid = new_file_gid(L, fd);
    }
    *slash = '/';
    if (fd >= 0 && L->pcache_fd < 0) {
        close(fd);
        return pycri_fail(err, ENOMEM, "layer: allocating a path");
    }
    return fd;
}

static int xattr_allowed(const char *name) {
    return strncmp(name, "user.", 5) == 0 || strcmp(name, "security.capability") == 0 ||
           strcmp(name, "system.posix_acl_access") == 0 ||
           strcmp(name, "system.posix_acl_default") == 0;
}

static int apply_xattrs(struct layer *L, struct pycri_layer *l, int fd, const struct tar_entry *e,
                        struct pycri_error *err) {
    if (!e->xattrs)
        return 0;
    const unsigned char *p = e->xattrs, *end = e->xattrs + e->xattrs_len;
    while (p < end) {
        const char *name = (const char *)p;
        uint32_t vl;
        p += strlen(name) + 1;
        memcpy(&vl, p, sizeof(vl));
        p += sizeof(vl);
        if (!xattr_allowed(name))
            l->stats.xattrs_dropped++;
        else if (fd < 0)
            l->stats.xattrs_dropped++; /* device nodes, FIFOs: nothing legitimate to set */
        else if (fsetxattr(fd, name, p, vl, 0) < 0)
            return FAIL(errno, "fsetxattr %s", name);
        else if (strcmp(name, "system.posix_acl_default") == 0)
            L->umask = -1; /* new files below get their mode from the ACL, not the umask */
        p += vl;
    }
    return 0;
}

static void entry_times(const struct tar_entry *e, struct timespec ts[2]) {
    ts[0].tv_sec = ts[1].tv_sec = (time_t)e->mtime;
    ts[0].tv_nsec = ts[1].tv_nsec = e->mtime_nsec;
}

/* Owner, mode, xattrs (and times unless deferred) through an fd we opened.
 * chown first: it clears setuid bits and security.capability. */
static int meta_fd(struct layer *L, struct pycri_layer *l, int fd, const struct tar_entry *e,
                   int set_times, int owner_ok, int mode_ok, struct pycri_error *err) {
    if (!owner_ok && fchown(fd, e->uid, e->gid) < 0)
        return FAIL(errno, "fchown %u:%u", e->uid, e->gid);
    if (!mode_ok && fchmod(fd, e->mode) < 0)
        return FAIL(errno, "fchmod %04o", e->mode);
    if (apply_xattrs(L, l, fd, e, err) < 0)
        return -1;
    if (set_times) {
        struct timespec ts[2];
        entry_times(e, ts);
        if (futimens(fd, ts) < 0)
            return FAIL(errno, "futimens");
    }
    return 0;
}

static int record_dir_time(struct layer *L, const char *path, int fd, const struct tar_entry *e,
                           struct pycri_error *err) {
    struct stat st;
    if (fstat(fd, &st) < 0)
        return FAIL(errno, "fstat");
    if (L->ndirs == L->dirs_cap) {
        size_t cap = L->dirs_cap ? L->dirs_cap * 2 : 256;
        struct dir_time *d = realloc(L->dirs, cap * sizeof(*d));
        if (!d)
            return pycri_fail(err, ENOMEM, "layer: allocating directory records");
        L->dirs = d;
        L->dirs_cap = cap;
    }
    struct dir_time *d = &L->dirs[L->ndirs];
    d->path = strdup(path);
    if (!d->path)
        return pycri_fail(err, ENOMEM, "layer: allocating a path");
    d->dev = st.st_dev;
    d->ino = st.st_ino;
    d->order = L->ndirs;
    entry_times(e, d->ts);
    L->ndirs++;
    return 0;
}

static int make_dir(struct layer *L, struct pycri_layer *l, int dfd, const char *base,
                    const struct tar_entry *e, struct pycri_error *err) {
    if (mkdirat(dfd, base, 0700) < 0) {
        struct stat st;
        if (errno != EEXIST)
            return FAIL(errno, "mkdirat");
        if (fstatat(dfd, base, &st, AT_SYMLINK_NOFOLLOW) < 0)
            return FAIL(errno, "fstatat");
        if (!S_ISDIR(st.st_mode)) { /* a directory over a non-directory replaces it */
            if (remove_existing(L, dfd, base, err) < 0)
                return -1;
            if (mkdirat(dfd, base, 0700) < 0)
                return FAIL(errno, "mkdirat");
        }
    }
    cleanup_fd int fd = openat(dfd, base, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return FAIL(errno, "openat");
    if (meta_fd(L, l, fd, e, 0, 0, 0, err) < 0)
        return -1;
    if (dfd != L->pcache_fd)
        drop_parent_cache(L); /* this directory may be the cached one: its mode changed */
    l->stats.dirs++;
    return record_dir_time(L, e->path, fd, e, err);
}

/* Create base in dfd with create(); when something is already there, remove it
 * (rm -rf inside the root) and try once more. */
#define CREATE_REPLACING(call, what)                                   \
    do {                                                               \
        if ((call) < 0) {                                              \
            if (errno != EEXIST)                                       \
                return FAIL(errno, what);                              \
            if (remove_existing(L, dfd, base, err) < 0)                \
                return -1;                                             \
            if ((call) < 0)                                            \
                return FAIL(errno, what);                              \
        }                                                              \
    } while (0)

static int make_symlink(struct layer *L, struct pycri_layer *l, int dfd, const char *base,
                        const struct tar_entry *e, struct pycri_error *err) {
    if (!e->link[0])
        return FAIL(EINVAL, "symlink with an empty target");
    CREATE_REPLACING(symlinkat(e->link, dfd, base), "symlinkat");
    struct timespec ts[2];
    entry_times(e, ts);
    if (fchownat(dfd, base, e->uid, e->gid, AT_SYMLINK_NOFOLLOW) < 0)
        return FAIL(errno, "fchownat (no follow)");
    if (utimensat(dfd, base, ts, AT_SYMLINK_NOFOLLOW) < 0)
        return FAIL(errno, "utimensat (no follow)");
    l->stats.symlinks++;
    return 0;
}

/* Device nodes and FIFOs: never opened for I/O; metadata through an O_PATH fd. */
static int make_node(struct layer *L, struct pycri_layer *l, int dfd, const char *base,
                     const struct tar_entry *e, struct pycri_error *err) {
    mode_t fmt = e->type == '3' ? S_IFCHR : e->type == '4' ? S_IFBLK : S_IFIFO;
    dev_t dev = fmt == S_IFIFO ? 0 : makedev(e->devmajor, e->devminor);
    CREATE_REPLACING(mknodat(dfd, base, fmt | 0600, dev), "mknodat");
    cleanup_fd int fd = openat(dfd, base, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return FAIL(errno, "openat O_PATH");
    char proc[64];
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
    struct timespec ts[2];
    entry_times(e, ts);
    if (fchownat(fd, "", e->uid, e->gid, AT_EMPTY_PATH) < 0)
        return FAIL(errno, "fchownat (empty path)");
    if (fchmodat(AT_FDCWD, proc, e->mode, 0) < 0)
        return FAIL(errno, "chmod %04o via %s", e->mode, proc);
    if (apply_xattrs(L, l, -1, e, err) < 0)
        return -1;
    if (utimensat(AT_FDCWD, proc, ts, 0) < 0)
        return FAIL(errno, "utimensat via %s", proc);
    l->stats.devices++;
    return 0;
}

static int copy_fd(int in, int out) {
    char buf[65536];
    for (;;) {
        ssize_t n = copy_file_range(in, NULL, out, NULL, 1 << 30, 0);
        if (n == 0)
            return 0;
        if (n > 0)
            continue;
        if (errno != EXDEV && errno != ENOSYS && errno != EINVAL && errno != EOPNOTSUPP)
            return -1;
        break; /* fall back to read/write from wherever copy_file_range stopped */
    }
    for (;;) {
        ssize_t n = read(in, buf, sizeof(buf));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return (int)n;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(out, buf + off, (size_t)(n - off));
            if (w < 0 && errno != EINTR)
                return -1;
            off += w > 0 ? w : 0;
        }
    }
}

/* How the directories on the way to target look in one lower layer: *hidden
 * when one of them is a whiteout (0/0 char device), *opaque when one carries
 * trusted.overlay.opaque=y (the layers below cannot show through). Each
 * component is looked at as it is (O_PATH | O_NOFOLLOW), inside that root. */
static void lower_path_state(int lower, const char *target, int *hidden, int *opaque) {
    char buf[4097];
    *hidden = *opaque = 0;
    if (strlen(target) >= sizeof(buf))
        return;
    strcpy(buf, target);
    for (char *slash = strchr(buf, '/'); slash; slash = strchr(slash + 1, '/')) {
        *slash = '\0';
        int fd = open_in_root(lower, buf, O_PATH | O_NOFOLLOW);
        *slash = '/';
        if (fd < 0)
            return;
        struct stat st;
        char proc[64], v = 0;
        if (fstat(fd, &st) == 0 && S_ISCHR(st.st_mode) && st.st_rdev == 0) {
            *hidden = 1;
        } else if (S_ISDIR(st.st_mode)) {
            snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
            if (getxattr(proc, "trusted.overlay.opaque", &v, 1) == 1 && v == 'y')
                *opaque = 1;
        }
        close(fd);
        if (*hidden)
            return;
    }
}

/* A hardlink whose target is not in this layer: copy it up from the first lower
 * that shows it (resolved inside that lower's root), honouring whiteouts and
 * opaque directories the way overlayfs stacks the lowers (top first). */
static int copy_from_lower(struct layer *L, struct pycri_layer *l, int dfd, const char *base,
                           const char *target, struct pycri_error *err) {
    char tshown[160];
    tar_show(target, tshown, sizeof(tshown));
    for (int i = 0; i < L->nlowers; i++) {
        int hidden, opaque;
        lower_path_state(L->lower_fds[i], target, &hidden, &opaque);
        if (hidden)
            break;
        cleanup_fd int sfd = open_in_root(L->lower_fds[i], target, O_PATH | O_NOFOLLOW);
        if (sfd < 0) {
            if ((errno == ENOENT || errno == ENOTDIR) && !opaque)
                continue;
            if (errno == ENOENT || errno == ENOTDIR)
                break;
            return FAIL(errno, "hardlink target '%s' in lower layer %d: openat2", tshown, i);
        }
        struct stat st;
        if (fstat(sfd, &st) < 0)
            return FAIL(errno, "fstat of the hardlink target in lower layer %d", i);
        if (S_ISCHR(st.st_mode) && st.st_rdev == 0)
            break; /* whited out: hidden from here down */
        if (!S_ISREG(st.st_mode))
            return FAIL(EINVAL, "hardlink target '%s' in lower layer %d is not a regular file",
                        tshown, i);
        char proc[64];
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", sfd);
        cleanup_fd int in = open(proc, O_RDONLY | O_CLOEXEC);
        if (in < 0)
            return FAIL(errno, "reopening the hardlink target in lower layer %d", i);
        int out;
        CREATE_REPLACING(out = openat(dfd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW |
                                      O_CLOEXEC, 0600), "openat");
        cleanup_fd int outfd = out;
        struct timespec ts[2] = {st.st_atim, st.st_mtim};
        if (copy_fd(in, outfd) < 0)
            return FAIL(errno, "copying the hardlink target '%s' from lower layer %d", tshown, i);
        if (fchown(outfd, st.st_uid, st.st_gid) < 0 || fchmod(outfd, st.st_mode & 07777) < 0 ||
            futimens(outfd, ts) < 0)
            return FAIL(errno, "setting owner/mode/times of the copied hardlink target");
        l->stats.lower_copies++;
        return 0;
    }
    return FAIL(EINVAL, "hardlink target '%s' is neither in this layer nor in a lower layer",
                tshown);
}

static int make_hardlink(struct layer *L, struct pycri_layer *l, int dfd, const char *base,
                         struct tar_entry *e, struct pycri_error *err) {
    char what[260];
    snprintf(what, sizeof(what), "layer entry '%s': hardlink target", L->shown);
    if (tar_clean_path(e->link, L->lim.max_path_len, what, err) < 0)
        return -1;
    if (!e->link[0])
        return FAIL(EPERM, "hardlink to the layer root");
    char tshown[160];
    tar_show(e->link, tshown, sizeof(tshown));
    /* O_PATH|O_NOFOLLOW: a symlink target is linked as the symlink itself */
    cleanup_fd int tfd = open_in_root(L->root_fd, e->link, O_PATH | O_NOFOLLOW);
    if (tfd < 0) {
        if (errno != ENOENT)
            return FAIL(errno, "hardlink target '%s': openat2", tshown);
        return copy_from_lower(L, l, dfd, base, e->link, err);
    }
    struct stat ts, cur;
    if (fstat(tfd, &ts) < 0)
        return FAIL(errno, "fstat of hardlink target '%s'", tshown);
    if (S_ISDIR(ts.st_mode))
        return FAIL(EPERM, "hardlink target '%s' is a directory", tshown);
    if (fstatat(dfd, base, &cur, AT_SYMLINK_NOFOLLOW) == 0 && cur.st_dev == ts.st_dev &&
        cur.st_ino == ts.st_ino)
        return 0; /* already that file */
    CREATE_REPLACING(linkat(tfd, "", dfd, base, AT_EMPTY_PATH), "linkat");
    l->stats.hardlinks++;
    return 0;
}

static int make_whiteout(struct layer *L, struct pycri_layer *l, int dfd, const char *base,
                         struct pycri_error *err) {
    if (strcmp(base, WH_OPAQUE) == 0) {
        if (fsetxattr(dfd, "trusted.overlay.opaque", "y", 1, 0) < 0)
            return FAIL(errno, "fsetxattr trusted.overlay.opaque on the parent directory");
        l->stats.whiteouts++;
        return 0;
    }
    const char *name = base + strlen(WH_PREFIX);
    if (!name[0] || !strcmp(name, ".") || !strcmp(name, ".."))
        return FAIL(EINVAL, "whiteout names no file (it would hide '%s')",
                    name[0] ? name : "its own directory");
    if (strncmp(name, WH_PREFIX, strlen(WH_PREFIX)) == 0)
        return FAIL(EINVAL, "unknown whiteout meta-entry (names starting '.wh..wh.' are "
                    "reserved)");
    base = name; /* CREATE_REPLACING works on base */
    CREATE_REPLACING(mknodat(dfd, base, S_IFCHR | 0, makedev(0, 0)), "mknodat (whiteout)");
    l->stats.whiteouts++;
    return 0;
}

/* Apply a decoded entry. A regular file with data is left open in L->out_fd
 * (and L->cur) for the data that follows. */
static int apply_entry(struct layer *L, struct pycri_layer *l, struct tar_entry *e,
                       struct pycri_error *err) {
    tar_show(e->path, L->shown, sizeof(L->shown));
    if (tar_clean_path(e->path, L->lim.max_path_len, "layer entry", err) < 0)
        return -1;
    l->stats.entries++;
    if (!e->path[0]) {
        if (e->type != '5')
            return FAIL(EINVAL, "a non-directory entry names the layer root");
        if (meta_fd(L, l, L->root_fd, e, 0, 0, 0, err) < 0)
            return -1;
        L->root_newgid = new_file_gid(L, L->root_fd);
        return record_dir_time(L, "", L->root_fd, e, err);
    }
    /* ".wh." is reserved: as a directory on the way it would be ambiguous */
    for (const char *p = e->path; (p = strstr(p, WH_PREFIX)); p++)
        if ((p == e->path || p[-1] == '/') && strchr(p, '/'))
            return FAIL(EINVAL, "a whiteout name is used as a directory");
    const char *base;
    int dfd = parent_fd(L, e->path, &base, err);
    if (dfd < 0)
        return -1;
    if (strncmp(base, WH_PREFIX, strlen(WH_PREFIX)) == 0)
        return make_whiteout(L, l, dfd, base, err);
    switch (e->type) {
    case '5':
        return make_dir(L, l, dfd, base, e, err);
    case '2':
        return make_symlink(L, l, dfd, base, e, err);
    case '1':
        return make_hardlink(L, l, dfd, base, e, err);
    case '3': case '4': case '6':
        return make_node(L, l, dfd, base, e, err);
    case '0': {
        int fd;
        long long newgid = dfd == L->pcache_fd ? L->pcache_newgid
                           : dfd == L->root_fd ? L->root_newgid : -1;
        L->cur_owner_ok = newgid >= 0 && e->uid == L->euid && (long long)e->gid == newgid;
        L->cur_mode_ok = L->cur_owner_ok && L->umask >= 0 && !(e->mode & 07000) &&
                         !(e->mode & (unsigned)L->umask);
        mode_t mode = L->cur_mode_ok ? e->mode : 0600;
        CREATE_REPLACING(fd = openat(dfd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW |
                                     O_CLOEXEC, mode), "openat");
        L->out_fd = fd;
        l->stats.files++;
        return 0;
    }
    }
    return FAIL(EINVAL, "unexpected entry type '%c'", e->type);
}

/* The data of L->cur is complete: set its metadata and close it. */
static int file_done(struct layer *L, struct pycri_layer *l, struct pycri_error *err) {
    int rc = meta_fd(L, l, L->out_fd, &L->cur, 1, L->cur_owner_ok, L->cur_mode_ok, err);
    if (close(L->out_fd) < 0 && rc == 0)
        rc = FAIL(errno, "close");
    L->out_fd = -1;
    tar_entry_clear(&L->cur);
    return rc;
}

static void after_data(struct layer *L) {
    L->state = L->pad ? ST_PAD : ST_HEADER;
}

static int on_meta(struct layer *L, struct pycri_error *err) {
    int rc = 0;
    L->meta[L->meta_len] = '\0';
    if (L->meta_type == 'x') {
        rc = tar_parse_pax(L->meta, L->meta_len, 0, &L->pending, err);
    } else if (L->meta_type == 'g') {
        rc = tar_parse_pax(L->meta, L->meta_len, 1, &L->pending, err);
    } else { /* GNU 'L' / 'K': a NUL-terminated name, NUL padding only after it */
        size_t n = strlen(L->meta);
        for (size_t i = n; i < L->meta_len; i++)
            if (L->meta[i])
                return pycri_fail(err, EILSEQ, "layer: GNU long name with a NUL byte inside "
                                  "(header at byte %llu)", L->offset);
        char **slot = L->meta_type == 'L' ? &L->pending.path : &L->pending.link;
        free(*slot);
        *slot = n ? strdup(L->meta) : NULL;
        if (n && !*slot)
            rc = pycri_fail(err, ENOMEM, "layer: allocating a long name");
    }
    free(L->meta);
    L->meta = NULL;
    after_data(L);
    return rc;
}

static int on_header(struct layer *L, struct pycri_layer *l, unsigned long long at,
                     struct pycri_error *err) {
    if (tar_block_is_zero(L->hdr)) {
        if (++L->zeros == 2)
            L->state = ST_END;
        return 0;
    }
    if (L->zeros)
        return pycri_fail(err, EINVAL, "layer: a header follows a lone zero block at byte %llu "
                          "(corrupted archive)", at);
    struct tar_entry e;
    if (tar_decode_header(L->hdr, at, &L->pending, &e, err) < 0) {
        tar_entry_clear(&e);
        return -1;
    }
    L->remaining = e.size;
    L->pad = (TAR_BLOCK - e.size % TAR_BLOCK) % TAR_BLOCK;
    if (e.type == 'x' || e.type == 'g' || e.type == 'L' || e.type == 'K') {
        if (e.size > L->lim.max_meta_size)
            return pycri_fail(err, EFBIG, "layer: %s header of %llu bytes at byte %llu exceeds "
                              "the limit of %llu", e.type == 'L' || e.type == 'K' ?
                              "GNU long name" : "PAX", (unsigned long long)e.size, at,
                              L->lim.max_meta_size);
        L->meta = malloc(e.size + 1);
        if (!L->meta)
            return pycri_fail(err, ENOMEM, "layer: allocating a %llu-byte header",
                              (unsigned long long)e.size);
        L->meta_type = e.type;
        L->meta_len = 0;
        L->meta_want = e.size;
        L->state = ST_META;
        return e.size ? 0 : on_meta(L, err);
    }
    int rc = 0;
    if (e.size > L->lim.max_bytes)
        rc = pycri_fail(err, EFBIG, "layer: entry at byte %llu claims %llu bytes, over the "
                        "limit of %llu", at, (unsigned long long)e.size, L->lim.max_bytes);
    else if (l->stats.entries >= L->lim.max_entries)
        rc = pycri_fail(err, EFBIG, "layer: more than %llu entries", L->lim.max_entries);
    else
        rc = apply_entry(L, l, &e, err);
    if (rc < 0 || L->out_fd < 0) {
        tar_entry_clear(&e);
        if (rc < 0)
            return rc;
        L->state = L->remaining ? ST_SKIP : ST_HEADER; /* e.g. whiteout files' contents */
        return 0;
    }
    L->cur = e;
    if (L->remaining == 0) {
        L->state = ST_HEADER;
        return file_done(L, l, err);
    }
    L->state = ST_DATA;
    return 0;
}

static int consume(struct layer *L, struct pycri_layer *l, const unsigned char *buf, size_t len,
                   struct pycri_error *err) {
    while (len) {
        size_t n;
        switch (L->state) {
        case ST_HEADER:
            n = TAR_BLOCK - L->hdr_len < len ? TAR_BLOCK - L->hdr_len : len;
            memcpy(L->hdr + L->hdr_len, buf, n);
            L->hdr_len += n;
            L->offset += n;
            if (L->hdr_len == TAR_BLOCK) {
                L->hdr_len = 0;
                if (on_header(L, l, L->offset - TAR_BLOCK, err) < 0)
                    return -1;
            }
            break;
        case ST_DATA:
            n = L->remaining < len ? (size_t)L->remaining : len;
            for (size_t off = 0; off < n;) {
                ssize_t w = write(L->out_fd, buf + off, n - off);
                if (w < 0) {
                    if (errno == EINTR)
                        continue;
                    return FAIL(errno, "write");
                }
                off += (size_t)w;
            }
            L->offset += n;
            L->remaining -= n;
            if (!L->remaining) {
                after_data(L);
                if (file_done(L, l, err) < 0)
                    return -1;
            }
            break;
        case ST_META:
            n = L->meta_want - L->meta_len < len ? L->meta_want - L->meta_len : len;
            memcpy(L->meta + L->meta_len, buf, n);
            L->meta_len += n;
            L->offset += n;
            if (L->meta_len == L->meta_want && on_meta(L, err) < 0)
                return -1;
            break;
        case ST_SKIP:
            n = L->remaining < len ? (size_t)L->remaining : len;
            L->remaining -= n;
            L->offset += n;
            if (!L->remaining)
                after_data(L);
            break;
        case ST_PAD:
            n = L->pad < len ? (size_t)L->pad : len;
            L->pad -= n;
            L->offset += n;
            if (!L->pad)
                L->state = ST_HEADER;
            break;
        default: /* ST_END: trailing blocks (record padding) are hashed, not parsed */
            n = len;
            L->offset += n;
            break;
        }
        buf += n;
        len -= n;
    }
    return 0;
}

/* The umask without changing it (umask(2) can only swap it, racing other
 * threads): /proc/self/status has it since Linux 4.7. -1 if unknown. */
static int current_umask(void) {
    FILE *f = fopen("/proc/self/status", "re");
    char line[256];
    int mask = -1;
    if (!f)
        return -1;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "Umask: %o", (unsigned *)&mask) == 1)
            break;
    fclose(f);
    return mask >= 0 && mask <= 0777 ? mask : -1;
}

PYCRI_EXPORT int pycri_layer_open(struct pycri_layer *l, int dirfd, const char *dest,
                                  const struct pycri_layer_limits *limits, const int *lower_fds,
                                  int nlowers, unsigned int flags, struct pycri_error *err) {
    memset(l, 0, sizeof(*l));
    if (nlowers < 0 || nlowers > PYCRI_LAYER_MAX_LOWERS)
        return pycri_fail(err, EINVAL, "layer: %d lower layers (at most %d)", nlowers,
                          PYCRI_LAYER_MAX_LOWERS);
    struct layer *L = calloc(1, sizeof(*L));
    if (!L)
        return pycri_fail(err, ENOMEM, "layer: allocating state");
    L->out_fd = L->pcache_fd = L->root_fd = -1;
    l->impl = L; /* from here on, close() frees whatever open got to */
    L->flags = flags;
    if (limits)
        L->lim = *limits;
    if (!L->lim.max_entries)
        L->lim.max_entries = 1000000;
    if (!L->lim.max_bytes)
        L->lim.max_bytes = 64ULL << 30;
    if (!L->lim.max_meta_size)
        L->lim.max_meta_size = 1 << 20;
    if (!L->lim.max_path_len || L->lim.max_path_len > 4096)
        L->lim.max_path_len = 4096;
    L->root_fd = openat(dirfd, dest, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (L->root_fd < 0)
        return pycri_fail(err, errno, "layer: open destination %s", dest);
    for (int i = 0; i < nlowers; i++) {
        L->lower_fds[i] = fcntl(lower_fds[i], F_DUPFD_CLOEXEC, 3);
        if (L->lower_fds[i] < 0)
            return pycri_fail(err, errno, "layer: dup lower layer fd %d", lower_fds[i]);
        L->nlowers = i + 1;
    }
    L->euid = geteuid();
    L->egid = getegid();
    L->umask = current_umask();
    if (fgetxattr(L->root_fd, "system.posix_acl_default", NULL, 0) >= 0)
        L->umask = -1;
    L->pcache_newgid = -1;
    L->root_newgid = new_file_gid(L, L->root_fd);
    return pycri_sha256_init(&L->sha, err);
}

PYCRI_EXPORT int pycri_layer_feed(struct pycri_layer *l, const unsigned char *buf, size_t len,
                                  struct pycri_error *err) {
    struct layer *L = l->impl;
    if (!L)
        return pycri_fail(err, EBADF, "layer: feed on a closed layer");
    if (L->failed || L->finished)
        return pycri_fail(err, EINVAL, "layer: feed after %s", L->failed ? "an error" : "finish");
    if (len > L->lim.max_bytes - l->stats.bytes) {
        L->failed = 1;
        return pycri_fail(err, EFBIG, "layer: uncompressed size exceeds the limit of %llu bytes",
                          L->lim.max_bytes);
    }
    if ((!(L->flags & PYCRI_LAYER_HASH_SEPARATELY) &&
         pycri_sha256_update(&L->sha, buf, len, err) < 0) ||
        consume(L, l, buf, len, err) < 0) {
        L->failed = 1;
        return -1;
    }
    l->stats.bytes += len;
    return 0;
}

PYCRI_EXPORT int pycri_layer_hash(struct pycri_layer *l, const unsigned char *buf, size_t len,
                                  struct pycri_error *err) {
    struct layer *L = l->impl;
    if (!L)
        return pycri_fail(err, EBADF, "layer: hash on a closed layer");
    if (!(L->flags & PYCRI_LAYER_HASH_SEPARATELY))
        return pycri_fail(err, EINVAL, "layer: hash without PYCRI_LAYER_HASH_SEPARATELY");
    L->hashed += len;
    return pycri_sha256_update(&L->sha, buf, len, err);
}

static int cmp_dir_inode(const void *a, const void *b) {
    const struct dir_time *x = a, *y = b;
    if (x->dev != y->dev)
        return x->dev < y->dev ? -1 : 1;
    if (x->ino != y->ino)
        return x->ino < y->ino ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

static int cmp_dir_order(const void *a, const void *b) {
    const struct dir_time *x = a, *y = b;
    return x->order < y->order ? -1 : x->order > y->order;
}

/* Directory mtimes last (creating children changes them), last-created first;
 * when a directory appears twice the later entry wins. */
static int apply_dir_times(struct layer *L, struct pycri_error *err) {
    if (!L->ndirs)
        return 0;
    qsort(L->dirs, L->ndirs, sizeof(*L->dirs), cmp_dir_inode);
    for (size_t i = 0; i + 1 < L->ndirs; i++)
        if (L->dirs[i].dev == L->dirs[i + 1].dev && L->dirs[i].ino == L->dirs[i + 1].ino)
            L->dirs[i].ts[1].tv_nsec = -1; /* superseded */
    qsort(L->dirs, L->ndirs, sizeof(*L->dirs), cmp_dir_order);
    for (size_t i = L->ndirs; i-- > 0;) {
        struct dir_time *d = &L->dirs[i];
        if (d->ts[1].tv_nsec < 0)
            continue;
        int fd = d->path[0] ? open_in_root(L->root_fd, d->path,
                                           O_RDONLY | O_DIRECTORY | O_NOFOLLOW)
                            : L->root_fd;
        struct stat st;
        if (fd < 0)
            continue; /* replaced by a later entry */
        int rc = 0;
        if (fstat(fd, &st) == 0 && st.st_dev == d->dev && st.st_ino == d->ino &&
            futimens(fd, d->ts) < 0) {
            tar_show(d->path, L->shown, sizeof(L->shown));
            rc = FAIL(errno, "futimens");
        }
        if (fd != L->root_fd)
            close(fd);
        if (rc < 0)
            return rc;
    }
    return 0;
}

PYCRI_EXPORT int pycri_layer_finish(struct pycri_layer *l, char *diff_id_hex,
                                    struct pycri_error *err) {
    struct layer *L = l->impl;
    if (!L)
        return pycri_fail(err, EBADF, "layer: finish on a closed layer");
    if (L->failed || L->finished)
        return pycri_fail(err, EINVAL, "layer: finish after %s",
                          L->failed ? "an error" : "finish");
    L->failed = 1; /* until proven otherwise */
    if (L->offset == 0)
        return pycri_fail(err, EINVAL, "layer: empty stream (no tar data at all)");
    if (!(L->state == ST_END || (L->state == ST_HEADER && L->hdr_len == 0 && L->zeros == 1)))
        return pycri_fail(err, EINVAL, "layer: truncated tar stream: it ends at byte %llu %s",
                          L->offset, L->state == ST_HEADER && L->hdr_len == 0
                                         ? "without an end-of-archive block"
                                         : "inside an entry");
    if ((L->flags & PYCRI_LAYER_HASH_SEPARATELY) && L->hashed != l->stats.bytes)
        return pycri_fail(err, EINVAL, "layer: %llu bytes hashed but %llu fed: the diff_id "
                          "would not match the stream", L->hashed, l->stats.bytes);
    if (apply_dir_times(L, err) < 0)
        return -1;
    if (pycri_sha256_final(&L->sha, diff_id_hex, err) < 0)
        return -1;
    L->failed = 0;
    L->finished = 1;
    return 0;
}

PYCRI_EXPORT void pycri_layer_close(struct pycri_layer *l) {
    struct layer *L = l->impl;
    if (!L)
        return;
    l->impl = NULL;
    if (L->out_fd >= 0)
        close(L->out_fd);
    if (L->root_fd >= 0)
        close(L->root_fd);
    for (int i = 0; i < L->nlowers; i++)
        close(L->lower_fds[i]);
    drop_parent_cache(L);
    for (size_t i = 0; i < L->ndirs; i++)
        free(L->dirs[i].path);
    free(L->dirs);
    free(L->meta);
    tar_pending_clear(&L->pending);
    tar_entry_clear(&L->cur);
    free(L);
}

PYCRI_EXPORT int pycri_remove_tree(const char *path, struct pycri_error *err) {
    char buf[PATH_MAX];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof(buf))
        return pycri_fail(err, ENAMETOOLONG, "remove %s: bad path", path);
    memcpy(buf, path, n + 1);
    while (n > 1 && buf[n - 1] == '/')
        buf[--n] = '\0';
    char *slash = strrchr(buf, '/');
    const char *base = slash ? slash + 1 : buf;
    int dfd;
    if (!slash)
        dfd = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    else if (slash == buf)
        dfd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    else {
        *slash = '\0';
        dfd = open(buf, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    }
    if (dfd < 0)
        return pycri_fail(err, errno, "remove %s: open its directory", path);
    int rc = remove_tree(dfd, base, 0);
    int e = errno;
    close(dfd);
    if (rc < 0 && e != ENOENT)
        return pycri_fail(err, e, "remove %s", path);
    return 0;
}


PYCRI_EXPORT int pycri_mkdir_each(const char *const *paths, const int *modes, int n, int *made,
                                  struct pycri_error *err) {
    *made = 0;
    for (int i = 0; i < n; i++) {
        if (mkdir(paths[i], (mode_t)modes[i]) < 0)
            return pycri_fail(err, errno, "mkdir %s", paths[i]);
        *made = i + 1;
    }
    return 0;
}
