/* ns.c - pinning pod namespaces to files.
 *
 * A pod's network, IPC and UTS namespaces must live as long as the pod, with or
 * without containers. Instead of a pause process, a short-lived child unshares
 * them and bind-mounts /proc/self/ns/<kind> onto files in the pod's state dir;
 * the mounts keep the namespaces alive, and containers setns() into them.
 * The child is a vfork-style clone of a possibly multi-threaded process: it only
 * makes raw system calls and reports (step, errno) in memory it shares with us.
 */
#include <fcntl.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "internal.h"

struct child_report {
    int step;
    int code;
};

enum { STEP_UNSHARE = 1, STEP_HOSTNAME, STEP_LO, STEP_SYSCTL, STEP_PIN_NET, STEP_PIN_IPC,
       STEP_PIN_UTS };

static const char *step_name(int step) {
    switch (step) {
    case STEP_UNSHARE: return "unshare";
    case STEP_HOSTNAME: return "sethostname";
    case STEP_LO: return "bring up lo";
    case STEP_SYSCTL: return "write sysctl";
    case STEP_PIN_NET: return "bind-mount net namespace";
    case STEP_PIN_IPC: return "bind-mount ipc namespace";
    case STEP_PIN_UTS: return "bind-mount uts namespace";
    }
    return "?";
}

static int lo_up(void) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    memcpy(ifr.ifr_name, "lo", 3);
    int rc = ioctl(s, SIOCGIFFLAGS, &ifr);
    if (rc == 0) {
        ifr.ifr_flags |= IFF_UP;
        rc = ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    int saved = errno;
    close(s);
    errno = saved;
    return rc;
}

