/* launch.c - both halves of pycri_launch: the caller's (in pycri._core), which
 * posix_spawns the launcher and hands it the spec, and the launcher's (linked
 * into pycri-monitor, run by its --launch mode), which holds the created
 * container until start and then carries on as its monitor. See api/launch.h.
 *
 * The caller is a big, possibly multi-threaded Python process: it is never
 * forked. posix_spawn (clone with CLONE_VM | CLONE_VFORK) execs the small
 * static launcher, and all the forking happens there, where it is cheap.
 */
#include <fcntl.h>
#include <limits.h>
#include <spawn.h>
#include <stdint.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "internal.h"

#define LAUNCH_MAGIC 0x70636c61u /* "pcla" */
#define MAX_MONITOR_FDS 16
#define MAX_ARGV_BYTES (1u << 20)
#define MAX_SPEC_BYTES (64u << 20)
#define LAUNCHER_SOCK_FD 3

/* What the caller sends first on the launcher's socket; then argv_len bytes of
 * NUL-terminated monitor argv strings, then spec_len bytes of encoded spec. */
struct launch_req {
    uint32_t magic;
    uint32_t argc, argv_len, spec_len;
    int32_t n_monitor_fds;
    int32_t monitor_local[MAX_MONITOR_FDS]; /* where the launcher has them */
    int32_t monitor_orig[MAX_MONITOR_FDS];  /* the numbers monitor_argv names */
};

struct launch_report {
    int ok;
    struct pycri_launch_result res;
    struct pycri_error err;
};

struct start_reply {
    int ok;
    struct pycri_error err;
};

static int write_full(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static ssize_t read_full(int fd, void *buf, size_t len) {
    char *p = buf;
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, p + got, len - got);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    return (ssize_t)got;
}

static int fill_sockaddr(struct sockaddr_un *sa, const char *path, struct pycri_error *err) {
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(sa->sun_path))
        return pycri_fail(err, ENAMETOOLONG, "start socket path %s", path);
    strcpy(sa->sun_path, path);
    return 0;
}

/* Close every fd >= 3 that is not in keep[] (n entries, any order, -1 ignored). */
static void close_all_but(const int *keep, int n) {
    int sorted[MAX_MONITOR_FDS + 8];
    int m = 0;
    for (int i = 0; i < n && m < (int)(sizeof(sorted) / sizeof(sorted[0])); i++)
        if (keep[i] >= 3)
            sorted[m++] = keep[i];
    for (int i = 1; i < m; i++) /* insertion sort: m is small */
        for (int j = i; j > 0 && sorted[j - 1] > sorted[j]; j--) {
            int t = sorted[j];
            sorted[j] = sorted[j - 1];
            sorted[j - 1] = t;
        }
    unsigned int from = 3;
    for (int i = 0; i < m; i++) {
        if ((unsigned int)sorted[i] < from)
            continue;
        if ((unsigned int)sorted[i] > from)
            syscall(SYS_close_range, from, (unsigned int)sorted[i] - 1, 0);
        from = (unsigned int)sorted[i] + 1;
    }
    syscall(SYS_close_range, from, ~0U, 0);
}

static __attribute__((noreturn)) void launcher_fail(int sock, struct launch_report *rep) {
    rep->ok = 0;
    send(sock, rep, sizeof(*rep), MSG_NOSIGNAL);
    _exit(1);
}

/* Listen on path (mode 0600 through the umask); -1 with err set on failure. */
static int listen_start(const char *path, struct pycri_error *err) {
    struct sockaddr_un sa;
    if (fill_sockaddr(&sa, path, err) < 0)
        return -1;
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        pycri_fail(err, errno, "start socket: socket");
        return -1;
    }
    unlink(path);
    mode_t old = umask(0077);
    int rc = bind(s, (struct sockaddr *)&sa, sizeof(sa));
    umask(old);
    if (rc < 0 || listen(s, 4) < 0) {
        pycri_fail(err, errno, "start socket %s", path);
        close(s);
        return -1;
    }
    return s;
}

