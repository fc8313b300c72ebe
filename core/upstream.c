/* Upstream connections of one process (a worker, or the health checker): keep-alive pools per
 * backend, non-blocking connect and TLS on a raw fd watched by uv_poll, request sending with
 * writev, response parsing with llhttp, and the accounting of each exchange in a worker's shm
 * slot. */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <llhttp.h>

#include "core/log.h"
#include "core/upstream.h"
#include "core/util.h"

enum uc_state {
    UC_CONNECTING = 0,
    UC_HANDSHAKE,
    UC_SENDING,
    UC_WAIT_HEAD, /* request sent, response head not complete */
    UC_BODY,      /* head handed over, streaming the body */
    UC_PAUSED,    /* the client's socket is full: not reading */
    UC_IDLE,      /* in the backend's keep-alive pool */
    UC_CLOSED,
};

/* What a run of the response parser stopped at. */
enum parse_ev {
    PARSE_MORE = 0, /* consumed everything, message not complete */
    PARSE_HEAD,     /* paused right after the head */
    PARSE_DONE,     /* paused right after the message */
    PARSE_ERR,
};

struct upconn {
    uv_poll_t poll;
    uv_timer_t timer;
    struct upstream *up;
    struct up_backend *be;
    struct upstream_req *rq;    /* NULL while idle */
    struct upconn *prev, *next; /* idle list, or free list (next) */
    int fd;
    enum uc_state state;
    int events;        /* uv_poll events currently requested */
    uint64_t due;      /* loop time (ms) the current timeout expires at; 0 = none */
    uint64_t armed_at; /* loop time the uv timer fires at (<= due), 0 = not armed */
    int handles;       /* open libuv handles, the struct is recycled when 0 */
    uint8_t tls_on, reused, head_done, complete, extra, hstate, ev;
    uint8_t perr;         /* libuv reported POLLERR and stopped watching: read until it says why */
    uint8_t decoding;     /* handing over the de-chunked body (rq->dechunk) */
    uint8_t addr_i;       /* index in be->addrs this connection went to */
    uint8_t addr_left;    /* further addresses to try when the connect fails */
    uint8_t send_cut;     /* the upstream answered before the request was all sent: not reused */
    uint32_t gen;         /* be->gen when it connected */
    char *wcur;           /* de-chunking: where the next body bytes go, in place */
    struct tls_conn *tls; /* TLS backends only (most of a connection's memory otherwise) */
    llhttp_t parser;
    char *buf;
    size_t rlen;              /* bytes of the response head gathered in buf */
    size_t seg0, total, sent; /* request bytes: buf[0, seg0) then body, total in all */
    struct proxy_hdr *hdrs;   /* at the tail of buf */
    uint32_t n_hdrs;
    const char *reason;
    size_t reason_len;
};

static llhttp_settings_t resp_settings;

/* May u go back to the pool after its response? Not with bytes of another response after it,
 * nor when the request was cut short by an early answer (the rest of its body would be read as
 * the next request), nor when the upstream asked to close. */
static int conn_reusable(struct upconn *u)
{
    return !u->extra && !u->send_cut && llhttp_should_keep_alive(&u->parser);
}

/* ---- buffers ---- */

void bufpool_init(struct bufpool *bp, size_t size, uint32_t max_free)
{
    bp->free = NULL;
    bp->size = size;
    bp->n_free = 0;
    bp->max_free = max_free;
}

void *bufpool_get(struct bufpool *bp)
{
    void *p = bp->free;
    if (p) {
        bp->free = *(void **)p;
        bp->n_free--;
        return p;
    }
    return malloc(bp->size);
}

void bufpool_put(struct bufpool *bp, void *p)
{
    if (!p)
        return;
    if (bp->n_free >= bp->max_free) {
        free(p);
        return;
    }
    *(void **)p = bp->free;
    bp->free = p;
    bp->n_free++;
}

void bufpool_free(struct bufpool *bp)
{
    while (bp->free) {
        void *p = bp->free;
        bp->free = *(void **)p;
        free(p);
    }
    bp->n_free = 0;
}

const char *upstream_strerror(enum upstream_err e)
{
    switch (e) {
    case UPSTREAM_OK:
        return "ok";
    case UPSTREAM_ECONNECT:
        return "connect failed";
    case UPSTREAM_ETLS:
        return "TLS failure";
    case UPSTREAM_ETIMEOUT:
        return "timeout";
    case UPSTREAM_ERESET:
        return "connection closed by backend";
    case UPSTREAM_ESTALE:
        return "pooled connection closed by backend before the request was sent";
    case UPSTREAM_EPROTO:
        return "invalid response";
    case UPSTREAM_ECLIENT:
        return "client gone";
    case UPSTREAM_ENOMEM:
        return "out of memory";
    case UPSTREAM_ELOCAL:
        return "out of a local resource";
    }
    return "?";
}

/* ---- accounting ---- */

/* A worker's in-flight slot (active + 1) was taken by the caller when it picked the backend
 * (shm_active_acquire, exact against max_conns); acct_end gives it back. The health checker's
 * exchanges (no wb) are counted nowhere: they are not traffic. */
static void acct_begin(struct upstream *up, struct upstream_req *rq)
{
    struct shm_wb *wb = up->backends[rq->backend].wb;
    if (wb)
        shm_counter_add(&wb->requests, 1);
}

/* Failures and successes are recorded by the client side, which knows the pool's fail_on. */
static void acct_end(struct upstream *up, struct upstream_req *rq, enum upstream_err err)
{
    if (up->backends[rq->backend].wb)
        shm_active_release(up->shm, (uint32_t)up->slot, (uint32_t)rq->backend);
    if (err == UPSTREAM_ECLIENT)
        up->aborts++;
}

/* ---- connection lifecycle ---- */

/* A connection's buffer: u->buf points at its data, the header spans sit before it (close to
 * the data, so that a response touches few pages). */
static char *buf_take(struct upstream *up)
{
    char *p = bufpool_get(up->bufs);
    return p ? p + up->data_off : NULL;
}

static void buf_give(struct upstream *up, char *buf)
{
    if (buf)
        bufpool_put(up->bufs, buf - up->data_off);
}

static void conn_handle_closed(uv_handle_t *h)
{
    struct upconn *u = h->data;
    if (--u->handles > 0)
        return;
    u->next = u->up->free_conns;
    u->up->free_conns = u;
}

static void poll_set(struct upconn *u, int events);

static void idle_unlink(struct upconn *u)
{
    struct up_backend *be = u->be;
    if (u->prev)
        u->prev->next = u->next;
    else
        be->idle = u->next;
    if (u->next)
        u->next->prev = u->prev;
    u->prev = u->next = NULL;
    be->n_idle--;
}

static void conn_close(struct upconn *u)
{
    struct upstream *up = u->up;
    if (u->state == UC_CLOSED)
        return;
    if (u->state == UC_IDLE)
        idle_unlink(u);
    u->state = UC_CLOSED;
    uv_close((uv_handle_t *)&u->poll, conn_handle_closed);
    uv_close((uv_handle_t *)&u->timer, conn_handle_closed);
    if (u->tls_on)
        tls_conn_free(u->tls);
    free(u->tls);
    u->tls = NULL;
    close(u->fd);
    buf_give(up, u->buf);
    u->buf = NULL;
    if (u->rq)
        u->rq->conn = NULL;
    u->rq = NULL;
    up->n_conns--;
}

