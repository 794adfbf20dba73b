/* internal.h - helpers for the C core that cffi never sees. */
#ifndef PYCRI_INTERNAL_H
#define PYCRI_INTERNAL_H

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#include "pycri.h"

#define PYCRI_EXPORT __attribute__((visibility("default")))

static inline void pycri__closep(int *fd) {
    if (*fd >= 0) {
        int saved = errno;
        close(*fd);
        errno = saved;
    }
}
static inline void pycri__freep(void *p) { free(*(void **)p); }

/* An fd closed when it goes out of scope; set it to -1 to keep it. */
#define cleanup_fd __attribute__((cleanup(pycri__closep)))
#define cleanup_free __attribute__((cleanup(pycri__freep)))

/* Fill err with code and a formatted message (": strerror(code)" appended when
 * code != 0) and return -code (or -1 when code is 0). */
int pycri_fail(struct pycri_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Take ownership of an fd: returns it and sets the source to -1. */
static inline int pycri_steal_fd(int *fd) {
    int r = *fd;
    *fd = -1;
    return r;
}

/* The launcher half of pycri_launch (launch.c), run by pycri-monitor --launch:
 * returns only after the container started, with argc and argv set to the
 * monitor's command line (monitor_argv + "--adopt" PID) and the monitor's fds at
 * the numbers it names; on any failure it reports and exits. */
void pycri__launcher(int sock, char *title, int *argc, char ***argv);
/* returns only in a forked launcher (launch.c); "--launch FD TITLE" runs it when
 * pycri__is_factory_title(TITLE) */
void pycri__launcher_factory(int sock, char *title, int *argc, char ***argv);
int pycri__is_factory_title(const char *title);
/* The launcher's hold on its container's mount namespace (or -1), which the monitor
 * keeps open until it exits: see launch.c. */
extern int pycri__held_mntns;
/* Called by pycri_spawn in the parent right after the clone, once the container
 * process's pid is known, while the child sets itself up (the launcher reports
 * the pid early and prepares its start socket there); NULL: nothing. */
extern void (*pycri__after_clone)(int pid);
int pycri__read_start_time(int pid, unsigned long long *out);

#endif
