/* spawn.c - create a container process: clone3 into new namespaces (or setns
 * into given ones), id maps and cgroups written by the parent while the child
 * waits, then in the child: mounts (mount.c), hostname, sysctls, rlimits, fds,
 * user, capabilities, no_new_privs, seccomp, and execve.
 *
 * Parent and child talk over a SOCK_SEQPACKET socketpair (CLOEXEC). The child
 * sends SETUP (and waits for GO), PID (when an intermediate process forked the
 * real one), TTY (tty_new: the pty master as SCM_RIGHTS), READY (right before
 * waiting for start / execve) or ERROR with (stage, errno, text). EOF after
 * READY means execve succeeded.
 *
 * After clone the child runs only syscalls and string copies on memory the
 * parent prepared: it is a copy of a possibly multi-threaded Python process.
 */
#include <fcntl.h>
#include <limits.h>
#include <linux/capability.h>
#include <linux/close_range.h>
#include <linux/filter.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <grp.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <linux/magic.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include "spawn_child.h"

#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif

#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif
#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif

/* The kernel's struct clone_args (v0 layout, 64 bytes + set_tid/cgroup). */
struct clone_args_k {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
    uint64_t set_tid, set_tid_size, cgroup;
};

enum { MSG_SETUP = 1, MSG_GO, MSG_PID, MSG_READY, MSG_ERROR, MSG_TTY };

struct msg {
    int kind;
    int pid;
    struct pycri__cerr ce;
};

static const int ns_flag[PYCRI_NS_COUNT] = {CLONE_NEWUSER, CLONE_NEWNS,  CLONE_NEWPID,
                                            CLONE_NEWUTS,  CLONE_NEWIPC, CLONE_NEWNET,
                                            CLONE_NEWCGROUP};
static const char *const ns_name[PYCRI_NS_COUNT] = {"user", "mnt", "pid", "uts",
                                                    "ipc",  "net", "cgroup"};
static const char *const stage_name[] = {
    "none",  "prepare", "clone",    "namespace", "idmap", "cgroup", "rootfs",
    "mount", "pivot",   "hostname", "sysctl",    "rlimit", "oom",   "fds",
    "tty",   "cwd",     "user",     "caps",      "seccomp", "exec", "start",
};

static const char *stage_str(int stage) {
    if (stage < 0 || stage >= (int)(sizeof(stage_name) / sizeof(stage_name[0])))
        return "unknown";
    return stage_name[stage];
}

/* ============================== child ====================================== */

static void send_msg(int sock, int kind, int pid, const struct pycri__cerr *ce) {
    struct msg m;
    memset(&m, 0, sizeof(m));
    m.kind = kind;
    m.pid = pid;
    if (ce)
        m.ce = *ce;
    while (send(sock, &m, sizeof(m), MSG_NOSIGNAL) < 0 && errno == EINTR)
        ;
}

static __attribute__((noreturn)) void die(const struct pycri__plan *p, struct pycri__cerr *ce) {
    send_msg(p->sock, MSG_ERROR, 0, ce);
    _exit(127);
}

#define CFAIL(stage, what, path)                                                                   \
    do {                                                                                           \
        pycri__cfail(&ce, (stage), errno, (what), (path));                                         \
        die(plan, &ce);                                                                            \
    } while (0)

static void wait_go(const struct pycri__plan *plan) {
    struct msg m;
    ssize_t n;
    do
        n = recv(plan->sock, &m, sizeof(m), 0);
    while (n < 0 && errno == EINTR);
    if (n != (ssize_t)sizeof(m) || m.kind != MSG_GO)
        _exit(126);
}

static void utoa10(long long v, char *out) {
    char tmp[24];
    int n = 0, neg = v < 0;
    unsigned long long u = neg ? (unsigned long long)(-v) : (unsigned long long)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    int j = 0;
    if (neg)
        out[j++] = '-';
    while (n)
        out[j++] = tmp[--n];
    out[j] = '\0';
}

static int write_all(int fd, const char *buf, size_t len) {
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

/* Put stdio and the kept fds at 0, 1, 2, 3 ...; everything else CLOEXEC. */
static int arrange_fds(const struct pycri__plan *plan, int *ttyfd_out) {
    const struct pycri_spawn_spec *s = plan->spec;
    int need = 3 + (s->n_keep_fds > 0 ? s->n_keep_fds : 0);
    int src[3 + 1024];
    if (need > (int)(sizeof(src) / sizeof(src[0]))) {
        errno = EMFILE;
        return -1;
    }
    int tty = plan->tty_fd;
    int deflt = tty >= 0 ? tty : plan->devnull;
    for (int i = 0; i < need; i++) {
        int from = i < 3 ? (s->stdio[i] >= 0 ? s->stdio[i] : deflt) : s->keep_fds[i - 3];
        /* lift every source above the targets first so no dup2 clobbers another */
        src[i] = fcntl(from, F_DUPFD_CLOEXEC, need);
        if (src[i] < 0)
            return -1;
    }
    for (int i = 0; i < need; i++)
        if (dup3(src[i], i, 0) < 0)
            return -1;
    if (tty >= 0) {
        /* a stdio slot that got the tty, or a private CLOEXEC copy of it */
        *ttyfd_out = s->stdio[0] < 0   ? 0
                     : s->stdio[1] < 0 ? 1
                     : s->stdio[2] < 0 ? 2
                                       : fcntl(tty, F_DUPFD_CLOEXEC, need);
        if (*ttyfd_out < 0)
            return -1;
    }
    /* the sources stay CLOEXEC (closed by execve), as do the report and start sockets */
    if (syscall(SYS_close_range, need, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        for (int fd = need; fd < 65536; fd++)
            fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    return 0;
}

static int load_seccomp(const struct pycri_spawn_spec *s) {
    struct sock_fprog prog = {
        .len = (unsigned short)s->seccomp_len,
        .filter = (struct sock_filter *)(uintptr_t)s->seccomp_bpf,
    };
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
}

static int set_caps(const struct pycri__plan *plan) {
    const struct pycri_spawn_spec *s = plan->spec;
    struct __user_cap_header_struct hdr = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    unsigned long long inh = s->cap_inheritable | s->cap_ambient;
    struct __user_cap_data_struct data[2] = {
        {(uint32_t)s->cap_effective, (uint32_t)s->cap_permitted, (uint32_t)inh},
        {(uint32_t)(s->cap_effective >> 32), (uint32_t)(s->cap_permitted >> 32),
         (uint32_t)(inh >> 32)},
    };
    if (syscall(SYS_capset, &hdr, data) < 0)
        return -1;
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        return -1;
    for (int c = 0; c <= plan->cap_last && c < 64; c++)
        if ((s->cap_ambient >> c) & 1)
            if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, c, 0, 0) < 0)
                return -1;
    return 0;
}

static const char *env_path(const char *const *envp) {
    for (; envp && *envp; envp++)
        if (strncmp(*envp, "PATH=", 5) == 0)
            return *envp + 5;
    return "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
}

static int executable(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode) && access(p, X_OK) == 0;
}