void pycri__launcher(int sock, const char *start_sock, int *argc_out, char ***argv_out) {
    struct launch_report rep;
    memset(&rep, 0, sizeof(rep));
    rep.res.stage = PYCRI_STAGE_PREPARE;
    /* the monitor ignores SIGPIPE too; the container gets default dispositions */
    signal(SIGPIPE, SIG_IGN);
    /* a session of our own, then fork: the launcher is nobody's child but init's
     * (or a subreaper's), and the caller reaps this first process at once */
    setsid();
    pid_t p = fork();
    if (p < 0) {
        pycri_fail(&rep.err, errno, "launch: fork");
        launcher_fail(sock, &rep);
    }
    if (p > 0)
        _exit(0);

    struct launch_req req;
    if (read_full(sock, &req, sizeof(req)) != (ssize_t)sizeof(req) || req.magic != LAUNCH_MAGIC ||
        req.argc == 0 || req.argv_len == 0 || req.argv_len > MAX_ARGV_BYTES ||
        req.spec_len > MAX_SPEC_BYTES || req.n_monitor_fds < 0 ||
        req.n_monitor_fds > MAX_MONITOR_FDS) {
        pycri_fail(&rep.err, EPROTO, "launch: bad request from the caller");
        launcher_fail(sock, &rep);
    }
    char *args = malloc(req.argv_len);
    unsigned char *specbuf = malloc(req.spec_len ? req.spec_len : 1); /* malloc aligns to 16 */
    if (!args || !specbuf) {
        pycri_fail(&rep.err, ENOMEM, "launch: request of %u bytes", req.argv_len + req.spec_len);
        launcher_fail(sock, &rep);
    }
    if (read_full(sock, args, req.argv_len) != (ssize_t)req.argv_len ||
        read_full(sock, specbuf, req.spec_len) != (ssize_t)req.spec_len) {
        pycri_fail(&rep.err, EPROTO, "launch: short request from the caller");
        launcher_fail(sock, &rep);
    }
    /* argv: exactly argc NUL-terminated strings */
    /* room for "--adopt PID [--pty-master-fd N]" and the NULL */
    char **argv = malloc(sizeof(char *) * (req.argc + 5));
    uint32_t found = 0;
    if (argv && args[req.argv_len - 1] == '\0') {
        for (char *a = args; a < args + req.argv_len && found <= req.argc; a += strlen(a) + 1)
            argv[found++] = a;
    }
    if (found != req.argc) {
        pycri_fail(&rep.err, EPROTO, "launch: bad monitor argv from the caller");
        launcher_fail(sock, &rep);
    }
    struct pycri_spawn_spec spec;
    if (pycri_spec_decode(specbuf, req.spec_len, &spec, &rep.err) < 0)
        launcher_fail(sock, &rep);

    struct pycri_spawn_result sr;
    memset(&sr, 0, sizeof(sr));
    if (pycri_spawn(&spec, &sr, &rep.err) < 0) {
        rep.res.stage = sr.stage;
        launcher_fail(sock, &rep);
    }
    /* the container's ends (stdio, pty slave, kept fds) are the container's now; the
     * pidfd stays, to notice a held container being killed before start */
    int keep[MAX_MONITOR_FDS + 5] = {sock, sr.start_fd, sr.report_fd, sr.pidfd, sr.tty_master};
    for (int i = 0; i < req.n_monitor_fds; i++)
        keep[5 + i] = req.monitor_local[i];
    close_all_but(keep, 5 + req.n_monitor_fds);

    int lsock = listen_start(start_sock, &rep.err);
    if (lsock < 0) {
        rep.res.stage = PYCRI_STAGE_PREPARE;
        kill(sr.pid, SIGKILL);
        waitpid(sr.pid, NULL, 0);
        launcher_fail(sock, &rep);
    }
    rep.ok = 1;
    rep.res.stage = PYCRI_STAGE_NONE;
    rep.res.monitor_pid = getpid();
    rep.res.pid = sr.pid;
    rep.res.start_time = sr.start_time;
    send(sock, &rep, sizeof(rep), MSG_NOSIGNAL);
    close(sock);

    for (;;) {
        /* Wait for a start request, or for the held container to die (killed by a
         * remove whose caller never knew this launcher's pid): then go too. */
        struct pollfd pfds[2] = {{.fd = lsock, .events = POLLIN}, {.fd = sr.pidfd, .events = POLLIN}};
        int np = sr.pidfd >= 0 ? 2 : 1;
        if (poll(pfds, (nfds_t)np, -1) < 0) {
            if (errno == EINTR)
                continue;
            _exit(1);
        }
        if (np == 2 && (pfds[1].revents & POLLIN)) {
            waitpid(sr.pid, NULL, 0);
            unlink(start_sock);
            _exit(1);
        }
        if (!(pfds[0].revents & POLLIN))
            continue;
        int conn = accept4(lsock, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            kill(sr.pid, SIGKILL);
            waitpid(sr.pid, NULL, 0);
            _exit(1);
        }
        char cmd = 0;
        if (read_full(conn, &cmd, 1) != 1 || cmd != 'S') {
            close(conn);
            continue;
        }
        struct start_reply reply;
        memset(&reply, 0, sizeof(reply));
        reply.ok = pycri_spawn_start(sr.start_fd, sr.report_fd, &reply.err) == 0;
        send(conn, &reply, sizeof(reply), MSG_NOSIGNAL);
        close(conn);
        close(lsock);
        if (sr.pidfd >= 0)
            close(sr.pidfd);
        unlink(start_sock);
        if (!reply.ok) {
            /* the container failed its execve and exits; the caller records how */
            kill(sr.pid, SIGKILL);
            waitpid(sr.pid, NULL, 0);
            _exit(1);
        }
        break;
    }

    /* The monitor's fds back at the numbers its command line names: lift them
     * all above both numberings first so no dup2 clobbers another. */
    int high = 3;
    for (int i = 0; i < req.n_monitor_fds; i++) {
        if (req.monitor_local[i] > high)
            high = req.monitor_local[i];
        if (req.monitor_orig[i] > high)
            high = req.monitor_orig[i];
    }
    /* the container's own pty (tty_new) goes to the monitor too, above them all */
    int tty_master = -1;
    if (sr.tty_master >= 0) {
        tty_master = fcntl(sr.tty_master, F_DUPFD_CLOEXEC, high + 1);
        close(sr.tty_master);
        if (tty_master > high)
            high = tty_master;
    }
    int lifted[MAX_MONITOR_FDS];
    for (int i = 0; i < req.n_monitor_fds; i++) {
        lifted[i] = fcntl(req.monitor_local[i], F_DUPFD_CLOEXEC, high + 1);
        close(req.monitor_local[i]);
    }
    for (int i = 0; i < req.n_monitor_fds; i++) {
        if (lifted[i] >= 0) {
            dup2(lifted[i], req.monitor_orig[i]);
            close(lifted[i]);
        }
    }
    static char pidbuf[24], ttybuf[24];
    snprintf(pidbuf, sizeof(pidbuf), "%d", sr.pid);
    int argc = (int)req.argc;
    argv[argc++] = "--adopt";
    argv[argc++] = pidbuf;
    if (tty_master >= 0) {
        snprintf(ttybuf, sizeof(ttybuf), "%d", tty_master);
        argv[argc++] = "--pty-master-fd";
        argv[argc++] = ttybuf;
    }
    argv[argc] = NULL;
    free(specbuf);
    *argc_out = argc;
    *argv_out = argv;
}

