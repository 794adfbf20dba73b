/* h2srv.c - the gRPC server transport: epoll + libnghttp2 sessions + gRPC framing.
 *
 * Why in C: grpcio hands every call between several threads under the GIL
 * (~0.2 ms and ~20 context switches per call from a Go client). Here one Python
 * thread runs pycri_h2_poll; the HTTP/2 work happens in C with the GIL released
 * and a request reaches Python as one struct, its answer leaves in one call.
 *
 * Locking: srv->mu guards everything except the epoll_wait itself, so answers
 * may come from any thread. Connections are named by a 64-bit id that is never
 * reused (slot index in the low 16 bits, a sequence number above), so a late
 * answer for a closed connection finds nothing instead of a stranger.
 *
 * Memory bounds against a hostile client: request bodies are capped at
 * max_message (+5 for the prefix) per stream and streams per connection at
 * max_streams (SETTINGS and nghttp2's own enforcement); header bytes are
 * counted per stream; a connection whose answers the peer does not read stops
 * being read until they drain, and a streaming answer it does not read makes
 * pycri_h2_send say "wait" past STREAM_BACKLOG; nghttp2 itself limits queued
 * control frames, SETTINGS entries, CONTINUATION frames and resets. Not
 * bounded: how long a connection may sit idle (max_connections bounds how
 * many; the unix socket is 0660, so only the node's privileged clients come).
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <fcntl.h>

#include <nghttp2/nghttp2.h>

#include "internal.h"

#define MAX_LISTENERS 8
#define READ_CHUNK 65536
#define WRITE_BATCH 65536
#define EVENTS_PER_WAIT 64
#define GRPC_MESSAGE_MAX 4096        /* grpc-message text kept before encoding */
#define STREAM_WINDOW (1 << 20)
#define CONN_WINDOW (4 << 20)
#define SLOT_BITS 16
#define MAX_BUFFERED ((size_t)512 << 20)  /* all connections' request + answer bytes */
#define STREAM_BACKLOG ((size_t)4 << 20)  /* a streaming answer's unsent bytes before send says wait */
#define TAG_WAKE 0ULL                 /* epoll data: 0 = eventfd, 1..8 = listener */

/* gRPC status codes the transport answers by itself. */
enum {
    GRPC_UNIMPLEMENTED = 12,
    GRPC_INTERNAL = 13,
    GRPC_RESOURCE_EXHAUSTED = 8,
};

struct buf {
    unsigned char *p;
    size_t len, cap;
};

struct h2_conn;

struct h2_stream {
    struct h2_conn *conn;
    struct h2_stream *prev, *next;
    int32_t id;
    unsigned hdr_bytes;
    long long timeout_us;
    char path[PYCRI_H2_PATH_MAX];
    char bad_encoding[32];
    unsigned char path_bad, is_post, ctype_ok, hdr_too_big;
    unsigned char handed, rejected, headers_sent, deferred, final;
    struct buf in;                    /* request bytes, prefix included */
    struct buf out;                   /* framed answer messages not yet given to nghttp2 */
    size_t out_off;
    int status;
    char *message;                    /* grpc-message, percent-encoded, or NULL */
};

struct h2_conn {
    struct pycri_h2 *srv;
    nghttp2_session *session;
    int fd;
    unsigned long long id;
    struct h2_stream *streams;
    struct buf obuf;                  /* serialized frames not yet written */
    size_t ooff;
    uint32_t events;                  /* current epoll interest */
    int closing;
};

struct ready {
    struct ready *next;
    unsigned long long conn;
    int32_t stream;
    long long timeout_us;
    char path[PYCRI_H2_PATH_MAX];
    struct buf body;
};

struct pycri_h2 {
    pthread_mutex_t mu;
    int epfd, evfd;
    int listeners[MAX_LISTENERS];
    int nlisteners;
    struct h2_conn **conns;
    unsigned max_conns;
    unsigned long long seq;
    size_t max_message;
    unsigned max_streams, max_header_bytes;
    struct ready *rq_head, *rq_tail;  /* complete requests not yet handed out */
    struct ready *handed;             /* handed out by the last poll; freed by the next */
    int stopping;
    struct pycri_h2_stats stats;
    nghttp2_session_callbacks *cbs;
    nghttp2_option *opt;
};

