/* cgroup.c - reading and writing cgroup files, killing and removing cgroups.
 *
 * The policy (which hierarchy, which file, which value) lives in pycri/cgroup.py.
 * Here: every file is opened beneath a directory fd with openat2 so untrusted
 * names cannot leave the cgroup, values go out in a single write, and the kill
 * loop runs without the GIL.
 */
#include <fcntl.h>
#include <linux/magic.h>
#include <linux/openat2.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#ifndef CGROUP2_SUPER_MAGIC
#define CGROUP2_SUPER_MAGIC 0x63677270
#endif
#ifndef CGROUP_SUPER_MAGIC
#define CGROUP_SUPER_MAGIC 0x27e0eb
#endif

static int open_beneath(int dirfd, const char *name, int flags) {
    struct open_how how = {
        .flags = (unsigned long long)(flags | O_CLOEXEC | O_NOCTTY |
                                      ((flags & O_ACCMODE) == O_WRONLY ? O_TRUNC : 0)),
        .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    return (int)syscall(SYS_openat2, dirfd, name, &how, sizeof(how));
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

PYCRI_EXPORT int pycri_cgroup_fstype(const char *path, struct pycri_error *err) {
    struct statfs st;
    if (statfs(path, &st) < 0)
        return pycri_fail(err, errno, "statfs %s", path);
    if (st.f_type == CGROUP2_SUPER_MAGIC)
        return PYCRI_CGROUP_V2;
    if (st.f_type == CGROUP_SUPER_MAGIC)
        return PYCRI_CGROUP_V1;
    return PYCRI_CGROUP_UNKNOWN;
}

PYCRI_EXPORT int pycri_cgroup_open(const char *path, struct pycri_error *err) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return pycri_fail(err, errno, "open %s", path);
    return fd;
}

PYCRI_EXPORT int pycri_cgroup_write(int dirfd, const char *name, const char *value, size_t len,
                                    struct pycri_error *err) {
    cleanup_fd int fd = open_beneath(dirfd, name, O_WRONLY);
    if (fd < 0)
        return pycri_fail(err, errno, "openat2 %s", name);
    ssize_t n;
    do {
        n = write(fd, value, len);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return pycri_fail(err, errno, "write %.*s to %s", (int)(len > 64 ? 64 : len), value, name);
    if ((size_t)n != len)
        return pycri_fail(err, EIO, "short write to %s (%zd of %zu bytes)", name, n, len);
    return 0;
}

PYCRI_EXPORT int pycri_cgroup_write_batch(int dirfd, const char **names, const char **values,
                                          int n, int *failed, struct pycri_error *err) {
    for (int i = 0; i < n; i++) {
        int rc = pycri_cgroup_write(dirfd, names[i], values[i], strlen(values[i]), err);
        if (rc < 0) {
            *failed = i;
            return rc;
        }
    }
    *failed = n;
    return 0;
}

PYCRI_EXPORT int pycri_cgroup_read(int dirfd, const char *name, char *buf, size_t cap,
                                   struct pycri_error *err) {
    if (cap == 0)
        return pycri_fail(err, EINVAL, "read %s: empty buffer", name);
    cleanup_fd int fd = open_beneath(dirfd, name, O_RDONLY);
    if (fd < 0)
        return pycri_fail(err, errno, "openat2 %s", name);
    size_t off = 0;
    for (;;) {
        if (off == cap - 1) {
            char probe;
            ssize_t more = read(fd, &probe, 1);
            if (more > 0)
                return pycri_fail(err, EFBIG, "read %s: larger than %zu bytes", name, cap - 1);
            break;
        }
        ssize_t n = read(fd, buf + off, cap - 1 - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return pycri_fail(err, errno, "read %s", name);
        if (n == 0)
            break;
        off += (size_t)n;
    }
    buf[off] = '\0';
    return (int)off;
}

/* Send SIGKILL to every pid listed in cgroup.procs; returns the count, or -errno. */
static int kill_listed(int dirfd, int *listed, struct pycri_error *err) {
    cleanup_fd int fd = open_beneath(dirfd, "cgroup.procs", O_RDONLY);
    if (fd < 0)
        return pycri_fail(err, errno, "openat2 cgroup.procs");
    char buf[4096];
    char num[24];
    size_t numlen = 0;
    int sent = 0;
    *listed = 0;
    for (;;) {
        ssize_t n = read(fd, buf, sizeof(buf));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return pycri_fail(err, errno, "read cgroup.procs");
        if (n == 0)
            break;
        for (ssize_t i = 0; i < n; i++) {
            char c = buf[i];
            if (c >= '0' && c <= '9') {
                if (numlen < sizeof(num) - 1)
                    num[numlen++] = c;
                continue;
            }
            if (numlen) {
                num[numlen] = '\0';
                pid_t pid = (pid_t)strtol(num, NULL, 10);
                numlen = 0;
                (*listed)++;
                if (pid > 0 && kill(pid, SIGKILL) == 0)
                    sent++;
            }
        }
    }
    if (numlen) {
        num[numlen] = '\0';
        pid_t pid = (pid_t)strtol(num, NULL, 10);
        (*listed)++;
        if (pid > 0 && kill(pid, SIGKILL) == 0)
            sent++;
    }
    return sent;
}

/* v1 freezer: write the state and wait (briefly) for it to settle. */
static void v1_freeze(int freezer_dirfd, int frozen) {
    const char *want = frozen ? "FROZEN" : "THAWED";
    struct pycri_error ignored;
    if (pycri_cgroup_write(freezer_dirfd, "freezer.state", want, strlen(want), &ignored) < 0)
        return;
    for (int i = 0; frozen && i < 100; i++) {
        char state[32];
        if (pycri_cgroup_read(freezer_dirfd, "freezer.state", state, sizeof(state), &ignored) < 0)
            return;
        if (strncmp(state, "FROZEN", 6) == 0)
            return;
        sleep_ms(1);
    }
}

PYCRI_EXPORT int pycri_cgroup_kill(int procs_dirfd, int freezer_dirfd, int v2, int timeout_ms,
                                   struct pycri_error *err) {
    long long deadline = now_ms() + timeout_ms;
    int total = 0;
    int use_v2_freeze = 0;
    if (v2) {
        /* cgroup.kill (5.14+) kills the whole subtree atomically, forks included. */
        struct pycri_error ignored;
        if (pycri_cgroup_write(procs_dirfd, "cgroup.kill", "1", 1, &ignored) == 0)
            total = 1;
        else
            use_v2_freeze = 1;
    }
    if (!v2) {
        /* the usual case at removal: nobody left, so no freeze and thaw either */
        char one[2];
        struct pycri_error ignored;
        if (pycri_cgroup_read(procs_dirfd, "cgroup.procs", one, sizeof(one), &ignored) == 0)
            return 0;
    }
    for (;;) {
        struct pycri_error ignored;
        if (use_v2_freeze)
            pycri_cgroup_write(procs_dirfd, "cgroup.freeze", "1", 1, &ignored);
        else if (!v2 && freezer_dirfd >= 0)
            v1_freeze(freezer_dirfd, 1);
        int listed = 0;
        int sent = kill_listed(procs_dirfd, &listed, err);
        if (use_v2_freeze)
            pycri_cgroup_write(procs_dirfd, "cgroup.freeze", "0", 1, &ignored);
        else if (!v2 && freezer_dirfd >= 0)
            v1_freeze(freezer_dirfd, 0);
        if (sent < 0)
            return sent;
        total += sent;
        if (listed == 0)
            return total;
        if (now_ms() >= deadline)
            return pycri_fail(err, ETIMEDOUT, "cgroup.procs still lists %d processes", listed);
        sleep_ms(5);
    }
}

PYCRI_EXPORT int pycri_cgroup_rmdir(const char *path, int timeout_ms, struct pycri_error *err) {
    long long deadline = now_ms() + timeout_ms;
    for (;;) {
        if (rmdir(path) == 0 || errno == ENOENT)
            return 0;
        if (errno != EBUSY || now_ms() >= deadline)
            return pycri_fail(err, errno, "rmdir %s", path);
        sleep_ms(5);
    }
}
