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
#include "spawn_child.h"

#define LAUNCH_MAGIC 0x70636c61u /* "pcla" */
#define MAX_MONITOR_FDS 16
#define MAX_ARGV_BYTES (1u << 20)
#define MAX_SPEC_BYTES (64u << 20)
#define LAUNCHER_SOCK_FD 3

#define LAUNCH_TITLE_MAX 108 /* room in argv[3] for the start socket path (sun_path) */
#define FACTORY_TITLE "factory"  /* argv[3] of a launcher factory starts so */
#define FDS_PER_MSG 200       /* SCM_RIGHTS carries at most 253 per message */
#define MAX_LAUNCH_FDS (MAX_MONITOR_FDS + 7 + 1024)

/* What the caller sends first on the launcher's socket; then n_fds fds, in
 * messages of one byte each carrying up to FDS_PER_MSG of them (SCM_RIGHTS), which
 * the launcher puts at 4, 5, ...; then argv_len bytes of NUL-terminated monitor
 * argv strings, sock_len bytes of start socket path (NUL-terminated), then
 * spec_len bytes of encoded spec. */
/* flags: PRE = set a container process up as far as no config is needed and
 * hold it (the spec is a stand-in: pycri_launch_pre); RESUME = the real request
 * to a launcher that did so (its fds go from fd_base up, as its report said). */
#define LAUNCH_REQ_PRE 1u
#define LAUNCH_REQ_RESUME 2u
struct launch_req {
    uint32_t magic;
    uint32_t flags;
    int32_t fd_base;                          /* where the fds go: 4 unless RESUME */
    uint32_t argc, argv_len, spec_len, sock_len;
    int32_t n_fds;
    int32_t n_monitor_fds;
    int32_t monitor_local[MAX_MONITOR_FDS]; /* where the launcher has them */
    int32_t monitor_orig[MAX_MONITOR_FDS];  /* the numbers monitor_argv names */
};

/* What the launcher sends back: an early report (once the container process
 * exists: pid, start time, monitor pid, so the caller can record them while the
 * process sets itself up; not sent when the pid comes only at the end), then the
 * final one (ok or the failure), which carries the start and report sockets. */
#define LAUNCH_EARLY 1
#define LAUNCH_FINAL 2
#define LAUNCH_PAUSED 3   /* a PRE request's success: the held process's pid */
struct launch_report {
    int kind;
    int ok;
    struct pycri_launch_result res;
    struct pycri_error err;
};

int pycri__held_mntns = -1;

struct start_reply {
    int ok;
    struct pycri_error err;
};

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

/* The launcher's work beside the container process's setup (pycri__after_clone). */
static struct {
    int sock;                                 /* to the caller */
    const char *start_sock;
    const struct pycri_spawn_spec *spec;
    int lsock;                                /* the listening start socket, or -1 */
} beside = {.sock = -1, .lsock = -1};

static int listen_start(const char *path, struct pycri_error *err);

static void launcher_after_clone(int pid) {
    struct launch_report e;
    memset(&e, 0, sizeof(e));
    e.kind = LAUNCH_EARLY;
    e.ok = 1;
    e.res.pid = pid;
    e.res.monitor_pid = getpid();
    e.res.start_fd = e.res.report_fd = -1;
    pycri__read_start_time(pid, &e.res.start_time);
    send(beside.sock, &e, sizeof(e), MSG_NOSIGNAL); /* (a caller gone hears nothing) */
    if (beside.spec->ns_mode[PYCRI_NS_MNT] == PYCRI_NS_NEW) {
        char nspath[64];
        snprintf(nspath, sizeof(nspath), "/proc/%d/ns/mnt", pid);
        pycri__held_mntns = open(nspath, O_RDONLY | O_CLOEXEC);
    }
    struct pycri_error ignored;
    beside.lsock = listen_start(beside.start_sock, &ignored); /* (retried after, to report) */
}