/* -- small helpers ------------------------------------------------------------- */

static int buf_reserve(struct buf *b, size_t extra) {
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra)
        cap *= 2;
    unsigned char *p = realloc(b->p, cap);
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_append(struct buf *b, const void *data, size_t n) {
    if (buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

static void buf_free(struct buf *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

static nghttp2_nv make_nv(const char *name, const char *value) {
    nghttp2_nv nv = {(uint8_t *)name, (uint8_t *)value, strlen(name), strlen(value),
                     NGHTTP2_NV_FLAG_NONE};
    return nv;
}

/* grpc-message is percent-encoded: bytes outside printable ASCII, and '%'. */
static char *percent_encode(const char *text) {
    size_t n = strnlen(text, GRPC_MESSAGE_MAX);
    char *out = malloc(n * 3 + 1), *o = out;
    if (!out)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c < 0x20 || c > 0x7e || c == '%')
            o += sprintf(o, "%%%02X", c);
        else
            *o++ = (char)c;
    }
    *o = 0;
    return out;
}

/* grpc-timeout: up to 8 digits and a unit (H M S m u n); -1 when absent or bad. */
static long long parse_timeout(const uint8_t *v, size_t n) {
    if (n < 2 || n > 9)
        return -1;
    long long x = 0;
    for (size_t i = 0; i + 1 < n; i++) {
        if (v[i] < '0' || v[i] > '9')
            return -1;
        x = x * 10 + (v[i] - '0');
    }
    switch (v[n - 1]) {
    case 'H': return x * 3600LL * 1000000;
    case 'M': return x * 60LL * 1000000;
    case 'S': return x * 1000000LL;
    case 'm': return x * 1000LL;
    case 'u': return x;
    case 'n': return x / 1000;
    default: return -1;
    }
}

static struct h2_conn *conn_lookup(struct pycri_h2 *srv, unsigned long long id) {
    unsigned slot = (unsigned)(id & ((1u << SLOT_BITS) - 1));
    if (slot >= srv->max_conns)
        return NULL;
    struct h2_conn *c = srv->conns[slot];
    return c && c->id == id && !c->closing ? c : NULL;
}

static struct h2_stream *stream_lookup(struct h2_conn *c, int32_t id) {
    return id > 0 ? nghttp2_session_get_stream_user_data(c->session, id) : NULL;
}

/* -- answers ------------------------------------------------------------------- */

static ssize_t data_read(nghttp2_session *session, int32_t stream_id, uint8_t *dst,
                         size_t length, uint32_t *flags, nghttp2_data_source *source,
                         void *user) {
    struct h2_stream *st = source->ptr;
    struct pycri_h2 *srv = st->conn->srv;
    size_t avail = st->out.len - st->out_off, n = avail < length ? avail : length;
    memcpy(dst, st->out.p + st->out_off, n);
    st->out_off += n;
    srv->stats.buffered -= n;
    if (st->out_off == st->out.len) {
        st->out_off = st->out.len = 0;
        if (st->out.cap > WRITE_BATCH)
            buf_free(&st->out);
    }
    if (st->out.len == 0 && st->final) {
        char code[12];
        snprintf(code, sizeof code, "%d", st->status);
        nghttp2_nv nva[2] = {make_nv("grpc-status", code),
                             make_nv("grpc-message", st->message ? st->message : "")};
        if (nghttp2_submit_trailer(session, stream_id, nva, st->message ? 2 : 1) != 0)
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
        return (ssize_t)n;
    }
    if (n == 0) {
        st->deferred = 1;
        return NGHTTP2_ERR_DEFERRED;
    }
    return (ssize_t)n;
}

/* Queue a message and/or the final status on a stream. Returns 0, or -1 when out
 * of memory (the stream is then reset). */
static int stream_answer(struct h2_stream *st, const unsigned char *msg, size_t len,
                         int has_msg, int final, int status, const char *text) {
    struct h2_conn *c = st->conn;
    struct pycri_h2 *srv = c->srv;
    if (has_msg && len > srv->max_message) {
        has_msg = 0;
        final = 1;
        status = GRPC_RESOURCE_EXHAUSTED;
        text = "answer larger than the maximum message size";
    }
    if (has_msg) {
        unsigned char prefix[5] = {0, (unsigned char)(len >> 24), (unsigned char)(len >> 16),
                                   (unsigned char)(len >> 8), (unsigned char)len};
        if (buf_reserve(&st->out, len + 5) < 0)
            goto nomem;
        buf_append(&st->out, prefix, 5);
        if (len)
            buf_append(&st->out, msg, len);
        srv->stats.buffered += len + 5;
    }
    if (final) {
        st->final = 1;
        st->status = status;
        if (text && *text && !(st->message = percent_encode(text)))
            goto nomem;
    }
    if (!st->headers_sent) {
        st->headers_sent = 1;
        if (final && st->out.len == 0) {  /* trailers-only: one HEADERS frame ends it */
            char code[12];
            snprintf(code, sizeof code, "%d", status);
            nghttp2_nv nva[4] = {make_nv(":status", "200"),
                                 make_nv("content-type", "application/grpc"),
                                 make_nv("grpc-status", code),
                                 make_nv("grpc-message", st->message ? st->message : "")};
            return nghttp2_submit_response(c->session, st->id, nva, st->message ? 4 : 3,
                                           NULL) == 0 ? 0 : -1;
        }
        nghttp2_nv nva[2] = {make_nv(":status", "200"),
                             make_nv("content-type", "application/grpc")};
        nghttp2_data_provider prd = {.source.ptr = st, .read_callback = data_read};
        return nghttp2_submit_response(c->session, st->id, nva, 2, &prd) == 0 ? 0 : -1;
    }
    if (st->deferred) {
        st->deferred = 0;
        nghttp2_session_resume_data(c->session, st->id);
    }
    return 0;
nomem:
    nghttp2_submit_rst_stream(c->session, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_INTERNAL_ERROR);
    return -1;
}

/* The transport answers a bad request itself; what the client still sends is dropped. */
static void stream_reject(struct h2_stream *st, int status, const char *text) {
    struct pycri_h2 *srv = st->conn->srv;
    if (st->rejected || st->handed)
        return;
    st->rejected = 1;
    srv->stats.rejected++;
    srv->stats.buffered -= st->in.len;
    buf_free(&st->in);
    stream_answer(st, NULL, 0, 0, 1, status, text);
}

static void stream_reject_http(struct h2_stream *st, const char *code) {
    struct pycri_h2 *srv = st->conn->srv;
    if (st->rejected || st->handed)
        return;
    st->rejected = st->headers_sent = st->final = 1;
    srv->stats.rejected++;
    nghttp2_nv nva[1] = {make_nv(":status", code)};
    nghttp2_submit_response(st->conn->session, st->id, nva, 1, NULL);
}

/* -- requests ------------------------------------------------------------------ */

static void stream_free(struct h2_stream *st) {
    struct h2_conn *c = st->conn;
    struct pycri_h2 *srv = c->srv;
    if (st->prev)
        st->prev->next = st->next;
    else
        c->streams = st->next;
    if (st->next)
        st->next->prev = st->prev;
    srv->stats.buffered -= st->in.len + (st->out.len - st->out_off);
    srv->stats.streams--;
    buf_free(&st->in);
    buf_free(&st->out);
    free(st->message);
    free(st);
}

static int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user) {
    struct h2_conn *c = user;
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    struct h2_stream *st = calloc(1, sizeof *st);
    if (!st)
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    st->conn = c;
    st->id = frame->hd.stream_id;
    st->timeout_us = -1;
    st->next = c->streams;
    if (c->streams)
        c->streams->prev = st;
    c->streams = st;
    c->srv->stats.streams++;
    nghttp2_session_set_stream_user_data(session, st->id, st);
    return 0;
}