static void on_poll(uv_poll_t *h, int status, int events);
static void on_timer(uv_timer_t *t);

/* uv_poll_start fails only with EEXIST (another handle of this loop polls the fd: never, each
 * connection has its own socket) and uv_poll_stop never (libuv 1.44); uv_timer_start only on a
 * closing handle, which a connection in use never has. */
static void poll_set(struct upconn *u, int events)
{
    if (events == u->events)
        return;
    u->events = events;
    if (events)
        uv_poll_start(&u->poll, events, on_poll);
    else
        uv_poll_stop(&u->poll);
}

/* Timeouts are re-armed lazily: most moves push the deadline later (a request, a response
 * piece, back to the pool), which only updates u->due; the uv timer armed for an earlier time
 * fires, sees the deadline moved and re-arms for it. So a steady stream of requests on pooled
 * connections touches the loop's timer heap about once per timeout period, not per event. */
static void timer_set(struct upconn *u, uint64_t ms)
{
    uint64_t now = uv_now(u->up->loop);
    u->due = now + ms;
    if (u->armed_at && u->armed_at <= u->due)
        return;
    u->armed_at = u->due;
    uv_timer_start(&u->timer, on_timer, ms, 0);
}

static void timer_clear(struct upconn *u)
{
    u->due = 0; /* the armed timer, if any, finds nothing due */
}

/* Puts u, free of any exchange, in its backend's keep-alive pool when there is room for it (and
 * the worker is not draining, and the addresses did not change); 0 when the caller must close
 * it instead. */
static int conn_pool(struct upconn *u)
{
    struct upstream *up = u->up;
    struct up_backend *be = u->be;

    if (up->draining || up->no_pool || be->n_idle >= be->cb->keepalive || u->gen != be->gen)
        return 0;
    buf_give(up, u->buf);
    u->buf = NULL;
    u->state = UC_IDLE;
    u->reused = 1;
    u->prev = NULL;
    u->next = be->idle;
    if (be->idle)
        be->idle->prev = u;
    be->idle = u;
    be->n_idle++;
    poll_set(u, UV_READABLE);
    timer_set(u, be->cp->pool_idle_timeout_ms);
    return 1;
}

/* Ends the exchange of u->rq: accounting, connection pooled or closed, then on_end. Nothing
 * may touch u or rq after this returns. A connection whose request was aborted while it was
 * being set up (no rq) is only closed. */
static void exchange_end(struct upconn *u, enum upstream_err err, int reusable)
{
    struct upstream *up = u->up;
    struct upstream_req *rq = u->rq;

    if (!rq) {
        conn_close(u);
        return;
    }
    acct_end(up, rq, err);
    rq->conn = NULL;
    u->rq = NULL;
    if (!(reusable && err == UPSTREAM_OK && conn_pool(u)))
        conn_close(u);
    rq->ops->on_end(rq->ctx, err);
}

/* A connection set up for a request that was aborted meanwhile is ready: it never carried a
 * request, so it serves the next one from the pool. */
static void conn_ready_unused(struct upconn *u)
{
    if (!conn_pool(u))
        conn_close(u);
}

static struct upconn *conn_new(struct upstream *up, struct up_backend *be, int fd)
{
    struct upconn *u = up->free_conns;
    if (u)
        up->free_conns = u->next;
    else if (!(u = malloc(sizeof(*u))))
        return NULL;
    memset(u, 0, sizeof(*u));
    u->up = up;
    u->be = be;
    u->fd = fd;
    if (uv_poll_init(up->loop, &u->poll, fd) != 0) {
        u->next = up->free_conns;
        up->free_conns = u;
        return NULL;
    }
    uv_timer_init(up->loop, &u->timer); /* cannot fail: it only initialises the handle */
    u->poll.data = u;
    u->timer.data = u;
    u->handles = 2;
    up->n_conns++;
    return u;
}

static void resolve_soon(struct up_backend *be);

/* Is err (errno of socket(), or of connect() with `connecting`) the gateway running out of
 * something of its own, which another backend would meet just the same? fds (EMFILE, ENFILE),
 * kernel memory (ENOBUFS, ENOMEM); on connect also ephemeral ports (EADDRNOTAVAIL, and EAGAIN,
 * which Linux returns for a full routing cache). */
static int upstream_errno_local(int err, int connecting)
{
    if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM)
        return 1;
    return connecting && (err == EADDRNOTAVAIL || err == EAGAIN);
}

/* Logs a local resource error (at most once a second per worker, with a count) and returns
 * -UPSTREAM_ELOCAL: the client gets a 503 and the backend's health is left alone. */
static int upstream_local_error(struct upstream *up, struct up_backend *be, const char *what,
                                int err)
{
    uint64_t skipped;
    char note[LOG_RATE_NOTE];

    if (!up->shm)
        return -UPSTREAM_ELOCAL; /* the health checker says it itself: "check not run" */
    if (log_rate_ok(&up->local_log, uv_now(up->loop), &skipped))
        log_warn("backend %s: %s: %s: the gateway is out of a local resource (check maxconn "
                 "and RLIMIT_NOFILE); answering 503, the backend's health is not affected%s",
                 be->cb->name, what, strerror(err), log_rate_note(skipped, note));
    return -UPSTREAM_ELOCAL;
}

/* Opens a new connection for rq to be->addrs[first], or the next addresses when a connect
 * fails at once; left = how many more to try after first (the answer comes through the poll
 * callback). */
static int conn_connect_at(struct upstream *up, struct upstream_req *rq, int first, int left)
{
    struct up_backend *be = &up->backends[rq->backend];
    int one = 1, fd = -1, i = first;

    if (!be->n_addrs)
        return -UPSTREAM_ECONNECT;
    if (be->cb->url.tls && !be->tls_ok)
        return -UPSTREAM_ETLS;
    for (;;) {
        const struct sockaddr_storage *sa = &be->addrs[i];
        rq->peer = i;
        fd = socket(sa->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd == -1) {
            rq->sys_err = errno;
            if (upstream_errno_local(errno, 0))
                return upstream_local_error(up, be, "socket", errno);
        }
        if (fd != -1) {
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            if (connect(fd, (const struct sockaddr *)sa, be->addr_lens[i]) == 0 ||
                errno == EINPROGRESS)
                break;
            int err = errno;
            close(fd);
            fd = -1;
            rq->sys_err = err;
            if (upstream_errno_local(err, 1))
                return upstream_local_error(up, be, "connect", err);
            log_debug("backend %s: connect: %s", be->cb->name, strerror(err));
        }
        if (left-- <= 0) {
            resolve_soon(be);
            return -UPSTREAM_ECONNECT;
        }
        i = (i + 1) % be->n_addrs;
    }
    struct upconn *u = conn_new(up, be, fd);
    if (!u) {
        close(fd);
        return -UPSTREAM_ENOMEM;
    }
    u->addr_i = (uint8_t)i;
    u->addr_left = (uint8_t)left;
    u->gen = be->gen;
    u->buf = buf_take(up);
    if (!u->buf) {
        conn_close(u);
        return -UPSTREAM_ENOMEM;
    }
    u->rq = rq;
    rq->conn = u;
    u->state = UC_CONNECTING;
    poll_set(u, UV_WRITABLE);
    timer_set(u, rq->connect_timeout_ms ? rq->connect_timeout_ms : be->cp->connect_timeout_ms);
    return 0;
}

