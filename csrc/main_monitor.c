/* main_monitor.c - pycri-monitor: the small process that watches one container.
 *
 * It is the container process's parent (or adopts it), reaps it, writes its
 * output to a CRI log, keeps its stdin / pty, serves attach clients, and records
 * the exit atomically. It outlives whatever launched it.
 *
 * Command line
 * ------------
 *   pycri-monitor --launch FD [TITLE]
 *                  the launcher of pycri_launch (csrc/launch.c, api/launch.h):
 *                  reads a spawn spec, its start socket path and the rest of its
 *                  own command line (one of the forms below, in --adopt mode)
 *                  from the socket FD, creates the container, waits for start on
 *                  that socket, then runs as that command line says without
 *                  another exec. TITLE (blanks) is overwritten with the start
 *                  socket path, so ps shows which container a monitor serves.
 *   pycri-monitor --launch FD factory...
 *                  a launcher factory: forks a launcher (as --launch 3 TITLE) for
 *                  each byte read on FD and sends its socket back (csrc/launch.c).
 *   pycri-monitor --exit-file PATH --log PATH
 *                 [--stdin] [--tty] [--attach-socket PATH] [--ready-fd N]
 *                 [--pid-file PATH] [--log-max-line N] [--detach]
 *                 (--adopt PID [--stdout-fd N] [--stderr-fd N] [--stdin-fd N]
 *                              [--pty-master-fd N]
 *                  | -- ARGV...)
 *
 *   -- ARGV        fork and exec ARGV (PATH is searched) with new pipes (or a pty
 *                  with --tty) as its stdio; stdin is /dev/null unless --stdin.
 *   --adopt PID    PID is already our child (the launcher cloned it, then exec'd
 *                  us); its stdio arrives as the inherited fds named by
 *                  --stdout-fd/--stderr-fd/--stdin-fd (write end of its stdin) or
 *                  --pty-master-fd. Missing fds mean "not captured".
 *   --detach       (only with --) fork once more; the first process waits until
 *                  the monitor is ready, prints "MONITOR_PID CONTAINER_PID\n" on
 *                  stdout and exits 0 (1 on a setup failure), so a launcher can
 *                  reap it at once and the monitor is re-parented.
 *   --ready-fd N   one byte ('R') is written and N closed once the log is open,
 *                  the socket listens and the container runs.
 *   --pid-file P   the container's pid in decimal, written atomically.
 *   --log-max-line N  longest log record payload (default 16384, 1..1048576).
 *   --oom-file F   the container cgroup's memory.oom_control (v1) or memory.events
 *                  (v2); its "oom_kill N" count is read at start and at exit, and
 *                  a SIGKILLed container whose count grew is recorded oom_killed.
 *
 * Every fd the monitor inherits other than the ones named above is closed at
 * start, and the container (-- mode) gets only its fds 0, 1 and 2.
 *
 * All paths must be absolute. Setup errors go to stderr with exit status 1 (before the ready byte). After
 * that stdio is /dev/null, the monitor is a session leader (setsid), ignores
 * SIGHUP and SIGPIPE, forwards SIGTERM/SIGINT/SIGQUIT to the container, and is a
 * child subreaper (orphaned descendants are reaped too).
 *
 * Log (CRI format), appended, mode 0640, reopened on SIGUSR1 (rotation):
 *   <RFC3339 UTC time with 9 fraction digits>Z <stdout|stderr> <P|F> <content>\n
 * F ends a line; a line longer than --log-max-line is cut into P records and
 * ends with an F; a partial line is flushed as P after 200 ms of silence or at
 * the end. With --tty everything is "stdout".
 *
 * Exit file, written tmp + rename (atomic, not fsynced: see write_file_atomic;
 * retried until it works),
 * after the container is reaped and its output drained:
 *   {"pid":N,"exit_code":N,"signal":N,"exited_at_ns":N,"oom_killed":false}
 * exit_code is 128+signal when killed by a signal. oom_killed needs --oom-file
 * (otherwise it is false and the caller decides from the cgroup stats).
 *
 * Attach socket (unix stream, mode 0600, never abstract, up to 8 clients).
 * Frames both ways are: 1 byte type, 4 bytes big-endian payload length, payload.
 *   monitor -> client  1 stdout data, 2 stderr data,
 *                      3 exit (payload: decimal exit code), then the socket closes
 *   client -> monitor  0 stdin data (only with --stdin), 5 close stdin
 *                      (EOF; ^D on a tty), 4 resize (payload 4 bytes: rows, cols
 *                      as big-endian u16) -> TIOCSWINSZ on the pty
 * Payloads from clients are at most 65536 bytes; a client that sends garbage or
 * cannot take output for a second is dropped.
 *
 * Files: this one (setup, event loop, attach, exit), monitor_log.h (the CRI log
 * writer), monitor_util.h (helpers, atomic file write). Built by setup.py as its
 * own executable; build.py skips main_*.c, and the headers hold static code for
 * this one translation unit only.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <linux/close_range.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_CLIENTS 8
#define MAX_CLIENT_FRAME 65536
#define READ_CHUNK 16384

#include "internal.h"
#include "spawn_child.h"
#include "monitor_util.h"
#include "monitor_log.h"

enum { FR_STDIN = 0, FR_STDOUT = 1, FR_STDERR = 2, FR_EXIT = 3, FR_RESIZE = 4, FR_CLOSE = 5 };

struct client {
    int fd;
    unsigned char hdr[5];
    size_t hdr_have;
    uint32_t left;  /* payload bytes still to read */
    unsigned char small[4];
    size_t small_have;
};