static int header_is(const uint8_t *name, size_t n, const char *want) {
    return n == strlen(want) && memcmp(name, want, n) == 0;
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame,
                     const uint8_t *name, size_t namelen, const uint8_t *value,
                     size_t valuelen, uint8_t flags, void *user) {
    struct h2_conn *c = user;
    struct h2_stream *st = stream_lookup(c, frame->hd.stream_id);
    if (!st || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;                       /* request trailers: counted by nghttp2, unused */
    st->hdr_bytes += (unsigned)(namelen + valuelen + 32);
    if (st->hdr_bytes > c->srv->max_header_bytes) {
        st->hdr_too_big = 1;
        return 0;
    }
    if (header_is(name, namelen, ":path")) {
        if (valuelen >= sizeof st->path) {
            st->path_bad = 1;
        } else {
            memcpy(st->path, value, valuelen);
            st->path[valuelen] = 0;
        }
    } else if (header_is(name, namelen, ":method")) {
        st->is_post = valuelen == 4 && memcmp(value, "POST", 4) == 0;
    } else if (header_is(name, namelen, "content-type")) {
        /* application/grpc, optionally +proto or ;params */
        st->ctype_ok = valuelen >= 16 && memcmp(value, "application/grpc", 16) == 0 &&
                       (valuelen == 16 || value[16] == '+' || value[16] == ';');
    } else if (header_is(name, namelen, "grpc-encoding")) {
        if (!(valuelen == 8 && memcmp(value, "identity", 8) == 0))
            snprintf(st->bad_encoding, sizeof st->bad_encoding, "%.*s",
                     (int)(valuelen < 24 ? valuelen : 24), (const char *)value);
    } else if (header_is(name, namelen, "grpc-timeout")) {
        st->timeout_us = parse_timeout(value, valuelen);
    }
    return 0;
}

static void request_check_headers(struct h2_stream *st) {
    if (st->hdr_too_big) {
        stream_reject(st, GRPC_RESOURCE_EXHAUSTED, "request headers too large");
    } else if (!st->is_post) {
        stream_reject_http(st, "405");
    } else if (!st->ctype_ok) {
        stream_reject_http(st, "415");
    } else if (st->bad_encoding[0]) {
        char text[96];
        snprintf(text, sizeof text, "grpc-encoding %s is not supported (only identity)",
                 st->bad_encoding);
        stream_reject(st, GRPC_UNIMPLEMENTED, text);
    } else if (st->path_bad || st->path[0] != '/') {
        stream_reject(st, GRPC_UNIMPLEMENTED, "unknown method");
    }
}

/* The first 5 bytes tell whether the message can be taken at all: say no early,
 * before buffering it. */
static void request_check_prefix(struct h2_stream *st) {
    struct pycri_h2 *srv = st->conn->srv;
    if (st->in.len < 5)
        return;
    const unsigned char *p = st->in.p;
    size_t declared = ((size_t)p[1] << 24) | ((size_t)p[2] << 16) | ((size_t)p[3] << 8) | p[4];
    if (p[0] != 0) {
        stream_reject(st, p[0] == 1 ? GRPC_UNIMPLEMENTED : GRPC_INTERNAL,
                      p[0] == 1 ? "compressed messages are not supported"
                                : "bad gRPC message prefix");
    } else if (declared > srv->max_message) {
        char text[96];
        snprintf(text, sizeof text, "request message of %zu bytes exceeds the limit of %zu",
                 declared, srv->max_message);
        stream_reject(st, GRPC_RESOURCE_EXHAUSTED, text);
    } else if (st->in.len > declared + 5) {
        stream_reject(st, GRPC_UNIMPLEMENTED, "more than one request message (client "
                      "streaming is not supported)");
    }
}

static int on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                         const uint8_t *data, size_t len, void *user) {
    struct h2_conn *c = user;
    struct h2_stream *st = stream_lookup(c, stream_id);
    if (!st || st->rejected || st->handed)
        return 0;
    if (c->srv->stats.buffered + len > MAX_BUFFERED) {
        stream_reject(st, GRPC_RESOURCE_EXHAUSTED, "server is holding too many request bytes");
        return 0;
    }
    if (st->in.len + len > c->srv->max_message + 5) {
        stream_reject(st, GRPC_RESOURCE_EXHAUSTED, "request message exceeds the size limit");
        return 0;
    }
    if (buf_append(&st->in, data, len) < 0) {
        stream_reject(st, GRPC_RESOURCE_EXHAUSTED, "out of memory for the request");
        return 0;
    }
    c->srv->stats.buffered += len;
    request_check_prefix(st);
    return 0;
}

