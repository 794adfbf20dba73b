/* monitor_log.h - the CRI log writer of pycri-monitor (private; included once,
 * by main_monitor.c).
 *
 * One record per line: "<time> <stream> <P|F> <content>\n". A line is written
 * straight from the read buffer when it is complete; otherwise its bytes wait in
 * the stream's pend buffer until the newline, until max_line bytes (then a P
 * record), or until CRI_PARTIAL_FLUSH_MS of silence / the end (a P record).
 */
#ifndef PYCRI_MONITOR_LOG_H
#define PYCRI_MONITOR_LOG_H

#include <sys/uio.h>

#include "monitor_util.h"

#define CRI_PARTIAL_FLUSH_MS 200

struct stream {
    int fd;           /* read end, -1 when closed */
    const char *name; /* "stdout" / "stderr" */
    int frame;        /* FR_STDOUT / FR_STDERR */
    char *pend;       /* partial line, up to max_line bytes */
    size_t plen;
    long long pend_since;
};

struct cri_log {
    int fd;
    const char *path;
    size_t max_line;
};

static struct cri_log crilog = {.fd = -1, .path = NULL, .max_line = 16384};

static void open_log(int fatal) {
    int fd = open(crilog.path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0640);
    if (fd < 0) {
        if (fatal)
            die("open log %s", crilog.path, errno);
        return; /* keep writing to the old file rather than nowhere */
    }
    if (crilog.fd >= 0)
        close(crilog.fd);
    crilog.fd = fd;
}

/* "2026-01-02T03:04:05.123456789Z" (30 bytes) */
static size_t format_time(char *out, long long ns) {
    time_t secs = (time_t)(ns / 1000000000LL);
    struct tm tm;
    gmtime_r(&secs, &tm);
    size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
    return n + (size_t)snprintf(out + n, 16, ".%09lldZ", ns % 1000000000LL);
}

static void log_record(struct stream *s, int full, const char *data, size_t len) {
    if (crilog.fd < 0)
        return;
    char head[64];
    size_t n = format_time(head, real_ns());
    n += (size_t)snprintf(head + n, sizeof(head) - n, " %s %c ", s->name, full ? 'F' : 'P');
    struct iovec iov[3] = {{head, n}, {(void *)data, len}, {"\n", 1}};
    size_t total = n + len + 1;
    int i = 0;
    while (total) {
        ssize_t w = writev(crilog.fd, iov + i, 3 - i);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return; /* disk full etc.: drop the record, keep the container going */
        total -= (size_t)w;
        while (i < 3 && (size_t)w >= iov[i].iov_len) {
            w -= (ssize_t)iov[i].iov_len;
            i++;
        }
        if (i < 3) {
            iov[i].iov_base = (char *)iov[i].iov_base + w;
            iov[i].iov_len -= (size_t)w;
        }
    }
}

static void flush_partial(struct stream *s) {
    if (s->plen) {
        log_record(s, 0, s->pend, s->plen);
        s->plen = 0;
    }
}

/* Append bytes that belong to the current line, cutting P records at max_line. */
static void line_append(struct stream *s, const char *data, size_t len) {
    while (len) {
        if (s->plen == crilog.max_line)
            flush_partial(s);
        if (s->plen == 0 && len > crilog.max_line) {
            /* A whole record straight from the read buffer; more follows. */
            log_record(s, 0, data, crilog.max_line);
            data += crilog.max_line;
            len -= crilog.max_line;
            continue;
        }
        size_t n = crilog.max_line - s->plen;
        if (n > len)
            n = len;
        if (!s->pend && !(s->pend = malloc(crilog.max_line)))
            die("out of memory%s", NULL, ENOMEM);
        if (s->plen == 0)
            s->pend_since = mono_ms();
        memcpy(s->pend + s->plen, data, n);
        s->plen += n;
        data += n;
        len -= n;
    }
}

static void log_data(struct stream *s, const char *data, size_t len) {
    while (len) {
        const char *nl = memchr(data, '\n', len);
        if (!nl) {
            line_append(s, data, len);
            return;
        }
        size_t seg = (size_t)(nl - data);
        if (s->plen == 0 && seg <= crilog.max_line) {
            log_record(s, 1, data, seg); /* the common case: no copy */
        } else {
            line_append(s, data, seg);
            log_record(s, 1, s->pend, s->plen);
            s->plen = 0;
        }
        data = nl + 1;
        len -= seg + 1;
    }
}

#endif