static struct {
    const char *exit_file, *log_path, *attach_path, *pid_file, *oom_file;
    int want_stdin, tty, detach;
    int ready_fd;
    int done_fd;        /* closed once the exit file is written: a creator waits on it */
    pid_t adopt;
    char **argv;
    int stdout_fd, stderr_fd, stdin_fd, pty_fd;
} opt = {.ready_fd = -1, .done_fd = -1, .stdout_fd = -1, .stderr_fd = -1,
         .stdin_fd = -1, .pty_fd = -1};

static int listen_fd = -1;
static int stdin_fd = -1; /* write end towards the container (pipe or pty master) */
static struct stream streams[2];
static struct client clients[MAX_CLIENTS];
static pid_t child_pid;
static int child_status;
static int child_done;
static long long exited_at_ns;
static char stdin_buf[4096];
static size_t stdin_len, stdin_off;
static long long oom_at_start = -1;

/* --- attach clients ------------------------------------------------------------ */

static void drop_client(struct client *c) {
    if (c->fd >= 0)
        close(c->fd);
    memset(c, 0, sizeof(*c));
    c->fd = -1;
}

static void send_frame(int type, const char *data, size_t len) {
    unsigned char hdr[5] = {(unsigned char)type, (unsigned char)(len >> 24),
                            (unsigned char)(len >> 16), (unsigned char)(len >> 8),
                            (unsigned char)len};
    for (int i = 0; i < MAX_CLIENTS; i++) {
        struct client *c = &clients[i];
        if (c->fd < 0)
            continue;
        struct iovec iov[2] = {{hdr, 5}, {(void *)data, len}};
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = len ? 2 : 1};
        size_t total = 5 + len;
        ssize_t n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n == (ssize_t)total)
            continue;
        if (n < 0 && errno != EAGAIN) {
            drop_client(c);
            continue;
        }
        /* Slow reader: give it up to 1 s to take the rest of this frame (a torn
         * frame would corrupt the stream), else drop it. */
        size_t done = n < 0 ? 0 : (size_t)n;
        long long deadline = mono_ms() + 1000;
        while (done < total) {
            const char *p;
            size_t left;
            if (done < 5) {
                p = (const char *)hdr + done;
                left = 5 - done;
            } else {
                p = data + (done - 5);
                left = total - done;
            }
            ssize_t w = send(c->fd, p, left, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w > 0) {
                done += (size_t)w;
                continue;
            }
            if (w < 0 && errno == EINTR)
                continue;
            long long wait = deadline - mono_ms();
            if (w == 0 || errno != EAGAIN || wait <= 0)
                break;
            struct pollfd pf = {.fd = c->fd, .events = POLLOUT};
            if (poll(&pf, 1, (int)wait) <= 0 || (pf.revents & (POLLERR | POLLHUP)))
                break;
        }
        if (done < total)
            drop_client(c);
    }
}

