/* userns.c - the mounts of a container that joins an existing user namespace
 * (its pod's): id-mapped, and opened by the host's root before the clone.
 *
 * Inside the pod's user namespace the container's root has no say over files
 * owned by unmapped host ids and cannot walk host directories it has no search
 * permission for. So the parent, still the host's root, prepares every mount
 * the child will need as a detached mount tree (open_tree OPEN_TREE_CLONE):
 *   - the rootfs: an overlay built with the new mount API whose lower layers
 *     are id-mapped trees of the layer directories (MOUNT_ATTR_IDMAP with the
 *     pod's user namespace), so image files owned by host uid 0 show as the
 *     container's root; the upper and work dirs are plain directories owned by
 *     the mapped root, so what the container writes is stored on the host under
 *     the mapped ids (copy-up of an image file keeps its mapped owner);
 *   - bind sources: clones, id-mapped as the bind asks (never / where the
 *     filesystem allows it / required);
 *   - the pod's /dev/shm and /etc files: plain clones (the pod made them owned
 *     by the mapped root).
 * The child, after it entered the user namespace and made its mount namespace
 * (owned by that user namespace), attaches them with move_mount: a detached
 * tree can be attached in any mount namespace whose owner lets the caller mount.
 * The overlay's mounter is the host's root, as when a runtime mounts the rootfs
 * on the host: copy-up and whiteouts work on layers the pod's root does not own.
 *
 * The trees are created without MNT_LOCKED: the container's root could unmount
 * a submount of a recursive bind and see the directory below it, which the host
 * also shows to anyone who may enter that directory.
 */
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "spawn_child.h"

#ifndef FSCONFIG_SET_FD
#define FSCONFIG_SET_FLAG 0
#define FSCONFIG_SET_STRING 1
#define FSCONFIG_SET_FD 5
#define FSCONFIG_CMD_CREATE 6
#endif
#ifndef FSOPEN_CLOEXEC
#define FSOPEN_CLOEXEC 0x00000001
#endif
#ifndef FSMOUNT_CLOEXEC
#define FSMOUNT_CLOEXEC 0x00000001
#endif

static int sys_fsopen(const char *fs, unsigned int flags) {
    return (int)syscall(SYS_fsopen, fs, flags);
}
static int sys_fsconfig(int fd, unsigned int cmd, const char *key, const void *value, int aux) {
    return (int)syscall(SYS_fsconfig, fd, cmd, key, value, aux);
}
static int sys_fsmount(int fd, unsigned int flags, unsigned int attrs) {
    return (int)syscall(SYS_fsmount, fd, flags, attrs);
}

static struct pycri__userns_mounts *um_new(int n_binds) {
    struct pycri__userns_mounts *um =
        calloc(1, sizeof(*um) + sizeof(int) * (size_t)(n_binds > 0 ? n_binds : 0));
    if (!um)
        return NULL;
    um->rootfs = um->shm = -1;
    for (int i = 0; i < 3; i++)
        um->etc[i] = -1;
    um->n_binds = n_binds;
    for (int i = 0; i < n_binds; i++)
        um->binds[i] = -1;
    return um;
}

void pycri__userns_release(struct pycri__plan *plan) {
    struct pycri__userns_mounts *um = plan->um;
    if (!um)
        return;
    int *all[] = {&um->rootfs, &um->shm, &um->etc[0], &um->etc[1], &um->etc[2]};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
        if (*all[i] >= 0)
            close(*all[i]);
    for (int i = 0; i < um->n_binds; i++)
        if (um->binds[i] >= 0)
            close(um->binds[i]);
    free(um);
    plan->um = NULL;
}

int pycri__userns_keep_fds(const struct pycri__plan *plan, int *keep, int room) {
    const struct pycri__userns_mounts *um = plan->um;
    int n = 0;
    if (!um)
        return 0;
    int fixed[] = {um->rootfs, um->shm, um->etc[0], um->etc[1], um->etc[2]};
    for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]) && n < room; i++)
        keep[n++] = fixed[i];
    for (int i = 0; i < um->n_binds && n < room; i++)
        keep[n++] = um->binds[i];
    return n;
}

