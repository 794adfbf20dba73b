/* api/spawn.h - create a container process from one caller-prepared spec.
 *
 * See pycri.h for the conventions. Every pointer in the spec is owned by the
 * caller and must stay valid for the duration of the call (the child reads its
 * copy-on-write image of them). Lists are NULL-terminated string arrays, or an
 * array plus a count. A zeroed spec plus argv, with stdio[] and tty_fd set to
 * -1, is a process in all of the caller's namespaces, uid/gid 0, no
 * capabilities (bounding set empty) and stdio on /dev/null.
 *
 * Order in the child: enter the v1 cgroups, join namespaces (the user
 * namespace last: the others are joined with the host's privileges), create
 * the new ones (so a joined user namespace owns them) (the cgroup namespace last, once every cgroup of
 * cgroup_procs is entered and the parent has written the id maps), setresuid(0) in a user namespace, oom_score_adj,
 * mounts (rootfs, /proc, sysctls, /sys, /dev, binds, /etc files, masked and
 * read-only paths, pivot_root), hostname, the own pty (tty_new), new session,
 * stdio and kept fds (everything else CLOEXEC), tty, working dir, read-only rootfs, rlimits,
 * seccomp (here when no_new_privs is off), groups/gid, bounding set, uid,
 * capsets, ambient, no_new_privs, seccomp (here when it is on), $PATH lookup,
 * then (start_wait) the wait for start, then execve.
 *
 * Capabilities: for uid 0 the kernel recomputes the sets at execve, so the
 * program ends up with permitted = effective = cap_bounding (plus inheritable);
 * give all three the same set for root. The process is not dumpable from clone
 * to execve (so not ptraceable and /proc/<pid>/ files stay root's). Signal
 * dispositions are reset to default and the mask cleared at execve.
 *
 * Joining a user namespace (a pod's) with a rootfs: the parent, as the host's
 * root, first makes every mount the child needs as a detached tree (userns.c):
 * the overlay with its lower layers id-mapped to that user namespace (upper and
 * work as given: make them owned by the mapped root), the bind sources (id-mapped
 * per pycri_bind.idmap), shm_path and the /etc files; the child attaches them.
 * So sources need not be reachable by the mapped root. rshared is refused there.
 *
 * Exec into a running container: ns_mode JOIN with /proc/<pid>/ns/<kind> for
 * every kind (kinds already shared with the caller are skipped), cgroup_procs
 * of its cgroups, no rootfs; the cwd is then resolved inside its root.
 */

/* Namespace kinds: index into ns_mode[] / ns_path[]. */
#define PYCRI_NS_USER 0
#define PYCRI_NS_MNT 1
#define PYCRI_NS_PID 2
#define PYCRI_NS_UTS 3
#define PYCRI_NS_IPC 4
#define PYCRI_NS_NET 5
#define PYCRI_NS_CGROUP 6
#define PYCRI_NS_COUNT 7

/* ns_mode[] values: stay in the caller's namespace, a fresh one, or setns into
 * ns_path[kind] (/proc/PID/ns/x or a pinned file). */
#define PYCRI_NS_HOST 0
#define PYCRI_NS_NEW 1
#define PYCRI_NS_JOIN 2

/* Propagation for "/" (root_propagation) and for bind mounts. */
#define PYCRI_PROP_PRIVATE 0
#define PYCRI_PROP_RSLAVE 1
#define PYCRI_PROP_RSHARED 2

/* Stages reported in pycri_spawn_result.stage (and named in err->msg). */
#define PYCRI_STAGE_NONE 0
#define PYCRI_STAGE_PREPARE 1
#define PYCRI_STAGE_CLONE 2
#define PYCRI_STAGE_NAMESPACE 3
#define PYCRI_STAGE_IDMAP 4
#define PYCRI_STAGE_CGROUP 5
#define PYCRI_STAGE_ROOTFS 6
#define PYCRI_STAGE_MOUNT 7
#define PYCRI_STAGE_PIVOT 8
#define PYCRI_STAGE_HOSTNAME 9
#define PYCRI_STAGE_SYSCTL 10
#define PYCRI_STAGE_RLIMIT 11
#define PYCRI_STAGE_OOM 12
#define PYCRI_STAGE_FDS 13
#define PYCRI_STAGE_TTY 14
#define PYCRI_STAGE_CWD 15
#define PYCRI_STAGE_USER 16
#define PYCRI_STAGE_CAPS 17
#define PYCRI_STAGE_SECCOMP 18
#define PYCRI_STAGE_EXEC 19
#define PYCRI_STAGE_START 20