/* execvpe's search, done ahead of time so a create (start_wait) fails early. */
static int resolve_exec(const struct pycri__plan *plan, char *out, struct pycri__cerr *ce) {
    const struct pycri_spawn_spec *s = plan->spec;
    const char *file = s->exec_path ? s->exec_path : s->argv[0];
    out[0] = '\0';
    if (!*file) {
        pycri__cfail(ce, PYCRI_STAGE_EXEC, ENOENT, "exec: empty executable name", NULL);
        return -1;
    }
    if (strchr(file, '/')) {
        struct stat st;
        if (stat(file, &st) < 0) {
            pycri__cfail(ce, PYCRI_STAGE_EXEC, errno, "exec: stat", file);
            return -1;
        }
        pycri__strlcat(out, file, PATH_MAX);
        return 0;
    }
    const char *p = env_path(s->envp);
    for (;;) {
        const char *end = strchrnul(p, ':');
        size_t len = (size_t)(end - p);
        if (len + strlen(file) + 2 < PATH_MAX) {
            if (len == 0) {
                out[0] = '.';
                len = 1;
            } else {
                memcpy(out, p, len);
            }
            out[len] = '/';
            out[len + 1] = '\0';
            pycri__strlcat(out, file, PATH_MAX);
            if (executable(out))
                return 0;
        }
        if (!*end)
            break;
        p = end + 1;
    }
    ce->stage = PYCRI_STAGE_EXEC;
    ce->code = ENOENT;
    ce->plain = 1;
    ce->text[0] = '\0';
    pycri__strlcat(ce->text, "exec \"", sizeof(ce->text));
    pycri__strlcat(ce->text, file, sizeof(ce->text));
    pycri__strlcat(ce->text, "\": executable file not found in $PATH", sizeof(ce->text));
    return -1;
}

/* Write the sysctls through procfd (the container's /proc, or the host's, which
 * shows the writer's namespaces for namespaced keys). */
int pycri__write_sysctls(const struct pycri__plan *plan, int procfd, struct pycri__cerr *ce) {
    const char *p = plan->sysctl_buf;
    for (int i = 0; i < plan->n_sysctl; i++) {
        const char *key = p, *val = p + strlen(p) + 1;
        p = val + strlen(val) + 1;
        struct open_how how = {.flags = O_WRONLY | O_CLOEXEC | O_NOFOLLOW,
                               .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS};
        int fd = (int)syscall(SYS_openat2, procfd, key, &how, sizeof(how));
        if (fd < 0 || write_all(fd, val, strlen(val)) < 0) {
            pycri__cfail(ce, PYCRI_STAGE_SYSCTL, errno, "write /proc", key);
            if (fd >= 0)
                close(fd);
            return -1;
        }
        close(fd);
    }
    return 0;
}

/* Send a message carrying one fd (SCM_RIGHTS). */
static int send_fd_msg(int sock, int kind, int fd) {
    struct msg m;
    memset(&m, 0, sizeof(m));
    m.kind = kind;
    struct iovec iov = {&m, sizeof(m)};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    memset(&u, 0, sizeof(u));
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                        .msg_controllen = sizeof(u.buf)};
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    ssize_t n;
    do
        n = sendmsg(sock, &mh, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n == (ssize_t)sizeof(m) ? 0 : -1;
}

/* tty_new: a pty of the container's own devpts instance (setup_dev mounted it
 * with newinstance), so the terminal is /dev/pts/N of the container's /dev and
 * numbered from 0 there. Runs after pivot_root. The slave becomes the tty; the
 * master goes to the parent (the launcher), which hands it to the monitor. */
static int open_own_pty(struct pycri__plan *plan, struct pycri__cerr *ce) {
    const struct pycri_spawn_spec *s = plan->spec;
    int master = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_NOFOLLOW | O_CLOEXEC);
    if (master < 0) {
        pycri__cfail(ce, PYCRI_STAGE_TTY, errno, "open", "/dev/pts/ptmx");
        return -1;
    }
    struct statfs sf;
    int unlock = 0, slave = -1;
    const char *what = NULL;
    if (fstatfs(master, &sf) < 0) {
        what = "fstatfs /dev/pts/ptmx";
    } else if (sf.f_type != DEVPTS_SUPER_MAGIC) {
        /* a bind mount over /dev/pts put something else there */
        errno = ENOTTY;
        what = "/dev/pts/ptmx is not on the container's devpts";
    } else if (ioctl(master, TIOCSPTLCK, &unlock) < 0) {
        what = "ioctl TIOCSPTLCK";
    } else if ((slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0) {
        what = "ioctl TIOCGPTPEER";
    } else if (fchown(slave, s->uid, (gid_t)-1) < 0) {
        /* the program's user owns its terminal, as after a login; the group
         * stays the devpts one (tty) */
        what = "fchown the pty slave";
    } else if (send_fd_msg(plan->sock, MSG_TTY, master) < 0) {
        what = "send the pty master to the parent";
    }
    if (what) {
        pycri__cfail(ce, PYCRI_STAGE_TTY, errno, what, NULL);
        close(master);
        if (slave >= 0)
            close(slave);
        return -1;
    }
    close(master);
    plan->tty_fd = slave;
    return 0;
}

/* glibc's set*id wrappers signal every thread the parent had (setxid
 * broadcast) and would wait forever in the single-threaded child: use the
 * system calls themselves. */
static int raw_setresuid(unsigned int id) { return (int)syscall(SYS_setresuid, id, id, id); }
static int raw_setresgid(unsigned int id) { return (int)syscall(SYS_setresgid, id, id, id); }