static void accept_client(void) {
    int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0)
        return;
    for (int i = 0; i < MAX_CLIENTS; i++) {
        if (clients[i].fd < 0) {
            memset(&clients[i], 0, sizeof(clients[i]));
            clients[i].fd = fd;
            return;
        }
    }
    close(fd); /* full */
}

static void close_stdin(void) {
    if (stdin_fd < 0)
        return;
    if (opt.tty) {
        char eot = 4; /* ^D: EOF for a canonical-mode reader; the pty stays */
        ssize_t ignored = write(stdin_fd, &eot, 1);
        (void)ignored;
        return;
    }
    close(stdin_fd);
    stdin_fd = -1;
    stdin_len = stdin_off = 0;
}

/* Input from clients is accepted only with --stdin (a tty without it is output-only). */
static int stdin_enabled(void) { return stdin_fd >= 0 && opt.want_stdin; }

static void flush_stdin(void) {
    while (stdin_fd >= 0 && stdin_off < stdin_len) {
        ssize_t n = write(stdin_fd, stdin_buf + stdin_off, stdin_len - stdin_off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n < 0) { /* the reader went away: discard further input */
            close(stdin_fd);
            stdin_fd = -1;
            stdin_len = stdin_off = 0;
            return;
        }
        stdin_off += (size_t)n;
    }
    stdin_len = stdin_off = 0;
}

/* Read what one client sent; stdin data is passed on in stdin_buf-sized steps so a
 * container that does not read its stdin only stalls the client, never us. */
static void client_input(struct client *c) {
    for (;;) {
        if (c->hdr_have < 5) {
            ssize_t n = read(c->fd, c->hdr + c->hdr_have, 5 - c->hdr_have);
            if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return;
            if (n <= 0) {
                drop_client(c);
                return;
            }
            c->hdr_have += (size_t)n;
            if (c->hdr_have < 5)
                return;
            c->left = (uint32_t)c->hdr[1] << 24 | (uint32_t)c->hdr[2] << 16 |
                      (uint32_t)c->hdr[3] << 8 | c->hdr[4];
            c->small_have = 0;
            int t = c->hdr[0];
            if (c->left > MAX_CLIENT_FRAME || (t != FR_STDIN && t != FR_RESIZE && t != FR_CLOSE) ||
                (t == FR_RESIZE && c->left != 4) || (t == FR_CLOSE && c->left != 0)) {
                drop_client(c);
                return;
            }
        }
        int t = c->hdr[0];
        if (t == FR_STDIN && c->left) {
            if (stdin_len) /* previous input still pending: wait for POLLOUT */
                return;
            size_t want = c->left < sizeof(stdin_buf) ? c->left : sizeof(stdin_buf);
            ssize_t n = read(c->fd, stdin_buf, want);
            if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return;
            if (n <= 0) {
                drop_client(c);
                return;
            }
            c->left -= (uint32_t)n;
            if (stdin_enabled()) {
                stdin_len = (size_t)n;
                stdin_off = 0;
                flush_stdin();
            }
        } else if (t == FR_RESIZE && c->left) {
            ssize_t n = read(c->fd, c->small + c->small_have, c->left);
            if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return;
            if (n <= 0) {
                drop_client(c);
                return;
            }
            c->small_have += (size_t)n;
            c->left -= (uint32_t)n;
        }
        if (c->left == 0) {
            if (t == FR_RESIZE && opt.tty && stdin_fd >= 0) {
                struct winsize ws = {.ws_row = (unsigned short)(c->small[0] << 8 | c->small[1]),
                                     .ws_col = (unsigned short)(c->small[2] << 8 | c->small[3])};
                ioctl(stdin_fd, TIOCSWINSZ, &ws);
            } else if (t == FR_CLOSE && stdin_enabled()) {
                close_stdin();
            }
            c->hdr_have = 0;
        }
    }
}

/* --- container output -------------------------------------------------------- */