/* The client ended its side: hand the request to Python, or answer it here. */
static void request_complete(struct h2_stream *st) {
    struct pycri_h2 *srv = st->conn->srv;
    if (st->rejected || st->handed)
        return;
    request_check_prefix(st);
    if (st->rejected)
        return;
    if (st->in.len < 5 || st->in.len != 5 + (((size_t)st->in.p[1] << 24) |
                                               ((size_t)st->in.p[2] << 16) |
                                               ((size_t)st->in.p[3] << 8) | st->in.p[4])) {
        stream_reject(st, GRPC_INTERNAL, st->in.len ? "truncated request message"
                                                    : "request has no message");
        return;
    }
    struct ready *r = calloc(1, sizeof *r);
    if (!r) {
        stream_reject(st, GRPC_RESOURCE_EXHAUSTED, "out of memory for the request");
        return;
    }
    r->conn = st->conn->id;
    r->stream = st->id;
    r->timeout_us = st->timeout_us;
    memcpy(r->path, st->path, sizeof r->path);
    r->body = st->in;                    /* ownership moves; still counted as buffered */
    memset(&st->in, 0, sizeof st->in);
    st->handed = 1;
    if (srv->rq_tail)
        srv->rq_tail->next = r;
    else
        srv->rq_head = r;
    srv->rq_tail = r;
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user) {
    struct h2_conn *c = user;
    if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA)
        return 0;
    struct h2_stream *st = stream_lookup(c, frame->hd.stream_id);
    if (!st)
        return 0;
    if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST)
        request_check_headers(st);
    if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)
        request_complete(st);
    return 0;
}