/* pycri_bind.idmap: whether a bind into a joined user namespace is id-mapped to it. */
#define PYCRI_IDMAP_NONE 0
#define PYCRI_IDMAP_AUTO 1         /* where the source's filesystem allows it */
#define PYCRI_IDMAP_REQUIRE 2      /* or fail */

struct pycri_bind {
    const char *source;        /* host path; symlinks resolved on the host; must exist */
    const char *target;        /* path inside the rootfs, resolved in-root; created if missing */
    int readonly;              /* top mount read-only */
    int recursive_readonly;    /* every submount read-only (mount_setattr AT_RECURSIVE) */
    int nonrecursive;          /* plain bind instead of rbind */
    int propagation;           /* PYCRI_PROP_* */
    int idmap;                 /* PYCRI_IDMAP_*; only when joining a user namespace */
};

struct pycri_rlimit {
    int resource;              /* RLIMIT_* number */
    unsigned long long soft;   /* ~0ULL = infinity */
    unsigned long long hard;
};

struct pycri_spawn_spec {
    /* --- process --- */
    const char *const *argv;   /* NULL-terminated; argv[0] is looked up in $PATH when it has no '/' */
    const char *const *envp;   /* NULL-terminated; PATH here drives the lookup */
    const char *exec_path;     /* optional: execute this instead of looking up argv[0] */
    const char *cwd;           /* NULL = "/"; resolved in-root, created (0755) if missing */
    unsigned int uid;
    unsigned int gid;
    const unsigned int *groups;/* supplementary groups */
    int n_groups;
    /* capability sets as bit masks (bit n = capability n) */
    unsigned long long cap_bounding;
    unsigned long long cap_effective;
    unsigned long long cap_permitted;
    unsigned long long cap_inheritable;  /* ORed with cap_ambient (ambient needs inheritable) */
    unsigned long long cap_ambient;
    int no_new_privs;
    const unsigned char *seccomp_bpf;    /* struct sock_filter[], 8 bytes each; NULL = none */
    unsigned int seccomp_len;            /* number of instructions */
    const struct pycri_rlimit *rlimits;
    int n_rlimits;
    int set_oom_score_adj;
    int oom_score_adj;         /* written as given: the caller clamps (negative needs CAP_SYS_RESOURCE) */
    const char *hostname;      /* needs ns_mode[UTS] == NEW */
    const char *const *sysctls;/* "key=value", key dotted (net.ipv4.ip_forward); caller validates policy */
    int parent_death_signal;   /* 0 = none */

    /* --- stdio and fds --- */
    int stdio[3];              /* fds for 0,1,2 in the caller; -1 = /dev/null */
    int tty_fd;                /* pty slave: new session, controlling tty, and 0/1/2 where stdio is -1; -1 = none */
    int tty_new;               /* instead of tty_fd: a pty of the container's own devpts (needs
                                * rootfs and mount_dev); the child opens /dev/pts/ptmx after
                                * pivot_root, keeps the slave as its tty (as tty_fd would be)
                                * and passes the master back: pycri_spawn_result.tty_master */
    const int *keep_fds;       /* passed to the container as 3, 4, ... in this order */
    int n_keep_fds;

    /* --- namespaces --- */
    int ns_mode[7];            /* PYCRI_NS_HOST / NEW / JOIN per PYCRI_NS_* kind */
    const char *ns_path[7];    /* for JOIN; NULL = the namespace of join_pidfd's process */
    int join_pidfd;            /* pidfd of a running container for JOIN without a path
                                * (race-free against pid reuse); -1 = none */
    /* one uid and one gid mapping, used when ns_mode[USER] == NEW */
    unsigned int uid_map_inside, uid_map_outside, uid_map_count;
    unsigned int gid_map_inside, gid_map_outside, gid_map_count;

