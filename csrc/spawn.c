/* spawn.c - create a container process, the parent's side: plan it (open the
 * namespaces to join, the cgroup files, the sysctls), clone3 into new
 * namespaces (or setns into given ones), write id maps and cgroups while the
 * child waits when it must, and hear how the child's setup went. The child's
 * side, from the clone to execve, is spawn_child.c (and mount.c).
 *
 * Parent and child talk over a SOCK_SEQPACKET socketpair (CLOEXEC). The child
 * sends SETUP (and waits for GO), PID (when an intermediate process forked the
 * real one), TTY (tty_new: the pty master as SCM_RIGHTS), READY (right before
 * waiting for start / execve) or ERROR with (stage, errno, text). EOF after
 * READY means execve succeeded.
 */
#include <fcntl.h>
#include <limits.h>
#include <linux/capability.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <linux/magic.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "spawn_child.h"


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


const int pycri__ns_flag[PYCRI_NS_COUNT] = {CLONE_NEWUSER, CLONE_NEWNS,  CLONE_NEWPID,
                                           CLONE_NEWUTS,  CLONE_NEWIPC, CLONE_NEWNET,
                                           CLONE_NEWCGROUP};
const char *const pycri__ns_name[PYCRI_NS_COUNT] = {"user", "mnt", "pid", "uts",
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

/* ============================== parent ===================================== */

static int write_file(const char *path, const char *data) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = pycri__write_all(fd, data, strlen(data));
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
    int k;
    *fd = -1;
    return pycri__recv_fds(sock, m, sizeof(*m), fd, 1, &k);
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
                              s->ns_mode[k], pycri__ns_name[k]);
        if (s->ns_mode[k] != PYCRI_NS_JOIN)
            continue;
        const char *path = s->ns_path[k];
        char bypid[64];
        if (!path) {
            if (target_pid <= 0 && (target_pid = pidfd_pid(s->join_pidfd)) <= 0)
                return pycri_fail(err, target_pid < 0 ? -target_pid : EINVAL,
                                  "prepare: no path to join the %s namespace and no usable "
                                  "join_pidfd", pycri__ns_name[k]);
            snprintf(bypid, sizeof(bypid), "/proc/%d/ns/%s", target_pid, pycri__ns_name[k]);
            path = bypid;
        }
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return pycri_fail(err, errno, "prepare: open %s", path);
        plan->ns_fd[k] = fd;
        /* joining the namespace we are already in is a no-op (and EINVAL for user) */
        char self[64];
        struct stat a, b;
        snprintf(self, sizeof(self), "/proc/self/ns/%s", pycri__ns_name[k]);
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
            if (setns(plan->ns_fd[k], pycri__ns_flag[k]) < 0)
                return pycri_fail(err, errno, "prepare: setns into the %s namespace",
                                  pycri__ns_name[k]);
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
    if (s->dev_premounted && (!s->rootfs || !s->mount_dev || s->dev_mount_fd < 0 ||
                              s->ns_mode[PYCRI_NS_USER] != PYCRI_NS_HOST))
        return pycri_fail(err, EINVAL, "prepare: a premounted /dev needs a rootfs with "
                                       "mount_dev, its fd, and no user namespace");
    if (s->rootfs_premounted && (!s->rootfs || s->rootfs_mount_fd < 0 ||
                                 s->ns_mode[PYCRI_NS_USER] != PYCRI_NS_HOST))
        return pycri_fail(err, EINVAL, "prepare: a premounted rootfs needs a rootfs path, its "
                                       "fd, and no user namespace");
    if (s->pause_after_setup &&
        (!s->rootfs || !s->mount_proc || !s->start_wait || !s->join_in_caller ||
         s->ns_mode[PYCRI_NS_USER] != PYCRI_NS_HOST))
        return pycri_fail(err, EINVAL, "prepare: pausing after the setup needs a rootfs, /proc, "
                                       "start_wait, the launcher and no user namespace");
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
        } else if (m.kind == MSG_READY || m.kind == MSG_PAUSED) {
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
    /* A pre-clone joins its late cgroups (those accounting memory and pids: held, it
     * must not count in the pod's usage and limits) only when resumed, by writing
     * "0" to their v1 tasks files: that moves the one thread without the global
     * threadgroup lock, whose first writer after a quiet spell waits an RCU grace
     * period (~10 ms here); a v2 cgroup.procs write would take it. */
    for (int i = plan.n_cg - s->cgroup_late; rc == 0 && s->pause_after_setup && i < plan.n_cg;
         i++)
        if (i < 0 || plan.cg_tasks_fd[i] < 0)
            rc = pycri_fail(err, EINVAL, "prepare: a late cgroup must be a v1 hierarchy: %s",
                            i < 0 ? "(count)" : s->cgroup_procs[i]);
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
            flags |= pycri__ns_flag[k];
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
        pycri__child_main(&plan, two_step);
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

int pycri__spawn_resume(const struct pycri_spawn_spec *s, const unsigned char *specbuf,
                        size_t spec_len, struct pycri_spawn_result *res, struct pycri_error *err) {
    res->stage = PYCRI_STAGE_PREPARE;
    /* the memfd with the spec first, then the fds it names (field order) */
    int fds[PYCRI_RESUME_MAX_FDS];
    int n = 1;
    int *fields[PYCRI_SPEC_FD_FIELDS_MAX];
    int nf = pycri__spec_fd_fields(s, fields);
    for (int i = 0; i < nf; i++) {
        if (*fields[i] < 0)
            continue;
        if (n == PYCRI_RESUME_MAX_FDS)
            return pycri_fail(err, EMFILE, "resume: more than %d fds for the container",
                              PYCRI_RESUME_MAX_FDS - 1);
        fds[n++] = *fields[i];
    }
    int memfd = (int)syscall(SYS_memfd_create, "pycri-spec", 1 /* MFD_CLOEXEC */);
    if (memfd < 0)
        return pycri_fail(err, errno, "resume: memfd_create");
    if (pycri__write_all(memfd, (const char *)specbuf, spec_len) < 0) {
        close(memfd);
        return pycri_fail(err, errno, "resume: write the spec");
    }
    fds[0] = memfd;
    struct msg m;
    memset(&m, 0, sizeof(m));
    m.kind = MSG_RESUME;
    m.pid = (int)spec_len;
    ssize_t w = pycri__send_fds(res->report_fd, &m, sizeof(m), fds, n);
    int werr = errno;
    close(memfd);
    struct parent_state st = {.first_pid = res->pid, .final_pid = res->pid,
                              .first_pidfd = -1, .two_step = 0, .tty_master = -1};
    int stage = PYCRI_STAGE_NONE;
    int rc;
    if (w != (ssize_t)sizeof(m)) {
        stage = PYCRI_STAGE_CLONE;
        rc = pycri_fail(err, werr, "resume: the prepared container process is gone");
    } else {
        rc = converse(NULL, NULL, res->report_fd, &st, 1, &stage, err);
    }
    if (rc == 0 && s->tty_new && st.tty_master < 0) {
        stage = PYCRI_STAGE_TTY;
        rc = pycri_fail(err, EPROTO, "tty: the container process sent no pty master");
    }
    if (rc < 0) {
        if (st.tty_master >= 0)
            close(st.tty_master);
        reap(&st, 1);
        res->stage = stage;
        return rc;
    }
    res->tty_master = st.tty_master;
    res->stage = PYCRI_STAGE_NONE;
    return 0;
}