/* Read once from a stream; returns bytes read, 0 at EOF (stream closed), -1 EAGAIN. */
static ssize_t pump(struct stream *s) {
    static char buf[READ_CHUNK];
    ssize_t n;
    do {
        n = read(s->fd, buf, sizeof(buf));
    } while (n < 0 && errno == EINTR);
    if (n < 0 && errno == EAGAIN)
        return -1;
    if (n <= 0) { /* EOF, or EIO from a pty whose other side is gone */
        flush_partial(s);
        if (!(opt.tty && s->fd == stdin_fd))
            close(s->fd);
        s->fd = -1;
        return 0;
    }
    log_data(s, buf, (size_t)n);
    send_frame(s->frame, buf, (size_t)n);
    return n;
}

/* After the container is reaped: take what is buffered, give lingering writers
 * (orphaned descendants holding the pipe) a short grace, then stop. */
static void drain(void) {
    long long deadline = mono_ms() + 100, hard = mono_ms() + 2000;
    for (;;) {
        int busy = 0;
        for (int i = 0; i < 2; i++) {
            while (streams[i].fd >= 0 && pump(&streams[i]) > 0)
                busy = 1;
        }
        if (streams[0].fd < 0 && streams[1].fd < 0)
            return;
        if ((!busy && mono_ms() >= deadline) || mono_ms() >= hard)
            return;
        struct pollfd p[2];
        int np = 0;
        for (int i = 0; i < 2; i++)
            if (streams[i].fd >= 0)
                p[np++] = (struct pollfd){.fd = streams[i].fd, .events = POLLIN};
        long long left = deadline - mono_ms();
        if (poll(p, (nfds_t)np, left > 0 ? (int)left : 0) == 0)
            return;
    }
}

/* --- exit ------------------------------------------------------------------------ */