static int conn_connect(struct upstream *up, struct upstream_req *rq)
{
    struct up_backend *be = &up->backends[rq->backend];
    return conn_connect_at(up, rq, be->addr_cur, be->n_addrs - 1);
}

/* A connect that failed after it started: try the backend's next address while there is one
 * (same address list), else report it. */
static void conn_connect_failed(struct upconn *u)
{
    struct upstream *up = u->up;
    struct up_backend *be = u->be;
    struct upstream_req *rq = u->rq;

    if (!rq) {
        conn_close(u); /* its request was aborted: nobody waits for another address */
        return;
    }
    if (u->addr_left && u->gen == be->gen && be->n_addrs > 1) {
        int next = (u->addr_i + 1) % be->n_addrs, left = u->addr_left - 1;
        conn_close(u);
        int r = conn_connect_at(up, rq, next, left);
        if (r == 0)
            return;
        acct_end(up, rq, (enum upstream_err) - r);
        rq->ops->on_end(rq->ctx, (enum upstream_err) - r);
        return;
    }
    resolve_soon(be);
    exchange_end(u, UPSTREAM_ECONNECT, 0);
}

/* ---- sending ---- */

/* The upstream answers (or closes) before the whole request was written to it, as a server
 * that refuses a body does (413 after the head): stop sending and read what it says, which the
 * client gets like any answer. Plain TCP only: mbedTLS cannot read while a record it was given
 * to write waits. */
static void conn_early_answer(struct upconn *u)
{
    u->send_cut = 1;
    u->state = UC_WAIT_HEAD;
    poll_set(u, UV_READABLE);
}

/* A write of the request failed. Before its first byte the backend cannot have seen it: a pooled
 * connection it closed while idle (stale), or a new one it dropped right away (a connect
 * failure). After that it may have, and only the caller's retry_on may send it again. */
static int send_failed(const struct upconn *u)
{
    if (u->sent)
        return -UPSTREAM_ERESET;
    return u->reused ? -UPSTREAM_ESTALE : -UPSTREAM_ECONNECT;
}

/* The request body from byte off: fills iov (at most max entries) with what is left of it,
 * returns the number filled. */
static int body_pieces(const struct upstream_req *rq, size_t off, struct iovec *iov, int max)
{
    if (rq->body_n <= 0) {
        if (off >= rq->body_len || max < 1)
            return 0;
        iov[0].iov_base = (void *)(rq->body + off);
        iov[0].iov_len = rq->body_len - off;
        return 1;
    }
    int n = 0;
    for (int i = 0; i < rq->body_n && n < max; i++) {
        size_t l = rq->body_iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        iov[n].iov_base = (char *)rq->body_iov[i].iov_base + off;
        iov[n++].iov_len = l - off;
        off = 0;
    }
    return n;
}

/* A plain request body up to this size is copied behind its head and sent with it. */
#define UPSTREAM_COALESCE_MAX 4096

static int conn_send(struct upconn *u)
{
    struct upstream_req *rq = u->rq;
    struct shm_wb *wb = u->be->wb;
    uint64_t before = u->sent;
    int ret = 0;

    while (u->sent < u->total) {
        ssize_t n;
        if (u->tls_on) {
            const char *p;
            size_t l;
            if (u->sent < u->seg0) {
                p = u->buf + u->sent;
                l = u->seg0 - u->sent;
            } else {
                struct iovec b;
                body_pieces(rq, u->sent - u->seg0, &b, 1);
                p = b.iov_base;
                l = b.iov_len;
            }
            n = tls_conn_write(u->tls, p, l);
            if (n == TLS_WANT_READ || n == TLS_WANT_WRITE) {
                poll_set(u, n == TLS_WANT_READ ? UV_READABLE : UV_WRITABLE);
                goto out;
            }
            if (n < 0) {
                ret = send_failed(u);
                goto out;
            }
        } else {
            struct iovec iov[1 + UPSTREAM_BODY_PIECES];
            int cnt = 0;
            if (u->sent < u->seg0) {
                iov[cnt].iov_base = u->buf + u->sent;
                iov[cnt++].iov_len = u->seg0 - u->sent;
                if (u->seg0 < u->total) /* else the body was copied behind the head */
                    cnt += body_pieces(rq, 0, iov + cnt, UPSTREAM_BODY_PIECES);
            } else {
                cnt += body_pieces(rq, u->sent - u->seg0, iov + cnt, UPSTREAM_BODY_PIECES);
            }
            if (cnt == 1) {
                n = send(u->fd, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL);
            } else {
                struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
                n = sendmsg(u->fd, &mh, MSG_NOSIGNAL);
            }
            if (n == -1) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN) {
                    /* once the upstream has some of the request, it may answer early */
                    poll_set(u, u->sent ? UV_WRITABLE | UV_READABLE : UV_WRITABLE);
                    goto out;
                }
                if (u->sent && (errno == EPIPE || errno == ECONNRESET)) {
                    /* it may have answered before closing: that answer is read first, and
                     * without one the read reports the reset */
                    conn_early_answer(u);
                    goto out;
                }
                ret = send_failed(u);
                goto out;
            }
        }
        u->sent += (size_t)n;
    }
    /* all sent: wait for the response head */
    rq->written = 1;
    u->state = UC_WAIT_HEAD;
    poll_set(u, UV_READABLE);
out:
    if (u->sent > before && wb)
        shm_counter_add(&wb->bytes_out, u->sent - before);
    return ret;
}

/* Builds the request into the connection's buffer and starts sending it. */
static int conn_begin(struct upconn *u)
{
    struct upstream *up = u->up;
    struct upstream_req *rq = u->rq;

    if (!u->buf && !(u->buf = buf_take(up)))
        return -UPSTREAM_ENOMEM;
    u->hdrs = (struct proxy_hdr *)(u->buf - up->data_off + up->hdrs_off);
    int n = rq->ops->build_head(rq->ctx, u->be->cb, u->buf, up->data_size);
    if (n < 0)
        return -UPSTREAM_ENOMEM;
    u->seg0 = (size_t)n;
    u->total = (size_t)n + rq->body_len;
    u->sent = 0;
    u->send_cut = 0;
    /* TLS: one record for head and body when they fit together; plain: one buffer for a
     * body of a few KB (most requests), which costs the kernel less than the pieces */
    if ((u->tls_on || rq->body_len <= UPSTREAM_COALESCE_MAX) && rq->body_len &&
        u->total <= up->data_size && rq->body_n <= UPSTREAM_BODY_PIECES) {
        struct iovec iov[UPSTREAM_BODY_PIECES];
        int cnt = body_pieces(rq, 0, iov, UPSTREAM_BODY_PIECES);
        size_t at = (size_t)n;
        for (int i = 0; i < cnt; i++) {
            memcpy(u->buf + at, iov[i].iov_base, iov[i].iov_len);
            at += iov[i].iov_len;
        }
        u->seg0 = u->total;
    }
    llhttp_init(&u->parser, HTTP_RESPONSE, &resp_settings);
    u->parser.data = u;
    u->rlen = 0;
    u->head_done = u->complete = u->extra = u->decoding = 0;
    u->n_hdrs = 0;
    u->hstate = 0;
    u->state = UC_SENDING;
    timer_set(u, rq->head_timeout_ms ? rq->head_timeout_ms : u->be->cp->first_byte_timeout_ms);
    return conn_send(u);
}

