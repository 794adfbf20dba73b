#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

int pycri_fail(struct pycri_error *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
        va_end(ap);
        if (code != 0 && n >= 0 && (size_t)n < sizeof(err->msg)) {
            char buf[128];
            const char *s = strerror_r(code, buf, sizeof(buf));
            snprintf(err->msg + n, sizeof(err->msg) - (size_t)n, ": %s", s);
        }
        err->code = code;
    }
    return code > 0 ? -code : -1;
}