static __attribute__((noreturn)) void launcher_fail(int sock, struct launch_report *rep) {
    if (beside.lsock >= 0)
        unlink(beside.start_sock);
    rep->kind = LAUNCH_FINAL;
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

/* Receive n fds (one-byte messages carrying SCM_RIGHTS) and put them at
 * base + i. */
static int recv_fds(int sock, int n, int base) {
    int got[MAX_LAUNCH_FDS];
    int have = 0;
    while (have < n) {
        char byte;
        int k;
        if (pycri__recv_fds(sock, &byte, 1, got + have, n - have, &k) != 1 || k < 0)
            return -1;
        have += k;
    }
    /* above every target first, so no dup2 clobbers one still to be placed */
    for (int i = 0; i < n; i++) {
        int lifted = fcntl(got[i], F_DUPFD_CLOEXEC, base + n);
        if (lifted < 0)
            return -1;
        close(got[i]);
        got[i] = lifted;
    }
    for (int i = 0; i < n; i++) {
        if (dup2(got[i], base + i) < 0)
            return -1;
        close(got[i]);
    }
    return 0;
}

static int child_exited(int pidfd, pid_t pid) {
    if (pidfd >= 0) {
        struct pollfd p = {.fd = pidfd, .events = POLLIN};
        return poll(&p, 1, 0) > 0;
    }
    siginfo_t si;
    memset(&si, 0, sizeof(si));
    return waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == pid;
}

/* Whether (unreaped) pid still has the name spawn.c gives a held process. */
static int held_name(pid_t pid) {
    char path[64], comm[32] = {0};
    snprintf(path, sizeof(path), "/proc/%d/comm", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 1;
    ssize_t n = read(fd, comm, sizeof(comm) - 1);
    close(fd);
    return n > 0 && !strncmp(comm, "pycri:held\n", 11);
}

/* One request from the caller, decoded. */
struct request {
    struct launch_req req;
    char *args;                               /* the monitor argv strings */
    char **argv;                              /* pointers into args, room for 5 more */
    char start_sock[LAUNCH_TITLE_MAX + 1];
    unsigned char *specbuf;                   /* decoded in place: spec points into it */
    unsigned char *rawspec;                   /* RESUME: the encoded spec, for the child */
    struct pycri_spawn_spec spec;
};

/* Read the next request: 1, or 0 at EOF before one, or -1 (err set). resume: it
 * must be the RESUME request of a launcher that pre-cloned (fds from base up);
 * else any first request. */
static int read_request(int sock, struct request *r, int resume, int base,
                        struct pycri_error *err) {
    memset(r, 0, sizeof(*r));
    struct launch_req *req = &r->req;
    ssize_t got = read_full(sock, req, sizeof(*req));
    if (got == 0)
        return 0;
    int pre = got == (ssize_t)sizeof(*req) && (req->flags & LAUNCH_REQ_PRE);
    int want_flags = resume ? LAUNCH_REQ_RESUME : (pre ? LAUNCH_REQ_PRE : 0);
    if (got != (ssize_t)sizeof(*req) || req->magic != LAUNCH_MAGIC ||
        req->flags != (uint32_t)want_flags ||
        req->fd_base != (resume ? base : LAUNCHER_SOCK_FD + 1) ||
        (pre ? (req->argc || req->argv_len || req->sock_len || req->n_monitor_fds)
             : (req->argc == 0 || req->argv_len == 0 || req->sock_len < 2)) ||
        req->argv_len > MAX_ARGV_BYTES || req->spec_len > MAX_SPEC_BYTES ||
        req->n_monitor_fds < 0 || req->n_monitor_fds > MAX_MONITOR_FDS || req->n_fds < 0 ||
        req->n_fds > MAX_LAUNCH_FDS || req->sock_len > LAUNCH_TITLE_MAX)
        return pycri_fail(err, EPROTO, "launch: bad request from the caller");
    if (recv_fds(sock, req->n_fds, req->fd_base) < 0)
        return pycri_fail(err, errno ? errno : EPROTO, "launch: receiving the caller's fds");
    r->args = malloc(req->argv_len ? req->argv_len : 1);
    r->specbuf = malloc(req->spec_len ? req->spec_len : 1); /* malloc aligns to 16 */
    r->argv = malloc(sizeof(char *) * (req->argc + 5));
    if (!r->args || !r->specbuf || !r->argv)
        return pycri_fail(err, ENOMEM, "launch: request of %u bytes",
                          req->argv_len + req->spec_len);
    if (read_full(sock, r->args, req->argv_len) != (ssize_t)req->argv_len ||
        read_full(sock, r->start_sock, req->sock_len) != (ssize_t)req->sock_len ||
        read_full(sock, r->specbuf, req->spec_len) != (ssize_t)req->spec_len)
        return pycri_fail(err, EPROTO, "launch: short request from the caller");
    if (!pre && (r->start_sock[req->sock_len - 1] != '\0' ||
                 strlen(r->start_sock) != req->sock_len - 1))
        return pycri_fail(err, EPROTO, "launch: bad start socket path from the caller");
    /* argv: exactly argc NUL-terminated strings */
    uint32_t found = 0;
    if (req->argv_len && r->args[req->argv_len - 1] == '\0') {
        for (char *a = r->args; a < r->args + req->argv_len && found <= req->argc;
             a += strlen(a) + 1)
            r->argv[found++] = a;
    }
    if (found != req->argc)
        return pycri_fail(err, EPROTO, "launch: bad monitor argv from the caller");
    if (resume) {
        r->rawspec = malloc(req->spec_len ? req->spec_len : 1);
        if (!r->rawspec)
            return pycri_fail(err, ENOMEM, "launch: spec of %u bytes", req->spec_len);
        memcpy(r->rawspec, r->specbuf, req->spec_len);
    }
    if (pycri_spec_decode(r->specbuf, req->spec_len, &r->spec, err) < 0)
        return -1;
    return 1;
}

void pycri__launcher(int sock, char *title, int *argc_out, char ***argv_out) {
    struct launch_report rep;
    memset(&rep, 0, sizeof(rep));
    rep.res.stage = PYCRI_STAGE_PREPARE;
    /* Every disposition the caller passed on (ignored ones survive execve) back to
     * default, now, before any request: the container's process then has only the
     * two below to reset (spawn_child.c). The monitor ignores SIGPIPE and SIGHUP. */
    pycri__default_all_signals();
    signal(SIGPIPE, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    /* The signals the monitor reads from its signalfd (SIGUSR1: reopen the log,
     * SIGTERM...: forwarded) are blocked from here on, so one sent early - right
     * after a start, before this process has turned into the monitor - waits for
     * it instead of killing it. The container's mask is cleared before execve. */
    sigset_t early;
    sigemptyset(&early);
    sigaddset(&early, SIGCHLD);
    sigaddset(&early, SIGUSR1);
    sigaddset(&early, SIGTERM);
    sigaddset(&early, SIGINT);
    sigaddset(&early, SIGQUIT);
    sigprocmask(SIG_BLOCK, &early, NULL);
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

    /* A launcher may be made ahead of need: it waits here until the caller has a
     * container for it, or goes when the caller closes the socket unused. */
    struct request rq;
    int got = read_request(sock, &rq, 0, 0, &rep.err);
    if (got == 0)
        _exit(0);
    if (got < 0)
        launcher_fail(sock, &rep);
    struct pycri_spawn_result sr;
    memset(&sr, 0, sizeof(sr));
    int resumed = 0;
    if (rq.req.flags & LAUNCH_REQ_PRE) {
        /* A pre-clone: the container process set up with the stand-in spec and
         * paused before anything its config decides; then the real request. */
        rq.spec.join_in_caller = 1;
        rq.spec.pause_after_setup = 1;
        if (pycri_spawn(&rq.spec, &sr, &rep.err) < 0) {
            rep.res.stage = sr.stage;
            launcher_fail(sock, &rep);
        }
        /* the stand-in's fds (its premounted mounts) are the child's now */
        int held[4] = {sock, sr.start_fd, sr.report_fd, sr.pidfd};
        pycri__close_all_but(held, 4, 3);
        free(rq.specbuf);
        free(rq.args);
        free(rq.argv);
        int base = LAUNCHER_SOCK_FD + 1;
        for (int i = 1; i < 4; i++)
            if (held[i] >= base)
                base = held[i] + 1;
        struct launch_report p;
        memset(&p, 0, sizeof(p));
        p.kind = LAUNCH_PAUSED;
        p.ok = 1;
        p.res.pid = sr.pid;
        p.res.monitor_pid = getpid();
        p.res.start_time = sr.start_time;
        p.res.start_fd = base; /* (where the real request's fds go) */
        p.res.report_fd = -1;
        send(sock, &p, sizeof(p), MSG_NOSIGNAL);
        /* wait for the real request; the held process dying or the caller going
         * (the pre-clone discarded) ends it */
        for (;;) {
            struct pollfd pfds[2] = {{.fd = sock, .events = POLLIN},
                                     {.fd = sr.pidfd, .events = POLLIN}};
            int pr = poll(pfds, sr.pidfd >= 0 ? 2 : 1, -1);
            if (pr < 0 && errno == EINTR)
                continue;
            if (pr < 0 || (sr.pidfd >= 0 && (pfds[1].revents & POLLIN)) ||
                (pfds[0].revents & (POLLIN | POLLHUP | POLLERR)))
                break;
        }
        got = child_exited(sr.pidfd, sr.pid) ? 0 : read_request(sock, &rq, 1, base, &rep.err);
        if (got <= 0) {
            kill(sr.pid, SIGKILL);
            waitpid(sr.pid, NULL, 0);
            if (got < 0)
                launcher_fail(sock, &rep);
            _exit(0);
        }
        resumed = 1;
    } else if (rq.req.flags & LAUNCH_REQ_RESUME) {
        pycri_fail(&rep.err, EPROTO, "launch: a resume request for a launcher that holds nothing");
        launcher_fail(sock, &rep);
    }
    struct pycri_spawn_spec spec = rq.spec;
    char *start_sock = rq.start_sock;
    struct launch_req req = rq.req;
    char **argv = rq.argv;
    unsigned char *specbuf = rq.specbuf;
    /* ps and /proc/PID/cmdline show which container this is: the start socket
     * path, written over the blank argument it was spawned with */
    if (title) {
        size_t room = strlen(title);
        size_t n = strlen(start_sock) < room ? strlen(start_sock) : room;
        memcpy(title, start_sock, n);
        memset(title + n, 0, room - n);
    }

    /* this process is ours to put in the pod's namespaces (see api/spawn.h) */
    spec.join_in_caller = 1;
    /* While the container process sets itself up, this one reports its pid early,
     * takes hold of its mount namespace and makes the start socket
     * (launcher_after_clone): all off the caller's path. Holding the mount
     * namespace until this process (the monitor) exits means the container's own
     * exit does not wait for its mounts to be torn down (~0.3 ms here: every
     * mount, the overlay, an RCU grace period): the monitor reaps it and writes
     * the exit file first, and the teardown happens as the monitor exits. */
    beside.sock = sock;
    beside.start_sock = start_sock;
    beside.spec = &spec;
    if (resumed) {
        launcher_after_clone(sr.pid);
        if (pycri__spawn_resume(&spec, rq.rawspec, req.spec_len, &sr, &rep.err) < 0) {
            rep.res.stage = sr.stage;
            launcher_fail(sock, &rep);
        }
    } else {
        pycri__after_clone = launcher_after_clone;
        if (pycri_spawn(&spec, &sr, &rep.err) < 0) {
            rep.res.stage = sr.stage;
            launcher_fail(sock, &rep);
        }
        pycri__after_clone = NULL;
    }
    free(rq.rawspec);
    if (pycri__held_mntns < 0 && spec.ns_mode[PYCRI_NS_MNT] == PYCRI_NS_NEW) {
        char nspath[64];   /* (no early report: the pid came only now) */
        snprintf(nspath, sizeof(nspath), "/proc/%d/ns/mnt", (int)sr.pid);
        pycri__held_mntns = open(nspath, O_RDONLY | O_CLOEXEC);
    }
    /* the container's ends (stdio, pty slave, kept fds) are the container's now; the
     * pidfd stays, to notice a held container being killed before start */
    int keep[MAX_MONITOR_FDS + 7] = {sock, sr.start_fd, sr.report_fd, sr.pidfd, sr.tty_master,
                                     pycri__held_mntns, beside.lsock};
    for (int i = 0; i < req.n_monitor_fds; i++)
        keep[7 + i] = req.monitor_local[i];
    pycri__close_all_but(keep, 7 + req.n_monitor_fds, 3);

    int lsock = beside.lsock >= 0 ? beside.lsock : listen_start(start_sock, &rep.err);
    if (lsock < 0) {
        rep.res.stage = PYCRI_STAGE_PREPARE;
        kill(sr.pid, SIGKILL);
        waitpid(sr.pid, NULL, 0);
        launcher_fail(sock, &rep);
    }
    rep.kind = LAUNCH_FINAL;
    rep.ok = 1;
    rep.res.stage = PYCRI_STAGE_NONE;
    rep.res.monitor_pid = getpid();
    rep.res.pid = sr.pid;
    rep.res.start_time = sr.start_time;
    rep.res.start_fd = rep.res.report_fd = -1;
    /* The caller gets the container's start and report sockets too: while it lives
     * it starts the container itself (pycri_spawn_start), two process hops fewer
     * than through the start socket and this launcher. */
    int pass[2] = {sr.start_fd, sr.report_fd};
    pycri__send_fds(sock, &rep, sizeof(rep), pass, 2);
    close(sock);

    for (;;) {
        /* Wait for a start request; for the held container to die (killed by a
         * remove whose caller never knew this launcher's pid): then go too; or for
         * its report socket to hang up: the caller started it directly, and it has
         * exec'd (alive) or failed (dead: the caller heard why). */
        struct pollfd pfds[3] = {{.fd = lsock, .events = POLLIN},
                                 {.fd = sr.report_fd, .events = 0},
                                 {.fd = sr.pidfd, .events = POLLIN}};
        int np = sr.pidfd >= 0 ? 3 : 2;
        if (poll(pfds, (nfds_t)np, -1) < 0) {
            if (errno == EINTR)
                continue;
            _exit(1);
        }
        int hup = (pfds[1].revents & (POLLHUP | POLLERR)) != 0;
        int dead = np == 3 && (pfds[2].revents & POLLIN);
        if (hup || dead) {
            /* The child's report end closed (exec, or death) or it died. Did it reach
             * execve? Alive: yes. Dead: only if it no longer bears the name it was
             * held under (execve renames a process). A process that exec'd goes on
             * to this monitor, which records its exit; one that never did means a
             * failed start (the starter heard why) or a kill while held: go. */
            int execd = !dead && !child_exited(sr.pidfd, sr.pid);
            if (!execd)
                execd = !held_name(sr.pid);
            if (execd) {
                close(lsock);
                if (sr.pidfd >= 0)
                    close(sr.pidfd);
                close(sr.start_fd);
                close(sr.report_fd);
                unlink(start_sock);
                break;
            }
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
    if (pycri__held_mntns >= 0) { /* out of the way of the numbers below */
        int moved = fcntl(pycri__held_mntns, F_DUPFD_CLOEXEC, high + MAX_MONITOR_FDS + 2);
        close(pycri__held_mntns);
        pycri__held_mntns = moved;
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

/* The factory: "pycri-monitor --launch 3 TITLE" with TITLE starting with
 * FACTORY_TITLE (so the launchers it forks have a launcher's command line, once
 * they blank it as a spawned launcher's is). Forking a launcher off
 * this small process costs a fraction of a posix_spawn + exec of a new one (the
 * exec's page faults and the C library's start-up, whose CPUID probes each trap
 * to the hypervisor on a VM). For each byte read on sock it makes a socket pair,
 * forks, sends the caller one end (SCM_RIGHTS) and the child carries on with the
 * other at fd 3 as a launcher (returning from here in that child only). It
 * detaches first as a launcher does, and exits when the caller closes sock. */
int pycri__is_factory_title(const char *title) {
    return title && !strncmp(title, FACTORY_TITLE, sizeof(FACTORY_TITLE) - 1);
}

void pycri__launcher_factory(int sock, char *title, int *argc_out, char ***argv_out) {
    pycri__default_all_signals();
    signal(SIGPIPE, SIG_IGN);
    setsid();
    pid_t p = fork();
    if (p < 0)
        _exit(1);
    if (p > 0)
        _exit(0);
    int keep[1] = {sock};
    pycri__close_all_but(keep, 1, 3);
    int32_t me = (int32_t)getpid();     /* (the caller's to know: it is not our parent) */
    if (send(sock, &me, sizeof(me), MSG_NOSIGNAL) != (ssize_t)sizeof(me))
        _exit(0);
    for (;;) {
        char c;
        ssize_t n = read(sock, &c, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n != 1)
            _exit(0);
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
            _exit(1);
        pid_t child = fork();
        if (child == 0) {
            close(sock);
            close(sv[0]);
            if (title)
                memset(title, ' ', strlen(title));
            if (sv[1] != LAUNCHER_SOCK_FD) {
                if (dup2(sv[1], LAUNCHER_SOCK_FD) < 0)
                    _exit(1);
                close(sv[1]);
            }
            pycri__launcher(LAUNCHER_SOCK_FD, title, argc_out, argv_out);
            return;
        }
        close(sv[1]);
        if (child > 0) {
            pycri__send_fds(sock, "L", 1, &sv[0], 1);
            /* the launcher's first process goes as soon as it has forked */
            while (waitpid(child, NULL, 0) < 0 && errno == EINTR)
                ;
        } else {
            /* (no launcher: the caller's read of a message without an fd says so) */
            char byte = 'E';
            send(sock, &byte, 1, MSG_NOSIGNAL);
        }
        close(sv[0]);
    }
}

/* The caller's fds the launcher gets, each once: fd -> its number there. */
struct fdmap {
    int *src;
    int n, cap;
    int base;       /* the launcher's number for the first */
};

static int map_fd(struct fdmap *m, int fd) {
    if (fd < 0)
        return -1;
    for (int i = 0; i < m->n; i++)
        if (m->src[i] == fd)
            return m->base + i;
    if (m->n == m->cap)
        return -1; /* cannot happen: cap counts every slot */
    m->src[m->n++] = fd;
    return m->base + m->n - 1;
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

/* posix_spawn the launcher with sock as fd 3 and /dev/null on 0, 1, 2. */
static int spawn_launcher(const char *path, int factory, int sock, pid_t *pid,
                          struct pycri_error *err) {
    int rc = 0;
    int lifted = fcntl(sock, F_DUPFD_CLOEXEC, LAUNCHER_SOCK_FD + 1);
    if (lifted < 0)
        return pycri_fail(err, errno, "launch: fd %d", sock);
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    int fa_ok = posix_spawn_file_actions_init(&fa) == 0;
    int attr_ok = posix_spawnattr_init(&attr) == 0;
    int e = fa_ok && attr_ok ? 0 : ENOMEM;
    if (!e)
        e = posix_spawn_file_actions_adddup2(&fa, lifted, LAUNCHER_SOCK_FD);
    if (!e)
        e = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDWR, 0);
    if (!e)
        e = posix_spawn_file_actions_adddup2(&fa, 0, 1);
    if (!e)
        e = posix_spawn_file_actions_adddup2(&fa, 0, 2);
    if (!e)
        e = posix_spawn_file_actions_addclosefrom_np(&fa, LAUNCHER_SOCK_FD + 1);
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
    /* a blank argument the launcher overwrites with its start socket path */
    char title[LAUNCH_TITLE_MAX + 1];
    memset(title, ' ', LAUNCH_TITLE_MAX);
    title[LAUNCH_TITLE_MAX] = '\0';
    if (factory)    /* (its launchers blank it again: see pycri__launcher_factory) */
        memcpy(title, FACTORY_TITLE, sizeof(FACTORY_TITLE) - 1);
    char *const argv[] = {(char *)path, "--launch", fdarg, title, NULL};
    char *const envp[] = {NULL};
    if (!e)
        e = posix_spawn(pid, path, &fa, &attr, argv, envp);
    if (e)
        rc = pycri_fail(err, e, "launch: posix_spawn %s", path);
    if (fa_ok)
        posix_spawn_file_actions_destroy(&fa);
    if (attr_ok)
        posix_spawnattr_destroy(&attr);
    close(lifted);
    return rc;
}

/* A launcher (factory: a launcher factory) on a new socket pair: posix_spawned,
 * and its first process (which forks the detached one) reaped. */
static int start_detached(const char *path, int factory, int *sock_out, struct pycri_error *err) {
    *sock_out = -1;
    if (!path || path[0] != '/')
        return pycri_fail(err, EINVAL, "launch: the launcher path must be absolute");
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        return pycri_fail(err, errno, "launch: socketpair");
    pid_t first = -1;
    int rc = spawn_launcher(path, factory, sv[1], &first, err);
    close(sv[1]);
    if (rc < 0) {
        close(sv[0]);
        return rc;
    }
    while (waitpid(first, NULL, 0) < 0 && errno == EINTR)
        ;
    *sock_out = sv[0];
    return 0;
}

PYCRI_EXPORT int pycri_launcher_new(const char *path, int *sock_out, struct pycri_error *err) {
    return start_detached(path, 0, sock_out, err);
}

PYCRI_EXPORT int pycri_launcher_factory_new(const char *path, int *sock_out, int *pid_out,
                                            struct pycri_error *err) {
    *pid_out = -1;
    int rc = start_detached(path, 1, sock_out, err);
    if (rc < 0)
        return rc;
    int32_t pid = -1;   /* its first word: its pid (it is not the one we reaped) */
    if (read_full(*sock_out, &pid, sizeof(pid)) != (ssize_t)sizeof(pid)) {
        close(*sock_out);
        *sock_out = -1;
        return pycri_fail(err, EPIPE, "launch: the launcher factory died starting");
    }
    *pid_out = pid;
    return 0;
}

PYCRI_EXPORT int pycri_launcher_from_factory(int factory, int *sock_out,
                                             struct pycri_error *err) {
    *sock_out = -1;
    char byte = 'L';
    if (send(factory, &byte, 1, MSG_NOSIGNAL) != 1)
        return pycri_fail(err, errno ? errno : EPIPE, "launch: the launcher factory is gone");
    int fd = -1, k;
    ssize_t r = pycri__recv_fds(factory, &byte, 1, &fd, 1, &k);
    if (r != 1)
        return pycri_fail(err, r < 0 ? errno : EPIPE, "launch: the launcher factory is gone");
    if (k < 1)
        return pycri_fail(err, EAGAIN, "launch: the launcher factory could not fork");
    *sock_out = fd;
    return 0;
}

/* The launcher's report, and the two fds it may carry (else -1). */
static ssize_t recv_report(int sock, struct launch_report *rep, int fds[2]) {
    size_t got = 0;
    while (got < sizeof(*rep)) {
        int k;  /* (only the first part carries fds) */
        ssize_t r = pycri__recv_fds(sock, (char *)rep + got, sizeof(*rep) - got, fds,
                                    fds[0] < 0 ? 2 : 0, &k);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

/* Send n fds in one-byte messages of up to FDS_PER_MSG each. */
static int send_fds(int sock, const int *fds, int n) {
    for (int off = 0; off < n; off += FDS_PER_MSG) {
        int k = n - off < FDS_PER_MSG ? n - off : FDS_PER_MSG;
        if (pycri__send_fds(sock, "F", 1, fds + off, k) != 1)
            return -1;
    }
    return 0;
}

/* Send a request: a first one (flags 0 or PRE: the launcher, or a new one when
 * -1, in *sock_out) or the RESUME one to a launcher holding a pre-clone, whose
 * fds go from base up. A PRE request has no start socket and no monitor. */
static int launch_send(int launcher, const struct pycri_spawn_spec *spec, const char *start_sock,
                       const char *const *monitor_argv, const int *monitor_fds,
                       int n_monitor_fds, uint32_t flags, int base, const char *launcher_path,
                       int *sock_out, struct pycri_error *err) {
    *sock_out = -1;
    int pre = (flags & LAUNCH_REQ_PRE) != 0;
    if (!spec->start_wait)
        return pycri_fail(err, EINVAL, "launch: the spec must use start_wait");
    if (!pre && (!monitor_argv || !monitor_argv[0] || monitor_argv[0][0] != '/'))
        return pycri_fail(err, EINVAL, "launch: monitor_argv[0] must be an absolute path");
    if (n_monitor_fds < 0 || n_monitor_fds > MAX_MONITOR_FDS)
        return pycri_fail(err, EINVAL, "launch: %d monitor fds (at most %d)", n_monitor_fds,
                          MAX_MONITOR_FDS);
    if (spec->n_keep_fds < 0 || spec->n_keep_fds > 1024 || (spec->n_keep_fds && !spec->keep_fds))
        return pycri_fail(err, EINVAL, "launch: bad keep_fds");
    if (!pre) {
        struct sockaddr_un sa;
        if (fill_sockaddr(&sa, start_sock, err) < 0)
            return -ENAMETOOLONG;
        if (strlen(start_sock) + 1 > LAUNCH_TITLE_MAX)
            return pycri_fail(err, ENAMETOOLONG, "start socket path %s", start_sock);
    }

    /* the spec as the launcher will see it: fds renumbered */
    int cap = 7 + spec->n_keep_fds + n_monitor_fds;
    cleanup_free int *src = malloc(sizeof(int) * (size_t)cap);
    cleanup_free int *keep = malloc(sizeof(int) * (size_t)(spec->n_keep_fds + 1));
    if (!src || !keep)
        return pycri_fail(err, ENOMEM, "launch: fd map");
    struct fdmap m = {.src = src, .n = 0, .cap = cap, .base = base};
    struct pycri_spawn_spec local = *spec;
    for (int i = 0; i < 3; i++)
        local.stdio[i] = map_fd(&m, spec->stdio[i]);
    local.tty_fd = map_fd(&m, spec->tty_fd);
    local.join_pidfd = map_fd(&m, spec->join_pidfd);
    if (spec->rootfs_premounted)
        local.rootfs_mount_fd = map_fd(&m, spec->rootfs_mount_fd);
    if (spec->dev_premounted)
        local.dev_mount_fd = map_fd(&m, spec->dev_mount_fd);
    for (int i = 0; i < spec->n_keep_fds; i++)
        keep[i] = map_fd(&m, spec->keep_fds[i]);
    local.keep_fds = spec->n_keep_fds ? keep : NULL;
    struct launch_req req;
    memset(&req, 0, sizeof(req));
    req.magic = LAUNCH_MAGIC;
    req.flags = flags;
    req.fd_base = base;
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
    for (const char *const *a = monitor_argv; a && *a; a++, req.argc++)
        argv_len += strlen(*a) + 1;
    if (argv_len > MAX_ARGV_BYTES)
        return pycri_fail(err, E2BIG, "launch: monitor argv of %zu bytes", argv_len);
    req.argv_len = (uint32_t)argv_len;
    req.spec_len = (uint32_t)spec_len;
    req.sock_len = pre ? 0 : (uint32_t)strlen(start_sock) + 1;
    req.n_fds = m.n;
    struct iovec iov[3 + req.argc];
    for (uint32_t i = 0; i < req.argc; i++)
        iov[i] = (struct iovec){(void *)monitor_argv[i], strlen(monitor_argv[i]) + 1};
    iov[req.argc] = (struct iovec){(void *)(pre ? "" : start_sock), req.sock_len};
    iov[req.argc + 1] = (struct iovec){specbuf, (size_t)spec_len};

    for (int i = 0; i < m.n; i++)
        if (fcntl(src[i], F_GETFD) < 0)
            return pycri_fail(err, EBADF, "launch: fd %d", src[i]);

    /* a launcher made ahead of need, or a new one (the caller's to close) */
    if (launcher < 0) {
        int rc = pycri_launcher_new(pre ? launcher_path : monitor_argv[0], &launcher, err);
        if (rc < 0)
            return rc;
    }
    *sock_out = launcher;
    /* a launcher that died early shows as EPIPE here or EOF in pycri_launch_wait */
    struct iovec head = {&req, sizeof(req)};
    if (send_full(launcher, &head, 1) < 0 || send_fds(launcher, src, m.n) < 0) {
        if (errno != EPIPE)   /* (EPIPE: it died; its report, if any, is read later) */
            return pycri_fail(err, errno, "launch: sending the request");
    } else {
        send_full(launcher, iov, (int)(2 + req.argc));
    }
    return 0;
}

PYCRI_EXPORT int pycri_launch_send(int launcher, const struct pycri_spawn_spec *spec,
                                   const char *start_sock,
                                   const char *const *monitor_argv, const int *monitor_fds,
                                   int n_monitor_fds, int *sock_out, struct pycri_error *err) {
    return launch_send(launcher, spec, start_sock, monitor_argv, monitor_fds, n_monitor_fds, 0,
                       LAUNCHER_SOCK_FD + 1, NULL, sock_out, err);
}

PYCRI_EXPORT int pycri_launch_pre(int launcher, const char *launcher_path,
                                  const struct pycri_spawn_spec *spec, int *sock_out,
                                  struct pycri_prelaunch *out, struct pycri_error *err) {
    memset(out, 0, sizeof(*out));
    if (!launcher_path || launcher_path[0] != '/')
        return pycri_fail(err, EINVAL, "launch: the launcher path must be absolute");
    int rc = launch_send(launcher, spec, NULL, NULL, NULL, 0, LAUNCH_REQ_PRE,
                         LAUNCHER_SOCK_FD + 1, launcher_path, sock_out, err);
    if (rc < 0)
        return rc;
    struct launch_report rep;
    int passed[2] = {-1, -1};
    ssize_t n = recv_report(*sock_out, &rep, passed);
    for (int i = 0; i < 2; i++)
        if (passed[i] >= 0)
            close(passed[i]);
    if (n != (ssize_t)sizeof(rep) || (rep.kind != LAUNCH_PAUSED && rep.kind != LAUNCH_FINAL))
        return pycri_fail(err, EPIPE, "launch: the launcher died before reporting");
    if (rep.kind != LAUNCH_PAUSED || !rep.ok) {
        *err = rep.err;
        out->stage = rep.res.stage;
        return -(rep.err.code ? rep.err.code : EINVAL);
    }
    out->pid = rep.res.pid;
    out->monitor_pid = rep.res.monitor_pid;
    out->start_time = rep.res.start_time;
    out->fd_base = rep.res.start_fd;
    return 0;
}

PYCRI_EXPORT int pycri_launch_resume_send(int sock, int fd_base,
                                          const struct pycri_spawn_spec *spec,
                                          const char *start_sock,
                                          const char *const *monitor_argv,
                                          const int *monitor_fds, int n_monitor_fds,
                                          struct pycri_error *err) {
    int out = -1;
    if (sock < 0)
        return pycri_fail(err, EBADF, "launch: no pre-cloned launcher");
    return launch_send(sock, spec, start_sock, monitor_argv, monitor_fds, n_monitor_fds,
                       LAUNCH_REQ_RESUME, fd_base, NULL, &out, err);
}

PYCRI_EXPORT int pycri_launch_wait(int sock, struct pycri_launch_result *res,
                                   struct pycri_error *err) {
    memset(res, 0, sizeof(*res));
    res->start_fd = res->report_fd = -1;
    res->stage = PYCRI_STAGE_PREPARE;
    struct launch_report rep;
    int passed[2] = {-1, -1};
    ssize_t n = recv_report(sock, &rep, passed);
    if (n != (ssize_t)sizeof(rep) || rep.kind == LAUNCH_EARLY) {
        for (int i = 0; i < 2; i++)
            if (passed[i] >= 0)
                close(passed[i]);
    }
    if (n != (ssize_t)sizeof(rep) || (rep.kind != LAUNCH_EARLY && rep.kind != LAUNCH_FINAL))
        return pycri_fail(err, EPIPE, "launch: the launcher died before reporting");
    *res = rep.res;
    if (rep.kind == LAUNCH_EARLY) {
        res->start_fd = res->report_fd = -1;
        return 1;
    }
    res->start_fd = passed[0];
    res->report_fd = passed[1];
    if (!rep.ok) {
        for (int i = 0; i < 2; i++)
            if (passed[i] >= 0)
                close(passed[i]);
        res->start_fd = res->report_fd = -1;
        *err = rep.err;
        return -(rep.err.code ? rep.err.code : EINVAL);
    }
    return 0;
}

PYCRI_EXPORT int pycri_launch(int launcher, const struct pycri_spawn_spec *spec,
                              const char *start_sock,
                              const char *const *monitor_argv, const int *monitor_fds,
                              int n_monitor_fds, struct pycri_launch_result *res,
                              struct pycri_error *err) {
    int sock = -1;
    int rc = pycri_launch_send(launcher, spec, start_sock, monitor_argv, monitor_fds,
                               n_monitor_fds, &sock, err);
    if (rc == 0) {
        do
            rc = pycri_launch_wait(sock, res, err);
        while (rc == 1);
    } else {
        memset(res, 0, sizeof(*res));
        res->start_fd = res->report_fd = -1;
        res->stage = PYCRI_STAGE_PREPARE;
    }
    if (sock >= 0 && sock != launcher)
        close(sock);
    return rc;
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
    if (pycri__write_all(s, "S", 1) < 0)
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

