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
#include <sys/syscall.h>
#include <sys/wait.h>

#include "internal.h"

struct child_report {
    int step;
    int code;
};

enum { STEP_UNSHARE = 1, STEP_HOSTNAME, STEP_LO, STEP_SYSCTL, STEP_PIN_NET, STEP_PIN_IPC,
       STEP_PIN_UTS, STEP_USERNS, STEP_ROOT, STEP_IDMAP, STEP_PIN_USER, STEP_SYNC };

static const char *step_name(int step) {
    switch (step) {
    case STEP_UNSHARE: return "unshare";
    case STEP_HOSTNAME: return "sethostname";
    case STEP_LO: return "bring up lo";
    case STEP_SYSCTL: return "write sysctl";
    case STEP_PIN_NET: return "bind-mount net namespace";
    case STEP_PIN_IPC: return "bind-mount ipc namespace";
    case STEP_PIN_UTS: return "bind-mount uts namespace";
    case STEP_USERNS: return "unshare user namespace";
    case STEP_ROOT: return "become root in the user namespace";
    case STEP_IDMAP: return "write the id maps";
    case STEP_PIN_USER: return "bind-mount user namespace";
    case STEP_SYNC: return "talk to the child";
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
    /* /proc/sys/kernel/domainname belongs to the host's root even in a pod's own
     * uts namespace; the system call only asks for CAP_SYS_ADMIN over it */
    if (strcmp(key, "kernel.domainname") == 0 || strcmp(key, "kernel/domainname") == 0)
        return setdomainname(value, strlen(value));
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
    /* pycri_ns_pin_userns only: the child's ends of the two pipes, and the
     * parent's ends, which the child closes */
    int child_rd, child_wr, parent_rd, parent_wr;
};

static int pin_fail(struct pin_job *j, int step) {
    j->report.step = step;
    j->report.code = errno;
    return 1;
}

/* In the new namespaces: hostname, lo, sysctls. */
static int setup_pinned(struct pin_job *j) {
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
    return 0;
}

/* Runs in a CLONE_VM|CLONE_VFORK child: the caller is suspended until it exits,
 * and it reports by writing into the job, which it shares with the caller. */
static int pin_child(void *arg) {
    struct pin_job *j = arg;
    if (unshare(j->flags) < 0)
        return pin_fail(j, STEP_UNSHARE);
    if (setup_pinned(j))
        return 1;
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

/* The job for pinning the namespaces kinds names (PYCRI_PIN_*) at those paths. */
static struct pin_job pin_job_for(int kinds, const char *net_path, const char *ipc_path,
                                  const char *uts_path, const char *hostname,
                                  const char *sysctls, int nsysctls) {
    struct pin_job j = {.kinds = kinds, .nsysctls = nsysctls, .net_path = net_path,
                        .ipc_path = ipc_path, .uts_path = uts_path, .hostname = hostname,
                        .sysctls = sysctls};
    if (kinds & PYCRI_PIN_NET) j.flags |= CLONE_NEWNET;
    if (kinds & PYCRI_PIN_IPC) j.flags |= CLONE_NEWIPC;
    if (kinds & PYCRI_PIN_UTS) j.flags |= CLONE_NEWUTS;
    return j;
}

PYCRI_EXPORT int pycri_ns_pin(int kinds, const char *net_path, const char *ipc_path,
                              const char *uts_path, const char *hostname, const char *sysctls,
                              int nsysctls, struct pycri_error *err) {
    struct pin_job j = pin_job_for(kinds, net_path, ipc_path, uts_path, hostname, sysctls,
                                   nsysctls);
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

/* ---- pod namespaces owned by a pod user namespace ---------------------------
 *
 * A namespace belongs to the user namespace its creator was in, and only that
 * user namespace's root may mount /proc for a pid namespace, sysfs for a net
 * namespace, mqueue for an IPC namespace. So the pod's user namespace comes
 * first and the other namespaces are made from inside it. The maps of a new
 * user namespace have to be written from its parent, and the pins (bind mounts
 * in the host's mount namespace) need the host's root, so the child here is a
 * plain fork (own memory, own errno) that talks to us over two pipes:
 *   child: unshare(USER) -> 'u'; wait for 'g'; become uid 0; unshare the rest;
 *          hostname, lo, sysctls (as the pod's root: the kernel's ownership rules
 *          for namespaced sysctls apply) -> report; wait for EOF; exit
 *   parent: on 'u' write uid_map/gid_map -> 'g'; on a clean report bind-mount
 *          /proc/<child>/ns/{user,net,ipc,uts} onto the files; close -> EOF.
 */

struct userns_msg {
    char phase; /* 'u' user namespace made, 'd' done (report says how) */
    struct child_report report;
};

static void userns_send(struct pin_job *j, char phase) {
    struct userns_msg m;
    memset(&m, 0, sizeof(m));
    m.phase = phase;
    m.report = j->report;
    while (write(j->child_wr, &m, sizeof(m)) < 0 && errno == EINTR)
        ;
}

static int userns_child(void *arg) {
    struct pin_job *j = arg;
    char c = 0;
    close(j->parent_rd);
    close(j->parent_wr);
    if (unshare(CLONE_NEWUSER) < 0) {
        pin_fail(j, STEP_USERNS);
        goto out;
    }
    userns_send(j, 'u');
    ssize_t n;
    while ((n = read(j->child_rd, &c, 1)) < 0 && errno == EINTR)
        ;
    if (n != 1 || c != 'g')
        _exit(1); /* the parent gave up (it reports its own error) */
    /* raw system calls: glibc's set*id would signal threads this copy lacks */
    if (syscall(SYS_setresgid, 0, 0, 0) < 0 || syscall(SYS_setresuid, 0, 0, 0) < 0) {
        pin_fail(j, STEP_ROOT);
        goto out;
    }
    if (unshare(j->flags) < 0) {
        pin_fail(j, STEP_UNSHARE);
        goto out;
    }
    setup_pinned(j);
out:
    userns_send(j, 'd');
    /* keep the namespaces alive until the parent has pinned them (EOF) */
    while (read(j->child_rd, &c, 1) < 0 && errno == EINTR)
        ;
    _exit(j->report.step ? 1 : 0);
}

static int userns_recv(int fd, struct userns_msg *m) {
    ssize_t n;
    while ((n = read(fd, m, sizeof(*m))) < 0 && errno == EINTR)
        ;
    if (n != (ssize_t)sizeof(*m)) {
        errno = n < 0 ? errno : EPIPE;
        return -1;
    }
    return 0;
}

static int write_map(int pid, const char *file, unsigned int inside, unsigned int outside,
                     unsigned int count) {
    char path[64], line[96];
    snprintf(path, sizeof(path), "/proc/%d/%s", pid, file);
    int n = snprintf(line, sizeof(line), "%u %u %u\n", inside, outside, count);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t w = write(fd, line, (size_t)n);
    int saved = errno;
    close(fd);
    errno = saved;
    return w == n ? 0 : -1;
}

static int bind_ns(int pid, const char *kind, const char *path) {
    char src[64];
    snprintf(src, sizeof(src), "/proc/%d/ns/%s", pid, kind);
    return mount(src, path, NULL, MS_BIND, NULL);
}

PYCRI_EXPORT int pycri_ns_pin_userns(const char *user_path, const struct pycri_idmap *map,
                                     int kinds, const char *net_path, const char *ipc_path,
                                     const char *uts_path, const char *hostname,
                                     const char *sysctls, int nsysctls,
                                     struct pycri_error *err) {
    if (!user_path || !map || !map->uid_count || !map->gid_count)
        return pycri_fail(err, EINVAL, "pin user namespace: a path and both id maps are needed");
    struct pin_job j = pin_job_for(kinds, net_path, ipc_path, uts_path, hostname, sysctls,
                                   nsysctls);
    int to_child[2], from_child[2];
    if (pipe2(to_child, O_CLOEXEC) < 0)
        return pycri_fail(err, errno, "pin user namespace: pipe");
    if (pipe2(from_child, O_CLOEXEC) < 0) {
        int e = errno;
        close(to_child[0]);
        close(to_child[1]);
        return pycri_fail(err, e, "pin user namespace: pipe");
    }
    j.child_rd = to_child[0];
    j.child_wr = from_child[1];
    j.parent_rd = from_child[0];
    j.parent_wr = to_child[1];
    const size_t stack_size = 64 << 10;
    cleanup_free char *stack = malloc(stack_size);
    if (!stack) {
        close(to_child[0]); close(to_child[1]); close(from_child[0]); close(from_child[1]);
        return pycri_fail(err, ENOMEM, "pin user namespace: stack");
    }
    /* A copy of the caller (no CLONE_VM: it runs alongside us and must not share
     * our memory or errno), made by a raw clone so no fork handlers run. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t pid = clone(userns_child, stack + stack_size, SIGCHLD, &j);
    int clone_errno = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(j.child_rd);
    close(j.child_wr);
    if (pid < 0) {
        close(j.parent_rd);
        close(j.parent_wr);
        return pycri_fail(err, clone_errno, "pin user namespace: clone");
    }
    struct userns_msg m;
    int step = 0, code = 0, pinned = 0;
    if (userns_recv(j.parent_rd, &m) < 0) {
        step = STEP_SYNC, code = errno;
    } else if (m.phase != 'u') {
        step = m.report.step, code = m.report.code;
    } else if (write_map(pid, "uid_map", map->uid_inside, map->uid_outside, map->uid_count) < 0 ||
               write_map(pid, "gid_map", map->gid_inside, map->gid_outside, map->gid_count) < 0) {
        step = STEP_IDMAP, code = errno;
    } else if (write(j.parent_wr, "g", 1) != 1 || userns_recv(j.parent_rd, &m) < 0) {
        step = STEP_SYNC, code = errno;
    } else if (m.report.step) {
        step = m.report.step, code = m.report.code;
    } else {
        struct { int bit; const char *kind, *path; int step; } pins[4] = {
            {-1, "user", user_path, STEP_PIN_USER},
            {PYCRI_PIN_NET, "net", net_path, STEP_PIN_NET},
            {PYCRI_PIN_IPC, "ipc", ipc_path, STEP_PIN_IPC},
            {PYCRI_PIN_UTS, "uts", uts_path, STEP_PIN_UTS},
        };
        for (int i = 0; i < 4 && !step; i++) {
            if (pins[i].bit > 0 && !(kinds & pins[i].bit))
                continue;
            if (bind_ns(pid, pins[i].kind, pins[i].path) < 0)
                step = pins[i].step, code = errno;
            else
                pinned = 1;
        }
    }
    close(j.parent_wr); /* EOF (or no 'g'): the child exits */
    close(j.parent_rd);
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (!step)
        return 0;
    if (pinned) {
        umount2(user_path, MNT_DETACH);
        if (net_path) umount2(net_path, MNT_DETACH);
        if (ipc_path) umount2(ipc_path, MNT_DETACH);
        if (uts_path) umount2(uts_path, MNT_DETACH);
    }
    if (step >= STEP_SYSCTL * 1000)
        return pycri_fail(err, code, "pin namespaces: write sysctl #%d", step - STEP_SYSCTL * 1000);
    return pycri_fail(err, code, "pin namespaces: %s", step_name(step));
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
