/* api/cgroup.h - cgroup v1 / v2 file access; see pycri.h for the conventions.
 *
 * Mechanism only: Python (pycri/cgroup.py) decides paths and values. Every file
 * name is resolved beneath a cgroup directory fd with openat2(RESOLVE_BENEATH |
 * RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS), so a hostile key such as
 * "../cgroup.procs" fails with EXDEV instead of escaping the cgroup.
 */

#define PYCRI_CGROUP_UNKNOWN 0
#define PYCRI_CGROUP_V1 1
#define PYCRI_CGROUP_V2 2

/* Filesystem kind of path: PYCRI_CGROUP_V2 (cgroup2fs), PYCRI_CGROUP_V1 (cgroupfs)
 * or PYCRI_CGROUP_UNKNOWN (anything else, e.g. the tmpfs of a hybrid host). */
int pycri_cgroup_fstype(const char *path, struct pycri_error *err);

/* Open a cgroup directory (O_DIRECTORY | O_CLOEXEC); returns the fd. */
int pycri_cgroup_open(const char *path, struct pycri_error *err);

/* Write len bytes of value to the file name beneath dirfd in ONE write(2) (the
 * kernel parses each write as a whole). Returns 0. */
int pycri_cgroup_write(int dirfd, const char *name, const char *value, size_t len,
                       struct pycri_error *err);

/* Write n (name, value) pairs in order, stopping at the first failure; on failure
 * *failed is the index that failed (on success it is n). */
int pycri_cgroup_write_batch(int dirfd, const char **names, const char **values, int n,
                             int *failed, struct pycri_error *err);

/* Read up to cap-1 bytes of the file name beneath dirfd into buf, NUL-terminated.
 * Returns the byte count; a file larger than cap-1 fails with EFBIG. */
int pycri_cgroup_read(int dirfd, const char *name, char *buf, size_t cap,
                      struct pycri_error *err);

/* SIGKILL every process in the cgroup at procs_dirfd and wait until its
 * cgroup.procs is empty (up to timeout_ms). v2: cgroup.kill when the kernel has it,
 * else cgroup.freeze around the kill loop. v1: freezer_dirfd (or -1) is frozen
 * around each pass so nothing forks between the read and the kill. Returns the
 * number of signals sent; ETIMEDOUT when processes remain. */
int pycri_cgroup_kill(int procs_dirfd, int freezer_dirfd, int v2, int timeout_ms,
                      struct pycri_error *err);

/* rmdir path, retrying EBUSY (tasks still exiting) for up to timeout_ms; a path
 * that is already gone is success. */
int pycri_cgroup_rmdir(const char *path, int timeout_ms, struct pycri_error *err);
