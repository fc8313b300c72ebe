/* The HTTP/1 client of aigw, for a worker's traffic and for the health checker's checks alike:
 * per-backend resolver and keep-alive connection pools, connect + TLS, sending the request,
 * parsing the response with llhttp and handing it to the caller as it arrives. Also the
 * worker's buffer pool, shared with the client side. */
#ifndef AIGW_CORE_UPSTREAM_H
#define AIGW_CORE_UPSTREAM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <uv.h>

#include "core/conf.h"
#include "core/log.h"
#include "core/proxy.h"
#include "core/tls.h"
#include "shm/shm.h"

/* Fixed-size buffers taken when data arrives and given back when a connection goes idle. */
struct bufpool {
    void *free;        /* singly linked through the first bytes of each buffer */
    size_t size;       /* bytes per buffer */
    uint32_t n_free;   /* buffers on the free list */
    uint32_t max_free; /* beyond this, returned buffers are freed */
};

void bufpool_init(struct bufpool *bp, size_t size, uint32_t max_free);
void *bufpool_get(struct bufpool *bp); /* NULL when out of memory */
void bufpool_put(struct bufpool *bp, void *p);
void bufpool_free(struct bufpool *bp);

/* Why an exchange with a backend failed. */
enum upstream_err {
    UPSTREAM_OK = 0,
    UPSTREAM_ECONNECT, /* refused, unreachable, no address, connect timeout */
    UPSTREAM_ETLS,     /* handshake (or its timeout) or certificate failure */
    UPSTREAM_ETIMEOUT, /* first byte or idle timeout */
    UPSTREAM_ERESET,   /* closed or reset by the backend once request bytes were written */
    UPSTREAM_ESTALE,   /* a pooled connection was found closed before any request byte was
                          written: the backend cannot have seen the request */
    UPSTREAM_EPROTO,   /* malformed response */
    UPSTREAM_ECLIENT,  /* the client side gave up (on_head/on_body returned < 0) */
    UPSTREAM_ENOMEM,
    UPSTREAM_ELOCAL, /* the gateway ran out of a local resource (fds, socket buffers, memory,
                        ephemeral ports) opening the connection: not the backend's doing */
};

const char *upstream_strerror(enum upstream_err e);

/* A parsed response head; spans point into the connection's buffer and live until the
 * callback returns. */
struct upstream_resp {
    int status;
    const char *reason;
    size_t reason_len;
    const struct proxy_hdr *hdrs;
    size_t n_hdrs;
    int chunked;     /* body is chunk-encoded; bytes pass through with their framing */
    int until_close; /* body ends when the backend closes */
    int sse;         /* Content-Type text/event-stream */
    int rechunk;     /* the body is handed over bare (de-chunked if it was chunked) for the client
                        side to frame each piece as a chunk of its own, so that it can end the
                        body cleanly, or mark it cut, at any time: a body delimited by the close,
                        and any SSE one, for a client that takes chunks */
};

/* Callbacks into the client side. on_head / on_body return 0 when the bytes were written to
 * the client, 1 when a write is pending (reading stops until upstream_resume),
 * UPSTREAM_HAND_BAD when the response cannot be forwarded (on_head only, before anything went
 * to the client: the backend connection is closed, then on_end(UPSTREAM_EPROTO)), or another
 * value < 0 when the client is gone (closed, then on_end(UPSTREAM_ECLIENT)). */
#define UPSTREAM_HAND_BAD (-2)
struct upstream_ops {
    /* Writes the request head for backend `be` into buf; returns its length or < 0. */
    int (*build_head)(void *ctx, const struct conf_backend *be, char *buf, size_t cap);
    /* The response head with the first body bytes (n may be 0); complete = response ended. */
    int (*on_head)(void *ctx, const struct upstream_resp *r, const char *body, size_t n,
                   int complete);
    int (*on_body)(void *ctx, const char *p, size_t n, int complete);
    /* Called once per started exchange that did not fail synchronously; err = UPSTREAM_OK
     * after a complete response. The request may be reused from inside this call. */
    void (*on_end)(void *ctx, enum upstream_err err);
};

struct upconn;