/* Write value to /proc/sys/<key with dots as slashes>; runs in the child. */
static int write_sysctl(const char *key, const char *value) {
    char path[512] = "/proc/sys/";
    size_t n = strlen(path), klen = strlen(key);
    if (n + klen >= sizeof(path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    for (size_t i = 0; i < klen; i++)
        path[n + i] = key[i] == '.' ? '/' : key[i];
    path[n + klen] = '\0';
    int fd = open(path, O_WRONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return -1;
    ssize_t w = write(fd, value, strlen(value));
    int saved = errno;
    close(fd);
    errno = saved;
    return w < 0 ? -1 : 0;
}

struct pin_job {
    int kinds, flags, nsysctls;
    const char *net_path, *ipc_path, *uts_path, *hostname, *sysctls;
    struct child_report report;
};

static int pin_fail(struct pin_job *j, int step) {
    j->report.step = step;
    j->report.code = errno;
    return 1;
}

/* Runs in a CLONE_VM|CLONE_VFORK child: the caller is suspended until it exits,
 * and it reports by writing into the job, which it shares with the caller. */
static int pin_child(void *arg) {
    struct pin_job *j = arg;
    if (unshare(j->flags) < 0)
        return pin_fail(j, STEP_UNSHARE);
    if ((j->kinds & PYCRI_PIN_UTS) && j->hostname && j->hostname[0] &&
        sethostname(j->hostname, strlen(j->hostname)) < 0)
        return pin_fail(j, STEP_HOSTNAME);
    if ((j->kinds & PYCRI_PIN_NET) && lo_up() < 0)
        return pin_fail(j, STEP_LO);
    const char *p = j->sysctls;
    for (int i = 0; p && i < j->nsysctls; i++) {
        const char *key = p;
        const char *value = key + strlen(key) + 1;
        if (write_sysctl(key, value) < 0)
            return pin_fail(j, STEP_SYSCTL * 1000 + i);
        p = value + strlen(value) + 1;
    }
    if ((j->kinds & PYCRI_PIN_NET) &&
        mount("/proc/self/ns/net", j->net_path, NULL, MS_BIND, NULL) < 0)
        return pin_fail(j, STEP_PIN_NET);
    if ((j->kinds & PYCRI_PIN_IPC) &&
        mount("/proc/self/ns/ipc", j->ipc_path, NULL, MS_BIND, NULL) < 0)
        return pin_fail(j, STEP_PIN_IPC);
    if ((j->kinds & PYCRI_PIN_UTS) &&
        mount("/proc/self/ns/uts", j->uts_path, NULL, MS_BIND, NULL) < 0)
        return pin_fail(j, STEP_PIN_UTS);
    return 0;
}

PYCRI_EXPORT int pycri_ns_pin(int kinds, const char *net_path, const char *ipc_path,
                              const char *uts_path, const char *hostname, const char *sysctls,
                              int nsysctls, struct pycri_error *err) {
    struct pin_job j = {.kinds = kinds, .nsysctls = nsysctls, .net_path = net_path,
                        .ipc_path = ipc_path, .uts_path = uts_path, .hostname = hostname,
                        .sysctls = sysctls};
    if (kinds & PYCRI_PIN_NET) j.flags |= CLONE_NEWNET;
    if (kinds & PYCRI_PIN_IPC) j.flags |= CLONE_NEWIPC;
    if (kinds & PYCRI_PIN_UTS) j.flags |= CLONE_NEWUTS;
    /* A vfork-style child: no copy of the (large, threaded) caller's address space
     * and no fork handlers run (gRPC's, for one); signals stay blocked in it. */
    const size_t stack_size = 64 << 10;
    cleanup_free char *stack = malloc(stack_size);
    if (!stack)
        return pycri_fail(err, ENOMEM, "pin namespaces: stack");
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t pid = clone(pin_child, stack + stack_size, CLONE_VM | CLONE_VFORK | SIGCHLD, &j);
    int clone_errno = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid < 0)
        return pycri_fail(err, clone_errno, "pin namespaces: clone");
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (j.report.step) {
        /* undo whatever pins were made before the failing step */
        if (net_path) umount2(net_path, MNT_DETACH);
        if (ipc_path) umount2(ipc_path, MNT_DETACH);
        if (uts_path) umount2(uts_path, MNT_DETACH);
        if (j.report.step >= STEP_SYSCTL * 1000)
            return pycri_fail(err, j.report.code, "pin namespaces: write sysctl #%d",
                              j.report.step - STEP_SYSCTL * 1000);
        return pycri_fail(err, j.report.code, "pin namespaces: %s", step_name(j.report.step));
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return pycri_fail(err, ECHILD, "pin namespaces: child died (status %d)", status);
    return 0;
}

PYCRI_EXPORT int pycri_ns_unpin(const char *path, struct pycri_error *err) {
    if (umount2(path, MNT_DETACH | UMOUNT_NOFOLLOW) < 0 && errno != EINVAL && errno != ENOENT)
        return pycri_fail(err, errno, "umount %s", path);
    if (unlink(path) < 0 && errno != ENOENT)
        return pycri_fail(err, errno, "unlink %s", path);
    return 0;
}

PYCRI_EXPORT int pycri_ns_inode(const char *path, unsigned long long *ino, struct pycri_error *err) {
    struct stat st;
    if (stat(path, &st) < 0)
        return pycri_fail(err, errno, "stat %s", path);
    *ino = (unsigned long long)st.st_ino;
    return 0;
}

PYCRI_EXPORT int pycri_ns_tmpfs(const char *path, unsigned long long size,
                                struct pycri_error *err) {
    char opts[64];
    snprintf(opts, sizeof(opts), "mode=1777,size=%llu", size);
    if (mount("shm", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts) < 0)
        return pycri_fail(err, errno, "mount tmpfs at %s", path);
    return 0;
}

#include <netinet/in.h>
#include <pthread.h>

struct connect_job {
    const char *netns;
    int port, udp, fd, code;
    const char *step;
};

/* setns(CLONE_NEWNET) changes only the calling thread: do it in a thread of our own. */
static void *connect_thread(void *arg) {
    struct connect_job *j = arg;
    int nsfd = open(j->netns, O_RDONLY | O_CLOEXEC);
    if (nsfd < 0) {
        j->code = errno;
        j->step = "open netns";
        return NULL;
    }
    if (setns(nsfd, CLONE_NEWNET) < 0) {
        j->code = errno;
        j->step = "setns";
        close(nsfd);
        return NULL;
    }
    close(nsfd);
    int type = (j->udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_CLOEXEC;
    int fd = socket(AF_INET, type, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)j->port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
        j->fd = fd;
        return NULL;
    }
    if (fd >= 0)
        close(fd);
    /* IPv4 refused: try [::1], as a pod may listen on IPv6 only */
    fd = socket(AF_INET6, type, 0);
    struct sockaddr_in6 sa6 = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)j->port)};
    sa6.sin6_addr = in6addr_loopback;
    if (fd >= 0 && connect(fd, (struct sockaddr *)&sa6, sizeof(sa6)) == 0) {
        j->fd = fd;
        return NULL;
    }
    j->code = errno;
    j->step = "connect";
    if (fd >= 0)
        close(fd);
    return NULL;
}

PYCRI_EXPORT int pycri_ns_connect(const char *netns_path, int port, int udp,
                                  struct pycri_error *err) {
    if (port < 1 || port > 65535)
        return pycri_fail(err, EINVAL, "port %d is out of range", port);
    struct connect_job j = {netns_path, port, udp, -1, 0, ""};
    pthread_t t;
    int rc = pthread_create(&t, NULL, connect_thread, &j);
    if (rc != 0)
        return pycri_fail(err, rc, "pthread_create");
    pthread_join(t, NULL);
    if (j.fd < 0)
        return pycri_fail(err, j.code, "port %d in %s: %s", port, netns_path, j.step);
    return j.fd;
}
