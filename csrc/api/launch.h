/* api/launch.h - containers that outlive the process that created them.
 *
 * A launcher is monitor_argv[0] (pycri-monitor) run as "pycri-monitor --launch 3
 * TITLE" with posix_spawn (vfork + exec: the caller, a big Python process, is
 * never copied), with a socket as fd 3 and /dev/null as stdio. It starts a new
 * session and forks once more (so it is nobody's child but init's), then waits
 * for a request on the socket. pycri_launcher_new() makes one ahead of need (the
 * caller may keep it idle; closing the socket unused makes it exit);
 * pycri_launch() takes one (or makes one when launcher is -1) and sends it the
 * spec (pycri_spec_encode), the start socket path, the monitor argv, and the fds
 * the spec and monitor_fds name (SCM_RIGHTS, renumbered from 4 up). The
 * launcher spawns the container with start_wait (it is the container's parent),
 * listens on a unix socket at start_sock, reports the pids (or the stage and
 * error), and blocks. pycri_launch_start() - from this or any later process -
 * connects to that socket; the launcher releases the container, answers whether
 * execve succeeded, puts monitor_fds back at their original numbers and
 * continues, in the same process, as the monitor: monitor_argv + "--adopt" PID,
 * with the container as its child. The caller closes the launcher socket after
 * pycri_launch returns, whatever it returned. With spec->tty_new the container's
 * pty master (made in its own devpts) is the monitor's too: "--pty-master-fd" N
 * is appended after the pid.
 */

struct pycri_launch_result {
    int monitor_pid;              /* the launcher, later the monitor (same pid) */
    int pid;                      /* the container process */
    unsigned long long start_time; /* of the container, from /proc/<pid>/stat */
    int stage;                    /* PYCRI_STAGE_* on failure */
    /* On success, the held container's start and report sockets (CLOEXEC), or -1:
     * the caller may start it with pycri_spawn_start (which closes both) instead of
     * pycri_launch_start; either way the launcher goes on as the monitor. The caller
     * closes them if it does not start the container itself. */
    int start_fd, report_fd;
};

/* A launcher waiting for a request on *sock_out (CLOEXEC); path is pycri-monitor. */
int pycri_launcher_new(const char *path, int *sock_out, struct pycri_error *err);

/* A launcher factory (a pycri-monitor that forks launchers: cheaper than spawning
 * each), on *sock_out, its pid in *pid_out; pycri_launcher_from_factory asks it for one and sets
 * *sock_out to the new launcher's socket, as pycri_launcher_new would. The
 * factory exits when its socket closes. */
int pycri_launcher_factory_new(const char *path, int *sock_out, int *pid_out,
                               struct pycri_error *err);
int pycri_launcher_from_factory(int factory, int *sock_out, struct pycri_error *err);

/* launcher: from pycri_launcher_new, or -1 for a new one made here. */
int pycri_launch(int launcher, const struct pycri_spawn_spec *spec, const char *start_sock,
                 const char *const *monitor_argv, const int *monitor_fds, int n_monitor_fds,
                 struct pycri_launch_result *res, struct pycri_error *err);

/* Release a launched container; returns once execve succeeded or failed. */
/* pycri_launch in two halves, so the caller can work while the container process
 * sets itself up. pycri_launch_send sends the request (to launcher, or to a new
 * launcher when -1) and sets *sock_out to the socket to wait on (the caller
 * closes it when done). pycri_launch_wait returns 1 for the early report (res has
 * pid, start_time and monitor_pid: the process exists and is setting itself up;
 * not every launch sends one), then 0 for the final success (res complete) or
 * < 0 for the failure. */
int pycri_launch_send(int launcher, const struct pycri_spawn_spec *spec, const char *start_sock,
                      const char *const *monitor_argv, const int *monitor_fds, int n_monitor_fds,
                      int *sock_out, struct pycri_error *err);
int pycri_launch_wait(int sock, struct pycri_launch_result *res, struct pycri_error *err);

int pycri_launch_start(const char *start_sock, int timeout_ms, struct pycri_error *err);

/* A pre-clone: the container process made and set up ahead, before its config is
 * known, as far as a stand-in spec says (every namespace, cgroup and mount, the
 * sysctls, pivot_root), then held. pycri_launch_pre sends spec (the stand-in) to
 * launcher (or a new one from launcher_path when -1; *sock_out is then the
 * socket to it, the caller's to close) and waits until the process is held.
 * pycri_launch_resume_send sends the real spec on that socket (fd_base from
 * the pre-clone's result), after which pycri_launch_wait goes as after
 * pycri_launch_send. What the real spec says about that setup is not looked
 * at (only the namespaces' modes and the rootfs path are checked): the caller
 * resumes only with a spec whose setup is the stand-in's. Closing the socket
 * instead discards the pre-clone: the launcher kills and reaps it, then exits. */
struct pycri_prelaunch {
    int pid;                       /* the held process */
    int monitor_pid;               /* the launcher */
    unsigned long long start_time; /* of the held process */
    int fd_base;                   /* for pycri_launch_resume_send */
    int stage;                     /* PYCRI_STAGE_* on failure */
};
int pycri_launch_pre(int launcher, const char *launcher_path,
                     const struct pycri_spawn_spec *spec, int *sock_out,
                     struct pycri_prelaunch *out, struct pycri_error *err);
int pycri_launch_resume_send(int sock, int fd_base, const struct pycri_spawn_spec *spec,
                             const char *start_sock, const char *const *monitor_argv,
                             const int *monitor_fds, int n_monitor_fds,
                             struct pycri_error *err);

/* The spec as one flat buffer (csrc/specbuf.c). Returns the size it needs and
 * writes it only when that is <= cap (buf may be NULL to ask the size). */
int pycri_spec_encode(const struct pycri_spawn_spec *spec, unsigned char *buf, size_t cap,
                      struct pycri_error *err);
/* Check an encoded buffer (8-byte aligned) and turn it back into a spec whose
 * pointers point into buf (rewritten in place). */
int pycri_spec_decode(unsigned char *buf, size_t len, struct pycri_spawn_spec *out,
                      struct pycri_error *err);