/* The "oom_kill N" counter of the --oom-file, or -1. */
static long long read_oom_kills(void) {
    if (!opt.oom_file)
        return -1;
    int fd = open(opt.oom_file, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    char buf[1024];
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    for (char *line = buf; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        if (!strncmp(line, "oom_kill ", 9))
            return strtoll(line + 9, NULL, 10);
    }
    return -1;
}

static int exit_code(void) {
    if (WIFSIGNALED(child_status))
        return 128 + WTERMSIG(child_status);
    return WEXITSTATUS(child_status);
}

/* An unnamed file in the exit file's dir (O_TMPFILE), made while the container
 * runs: at its exit, a write and a linkat give the exit file its name with all
 * its content at once, the inode already allocated (about half the time of a
 * create + rename on this disk). -1 where the filesystem cannot: then tmp + rename. */
static int exit_tmp = -1;

static int open_exit_tmp(const char *path) {
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/');
    size_t len = slash ? (size_t)(slash - path) : 0;
    if (len == 0 || len >= sizeof(dir))
        return -1;
    memcpy(dir, path, len);
    dir[len] = '\0';
    return open(dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
}

static int link_exit_tmp(const char *data, size_t len) {
    char fdpath[32];
    if (exit_tmp < 0 || write_all(exit_tmp, data, len) < 0)
        return -1;
    snprintf(fdpath, sizeof(fdpath), "/proc/self/fd/%d", exit_tmp);
    int rc = linkat(AT_FDCWD, fdpath, AT_FDCWD, opt.exit_file, AT_SYMLINK_FOLLOW);
    close(exit_tmp);
    exit_tmp = -1;
    return rc;
}

static void record_exit(void) {
    char json[256];
    int sig = WIFSIGNALED(child_status) ? WTERMSIG(child_status) : 0;
    /* (only a SIGKILL can be the OOM killer's: no cgroup read on other exits) */
    int oom = sig == SIGKILL && oom_at_start >= 0 && read_oom_kills() > oom_at_start;
    int n = snprintf(json, sizeof(json),
                     "{\"pid\":%d,\"exit_code\":%d,\"signal\":%d,\"exited_at_ns\":%lld,"
                     "\"oom_killed\":%s}\n",
                     (int)child_pid, exit_code(), sig, exited_at_ns, oom ? "true" : "false");
    /* The end of a container must not be lost: retry with back-off. Give up only
     * when the state directory itself has been removed (nobody is left to read it). */
    int linked = link_exit_tmp(json, (size_t)n) == 0;
    int delay = 10, gone = 0;
    while (!linked && write_file_atomic(opt.exit_file, json, (size_t)n, 0600) < 0) {
        if (errno == ENOENT && ++gone >= 20)
            break;
        sleep_ms(delay);
        if (delay < 5000)
            delay *= 2;
    }
    /* the creator's wait wakes on this (no polling for the file) */
    if (opt.done_fd >= 0) {
        close(opt.done_fd);
        opt.done_fd = -1;
    }
}

static void reap(void) {
    for (;;) {
        int st;
        pid_t p = waitpid(-1, &st, WNOHANG);
        if (p <= 0)
            return;
        if (p == child_pid && !child_done) {
            child_done = 1;
            child_status = st;
            exited_at_ns = real_ns();
        }
    }
}

/* --- setup --------------------------------------------------------------------- */

static void usage(void) {
    die("usage: pycri-monitor --exit-file PATH --log PATH [--stdin] [--tty] "
        "[--attach-socket PATH] [--ready-fd N] [--pid-file PATH] [--log-max-line N] "
        "[--oom-file PATH] "
        "[--detach] (--adopt PID [--stdout-fd N] [--stderr-fd N] [--stdin-fd N] "
        "[--pty-master-fd N] | -- ARGV...)%s", NULL, 0);
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV() do { if (!v) usage(); i++; } while (0)
        if (!strcmp(a, "--")) {
            opt.argv = argv + i + 1;
            if (!opt.argv[0])
                usage();
            break;
        } else if (!strcmp(a, "--exit-file")) { NEEDV(); opt.exit_file = v;
        } else if (!strcmp(a, "--log")) { NEEDV(); opt.log_path = crilog.path = v;
        } else if (!strcmp(a, "--attach-socket")) { NEEDV(); opt.attach_path = v;
        } else if (!strcmp(a, "--pid-file")) { NEEDV(); opt.pid_file = v;
        } else if (!strcmp(a, "--oom-file")) { NEEDV(); opt.oom_file = v;
        } else if (!strcmp(a, "--ready-fd")) { NEEDV(); opt.ready_fd = (int)parse_num(v, a, 0, INT_MAX);
        } else if (!strcmp(a, "--done-fd")) { NEEDV(); opt.done_fd = (int)parse_num(v, a, 0, INT_MAX);
        } else if (!strcmp(a, "--log-max-line")) { NEEDV(); crilog.max_line = (size_t)parse_num(v, a, 1, 1 << 20);
        } else if (!strcmp(a, "--adopt")) { NEEDV(); opt.adopt = (pid_t)parse_num(v, a, 1, INT_MAX);
        } else if (!strcmp(a, "--stdout-fd")) { NEEDV(); opt.stdout_fd = (int)parse_num(v, a, 0, INT_MAX);
        } else if (!strcmp(a, "--stderr-fd")) { NEEDV(); opt.stderr_fd = (int)parse_num(v, a, 0, INT_MAX);
        } else if (!strcmp(a, "--stdin-fd")) { NEEDV(); opt.stdin_fd = (int)parse_num(v, a, 0, INT_MAX);
        } else if (!strcmp(a, "--pty-master-fd")) { NEEDV(); opt.pty_fd = (int)parse_num(v, a, 0, INT_MAX);
        } else if (!strcmp(a, "--stdin")) { opt.want_stdin = 1;
        } else if (!strcmp(a, "--tty")) { opt.tty = 1;
        } else if (!strcmp(a, "--detach")) { opt.detach = 1;
        } else {
            die("unknown option %s", a, 0);
        }
#undef NEEDV
    }
    if (!opt.exit_file || !opt.log_path || (!opt.argv == !opt.adopt))
        usage();
    if (opt.adopt && opt.detach)
        die("--detach cannot be used with --adopt (the container must stay our child)%s", NULL, 0);
    /* Absolute paths only: the monitor leaves its working directory (chdir "/") so
     * it never pins a mount for its long life. */
    const char *paths[] = {opt.exit_file, opt.log_path, opt.attach_path, opt.pid_file,
                           opt.oom_file};
    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++)
        if (paths[i] && paths[i][0] != '/')
            die("paths must be absolute: %s", paths[i], 0);
}