/* Body pieces written in one writev (more are sent in turns). */
#define UPSTREAM_BODY_PIECES 8

/* One request to one backend; owned by the client side, stable while the exchange runs. */
struct upstream_req {
    const struct upstream_ops *ops;
    void *ctx;
    const char *body; /* stays valid until on_end */
    size_t body_len;
    /* or, when body_n > 0, the body in pieces (core/rewrite.c), body_len their total; the
       pieces and what they point at stay valid until on_end */
    const struct iovec *body_iov;
    int body_n;
    int head_only; /* HEAD request: the response has no body */
    int written;   /* set here once the whole request was written to an upstream (the caller
                      clears it): it may be answered and billed whatever happens after */
    int dechunk;   /* the client takes no chunked coding (HTTP/1.0): hand over decoded bytes;
                      else bodies that need it are handed over for re-chunking (rechunk) */
    int bare;      /* the client side reads the body (usage): a chunked one is handed over
                      for re-chunking too, never with the upstream's framing */
    int backend;   /* index into conf.backends */
    uint64_t connect_timeout_ms; /* connect + TLS handshake; 0 = the pool's connect_timeout */
    uint64_t head_timeout_ms;    /* request sent -> response head; 0 = first_byte_timeout */
    struct upconn *conn;
    struct upstream_req *wait_next; /* waiting for the backend's first address */
    int no_reuse;                   /* open a new connection, take no pooled one */
    int status;                     /* response status once known */
    /* What a failure was, for messages: the errno behind UPSTREAM_ECONNECT or UPSTREAM_ELOCAL,
     * mbedTLS's code behind a failed handshake (UPSTREAM_ETLS); 0 when not known. */
    int sys_err;
    int peer; /* address (upstream_peer_str) the latest connection went to; -1 = none yet */
};

/* Host names are looked up in each worker with uv_getaddrinfo (the loop never blocks): at
 * start, then every UPSTREAM_RESOLVE_MS (so a changed DNS answer reaches the workers within 30 s,
 * whatever the record's TTL), and after a failed connect, at most once per
 * UPSTREAM_RERESOLVE_MIN_MS per backend. A failed lookup keeps the last good addresses. IP
 * literals are never looked up. */
#define UPSTREAM_RESOLVE_MS       30000
#define UPSTREAM_RERESOLVE_MIN_MS 1000
#define UPSTREAM_MAX_ADDRS        8 /* addresses kept per backend, tried in order on connect failure */

/* Per-process, per-backend state. */
struct up_backend {
    const struct conf_backend *cb;
    const struct conf_pool *cp;
    struct upstream *up;
    int index;
    struct shm_wb *wb; /* this worker's counters for the backend; NULL: none (health checker) */
    struct sockaddr_storage addrs[UPSTREAM_MAX_ADDRS];
    socklen_t addr_lens[UPSTREAM_MAX_ADDRS];
    int n_addrs;         /* 0 = no address (yet) */
    int addr_cur;        /* where new connections start: the address that last worked */
    uint32_t gen;        /* bumped when the addresses change: older connections are not pooled */
    int numeric;         /* the host is an IP literal */
    int resolving;       /* gai in flight */
    int fail_streak;     /* lookups failed in a row (the warning is logged once per streak) */
    uint64_t resolve_at; /* loop time (ms) the last lookup started */
    uv_getaddrinfo_t gai;
    uv_timer_t wait_timer;        /* bounds the wait of the requests below (connect timeout) */
    int wait_timer_on;            /* wait_timer initialised and not closed */
    struct upstream_req *waiters; /* requests waiting for the first address */
    char err[384];                /* "cannot resolve HOST: reason" while n_addrs == 0 */
    struct tls_client tls;
    int tls_ok;          /* tls initialised */
    char *tls_err;       /* why it could not be (malloc'd), else NULL */
    char tls_why[192];   /* why the latest failed handshake failed ("" = none yet) */
    struct upconn *idle; /* pooled idle connections, most recent first */
    int n_idle;
};