/* The container process from GO to execve. */
static __attribute__((noreturn)) void child_finish(struct pycri__plan *plan) {
    const struct pycri_spawn_spec *s = plan->spec;
    struct pycri__cerr ce;
    int procfd = -1;

    /* a cgroup namespace is rooted at the cgroup current when it is made: only
     * now, after the parent moved us into the container's cgroups */
    if (s->ns_mode[PYCRI_NS_CGROUP] == PYCRI_NS_NEW && unshare(CLONE_NEWCGROUP) < 0)
        CFAIL(PYCRI_STAGE_NAMESPACE, "unshare", "cgroup");
    if (plan->userns_any) {
        /* become the namespace's root (its uid 0 is now mapped) */
        if (raw_setresgid(0) < 0 || raw_setresuid(0) < 0)
            CFAIL(PYCRI_STAGE_IDMAP, "setresuid(0) in the user namespace", NULL);
    }
    if (s->set_oom_score_adj) {
        char num[24];
        utoa10(s->oom_score_adj, num);
        int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write_all(fd, num, strlen(num)) < 0)
            CFAIL(PYCRI_STAGE_OOM, "write /proc/self/oom_score_adj", num);
        close(fd);
    }
    int sysctls_done = plan->n_sysctl == 0;
    if (s->ns_mode[PYCRI_NS_MNT] == PYCRI_NS_NEW &&
        pycri__mount_setup(plan, &procfd, &sysctls_done, &ce) < 0)
        die(plan, &ce);
    if (s->hostname && sethostname(s->hostname, strlen(s->hostname)) < 0)
        CFAIL(PYCRI_STAGE_HOSTNAME, "sethostname", s->hostname);
    if (!sysctls_done) {
        if (procfd < 0)
            procfd = open("/proc", O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (procfd < 0)
            CFAIL(PYCRI_STAGE_SYSCTL, "open", "/proc");
        if (pycri__write_sysctls(plan, procfd, &ce) < 0)
            die(plan, &ce);
    }
    if (s->tty_new && open_own_pty(plan, &ce) < 0)
        die(plan, &ce);
    /* a session of its own: Ctrl-C on the caller's terminal is not the container's */
    if (setsid() < 0)
        CFAIL(PYCRI_STAGE_TTY, "setsid", NULL);
    int ttyfd = -1;
    if (arrange_fds(plan, &ttyfd) < 0)
        CFAIL(PYCRI_STAGE_FDS, "arrange stdio and kept fds", NULL);
    if (ttyfd >= 0 && ioctl(ttyfd, TIOCSCTTY, 0) < 0)
        CFAIL(PYCRI_STAGE_TTY, "ioctl TIOCSCTTY", NULL);

    if (s->cwd && *s->cwd) {
        int root = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
        int d = root < 0 ? -1 : pycri__inroot_mkdirs(root, s->cwd, 0755);
        if (d < 0 || fchdir(d) < 0)
            CFAIL(PYCRI_STAGE_CWD, "chdir (in-root)", s->cwd);
        close(d);
        close(root);
    }
    /* read-only only now, so the working dir could still be created */
    if (s->rootfs && s->rootfs_readonly) {
        struct mount_attr a = {.attr_set = MOUNT_ATTR_RDONLY};
        if (mount_setattr(AT_FDCWD, "/", 0, &a, sizeof(a)) < 0)
            CFAIL(PYCRI_STAGE_PIVOT, "read-only rootfs", NULL);
    }
    for (int i = 0; i < s->n_rlimits; i++) {
        struct rlimit rl = {(rlim_t)s->rlimits[i].soft, (rlim_t)s->rlimits[i].hard};
        if (prlimit(0, (__rlimit_resource_t)s->rlimits[i].resource, &rl, NULL) < 0) {
            char num[24];
            utoa10(s->rlimits[i].resource, num);
            CFAIL(PYCRI_STAGE_RLIMIT, "setrlimit resource", num);
        }
    }
    int want_seccomp = s->seccomp_bpf && s->seccomp_len > 0;
    /* without no_new_privs, loading a filter needs CAP_SYS_ADMIN: do it while we have it */
    if (want_seccomp && !s->no_new_privs && load_seccomp(s) < 0)
        CFAIL(PYCRI_STAGE_SECCOMP, "seccomp(SET_MODE_FILTER)", NULL);

    if (syscall(SYS_setgroups, (size_t)(s->n_groups > 0 ? s->n_groups : 0), s->groups) < 0)
        CFAIL(PYCRI_STAGE_USER, "setgroups", NULL);
    if (raw_setresgid(s->gid) < 0)
        CFAIL(PYCRI_STAGE_USER, "setresgid", NULL);
    /* the bounding set can only shrink while CAP_SETPCAP is still effective */
    for (int c = 0; c <= plan->cap_last && c < 64; c++)
        if (!((s->cap_bounding >> c) & 1) && prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0)
            CFAIL(PYCRI_STAGE_CAPS, "prctl(PR_CAPBSET_DROP)", NULL);
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0)
        CFAIL(PYCRI_STAGE_USER, "prctl(PR_SET_KEEPCAPS)", NULL);
    if (raw_setresuid(s->uid) < 0)
        CFAIL(PYCRI_STAGE_USER, "setresuid", NULL);
    if (prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0) < 0)
        CFAIL(PYCRI_STAGE_USER, "prctl(PR_SET_KEEPCAPS)", NULL);
    if (set_caps(plan) < 0)
        CFAIL(PYCRI_STAGE_CAPS, "capset", NULL);
    if (s->no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        CFAIL(PYCRI_STAGE_USER, "prctl(PR_SET_NO_NEW_PRIVS)", NULL);
    if (want_seccomp && s->no_new_privs && load_seccomp(s) < 0)
        CFAIL(PYCRI_STAGE_SECCOMP, "seccomp(SET_MODE_FILTER)", NULL);

    /* a uid change resets dumpable to fs.suid_dumpable: clear it again */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    char path[PATH_MAX];
    if (resolve_exec(plan, path, &ce) < 0)
        die(plan, &ce);
    umask(022);
    send_msg(plan->sock, MSG_READY, 0, NULL);
    if (plan->start_rd >= 0) {
        /* held: named so (ps shows it, and a launcher that finds this process dead
         * knows it never reached execve, which renames it) */
        prctl(PR_SET_NAME, "pycri:held", 0, 0, 0);
        char c;
        ssize_t n;
        do
            n = read(plan->start_rd, &c, 1);
        while (n < 0 && errno == EINTR);
        if (n != 1)
            _exit(0); /* the caller went away or gave up: never start */
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execve(path, (char *const *)s->argv, (char *const *)(s->envp ? s->envp : (const char *const[]){NULL}));
    CFAIL(PYCRI_STAGE_EXEC, "execve", path);
}

/* Close every fd the child does not need. Besides hygiene, this keeps the
 * report socket of a spawn running concurrently in another thread from being
 * held open here (its caller would wait for our exec to see its EOF). */
static void close_unneeded_fds(const struct pycri__plan *plan) {
    const struct pycri_spawn_spec *s = plan->spec;
    int keep[1024 + 16 + PYCRI_MAX_CGROUPS + 8 + PYCRI_USERNS_MAX_BINDS];
    int n = 0;
    n += pycri__userns_keep_fds(plan, keep, 8 + PYCRI_USERNS_MAX_BINDS);
    keep[n++] = plan->sock;
    keep[n++] = plan->start_rd;
    keep[n++] = plan->devnull;
    for (int i = 0; i < plan->n_cg; i++)
        keep[n++] = plan->cg_tasks_fd[i];
    for (int k = 0; k < PYCRI_NS_COUNT; k++)
        keep[n++] = plan->ns_fd[k];
    for (int i = 0; i < 3; i++)
        keep[n++] = s->stdio[i];
    keep[n++] = s->tty_fd;
    keep[n++] = s->rootfs_premounted ? s->rootfs_mount_fd : -1;
    for (int i = 0; i < s->n_keep_fds && n < (int)(sizeof(keep) / sizeof(keep[0])); i++)
        keep[n++] = s->keep_fds[i];
    for (int i = 1; i < n; i++) /* insertion sort: n is small */
        for (int j = i; j > 0 && keep[j - 1] > keep[j]; j--) {
            int t = keep[j];
            keep[j] = keep[j - 1];
            keep[j - 1] = t;
        }
    unsigned int from = 0;
    for (int i = 0; i < n; i++) {
        if (keep[i] < 0 || (unsigned int)keep[i] < from)
            continue;
        if ((unsigned int)keep[i] > from)
            syscall(SYS_close_range, from, (unsigned int)keep[i] - 1, 0);
        from = (unsigned int)keep[i] + 1;
    }
    syscall(SYS_close_range, from, ~0U, 0);
}

static __attribute__((noreturn)) void child_main(struct pycri__plan *plan, int two_step) {
    const struct pycri_spawn_spec *s = plan->spec;
    struct pycri__cerr ce;

    close_unneeded_fds(plan);
    /* v1 cgroups: "0" in a tasks file moves just the writing thread, which the
     * kernel does without the global threadgroup lock (whose first writer after
     * a quiet spell waits for an RCU grace period, ~6 ms); for a single-threaded
     * process that is the whole process. Children inherit it. */
    for (int i = 0; i < plan->n_cg; i++) {
        if (plan->cg_tasks_fd[i] < 0)
            continue;
        ssize_t w;
        do
            w = write(plan->cg_tasks_fd[i], "0", 1);
        while (w < 0 && errno == EINTR);
        if (w != 1)
            CFAIL(PYCRI_STAGE_CGROUP, "cgroup: write 0 to tasks for", s->cgroup_procs[i]);
        close(plan->cg_tasks_fd[i]);
    }

    umask(0);
    /* signals stay blocked (the parent blocked them around clone); reset the
     * dispositions so the program does not inherit the caller's SIG_IGNs */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < _NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            sigaction(sig, &dfl, NULL);
    if (s->parent_death_signal)
        prctl(PR_SET_PDEATHSIG, s->parent_death_signal, 0, 0, 0);
    /* not dumpable, so not ptraceable and /proc/<pid> stays root's, until execve */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

    if (!two_step) {
        /* the parent has something to do for us only with id maps to write or a
         * cgroup it must put us in; otherwise skip the round trip */
        int parent_work = plan->userns_new;
        for (int i = 0; i < plan->n_cg; i++)
            parent_work |= plan->cg_by_parent[i];
        if (parent_work) {
            send_msg(plan->sock, MSG_SETUP, 0, NULL);
            wait_go(plan);
        }
        child_finish(plan);
    }
    /* Joining: every other namespace first, while this process still has the
     * host's privileges (a pod's namespaces belong to the host's user namespace,
     * which a process inside a container's user namespace cannot enter), then the
     * user namespace; new namespaces after that, so they belong to it. */
    for (int k = 0; k < PYCRI_NS_COUNT; k++)
        if (k != PYCRI_NS_USER && plan->ns_fd[k] >= 0 && setns(plan->ns_fd[k], ns_flag[k]) < 0)
            CFAIL(PYCRI_STAGE_NAMESPACE, "setns", ns_name[k]);
    if (plan->um && pycri__userns_enter_rootfs(plan, &ce) < 0)
        die(plan, &ce);
    if (plan->ns_fd[PYCRI_NS_USER] >= 0 &&
        setns(plan->ns_fd[PYCRI_NS_USER], ns_flag[PYCRI_NS_USER]) < 0)
        CFAIL(PYCRI_STAGE_NAMESPACE, "setns", ns_name[PYCRI_NS_USER]);
    int flags = 0;
    for (int k = 0; k < PYCRI_NS_COUNT; k++)
        if (s->ns_mode[k] == PYCRI_NS_NEW && k != PYCRI_NS_CGROUP)
            flags |= ns_flag[k];
    if (flags && unshare(flags) < 0)
        CFAIL(PYCRI_STAGE_NAMESPACE, "unshare", NULL);
    send_msg(plan->sock, MSG_SETUP, (int)getpid(), NULL);
    wait_go(plan);
    if (s->ns_mode[PYCRI_NS_PID] != PYCRI_NS_HOST) {
        /* a pid namespace applies to children only: fork the real process as a
         * child of the caller, report its pid, and leave */
        long pid = syscall(SYS_clone, CLONE_PARENT | SIGCHLD, 0, 0, 0, 0);
        if (pid < 0)
            CFAIL(PYCRI_STAGE_CLONE, "clone (into the pid namespace)", NULL);
        if (pid > 0) {
            send_msg(plan->sock, MSG_PID, (int)pid, NULL);
            _exit(0);
        }
        if (s->parent_death_signal)
            prctl(PR_SET_PDEATHSIG, s->parent_death_signal, 0, 0, 0);
    }
    child_finish(plan);
}

/* ============================== parent ===================================== */

static int write_file(const char *path, const char *data) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = write_all(fd, data, strlen(data));
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

int pycri__read_start_time(int pid, unsigned long long *out) {
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    /* after ") " comes field 3 (state); starttime is field 22 */
    p++;
    for (int field = 3; field < 22 && p; field++)
        p = strchr(p + 1, ' ');
    if (!p)
        return -1;
    *out = strtoull(p + 1, NULL, 10);
    return 0;
}

static int set_err_from_child(struct pycri_error *err, const struct pycri__cerr *ce) {
    char text[sizeof(ce->text) + 1];
    memcpy(text, ce->text, sizeof(ce->text));
    text[sizeof(ce->text)] = '\0';
    if (ce->plain) {
        snprintf(err->msg, sizeof(err->msg), "%s: %s", stage_str(ce->stage), text);
        err->code = ce->code;
        return -(ce->code ? ce->code : 1);
    }
    return pycri_fail(err, ce->code, "%s: %s", stage_str(ce->stage), text);
}

struct parent_state {
    int first_pid, final_pid, first_pidfd;
    int two_step;
    int tty_master;            /* from MSG_TTY, -1 */
};

/* recv one report message; an fd passed with it (SCM_RIGHTS) lands in *fd (CLOEXEC),
 * any further ones are closed. */
static ssize_t recv_report(int sock, struct msg *m, int *fd) {
    struct iovec iov = {m, sizeof(*m)};
    union {
        char buf[CMSG_SPACE(sizeof(int) * 4)];
        struct cmsghdr align;
    } u;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                        .msg_controllen = sizeof(u.buf)};
    *fd = -1;
    ssize_t n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
    if (n < 0)
        return n;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int got;
            memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            if (*fd < 0)
                *fd = got;
            else
                close(got);
        }
    }
    return n;
}