static void listen_attach(void) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(opt.attach_path) >= sizeof(sa.sun_path))
        die("attach socket path too long: %s", opt.attach_path, 0);
    strcpy(sa.sun_path, opt.attach_path);
    listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (listen_fd < 0)
        die("socket%s", NULL, errno);
    struct stat st;
    if (lstat(opt.attach_path, &st) == 0 && S_ISSOCK(st.st_mode))
        unlink(opt.attach_path); /* a stale socket from an earlier monitor */
    mode_t old = umask(0177);
    int rc = bind(listen_fd, (struct sockaddr *)&sa, sizeof(sa));
    umask(old);
    if (rc < 0)
        die("bind %s", opt.attach_path, errno);
    if (listen(listen_fd, MAX_CLIENTS) < 0)
        die("listen %s", opt.attach_path, errno);
}

/* Fork and exec ARGV with its stdio wired to fresh pipes or a pty. */
static void spawn_child(const sigset_t *oldmask) {
    int out[2] = {-1, -1}, errp[2] = {-1, -1}, in[2] = {-1, -1}, report[2];
    int master = -1;
    char *slave_name = NULL;
    if (opt.tty) {
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 ||
            !(slave_name = ptsname(master)))
            die("open pty%s", NULL, errno);
    } else {
        if (pipe2(out, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0)
            die("pipe%s", NULL, errno);
        if (opt.want_stdin && pipe2(in, O_CLOEXEC) < 0)
            die("pipe%s", NULL, errno);
    }
    if (pipe2(report, O_CLOEXEC) < 0)
        die("pipe%s", NULL, errno);
    pid_t pid = fork();
    if (pid < 0)
        die("fork%s", NULL, errno);
    if (pid == 0) {
        int e = 0;
        signal(SIGHUP, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        sigprocmask(SIG_SETMASK, oldmask, NULL);
        if (opt.tty) {
            int slave;
            if (setsid() < 0 || (slave = open(slave_name, O_RDWR)) < 0 ||
                ioctl(slave, TIOCSCTTY, 0) < 0 || dup2(slave, 0) < 0 || dup2(slave, 1) < 0 ||
                dup2(slave, 2) < 0)
                e = errno;
        } else {
            int null = in[0] >= 0 ? in[0] : open("/dev/null", O_RDONLY | O_CLOEXEC);
            if (null < 0 || dup2(null, 0) < 0 || dup2(out[1], 1) < 0 || dup2(errp[1], 2) < 0)
                e = errno;
        }
        /* Nothing but 0, 1, 2 crosses exec (the report pipe is CLOEXEC already). */
        if (!e && syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
            e = errno;
        if (!e) {
            execvp(opt.argv[0], opt.argv);
            e = errno;
        }
        ssize_t ignored = write(report[1], &e, sizeof(e));
        (void)ignored;
        _exit(127);
    }
    close(report[1]);
    int e = 0;
    ssize_t n;
    do {
        n = read(report[0], &e, sizeof(e));
    } while (n < 0 && errno == EINTR);
    close(report[0]);
    if (n == sizeof(e)) {
        waitpid(pid, NULL, 0);
        die("exec %s", opt.argv[0], e);
    }
    child_pid = pid;
    if (opt.tty) {
        streams[0].fd = master;
        stdin_fd = master;
    } else {
        close(out[1]);
        close(errp[1]);
        streams[0].fd = out[0];
        streams[1].fd = errp[0];
        if (in[0] >= 0) {
            close(in[0]);
            stdin_fd = in[1];
        }
    }
}

static void adopt_child(void) {
    int st;
    pid_t r = waitpid(opt.adopt, &st, WNOHANG);
    if (r < 0)
        die("--adopt %s: not a child of this process", "", errno);
    child_pid = opt.adopt;
    if (r == opt.adopt) { /* it exited before we got here: still ours to record */
        child_done = 1;
        child_status = st;
        exited_at_ns = real_ns();
    }
    if (opt.tty) {
        streams[0].fd = keep_fd(opt.pty_fd);
        stdin_fd = streams[0].fd;
    } else {
        streams[0].fd = keep_fd(opt.stdout_fd);
        streams[1].fd = keep_fd(opt.stderr_fd);
        stdin_fd = keep_fd(opt.stdin_fd);
    }
}

/* Close every inherited fd >= 3 except the ones the command line names: a stray
 * copy of the container's pipe write end would keep us from ever seeing EOF. */
static void close_stray_fds(void) {
    int keep[7] = {opt.ready_fd, opt.done_fd, opt.stdout_fd, opt.stderr_fd, opt.stdin_fd,
                   opt.pty_fd, pycri__held_mntns};
    pycri__close_all_but(keep, 7, 3);
}

int main(int argc, char **argv) {
    /* pycri_launch's launcher (launch.c): returns once the container started,
     * with our command line, and we carry on as its monitor in this process */
    if (argc == 4 && !strcmp(argv[1], "--launch") && pycri__is_factory_title(argv[3]))
        pycri__launcher_factory((int)parse_num(argv[2], "--launch", 3, INT_MAX), argv[3],
                                &argc, &argv);
    else if (argc == 4 && !strcmp(argv[1], "--launch"))
        pycri__launcher((int)parse_num(argv[2], "--launch", 3, INT_MAX), argv[3], &argc, &argv);
    else if (argc == 3 && !strcmp(argv[1], "--launch"))
        pycri__launcher((int)parse_num(argv[2], "--launch", 3, INT_MAX), NULL, &argc, &argv);
    parse_args(argc, argv);
    close_stray_fds();
    if (opt.ready_fd >= 0)
        opt.ready_fd = keep_fd(opt.ready_fd);
    if (opt.done_fd >= 0)
        opt.done_fd = keep_fd(opt.done_fd);

    int detach_pipe[2] = {-1, -1};
    if (opt.detach) {
        if (pipe2(detach_pipe, O_CLOEXEC) < 0)
            die("pipe%s", NULL, errno);
        pid_t p = fork();
        if (p < 0)
            die("fork%s", NULL, errno);
        if (p > 0) { /* the launcher's child: report and go */
            close(detach_pipe[1]);
            char msg[64];
            ssize_t got = 0, n;
            while ((n = read(detach_pipe[0], msg + got, sizeof(msg) - 1 - (size_t)got)) > 0 ||
                   (n < 0 && errno == EINTR))
                if (n > 0)
                    got += n;
            if (got <= 0)
                _exit(1);
            ssize_t ignored = write(1, msg, (size_t)got);
            (void)ignored;
            _exit(0);
        }
        close(detach_pipe[0]);
    }

    setsid(); /* fails only if already a group leader; then we keep that group */
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    signal(SIGHUP, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    sigset_t mask, oldmask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGUSR1);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGQUIT);
    sigprocmask(SIG_BLOCK, &mask, &oldmask);
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0)
        die("signalfd%s", NULL, errno);

    for (int i = 0; i < MAX_CLIENTS; i++)
        clients[i].fd = -1;
    streams[0] = (struct stream){.fd = -1, .name = "stdout", .frame = FR_STDOUT};
    streams[1] = (struct stream){.fd = -1, .name = "stderr", .frame = FR_STDERR};

    open_log(1);
    oom_at_start = read_oom_kills();
    if (opt.attach_path)
        listen_attach();
    if (opt.adopt)
        adopt_child();
    else
        spawn_child(&oldmask);
    for (int i = 0; i < 2; i++)
        if (streams[i].fd >= 0)
            set_nonblock(streams[i].fd);
    if (stdin_fd >= 0)
        set_nonblock(stdin_fd);
    if (chdir("/") < 0)
        die("chdir /%s", NULL, errno);
    if (opt.pid_file) {
        char buf[32];
        int n = snprintf(buf, sizeof(buf), "%d\n", (int)child_pid);
        if (write_file_atomic(opt.pid_file, buf, (size_t)n, 0600) < 0)
            die("write pid file %s", opt.pid_file, errno);
    }

    /* Ready: from here on nothing is reported on stderr. */
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        if (null > 2)
            close(null);
    }
    if (opt.ready_fd >= 0) {
        write_all(opt.ready_fd, "R", 1);
        close(opt.ready_fd);
    }
    if (detach_pipe[1] >= 0) {
        char msg[48];
        int n = snprintf(msg, sizeof(msg), "%d %d\n", (int)getpid(), (int)child_pid);
        write_all(detach_pipe[1], msg, (size_t)n);
        close(detach_pipe[1]);
    }

    exit_tmp = open_exit_tmp(opt.exit_file);
    reap(); /* a SIGCHLD from before the signalfd existed would be lost */
    while (!child_done) {
        struct pollfd p[4 + MAX_CLIENTS];
        int np = 0;
        p[np++] = (struct pollfd){.fd = sfd, .events = POLLIN};
        int i_listen = -1, i_stream[2] = {-1, -1}, i_stdin = -1, i_client[MAX_CLIENTS];
        if (listen_fd >= 0) {
            i_listen = np;
            p[np++] = (struct pollfd){.fd = listen_fd, .events = POLLIN};
        }
        for (int i = 0; i < 2; i++) {
            if (streams[i].fd >= 0) {
                i_stream[i] = np;
                p[np++] = (struct pollfd){.fd = streams[i].fd, .events = POLLIN};
            }
        }
        if (stdin_len && stdin_fd >= 0 && !opt.tty) {
            i_stdin = np;
            p[np++] = (struct pollfd){.fd = stdin_fd, .events = POLLOUT};
        }
        for (int i = 0; i < MAX_CLIENTS; i++) {
            i_client[i] = -1;
            if (clients[i].fd >= 0) {
                i_client[i] = np;
                /* Back-pressure: clients are not polled at all (a negative fd is
                 * skipped, so a hung-up client cannot spin us) while stdin is full. */
                p[np++] = (struct pollfd){.fd = stdin_len ? -1 : clients[i].fd, .events = POLLIN};
            }
        }
        int timeout = -1;
        long long now = mono_ms();
        for (int i = 0; i < 2; i++) {
            if (streams[i].plen) {
                long long left = streams[i].pend_since + CRI_PARTIAL_FLUSH_MS - now;
                int t = left > 0 ? (int)left : 0;
                if (timeout < 0 || t < timeout)
                    timeout = t;
            }
        }
        if (stdin_len && opt.tty) /* a pty master has no useful POLLOUT edge */
            timeout = timeout < 0 || timeout > 10 ? 10 : timeout;
        int r = poll(p, (nfds_t)np, timeout);
        if (r < 0 && errno != EINTR)
            sleep_ms(10);
        now = mono_ms();
        for (int i = 0; i < 2; i++)
            if (streams[i].plen && now - streams[i].pend_since >= CRI_PARTIAL_FLUSH_MS)
                flush_partial(&streams[i]);
        if (r <= 0) {
            if (stdin_len)
                flush_stdin();
            continue;
        }
        if (p[0].revents & POLLIN) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof(si)) == sizeof(si)) {
                if (si.ssi_signo == SIGCHLD)
                    reap();
                else if (si.ssi_signo == SIGUSR1)
                    open_log(0);
                else if (child_pid > 0 && !child_done)
                    kill(child_pid, (int)si.ssi_signo);
            }
        }
        for (int i = 0; i < 2; i++)
            if (i_stream[i] >= 0 && (p[i_stream[i]].revents & (POLLIN | POLLHUP | POLLERR)))
                pump(&streams[i]);
        if (i_stdin >= 0 && p[i_stdin].revents)
            flush_stdin();
        else if (stdin_len && opt.tty)
            flush_stdin();
        if (i_listen >= 0 && (p[i_listen].revents & POLLIN))
            accept_client();
        for (int i = 0; i < MAX_CLIENTS; i++) {
            if (i_client[i] >= 0 && clients[i].fd >= 0 && p[i_client[i]].revents) {
                if (p[i_client[i]].revents & (POLLIN | POLLHUP | POLLERR))
                    client_input(&clients[i]);
            }
        }
    }

    drain();
    for (int i = 0; i < 2; i++)
        flush_partial(&streams[i]);
    record_exit();
    char code[16];
    int n = snprintf(code, sizeof(code), "%d", exit_code());
    send_frame(FR_EXIT, code, (size_t)n);
    for (int i = 0; i < MAX_CLIENTS; i++)
        if (clients[i].fd >= 0)
            drop_client(&clients[i]);
    if (opt.attach_path)
        unlink(opt.attach_path);
    reap();
    return 0;
}
