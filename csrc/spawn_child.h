/* spawn_child.h - what spawn.c and mount.c share inside the child (private). */
#ifndef PYCRI_SPAWN_CHILD_H
#define PYCRI_SPAWN_CHILD_H

#include "internal.h"

#define PYCRI_MAX_CGROUPS 32
#define PYCRI_USERNS_MAX_BINDS 256

/* Detached mount trees prepared by the host's root for a container that joins a
 * user namespace (userns.c); -1 where there is none. */
struct pycri__userns_mounts {
    int rootfs;                    /* the overlay (id-mapped layers) or the rootfs clone */
    int shm;                       /* clone of spec->shm_path */
    int etc[3];                    /* clones of etc_hostname, etc_hosts, etc_resolv */
    int n_binds;
    int binds[];                   /* clone of binds[i].source */
};

/* A failure in the child: sent to the parent as is. */
struct pycri__cerr {
    int stage;
    int code;
    int plain;                 /* 1 = the text is complete; no strerror appended */
    char text[400];
};

/* Everything the child needs that the parent worked out before cloning. */
struct pycri__plan {
    const struct pycri_spawn_spec *spec;
    int ns_fd[PYCRI_NS_COUNT];     /* opened JOIN targets, -1 */
    int userns_new, userns_any;    /* userns NEW; userns NEW or JOIN */
    int sock;                      /* child's end of the report socket */
    int start_rd;                  /* read end of the start pipe, -1 */
    int devnull;                   /* O_RDWR /dev/null of the host */
    int tty_fd;                    /* the tty slave: spec->tty_fd, or the own pty's (tty_new) */
    int cap_last;
    char overlay_opts[4096];
    char rootfs_parent[4096];      /* rshared root only: mount point holding the rootfs dir */
    const char *sysctl_buf;        /* n_sysctl pairs of "sys/a/b\0value\0" */
    int n_sysctl;
    /* How the process enters each cgroup_procs[i] (see place_cgroups in spawn.c):
     * the child writes "0" to cg_tasks_fd[i] (a v1 "tasks" file), or clone3
     * puts it into cg_v2_fd (CLONE_INTO_CGROUP, index cg_v2_index), or the
     * parent writes the pid into cgroup.procs (cg_by_parent[i]). */
    int n_cg;
    int cg_tasks_fd[PYCRI_MAX_CGROUPS];
    char cg_by_parent[PYCRI_MAX_CGROUPS];
    int cg_v2_fd, cg_v2_index;
    struct pycri__userns_mounts *um;  /* joining a user namespace with a rootfs, else NULL */
};

/* Child-side helpers (async-signal-safe). */
void pycri__cfail(struct pycri__cerr *ce, int stage, int code, const char *what,
                  const char *path);
size_t pycri__strlcat(char *dst, const char *src, size_t size);
void pycri__fdpath(char *buf, int fd);   /* "/proc/self/fd/<fd>" into buf[32] */

/* openat2 relative to root with RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | extra. */
int pycri__inroot_open(int rootfd, const char *path, int flags, unsigned long long extra);
/* mkdir -p inside the root; returns an O_PATH fd of the dir. */
int pycri__inroot_mkdirs(int rootfd, const char *path, int mode);
/* path opened (O_PATH) in-root, made first (a dir, or an empty file) if missing */
int pycri__inroot_target(int rootfd, const char *path, int is_dir);

/* The whole mount namespace setup, ending in pivot_root; the sysctls are written
 * as soon as /proc is mounted (before read-only paths cover /proc/sys), and then
 * *sysctls_done is set. 0 or -1 with ce set. */
int pycri__mount_setup(const struct pycri__plan *plan, int *procfd, int *sysctls_done,
                       struct pycri__cerr *ce);
/* userns.c: host side (before clone) and child side of the prepared mounts. */
int pycri__userns_prepare(const struct pycri_spawn_spec *s, struct pycri__plan *plan,
                          struct pycri_error *err);
void pycri__userns_release(struct pycri__plan *plan);
int pycri__userns_keep_fds(const struct pycri__plan *plan, int *keep, int room);
int pycri__userns_attach(int tree, int tfd, int ro, int rro, int prop);
int pycri__userns_enter_rootfs(const struct pycri__plan *plan, struct pycri__cerr *ce);
int pycri__userns_attach_rootfs(const struct pycri__plan *plan, struct pycri__cerr *ce);

int pycri__write_sysctls(const struct pycri__plan *plan, int procfd, struct pycri__cerr *ce);


/* What parent and child say on the report socket (spawn.c, spawn_child.c). */
enum { MSG_SETUP = 1, MSG_GO, MSG_PID, MSG_READY, MSG_ERROR, MSG_TTY, MSG_PAUSED, MSG_RESUME };

/* MSG_RESUME (launcher to a child paused after its setup): pid holds the length
 * of the encoded spec in the memfd that is the first fd passed; then the spec's
 * stdio, tty and kept fds (those set, in field order). At most this many: */
#define PYCRI_RESUME_MAX_FDS 72

struct msg {
    int kind;
    int pid;
    struct pycri__cerr ce;
};

/* CLONE_NEW* flag and /proc/<pid>/ns/ name of each PYCRI_NS_* kind (spawn.c) */
extern const int pycri__ns_flag[PYCRI_NS_COUNT];
extern const char *const pycri__ns_name[PYCRI_NS_COUNT];

/* Every signal's disposition (but KILL's and STOP's) back to default, glibc's
 * internal ones included (spawn_child.c). */
void pycri__default_all_signals(void);

/* Close every fd >= lowest not in keep[] (n entries, any order, -1 ignored;
 * sorted in place). Async-signal-safe: the child and the launcher use it. */
void pycri__close_all_but(int *keep, int n, int lowest);

/* The fd fields a resumed spec carries over (stdio, tty_fd, keep_fds), in the
 * order MSG_RESUME sends them: pointers into s (its keep_fds array included, which
 * the receiver renumbers in place). Returns how many. */
#define PYCRI_SPEC_FD_FIELDS_MAX (3 + 1 + 1024)
int pycri__spec_fd_fields(const struct pycri_spawn_spec *s, int **out);

/* Resume a process paused after its setup (pause_after_setup; res as that
 * pycri_spawn left it) with the real spec s, whose encoding is specbuf: it
 * carries on to READY. On failure it is killed and reaped. (spawn.c) */
int pycri__spawn_resume(const struct pycri_spawn_spec *s, const unsigned char *specbuf,
                        size_t spec_len, struct pycri_spawn_result *res, struct pycri_error *err);

/* The child, from the clone on (spawn_child.c): never returns. */
__attribute__((noreturn)) void pycri__child_main(struct pycri__plan *plan, int two_step);

/* One sendmsg (retried on EINTR) of buf with n fds (SCM_RIGHTS, n <=
 * PYCRI_SEND_FDS_MAX, 0 for none): what sendmsg returned. Async-signal-safe. */
#define PYCRI_SEND_FDS_MAX 253      /* the kernel's SCM_MAX_FD */
ssize_t pycri__send_fds(int sock, const void *buf, size_t len, const int *fds, int n);

/* Its counterpart: one recvmsg (retried on EINTR) into buf, and the fds that came
 * with it (CLOEXEC): up to room of them into fds, the rest closed; *nfds says how
 * many were stored, -1 when the kernel cut them short. What recvmsg returned. */
ssize_t pycri__recv_fds(int sock, void *buf, size_t len, int *fds, int room, int *nfds);

/* write all of buf, retrying on EINTR and short writes; 0 or -1 */
static inline int pycri__write_all(int fd, const char *buf, size_t len) {
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

#endif