static int on_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                           void *user) {
    struct h2_conn *c = user;
    if (c->closing)
        return 0;                        /* conn_close frees the streams itself */
    struct h2_stream *st = stream_lookup(c, stream_id);
    if (st) {
        nghttp2_session_set_stream_user_data(session, stream_id, NULL);
        stream_free(st);
    }
    return 0;
}

/* -- connections --------------------------------------------------------------- */

static void conn_close(struct h2_conn *c) {
    struct pycri_h2 *srv = c->srv;
    c->closing = 1;
    epoll_ctl(srv->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    nghttp2_session_del(c->session);
    while (c->streams)
        stream_free(c->streams);
    srv->stats.buffered -= c->obuf.len - c->ooff;
    buf_free(&c->obuf);
    srv->conns[c->id & ((1u << SLOT_BITS) - 1)] = NULL;
    srv->stats.connections--;
    free(c);
}

static void conn_set_events(struct h2_conn *c, uint32_t events) {
    if (c->events == events)
        return;
    struct epoll_event ev = {.events = events, .data.u64 = c->id};
    if (epoll_ctl(c->srv->epfd, EPOLL_CTL_MOD, c->fd, &ev) == 0)
        c->events = events;
}

/* Serialize what nghttp2 has queued and write it. Returns -1 when the connection
 * is finished or broken: the caller closes it. */
static int conn_flush(struct h2_conn *c) {
    struct pycri_h2 *srv = c->srv;
    for (;;) {
        while (c->obuf.len - c->ooff < WRITE_BATCH) {
            const uint8_t *data;
            ssize_t n = nghttp2_session_mem_send(c->session, &data);
            if (n < 0)
                return -1;
            if (n == 0)
                break;
            if (buf_append(&c->obuf, data, (size_t)n) < 0)
                return -1;
            srv->stats.buffered += (size_t)n;
        }
        size_t pending = c->obuf.len - c->ooff;
        if (pending == 0)
            break;
        ssize_t w = send(c->fd, c->obuf.p + c->ooff, pending, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                /* the peer is not reading: stop reading its requests until it does */
                conn_set_events(c, EPOLLOUT);
                return 0;
            }
            return -1;
        }
        c->ooff += (size_t)w;
        srv->stats.buffered -= (size_t)w;
        if (c->ooff == c->obuf.len) {
            c->ooff = c->obuf.len = 0;
            if (c->obuf.cap > 4 * WRITE_BATCH)
                buf_free(&c->obuf);
        }
    }
    if (!nghttp2_session_want_read(c->session) && !nghttp2_session_want_write(c->session))
        return -1;
    conn_set_events(c, EPOLLIN);
    return 0;
}

