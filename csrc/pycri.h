/* pycri.h - the boundary between Python and the C core.
 *
 * Plain declarations only: this text (with the api/ headers inlined) is also the
 * cffi cdef. Conventions:
 *   - exported functions are pycri_<noun>_<verb>(..., struct pycri_error *err);
 *   - they return int, >= 0 on success, < 0 on failure with err filled at the
 *     failure site: code = errno, msg names the syscall and the path;
 *   - structs are fixed size and owned by the caller; no heap memory crosses
 *     the boundary and nothing needs freeing by Python.
 */
#ifndef PYCRI_H
#define PYCRI_H

#define PYCRI_ERRMSG_LEN 512

struct pycri_error {
    int code;                     /* errno value, or 0 */
    char msg[512];                /* human-readable, names syscall and path */
};

#include "api/digest.h"
#include "api/layer.h"
#include "api/spawn.h"
#include "api/mount.h"
#include "api/cgroup.h"
#include "api/monitor.h"
#include "api/ns.h"
#include "api/launch.h"
#include "api/h2.h"

#endif