struct upstream {
    uv_loop_t *loop;
    const struct conf *conf;
    struct shm *shm;
    int slot;
    struct bufpool *bufs;
    size_t data_off;  /* where a buffer's data starts (u->buf points there) */
    size_t data_size; /* usable bytes of data */
    size_t hdrs_off;  /* where a buffer's header spans start, before the data */
    uint32_t max_hdrs;
    struct up_backend *backends;
    int n_backends;
    struct upconn *free_conns;
    int n_conns;              /* open connections */
    int draining;             /* no more pooling */
    int no_pool;              /* never pool: each exchange on a new connection, closed after it
                                 (the health checker's, as HAProxy checks: a check proves that a
                                 connection can be opened) */
    uv_timer_t resolve_timer; /* every UPSTREAM_RESOLVE_MS: look host names up again */
    int resolve_timer_on;
    struct upconn *wait_conn;  /* rq->conn of a request waiting for an address (a placeholder) */
    uint64_t aborts;           /* exchanges cut because the client went away */
    struct log_rate local_log; /* "out of a local resource" lines, at most one a second */
};

/* Starts looking backend host names up and prepares TLS clients. A buffer from bufs holds max_hdrs
 * header spans at hdrs_off and data_size bytes of data at data_off. Exchanges are counted in
 * worker `slot`'s shm counters; shm NULL: in none (the health checker, which has no slot and
 * must not write a worker's), and a local resource error is then left to the caller to log.
 * 0 or -errno. */
int upstream_init(struct upstream *up, uv_loop_t *loop, const struct conf *conf, struct shm *shm,
                  int slot, struct bufpool *bufs, size_t data_off, size_t data_size,
                  size_t hdrs_off, uint32_t max_hdrs);
/* Closes idle pooled connections and stops pooling (graceful stop). */
void upstream_drain(struct upstream *up);
/* Frees what upstream_init set up; every connection must be closed (after the loop ran). */
void upstream_free(struct upstream *up);

/* Starts rq on backend rq->backend: a pooled connection (sent at once) or a new one. Returns 0
 * (on_end will follow) or a negative upstream_err when it failed at once (no callback). Each
 * call sends the request at most once: a failure is reported, never retried here (the caller
 * decides about another attempt; UPSTREAM_ESTALE and connect/TLS failures are safe to retry). */
int upstream_start(struct upstream *up, struct upstream_req *rq);
/* The client drained a pending write: continue reading the response. */
void upstream_resume(struct upstream_req *rq);
/* The client went away: the exchange ends without a callback, and its connection is closed,
 * which cancels the request upstream, unless it can be reused cleanly (no request sent on it
 * yet, or the whole answer already read). */
void upstream_abort(struct upstream_req *rq);
/* "cannot resolve HOST: reason" when backend has no address because its lookup failed, else
 * NULL: the message of a 502 upstream_connect_failed. */
const char *upstream_resolve_error(const struct upstream *up, int backend);
/* Why backend's TLS client could not be set up (every exchange then fails with UPSTREAM_ETLS),
 * else NULL. */
const char *upstream_tls_error(const struct upstream *up, int backend);
/* Why the backend's latest failed TLS handshake failed ("certificate verify failed: ..."), or
 * NULL when none has. */
const char *upstream_tls_why(const struct upstream *up, int backend);

/* Where a started exchange stands, for messages (a timeout's). */
enum upstream_step {
    UPSTREAM_STEP_NONE = 0, /* not started, or over */
    UPSTREAM_STEP_RESOLVE,  /* waiting for the backend's first address */
    UPSTREAM_STEP_CONNECT,
    UPSTREAM_STEP_HANDSHAKE,
    UPSTREAM_STEP_SEND,
    UPSTREAM_STEP_WAIT_HEAD, /* request sent, response head not complete */
    UPSTREAM_STEP_BODY,
};
enum upstream_step upstream_step(const struct upstream_req *rq);
const char *upstream_step_str(enum upstream_step s); /* "connecting", ... */
/* "127.0.0.1:9101" or "[::1]:443": address `peer` (upstream_req.peer) of backend; "" when
 * there is no such address (any more). Returns buf. */
const char *upstream_peer_str(const struct upstream *up, int backend, int peer, char *buf,
                              size_t len);

#endif
