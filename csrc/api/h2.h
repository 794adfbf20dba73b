/* api/h2.h - a gRPC server transport: HTTP/2 (libnghttp2) and gRPC framing in C.
 *
 * One server object owns the listening sockets (bound by Python, handed over),
 * the accepted connections and their nghttp2 sessions, run from an epoll loop.
 * One Python thread calls pycri_h2_poll, which waits and runs the protocol with
 * the GIL released and returns whole requests: one gRPC message each, already
 * checked (one uncompressed message, within max_message). Answers come back
 * through pycri_h2_respond / pycri_h2_send from any thread; a mutex guards the
 * sessions. Requests the transport can answer itself (bad framing, unknown
 * encodings, oversize messages) never reach Python.
 *
 * The server object is the one heap object that crosses this boundary: it is
 * made by pycri_h2_new and must be freed by pycri_h2_free.
 */

struct pycri_h2;

#define PYCRI_H2_PATH_MAX 128

/* One request handed to Python. body points into memory the server owns and
 * stays valid until the next pycri_h2_poll call on the same server. */
struct pycri_h2_request {
    unsigned long long conn;          /* connection id (never reused) */
    int stream;                       /* HTTP/2 stream id */
    long long timeout_us;             /* grpc-timeout in microseconds, -1 if none */
    char path[128];                   /* :path, NUL-terminated */
    const unsigned char *body;        /* the message without its 5-byte prefix */
    size_t body_len;
};

/* Counters for tests and leak checks. */
struct pycri_h2_stats {
    unsigned long long connections;   /* open now */
    unsigned long long streams;       /* open now, over all connections */
    unsigned long long accepted;      /* connections accepted since start */
    unsigned long long requests;      /* requests handed to Python since start */
    unsigned long long rejected;      /* requests answered by the transport itself */
    unsigned long long buffered;      /* request + response bytes held now */
};

/* max_message: the largest gRPC message taken or sent; max_streams: concurrent
 * streams per connection; max_header_bytes: the sum of a request's header
 * names and values; max_connections: open connections at once (more are
 * accepted and closed at once). */
int pycri_h2_new(struct pycri_h2 **out, size_t max_message, unsigned max_streams,
                 unsigned max_header_bytes, unsigned max_connections,
                 struct pycri_error *err);
/* Serve a listening socket (already bound and listening; made non-blocking
 * here). The server owns it from now on and closes it, at once on failure. */
int pycri_h2_add_listener(struct pycri_h2 *srv, int fd, struct pycri_error *err);
/* Wait up to timeout_ms (-1: forever) for work, run the protocol, and fill up
 * to cap requests. Returns how many (0 on timeout or wake-up). */
int pycri_h2_poll(struct pycri_h2 *srv, struct pycri_h2_request *reqs, int cap,
                  int timeout_ms, struct pycri_error *err);
/* Append one message to a stream's answer (server streaming). Returns 0; 1 when
 * the stream or its connection is gone (the caller stops producing); 2 when the
 * stream already holds more unsent bytes than it may (the client is not reading):
 * nothing was taken, try again later. */
int pycri_h2_send(struct pycri_h2 *srv, unsigned long long conn, int stream,
                  const unsigned char *msg, size_t len, struct pycri_error *err);
/* End a stream's answer: an optional last message (has_msg), then the status.
 * grpc_message is sent percent-encoded. Returns 0, or 1 when the stream is gone. */
int pycri_h2_respond(struct pycri_h2 *srv, unsigned long long conn, int stream,
                     const unsigned char *msg, size_t len, int has_msg,
                     int grpc_status, const char *grpc_message, struct pycri_error *err);
/* 1 while the stream is open and the server is not stopping, else 0. */
int pycri_h2_alive(struct pycri_h2 *srv, unsigned long long conn, int stream);
/* Make a waiting pycri_h2_poll return now. */
int pycri_h2_wake(struct pycri_h2 *srv, struct pycri_error *err);
/* Stop accepting: close the listeners and send GOAWAY on every connection;
 * streams already open may still be answered. hard: close every connection too
 * (answers still due are then dropped). */
int pycri_h2_shutdown(struct pycri_h2 *srv, int hard, struct pycri_error *err);
int pycri_h2_stats(struct pycri_h2 *srv, struct pycri_h2_stats *out);
/* Close every connection and free the server. No other call may run. */
void pycri_h2_free(struct pycri_h2 *srv);