static void reap(struct parent_state *st, int kill_final) {
    if (st->final_pid > 0 && kill_final) {
        kill(st->final_pid, SIGKILL);
        while (waitpid(st->final_pid, NULL, __WALL) < 0 && errno == EINTR)
            ;
    }
    if (st->two_step && st->first_pid > 0 && st->first_pid != st->final_pid) {
        kill(st->first_pid, SIGKILL);
        while (waitpid(st->first_pid, NULL, __WALL) < 0 && errno == EINTR)
            ;
        if (st->first_pidfd >= 0)
            close(st->first_pidfd);
        st->first_pidfd = -1;
    }
}

/* Build "sys/a/b\0value\0" pairs; keys are checked here as a last line of defence. */
static int prepare_sysctls(const struct pycri_spawn_spec *s, char **buf, int *count,
                           struct pycri_error *err) {
    size_t total = 0;
    int n = 0;
    for (const char *const *p = s->sysctls; p && *p; p++, n++)
        total += strlen(*p) + 8;
    *count = n;
    *buf = NULL;
    if (!n)
        return 0;
    char *out = malloc(total);
    if (!out)
        return pycri_fail(err, ENOMEM, "prepare: sysctls");
    char *o = out;
    for (const char *const *p = s->sysctls; *p; p++) {
        const char *eq = strchr(*p, '=');
        size_t klen = eq ? (size_t)(eq - *p) : 0;
        int slash = memchr(*p, '/', klen) != NULL;
        if (!eq || klen == 0 || strstr(*p, "..") || (*p)[0] == '.' || (*p)[0] == '/' ||
            strchr(eq + 1, '\n')) {
            free(out);
            return pycri_fail(err, EINVAL, "prepare: bad sysctl \"%s\"", *p);
        }
        memcpy(o, "sys/", 4);
        o += 4;
        for (size_t i = 0; i < klen; i++) {
            char c = (*p)[i];
            if (!(c == '.' || c == '/' || c == '-' || c == '_' || (c >= '0' && c <= '9') ||
                  (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))) {
                free(out);
                return pycri_fail(err, EINVAL, "prepare: bad sysctl key \"%s\"", *p);
            }
            /* dotted keys use '.' as the separator; keys with '/' keep '.' literal */
            *o++ = (!slash && c == '.') ? '/' : c;
        }
        *o++ = '\0';
        size_t vlen = strlen(eq + 1);
        memcpy(o, eq + 1, vlen + 1);
        o += vlen + 1;
    }
    *buf = out;
    return 0;
}

