/* mount.c - the container's mount namespace: rootfs, /proc, /sys, /dev, bind
 * mounts by fd, masked and read-only paths, pivot_root.
 *
 * Everything except the two host-side helpers at the end runs in the child
 * between clone and execve: only syscalls and plain string handling, no
 * allocation, no stdio. Every path that comes from the image or the spec is
 * resolved relative to the rootfs fd with openat2(RESOLVE_IN_ROOT |
 * RESOLVE_NO_MAGICLINKS) and mounted onto the resulting fd, so a symlink in the
 * image can never send a mount to the host.
 */
#include <fcntl.h>
#include <limits.h>
#include <linux/magic.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "spawn_child.h"

/* --- small async-signal-safe string helpers --------------------------------- */

size_t pycri__strlcat(char *dst, const char *src, size_t size) {
    size_t n = strnlen(dst, size);
    size_t i = 0;
    if (n >= size)
        return n;
    for (; src[i] && n + i + 1 < size; i++)
        dst[n + i] = src[i];
    dst[n + i] = '\0';
    return n + i;
}

static void utoa(unsigned long long v, char *out) {
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (int i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    out[n] = '\0';
}

void pycri__fdpath(char *buf, int fd) {
    char num[24];
    buf[0] = '\0';
    utoa((unsigned)fd, num);
    pycri__strlcat(buf, "/proc/self/fd/", 32);
    pycri__strlcat(buf, num, 32);
}

void pycri__cfail(struct pycri__cerr *ce, int stage, int code, const char *what,
                  const char *path) {
    ce->stage = stage;
    ce->code = code;
    ce->plain = 0;
    ce->text[0] = '\0';
    pycri__strlcat(ce->text, what, sizeof(ce->text));
    if (path) {
        pycri__strlcat(ce->text, " ", sizeof(ce->text));
        pycri__strlcat(ce->text, path, sizeof(ce->text));
    }
}

/* --- in-root resolution ------------------------------------------------------ */

int pycri__inroot_open(int rootfd, const char *path, int flags, unsigned long long extra) {
    struct open_how how = {
        .flags = (unsigned long long)(flags | O_CLOEXEC),
        .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | extra,
    };
    while (*path == '/')
        path++;
    if (!*path)
        path = ".";
    for (int tries = 0;; tries++) {
        int fd = (int)syscall(SYS_openat2, rootfd, path, &how, sizeof(how));
        if (fd >= 0 || errno != EAGAIN || tries > 16)
            return fd;
    }
}

/* Split buf (already without trailing slashes) at its last '/': returns the
 * base name and leaves the parent in buf, or NULL when there is no '/'. */
static char *split_last(char *buf) {
    char *slash = strrchr(buf, '/');
    if (!slash)
        return NULL;
    *slash = '\0';
    return slash + 1;
}

static int copy_path(char *buf, const char *path) {
    while (*path == '/')
        path++;
    size_t n = strlen(path);
    if (n >= PATH_MAX) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(buf, path, n + 1);
    while (n > 0 && buf[n - 1] == '/')
        buf[--n] = '\0';
    return 0;
}

int pycri__inroot_mkdirs(int rootfd, const char *path, int mode) {
    char buf[PATH_MAX];
    if (copy_path(buf, path) < 0)
        return -1;
    int fd = pycri__inroot_open(rootfd, buf, O_PATH | O_DIRECTORY, 0);
    if (fd >= 0 || errno != ENOENT)
        return fd;
    /* Walk the prefixes; create each missing one inside the dir that the
     * previous (in-root resolved) prefix opened. mkdirat never follows a final
     * symlink, and the next openat2 resolves whatever is there in-root. */
    int parent = pycri__inroot_open(rootfd, ".", O_PATH | O_DIRECTORY, 0);
    if (parent < 0)
        return -1;
    char *p = buf;
    for (;;) {
        char *slash = strchr(p, '/');
        if (slash)
            *slash = '\0';
        if (*p) {
            if (mkdirat(parent, p, (mode_t)mode) < 0 && errno != EEXIST) {
                close(parent);
                return -1;
            }
            int next = pycri__inroot_open(rootfd, buf, O_PATH | O_DIRECTORY, 0);
            close(parent);
            if (next < 0)
                return -1;
            parent = next;
        }
        if (!slash)
            return parent;
        *slash = '/';
        p = slash + 1;
    }
}

/* Open target in-root, creating it (a dir, or an empty file) when missing. */
int pycri__inroot_target(int rootfd, const char *path, int is_dir) {
    int fd = pycri__inroot_open(rootfd, path, O_PATH, 0);
    if (fd >= 0 || errno != ENOENT)
        return fd;
    if (is_dir) {
        return pycri__inroot_mkdirs(rootfd, path, 0755);
    }
    char buf[PATH_MAX];
    if (copy_path(buf, path) < 0)
        return -1;
    char *base = split_last(buf);
    int parent = base ? pycri__inroot_mkdirs(rootfd, buf, 0755)
                      : pycri__inroot_open(rootfd, ".", O_PATH | O_DIRECTORY, 0);
    if (!base)
        base = buf;
    if (parent < 0)
        return -1;
    int f = openat(parent, base, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC, 0644);
    int saved = errno;
    close(parent);
    if (f >= 0)
        close(f);
    else if (saved != EEXIST) {
        errno = saved;
        return -1;
    }
    return pycri__inroot_open(rootfd, path, O_PATH, 0);
}

/* --- mounting onto fds ------------------------------------------------------- */

static int mount_at(int fd, const char *src, const char *type, unsigned long flags,
                    const char *data) {
    char p[32];
    pycri__fdpath(p, fd);
    return mount(src, p, type, flags, data);
}

static const unsigned long long prop_flag[3] = {MS_PRIVATE, MS_SLAVE, MS_SHARED};

/* Bind the mount tree at srcfd onto tfd: clone with open_tree, set read-only on
 * the detached clone, attach with move_mount, then set propagation. */
static int bind_fd(int srcfd, int tfd, int recursive, int ro, int rro, unsigned long long extra,
                   int prop) {
    unsigned int otf = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH;
    if (recursive)
        otf |= AT_RECURSIVE;
    int tree = open_tree(srcfd, "", otf);
    if (tree < 0)
        return -1;
    if (ro || rro) {
        struct mount_attr a = {.attr_set = MOUNT_ATTR_RDONLY};
        if (mount_setattr(tree, "", AT_EMPTY_PATH | (rro ? AT_RECURSIVE : 0), &a, sizeof(a)) < 0)
            goto fail;
    }
    if (extra) {
        struct mount_attr a = {.attr_set = extra};
        if (mount_setattr(tree, "", AT_EMPTY_PATH | AT_RECURSIVE, &a, sizeof(a)) < 0)
            goto fail;
    }
    if (move_mount(tree, "", tfd, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) < 0)
        goto fail;
    if (prop >= 0 && prop <= 2) {
        struct mount_attr a = {.propagation = prop_flag[prop]};
        if (mount_setattr(tree, "", AT_EMPTY_PATH | AT_RECURSIVE, &a, sizeof(a)) < 0)
            goto fail;
    }
    close(tree);
    return 0;
fail:;
    int saved = errno;
    close(tree);
    errno = saved;
    return -1;
}

/* A standard mount point (proc, sys, dev): created if missing, and refused if
 * the image made it a symlink. */
static int std_target(int rootfd, const char *name, struct pycri__cerr *ce) {
    int fd = pycri__inroot_mkdirs(rootfd, name, 0755);
    if (fd < 0) {
        pycri__cfail(ce, PYCRI_STAGE_MOUNT, errno, "mkdir (in-root)", name);
        return -1;
    }
    close(fd);
    fd = pycri__inroot_open(rootfd, name, O_PATH | O_DIRECTORY, RESOLVE_NO_SYMLINKS);
    if (fd < 0)
        pycri__cfail(ce, PYCRI_STAGE_MOUNT, errno, "openat2 (no symlinks)", name);
    return fd;
}

static int fail_at(struct pycri__cerr *ce, int stage, const char *what, const char *path) {
    pycri__cfail(ce, stage, errno, what, path);
    return -1;
}

/* --- privileged: the host's device nodes --------------------------------------- */

struct kdirent64 {
    unsigned long long ino;
    long long off;
    unsigned short reclen;
    unsigned char type;
    char name[];
};

/* Make a node like the host's (st) at name in dir: mknod with the host's mode
 * and owner, or, where mknod is refused (a user namespace), an empty file with
 * the host's node bound onto it. EEXIST means the name is the container's own
 * (null, tty, ptmx, ...): it stays. */
static int host_node(const struct pycri__plan *plan, int hostdir, int dir, const char *name,
                     const struct stat *st, struct pycri__cerr *ce) {
    if (mknodat(dir, name, st->st_mode, st->st_rdev) == 0) {
        if (!plan->userns_any && fchownat(dir, name, st->st_uid, st->st_gid, AT_SYMLINK_NOFOLLOW) < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "chown /dev node", name);
        return 0;
    }
    if (errno == EEXIST)
        return 0;
    if (errno != EPERM)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "mknod /dev node", name);
    int src cleanup_fd = openat(hostdir, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (src < 0)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "open host /dev node", name);
    int f = openat(dir, name, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
    if (f < 0)
        return errno == EEXIST ? 0 : fail_at(ce, PYCRI_STAGE_MOUNT, "create /dev node", name);
    close(f);
    int t cleanup_fd = openat(dir, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (t < 0 || bind_fd(src, t, 0, 0, 0, 0, -1) < 0)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "bind host /dev node", name);
    return 0;
}

/* Every char and block node under hostdir (host /dev or a directory below it,
 * all on filesystem fsdev) recreated at the same place under dir (the
 * container's /dev), as privileged containers get them. Subdirectories on
 * another filesystem (/dev/pts, /dev/shm, /dev/mqueue, /dev/hugepages),
 * directories the container's /dev already has, symlinks, sockets and FIFOs are
 * skipped, and so is /dev/console (its handling is the same as unprivileged). */
static int copy_host_devices(const struct pycri__plan *plan, int hostdir, int dir, dev_t fsdev,
                             int depth, struct pycri__cerr *ce) {
    char buf[4096] __attribute__((aligned(8)));
    for (;;) {
        long n = syscall(SYS_getdents64, hostdir, buf, sizeof(buf));
        if (n < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "getdents64", "host /dev");
        if (n == 0)
            return 0;
        for (long off = 0; off < n;) {
            const struct kdirent64 *e = (const struct kdirent64 *)(buf + off);
            off += e->reclen;
            const char *name = e->name;
            if (!strcmp(name, ".") || !strcmp(name, "..") ||
                (depth == 0 && !strcmp(name, "console")))
                continue;
            struct stat st;
            if (fstatat(hostdir, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
                if (errno == ENOENT)
                    continue; /* removed meanwhile */
                return fail_at(ce, PYCRI_STAGE_MOUNT, "fstatat host /dev entry", name);
            }
            if (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)) {
                if (host_node(plan, hostdir, dir, name, &st, ce) < 0)
                    return -1;
                continue;
            }
            if (!S_ISDIR(st.st_mode) || st.st_dev != fsdev || depth >= 8)
                continue;
            if (mkdirat(dir, name, st.st_mode & 07777) < 0) {
                if (errno == EEXIST)
                    continue; /* the container's own: pts, shm, mqueue */
                return fail_at(ce, PYCRI_STAGE_MOUNT, "mkdir /dev dir", name);
            }
            if (!plan->userns_any)
                fchownat(dir, name, st.st_uid, st.st_gid, AT_SYMLINK_NOFOLLOW);
            int hsub cleanup_fd =
                openat(hostdir, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            int csub cleanup_fd = openat(dir, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (hsub < 0 || csub < 0)
                return fail_at(ce, PYCRI_STAGE_MOUNT, "open /dev dir", name);
            if (copy_host_devices(plan, hsub, csub, fsdev, depth + 1, ce) < 0)
                return -1;
        }
    }
}

static int add_host_devices(const struct pycri__plan *plan, int dev, struct pycri__cerr *ce) {
    /* still the host's /dev: this runs before pivot_root */
    int host cleanup_fd = open("/dev", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    struct stat st;
    if (host < 0 || fstat(host, &st) < 0)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "open host", "/dev");
    return copy_host_devices(plan, host, dev, st.st_dev, 0, ce);
}

struct devnode {
    const char *name;
    unsigned int major, minor;
};
static const struct devnode devnodes[] = {
    {"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7},
    {"random", 1, 8}, {"urandom", 1, 9}, {"tty", 5, 0},
};

/* A fresh /dev's own content: the standard nodes (created; or, where mknod is
 * refused - a user namespace - the host's bound), links, and the mount point
 * dirs. dev is the tmpfs's root. */
static int populate_dev(int dev, int bind_nodes, struct pycri__cerr *ce) {
    /* The tmpfs is fresh and ours: names inside it need no in-root care. */
    for (size_t i = 0; i < sizeof(devnodes) / sizeof(devnodes[0]); i++) {
        const struct devnode *d = &devnodes[i];
        if (!bind_nodes &&
            mknodat(dev, d->name, S_IFCHR | 0666, makedev(d->major, d->minor)) == 0) {
            /* 0666 whatever the umask (the caller's, when made ahead, is not 0) */
            if (fchmodat(dev, d->name, 0666, 0) < 0)
                return fail_at(ce, PYCRI_STAGE_MOUNT, "chmod /dev/", d->name);
            continue;
        }
        /* In a user namespace mknod is refused: bind the host's node instead. */
        char host[64] = "/dev/";
        pycri__strlcat(host, d->name, sizeof(host));
        int src cleanup_fd = open(host, O_PATH | O_CLOEXEC);
        if (src < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "open", host);
        int f = openat(dev, d->name, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0666);
        if (f < 0 && errno != EEXIST)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "create", host);
        if (f >= 0)
            close(f);
        int tf cleanup_fd = openat(dev, d->name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
        if (tf < 0 || bind_fd(src, tf, 0, 0, 0, 0, -1) < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "bind", host);
    }
    static const char *const links[][2] = {
        {"/proc/self/fd", "fd"},       {"/proc/self/fd/0", "stdin"},
        {"/proc/self/fd/1", "stdout"}, {"/proc/self/fd/2", "stderr"},
        {"pts/ptmx", "ptmx"},
    };
    for (size_t i = 0; i < sizeof(links) / sizeof(links[0]); i++)
        if (symlinkat(links[i][0], dev, links[i][1]) < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "symlink /dev/", links[i][1]);

    static const char *const dirs[] = {"pts", "shm", "mqueue"};
    for (size_t i = 0; i < 3; i++)
        if (mkdirat(dev, dirs[i], 0755) < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "mkdir /dev/", dirs[i]);
    return 0;
}

static int setup_dev(const struct pycri__plan *plan, int rootfd, struct pycri__cerr *ce) {
    const struct pycri_spawn_spec *s = plan->spec;
    int t cleanup_fd = std_target(rootfd, "dev", ce);
    if (t < 0)
        return -1;
    if (s->dev_premounted) {
        /* made and filled by the caller ahead (pycri_dev_premount), detached */
        if (move_mount(s->dev_mount_fd, "", t, "",
                       MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "attach the prepared tmpfs at", "/dev");
    } else if (mount_at(t, "tmpfs", "tmpfs", MS_NOSUID | MS_STRICTATIME,
                        "mode=755,size=65536k") < 0) {
        return fail_at(ce, PYCRI_STAGE_MOUNT, "mount tmpfs", "/dev");
    }
    int dev cleanup_fd = pycri__inroot_open(rootfd, "dev", O_PATH | O_DIRECTORY, RESOLVE_NO_SYMLINKS);
    if (dev < 0)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "openat2", "/dev");
    if (!s->dev_premounted && populate_dev(dev, plan->userns_any, ce) < 0)
        return -1;

    int pts cleanup_fd = openat(dev, "pts", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (pts < 0)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "open", "/dev/pts");
    if (mount_at(pts, "devpts", "devpts", MS_NOSUID | MS_NOEXEC,
                 "newinstance,ptmxmode=0666,mode=0620,gid=5") < 0) {
        /* gid 5 may be unmapped in a user namespace */
        if (errno != EINVAL ||
            mount_at(pts, "devpts", "devpts", MS_NOSUID | MS_NOEXEC,
                     "newinstance,ptmxmode=0666,mode=0620") < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "mount devpts", "/dev/pts");
    }

    int shm cleanup_fd = openat(dev, "shm", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (shm < 0)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "open", "/dev/shm");
    if (plan->um && plan->um->shm >= 0) {
        if (pycri__userns_attach(plan->um->shm, shm, 0, 0, PYCRI_PROP_PRIVATE) < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "attach /dev/shm from", s->shm_path);
    } else if (s->shm_path) {
        int src cleanup_fd = open(s->shm_path, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (src < 0 || bind_fd(src, shm, 0, 0, 0, 0, PYCRI_PROP_PRIVATE) < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "bind /dev/shm from", s->shm_path);
    } else {
        char opts[64] = "mode=1777,size=";
        char num[24];
        utoa(s->shm_size ? s->shm_size : 64ULL << 20, num);
        pycri__strlcat(opts, num, sizeof(opts));
        if (mount_at(shm, "shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts) < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "mount tmpfs", "/dev/shm");
    }
    int mq cleanup_fd = openat(dev, "mqueue", O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (mq < 0)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "open", "/dev/mqueue");
    if (mount_at(mq, "mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0) {
        /* mqueue needs an IPC namespace owned by the mounter's user namespace; a
         * pod's IPC namespace seen from a new user namespace is not: go without */
        if (!(s->ns_mode[PYCRI_NS_USER] == PYCRI_NS_NEW && (errno == EPERM || errno == EACCES)))
            return fail_at(ce, PYCRI_STAGE_MOUNT, "mount mqueue", "/dev/mqueue");
    }
    if (s->host_devices && add_host_devices(plan, dev, ce) < 0)
        return -1;
    return 0;
}

/* path (any leading slashes) is dir or below it, by its text */
static int declared_under(const char *path, const char *dir) {
    while (*path == '/')
        path++;
    size_t n = strlen(dir);
    return strncmp(path, dir, n) == 0 && (path[n] == '\0' || path[n] == '/');
}

/* tree: a detached mount of source prepared before the clone (userns.c), or -1 */
static int do_bind(int rootfd, const char *source, int tree, const char *target, int ro, int rro,
                   int nonrec, int prop, struct pycri__cerr *ce) {
    int src cleanup_fd = tree >= 0 ? -1 : open(source, O_PATH | O_CLOEXEC);
    if (src < 0 && tree < 0)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "open bind source", source);
    struct stat st;
    if (fstat(tree >= 0 ? tree : src, &st) < 0)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "fstat", source);
    int t cleanup_fd = pycri__inroot_target(rootfd, target, S_ISDIR(st.st_mode));
    if (t < 0)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "openat2 bind target", target);
    /* an image symlink must not turn a mount into one over procfs or sysfs
     * (binds meant for /proc or /sys say so in their target; policy decides) */
    struct statfs sfs;
    if (fstatfs(t, &sfs) < 0)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "fstatfs bind target", target);
    if ((sfs.f_type == PROC_SUPER_MAGIC || sfs.f_type == SYSFS_MAGIC) &&
        !declared_under(target, "proc") && !declared_under(target, "sys")) {
        errno = EPERM;
        return fail_at(ce, PYCRI_STAGE_MOUNT, "bind target resolves into /proc or /sys:", target);
    }
    if (tree >= 0) {
        if (pycri__userns_attach(tree, t, ro, rro, prop) < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "bind mount onto", target);
        return 0;
    }
    if (prop != PYCRI_PROP_RSHARED) {
        if (bind_fd(src, t, !nonrec, ro, rro, 0, prop) < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "bind mount onto", target);
        return 0;
    }
    /* rshared: the mount must join the source's peer group, which a mount(2)
     * bind does and an open_tree clone does not; both ends still go by fd */
    char sp[32], tp[32];
    pycri__fdpath(sp, src);
    pycri__fdpath(tp, t);
    if (mount(sp, tp, NULL, MS_BIND | (nonrec ? 0 : MS_REC), NULL) < 0)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "bind mount onto", target);
    int top cleanup_fd = pycri__inroot_open(rootfd, target, O_PATH, 0);
    if (top < 0)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "openat2 bind target", target);
    struct mount_attr a = {.propagation = MS_SHARED};
    if (mount_setattr(top, "", AT_EMPTY_PATH | AT_RECURSIVE, &a, sizeof(a)) < 0)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "make rshared", target);
    if (ro || rro) {
        struct mount_attr r = {.attr_set = MOUNT_ATTR_RDONLY};
        if (mount_setattr(top, "", AT_EMPTY_PATH | (rro ? AT_RECURSIVE : 0), &r, sizeof(r)) < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "read-only", target);
    }
    return 0;
}

static int mask_paths(const struct pycri__plan *plan, int rootfd, struct pycri__cerr *ce) {
    const char *const *m = plan->spec->masked_paths;
    /* opened here: open_tree only clones mounts of the caller's own mount namespace */
    int devnull cleanup_fd = open("/dev/null", O_PATH | O_CLOEXEC);
    if (devnull < 0)
        return fail_at(ce, PYCRI_STAGE_MOUNT, "open", "/dev/null");
    /* Masked dirs get an empty read-only tmpfs: one made for the first, clones of
     * it for the rest (a clone is a mount, not a new filesystem: cheaper). */
    int empty cleanup_fd = -1;
    for (; m && *m; m++) {
        int fd cleanup_fd = pycri__inroot_open(rootfd, *m, O_PATH, 0);
        if (fd < 0) {
            if (errno == ENOENT)
                continue;
            return fail_at(ce, PYCRI_STAGE_MOUNT, "openat2 masked path", *m);
        }
        struct stat st;
        if (fstat(fd, &st) < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "fstat masked path", *m);
        int rc;
        if (!S_ISDIR(st.st_mode)) {
            rc = bind_fd(devnull, fd, 0, 0, 0, 0, -1);
        } else if (empty >= 0) {
            rc = bind_fd(empty, fd, 0, 1, 0, 0, -1);
        } else {
            rc = mount_at(fd, "tmpfs", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                          "mode=0755");
            if (rc == 0) /* its root, for the clones */
                empty = pycri__inroot_open(rootfd, *m, O_PATH | O_DIRECTORY, 0);
        }
        if (rc < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "mask", *m);
    }
    const char *const *r = plan->spec->readonly_paths;
    for (; r && *r; r++) {
        int fd cleanup_fd = pycri__inroot_open(rootfd, *r, O_PATH, 0);
        if (fd < 0) {
            if (errno == ENOENT)
                continue;
            return fail_at(ce, PYCRI_STAGE_MOUNT, "openat2 readonly path", *r);
        }
        if (bind_fd(fd, fd, 1, 1, 1, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC, -1) <
            0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "readonly bind", *r);
    }
    return 0;
}

int pycri__mount_setup(const struct pycri__plan *plan, int *procfd, int *sysctls_done,
                       struct pycri__cerr *ce) {
    const struct pycri_spawn_spec *s = plan->spec;
    int prop = s->root_propagation;
    if (prop < 0 || prop > 2)
        prop = 0;
    if (mount(NULL, "/", NULL, MS_REC | prop_flag[prop], NULL) < 0)
        return fail_at(ce, PYCRI_STAGE_ROOTFS, "make / propagation", NULL);
    if (!s->rootfs)
        return 0;

    if (plan->rootfs_parent[0]) {
        /* "/" stays shared: keep the rootfs mount itself from propagating to the
         * host by making the mount under it private (pivot_root needs that too) */
        if (mount(NULL, plan->rootfs_parent, NULL, MS_PRIVATE, NULL) < 0)
            return fail_at(ce, PYCRI_STAGE_ROOTFS, "make private", plan->rootfs_parent);
    }
    int rootfd cleanup_fd = -1;
    if (plan->um) {
        if ((rootfd = pycri__userns_attach_rootfs(plan, ce)) < 0)
            return -1;
    } else if (s->rootfs_premounted) {
        /* the overlay the caller made ahead (pycri_overlay_premount), detached */
        if (move_mount(s->rootfs_mount_fd, "", AT_FDCWD, s->rootfs, MOVE_MOUNT_F_EMPTY_PATH) < 0)
            return fail_at(ce, PYCRI_STAGE_ROOTFS, "attach the prepared overlay at", s->rootfs);
    } else if (s->overlay_lower) {
        if (mount("overlay", s->rootfs, "overlay", 0, plan->overlay_opts) < 0)
            return fail_at(ce, PYCRI_STAGE_ROOTFS, "mount overlay at", s->rootfs);
    } else if (mount(s->rootfs, s->rootfs, NULL, MS_BIND | MS_REC, NULL) < 0) {
        return fail_at(ce, PYCRI_STAGE_ROOTFS, "bind rootfs", s->rootfs);
    }
    /* a self-bind of a shared mount joins its peer group: pivot_root refuses shared */
    if (plan->rootfs_parent[0] && mount(NULL, s->rootfs, NULL, MS_PRIVATE, NULL) < 0)
        return fail_at(ce, PYCRI_STAGE_ROOTFS, "make private", s->rootfs);
    if (rootfd < 0)
        rootfd = open(s->rootfs, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (rootfd < 0)
        return fail_at(ce, PYCRI_STAGE_ROOTFS, "open", s->rootfs);

    if (s->mount_proc) {
        int t cleanup_fd = std_target(rootfd, "proc", ce);
        if (t < 0)
            return -1;
        if (mount_at(t, "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "mount proc", "/proc");
        *procfd = pycri__inroot_open(rootfd, "proc", O_PATH | O_DIRECTORY, RESOLVE_NO_SYMLINKS);
        if (*procfd < 0)
            return fail_at(ce, PYCRI_STAGE_MOUNT, "openat2", "/proc");
        if (!*sysctls_done && pycri__write_sysctls(plan, *procfd, ce) < 0)
            return -1;
        *sysctls_done = 1;
    }
    if (s->mount_sys) {
        int t cleanup_fd = std_target(rootfd, "sys", ce);
        if (t < 0)
            return -1;
        int ro = !s->sys_writable;
        unsigned long fl = (ro ? MS_RDONLY : 0) | MS_NOSUID | MS_NODEV | MS_NOEXEC;
        /* A fresh sysfs needs a net ns this mount's user ns owns: not so for the
         * host's, nor for a pod's (made by the host) seen from a new user ns. */
        int own_sysfs = s->ns_mode[PYCRI_NS_NET] != PYCRI_NS_HOST &&
                        !(s->ns_mode[PYCRI_NS_USER] == PYCRI_NS_NEW &&
                          s->ns_mode[PYCRI_NS_NET] == PYCRI_NS_JOIN);
        if (!own_sysfs) {
            /* sysfs shows the mounter's net ns: with the host's, share its view
             * (read-only unless privileged) */
            int src cleanup_fd = open("/sys", O_PATH | O_DIRECTORY | O_CLOEXEC);
            if (src < 0 ||
                bind_fd(src, t, 1, ro, ro, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
                        PYCRI_PROP_PRIVATE) < 0)
                return fail_at(ce, PYCRI_STAGE_MOUNT, "rbind", "/sys");
        } else if (mount_at(t, "sysfs", "sysfs", fl, NULL) < 0) {
            return fail_at(ce, PYCRI_STAGE_MOUNT, "mount sysfs", "/sys");
        }
    }
    if (s->mount_dev && setup_dev(plan, rootfd, ce) < 0)
        return -1;

    for (int i = 0; i < s->n_binds; i++) {
        const struct pycri_bind *b = &s->binds[i];
        if (do_bind(rootfd, b->source, plan->um ? plan->um->binds[i] : -1, b->target,
                    b->readonly, b->recursive_readonly, b->nonrecursive, b->propagation, ce) < 0)
            return -1;
    }
    const char *etc_src[3] = {s->etc_hostname, s->etc_hosts, s->etc_resolv};
    static const char *const etc_dst[3] = {"/etc/hostname", "/etc/hosts", "/etc/resolv.conf"};
    for (int i = 0; i < 3; i++)
        if (etc_src[i] &&
            do_bind(rootfd, etc_src[i], plan->um ? plan->um->etc[i] : -1, etc_dst[i], 0, 0, 1,
                    PYCRI_PROP_PRIVATE, ce) < 0)
            return -1;

    if (mask_paths(plan, rootfd, ce) < 0)
        return -1;

    /* pivot_root(".", "."): the old root ends up stacked on the new one. Before
     * the lazy unmount cuts it loose, its tree becomes slave (through an fd
     * opened before the pivot: a "." path would mean the new root and its
     * binds), so no unmount in it propagates to the host's peers. */
    int oldroot cleanup_fd = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (oldroot < 0)
        return fail_at(ce, PYCRI_STAGE_PIVOT, "open", "/");
    if (fchdir(rootfd) < 0)
        return fail_at(ce, PYCRI_STAGE_PIVOT, "fchdir", s->rootfs);
    if (syscall(SYS_pivot_root, ".", ".") < 0)
        return fail_at(ce, PYCRI_STAGE_PIVOT, "pivot_root", s->rootfs);
    struct mount_attr slave = {.propagation = MS_SLAVE};
    if (mount_setattr(oldroot, "", AT_EMPTY_PATH | AT_RECURSIVE, &slave, sizeof(slave)) < 0)
        return fail_at(ce, PYCRI_STAGE_PIVOT, "make the old root rslave", NULL);
    if (umount2(".", MNT_DETACH) < 0)
        return fail_at(ce, PYCRI_STAGE_PIVOT, "umount old root", NULL);
    if (chdir("/") < 0)
        return fail_at(ce, PYCRI_STAGE_PIVOT, "chdir", "/");
    return 0;
}

/* --- host-side helpers -------------------------------------------------------- */

PYCRI_EXPORT int pycri_mount_overlay(const char *target, const char *lower, const char *upper,
                                     const char *work, struct pycri_error *err) {
    char opts[4096];
    int n;
    if (upper)
        n = snprintf(opts, sizeof(opts), "lowerdir=%s,upperdir=%s,workdir=%s", lower, upper,
                     work ? work : "");
    else
        n = snprintf(opts, sizeof(opts), "lowerdir=%s", lower);
    if (n < 0 || (size_t)n >= sizeof(opts))
        return pycri_fail(err, E2BIG, "overlay options for %s longer than a page", target);
    if (mount("overlay", target, "overlay", 0, opts) < 0)
        return pycri_fail(err, errno, "mount overlay at %s", target);
    return 0;
}

PYCRI_EXPORT int pycri_mount_unmount(const char *target, struct pycri_error *err) {
    if (umount2(target, MNT_DETACH | UMOUNT_NOFOLLOW) < 0)
        return pycri_fail(err, errno, "umount2 %s", target);
    return 0;
}

PYCRI_EXPORT int pycri_mount_clone(int fd, int *fd_out, struct pycri_error *err) {
    *fd_out = open_tree(fd, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH);
    if (*fd_out < 0)
        return pycri_fail(err, errno, "clone the mount at fd %d", fd);
    return 0;
}

PYCRI_EXPORT int pycri_dev_premount(int *fd_out, struct pycri_error *err) {
    *fd_out = -1;
    int fs cleanup_fd = (int)syscall(SYS_fsopen, "tmpfs", 1 /* FSOPEN_CLOEXEC */);
    if (fs < 0)
        return pycri_fail(err, errno, "premount: fsopen tmpfs");
    if (syscall(SYS_fsconfig, fs, 1 /* SET_STRING */, "source", "tmpfs", 0) < 0 ||
        syscall(SYS_fsconfig, fs, 1 /* SET_STRING */, "mode", "755", 0) < 0 ||
        syscall(SYS_fsconfig, fs, 1 /* SET_STRING */, "size", "65536k", 0) < 0 ||
        syscall(SYS_fsconfig, fs, 6 /* CMD_CREATE */, NULL, NULL, 0) < 0)
        return pycri_fail(err, errno, "premount: configure the /dev tmpfs");
    int m cleanup_fd = (int)syscall(SYS_fsmount, fs, 1 /* FSMOUNT_CLOEXEC */,
                                    MOUNT_ATTR_NOSUID | MOUNT_ATTR_STRICTATIME);
    if (m < 0)
        return pycri_fail(err, errno, "premount: fsmount the /dev tmpfs");
    struct pycri__cerr ce;
    if (populate_dev(m, 0, &ce) < 0)
        return pycri_fail(err, ce.code, "premount: /dev: %s", ce.text);
    *fd_out = pycri_steal_fd(&m);
    return 0;
}