    /* --- cgroups --- */
    const char *const *cgroup_procs;  /* absolute cgroup.procs paths of the cgroups it runs in;
                                       * v1 ones are entered by the child writing 0 to the
                                       * dir's "tasks", one v2 one by CLONE_INTO_CGROUP, the
                                       * rest by the parent writing the pid here */
    int cgroup_late;                  /* with pause_after_setup: the last this many (those
                                       * that account memory and pids, where a held
                                       * process must not count; v1 only) are joined
                                       * when resumed, the others at clone */

    /* --- rootfs (only with ns_mode[MNT] == NEW) --- */
    const char *rootfs;        /* target dir; NULL = no rootfs setup (keep the host view) */
    const char *overlay_lower; /* colon list, top first; NULL = bind rootfs onto itself */
    const char *overlay_upper;
    const char *overlay_work;
    /* 1 = rootfs_mount_fd is that overlay already made (pycri_overlay_premount, a
     * detached mount): the child attaches it at rootfs instead of mounting one */
    int rootfs_premounted;
    int rootfs_mount_fd;
    int rootfs_readonly;
    int root_propagation;      /* PYCRI_PROP_*: what "/" becomes first */
    int mount_proc;            /* /proc */
    int mount_sys;             /* /sys read-only (ro rbind of host /sys when the net ns is the host's) */
    int sys_writable;          /* /sys read-write instead (privileged) */
    int mount_dev;             /* /dev tmpfs, nodes, pts, shm, mqueue, links */
    /* 1 = dev_mount_fd is that tmpfs already made, with its nodes and links
     * (pycri_dev_premount, detached): attached instead of made (no user namespace) */
    int dev_premounted;
    int dev_mount_fd;
    int host_devices;          /* with mount_dev: every char and block node of the host's /dev
                                * too, at the same path (privileged); names the container's /dev
                                * has already, console, and other filesystems under /dev are skipped */
    const char *shm_path;      /* bind this host dir at /dev/shm instead of a fresh tmpfs */
    unsigned long long shm_size; /* bytes for a fresh /dev/shm; 0 = 64 MiB */
    const char *etc_hostname;  /* host files bind-mounted at /etc/hostname, /etc/hosts, /etc/resolv.conf */
    const char *etc_hosts;
    const char *etc_resolv;
    const struct pycri_bind *binds;
    int n_binds;
    const char *const *masked_paths;    /* /dev/null over files, ro tmpfs over dirs; missing skipped */
    const char *const *readonly_paths;  /* ro rbind onto themselves; missing skipped */

    /* --- lifecycle --- */
    int start_wait;            /* 1 = stop right before execve until pycri_spawn_start */
    /* 1 = the caller is a throwaway process (the launcher): without user namespaces,
     * it setns's itself into the net, ipc, uts and pid namespaces to join, so the
     * container is one clone away instead of a clone, a setns and a second fork.
     * Not carried by pycri_spec_encode: the launcher sets it. */
    int join_in_caller;
    /* 1 = stop once the setup is done (namespaces, cgroups, every mount, the
     * sysctls, pivot_root) and wait for the rest of the spec on the report
     * socket: the launcher's pre-clone (api/launch.h). Set by the launcher;
     * needs a rootfs, /proc, start_wait, no user namespace and join_in_caller. */
    int pause_after_setup;
};

struct pycri_spawn_result {
    int pid;                   /* in the caller's pid namespace; the caller's child: reap it */
    int pidfd;                 /* CLOEXEC pidfd of pid, -1 if unavailable */
    int stage;                 /* PYCRI_STAGE_* that failed, 0 on success */
    unsigned long long start_time;  /* field 22 of /proc/<pid>/stat (clock ticks since boot) */
    int start_fd;              /* start_wait only: the start socket (CLOEXEC), else -1 */
    int report_fd;             /* start_wait only: the report socket (CLOEXEC), else -1 */
    int tty_master;            /* tty_new only: the pty master (CLOEXEC), else -1 */
};

/* Create the process. On failure nothing is left behind: the child (if any) is
 * killed and reaped; res->stage says where it failed. */
int pycri_spawn(const struct pycri_spawn_spec *spec, struct pycri_spawn_result *res,
                struct pycri_error *err);

/* Release a process created with start_wait: sends one byte on start_fd, then
 * waits on report_fd until execve succeeded (EOF) or the child reports a failure.
 * Closes both fds. Does not reap: on failure the caller still waits for pid. */
int pycri_spawn_start(int start_fd, int report_fd, struct pycri_error *err);