/* The mount point of the mount that holds path (mountinfo field 5, unescaped). */
static int parent_mount_point(const char *path, char *out, size_t outlen,
                              struct pycri_error *err) {
    struct statx stx;
    if (statx(AT_FDCWD, path, 0, STATX_MNT_ID, &stx) < 0 || !(stx.stx_mask & STATX_MNT_ID))
        return pycri_fail(err, errno ? errno : ENOTSUP, "prepare: statx %s", path);
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f)
        return pycri_fail(err, errno, "prepare: open /proc/self/mountinfo");
    char *line = NULL;
    size_t cap = 0;
    int found = 0;
    while (!found && getline(&line, &cap, f) > 0) {
        unsigned long long id;
        char mp[4096];
        if (sscanf(line, "%llu %*u %*s %*s %4095s", &id, mp) != 2 || id != stx.stx_mnt_id)
            continue;
        size_t o = 0;
        for (char *c = mp; *c && o + 1 < outlen; c++) {
            if (c[0] == '\\' && c[1] >= '0' && c[1] <= '3' && c[2] && c[3]) {
                out[o++] = (char)((c[1] - '0') * 64 + (c[2] - '0') * 8 + (c[3] - '0'));
                c += 3;
            } else {
                out[o++] = *c;
            }
        }
        out[o] = '\0';
        found = 1;
    }
    free(line);
    fclose(f);
    if (!found)
        return pycri_fail(err, ENOENT, "prepare: no mountinfo entry holds %s", path);
    return 0;
}

/* The pid behind a pidfd (its fdinfo "Pid:" line); -errno on failure. */
static int pidfd_pid(int pidfd) {
    if (pidfd < 0)
        return -EBADF;
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", pidfd);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -EIO;
    buf[n] = '\0';
    char *p = strstr(buf, "\nPid:");
    if (!p)
        return -EBADF; /* not a pidfd */
    int pid = atoi(p + 5);
    return pid > 0 ? pid : -ESRCH; /* -1 once the process is gone */
}

/* Decide how the process enters each cgroup without the parent writing its pid
 * into cgroup.procs, which takes the kernel's global threadgroup lock and costs
 * an RCU grace period whenever no other write happened just before:
 *   v1 (the dir has a "tasks" file): the child writes "0" to it, opened here;
 *   v2 (no "tasks"): the first one is clone3's CLONE_INTO_CGROUP target;
 *   anything else, or a file that cannot be opened: the parent writes the pid
 *   into the given path, as before (and reports the error if that fails). */