static void conn_read(struct h2_conn *c, unsigned char *buf) {
    ssize_t n = recv(c->fd, buf, READ_CHUNK, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n <= 0) {
        conn_close(c);
        return;
    }
    if (nghttp2_session_mem_recv(c->session, buf, (size_t)n) < 0) {
        conn_flush(c);                  /* a GOAWAY may be queued: try to say why */
        conn_close(c);
        return;
    }
    if (conn_flush(c) < 0)
        conn_close(c);
}

static void conn_accept(struct pycri_h2 *srv, int lfd) {
    for (int i = 0; i < 64; i++) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        unsigned slot = 0;
        while (slot < srv->max_conns && srv->conns[slot])
            slot++;
        struct h2_conn *c = slot < srv->max_conns && !srv->stopping ? calloc(1, sizeof *c)
                                                                     : NULL;
        if (!c) {
            close(fd);
            continue;
        }
        c->srv = srv;
        c->fd = fd;
        c->id = (++srv->seq << SLOT_BITS) | slot;
        if (nghttp2_session_server_new2(&c->session, srv->cbs, c, srv->opt) != 0) {
            close(fd);
            free(c);
            continue;
        }
        nghttp2_settings_entry iv[] = {
            {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, srv->max_streams},
            {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW},
            {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, srv->max_header_bytes},
        };
        nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, iv, sizeof iv / sizeof iv[0]);
        nghttp2_session_set_local_window_size(c->session, NGHTTP2_FLAG_NONE, 0, CONN_WINDOW);
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = c->id};
        if (epoll_ctl(srv->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            nghttp2_session_del(c->session);
            close(fd);
            free(c);
            continue;
        }
        c->events = EPOLLIN;
        srv->conns[slot] = c;
        srv->stats.connections++;
        srv->stats.accepted++;
        if (conn_flush(c) < 0)
            conn_close(c);
    }
}

/* -- the exported surface ------------------------------------------------------ */

