/* api/ns.h - pod namespaces pinned to files, so no infra process is needed. */

#define PYCRI_PIN_NET 1
#define PYCRI_PIN_IPC 2
#define PYCRI_PIN_UTS 4

/* Create new namespaces of the kinds in `kinds` (PYCRI_PIN_*) in a short-lived child
 * and bind-mount each onto its path (an existing empty file) so it outlives the
 * child. In the new namespaces the child also sets `hostname` (uts), brings up
 * `lo` (net), and writes `nsysctls` sysctls given as "key\0value\0..." pairs of
 * already validated names. Returns 0 or -errno with err naming the failed step. */
int pycri_ns_pin(int kinds, const char *net_path, const char *ipc_path, const char *uts_path,
                 const char *hostname, const char *sysctls, int nsysctls,
                 struct pycri_error *err);

/* One uid and one gid mapping of a user namespace (inside, outside, count). */
struct pycri_idmap {
    unsigned int uid_inside, uid_outside, uid_count;
    unsigned int gid_inside, gid_outside, gid_count;
};

/* Like pycri_ns_pin, but first a new user namespace with `map`, pinned at
 * user_path; the other namespaces are created from inside it (so it owns them),
 * and hostname, lo and the sysctls are set there by its root (uid 0 inside), so
 * the kernel's rules for what that root may change apply. The parent writes the
 * maps and makes the pins. On failure nothing stays pinned. */
int pycri_ns_pin_userns(const char *user_path, const struct pycri_idmap *map, int kinds,
                        const char *net_path, const char *ipc_path, const char *uts_path,
                        const char *hostname, const char *sysctls, int nsysctls,
                        struct pycri_error *err);

/* Detach the mount that pins a namespace and remove the file; missing is not an error. */
int pycri_ns_unpin(const char *path, struct pycri_error *err);

/* The inode number of the namespace pinned at path (or /proc/PID/ns/KIND). */
int pycri_ns_inode(const char *path, unsigned long long *ino, struct pycri_error *err);

/* Mount a fresh tmpfs (mode 1777, nosuid, nodev, noexec) of `size` bytes at path:
 * the pod's /dev/shm, shared by its containers. */
int pycri_ns_tmpfs(const char *path, unsigned long long size, struct pycri_error *err);

/* A TCP (or UDP when udp != 0) socket connected to 127.0.0.1:port (or [::1]) inside
 * the network namespace pinned at netns_path, made by a short-lived thread that
 * enters it; the socket stays in that namespace. Returns the fd (CLOEXEC). */
int pycri_ns_connect(const char *netns_path, int port, int udp, struct pycri_error *err);