static void place_cgroups(const struct pycri_spawn_spec *s, struct pycri__plan *plan) {
    int i = 0;
    for (const char *const *c = s->cgroup_procs; c && *c && i < PYCRI_MAX_CGROUPS; c++, i++) {
        plan->cg_tasks_fd[i] = -1;
        plan->cg_by_parent[i] = 1;
        plan->n_cg = i + 1;
        const char *slash = strrchr(*c, '/');
        if (!slash || strcmp(slash + 1, "cgroup.procs") != 0)
            continue;
        size_t dirlen = (size_t)(slash - *c);
        char path[PATH_MAX];
        if (dirlen + sizeof("/tasks") > sizeof(path))
            continue;
        memcpy(path, *c, dirlen);
        strcpy(path + dirlen, "/tasks");
        int fd = open(path, O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            plan->cg_tasks_fd[i] = fd;
            plan->cg_by_parent[i] = 0;
            continue;
        }
        if (errno != ENOENT || plan->cg_v2_fd >= 0)
            continue;
        path[dirlen ? dirlen : 1] = '\0';
        struct statfs sf;
        fd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
            continue;
        if (fstatfs(fd, &sf) < 0 || sf.f_type != CGROUP2_SUPER_MAGIC) {
            close(fd);
            continue;
        }
        plan->cg_v2_fd = fd;
        plan->cg_v2_index = i;
        plan->cg_by_parent[i] = 0;
    }
}

static int prepare(const struct pycri_spawn_spec *s, struct pycri__plan *plan,
                   struct pycri_error *err) {
    int target_pid = 0;
    if (!s->argv || !s->argv[0])
        return pycri_fail(err, EINVAL, "prepare: argv is empty");
    for (int k = 0; k < PYCRI_NS_COUNT; k++) {
        if (s->ns_mode[k] < PYCRI_NS_HOST || s->ns_mode[k] > PYCRI_NS_JOIN)
            return pycri_fail(err, EINVAL, "prepare: bad mode %d for the %s namespace",
                              s->ns_mode[k], ns_name[k]);
        if (s->ns_mode[k] != PYCRI_NS_JOIN)
            continue;
        const char *path = s->ns_path[k];
        char bypid[64];
        if (!path) {
            if (target_pid <= 0 && (target_pid = pidfd_pid(s->join_pidfd)) <= 0)
                return pycri_fail(err, target_pid < 0 ? -target_pid : EINVAL,
                                  "prepare: no path to join the %s namespace and no usable "
                                  "join_pidfd", ns_name[k]);
            snprintf(bypid, sizeof(bypid), "/proc/%d/ns/%s", target_pid, ns_name[k]);
            path = bypid;
        }
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return pycri_fail(err, errno, "prepare: open %s", path);
        plan->ns_fd[k] = fd;
        /* joining the namespace we are already in is a no-op (and EINVAL for user) */
        char self[64];
        struct stat a, b;
        snprintf(self, sizeof(self), "/proc/self/ns/%s", ns_name[k]);
        if (fstat(fd, &a) == 0 && stat(self, &b) == 0 && a.st_ino == b.st_ino &&
            a.st_dev == b.st_dev) {
            close(fd);
            plan->ns_fd[k] = -1;
        }
    }
    /* the namespaces were opened by pid: if the pidfd's process is still alive
     * now, it was alive during the opens, so /proc/<pid> was that process */
    if (target_pid > 0 && syscall(SYS_pidfd_send_signal, s->join_pidfd, 0, NULL, 0) < 0)
        return pycri_fail(err, errno, "prepare: the join_pidfd process is gone");
    if (s->join_in_caller && s->ns_mode[PYCRI_NS_USER] == PYCRI_NS_HOST) {
        static const int early[] = {PYCRI_NS_NET, PYCRI_NS_IPC, PYCRI_NS_UTS, PYCRI_NS_PID};
        for (size_t i = 0; i < sizeof(early) / sizeof(early[0]); i++) {
            int k = early[i];
            if (plan->ns_fd[k] < 0)
                continue;
            /* (pid: this process stays where it is; its children go there) */
            if (setns(plan->ns_fd[k], ns_flag[k]) < 0)
                return pycri_fail(err, errno, "prepare: setns into the %s namespace",
                                  ns_name[k]);
            close(plan->ns_fd[k]);
            plan->ns_fd[k] = -1;
        }
    }
    plan->userns_new = s->ns_mode[PYCRI_NS_USER] == PYCRI_NS_NEW;
    plan->userns_any = plan->userns_new || plan->ns_fd[PYCRI_NS_USER] >= 0;
    if (plan->userns_new && (s->uid_map_count == 0 || s->gid_map_count == 0))
        return pycri_fail(err, EINVAL, "prepare: a new user namespace needs a uid and a gid mapping");
    if (plan->userns_new && (s->uid_map_inside != 0 || s->gid_map_inside != 0))
        return pycri_fail(err, EINVAL, "prepare: the user namespace mappings must start at id 0");
    if (s->hostname && s->ns_mode[PYCRI_NS_UTS] != PYCRI_NS_NEW)
        return pycri_fail(err, EINVAL, "prepare: hostname needs a new uts namespace");
    if (s->rootfs && s->ns_mode[PYCRI_NS_MNT] != PYCRI_NS_NEW)
        return pycri_fail(err, EINVAL, "prepare: a rootfs needs a new mount namespace");
    if (s->tty_new && (s->tty_fd >= 0 || !s->rootfs || !s->mount_dev))
        return pycri_fail(err, EINVAL, "prepare: tty_new needs a rootfs with mount_dev and no "
                          "tty_fd");
    if (s->n_keep_fds < 0 || s->n_keep_fds > 1024 || (s->n_keep_fds && !s->keep_fds))
        return pycri_fail(err, EINVAL, "prepare: bad keep_fds");
    if (s->seccomp_bpf && (s->seccomp_len == 0 || s->seccomp_len > 4096))
        return pycri_fail(err, EINVAL, "prepare: seccomp program of %u instructions",
                          s->seccomp_len);
    if (s->rootfs_premounted && (!s->rootfs || s->rootfs_mount_fd < 0 ||
                                 s->ns_mode[PYCRI_NS_USER] != PYCRI_NS_HOST))
        return pycri_fail(err, EINVAL, "prepare: a premounted rootfs needs a rootfs path, its "
                                       "fd, and no user namespace");
    if (s->rootfs && s->overlay_lower) {
        const char *parts[3] = {s->overlay_lower, s->overlay_upper, s->overlay_work};
        for (int i = 0; i < 3; i++)
            if (parts[i] && strchr(parts[i], ','))
                return pycri_fail(err, EINVAL, "prepare: overlay path with a comma: %s",
                                  parts[i]);
        int n = s->overlay_upper
                    ? snprintf(plan->overlay_opts, sizeof(plan->overlay_opts),
                               "lowerdir=%s,upperdir=%s,workdir=%s", s->overlay_lower,
                               s->overlay_upper, s->overlay_work ? s->overlay_work : "")
                    : snprintf(plan->overlay_opts, sizeof(plan->overlay_opts), "lowerdir=%s",
                               s->overlay_lower);
        if (n < 0 || (size_t)n >= sizeof(plan->overlay_opts))
            return pycri_fail(err, E2BIG, "prepare: overlay options longer than a page");
    }
    if (s->rootfs && s->root_propagation == PYCRI_PROP_RSHARED &&
        parent_mount_point(s->rootfs, plan->rootfs_parent, sizeof(plan->rootfs_parent), err) < 0)
        return -1;
    char buf[16] = {0};
    plan->cap_last = CAP_LAST_CAP; /* the headers' idea, if the kernel's is unreadable */
    int fd = open("/proc/sys/kernel/cap_last_cap", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (read(fd, buf, sizeof(buf) - 1) > 0)
            plan->cap_last = atoi(buf);
        close(fd);
    }
    plan->devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (plan->devnull < 0)
        return pycri_fail(err, errno, "prepare: open /dev/null");
    return 0;
}

