/* api/launch.h - containers that outlive the process that created them.
 *
 * pycri_launch() forks a detached intermediate (double fork + setsid, so it is
 * nobody's child but init's). The intermediate spawns the container with
 * start_wait (it is the container's parent), listens on a unix socket at
 * start_sock, reports the pids to the caller, and blocks. pycri_launch_start()
 * - from this or any later process - connects to that socket; the
 * intermediate releases the container, answers whether execve succeeded, and
 * then becomes the monitor: execv(monitor_argv + "--adopt" PID), keeping only
 * the fds in monitor_fds (made inheritable) and the container as its child.
 */

struct pycri_launch_result {
    int monitor_pid;              /* the intermediate, later the monitor (same pid) */
    int pid;                      /* the container process */
    unsigned long long start_time; /* of the container, from /proc/<pid>/stat */
    int stage;                    /* PYCRI_STAGE_* on failure */
};

int pycri_launch(const struct pycri_spawn_spec *spec, const char *start_sock,
                 const char *const *monitor_argv, const int *monitor_fds, int n_monitor_fds,
                 struct pycri_launch_result *res, struct pycri_error *err);

/* Release a launched container; returns once execve succeeded or failed. */
int pycri_launch_start(const char *start_sock, int timeout_ms, struct pycri_error *err);
