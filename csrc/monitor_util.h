/* monitor_util.h - small helpers of pycri-monitor (private; included once, by
 * main_monitor.c, so everything is static). */
#ifndef PYCRI_MONITOR_UTIL_H
#define PYCRI_MONITOR_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* Report a setup error on stderr and exit 1 (only before the ready byte). */
static __attribute__((noreturn)) void die(const char *fmt, const char *arg, int err) {
    char buf[1024];
    int n = snprintf(buf, sizeof(buf), "pycri-monitor: ");
    n += snprintf(buf + n, sizeof(buf) - (size_t)n, fmt, arg ? arg : "");
    if (err)
        n += snprintf(buf + n, sizeof(buf) - (size_t)n, ": %s", strerror(err));
    if (n < (int)sizeof(buf) - 1)
        buf[n++] = '\n';
    ssize_t ignored = write(2, buf, (size_t)n);
    (void)ignored;
    _exit(1);
}

static long long mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static long long real_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static int write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

/* Move an inherited fd above 2 (stdio becomes /dev/null) and mark it CLOEXEC. */
static int keep_fd(int fd) {
    if (fd < 0)
        return -1;
    if (fcntl(fd, F_GETFD) < 0)
        die("inherited fd %s is not open", NULL, errno);
    if (fd <= 2) {
        int n = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        if (n < 0)
            die("dup inherited fd%s", NULL, errno);
        return n;
    }
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    return fd;
}

static long parse_num(const char *s, const char *what, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *s == '\0' || *end != '\0' || v < lo || v > hi)
        die("bad number for %s", what, 0);
    return v;
}

/* Write path as tmp + rename: readers see all or nothing. */
static int write_file_atomic(const char *path, const char *data, size_t len, mode_t mode) {
    /* tmp + rename: a reader sees the old file or the whole new one, never a torn
     * one, whoever dies when. No fsync: what these files describe (a process and its
     * exit) does not outlive a power loss either, and after a reboot the runtime
     * settles containers without an exit file as "Unknown". conmon and containerd's
     * shims keep exit codes no more durably. Skipping the two flushes takes ~0.5 ms
     * off every container exit on a disk-backed /run. */
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
    if (fd < 0)
        return -1;
    if (write_all(fd, data, len) < 0) {
        int e = errno;
        close(fd);
        unlink(tmp);
        errno = e;
        return -1;
    }
    close(fd);
    if (rename(tmp, path) < 0) {
        int e = errno;
        unlink(tmp);
        errno = e;
        return -1;
    }
    return 0;
}

#endif