static long do_clone(int flags, int *pidfd, struct pycri__plan *plan) {
    struct clone_args_k args;
    memset(&args, 0, sizeof(args));
    args.flags = (uint64_t)flags | CLONE_PIDFD;
    args.pidfd = (uint64_t)(uintptr_t)pidfd;
    args.exit_signal = SIGCHLD;
    long pid;
    if (plan->cg_v2_fd >= 0) {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = (uint64_t)plan->cg_v2_fd;
        pid = syscall(SYS_clone3, &args, sizeof(args));
        if (pid >= 0)
            return pid;
        /* the parent writes cgroup.procs instead (and reports what is wrong) */
        plan->cg_by_parent[plan->cg_v2_index] = 1;
        args.flags &= ~(uint64_t)CLONE_INTO_CGROUP;
        args.cgroup = 0;
    }
    pid = syscall(SYS_clone3, &args, (size_t)64);
    if (pid >= 0 || (errno != ENOSYS && errno != E2BIG))
        return pid;
    /* x86-64 order: flags, stack, parent_tid (CLONE_PIDFD stores there), child_tid, tls */
    return syscall(SYS_clone, (unsigned long)flags | CLONE_PIDFD | SIGCHLD, 0, pidfd, 0, 0);
}

static void close_plan(struct pycri__plan *plan, char *sysctl_buf) {
    for (int i = 0; i < plan->n_cg; i++)
        if (plan->cg_tasks_fd[i] >= 0)
            close(plan->cg_tasks_fd[i]);
    plan->n_cg = 0;
    if (plan->cg_v2_fd >= 0)
        close(plan->cg_v2_fd);
    plan->cg_v2_fd = -1;
    for (int k = 0; k < PYCRI_NS_COUNT; k++)
        if (plan->ns_fd[k] >= 0)
            close(plan->ns_fd[k]);
    if (plan->devnull >= 0)
        close(plan->devnull);
    pycri__userns_release(plan);
    free(sysctl_buf);
}

/* Wait on the report socket until EOF (after READY: exec done), READY when
 * stop_at_ready, or an error. Handles SETUP (maps, cgroups) and PID. */
static int converse(const struct pycri_spawn_spec *s, const struct pycri__plan *plan, int sock,
                    struct parent_state *st, int stop_at_ready, int *stage,
                    struct pycri_error *err) {
    int failed = 0, ready = 0;
    for (;;) {
        struct msg m;
        int passed = -1;
        ssize_t n = recv_report(sock, &m, &passed);
        if (n < 0 && errno == EINTR)
            continue;
        if (passed >= 0 && n == (ssize_t)sizeof(m) && m.kind == MSG_TTY && st->tty_master < 0)
            st->tty_master = passed;
        else if (passed >= 0)
            close(passed);
        if (n == 0)
            break;
        if (n != (ssize_t)sizeof(m)) {
            if (!failed) {
                failed = 1;
                *stage = PYCRI_STAGE_CLONE;
                pycri_fail(err, n < 0 ? errno : EPROTO, "clone: report socket");
            }
            break;
        }
        if (m.kind == MSG_SETUP && !failed) {
            int target = m.pid > 0 ? m.pid : st->first_pid;
            char path[PATH_MAX], line[96];
            if (s && plan->userns_new) {
                snprintf(path, sizeof(path), "/proc/%d/uid_map", target);
                snprintf(line, sizeof(line), "%u %u %u\n", s->uid_map_inside, s->uid_map_outside,
                         s->uid_map_count);
                if (write_file(path, line) < 0) {
                    *stage = PYCRI_STAGE_IDMAP;
                    pycri_fail(err, errno, "idmap: write %s", path);
                    failed = 1;
                } else {
                    snprintf(path, sizeof(path), "/proc/%d/gid_map", target);
                    snprintf(line, sizeof(line), "%u %u %u\n", s->gid_map_inside,
                             s->gid_map_outside, s->gid_map_count);
                    if (write_file(path, line) < 0) {
                        *stage = PYCRI_STAGE_IDMAP;
                        pycri_fail(err, errno, "idmap: write %s", path);
                        failed = 1;
                    }
                }
            }
            int ci = 0;
            for (const char *const *c = s ? s->cgroup_procs : NULL; !failed && c && *c; c++, ci++) {
                if (ci < plan->n_cg && !plan->cg_by_parent[ci])
                    continue;
                snprintf(line, sizeof(line), "%d", target);
                if (write_file(*c, line) < 0) {
                    *stage = PYCRI_STAGE_CGROUP;
                    pycri_fail(err, errno, "cgroup: write %s", *c);
                    failed = 1;
                }
            }
            if (failed) {
                kill(target, SIGKILL);
                continue;
            }
            struct msg go;
            memset(&go, 0, sizeof(go));
            go.kind = MSG_GO;
            send(sock, &go, sizeof(go), MSG_NOSIGNAL);
        } else if (m.kind == MSG_PID) {
            st->final_pid = m.pid;
        } else if (m.kind == MSG_READY) {
            ready = 1;
            if (stop_at_ready && !failed)
                return 0;
        } else if (m.kind == MSG_ERROR && !failed) {
            failed = 1;
            *stage = m.ce.stage;
            set_err_from_child(err, &m.ce);
        }
    }
    if (failed)
        return -1;
    if (!ready) {
        *stage = PYCRI_STAGE_CLONE;
        return pycri_fail(err, ECHILD, "clone: the container process exited during setup");
    }
    return 0;
}