/* The error text an fs context left for us ("e overlay: ..."), if any. */
static void fs_log(int fsfd, char *out, size_t len) {
    out[0] = '\0';
    ssize_t n = read(fsfd, out, len - 1);
    out[n > 0 ? n : 0] = '\0';
    if (n > 0 && out[n - 1] == '\n')
        out[n - 1] = '\0';
}

/* A detached clone of path; id-mapped to userns_fd per mode. -1 with err set. */
static int clone_tree(const char *what, const char *path, int recursive, int userns_fd, int mode,
                      struct pycri_error *err) {
    unsigned int flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (recursive ? AT_RECURSIVE : 0);
    int fd = open_tree(AT_FDCWD, path, flags);
    if (fd < 0) {
        pycri_fail(err, errno, "prepare: open %s %s", what, path);
        return -1;
    }
    if (mode == PYCRI_IDMAP_NONE)
        return fd;
    struct mount_attr a = {.attr_set = MOUNT_ATTR_IDMAP, .userns_fd = (uint64_t)userns_fd};
    if (mount_setattr(fd, "", AT_EMPTY_PATH | (recursive ? AT_RECURSIVE : 0), &a, sizeof(a)) == 0)
        return fd;
    int e = errno;
    /* EINVAL / EOPNOTSUPP: this filesystem (or a submount) cannot be id-mapped */
    if (mode == PYCRI_IDMAP_AUTO && (e == EINVAL || e == EOPNOTSUPP || e == EPERM))
        return fd;
    close(fd);
    pycri_fail(err, e, "prepare: id-mapped mount of %s %s (does its filesystem support "
                       "id-mapped mounts?)", what, path);
    return -1;
}

/* The container's overlay, as a detached mount: id-mapped lower layers (top
 * first in s->overlay_lower), the plain upper and work dirs. */
struct layer_trees {
    int n;
    int fd[];
};

static void close_layer_trees(struct layer_trees **lt) {
    if (!*lt)
        return;
    for (int i = 0; i < (*lt)->n; i++)
        close((*lt)->fd[i]);
    free(*lt);
}

/* Create the overlay configured on fs and mount it detached: its fd, or -1 with
 * err set (the kernel's own message included). */
static int overlay_fsmount(int fs, const char *stage, const char *what, struct pycri_error *err) {
    if (sys_fsconfig(fs, FSCONFIG_CMD_CREATE, NULL, NULL, 0) < 0) {
        int e = errno;
        char log[256];
        fs_log(fs, log, sizeof(log));
        return pycri_fail(err, e, "%s: create the overlay for %s%s%s", stage, what,
                          log[0] ? ": " : "", log);
    }
    int m = sys_fsmount(fs, FSMOUNT_CLOEXEC, 0);
    if (m < 0)
        return pycri_fail(err, errno, "%s: fsmount the overlay for %s", stage, what);
    return m;
}

static int idmapped_overlay(const char *lower, const char *upper, const char *work,
                            const char *what, int userns_fd, struct pycri_error *err) {
    int fs cleanup_fd = sys_fsopen("overlay", FSOPEN_CLOEXEC);
    if (fs < 0)
        return pycri_fail(err, errno, "prepare: fsopen overlay");
    size_t layers = 1;
    for (const char *c = lower; *c; c++)
        layers += *c == ':';
    /* each layer tree stays open until the overlay exists: closing a detached
     * tree unmounts it, and the overlay takes its own private clone at create */
    __attribute__((cleanup(close_layer_trees))) struct layer_trees *lt =
        calloc(1, sizeof(*lt) + layers * sizeof(int));
    if (!lt)
        return pycri_fail(err, ENOMEM, "prepare: overlay layers");
    char buf[PATH_MAX];
    const char *p = lower;
    while (*p) {
        const char *end = strchrnul(p, ':');
        size_t len = (size_t)(end - p);
        if (len == 0 || len >= sizeof(buf))
            return pycri_fail(err, EINVAL, "prepare: bad overlay layer in %s", lower);
        memcpy(buf, p, len);
        buf[len] = '\0';
        int t = clone_tree("image layer", buf, 0, userns_fd, PYCRI_IDMAP_REQUIRE, err);
        if (t < 0)
            return -1;
        lt->fd[lt->n++] = t;
        /* "lowerdir+" appends one layer below those given before; given by fd, a
         * detached id-mapped tree can be a layer (a recent kernel: 6.18 here) */
        if (sys_fsconfig(fs, FSCONFIG_SET_FD, "lowerdir+", NULL, t) < 0)
            return pycri_fail(err, errno, "prepare: overlay lowerdir+ %s by fd (this kernel's "
                                          "overlayfs may not take layers by fd)", buf);
        p = *end ? end + 1 : end;
    }
    if (upper) {
        if (sys_fsconfig(fs, FSCONFIG_SET_STRING, "upperdir", upper, 0) < 0)
            return pycri_fail(err, errno, "prepare: overlay upperdir %s", upper);
        if (sys_fsconfig(fs, FSCONFIG_SET_STRING, "workdir", work ? work : "",
                         0) < 0)
            return pycri_fail(err, errno, "prepare: overlay workdir %s", work);
    }
    return overlay_fsmount(fs, "prepare", what, err);
}

