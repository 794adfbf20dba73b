/* launch.c - the detached intermediate that holds a created container until
 * start, then turns into its monitor. See api/launch.h for the contract.
 *
 * The intermediate is a fork of a possibly multi-threaded Python process: it
 * only calls pycri_spawn (which was written for that: it prepares in the
 * calling process and the child makes raw syscalls) and plain syscalls.
 */
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "internal.h"

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

static int in_list(int fd, const int *fds, int n) {
    for (int i = 0; i < n; i++)
        if (fds[i] == fd)
            return 1;
    return 0;
}

static int spec_uses(const struct pycri_spawn_spec *spec, int fd) {
    for (int i = 0; i < 3; i++)
        if (spec->stdio[i] == fd)
            return 1;
    if (spec->tty_fd == fd)
        return 1;
    return in_list(fd, spec->keep_fds, spec->n_keep_fds);
}

/* Runs in the intermediate; never returns. */
static void intermediate(const struct pycri_spawn_spec *spec, const char *start_sock,
                         const char *const *monitor_argv, const int *monitor_fds,
                         int n_monitor_fds, int report) {
    /* Nothing of the caller's may reach the container (or be held by it while it
     * waits for start: a lock fd held here would deadlock the caller). */
    for (int fd = 3; fd < 4096; fd++)
        if (fd != report && !in_list(fd, monitor_fds, n_monitor_fds) && !spec_uses(spec, fd))
            close(fd);
    syscall(SYS_close_range, 4096U, ~0U, 0);
    struct launch_report rep;
    memset(&rep, 0, sizeof(rep));
    struct pycri_spawn_result sr;
    memset(&sr, 0, sizeof(sr));
    if (pycri_spawn(spec, &sr, &rep.err) < 0) {
        rep.res.stage = sr.stage;
        write_full(report, &rep, sizeof(rep));
        _exit(1);
    }
    if (sr.pidfd >= 0)
        close(sr.pidfd);
    struct sockaddr_un sa;
    int lsock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int rc = lsock < 0 ? -1 : fill_sockaddr(&sa, start_sock, &rep.err);
    if (rc == 0) {
        unlink(start_sock);
        mode_t old = umask(0077);
        rc = bind(lsock, (struct sockaddr *)&sa, sizeof(sa));
        umask(old);
        if (rc == 0)
            rc = listen(lsock, 4);
        if (rc < 0)
            pycri_fail(&rep.err, errno, "start socket %s", start_sock);
    } else if (lsock < 0) {
        pycri_fail(&rep.err, errno, "start socket: socket");
    }
    if (lsock < 0 || rc < 0) {
        kill(sr.pid, SIGKILL);
        waitpid(sr.pid, NULL, 0);
        write_full(report, &rep, sizeof(rep));
        _exit(1);
    }
    rep.ok = 1;
    rep.res.monitor_pid = getpid();
    rep.res.pid = sr.pid;
    rep.res.start_time = sr.start_time;
    write_full(report, &rep, sizeof(rep));
    close(report);

    /* Keep only what the monitor needs, the start machinery and stdio. */
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull >= 0) {
        dup2(devnull, 0);
        dup2(devnull, 1);
        dup2(devnull, 2);
    }
    for (int fd = 3; fd < 4096; fd++) {
        if (fd == lsock || fd == sr.start_fd || fd == sr.report_fd ||
            in_list(fd, monitor_fds, n_monitor_fds))
            continue;
        close(fd);
    }

    for (;;) {
        int conn = accept4(lsock, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
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
        write_full(conn, &reply, sizeof(reply));
        close(conn);
        close(lsock);
        unlink(start_sock);
        if (!reply.ok) {
            /* The container failed its execve and exits; its status is the caller's
             * to record from the error it just received. */
            kill(sr.pid, SIGKILL);
            waitpid(sr.pid, NULL, 0);
            _exit(1);
        }
        break;
    }

    for (int i = 0; i < n_monitor_fds; i++)
        fcntl(monitor_fds[i], F_SETFD, 0);
    int argc = 0;
    while (monitor_argv[argc])
        argc++;
    const char *argv[argc + 3];
    char pidbuf[24];
    snprintf(pidbuf, sizeof(pidbuf), "%d", sr.pid);
    for (int i = 0; i < argc; i++)
        argv[i] = monitor_argv[i];
    argv[argc] = "--adopt";
    argv[argc + 1] = pidbuf;
    argv[argc + 2] = NULL;
    execv(argv[0], (char *const *)argv);
    /* No monitor: do not leave the container unwatched. */
    kill(sr.pid, SIGKILL);
    waitpid(sr.pid, NULL, 0);
    _exit(127);
}

PYCRI_EXPORT int pycri_launch(const struct pycri_spawn_spec *spec, const char *start_sock,
                              const char *const *monitor_argv, const int *monitor_fds,
                              int n_monitor_fds, struct pycri_launch_result *res,
                              struct pycri_error *err) {
    memset(res, 0, sizeof(*res));
    if (!spec->start_wait)
        return pycri_fail(err, EINVAL, "launch: the spec must use start_wait");
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) < 0)
        return pycri_fail(err, errno, "launch: pipe2");
    pid_t first = fork();
    if (first < 0) {
        int e = errno;
        close(pipefd[0]);
        close(pipefd[1]);
        return pycri_fail(err, e, "launch: fork");
    }
    if (first == 0) {
        close(pipefd[0]);
        setsid();
        pid_t second = fork();
        if (second < 0) {
            struct launch_report rep;
            memset(&rep, 0, sizeof(rep));
            pycri_fail(&rep.err, errno, "launch: second fork");
            write_full(pipefd[1], &rep, sizeof(rep));
            _exit(1);
        }
        if (second > 0)
            _exit(0);
        intermediate(spec, start_sock, monitor_argv, monitor_fds, n_monitor_fds, pipefd[1]);
    }
    close(pipefd[1]);
    while (waitpid(first, NULL, 0) < 0 && errno == EINTR)
        ;
    struct launch_report rep;
    ssize_t n = read_full(pipefd[0], &rep, sizeof(rep));
    close(pipefd[0]);
    if (n != (ssize_t)sizeof(rep))
        return pycri_fail(err, EPIPE, "launch: the intermediate process died before reporting");
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