/* The caller's fds the launcher gets, each once: fd -> its number there. */
struct fdmap {
    int *src;
    int n, cap;
};

static int map_fd(struct fdmap *m, int fd) {
    if (fd < 0)
        return -1;
    for (int i = 0; i < m->n; i++)
        if (m->src[i] == fd)
            return LAUNCHER_SOCK_FD + 1 + i;
    if (m->n == m->cap)
        return -1; /* cannot happen: cap counts every slot */
    m->src[m->n++] = fd;
    return LAUNCHER_SOCK_FD + m->n;
}

static int send_full(int fd, struct iovec *iov, int n) {
    while (n > 0) {
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t w = sendmsg(fd, &mh, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* posix_spawn the launcher with sock as fd 3, fds[i] as 4 + i, nothing else
 * but /dev/null on 0, 1, 2. */
static int spawn_launcher(const char *path, const char *start_sock, int sock, const int *fds,
                          int n, pid_t *pid, struct pycri_error *err) {
    int total = n + 1;
    int lifted[total];
    int rc = 0, made = 0;
    /* above every target first, so no dup2 of the file actions clobbers a source */
    for (; made < total; made++) {
        int from = made == 0 ? sock : fds[made - 1];
        lifted[made] = fcntl(from, F_DUPFD_CLOEXEC, LAUNCHER_SOCK_FD + total);
        if (lifted[made] < 0) {
            rc = pycri_fail(err, errno, "launch: fd %d", from);
            break;
        }
    }
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    int fa_ok = 0, attr_ok = 0;
    if (rc == 0) {
        fa_ok = posix_spawn_file_actions_init(&fa) == 0;
        attr_ok = posix_spawnattr_init(&attr) == 0;
        int e = fa_ok && attr_ok ? 0 : ENOMEM;
        for (int i = 0; !e && i < total; i++)
            e = posix_spawn_file_actions_adddup2(&fa, lifted[i], LAUNCHER_SOCK_FD + i);
        if (!e)
            e = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDWR, 0);
        if (!e)
            e = posix_spawn_file_actions_adddup2(&fa, 0, 1);
        if (!e)
            e = posix_spawn_file_actions_adddup2(&fa, 0, 2);
        if (!e)
            e = posix_spawn_file_actions_addclosefrom_np(&fa, LAUNCHER_SOCK_FD + total);
        sigset_t none, all;
        sigemptyset(&none);
        sigfillset(&all);
        if (!e)
            e = posix_spawnattr_setsigmask(&attr, &none);
        if (!e)
            e = posix_spawnattr_setsigdefault(&attr, &all);
        if (!e)
            e = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
        char fdarg[16];
        snprintf(fdarg, sizeof(fdarg), "%d", LAUNCHER_SOCK_FD);
        char *const argv[] = {(char *)path, "--launch", fdarg, (char *)start_sock, NULL};
        char *const envp[] = {NULL};
        if (!e)
            e = posix_spawn(pid, path, &fa, &attr, argv, envp);
        if (e)
            rc = pycri_fail(err, e, "launch: posix_spawn %s", path);
    }
    if (fa_ok)
        posix_spawn_file_actions_destroy(&fa);
    if (attr_ok)
        posix_spawnattr_destroy(&attr);
    for (int i = 0; i < made; i++)
        close(lifted[i]);
    return rc;
}

PYCRI_EXPORT int pycri_launch(const struct pycri_spawn_spec *spec, const char *start_sock,
                              const char *const *monitor_argv, const int *monitor_fds,
                              int n_monitor_fds, struct pycri_launch_result *res,
                              struct pycri_error *err) {
    memset(res, 0, sizeof(*res));
    res->stage = PYCRI_STAGE_PREPARE;
    if (!spec->start_wait)
        return pycri_fail(err, EINVAL, "launch: the spec must use start_wait");
    if (!monitor_argv || !monitor_argv[0] || monitor_argv[0][0] != '/')
        return pycri_fail(err, EINVAL, "launch: monitor_argv[0] must be an absolute path");
    if (n_monitor_fds < 0 || n_monitor_fds > MAX_MONITOR_FDS)
        return pycri_fail(err, EINVAL, "launch: %d monitor fds (at most %d)", n_monitor_fds,
                          MAX_MONITOR_FDS);
    if (spec->n_keep_fds < 0 || spec->n_keep_fds > 1024 || (spec->n_keep_fds && !spec->keep_fds))
        return pycri_fail(err, EINVAL, "launch: bad keep_fds");
    struct sockaddr_un sa;
    if (fill_sockaddr(&sa, start_sock, err) < 0)
        return -ENAMETOOLONG;

    /* the spec as the launcher will see it: fds renumbered */
    int cap = 5 + spec->n_keep_fds + n_monitor_fds;
    cleanup_free int *src = malloc(sizeof(int) * (size_t)cap);
    cleanup_free int *keep = malloc(sizeof(int) * (size_t)(spec->n_keep_fds + 1));
    if (!src || !keep)
        return pycri_fail(err, ENOMEM, "launch: fd map");
    struct fdmap m = {.src = src, .n = 0, .cap = cap};
    struct pycri_spawn_spec local = *spec;
    for (int i = 0; i < 3; i++)
        local.stdio[i] = map_fd(&m, spec->stdio[i]);
    local.tty_fd = map_fd(&m, spec->tty_fd);
    local.join_pidfd = map_fd(&m, spec->join_pidfd);
    for (int i = 0; i < spec->n_keep_fds; i++)
        keep[i] = map_fd(&m, spec->keep_fds[i]);
    local.keep_fds = spec->n_keep_fds ? keep : NULL;
    struct launch_req req;
    memset(&req, 0, sizeof(req));
    req.magic = LAUNCH_MAGIC;
    req.n_monitor_fds = n_monitor_fds;
    for (int i = 0; i < n_monitor_fds; i++) {
        if (monitor_fds[i] < 0)
            return pycri_fail(err, EBADF, "launch: monitor fd %d", monitor_fds[i]);
        req.monitor_orig[i] = monitor_fds[i];
        req.monitor_local[i] = map_fd(&m, monitor_fds[i]);
    }

    int spec_len = pycri_spec_encode(&local, NULL, 0, err);
    if (spec_len < 0)
        return spec_len;
    cleanup_free unsigned char *specbuf = malloc((size_t)spec_len);
    if (!specbuf)
        return pycri_fail(err, ENOMEM, "launch: spec of %d bytes", spec_len);
    pycri_spec_encode(&local, specbuf, (size_t)spec_len, err);
    size_t argv_len = 0;
    for (const char *const *a = monitor_argv; *a; a++, req.argc++)
        argv_len += strlen(*a) + 1;
    if (argv_len > MAX_ARGV_BYTES)
        return pycri_fail(err, E2BIG, "launch: monitor argv of %zu bytes", argv_len);
    req.argv_len = (uint32_t)argv_len;
    req.spec_len = (uint32_t)spec_len;
    struct iovec iov[2 + req.argc];
    iov[0] = (struct iovec){&req, sizeof(req)};
    for (uint32_t i = 0; i < req.argc; i++)
        iov[1 + i] = (struct iovec){(void *)monitor_argv[i], strlen(monitor_argv[i]) + 1};
    iov[1 + req.argc] = (struct iovec){specbuf, (size_t)spec_len};

    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        return pycri_fail(err, errno, "launch: socketpair");
    cleanup_fd int ours = sv[0];
    pid_t first = -1;
    int rc = spawn_launcher(monitor_argv[0], start_sock, sv[1], src, m.n, &first, err);
    close(sv[1]);
    if (rc < 0)
        return rc;
    /* a launcher that died early shows as EPIPE here or EOF below */
    send_full(ours, iov, (int)(2 + req.argc));
    struct launch_report rep;
    ssize_t n = read_full(ours, &rep, sizeof(rep));
    while (waitpid(first, NULL, 0) < 0 && errno == EINTR)
        ;
    if (n != (ssize_t)sizeof(rep))
        return pycri_fail(err, EPIPE, "launch: the launcher died before reporting");
    *res = rep.res;
    if (!rep.ok) {
        *err = rep.err;
        return -(rep.err.code ? rep.err.code : EINVAL);
    }
    return 0;
}

PYCRI_EXPORT int pycri_launch_start(const char *start_sock, int timeout_ms,
                                    struct pycri_error *err) {
    struct sockaddr_un sa;
    if (fill_sockaddr(&sa, start_sock, err) < 0)
        return -ENAMETOOLONG;
    cleanup_fd int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return pycri_fail(err, errno, "start: socket");
    if (connect(s, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        return pycri_fail(err, errno, "start: connect %s (is the container still created?)",
                          start_sock);
    if (write_full(s, "S", 1) < 0)
        return pycri_fail(err, errno, "start: send");
    struct pollfd pfd = {.fd = s, .events = POLLIN};
    int pr;
    do
        pr = poll(&pfd, 1, timeout_ms);
    while (pr < 0 && errno == EINTR);
    if (pr == 0)
        return pycri_fail(err, ETIMEDOUT, "start: no answer within %d ms", timeout_ms);
    struct start_reply reply;
    ssize_t n = read_full(s, &reply, sizeof(reply));
    if (n != (ssize_t)sizeof(reply))
        return pycri_fail(err, EPIPE, "start: the container's launcher died");
    if (!reply.ok) {
        *err = reply.err;
        return -(reply.err.code ? reply.err.code : EINVAL);
    }
    return 0;
}