/* An exchange failed after it started: report it. Nothing is sent again from here: another
 * attempt is the caller's decision, counted as one (x-aigw-attempts, retries, retry budget). */
static void conn_fail(struct upconn *u, enum upstream_err err)
{
    log_debug("backend %s: %s", u->be->cb->name, upstream_strerror(err));
    exchange_end(u, err, 0);
}

/* ---- receiving ---- */

static int on_msg_begin(llhttp_t *p)
{
    struct upconn *u = p->data;
    u->n_hdrs = 0;
    u->hstate = 0;
    u->reason = NULL;
    u->reason_len = 0;
    return 0;
}

static int on_status(llhttp_t *p, const char *at, size_t len)
{
    struct upconn *u = p->data;
    if (!u->reason)
        u->reason = at;
    u->reason_len += len;
    return 0;
}

/* Header pieces: see proxy_hdr_piece; too many headers or obs-fold is a malformed response. */
static int on_hfield(llhttp_t *p, const char *at, size_t len)
{
    struct upconn *u = p->data;
    if (u->head_done)
        return 0; /* trailers: they pass through with the chunk framing, or are dropped */
    return proxy_hdr_piece(u->hdrs, &u->n_hdrs, u->up->max_hdrs, &u->hstate, PROXY_PIECE_NAME, at,
                           len) == 0
               ? 0
               : -1;
}

static int on_hvalue(llhttp_t *p, const char *at, size_t len)
{
    struct upconn *u = p->data;
    if (u->head_done)
        return 0;
    return proxy_hdr_piece(u->hdrs, &u->n_hdrs, u->up->max_hdrs, &u->hstate, PROXY_PIECE_VALUE, at,
                           len) == 0
               ? 0
               : -1;
}

static int on_headers_done(llhttp_t *p)
{
    struct upconn *u = p->data;
    u->ev = PARSE_HEAD;
    /* 1xx, 204, 304 and HEAD responses have no body, whatever Content-Length or
     * Transfer-Encoding they carry (llhttp leaves that to us): the message completes here */
    if ((p->status_code >= 100 && p->status_code < 200) || p->status_code == 204 ||
        p->status_code == 304 || u->rq->head_only)
        return 1;
    return HPE_PAUSED;
}

static int on_body(llhttp_t *p, const char *at, size_t len)
{
    struct upconn *u = p->data;
    if (u->decoding) {
        /* chunk framing only ever shrinks the data: move body bytes down over it */
        memmove(u->wcur, at, len);
        u->wcur += len;
    }
    return 0;
}

static int on_msg_done(llhttp_t *p)
{
    struct upconn *u = p->data;
    u->ev = PARSE_DONE;
    return HPE_PAUSED;
}

/* The response is a text/event-stream. */
static int is_sse(const struct upconn *u)
{
    static const char sse[] = "text/event-stream";
    for (uint32_t i = 0; i < u->n_hdrs; i++) {
        const struct proxy_hdr *h = &u->hdrs[i];
        if (util_span_ieq(h->name, h->name_len, "content-type"))
            return h->value_len >= sizeof(sse) - 1 && util_span_ieq(h->value, sizeof(sse) - 1, sse);
    }
    return 0;
}

static enum parse_ev parse(struct upconn *u, const char *p, size_t n, const char **stop)
{
    u->ev = PARSE_MORE;
    llhttp_errno_t e = llhttp_execute(&u->parser, p, n);
    if (e == HPE_OK)
        return PARSE_MORE;
    if (e != HPE_PAUSED)
        return PARSE_ERR;
    *stop = llhttp_get_error_pos(&u->parser);
    return (enum parse_ev)u->ev;
}

/* After the client side took bytes: 1 when u must not be touched any more (handed back,
 * paused or closed), 0 to keep reading. */
static int after_hand(struct upconn *u, int ret)
{
    if (ret == UPSTREAM_HAND_BAD) {
        exchange_end(u, UPSTREAM_EPROTO, 0);
        return 1;
    }
    if (ret < 0) {
        exchange_end(u, UPSTREAM_ECLIENT, 0);
        return 1;
    }
    if (ret == 1) {
        u->state = UC_PAUSED;
        poll_set(u, 0);
        timer_clear(u);
        return 1;
    }
    if (u->complete) {
        exchange_end(u, UPSTREAM_OK, conn_reusable(u));
        return 1;
    }
    u->rlen = 0;
    return 0;
}

/* After a parse of body bytes [.., end) that stopped at `stop`: whether the response is
 * complete and bytes of another one follow it (extra), the idle timer re-armed while it is
 * not, and where the body bytes to hand over end (de-chunked: where they were moved to). */
static const char *body_end(struct upconn *u, enum parse_ev ev, const char *stop, const char *end)
{
    u->complete = ev == PARSE_DONE;
    const char *bend = u->complete ? stop : end;
    /* TLS: records read ahead past the response count as bytes after it too */
    u->extra = bend < end || (u->complete && u->tls_on && tls_conn_buffered(u->tls));
    if (u->decoding)
        bend = u->wcur;
    if (!u->complete)
        timer_set(u, u->be->cp->idle_timeout_ms);
    return bend;
}

