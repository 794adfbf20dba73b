/* spawn_child.c - the container process's side of pycri_spawn (spawn.c), from
 * the clone to execve: cgroups (v1 tasks), namespaces joined or made, the mount
 * setup (mount.c), hostname, sysctls, the tty, stdio and kept fds, working dir,
 * rlimits, user and groups, capabilities, no_new_privs, seccomp; READY, then
 * (start_wait) the wait for start, and execve. Failures go to the parent as
 * (stage, errno, text) on the report socket.
 *
 * After clone the child runs only syscalls and string copies on memory the
 * parent prepared: it is a copy of a possibly multi-threaded process.
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
#include <sys/mman.h>
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


/* The kernel's struct sigaction, for rt_sigaction itself: glibc's sigaction()
 * refuses its internal signals (32 and 33), which posix_spawn leaves ignored. */
struct ksigaction {
    void (*handler)(int);
    unsigned long flags;
    void (*restorer)(void);
    unsigned long mask;
};

void pycri__default_all_signals(void) {
    struct ksigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.handler = SIG_DFL;
    for (int sig = 1; sig < _NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            syscall(SYS_rt_sigaction, sig, &dfl, NULL, sizeof(dfl.mask));
}

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
        if (fd < 0 || pycri__write_all(fd, val, strlen(val)) < 0) {
            pycri__cfail(ce, PYCRI_STAGE_SYSCTL, errno, "write /proc", key);
            if (fd >= 0)
                close(fd);
            return -1;
        }
        close(fd);
    }
    return 0;
}

int pycri__spec_fd_fields(const struct pycri_spawn_spec *s, int **out) {
    int n = 0;
    for (int i = 0; i < 3; i++)
        out[n++] = (int *)&s->stdio[i];
    out[n++] = (int *)&s->tty_fd;
    for (int i = 0; i < s->n_keep_fds && n < PYCRI_SPEC_FD_FIELDS_MAX; i++)
        out[n++] = (int *)&s->keep_fds[i];
    return n;
}

ssize_t pycri__send_fds(int sock, const void *buf, size_t len, const int *fds, int n) {
    if (n < 0 || n > PYCRI_SEND_FDS_MAX) {
        errno = EINVAL;
        return -1;
    }
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int) * PYCRI_SEND_FDS_MAX)];
    } cm;
    memset(&cm, 0, sizeof(cm));
    struct iovec iov = {(void *)buf, len};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (n > 0) {
        mh.msg_control = cm.buf;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)n);
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)n);
    }
    ssize_t w;
    do
        w = sendmsg(sock, &mh, MSG_NOSIGNAL);
    while (w < 0 && errno == EINTR);
    return w;
}

ssize_t pycri__recv_fds(int sock, void *buf, size_t len, int *fds, int room, int *nfds) {
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int) * PYCRI_SEND_FDS_MAX)];
    } cm;
    struct iovec iov = {buf, len};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf,
                        .msg_controllen = sizeof(cm.buf)};
    ssize_t r;
    do
        r = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
    while (r < 0 && errno == EINTR);
    int stored = 0;
    if (r >= 0) {
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < k; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + (size_t)i * sizeof(int), sizeof(int));
                if (stored < room)
                    fds[stored++] = fd;
                else
                    close(fd);
            }
        }
        if (mh.msg_flags & MSG_CTRUNC)
            stored = -1;
    }
    *nfds = stored;
    return r;
}