int pycri__userns_prepare(const struct pycri_spawn_spec *s, struct pycri__plan *plan,
                          struct pycri_error *err) {
    int ufd = plan->ns_fd[PYCRI_NS_USER];
    if (ufd < 0 || !s->rootfs || s->ns_mode[PYCRI_NS_MNT] != PYCRI_NS_NEW)
        return 0;
    int n = s->n_binds > 0 ? s->n_binds : 0;
    if (n > PYCRI_USERNS_MAX_BINDS)
        return pycri_fail(err, E2BIG, "prepare: %d bind mounts; at most %d in a user namespace", n,
                          PYCRI_USERNS_MAX_BINDS);
    for (int i = 0; i < n; i++)
        if (s->binds[i].propagation == PYCRI_PROP_RSHARED)
            return pycri_fail(err, EINVAL, "prepare: bind %s: rshared propagation cannot reach "
                                           "the host from a user namespace", s->binds[i].target);
    if (s->root_propagation == PYCRI_PROP_RSHARED)
        return pycri_fail(err, EINVAL, "prepare: an rshared root is not possible in a user "
                                       "namespace");
    struct pycri__userns_mounts *um = um_new(n);
    if (!um)
        return pycri_fail(err, ENOMEM, "prepare: user namespace mounts");
    plan->um = um;
    if (s->overlay_lower)
        um->rootfs = idmapped_overlay(s->overlay_lower, s->overlay_upper, s->overlay_work,
                                      s->rootfs, ufd, err);
    else
        um->rootfs = clone_tree("rootfs", s->rootfs, 1, ufd, PYCRI_IDMAP_AUTO, err);
    if (um->rootfs < 0)
        return -1;
    for (int i = 0; i < n; i++) {
        const struct pycri_bind *b = &s->binds[i];
        um->binds[i] = clone_tree("bind source", b->source, !b->nonrecursive, ufd, b->idmap, err);
        if (um->binds[i] < 0)
            return -1;
    }
    if (s->mount_dev && s->shm_path &&
        (um->shm = clone_tree("shm", s->shm_path, 0, ufd, PYCRI_IDMAP_NONE, err)) < 0)
        return -1;
    const char *etc[3] = {s->etc_hostname, s->etc_hosts, s->etc_resolv};
    for (int i = 0; i < 3; i++)
        if (etc[i] && (um->etc[i] = clone_tree("file", etc[i], 0, ufd, PYCRI_IDMAP_NONE, err)) < 0)
            return -1;
    return 0;
}

PYCRI_EXPORT int pycri_mount_overlay_idmapped(const char *target, const char *lower,
                                              const char *userns_path, struct pycri_error *err) {
    int ufd cleanup_fd = open(userns_path, O_RDONLY | O_CLOEXEC);
    if (ufd < 0)
        return pycri_fail(err, errno, "open %s", userns_path);
    int m cleanup_fd = idmapped_overlay(lower, NULL, NULL, target, ufd, err);
    if (m < 0)
        return -1;
    if (move_mount(m, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH) < 0)
        return pycri_fail(err, errno, "attach the overlay at %s", target);
    return 0;
}