void (*pycri__after_clone)(int pid);

PYCRI_EXPORT int pycri_spawn(const struct pycri_spawn_spec *s, struct pycri_spawn_result *res,
                             struct pycri_error *err) {
    struct pycri__plan plan;
    memset(&plan, 0, sizeof(plan));
    plan.spec = s;
    for (int k = 0; k < PYCRI_NS_COUNT; k++)
        plan.ns_fd[k] = -1;
    plan.devnull = plan.sock = plan.start_rd = plan.cg_v2_fd = -1;
    plan.tty_fd = s->tty_fd;
    res->pid = res->pidfd = res->start_fd = res->report_fd = res->tty_master = -1;
    res->stage = PYCRI_STAGE_PREPARE;
    res->start_time = 0;

    char *sysctl_buf = NULL;
    int rc = prepare(s, &plan, err);
    if (rc == 0)
        rc = prepare_sysctls(s, &sysctl_buf, &plan.n_sysctl, err);
    if (rc == 0)
        place_cgroups(s, &plan);
    if (rc == 0)
        rc = pycri__userns_prepare(s, &plan, err);
    plan.sysctl_buf = sysctl_buf;
    int sv[2] = {-1, -1}, startp[2] = {-1, -1};
    if (rc == 0 && socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        rc = pycri_fail(err, errno, "prepare: socketpair");
    /* a socket rather than a pipe: the start write uses MSG_NOSIGNAL, so a dead
     * child gives EPIPE and never a SIGPIPE to the caller */
    if (rc == 0 && s->start_wait &&
        socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, startp) < 0)
        rc = pycri_fail(err, errno, "prepare: socketpair (start)");
    if (rc < 0) {
        if (sv[0] >= 0) {
            close(sv[0]);
            close(sv[1]);
        }
        close_plan(&plan, sysctl_buf);
        return rc;
    }
    plan.sock = sv[1];
    plan.start_rd = startp[0];

    int two_step = 0, flags = 0;
    for (int k = 0; k < PYCRI_NS_COUNT; k++) {
        if (plan.ns_fd[k] >= 0)
            two_step = 1;
        if (s->ns_mode[k] == PYCRI_NS_NEW && k != PYCRI_NS_CGROUP)
            flags |= ns_flag[k];
    }
    struct parent_state st = {.first_pid = -1, .final_pid = -1, .first_pidfd = -1,
                              .two_step = two_step, .tty_master = -1};

    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int pidfd = -1;
    long pid = do_clone(two_step ? 0 : flags, &pidfd, &plan);
    if (pid == 0) {
        close(sv[0]);
        if (startp[1] >= 0)
            close(startp[1]);
        child_main(&plan, two_step);
    }
    int clone_errno = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(sv[1]);
    if (startp[0] >= 0)
        close(startp[0]);
    if (pid < 0) {
        res->stage = PYCRI_STAGE_CLONE;
        close(sv[0]);
        if (startp[1] >= 0)
            close(startp[1]);
        close_plan(&plan, sysctl_buf);
        return pycri_fail(err, clone_errno, "clone: clone3");
    }
    st.first_pid = (int)pid;
    st.first_pidfd = pidfd;
    /* without a pid namespace to enter, the first process is the container */
    if (!two_step || s->ns_mode[PYCRI_NS_PID] == PYCRI_NS_HOST)
        st.final_pid = (int)pid;
    /* the caller's chance to work beside the child's setup, pid known */
    if (st.final_pid > 0 && pycri__after_clone)
        pycri__after_clone(st.final_pid);

    int stage = PYCRI_STAGE_NONE;
    rc = converse(s, &plan, sv[0], &st, s->start_wait, &stage, err);
    if (rc == 0 && s->tty_new && st.tty_master < 0) {
        stage = PYCRI_STAGE_TTY;
        rc = pycri_fail(err, EPROTO, "tty: the container process sent no pty master");
    }
    close_plan(&plan, sysctl_buf);
    if (rc < 0) {
        if (st.tty_master >= 0)
            close(st.tty_master);
        reap(&st, 1);
        if (st.first_pidfd >= 0)
            close(st.first_pidfd);
        close(sv[0]);
        if (startp[1] >= 0)
            close(startp[1]);
        res->stage = stage;
        return rc;
    }
    reap(&st, 0); /* the intermediate process, if any */
    res->pid = st.final_pid;
    res->pidfd = st.final_pid == st.first_pid ? pidfd
                                              : (int)syscall(SYS_pidfd_open, st.final_pid, 0);
    pycri__read_start_time(st.final_pid, &res->start_time);
    res->tty_master = st.tty_master;
    res->stage = PYCRI_STAGE_NONE;
    if (s->start_wait) {
        res->start_fd = startp[1];
        res->report_fd = sv[0];
    } else {
        close(sv[0]);
    }
    return 0;
}

PYCRI_EXPORT int pycri_spawn_start(int start_fd, int report_fd, struct pycri_error *err) {
    ssize_t n;
    do
        n = send(start_fd, "1", 1, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    int werr = errno;
    close(start_fd);
    if (n != 1) {
        close(report_fd);
        return pycri_fail(err, werr, "start: send on the start socket");
    }
    /* READY was already consumed by pycri_spawn: only EOF or ERROR can come */
    struct msg m;
    for (;;) {
        n = recv(report_fd, &m, sizeof(m), 0);
        if (n < 0 && errno == EINTR)
            continue;
        break;
    }
    close(report_fd);
    if (n == 0)
        return 0;
    if (n == (ssize_t)sizeof(m) && m.kind == MSG_ERROR)
        return set_err_from_child(err, &m.ce);
    return pycri_fail(err, n < 0 ? errno : EPROTO, "start: report socket");
}