/* Send a message carrying one fd (SCM_RIGHTS). */
static int send_fd_msg(int sock, int kind, int fd) {
    struct msg m;
    memset(&m, 0, sizeof(m));
    m.kind = kind;
    return pycri__send_fds(sock, &m, sizeof(m), &fd, 1) == (ssize_t)sizeof(m) ? 0 : -1;
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
/* v1 cgroups: "0" in a tasks file moves just the writing thread, which the
 * kernel does without the global threadgroup lock (whose first writer after a
 * quiet spell waits for an RCU grace period, ~6 ms); for a single-threaded
 * process that is the whole process. Children inherit it. */
static void join_cgroups(struct pycri__plan *plan, int from, int to) {
    const struct pycri_spawn_spec *s = plan->spec;
    struct pycri__cerr ce;
    for (int i = from; i < to && i < plan->n_cg; i++) {
        if (plan->cg_tasks_fd[i] < 0)
            continue;
        ssize_t w;
        do
            w = write(plan->cg_tasks_fd[i], "0", 1);
        while (w < 0 && errno == EINTR);
        if (w != 1)
            CFAIL(PYCRI_STAGE_CGROUP, "cgroup: write 0 to tasks for", s->cgroup_procs[i]);
        close(plan->cg_tasks_fd[i]);
        plan->cg_tasks_fd[i] = -1;
    }
}

static int late_cgroups(const struct pycri__plan *plan) {
    int late = plan->spec->cgroup_late;
    return late < 0 ? 0 : (late > plan->n_cg ? plan->n_cg : late);
}

/* a cgroup namespace is rooted at the cgroup current when it is made: only
 * once in the container's cgroups */
static void new_cgroupns(struct pycri__plan *plan) {
    struct pycri__cerr ce;
    if (plan->spec->ns_mode[PYCRI_NS_CGROUP] == PYCRI_NS_NEW && unshare(CLONE_NEWCGROUP) < 0)
        CFAIL(PYCRI_STAGE_NAMESPACE, "unshare", "cgroup");
}

static int write_oom_score_adj(const struct pycri_spawn_spec *s) {
    char num[24];
    utoa10(s->oom_score_adj, num);
    int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    int rc = fd < 0 || pycri__write_all(fd, num, strlen(num)) < 0 ? -1 : 0;
    if (fd >= 0)
        close(fd);
    return rc;
}

/* Paused after the setup (pause_after_setup): say so, then wait for the real
 * spec (MSG_RESUME: a memfd holding it, encoded, then its stdio, tty and kept
 * fds, in that order, for the fields that are set) and carry on with it. The
 * setup already done is the caller's to match (pycri/launchplan.py); what is
 * checked here is only what would make the rest go wrong. The launcher is
 * single-threaded, so this copy of it may use its memory freely. */
static void child_resume(struct pycri__plan *plan) {
    static struct pycri_spawn_spec resumed;
    struct pycri__cerr ce;
    const struct pycri_spawn_spec *was = plan->spec;
    send_msg(plan->sock, MSG_PAUSED, 0, NULL);
    struct msg m;
    int fds[PYCRI_RESUME_MAX_FDS];
    int n_fds;
    ssize_t n = pycri__recv_fds(plan->sock, &m, sizeof(m), fds, PYCRI_RESUME_MAX_FDS, &n_fds);
    if (n != (ssize_t)sizeof(m) || m.kind != MSG_RESUME)
        _exit(0); /* discarded unused (the launcher went) */
    errno = EPROTO;
    if (n_fds < 1 || m.pid <= 0)
        CFAIL(PYCRI_STAGE_PREPARE, "resume: bad message from the launcher", NULL);
    unsigned char *buf = mmap(NULL, (size_t)m.pid, PROT_READ | PROT_WRITE, MAP_PRIVATE, fds[0], 0);
    if (buf == MAP_FAILED)
        CFAIL(PYCRI_STAGE_PREPARE, "resume: mmap the spec", NULL);
    close(fds[0]);
    struct pycri_error derr;
    if (pycri_spec_decode(buf, (size_t)m.pid, &resumed, &derr) < 0) {
        errno = derr.code;
        CFAIL(PYCRI_STAGE_PREPARE, "resume: decode the spec", NULL);
    }
    /* its fds, renumbered: the ones the launcher sent, in field order */
    int next = 1;
    int *slots[PYCRI_SPEC_FD_FIELDS_MAX];
    int ns = pycri__spec_fd_fields(&resumed, slots);
    for (int i = 0; i < ns; i++) {
        if (*slots[i] < 0)
            continue;
        if (next >= n_fds) {
            errno = EBADF;
            CFAIL(PYCRI_STAGE_FDS, "resume: fewer fds than the spec names", NULL);
        }
        *slots[i] = fds[next++];
    }
    resumed.join_in_caller = was->join_in_caller;
    resumed.pause_after_setup = 0;
    errno = EINVAL;
    if (memcmp(resumed.ns_mode, was->ns_mode, sizeof(was->ns_mode)) != 0 || !resumed.rootfs ||
        !resumed.start_wait || !resumed.argv || !resumed.argv[0])
        CFAIL(PYCRI_STAGE_PREPARE, "resume: the spec does not fit the prepared container", NULL);
    if (resumed.tty_new && resumed.tty_fd >= 0)
        CFAIL(PYCRI_STAGE_PREPARE, "resume: tty_new with a tty_fd", NULL);
    if (resumed.hostname && resumed.ns_mode[PYCRI_NS_UTS] != PYCRI_NS_NEW)
        CFAIL(PYCRI_STAGE_PREPARE, "resume: hostname needs a new uts namespace", NULL);
    if (resumed.seccomp_bpf && (resumed.seccomp_len == 0 || resumed.seccomp_len > 4096))
        CFAIL(PYCRI_STAGE_PREPARE, "resume: bad seccomp program length", NULL);
    /* into the container's memory and pids cgroups only now (held, it counted in
     * the launcher's), then its own cgroup namespace */
    join_cgroups(plan, plan->n_cg - late_cgroups(plan), plan->n_cg);
    new_cgroupns(plan);
    plan->spec = &resumed;
    plan->tty_fd = resumed.tty_fd;
    if (resumed.set_oom_score_adj && write_oom_score_adj(&resumed) < 0)
        CFAIL(PYCRI_STAGE_OOM, "write /proc/self/oom_score_adj", NULL);
}

static __attribute__((noreturn)) void child_finish(struct pycri__plan *plan) {
    const struct pycri_spawn_spec *s = plan->spec;
    struct pycri__cerr ce;
    int procfd = -1;

    if (!s->pause_after_setup)
        new_cgroupns(plan);     /* (after the parent's cgroup writes, if any) */
    if (plan->userns_any) {
        /* become the namespace's root (its uid 0 is now mapped) */
        if (raw_setresgid(0) < 0 || raw_setresuid(0) < 0)
            CFAIL(PYCRI_STAGE_IDMAP, "setresuid(0) in the user namespace", NULL);
    }
    if (s->set_oom_score_adj && !s->pause_after_setup && write_oom_score_adj(s) < 0)
        CFAIL(PYCRI_STAGE_OOM, "write /proc/self/oom_score_adj", NULL);
    int sysctls_done = plan->n_sysctl == 0;
    if (s->ns_mode[PYCRI_NS_MNT] == PYCRI_NS_NEW &&
        pycri__mount_setup(plan, &procfd, &sysctls_done, &ce) < 0)
        die(plan, &ce);
    if (!sysctls_done) {
        if (procfd < 0)
            procfd = open("/proc", O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (procfd < 0)
            CFAIL(PYCRI_STAGE_SYSCTL, "open", "/proc");
        if (pycri__write_sysctls(plan, procfd, &ce) < 0)
            die(plan, &ce);
    }
    if (procfd >= 0)
        close(procfd);
    if (s->pause_after_setup) {
        child_resume(plan);
        s = plan->spec;
    }
    if (s->hostname && sethostname(s->hostname, strlen(s->hostname)) < 0)
        CFAIL(PYCRI_STAGE_HOSTNAME, "sethostname", s->hostname);
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

void pycri__close_all_but(int *keep, int n, int lowest) {
    for (int i = 1; i < n; i++) /* insertion sort: n is small */
        for (int j = i; j > 0 && keep[j - 1] > keep[j]; j--) {
            int t = keep[j];
            keep[j] = keep[j - 1];
            keep[j - 1] = t;
        }
    unsigned int from = (unsigned int)lowest;
    for (int i = 0; i < n; i++) {
        if (keep[i] < 0 || (unsigned int)keep[i] < from)
            continue;
        if ((unsigned int)keep[i] > from)
            syscall(SYS_close_range, from, (unsigned int)keep[i] - 1, 0);
        from = (unsigned int)keep[i] + 1;
    }
    syscall(SYS_close_range, from, ~0U, 0);
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
    keep[n++] = s->dev_premounted ? s->dev_mount_fd : -1;
    for (int i = 0; i < s->n_keep_fds && n < (int)(sizeof(keep) / sizeof(keep[0])); i++)
        keep[n++] = s->keep_fds[i];
    pycri__close_all_but(keep, n, 0);
}

void pycri__child_main(struct pycri__plan *plan, int two_step) {
    const struct pycri_spawn_spec *s = plan->spec;
    struct pycri__cerr ce;

    close_unneeded_fds(plan);
    /* (held: all but the late ones, see cgroup_late) */
    join_cgroups(plan, 0, plan->n_cg - (s->pause_after_setup ? late_cgroups(plan) : 0));

    umask(0);
    /* signals stay blocked (the parent blocked them around clone); reset the
     * dispositions so the program does not inherit the caller's SIG_IGNs */
    if (s->join_in_caller) {
        /* the launcher set every other one to default while it waited (launch.c) */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof(dfl));
        dfl.sa_handler = SIG_DFL;
        sigaction(SIGPIPE, &dfl, NULL);
        sigaction(SIGHUP, &dfl, NULL);
    } else {
        pycri__default_all_signals();
    }
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
        if (k != PYCRI_NS_USER && plan->ns_fd[k] >= 0 && setns(plan->ns_fd[k], pycri__ns_flag[k]) < 0)
            CFAIL(PYCRI_STAGE_NAMESPACE, "setns", pycri__ns_name[k]);
    if (plan->um && pycri__userns_enter_rootfs(plan, &ce) < 0)
        die(plan, &ce);
    if (plan->ns_fd[PYCRI_NS_USER] >= 0 &&
        setns(plan->ns_fd[PYCRI_NS_USER], pycri__ns_flag[PYCRI_NS_USER]) < 0)
        CFAIL(PYCRI_STAGE_NAMESPACE, "setns", pycri__ns_name[PYCRI_NS_USER]);
    int flags = 0;
    for (int k = 0; k < PYCRI_NS_COUNT; k++)
        if (s->ns_mode[k] == PYCRI_NS_NEW && k != PYCRI_NS_CGROUP)
            flags |= pycri__ns_flag[k];
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