/* Bytes just read at buf + rlen. Returns 1 when u must not be touched any more. */
static int on_data(struct upconn *u, const char *data, size_t n)
{
    const char *p = data, *end = data + n, *stop = end, *bend;
    enum parse_ev ev;

    if (u->head_done) {
        u->wcur = (char *)p;
        ev = parse(u, p, n, &stop);
        if (ev == PARSE_ERR) {
            exchange_end(u, UPSTREAM_EPROTO, 0);
            return 1;
        }
        bend = body_end(u, ev, stop, end);
        struct upstream_req *rq = u->rq;
        return after_hand(u, rq->ops->on_body(rq->ctx, p, (size_t)(bend - p), u->complete));
    }

    u->rlen += n;
    for (;;) {
        ev = parse(u, p, (size_t)(end - p), &stop);
        if (ev == PARSE_ERR) {
            conn_fail(u, UPSTREAM_EPROTO);
            return 1;
        }
        if (ev == PARSE_MORE)
            return 0;
        int status = u->parser.status_code;
        if (status == 101 || status < 100) {
            /* no upgrade is asked for, and a status below 100 is no interim answer to wait
             * past (llhttp takes any three digits) */
            conn_fail(u, UPSTREAM_EPROTO);
            return 1;
        }
        if (status >= 200)
            break;
        /* 1xx: drop it and parse what follows from the buffer's start */
        llhttp_resume(&u->parser);
        size_t rest = (size_t)(end - stop);
        memmove(u->buf, stop, rest);
        u->rlen = rest;
        p = u->buf;
        end = p + rest;
        if (!rest)
            return 0;
    }

    struct upstream_req *rq = u->rq;
    struct upstream_resp r;
    rq->status = u->parser.status_code;
    r.status = rq->status;
    r.reason = u->reason ? u->reason : "";
    r.reason_len = u->reason_len;
    r.hdrs = u->hdrs;
    r.n_hdrs = u->n_hdrs;
    /* a 204 or 304 has no body to frame, even one that says chunked */
    r.chunked = (u->parser.flags & F_CHUNKED) != 0 && r.status != 204 && r.status != 304;
    r.until_close = !rq->head_only && llhttp_message_needs_eof(&u->parser);
    r.sse = is_sse(u);
    r.rechunk = 0;
    u->decoding = r.chunked && rq->dechunk && !rq->head_only;
    if (u->decoding) {
        /* the client cannot take chunks: the body goes decoded, delimited by the close */
        r.chunked = 0;
        r.until_close = 1;
    } else if (!rq->dechunk && !rq->head_only &&
               (r.until_close || r.sse || (rq->bare && r.chunked)) && r.status != 204 &&
               r.status != 304) {
        /* framed by the client side: a cut stream ends with an error event, and a cut body
         * delimited by the close cannot pass for a complete one */
        u->decoding = r.chunked;
        r.rechunk = 1;
    }
    u->head_done = 1;
    u->state = UC_BODY;

    const char *body = stop;
    u->wcur = (char *)body;
    if (ev == PARSE_HEAD) {
        llhttp_resume(&u->parser);
        ev = parse(u, body, (size_t)(end - body), &stop);
        if (ev == PARSE_ERR) {
            conn_fail(u, UPSTREAM_EPROTO);
            return 1;
        }
    }
    bend = body_end(u, ev, stop, end);
    return after_hand(u, rq->ops->on_head(rq->ctx, &r, body, (size_t)(bend - body), u->complete));
}

/* TLS body bytes: a record is handed over where mbedTLS decrypted it, so it goes from the TLS
 * buffer to the client write with no copy (valid until the next read, which waits for a
 * pending client write). When more whole records are already waiting (a burst of SSE events,
 * one record each), they are gathered into the connection's buffer instead: copying a few
 * hundred bytes costs far less than a client write per record. */
static ssize_t tls_body_read(struct upconn *u, char **p)
{
    ssize_t n = tls_conn_read_inplace(u->tls, p);
    if (n <= 0 || !tls_conn_pending(u->tls))
        return n;
    if (!u->buf && !(u->buf = buf_take(u->up)))
        return n; /* no buffer: one record at a time */
    size_t len = (size_t)n, cap = u->up->data_size;
    memcpy(u->buf, *p, len); /* a record's data (16 KB at most) fits a buffer */
    while (len < cap && tls_conn_pending(u->tls)) {
        ssize_t m = tls_conn_read(u->tls, u->buf + len, cap - len);
        if (m < 0 && m != TLS_WANT_READ && m != TLS_WANT_WRITE)
            return m; /* the connection is broken: what came before goes with it */
        if (m <= 0)
            break; /* an end is seen again by the next read */
        len += (size_t)m;
    }
    *p = u->buf;
    return (ssize_t)len;
}

/* Reads the next response bytes and points *p at them: into buf + rlen while the head is
 * gathered (it must be contiguous), then wherever they are (TLS: tls_body_read). */
static ssize_t io_read(struct upconn *u, char **p)
{
    if (u->tls_on && u->head_done)
        return tls_body_read(u, p);
    /* a stream gives its buffer back between pieces (see conn_read) */
    if (!u->buf && !(u->buf = buf_take(u->up)))
        return -ENOMEM;
    char *buf = u->buf + u->rlen;
    size_t len = u->up->data_size - u->rlen;
    if (u->tls_on) {
        *p = buf;
        return tls_conn_read(u->tls, buf, len);
    }
    ssize_t n;
    *p = buf;
    do
        n = recv(u->fd, buf, len, 0);
    while (n == -1 && errno == EINTR);
    return n == -1 ? -errno : n;
}

static void conn_read(struct upconn *u)
{
    struct shm_wb *wb = u->be->wb;

    for (;;) {
        char *data;
        if (!u->head_done && u->rlen >= u->up->data_size) {
            conn_fail(u, UPSTREAM_EPROTO); /* response head larger than a buffer */
            return;
        }
        ssize_t n = io_read(u, &data);
        if (n == TLS_WANT_READ) {
            if (u->perr) {
                u->perr = 0;
                poll_set(u, UV_READABLE);
            }
            break;
        }
        if (n == TLS_WANT_WRITE) {
            poll_set(u, UV_READABLE | UV_WRITABLE);
            break;
        }
        if (n == -ENOMEM) {
            exchange_end(u, UPSTREAM_ENOMEM, 0);
            return;
        }
        if (n <= 0) {
            if (n == 0 && u->head_done && llhttp_message_needs_eof(&u->parser) &&
                (!u->tls_on || u->tls->close_notify)) {
                /* close-delimited body: the close is its end (a TLS one must say so with
                 * close_notify, else the body may have been cut) */
                llhttp_finish(&u->parser);
                u->complete = 1;
                struct upstream_req *rq = u->rq;
                after_hand(u, rq->ops->on_body(rq->ctx, "", 0, 1));
                return;
            }
            if (u->head_done)
                exchange_end(u, UPSTREAM_ERESET, 0);
            else
                conn_fail(u, UPSTREAM_ERESET);
            return;
        }
        if (wb)
            shm_counter_add(&wb->bytes_in, (uint64_t)n);
        if (on_data(u, data, (size_t)n))
            return;
        /* one read per poll event, except bytes mbedTLS already decrypted or whole records
         * read ahead, or when the poll was stopped by an error that only a later read will
         * report */
        if (!u->perr && (!u->tls_on || !tls_conn_pending(u->tls)))
            break;
    }
    /* Between the pieces of a body (an SSE stream waits seconds for the next) the buffer
     * holds nothing: everything read went to the client. Back to the pool until the next
     * piece arrives, so an open stream does not hold one. */
    if (u->head_done) {
        buf_give(u->up, u->buf);
        u->buf = NULL;
    }
}

/* ---- event handlers ---- */