/* ---- child side --------------------------------------------------------------- */

static const unsigned long long prop_of[3] = {MS_PRIVATE, MS_SLAVE, MS_SHARED};

int pycri__userns_attach(int tree, int tfd, int ro, int rro, int prop) {
    if (ro || rro) {
        struct mount_attr a = {.attr_set = MOUNT_ATTR_RDONLY};
        if (mount_setattr(tree, "", AT_EMPTY_PATH | (rro ? AT_RECURSIVE : 0), &a, sizeof(a)) < 0)
            return -1;
    }
    if (move_mount(tree, "", tfd, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) < 0)
        return -1;
    if (prop >= 0 && prop <= 2) {
        struct mount_attr a = {.propagation = prop_of[prop]};
        if (mount_setattr(tree, "", AT_EMPTY_PATH | AT_RECURSIVE, &a, sizeof(a)) < 0)
            return -1;
    }
    return 0;
}

/* Before the user namespace is joined: make the rootfs dir the working dir, as
 * the host's root (the mapped root may have no way there). unshare(CLONE_NEWNS)
 * carries the working dir over into the new mount namespace. */
int pycri__userns_enter_rootfs(const struct pycri__plan *plan, struct pycri__cerr *ce) {
    if (chdir(plan->spec->rootfs) < 0) {
        pycri__cfail(ce, PYCRI_STAGE_ROOTFS, errno, "chdir", plan->spec->rootfs);
        return -1;
    }
    return 0;
}

/* In the new mount namespace: the prepared rootfs onto the working dir (the
 * rootfs dir); returns an fd of its root (the tree fd now names it), -1 on error. */
int pycri__userns_attach_rootfs(const struct pycri__plan *plan, struct pycri__cerr *ce) {
    const char *rootfs = plan->spec->rootfs;
    if (move_mount(plan->um->rootfs, "", AT_FDCWD, ".", MOVE_MOUNT_F_EMPTY_PATH) < 0) {
        pycri__cfail(ce, PYCRI_STAGE_ROOTFS, errno, "attach the prepared rootfs at", rootfs);
        return -1;
    }
    int fd = fcntl(plan->um->rootfs, F_DUPFD_CLOEXEC, 0);
    if (fd < 0)
        pycri__cfail(ce, PYCRI_STAGE_ROOTFS, errno, "dup the rootfs fd of", rootfs);
    return fd;
}

/* --- an overlay made ahead of need (no user namespace) ----------------------- */

PYCRI_EXPORT int pycri_overlay_premount(const char *lower, const char *upper, const char *work,
                                        const char *const *dirs, const char *const *files,
                                        int *fd_out, struct pycri_error *err) {
    *fd_out = -1;
    int fs cleanup_fd = sys_fsopen("overlay", FSOPEN_CLOEXEC);
    if (fs < 0)
        return pycri_fail(err, errno, "premount: fsopen overlay");
    if (sys_fsconfig(fs, FSCONFIG_SET_STRING, "lowerdir", lower, 0) < 0)
        return pycri_fail(err, errno, "premount: overlay lowerdir %s", lower);
    if (sys_fsconfig(fs, FSCONFIG_SET_STRING, "upperdir", upper, 0) < 0)
        return pycri_fail(err, errno, "premount: overlay upperdir %s", upper);
    if (sys_fsconfig(fs, FSCONFIG_SET_STRING, "workdir", work, 0) < 0)
        return pycri_fail(err, errno, "premount: overlay workdir %s", work);
    int m = overlay_fsmount(fs, "premount", upper, err);
    if (m < 0)
        return -1;
    /* The mount points the container's setup would make (the same in-root
     * resolution), made now: a file created in /etc copies /etc up, which costs
     * more than the mount on it. What cannot be made here is left to the child,
     * which then fails the same way it always would. */
    for (int i = 0; dirs && dirs[i]; i++) {
        int fd = pycri__inroot_target(m, dirs[i], 1);
        if (fd >= 0)
            close(fd);
    }
    for (int i = 0; files && files[i]; i++) {
        int fd = pycri__inroot_target(m, files[i], 0);
        if (fd >= 0)
            close(fd);
    }
    *fd_out = m;
    return 0;
}