PYCRI_EXPORT int pycri_h2_new(struct pycri_h2 **out, size_t max_message, unsigned max_streams,
                              unsigned max_header_bytes, unsigned max_connections,
                              struct pycri_error *err) {
    if (max_connections == 0 || max_connections > (1u << SLOT_BITS) || max_streams == 0)
        return pycri_fail(err, EINVAL, "h2 server: bad limits");
    struct pycri_h2 *srv = calloc(1, sizeof *srv);
    if (!srv)
        return pycri_fail(err, ENOMEM, "h2 server");
    srv->epfd = srv->evfd = -1;
    srv->max_message = max_message;
    srv->max_streams = max_streams;
    srv->max_header_bytes = max_header_bytes;
    srv->max_conns = max_connections;
    pthread_mutex_init(&srv->mu, NULL);
    srv->conns = calloc(max_connections, sizeof *srv->conns);
    srv->epfd = epoll_create1(EPOLL_CLOEXEC);
    srv->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!srv->conns || srv->epfd < 0 || srv->evfd < 0) {
        int e = errno ? errno : ENOMEM;
        pycri_h2_free(srv);
        return pycri_fail(err, e, "h2 server: epoll_create1/eventfd");
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_WAKE};
    epoll_ctl(srv->epfd, EPOLL_CTL_ADD, srv->evfd, &ev);
    if (nghttp2_session_callbacks_new(&srv->cbs) != 0 || nghttp2_option_new(&srv->opt) != 0) {
        pycri_h2_free(srv);
        return pycri_fail(err, ENOMEM, "h2 server: nghttp2 setup");
    }
    nghttp2_session_callbacks_set_on_begin_headers_callback(srv->cbs, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(srv->cbs, on_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(srv->cbs, on_data_chunk);
    nghttp2_session_callbacks_set_on_frame_recv_callback(srv->cbs, on_frame_recv);
    nghttp2_session_callbacks_set_on_stream_close_callback(srv->cbs, on_stream_close);
    *out = srv;
    return 0;
}

PYCRI_EXPORT int pycri_h2_add_listener(struct pycri_h2 *srv, int fd, struct pycri_error *err) {
    pthread_mutex_lock(&srv->mu);
    int rc = 0;
    if (srv->nlisteners == MAX_LISTENERS || srv->stopping) {
        rc = pycri_fail(err, EINVAL, "h2 server: cannot add a listener now");
        goto out;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        rc = pycri_fail(err, errno, "fcntl O_NONBLOCK on listener %d", fd);
        goto out;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 1 + (unsigned)srv->nlisteners};
    if (epoll_ctl(srv->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        rc = pycri_fail(err, errno, "epoll_ctl add listener %d", fd);
        goto out;
    }
    srv->listeners[srv->nlisteners++] = fd;
out:
    pthread_mutex_unlock(&srv->mu);
    if (rc < 0)
        close(fd);                      /* ours either way, as the header says */
    return rc;
}

static void free_ready_list(struct pycri_h2 *srv, struct ready *r) {
    while (r) {
        struct ready *next = r->next;
        srv->stats.buffered -= r->body.len;
        buf_free(&r->body);
        free(r);
        r = next;
    }
}

PYCRI_EXPORT int pycri_h2_poll(struct pycri_h2 *srv, struct pycri_h2_request *reqs, int cap,
                               int timeout_ms, struct pycri_error *err) {
    struct epoll_event evs[EVENTS_PER_WAIT];
    pthread_mutex_lock(&srv->mu);
    free_ready_list(srv, srv->handed);
    srv->handed = NULL;
    int queued = srv->rq_head != NULL;
    pthread_mutex_unlock(&srv->mu);

    int n = epoll_wait(srv->epfd, evs, EVENTS_PER_WAIT, queued ? 0 : timeout_ms);
    if (n < 0) {
        if (errno != EINTR)
            return pycri_fail(err, errno, "epoll_wait");
        n = 0;
    }
    unsigned char *buf = NULL;
    pthread_mutex_lock(&srv->mu);
    for (int i = 0; i < n; i++) {
        unsigned long long tag = evs[i].data.u64;
        if (tag == TAG_WAKE) {
            uint64_t v;
            while (read(srv->evfd, &v, sizeof v) > 0) {
            }
        } else if (tag <= MAX_LISTENERS) {
            if ((int)tag <= srv->nlisteners && srv->listeners[tag - 1] >= 0)
                conn_accept(srv, srv->listeners[tag - 1]);
        } else {
            struct h2_conn *c = conn_lookup(srv, tag);
            if (!c)
                continue;
            if (evs[i].events & EPOLLOUT) {
                if (conn_flush(c) < 0) {
                    conn_close(c);
                    continue;
                }
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                if (!buf && !(buf = malloc(READ_CHUNK))) {
                    conn_close(c);
                    continue;
                }
                conn_read(c, buf);
            }
        }
    }
    int got = 0;
    struct ready **tail = &srv->handed;
    while (got < cap && srv->rq_head) {
        struct ready *r = srv->rq_head;
        srv->rq_head = r->next;
        if (!srv->rq_head)
            srv->rq_tail = NULL;
        r->next = NULL;
        *tail = r;
        tail = &r->next;
        struct pycri_h2_request *q = &reqs[got++];
        q->conn = r->conn;
        q->stream = r->stream;
        q->timeout_us = r->timeout_us;
        memcpy(q->path, r->path, sizeof q->path);
        q->body = r->body.p + 5;
        q->body_len = r->body.len - 5;
    }
    srv->stats.requests += (unsigned)got;
    pthread_mutex_unlock(&srv->mu);
    free(buf);
    return got;
}

static int answer(struct pycri_h2 *srv, unsigned long long conn, int stream,
                  const unsigned char *msg, size_t len, int has_msg, int final, int status,
                  const char *text) {
    pthread_mutex_lock(&srv->mu);
    int rc = 1;
    struct h2_conn *c = conn_lookup(srv, conn);
    struct h2_stream *st = c ? stream_lookup(c, stream) : NULL;
    if (st && !st->final && !st->rejected) {
        rc = stream_answer(st, msg, len, has_msg, final, status, text) < 0 ? 1 : 0;
        if (conn_flush(c) < 0)
            conn_close(c);
    }
    pthread_mutex_unlock(&srv->mu);
    return rc;
}

PYCRI_EXPORT int pycri_h2_send(struct pycri_h2 *srv, unsigned long long conn, int stream,
                               const unsigned char *msg, size_t len, struct pycri_error *err) {
    pthread_mutex_lock(&srv->mu);
    struct h2_conn *c = conn_lookup(srv, conn);
    struct h2_stream *st = c ? stream_lookup(c, stream) : NULL;
    int backlogged = st && st->out.len - st->out_off > STREAM_BACKLOG;
    pthread_mutex_unlock(&srv->mu);
    if (backlogged)
        return 2;   /* the client is not reading: the producer waits, as on flow control */
    return answer(srv, conn, stream, msg, len, 1, 0, 0, NULL);
}

PYCRI_EXPORT int pycri_h2_respond(struct pycri_h2 *srv, unsigned long long conn, int stream,
                                  const unsigned char *msg, size_t len, int has_msg,
                                  int grpc_status, const char *grpc_message,
                                  struct pycri_error *err) {
    return answer(srv, conn, stream, msg, len, has_msg, 1, grpc_status, grpc_message);
}

PYCRI_EXPORT int pycri_h2_alive(struct pycri_h2 *srv, unsigned long long conn, int stream) {
    pthread_mutex_lock(&srv->mu);
    struct h2_conn *c = conn_lookup(srv, conn);
    struct h2_stream *st = c ? stream_lookup(c, stream) : NULL;
    int alive = !srv->stopping && st && !st->final;
    pthread_mutex_unlock(&srv->mu);
    return alive;
}

PYCRI_EXPORT int pycri_h2_wake(struct pycri_h2 *srv, struct pycri_error *err) {
    uint64_t one = 1;
    if (write(srv->evfd, &one, sizeof one) < 0 && errno != EAGAIN)
        return pycri_fail(err, errno, "write eventfd");
    return 0;
}

PYCRI_EXPORT int pycri_h2_shutdown(struct pycri_h2 *srv, int hard, struct pycri_error *err) {
    pthread_mutex_lock(&srv->mu);
    srv->stopping = 1;
    for (int i = 0; i < srv->nlisteners; i++) {
        if (srv->listeners[i] >= 0) {
            epoll_ctl(srv->epfd, EPOLL_CTL_DEL, srv->listeners[i], NULL);
            close(srv->listeners[i]);
            srv->listeners[i] = -1;
        }
    }
    for (unsigned i = 0; i < srv->max_conns; i++) {
        struct h2_conn *c = srv->conns[i];
        if (!c)
            continue;
        nghttp2_submit_goaway(c->session, NGHTTP2_FLAG_NONE,
                              nghttp2_session_get_last_proc_stream_id(c->session),
                              NGHTTP2_NO_ERROR, NULL, 0);
        if (conn_flush(c) < 0 || hard)
            conn_close(c);
    }
    pthread_mutex_unlock(&srv->mu);
    return pycri_h2_wake(srv, err);
}

PYCRI_EXPORT int pycri_h2_stats(struct pycri_h2 *srv, struct pycri_h2_stats *out) {
    pthread_mutex_lock(&srv->mu);
    *out = srv->stats;
    pthread_mutex_unlock(&srv->mu);
    return 0;
}

PYCRI_EXPORT void pycri_h2_free(struct pycri_h2 *srv) {
    if (!srv)
        return;
    if (srv->conns) {
        for (unsigned i = 0; i < srv->max_conns; i++)
            if (srv->conns[i])
                conn_close(srv->conns[i]);
        free(srv->conns);
    }
    for (int i = 0; i < srv->nlisteners; i++)
        if (srv->listeners[i] >= 0)
            close(srv->listeners[i]);
    free_ready_list(srv, srv->handed);
    free_ready_list(srv, srv->rq_head);
    if (srv->epfd >= 0)
        close(srv->epfd);
    if (srv->evfd >= 0)
        close(srv->evfd);
    if (srv->cbs)
        nghttp2_session_callbacks_del(srv->cbs);
    if (srv->opt)
        nghttp2_option_del(srv->opt);
    pthread_mutex_destroy(&srv->mu);
    free(srv);
}