static void conn_handshake(struct upconn *u)
{
    int r = tls_conn_handshake(u->tls);
    if (r == TLS_WANT_READ || r == TLS_WANT_WRITE) {
        poll_set(u, r == TLS_WANT_READ ? UV_READABLE : UV_WRITABLE);
        return;
    }
    if (r != 0) {
        char *why = u->be->tls_why;
        /* the health checker reports it with the check's result instead */
        log_msg(u->up->shm ? LOG_LVL_WARN : LOG_LVL_DEBUG, "backend %s: TLS handshake: %s",
                u->be->cb->name, tls_strerror(u->tls, r, why, sizeof(u->be->tls_why)));
        if (u->rq)
            u->rq->sys_err = r;
        exchange_end(u, UPSTREAM_ETLS, 0);
        return;
    }
    if (!u->rq) {
        conn_ready_unused(u);
        return;
    }
    r = conn_begin(u);
    if (r < 0)
        conn_fail(u, (enum upstream_err) - r);
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    struct upconn *u = h->data;
    int err = 0;
    socklen_t len = sizeof(err);

    if (status < 0) {
        /* libuv stopped the handle (POLLERR): restart it on the next poll_set */
        u->events = 0;
        u->perr = 1;
    } else {
        u->perr = 0;
    }
    switch (u->state) {
    case UC_CONNECTING:
        /* a refused connect comes as POLLERR, which libuv reports as UV_EBADF: SO_ERROR says
         * what it was */
        if (getsockopt(u->fd, SOL_SOCKET, SO_ERROR, &err, &len) == -1)
            err = errno;
        if (status < 0 || err) {
            err = err ? err : -status;
            log_debug("backend %s: connect: %s", u->be->cb->name, strerror(err));
            if (u->rq)
                u->rq->sys_err = err;
            conn_connect_failed(u);
            return;
        }
        if (u->gen == u->be->gen)
            u->be->addr_cur = u->addr_i; /* the next connections start with what worked */
        if (u->be->cb->url.tls) {
            /* a malloc per new TLS connection, not per request: connections are pooled */
            if (!(u->tls = malloc(sizeof(*u->tls)))) {
                exchange_end(u, UPSTREAM_ENOMEM, 0);
                return;
            }
            if (tls_conn_init(u->tls, &u->be->tls, u->fd) != 0) {
                exchange_end(u, UPSTREAM_ETLS, 0);
                return;
            }
            u->tls_on = 1;
            u->state = UC_HANDSHAKE;
            conn_handshake(u);
            return;
        }
        if (!u->rq) {
            conn_ready_unused(u);
            return;
        }
        if ((err = conn_begin(u)) < 0)
            conn_fail(u, (enum upstream_err) - err);
        return;
    case UC_HANDSHAKE:
        conn_handshake(u);
        return;
    case UC_SENDING:
        if (!u->tls_on && (events & UV_READABLE) && u->sent) {
            conn_early_answer(u);
            conn_read(u);
            return;
        }
        if ((err = conn_send(u)) < 0)
            conn_fail(u, (enum upstream_err) - err);
        return;
    case UC_WAIT_HEAD:
    case UC_BODY:
        conn_read(u);
        return;
    case UC_IDLE:
        /* an idle pooled connection became readable: the backend closed it (or misbehaved) */
        conn_close(u);
        return;
    case UC_PAUSED:
    case UC_CLOSED:
        poll_set(u, 0);
        return;
    }
}

static void on_timer(uv_timer_t *t)
{
    struct upconn *u = t->data;
    uint64_t now = uv_now(u->up->loop);

    u->armed_at = 0;
    if (!u->due)
        return;
    if (now < u->due) {
        /* the deadline moved on since the timer was armed */
        u->armed_at = u->due;
        uv_timer_start(&u->timer, on_timer, u->due - now, 0);
        return;
    }
    u->due = 0;
    switch (u->state) {
    case UC_IDLE:
        conn_close(u);
        return;
    case UC_CONNECTING:
        log_debug("backend %s: connect timeout", u->be->cb->name);
        if (u->rq)
            u->rq->sys_err = ETIMEDOUT;
        resolve_soon(u->be);
        exchange_end(u, UPSTREAM_ECONNECT, 0);
        return;
    case UC_HANDSHAKE:
        log_debug("backend %s: TLS handshake timeout", u->be->cb->name);
        exchange_end(u, UPSTREAM_ETLS, 0);
        return;
    case UC_SENDING:
    case UC_WAIT_HEAD:
    case UC_BODY:
        log_debug("backend %s: timeout in state %d", u->be->cb->name, (int)u->state);
        exchange_end(u, UPSTREAM_ETIMEOUT, 0);
        return;
    case UC_PAUSED:
    case UC_CLOSED:
        return;
    }
}

/* ---- addresses ---- */

static void on_wait_timeout(uv_timer_t *t);

/* Closes the backend's wait timer once the worker drains and nobody waits any more: the loop
 * must be able to end. */
static void wait_timer_settle(struct upstream *up, struct up_backend *be)
{
    if (!be->wait_timer_on)
        return;
    if (be->waiters) {
        return;
    }
    uv_timer_stop(&be->wait_timer);
    if (up->draining) {
        uv_close((uv_handle_t *)&be->wait_timer, NULL);
        be->wait_timer_on = 0;
    }
}

/* Starts (connect) or fails (err) every request that waited for the backend's address. Each is
 * detached first: on_end may start requests that wait again. */
static void waiters_run(struct upstream *up, struct up_backend *be, enum upstream_err err)
{
    struct upstream_req *list = be->waiters;
    be->waiters = NULL;
    wait_timer_settle(up, be);
    while (list) {
        struct upstream_req *rq = list;
        list = rq->wait_next;
        rq->wait_next = NULL;
        rq->conn = NULL;
        int r = err == UPSTREAM_OK ? conn_connect(up, rq) : -(int)err;
        if (r < 0) {
            acct_end(up, rq, (enum upstream_err) - r);
            rq->ops->on_end(rq->ctx, (enum upstream_err) - r);
        }
    }
}

static void on_wait_timeout(uv_timer_t *t)
{
    struct up_backend *be = t->data;
    if (!be->n_addrs)
        snprintf(be->err, sizeof(be->err), "cannot resolve %s: lookup timed out", be->cb->url.host);
    log_debug("backend %s: %s", be->cb->name, be->err);
    waiters_run(be->up, be, UPSTREAM_ECONNECT);
}

static int addrs_same(const struct up_backend *be, const struct sockaddr_storage *a,
                      const socklen_t *lens, int n)
{
    if (n != be->n_addrs)
        return 0;
    for (int i = 0; i < n; i++)
        if (lens[i] != be->addr_lens[i] || memcmp(&a[i], &be->addrs[i], lens[i]) != 0)
            return 0;
    return 1;
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct up_backend *be = req->data;
    struct upstream *up = be->up;
    struct sockaddr_storage addrs[UPSTREAM_MAX_ADDRS];
    socklen_t lens[UPSTREAM_MAX_ADDRS];
    int n = 0;

    be->resolving = 0;
    if (status == UV_ECANCELED) {
        uv_freeaddrinfo(res);
        waiters_run(up, be, UPSTREAM_ECONNECT);
        return;
    }
    for (struct addrinfo *ai = status == 0 ? res : NULL; ai && n < UPSTREAM_MAX_ADDRS;
         ai = ai->ai_next) {
        if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) ||
            ai->ai_addrlen > sizeof(addrs[0]))
            continue;
        memcpy(&addrs[n], ai->ai_addr, ai->ai_addrlen);
        lens[n++] = ai->ai_addrlen;
    }
    uv_freeaddrinfo(res);
    if (n == 0) {
        const char *why = status < 0 ? uv_strerror(status) : "no usable address";
        if (!be->fail_streak++)
            log_warn("backend %s: cannot resolve %s: %s%s", be->cb->name, be->cb->url.host, why,
                     be->n_addrs ? " (keeping the last addresses)" : "");
        if (!be->n_addrs) {
            snprintf(be->err, sizeof(be->err), "cannot resolve %s: %s", be->cb->url.host, why);
            waiters_run(up, be, UPSTREAM_ECONNECT);
        }
        return;
    }
    if (be->fail_streak)
        log_info("backend %s: %s resolves again", be->cb->name, be->cb->url.host);
    be->fail_streak = 0;
    be->err[0] = '\0';
    if (!addrs_same(be, addrs, lens, n)) {
        if (be->n_addrs)
            log_info("backend %s: the addresses of %s changed", be->cb->name, be->cb->url.host);
        memcpy(be->addrs, addrs, sizeof(addrs[0]) * (size_t)n);
        memcpy(be->addr_lens, lens, sizeof(lens[0]) * (size_t)n);
        be->n_addrs = n;
        be->addr_cur = 0;
        be->gen++;
        /* pooled connections go to the old addresses; busy ones are not pooled again (gen) */
        while (be->idle)
            conn_close(be->idle);
    }
    waiters_run(up, be, UPSTREAM_OK);
}

/* Starts a lookup of be's host name; 0 or -errno (then be->err says why). */
static int resolve_start(struct upstream *up, struct up_backend *be)
{
    struct addrinfo hints;
    char port[8];

    if (be->numeric || be->resolving)
        return 0;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    snprintf(port, sizeof(port), "%u", be->cb->url.port);
    be->gai.data = be;
    be->resolve_at = uv_now(up->loop);
    int r = uv_getaddrinfo(up->loop, &be->gai, on_resolved, be->cb->url.host, port, &hints);
    if (r != 0) {
        if (!be->n_addrs)
            snprintf(be->err, sizeof(be->err), "cannot resolve %s: %s", be->cb->url.host,
                     uv_strerror(r));
        log_warn("backend %s: cannot resolve %s: %s", be->cb->name, be->cb->url.host,
                 uv_strerror(r));
        return r;
    }
    be->resolving = 1;
    return 0;
}

/* After a failed connect: the address may have moved. At most one lookup per
 * UPSTREAM_RERESOLVE_MIN_MS per backend. */
static void resolve_soon(struct up_backend *be)
{
    struct upstream *up = be->up;
    if (be->numeric || be->resolving || up->draining)
        return;
    if (uv_now(up->loop) - be->resolve_at < UPSTREAM_RERESOLVE_MIN_MS)
        return;
    resolve_start(up, be);
}

static void on_resolve_timer(uv_timer_t *t)
{
    struct upstream *up = t->data;
    for (int i = 0; i < up->n_backends; i++)
        resolve_start(up, &up->backends[i]);
}

const char *upstream_resolve_error(const struct upstream *up, int backend)
{
    const struct up_backend *be = &up->backends[backend];
    return !be->n_addrs && be->err[0] ? be->err : NULL;
}

const char *upstream_tls_error(const struct upstream *up, int backend)
{
    const struct up_backend *be = &up->backends[backend];
    return be->cb->url.tls && !be->tls_ok ? be->tls_err : NULL;
}

const char *upstream_tls_why(const struct upstream *up, int backend)
{
    const struct up_backend *be = &up->backends[backend];
    return be->tls_why[0] ? be->tls_why : NULL;
}

const char *upstream_peer_str(const struct upstream *up, int backend, int peer, char *buf,
                              size_t len)
{
    const struct up_backend *be = &up->backends[backend];
    char ip[INET6_ADDRSTRLEN];

    if (len)
        buf[0] = '\0';
    if (peer < 0 || peer >= be->n_addrs)
        return buf;
    const struct sockaddr_storage *sa = &be->addrs[peer];
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof(ip));
        snprintf(buf, len, "[%s]:%u", ip, (unsigned)ntohs(s6->sin6_port));
    } else {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof(ip));
        snprintf(buf, len, "%s:%u", ip, (unsigned)ntohs(s4->sin_port));
    }
    return buf;
}

enum upstream_step upstream_step(const struct upstream_req *rq)
{
    const struct upconn *u = rq->conn;
    if (!u)
        return UPSTREAM_STEP_NONE;
    if (u == u->up->wait_conn)
        return UPSTREAM_STEP_RESOLVE;
    switch (u->state) {
    case UC_CONNECTING:
        return UPSTREAM_STEP_CONNECT;
    case UC_HANDSHAKE:
        return UPSTREAM_STEP_HANDSHAKE;
    case UC_SENDING:
        return UPSTREAM_STEP_SEND;
    case UC_WAIT_HEAD:
        return UPSTREAM_STEP_WAIT_HEAD;
    case UC_BODY:
    case UC_PAUSED:
        return UPSTREAM_STEP_BODY;
    case UC_IDLE:
    case UC_CLOSED:
        break;
    }
    return UPSTREAM_STEP_NONE;
}

const char *upstream_step_str(enum upstream_step s)
{
    switch (s) {
    case UPSTREAM_STEP_NONE:
        break;
    case UPSTREAM_STEP_RESOLVE:
        return "resolving the host";
    case UPSTREAM_STEP_CONNECT:
        return "connecting";
    case UPSTREAM_STEP_HANDSHAKE:
        return "in the TLS handshake";
    case UPSTREAM_STEP_SEND:
        return "sending the request";
    case UPSTREAM_STEP_WAIT_HEAD:
        return "waiting for the response";
    case UPSTREAM_STEP_BODY:
        return "reading the response body";
    }
    return "idle";
}

/* A request to a backend without an address: it waits for the lookup in flight (or one started
 * now, at most once per UPSTREAM_RERESOLVE_MIN_MS), or fails at once. */
static int wait_for_address(struct upstream *up, struct up_backend *be, struct upstream_req *rq)
{
    if (!be->resolving && !be->numeric &&
        (!be->resolve_at || uv_now(up->loop) - be->resolve_at >= UPSTREAM_RERESOLVE_MIN_MS))
        resolve_start(up, be);
    if (!be->resolving || !be->wait_timer_on)
        return -UPSTREAM_ECONNECT;
    if (!be->waiters) {
        uint64_t ms = rq->connect_timeout_ms ? rq->connect_timeout_ms : be->cp->connect_timeout_ms;
        uv_timer_start(&be->wait_timer, on_wait_timeout, ms ? ms : 1, 0);
    }
    rq->wait_next = be->waiters;
    be->waiters = rq;
    rq->conn = up->wait_conn;
    return 0;
}

/* ---- public ---- */

int upstream_start(struct upstream *up, struct upstream_req *rq)
{
    struct up_backend *be = &up->backends[rq->backend];

    rq->conn = NULL;
    rq->wait_next = NULL;
    rq->status = 0;
    rq->sys_err = 0;
    rq->peer = -1;
    acct_begin(up, rq);
    if (!be->n_addrs) {
        int r = wait_for_address(up, be, rq);
        if (r < 0)
            acct_end(up, rq, (enum upstream_err) - r);
        return r;
    }
    struct upconn *u = rq->no_reuse ? NULL : be->idle;
    if (u) {
        rq->peer = u->addr_i;
        idle_unlink(u);
        u->state = UC_SENDING;
        u->rq = rq;
        rq->conn = u;
        int r = conn_begin(u);
        if (r == 0)
            return 0;
        conn_close(u);
        acct_end(up, rq, (enum upstream_err) - r);
        return r;
    }
    int r = conn_connect(up, rq);
    if (r < 0)
        acct_end(up, rq, (enum upstream_err) - r);
    return r;
}

void upstream_resume(struct upstream_req *rq)
{
    struct upconn *u = rq->conn;
    if (!u || u->state != UC_PAUSED)
        return;
    u->state = UC_BODY;
    if (u->complete) {
        exchange_end(u, UPSTREAM_OK, conn_reusable(u));
        return;
    }
    u->rlen = 0;
    poll_set(u, UV_READABLE);
    timer_set(u, u->be->cp->idle_timeout_ms);
    if (u->tls_on && tls_conn_pending(u->tls))
        conn_read(u);
}

void upstream_abort(struct upstream_req *rq)
{
    struct upconn *u = rq->conn;
    if (!u)
        return;
    struct upstream *up = u->up;
    if (u == up->wait_conn) {
        struct up_backend *be = &up->backends[rq->backend];
        struct upstream_req **pp = &be->waiters;
        while (*pp && *pp != rq)
            pp = &(*pp)->wait_next;
        if (*pp)
            *pp = rq->wait_next;
        rq->wait_next = NULL;
        rq->conn = NULL;
        acct_end(up, rq, UPSTREAM_ECLIENT);
        wait_timer_settle(up, be);
        return;
    }
    acct_end(up, rq, UPSTREAM_ECLIENT);
    rq->conn = NULL;
    u->rq = NULL;
    switch (u->state) {
    case UC_CONNECTING:
    case UC_HANDSHAKE:
        /* no byte of the request went out: the connection is set up for the pool */
        if (!up->draining && !up->no_pool)
            return;
        break;
    case UC_PAUSED:
        /* the whole answer came in, only the client's write was pending: nothing is cut */
        if (u->complete && conn_reusable(u) && conn_pool(u))
            return;
        break;
    default:
        /* the upstream may be working on the request: closing the connection cancels it */
        break;
    }
    conn_close(u);
}

/* An IP literal goes straight into be->addrs (no lookup, no blocking); 0 when host is not one. */
static int addr_literal(struct up_backend *be)
{
    struct addrinfo hints, *res = NULL;
    char port[8];

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    snprintf(port, sizeof(port), "%u", be->cb->url.port);
    if (getaddrinfo(be->cb->url.host, port, &hints, &res) != 0 || !res)
        return 0;
    if (res->ai_addrlen <= sizeof(be->addrs[0])) {
        memcpy(&be->addrs[0], res->ai_addr, res->ai_addrlen);
        be->addr_lens[0] = res->ai_addrlen;
        be->n_addrs = 1;
    }
    freeaddrinfo(res);
    return 1;
}

int upstream_init(struct upstream *up, uv_loop_t *loop, const struct conf *conf, struct shm *shm,
                  int slot, struct bufpool *bufs, size_t data_off, size_t data_size,
                  size_t hdrs_off, uint32_t max_hdrs)
{
    int names = 0;

    memset(up, 0, sizeof(*up));
    up->loop = loop;
    up->conf = conf;
    up->shm = shm;
    up->slot = slot;
    up->bufs = bufs;
    up->data_off = data_off;
    up->data_size = data_size;
    up->hdrs_off = hdrs_off;
    up->max_hdrs = max_hdrs;

    llhttp_settings_init(&resp_settings);
    resp_settings.on_message_begin = on_msg_begin;
    resp_settings.on_status = on_status;
    resp_settings.on_header_field = on_hfield;
    resp_settings.on_header_value = on_hvalue;
    resp_settings.on_headers_complete = on_headers_done;
    resp_settings.on_body = on_body;
    resp_settings.on_message_complete = on_msg_done;

    up->backends = calloc((size_t)(conf->n_backends ? conf->n_backends : 1), sizeof(*up->backends));
    up->wait_conn = calloc(1, sizeof(*up->wait_conn));
    if (!up->backends || !up->wait_conn)
        return -ENOMEM;
    up->wait_conn->up = up;
    up->wait_conn->state = UC_CLOSED;
    up->n_backends = conf->n_backends;
    for (int i = 0; i < conf->n_backends; i++) {
        struct up_backend *be = &up->backends[i];
        be->cb = &conf->backends[i];
        be->cp = &conf->pools[be->cb->pool];
        be->up = up;
        be->index = i;
        be->wb = shm ? shm_wb(shm, (uint32_t)slot, (uint32_t)i) : NULL;
        if (addr_literal(be)) {
            be->numeric = 1;
        } else {
            uv_timer_init(loop, &be->wait_timer);
            be->wait_timer.data = be;
            be->wait_timer_on = 1;
            resolve_start(up, be);
            names++;
        }
        if (be->cb->url.tls) {
            char *err = NULL;
            if (tls_client_init(&be->tls, be->cb->url.host, be->cb->ca_file, be->cb->tls_verify,
                                &err) == 0) {
                be->tls_ok = 1;
            } else {
                log_err("backend %s: TLS setup: %s", be->cb->name, err ? err : "failed");
                be->tls_err = err ? err : strdup("TLS setup failed");
            }
        }
    }
    if (names) {
        uv_timer_init(loop, &up->resolve_timer);
        up->resolve_timer.data = up;
        uv_timer_start(&up->resolve_timer, on_resolve_timer, UPSTREAM_RESOLVE_MS,
                       UPSTREAM_RESOLVE_MS);
        up->resolve_timer_on = 1;
    }
    return 0;
}

void upstream_drain(struct upstream *up)
{
    up->draining = 1;
    if (up->resolve_timer_on) {
        uv_close((uv_handle_t *)&up->resolve_timer, NULL);
        up->resolve_timer_on = 0;
    }
    if (!up->backends)
        return;
    for (int i = 0; i < up->n_backends; i++) {
        struct up_backend *be = &up->backends[i];
        while (be->idle)
            conn_close(be->idle);
        /* a lookup nobody waits for must not hold the loop open (a request that waits keeps
         * it: the lookup ends, or the wait timer does) */
        if (be->resolving && !be->waiters)
            uv_cancel((uv_req_t *)&be->gai); /* EBUSY when already running: it ends soon */
        wait_timer_settle(up, be);
    }
}

void upstream_free(struct upstream *up)
{
    free(up->wait_conn);
    up->wait_conn = NULL;
    if (!up->backends)
        return;
    for (int i = 0; i < up->n_backends; i++) {
        if (up->backends[i].tls_ok)
            tls_client_free(&up->backends[i].tls);
        free(up->backends[i].tls_err);
    }
    free(up->backends);
    up->backends = NULL;
    while (up->free_conns) {
        struct upconn *u = up->free_conns;
        up->free_conns = u->next;
        free(u);
    }
}
