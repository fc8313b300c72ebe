/* A worker process: one libuv loop that accepts clients, parses their HTTP/1.1 requests with
 * llhttp, picks a backend and streams the response back (see core/upstream.c). */
#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include <llhttp.h>
#include <uv.h>

#include "balancer/balancer.h"
#include "core/log.h"
#include "core/proxy.h"
#include "core/retry.h"
#include "core/tls.h"
#include "core/upstream.h"
#include "core/util.h"
#include "core/worker.h"

#define BUF_MIN         16384 /* smallest request/response buffer */
#define LINGER_MS       2000  /* how long a closing connection drains what the client still sends */
#define RID_MAX         128   /* longest client X-Request-Id kept as is */
#define MAX_FREE_BUFS   1024  /* buffers kept for reuse beyond those in use */
#define MAX_TRIES       11    /* the first try and at most 10 retries (conf bounds retries) */
#define COOL_DEFAULT_MS 1000  /* a 429 that says nothing about when to come back */
#define COOL_MAX_MS     3600000        /* a longer Retry-After is taken as this */
#define AUTH_LOG_NS     10000000000ULL /* one "api_key is bad" warning per backend per 10 s */
#define WTAIL_MAX       16      /* room kept behind a head for the bytes after a body piece */
#define BODY_HEAP_MIN   65536   /* first size of a body that outgrows the buffer; then doubled */
#define BODY_CACHE_MAX  1048576 /* a body buffer up to this size is kept for the next request */

enum cstate {
    CS_IDLE = 0, /* between requests: no buffer unless pipelined bytes wait */
    CS_HEAD,     /* request head arriving */
    CS_BODY,     /* request body arriving */
    CS_WAIT,     /* request complete, being forwarded / answered */
    CS_LINGER,   /* response sent, write side shut, draining input before close */
    CS_CLOSED,
};

/* Parser events that pause llhttp. */
enum cev {
    CEV_NONE = 0,
    CEV_HEAD,
    CEV_DONE,
};

struct worker;

/* Kinds of client timeouts; each listener has one queue per kind. */
enum tkind {
    T_HEADER = 0,
    T_BODY,
    T_KEEPALIVE,
    T_SEND, /* a write to the client waits: the pool's stream_idle_timeout */
    T_KINDS,
};

/* Client timeouts without a uv_timer_t per connection: a FIFO of clients whose timeouts all
 * have the same duration (so appending keeps it sorted by deadline) and one timer for its
 * head. */
struct tq {
    uv_timer_t timer;
    struct worker *w;
    struct client *head, *tail;
    uint64_t ms;
    uint64_t armed_at; /* loop time the timer fires at, 0 = not armed */
};

struct listener {
    uv_tcp_t tcp;
    struct worker *w;
    int idx;
};

/* One client connection. Only what an idle keep-alive connection needs lives here; the state
 * of a request (parser, spans, body, upstream request, tries) is a struct creq in the tail of
 * the pool buffer the connection holds while a request is active. */
struct client {
    uv_tcp_t tcp;
    struct worker *w;
    const struct conf_listen *ln;
    struct tq *tq; /* the timeout queue the client waits in, or NULL */
    struct client *tprev, *tnext;
    uint64_t deadline;          /* loop time (ms) the current timeout expires at */
    struct client *prev, *next; /* worker's list of open clients, or free list (next) */
    char *buf;  /* request bytes [0, len), parsed up to pos, then a struct creq; NULL while idle */
    char *wbuf; /* only while a write waits: a pool buffer holding its uv_write_t and head */
    uint32_t len, pos;
    uint16_t li;         /* listener index */
    uint8_t state;       /* enum cstate */
    uint8_t handles;     /* open libuv handles; recycled at 0 */
    uint8_t fresh;       /* no request yet on this connection */
    uint8_t eof;         /* the client shut its write side */
    uint8_t close_after; /* close once the current response is sent (graceful stop) */
    uint8_t reading, writing;
    uint8_t tries_on; /* a request is being forwarded: its struct tries is live */
    char ip[INET6_ADDRSTRLEN];
};

/* One request's tries. It lives in the tail of the client's buffer (held for the whole
 * request), so an idle connection does not carry it. */
struct tries {
    uint64_t try_ns;     /* monotonic time the current try started */
    uint64_t head_ns;    /* the current try's time to the response head */
    uint64_t deadline;   /* loop time (ms) at which request_timeout passes; 0 = none */
    uint64_t key;        /* hash balancer key */
    int32_t trial;       /* backend whose trial slot the current try holds, or -1 */
    int32_t last_err;    /* enum upstream_err of the last failed try */
    int32_t last_status; /* status of the last answer consumed for a retry, or 0 */
    uint8_t n;           /* tries started */
    uint8_t has_key;
    uint8_t discard;           /* the current answer is consumed, not forwarded: a retry follows */
    uint8_t recorded;          /* the current try's outcome is in shm already */
    uint8_t trial_done;        /* the current trial's outcome is in shm already */
    uint8_t sse;               /* the answer is SSE, framed into chunks here */
    uint8_t sse_nl;            /* newlines at the end of what the client got of it */
    uint8_t sent;              /* body bytes reached the client */
    uint32_t tried[MAX_TRIES]; /* backends of the tries, in order */
    uint32_t trial_epoch;      /* the admission epoch the trial was admitted in */
};

/* The state of the request a client connection is on, in the tail of its buffer: set up
 * when the buffer is taken, gone with it when the connection goes idle. */
struct creq {
    llhttp_t parser;
    struct upstream_req rq;
    struct proxy_body_info info;
    const char *url;
    size_t url_len;
    struct proxy_hdr *hdrs; /* at the tail of the data part of buf */
    const char *rid;        /* X-Request-Id: the client's or generated */
    size_t rid_len;
    char *body; /* in buf at head_end, or malloc'd (body_heap) */
    uint64_t body_len, body_cap;
    uint64_t body_want; /* the declared Content-Length, or max_body_size for a chunked body */
    uint32_t n_hdrs;
    uint32_t head_end; /* offset just after the request head */
    int err;           /* status decided while parsing the request (404, 413, 431) */
    uint8_t hstate, ev;
    uint8_t keepalive, http10, head_method, resp_started, resp_close;
    uint8_t body_heap, has_body;
    uv_write_t cont_req; /* the rest of a "100 Continue" the socket did not take at once */
    struct tries tries;
};

struct worker {
    uv_loop_t loop;
    struct conf *conf;
    struct shm *shm;
    int slot;
    struct listener *listeners;
    int n_listeners;
    uv_signal_t sigterm, sigint;
    uv_timer_t hard_stop;
    struct tq *tqs; /* T_KINDS per listener, then the linger queue */
    int n_tqs;
    int draining, stopping;
    struct bufpool bufs;
    size_t data_size; /* bytes of a buffer for data */
    uint32_t max_hdrs;
    struct upstream up;
    struct balancer *bal; /* per pool */
    struct balancer_cand *cands;
    int32_t *cand_limit;   /* per candidate of a pick: trial limit, 0 = no trial needed */
    uint32_t *cand_epoch;  /* per candidate: the admission epoch its trial counts in */
    uint64_t *auth_log_ns; /* per backend: the last "api_key is bad" warning */
    struct tq retry_q;     /* clients waiting out a retry back-off, by due time */
    /* A pool buffer: struct creq, a generated request id, header spans, then data (c->buf and
     * u->buf point at the data). What a request touches is together at the start, so a
     * request dirties a page or two of its buffer rather than both ends of it. */
    size_t rid_off, hdrs_off, data_off;
    struct client *clients, *free_clients;
    int n_clients;
    char *body_cache; /* one body buffer kept from an earlier request, or NULL */
    uint64_t body_cache_cap;
    uint64_t rid_seed1, rid_seed2, rid_counter;
    char *scratch; /* one buffer for heads built and written at once */
};

static llhttp_settings_t req_settings;

/* The request state of a client that holds a buffer. */
static struct creq *client_creq(const struct client *c)
{
    return (struct creq *)(c->buf - c->w->data_off);
}

static void client_process(struct client *c);
static void client_close(struct client *c);
static void client_try_end(struct client *c);
static const struct upstream_ops client_ops;
static void client_request_done(struct client *c);
static void client_error(struct client *c, int status, const char *type, const char *code,
                         const char *msg, int close, int retry_after);
static void worker_check_exit(struct worker *w);

/* ---- shm helpers ---- */

static void conns_add(struct worker *w, int d)
{
    _Atomic uint32_t *g = &shm_worker(w->shm, (uint32_t)w->slot)->conns;
    atomic_store_explicit(g, atomic_load_explicit(g, memory_order_relaxed) + (uint32_t)d,
                          memory_order_relaxed);
}

/* ---- timers ---- */

static void on_client_timeout(struct client *c)
{
    switch ((enum cstate)c->state) {
    case CS_HEAD:
    case CS_BODY:
        /* some of the request arrived, not all of it in time */
        client_error(c, 408, "invalid_request_error", "request_timeout",
                     "the request did not arrive in time", 1, 0);
        return;
    case CS_IDLE:
    case CS_LINGER:
        client_close(c);
        return;
    case CS_WAIT:
        if (c->writing) {
            /* the client takes nothing: it must not hold a backend connection and its in-flight
             * count (nor the buffers) for ever */
            log_info("client %s: no write progress within stream_idle_timeout, closing", c->ip);
            client_close(c);
        }
        return;
    case CS_CLOSED:
        return;
    }
}

static void client_timer_stop(struct client *c)
{
    struct tq *q = c->tq;
    if (!q)
        return;
    if (c->tprev)
        c->tprev->tnext = c->tnext;
    else
        q->head = c->tnext;
    if (c->tnext)
        c->tnext->tprev = c->tprev;
    else
        q->tail = c->tprev;
    c->tq = NULL;
    c->tprev = c->tnext = NULL;
}

/* Runs the clients of q whose deadline passed through fire (which may queue them again, here
 * or elsewhere), then arms q's timer (callback cb) for its new head unless that was done. */
static void tq_expire(struct tq *q, uv_timer_cb cb, void (*fire)(struct client *))
{
    uint64_t now = uv_now(&q->w->loop);
    struct client *c;
    q->armed_at = 0;
    while ((c = q->head) && c->deadline <= now) {
        client_timer_stop(c);
        fire(c);
    }
    if (q->head && !q->armed_at) {
        q->armed_at = q->head->deadline;
        uv_timer_start(&q->timer, cb, q->head->deadline - now, 0);
    }
}

static void on_tq(uv_timer_t *t)
{
    tq_expire(t->data, on_tq, on_client_timeout);
}

static void client_timer_q(struct client *c, struct tq *q)
{
    client_timer_stop(c);
    c->deadline = uv_now(&c->w->loop) + q->ms;
    c->tq = q;
    c->tprev = q->tail;
    c->tnext = NULL;
    if (q->tail) {
        q->tail->tnext = c; /* the queue's timer runs for an earlier deadline already */
    } else {
        q->head = c;
        /* a timer left armed from an earlier head fires first and re-arms for this one: a
         * lone keep-alive client moving between queues does not touch the timer heap */
        if (!q->armed_at || q->armed_at > c->deadline) {
            q->armed_at = c->deadline;
            uv_timer_start(&q->timer, on_tq, q->ms, 0);
        }
    }
    q->tail = c;
}

static void client_timer(struct client *c, enum tkind k)
{
    client_timer_q(c, &c->w->tqs[c->li * T_KINDS + k]);
}

/* ---- buffers ---- */

static void client_take_buf(struct client *c)
{
    if (c->buf)
        return;
    char *p = bufpool_get(&c->w->bufs);
    c->len = c->pos = 0;
    if (!p)
        return;
    c->buf = p + c->w->data_off;
    /* a new request state: the buffer may come from another connection */
    struct creq *r = client_creq(c);
    memset(r, 0, sizeof(*r));
    llhttp_init(&r->parser, HTTP_REQUEST, &req_settings);
    r->parser.data = c;
}

static void client_drop_buf(struct client *c)
{
    if (c->buf)
        bufpool_put(&c->w->bufs, c->buf - c->w->data_off);
    c->buf = NULL;
    c->len = c->pos = 0;
}

static void client_free_body(struct client *c)
{
    if (!c->buf)
        return;
    struct creq *r = client_creq(c);
    struct worker *w = c->w;
    if (r->body_heap) {
        /* keep the largest moderate buffer for the next large body; a huge one goes back at
         * once, so one big request does not leave the worker big */
        if (r->body_cap <= BODY_CACHE_MAX && (!w->body_cache || w->body_cache_cap < r->body_cap)) {
            free(w->body_cache);
            w->body_cache = r->body;
            w->body_cache_cap = r->body_cap;
        } else {
            free(r->body);
        }
    }
    r->body = NULL;
    r->body_heap = 0;
    r->body_len = r->body_cap = 0;
}

/* ---- closing ---- */

static void client_handle_closed(uv_handle_t *h)
{
    struct client *c = h->data;
    struct worker *w = c->w;
    if (--c->handles > 0)
        return;
    client_free_body(c);
    if (c->buf)
        bufpool_put(&w->bufs, c->buf - w->data_off);
    bufpool_put(&w->bufs, c->wbuf);
    c->buf = c->wbuf = NULL;
    c->next = w->free_clients;
    w->free_clients = c;
    worker_check_exit(w);
}

static void client_close(struct client *c)
{
    struct worker *w = c->w;
    if (c->state == CS_CLOSED)
        return;
    if (c->buf && client_creq(c)->rq.conn)
        upstream_abort(&client_creq(c)->rq);
    if (c->tries_on) {
        client_try_end(c);
        c->tries_on = 0;
    }
    c->state = CS_CLOSED;
    if (c->prev)
        c->prev->next = c->next;
    else
        w->clients = c->next;
    if (c->next)
        c->next->prev = c->prev;
    w->n_clients--;
    conns_add(w, -1);
    client_timer_stop(c);
    uv_close((uv_handle_t *)&c->tcp, client_handle_closed);
}

/* Closes after a response: shut the write side, then read and drop what the client still
 * sends for a moment, so that closing with unread input does not reset the response away. */
static void client_linger(struct client *c)
{
    uv_os_fd_t fd;
    if (c->eof || uv_fileno((uv_handle_t *)&c->tcp, &fd) != 0) {
        client_close(c);
        return;
    }
    shutdown(fd, SHUT_WR);
    c->state = CS_LINGER;
    client_free_body(c);
    client_drop_buf(c);
    client_timer_q(c, &c->w->tqs[c->w->n_tqs - 1]);
}

/* ---- writing ---- */

/* A write that must wait keeps its uv_write_t and the unsent head bytes in a pool buffer, so
 * that an idle connection carries neither. */
#define WHEAD_OFF ((sizeof(uv_write_t) + 15) & ~(size_t)15)

/* Room for a head built in the scratch buffer: it must fit behind a pending write's request,
 * with a chunk-size line after it and the few bytes that may follow a body piece. */
static size_t head_cap(const struct worker *w)
{
    return w->bufs.size - WHEAD_OFF - 20 - WTAIL_MAX;
}

static void on_written(uv_write_t *req, int status)
{
    struct client *c = req->data;
    c->writing = 0;
    if (c->tq == &c->w->tqs[c->li * T_KINDS + T_SEND])
        client_timer_stop(c);
    bufpool_put(&c->w->bufs, c->wbuf);
    c->wbuf = NULL;
    if (c->state == CS_CLOSED)
        return;
    if (status < 0) {
        client_close(c);
        return;
    }
    if (client_creq(c)->rq.conn)
        upstream_resume(&client_creq(c)->rq); /* continues the stream, or ends it (on_end) */
    else
        client_request_done(c); /* a response aigw made itself */
}

/* Writes head and tail (copied if they must wait; tail at most WTAIL_MAX bytes) around
 * data (kept by the caller until the write ends), in one system call where the socket takes
 * it. 0 = all written, 1 = pending (on_written follows), -1 = the client is gone. */
static int client_write3(struct client *c, const char *head, size_t hl, const char *data, size_t dl,
                         const char *tail, size_t tl)
{
    uv_buf_t b[3];
    unsigned n = 0;
    if (hl)
        b[n++] = uv_buf_init((char *)head, (unsigned)hl);
    if (dl)
        b[n++] = uv_buf_init((char *)data, (unsigned)dl);
    if (tl)
        b[n++] = uv_buf_init((char *)tail, (unsigned)tl);
    if (!n)
        return 0;
    int r = uv_try_write((uv_stream_t *)&c->tcp, b, n);
    if (r == (int)(hl + dl + tl))
        return 0;
    if (r < 0 && r != UV_EAGAIN)
        return -1;
    size_t done = r > 0 ? (size_t)r : 0;
    n = 0;
    if (!(c->wbuf = bufpool_get(&c->w->bufs)))
        return -1;
    uv_write_t *req = (uv_write_t *)c->wbuf;
    char *copy = c->wbuf + WHEAD_OFF;
    if (done < hl) {
        memcpy(copy, head + done, hl - done);
        b[n++] = uv_buf_init(copy, (unsigned)(hl - done));
        copy += hl - done;
        done = 0;
    } else {
        done -= hl;
    }
    if (dl > done) {
        b[n++] = uv_buf_init((char *)data + done, (unsigned)(dl - done));
        done = 0;
    } else {
        done -= dl;
    }
    if (tl > done) {
        memcpy(copy, tail + done, tl - done);
        b[n++] = uv_buf_init(copy, (unsigned)(tl - done));
    }
    req->data = c;
    if (uv_write(req, (uv_stream_t *)&c->tcp, b, n, on_written) != 0)
        return -1;
    c->writing = 1;
    if (c->w->tqs[c->li * T_KINDS + T_SEND].ms)
        client_timer(c, T_SEND);
    return 1;
}

static int client_write(struct client *c, const char *head, size_t hl, const char *data, size_t dl)
{
    return client_write3(c, head, hl, data, dl, NULL, 0);
}

/* A gateway error; after tries upstream, backend (NULL = none) and attempts go out as
 * x-aigw-backend / x-aigw-attempts. */
static void client_error_via(struct client *c, int status, const char *type, const char *code,
                             const char *msg, int close, int retry_after, const char *backend,
                             int attempts)
{
    struct worker *w = c->w;
    client_timer_stop(c);
    c->state = CS_WAIT;
    client_creq(c)->resp_close =
        close || !client_creq(c)->keepalive || w->draining || c->close_after;
    int n = proxy_build_error_via(w->scratch, head_cap(w), status, type, code, msg,
                                  client_creq(c)->resp_close, retry_after, client_creq(c)->rid,
                                  client_creq(c)->rid_len, backend, attempts,
                                  client_creq(c)->head_method);
    if (n < 0) {
        client_close(c);
        return;
    }
    int r = client_write(c, w->scratch, (size_t)n, NULL, 0);
    if (r < 0)
        client_close(c);
    else if (r == 0)
        client_request_done(c);
}

static void client_error(struct client *c, int status, const char *type, const char *code,
                         const char *msg, int close, int retry_after)
{
    client_error_via(c, status, type, code, msg, close, retry_after, NULL, 0);
}

/* The answer to a request whose path aigw does not forward (err 404 or 400). */
static void client_path_error(struct client *c, int close)
{
    if (client_creq(c)->err == 404)
        client_error(c, 404, "invalid_request_error", "not_found", "unknown path", close, 0);
    else
        client_error(c, 400, "invalid_request_error", "invalid_path",
                     "the path has a dot-segment or an encoded slash", close, 0);
}

/* ---- request parsing ---- */

static int on_req_begin(llhttp_t *p)
{
    struct client *c = p->data;
    client_creq(c)->url = NULL;
    client_creq(c)->url_len = 0;
    client_creq(c)->n_hdrs = 0;
    client_creq(c)->hstate = 0;
    client_creq(c)->err = 0;
    client_creq(c)->rid = NULL;
    client_creq(c)->rid_len = 0;
    client_creq(c)->has_body = 0;
    client_creq(c)->head_method = 0; /* a gateway answer before the head is whole has a body */
    client_free_body(c);
    return 0;
}

static int on_req_url(llhttp_t *p, const char *at, size_t len)
{
    struct client *c = p->data;
    if (!client_creq(c)->url)
        client_creq(c)->url = at;
    client_creq(c)->url_len += len;
    return 0;
}

/* Header pieces: see proxy_hdr_piece (too many headers: 431; obs-fold: 400). */
static int req_hdr_piece(llhttp_t *p, enum proxy_piece kind, const char *at, size_t len)
{
    struct client *c = p->data;
    struct creq *r = client_creq(c);
    if (c->state == CS_BODY)
        return 0; /* trailers of a chunked body: not forwarded, and their bytes are not kept */
    int e = proxy_hdr_piece(r->hdrs, &r->n_hdrs, c->ln->max_headers, &r->hstate, kind, at, len);
    if (e == 0)
        return 0;
    r->err = e == -ENOSPC ? 431 : 400;
    return -1;
}

static int on_req_hfield(llhttp_t *p, const char *at, size_t len)
{
    return req_hdr_piece(p, PROXY_PIECE_NAME, at, len);
}

static int on_req_hvalue(llhttp_t *p, const char *at, size_t len)
{
    return req_hdr_piece(p, PROXY_PIECE_VALUE, at, len);
}

static int on_req_headers(llhttp_t *p)
{
    struct client *c = p->data;
    client_creq(c)->ev = CEV_HEAD;
    return HPE_PAUSED;
}

static int on_req_body(llhttp_t *p, const char *at, size_t len)
{
    struct client *c = p->data;
    if (client_creq(c)->err)
        return 0; /* the answer is already decided: drop the body */
    if (client_creq(c)->body_len + len > c->ln->max_body_size) {
        client_creq(c)->err = 413;
        return -1;
    }
    if (client_creq(c)->body_heap) {
        if (client_creq(c)->body_len + len > client_creq(c)->body_cap) {
            /* grown as the bytes arrive, never beyond what was declared */
            uint64_t cap = client_creq(c)->body_cap * 2;
            if (cap > client_creq(c)->body_want)
                cap = client_creq(c)->body_want;
            if (cap < client_creq(c)->body_len + len)
                cap = client_creq(c)->body_len + len;
            char *nb = realloc(client_creq(c)->body, cap);
            if (!nb) {
                client_creq(c)->err = 500;
                return -1;
            }
            client_creq(c)->body = nb;
            client_creq(c)->body_cap = cap;
        }
        memcpy(client_creq(c)->body + client_creq(c)->body_len, at, len);
    } else {
        /* in place: de-chunking only ever moves bytes towards the head */
        memmove(client_creq(c)->body + client_creq(c)->body_len, at, len);
    }
    client_creq(c)->body_len += len;
    return 0;
}

static int on_req_done(llhttp_t *p)
{
    struct client *c = p->data;
    client_creq(c)->ev = CEV_DONE;
    return HPE_PAUSED;
}

static const struct proxy_hdr *find_hdr(const struct client *c, const char *name)
{
    for (uint32_t i = 0; i < client_creq(c)->n_hdrs; i++)
        if (util_span_ieq(client_creq(c)->hdrs[i].name, client_creq(c)->hdrs[i].name_len, name))
            return &client_creq(c)->hdrs[i];
    return NULL;
}

static int rid_ok(const char *s, size_t n)
{
    if (n == 0 || n > RID_MAX)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] <= 0x20 || s[i] >= 0x7f)
            return 0;
    return 1;
}

static void on_cont_written(uv_write_t *req, int status)
{
    struct client *c = req->data;
    if (status < 0 && c->state != CS_CLOSED)
        client_close(c);
}

/* The request head is complete (parser resumed). 0 to go on with the body, -1 when an answer
 * was sent instead. */
static int client_on_head(struct client *c)
{
    struct worker *w = c->w;
    const struct conf_listen *ln = c->ln;
    llhttp_t *p = &client_creq(c)->parser;

    client_creq(c)->head_end = c->pos;
    if (client_creq(c)->head_end > ln->max_header_size || client_creq(c)->err == 431) {
        client_error(c, 431, "invalid_request_error", "request_header_too_large",
                     "request header too large", 1, 0);
        return -1;
    }
    client_creq(c)->keepalive = llhttp_should_keep_alive(p);
    client_creq(c)->http10 = p->http_major == 1 && p->http_minor == 0;
    client_creq(c)->head_method = p->method == HTTP_HEAD;

    /* one pass for the two names the worker itself looks at */
    const struct proxy_hdr *h = NULL, *expect = NULL;
    for (uint32_t i = 0; i < client_creq(c)->n_hdrs; i++) {
        const struct proxy_hdr *x = &client_creq(c)->hdrs[i];
        if (x->name_len == 12 && !h && proxy_name_eq(x->name, 12, "x-request-id", 12))
            h = x;
        else if (x->name_len == 6 && !expect && proxy_name_eq(x->name, 6, "expect", 6))
            expect = x;
    }
    if (h && rid_ok(h->value, h->value_len)) {
        client_creq(c)->rid = h->value;
        client_creq(c)->rid_len = h->value_len;
    } else {
        char *id = c->buf - w->data_off + w->rid_off;
        proxy_request_id(id, w->rid_seed1, w->rid_seed2, w->rid_counter++);
        client_creq(c)->rid = id;
        client_creq(c)->rid_len = 32;
    }

    if (!client_creq(c)->url || !proxy_path_ok(client_creq(c)->url, client_creq(c)->url_len))
        client_creq(c)->err = 404;
    else if (!proxy_path_safe(client_creq(c)->url, client_creq(c)->url_len))
        client_creq(c)->err = 400; /* dot-segment or encoded slash: could leave the prefix */
    client_creq(c)->has_body = (p->flags & (F_CHUNKED | F_CONTENT_LENGTH)) != 0;
    int chunked = (p->flags & F_CHUNKED) != 0;
    uint64_t cl = chunked ? 0 : p->content_length;
    if (!chunked && (p->flags & F_CONTENT_LENGTH) && cl > ln->max_body_size) {
        client_error(c, 413, "invalid_request_error", "request_too_large", "request body too large",
                     1, 0);
        return -1;
    }
    int body_coming = chunked || cl > 0;
    h = expect;
    if (h && body_coming && !client_creq(c)->http10) {
        if (!util_span_ieq(h->value, h->value_len, "100-continue")) {
            client_error(c, 417, "invalid_request_error", "expectation_failed",
                         "unsupported Expect", 1, 0);
            return -1;
        }
        if (client_creq(c)->err == 404 || client_creq(c)->err == 400) {
            /* the client waits for our word before sending the body: answer now */
            client_path_error(c, 1);
            return -1;
        }
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        uv_buf_t b = uv_buf_init((char *)cont, sizeof(cont) - 1);
        /* a client that did not wait for it already sent body bytes: no need */
        int r = c->pos == c->len ? uv_try_write((uv_stream_t *)&c->tcp, &b, 1) : (int)b.len;
        if (r < 0 && r != UV_EAGAIN) {
            client_close(c);
            return -1;
        }
        if (r < (int)b.len) {
            /* the socket took part of it (a slow reader of an earlier answer): queue the rest;
             * libuv keeps writes in order, so the answer cannot overtake it. The request lives
             * in the buffer, which outlives the write (closing cancels it first). */
            size_t done = r > 0 ? (size_t)r : 0;
            uv_buf_t rest = uv_buf_init((char *)cont + done, (unsigned)(b.len - done));
            client_creq(c)->cont_req.data = c;
            if (uv_write(&client_creq(c)->cont_req, (uv_stream_t *)&c->tcp, &rest, 1,
                         on_cont_written) != 0) {
                client_close(c);
                return -1;
            }
        }
    }

    /* the body starts in the buffer; one that outgrows it moves to the heap as it arrives
     * (client_body_to_heap), never sized by what the client only declared */
    client_creq(c)->body_len = 0;
    client_creq(c)->body_want = chunked ? ln->max_body_size : cl;
    client_creq(c)->body = c->buf + client_creq(c)->head_end;
    client_creq(c)->body_heap = 0;
    c->state = CS_BODY;
    client_timer(c, T_BODY);
    return 0;
}

/* Bodies start in the buffer; one that will not fit moves to the heap once the buffer runs
 * short of room: BODY_HEAP_MIN or twice what came so far, at most what was declared. The
 * worker's cached buffer is taken when it is large enough. */
static int client_body_to_heap(struct client *c)
{
    struct worker *w = c->w;
    uint64_t cap = client_creq(c)->body_len * 2;
    char *nb;
    if (cap < BODY_HEAP_MIN)
        cap = BODY_HEAP_MIN;
    if (cap > client_creq(c)->body_want)
        cap = client_creq(c)->body_want;
    if (cap < client_creq(c)->body_len)
        cap = client_creq(c)->body_len;
    if (w->body_cache && w->body_cache_cap >= cap) {
        nb = w->body_cache;
        cap = w->body_cache_cap;
        w->body_cache = NULL;
    } else if (!(nb = malloc(cap ? cap : 1))) {
        return -1;
    }
    memcpy(nb, client_creq(c)->body, client_creq(c)->body_len);
    client_creq(c)->body = nb;
    client_creq(c)->body_cap = cap;
    client_creq(c)->body_heap = 1;
    return 0;
}

static void client_dispatch(struct client *c);
static void client_read_start(struct client *c);

/* Runs the parser over buffered bytes until it needs more or a request is complete. */
static void client_process(struct client *c)
{
    struct worker *w = c->w;
    int force = 0;

    while (c->state == CS_IDLE || c->state == CS_HEAD || c->state == CS_BODY) {
        if (c->pos == c->len && !force)
            break;
        force = 0;
        if (c->state == CS_IDLE)
            c->state = CS_HEAD;
        client_creq(c)->ev = CEV_NONE;
        client_creq(c)->hdrs = (struct proxy_hdr *)(c->buf - w->data_off + w->hdrs_off);
        llhttp_errno_t e =
            llhttp_execute(&client_creq(c)->parser, c->buf + c->pos, c->len - c->pos);
        if (e == HPE_OK) {
            c->pos = c->len;
            break;
        }
        if (e == HPE_PAUSED) {
            c->pos = (uint32_t)(llhttp_get_error_pos(&client_creq(c)->parser) - c->buf);
            if (client_creq(c)->ev == CEV_HEAD) {
                llhttp_resume(&client_creq(c)->parser);
                if (client_on_head(c) < 0)
                    return;
                force = 1; /* a body-less request completes without more bytes */
                continue;
            }
            client_dispatch(c);
            return;
        }
        if (client_creq(c)->err == 431) {
            client_error(c, 431, "invalid_request_error", "request_header_too_large",
                         "too many request headers", 1, 0);
        } else if (client_creq(c)->err == 413) {
            client_error(c, 413, "invalid_request_error", "request_too_large",
                         "request body too large", 1, 0);
        } else if (client_creq(c)->err == 500) {
            client_error(c, 500, "server_error", "out_of_memory", "out of memory", 1, 0);
        } else {
            log_debug("client %s: bad request: %s", c->ip,
                      llhttp_get_error_reason(&client_creq(c)->parser));
            client_error(c, 400, "invalid_request_error", "bad_request", "malformed request", 1, 0);
        }
        return;
    }

    if (c->state == CS_HEAD && c->len > c->ln->max_header_size) {
        client_error(c, 431, "invalid_request_error", "request_header_too_large",
                     "request header too large", 1, 0);
        return;
    }
    if (c->state == CS_BODY) {
        /* everything parsed: keep only head and in-buffer body, reuse the rest for reads */
        c->len = c->pos = client_creq(c)->head_end +
                          (client_creq(c)->body_heap ? 0 : (uint32_t)client_creq(c)->body_len);
        if (!client_creq(c)->body_heap && w->data_size - c->len < w->data_size / 4 &&
            ((client_creq(c)->parser.flags & F_CHUNKED) ||
             client_creq(c)->head_end + client_creq(c)->body_want > w->data_size)) {
            if (client_body_to_heap(c) < 0) {
                client_error(c, 500, "server_error", "out_of_memory", "out of memory", 1, 0);
                return;
            }
            c->len = c->pos = client_creq(c)->head_end;
        }
    }
}

/* ---- forwarding ---- */

static int op_build_head(void *ctx, const struct conf_backend *be, char *buf, size_t cap)
{
    struct client *c = ctx;
    struct proxy_req r;
    const char *m = llhttp_method_name((llhttp_method_t)client_creq(c)->parser.method);
    r.method = m;
    r.method_len = strlen(m);
    r.path = client_creq(c)->url;
    r.path_len = client_creq(c)->url_len;
    r.hdrs = client_creq(c)->hdrs;
    r.n_hdrs = client_creq(c)->n_hdrs;
    r.client_ip = c->ip;
    r.request_id = client_creq(c)->rid;
    r.request_id_len = client_creq(c)->rid_len;
    r.has_body = client_creq(c)->has_body;
    r.body_len = client_creq(c)->body_len;
    return proxy_build_request(buf, cap, &r, be);
}

static struct tries *client_tries(const struct client *c)
{
    return &client_creq(c)->tries;
}

static const struct conf_pool *client_pool(const struct client *c)
{
    return &c->w->conf->pools[c->ln->pool];
}

/* Backend of the current (or last) try. */
static uint32_t client_backend(const struct client *c)
{
    const struct tries *t = client_tries(c);
    return t->tried[t->n - 1];
}

/* x-aigw-backend for a response after tries: NULL when the pool hides it or nothing was tried. */
static const char *client_via(const struct client *c)
{
    if (!c->tries_on || client_tries(c)->n == 0 || !client_pool(c)->expose_headers)
        return NULL;
    return c->w->conf->backends[client_backend(c)].name;
}

static int client_attempts(const struct client *c)
{
    return c->tries_on ? client_tries(c)->n : 0;
}

/* The outcome of the current try, when it holds a trial slot, for the breaker (which judges a
 * half-open backend by its trials alone): ok is a success as shm_wb_record_ok counts one; a
 * failure, a 429 and a 401/403 are failed trials. Once per try. */
static void client_trial_outcome(struct client *c, int ok)
{
    struct tries *t = client_tries(c);
    if (t->trial < 0 || t->trial_done)
        return;
    t->trial_done = 1;
    shm_trial_outcome(c->w->shm, (uint32_t)t->trial, t->trial_epoch, ok);
}

/* The current try is over: give back its trial slot. */
static void client_try_end(struct client *c)
{
    struct tries *t = client_tries(c);
    if (t->trial >= 0)
        shm_trial_release(c->w->shm, (uint32_t)c->w->slot, (uint32_t)t->trial);
    t->trial = -1;
}

static int was_tried(const struct tries *t, uint32_t b)
{
    for (unsigned i = 0; i < t->n; i++)
        if (t->tried[i] == b)
            return 1;
    return 0;
}

/* Fills w->cands / w->cand_limit / w->cand_epoch for the client's pool from each backend's shm view
 * at `now`: the health checker's admission (all, trials only, none) with the workers' trips applied
 * and the operator's state (shm_admit), then 429 cool-downs. *cool_min: the earliest end of a
 * cool-down among backends held back only by one (0 = none). */
static uint32_t client_cands(struct client *c, uint64_t now, uint64_t *cool_min)
{
    struct worker *w = c->w;
    const struct conf_pool *pool = client_pool(c);
    const struct tries *t = client_tries(c);

    *cool_min = 0;
    for (int i = 0; i < pool->n_backends; i++) {
        uint32_t b = (uint32_t)(pool->first_backend + i);
        const struct conf_backend *cb = &w->conf->backends[b];
        struct balancer_cand *k = &w->cands[i];
        struct shm_backend_view v;
        uint32_t trials = 0;
        uint64_t cool;
        int32_t active;

        shm_backend_view(w->shm, b, &v);
        shm_backend_load(w->shm, b, &active, &cool);
        enum shm_admit adm = shm_admit(&v, now, &trials);
        int ok = adm != SHM_ADMIT_NONE;
        if (ok && cool > now) {
            ok = 0;
            if (!*cool_min || cool < *cool_min)
                *cool_min = cool;
        }
        k->weight = (int)v.h->weight_eff;
        k->active = active;
        k->eligible = (uint8_t)ok;
        k->tried = (uint8_t)was_tried(t, b);
        k->backup = (uint8_t)(cb->backup != 0);
        k->max_conns = cb->max_conns;
        k->ewma_ns = pool->balance == BALANCE_P2C ? shm_backend_ewma(w->shm, b, now) : 0;
        k->id = cb->name_hash;
        w->cand_limit[i] = adm == SHM_ADMIT_TRIAL ? (int32_t)trials : 0;
        w->cand_epoch[i] = v.h->epoch;
    }
    return (uint32_t)pool->n_backends;
}

/* Picks a backend of the client's pool not tried yet for this request, taking a trial slot
 * when it needs one and its in-flight slot (a refused one is skipped for this pick). -1 when
 * none is usable. */
static int client_pick(struct client *c, uint64_t now, uint64_t *cool_min)
{
    struct worker *w = c->w;
    const struct conf_pool *pool = client_pool(c);
    struct tries *t = client_tries(c);
    uint32_t n = client_cands(c, now, cool_min);
    struct balancer_req req = {t->key, t->has_key};

    for (uint32_t round = 0; round <= n; round++) {
        int i = balancer_pick_req(&w->bal[c->ln->pool], w->cands, n, &req);
        if (i < 0)
            return -1;
        uint32_t b = (uint32_t)(pool->first_backend + i);
        int trial = 0;

        if (w->cand_limit[i]) {
            trial = shm_trial_acquire(w->shm, (uint32_t)w->slot, b, w->cand_limit[i]);
            if (!trial) {
                w->cands[i].tried = 1;
                continue;
            }
        }
        /* The in-flight slot, exact across workers against max_conns; upstream_start (called
         * right after) counts the request, and its end gives the slot back. */
        if (!shm_active_acquire(w->shm, (uint32_t)w->slot, b)) {
            if (trial)
                shm_trial_release(w->shm, (uint32_t)w->slot, b);
            w->cands[i].tried = 1;
            continue;
        }
        t->trial = trial ? (int32_t)b : -1;
        t->trial_epoch = w->cand_epoch[i];
        return (int)b;
    }
    return -1;
}

/* Is a backend not tried yet usable for this request right now? */
static int client_has_candidate(struct client *c, uint64_t now)
{
    uint64_t cool;
    struct worker *w = c->w;
    uint32_t n = client_cands(c, now, &cool);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t b = (uint32_t)(client_pool(c)->first_backend + (int)i);
        /* one that admits trials only counts while a trial slot is free */
        if (balancer_usable(&w->cands[i], w->cands[i].backup) &&
            (!w->cand_limit[i] || shm_trials_in_flight(w->shm, b) < w->cand_limit[i]))
            return 1;
    }
    return 0;
}

/* May the request go to another backend after an outcome with cond / status? Nothing is
 * retried once bytes reached the client, beyond `retries`, past the request deadline, without
 * an untried usable backend, or over the pool's retry budget (shared by all workers). */
static int client_can_retry(struct client *c, uint32_t cond, int status, uint64_t now)
{
    struct worker *w = c->w;
    const struct conf_pool *pool = client_pool(c);
    const struct tries *t = client_tries(c);

    if (client_creq(c)->resp_started || t->n > pool->retries || t->n >= MAX_TRIES)
        return 0;
    if (!retry_is_retryable(pool, cond, status))
        return 0;
    if (t->deadline && uv_now(&w->loop) >= t->deadline)
        return 0;
    if (!client_has_candidate(c, now))
        return 0;
    uint64_t reqs, rets;
    shm_budget_window(w->shm, (uint32_t)pool->first_backend, (uint32_t)pool->n_backends, now, &reqs,
                      &rets);
    if (!retry_budget_allow(reqs, rets, pool->retry_budget_pct, pool->retry_budget_min)) {
        log_debug("request %.*s: no retry, the retry budget of pool %s is spent",
                  (int)client_creq(c)->rid_len, client_creq(c)->rid, pool->name);
        return 0;
    }
    return 1;
}

/* A retry will follow the current try, which failed on backend b: count it. */
static void client_retry_commit(struct client *c, uint64_t now)
{
    struct worker *w = c->w;
    uint32_t b = client_backend(c);
    shm_wb_budget_note(w->shm, (uint32_t)w->slot, b, now, 1);
    shm_counter_add(&shm_wb(w->shm, (uint32_t)w->slot, b)->retries, 1);
}

static void client_try(struct client *c);

static void on_retry_q(uv_timer_t *timer)
{
    tq_expire(timer->data, on_retry_q, client_try);
}

/* Waits out the back-off before the next try: full jitter, capped by the request deadline. */
static void client_retry_wait(struct client *c)
{
    struct worker *w = c->w;
    const struct conf_pool *pool = client_pool(c);
    struct tries *t = client_tries(c);
    struct tq *q = &w->retry_q;
    uint64_t now = uv_now(&w->loop);
    uint64_t d = retry_backoff_ms(pool, t->n, balancer_random(&w->bal[c->ln->pool], UINT64_MAX));

    if (t->deadline && now + d > t->deadline)
        d = t->deadline > now ? t->deadline - now : 0;
    if (d == 0) {
        client_try(c);
        return;
    }
    /* sorted insert from the tail: back-offs are short, most go near the end */
    client_timer_stop(c);
    c->deadline = now + d;
    c->tq = q;
    struct client *after = q->tail;
    while (after && after->deadline > c->deadline)
        after = after->tprev;
    c->tprev = after;
    c->tnext = after ? after->tnext : q->head;
    if (c->tnext)
        c->tnext->tprev = c;
    else
        q->tail = c;
    if (after) {
        after->tnext = c;
    } else {
        q->head = c;
        if (!q->armed_at || q->armed_at > c->deadline) {
            q->armed_at = c->deadline;
            uv_timer_start(&q->timer, on_retry_q, d, 0);
        }
    }
}

static void client_gateway_error(struct client *c, enum upstream_err e)
{
    const char *via = client_via(c);
    int n = client_attempts(c);
    switch (e) {
    case UPSTREAM_ETIMEOUT:
        client_error_via(c, 504, "upstream_error", "upstream_timeout", "the upstream timed out", 0,
                         0, via, n);
        break;
    case UPSTREAM_ETLS:
        client_error_via(c, 502, "upstream_error", "upstream_tls_failed",
                         "TLS handshake with the upstream failed", 0, 0, via, n);
        break;
    case UPSTREAM_ECONNECT: {
        /* a host name that does not resolve says so */
        const char *why =
            c->tries_on && n ? upstream_resolve_error(&c->w->up, (int)client_backend(c)) : NULL;
        client_error_via(c, 502, "upstream_error", "upstream_connect_failed",
                         why ? why : "could not connect to the upstream", 0, 0, via, n);
        break;
    }
    case UPSTREAM_ERESET:
        client_error_via(c, 502, "upstream_error", "upstream_reset",
                         "the upstream closed the connection", 0, 0, via, n);
        break;
    default:
        client_error_via(c, 502, "upstream_error", "upstream_bad_response",
                         "invalid response from the upstream", 0, 0, via, n);
        break;
    }
}

/* No (further) try is possible: the client gets what the last one came to. */
static void client_fail(struct client *c)
{
    struct tries *t = client_tries(c);
    if (t->deadline && uv_now(&c->w->loop) >= t->deadline) {
        client_error_via(c, 504, "upstream_error", "request_timeout",
                         "the request timed out (request_timeout)", 0, 0, client_via(c), t->n);
        return;
    }
    if (t->last_err == UPSTREAM_OK && t->last_status) {
        /* an answer was consumed for a retry that then found no backend */
        client_error_via(c, 502, "upstream_error", "upstream_error_status",
                         "the upstream failed and no other backend could take the request", 0, 0,
                         client_via(c), t->n);
        return;
    }
    client_gateway_error(c, (enum upstream_err)t->last_err);
}

/* The current try failed before any response byte reached the client. */
static void client_try_failed(struct client *c, enum upstream_err err)
{
    struct worker *w = c->w;
    const struct conf_pool *pool = client_pool(c);
    struct tries *t = client_tries(c);
    uint32_t b = client_backend(c);
    uint64_t now = time_mono_ns();
    uint32_t cond = retry_cond(err, 0);

    if (retry_is_failure(pool, cond, 0)) {
        shm_wb_record_fail(w->shm, (uint32_t)w->slot, b, now);
        client_trial_outcome(c, 0);
    }
    client_try_end(c);
    t->last_err = err;
    t->last_status = 0;
    if (client_can_retry(c, cond, 0, now)) {
        log_debug("request %.*s: backend %s: %s, retrying (try %u)", (int)client_creq(c)->rid_len,
                  client_creq(c)->rid, w->conf->backends[b].name, upstream_strerror(err), t->n + 1);
        client_retry_commit(c, now);
        client_retry_wait(c);
        return;
    }
    client_fail(c);
}

/* Sends the request to the next backend, or answers when there is none. */
static void client_try(struct client *c)
{
    struct worker *w = c->w;
    const struct conf_pool *pool = client_pool(c);
    struct tries *t = client_tries(c);
    uint64_t now = time_mono_ns(), lnow = uv_now(&w->loop), cool_min;

    if (t->deadline && lnow >= t->deadline) {
        client_fail(c);
        return;
    }
    int b = client_pick(c, now, &cool_min);
    if (b < 0) {
        if (cool_min) {
            uint64_t left = cool_min > now ? cool_min - now : 0;
            int secs = (int)((left + 999999999ULL) / 1000000000ULL);
            client_error_via(c, 429, "requests", "rate_limit_exceeded",
                             "every backend is rate limited: retry after the given time", 0,
                             secs < 1 ? 1 : secs, client_via(c), t->n);
        } else if (t->n) {
            client_fail(c);
        } else {
            client_error(c, 503, "upstream_error", "no_backend_available",
                         "no backend is available", 0, 1);
        }
        return;
    }
    t->tried[t->n++] = (uint32_t)b;
    if (t->n == 1) /* the pool-wide retry budget counts client requests once, retries apart */
        shm_wb_budget_note(w->shm, (uint32_t)w->slot, (uint32_t)b, now, 0);
    t->discard = t->recorded = t->trial_done = t->sse = t->sent = 0;
    t->sse_nl = 2;
    t->try_ns = now;
    client_creq(c)->rq.ops = &client_ops;
    client_creq(c)->rq.ctx = c;
    client_creq(c)->rq.body = client_creq(c)->body;
    client_creq(c)->rq.body_len = client_creq(c)->body_len;
    client_creq(c)->rq.head_only = client_creq(c)->head_method;
    client_creq(c)->rq.dechunk = client_creq(c)->http10;
    client_creq(c)->rq.rechunk_sse = !client_creq(c)->http10;
    client_creq(c)->rq.backend = b;
    client_creq(c)->rq.connect_timeout_ms = pool->connect_timeout_ms;
    client_creq(c)->rq.head_timeout_ms =
        pool->try_timeout_ms ? pool->try_timeout_ms : pool->first_byte_timeout_ms;
    if (t->deadline) {
        uint64_t left = t->deadline - lnow;
        if (client_creq(c)->rq.connect_timeout_ms > left)
            client_creq(c)->rq.connect_timeout_ms = left;
        if (client_creq(c)->rq.head_timeout_ms > left)
            client_creq(c)->rq.head_timeout_ms = left;
    }
    int r = upstream_start(&w->up, &client_creq(c)->rq);
    if (r < 0)
        client_try_failed(c, (enum upstream_err) - r);
}

/* A 429: backend b cools down for as long as the answer asks (1 s when it does not say). */
static void client_cool(struct client *c, uint32_t b, const struct upstream_resp *ur, uint64_t now)
{
    struct worker *w = c->w;
    int64_t ms = proxy_cool_ms(ur->hdrs, ur->n_hdrs, (int64_t)(time_real_ms() / 1000));
    if (ms < 0)
        ms = COOL_DEFAULT_MS;
    if (ms > COOL_MAX_MS)
        ms = COOL_MAX_MS;
    _Atomic uint64_t *cu = &shm_wb(w->shm, (uint32_t)w->slot, b)->cool_until_ns;
    uint64_t until = now + (uint64_t)ms * 1000000ULL;
    if (until > atomic_load_explicit(cu, memory_order_relaxed))
        atomic_store_explicit(cu, until, memory_order_relaxed);
    log_debug("backend %s: 429, cooling for %lld ms", w->conf->backends[b].name, (long long)ms);
}

/* Records what the response head says about the backend: 429 cools it, 401/403 count against
 * its key, a failure status is a failure; anything else is recorded as a success once the
 * exchange completes. */
static void client_head_outcome(struct client *c, const struct upstream_resp *ur, uint32_t cond,
                                uint64_t now)
{
    struct worker *w = c->w;
    const struct conf_pool *pool = client_pool(c);
    struct tries *t = client_tries(c);
    uint32_t b = client_backend(c);

    if (ur->status == 429) {
        client_cool(c, b, ur, now);
        t->recorded = 1;
        client_trial_outcome(c, 0);
        return;
    }
    if (ur->status == 401 || ur->status == 403) {
        shm_wb_record_auth(w->shm, (uint32_t)w->slot, b);
        t->recorded = 1;
        client_trial_outcome(c, 0);
        if (!w->auth_log_ns[b] || now - w->auth_log_ns[b] >= AUTH_LOG_NS) {
            w->auth_log_ns[b] = now;
            log_warn("backend %s answered %d: its api_key is bad", w->conf->backends[b].name,
                     ur->status);
        }
    }
    if (retry_is_failure(pool, cond, ur->status)) {
        shm_wb_record_fail(w->shm, (uint32_t)w->slot, b, now);
        t->recorded = 1;
        client_trial_outcome(c, 0);
    }
}

static int op_on_head(void *ctx, const struct upstream_resp *ur, const char *body, size_t n,
                      int complete)
{
    struct client *c = ctx;
    struct worker *w = c->w;
    struct tries *t = client_tries(c);
    struct proxy_resp r;
    uint64_t now = time_mono_ns();
    uint32_t cond = retry_cond(UPSTREAM_OK, ur->status);

    t->head_ns = now - t->try_ns;
    client_head_outcome(c, ur, cond, now);
    if (ur->status >= 400 && client_can_retry(c, cond, ur->status, now)) {
        /* consumed, not forwarded: the next backend answers instead */
        log_debug("request %.*s: backend %s answered %d, retrying (try %u)",
                  (int)client_creq(c)->rid_len, client_creq(c)->rid,
                  w->conf->backends[client_backend(c)].name, ur->status, t->n + 1);
        t->discard = 1;
        t->last_err = UPSTREAM_OK;
        t->last_status = ur->status;
        client_retry_commit(c, now);
        return 0;
    }

    client_creq(c)->resp_started = 1;
    client_creq(c)->resp_close =
        !client_creq(c)->keepalive || ur->until_close || w->draining || c->close_after;
    r.status = ur->status;
    r.reason = ur->reason;
    r.reason_len = ur->reason_len;
    r.hdrs = ur->hdrs;
    r.n_hdrs = ur->n_hdrs;
    r.keep_chunked = ur->chunked;
    r.close = client_creq(c)->resp_close;
    r.http10_keepalive = client_creq(c)->http10 && !client_creq(c)->resp_close;
    r.request_id = client_creq(c)->rid;
    r.request_id_len = client_creq(c)->rid_len;
    r.backend = client_via(c);
    r.attempts = t->n;
    int hl = proxy_build_response_head(w->scratch, head_cap(w), &r);
    if (hl < 0)
        return -1;
    if (n)
        t->sent = 1;
    if (!ur->rechunk)
        return client_write(c, w->scratch, (size_t)hl, body, n);
    /* SSE: each piece goes out as one chunk of ours */
    t->sse = 1;
    t->sse_nl = (uint8_t)proxy_sse_newlines(t->sse_nl, body, n);
    if (n)
        hl += (int)proxy_chunk_line(w->scratch + hl, n);
    const char *tail = n ? (complete ? "\r\n0\r\n\r\n" : "\r\n") : (complete ? "0\r\n\r\n" : "");
    return client_write3(c, w->scratch, (size_t)hl, body, n, tail, strlen(tail));
}

static int op_on_body(void *ctx, const char *p, size_t n, int complete)
{
    struct client *c = ctx;
    struct tries *t = client_tries(c);
    if (t->discard)
        return 0;
    if (n)
        t->sent = 1;
    if (!t->sse)
        return client_write(c, NULL, 0, p, n);
    char line[20];
    size_t ll = n ? proxy_chunk_line(line, n) : 0;
    const char *tail = n ? (complete ? "\r\n0\r\n\r\n" : "\r\n") : (complete ? "0\r\n\r\n" : "");
    t->sse_nl = (uint8_t)proxy_sse_newlines(t->sse_nl, p, n);
    return client_write3(c, line, ll, p, n, tail, strlen(tail));
}

/* The upstream failed after the response head went out. An SSE stream we frame ourselves gets
 * an `event: error` and a clean end (never a silently truncated 200); anything else can only
 * be cut. */
static void client_stream_failed(struct client *c, enum upstream_err err)
{
    struct worker *w = c->w;
    struct tries *t = client_tries(c);
    int stalled = err == UPSTREAM_ETIMEOUT;

    log_info("request %.*s: backend %s %s mid-stream", (int)client_creq(c)->rid_len,
             client_creq(c)->rid, w->conf->backends[client_backend(c)].name,
             stalled ? "stalled" : "failed");
    if (!t->sse || c->writing) {
        client_close(c);
        return;
    }
    /* end an event the client got part of, so ours is not glued to it */
    const char *prefix = t->sse_nl >= 2 ? "" : t->sse_nl == 1 ? "\n" : "\n\n";
    int n = proxy_build_sse_error(
        w->scratch, head_cap(w), prefix,
        stalled ? "upstream stream stalled: no data within stream_idle_timeout"
                : "upstream connection lost mid-stream",
        stalled ? "upstream_stream_timeout" : "upstream_stream_interrupted");
    if (n < 0) {
        client_close(c);
        return;
    }
    int r = client_write(c, w->scratch, (size_t)n, NULL, 0);
    if (r < 0)
        client_close(c);
    else if (r == 0)
        client_request_done(c);
}

static void op_on_end(void *ctx, enum upstream_err err)
{
    struct client *c = ctx;
    struct worker *w = c->w;
    struct tries *t = client_tries(c);
    uint64_t now = time_mono_ns();
    uint32_t b = client_backend(c);

    if (t->discard) {
        /* the consumed answer is drained (or broke: the retry was decided anyway) */
        client_try_end(c);
        client_retry_wait(c);
        return;
    }
    if (err == UPSTREAM_OK || (err == UPSTREAM_ECLIENT && client_creq(c)->resp_started)) {
        /* a client that leaves mid-answer says nothing against the backend */
        if (!t->recorded) {
            shm_wb_record_ok(w->shm, (uint32_t)w->slot, b, now, t->head_ns);
            client_trial_outcome(c, 1);
        }
        client_try_end(c);
        if (err == UPSTREAM_OK)
            client_request_done(c);
        else
            client_close(c);
        return;
    }
    if (err == UPSTREAM_ECLIENT) {
        client_try_end(c);
        client_close(c);
        return;
    }
    if (client_creq(c)->resp_started) {
        if (!t->recorded) {
            shm_wb_record_fail(w->shm, (uint32_t)w->slot, b, now);
            client_trial_outcome(c, 0);
        }
        client_try_end(c);
        client_stream_failed(c, err);
        return;
    }
    client_try_failed(c, err);
}

static const struct upstream_ops client_ops = {
    .build_head = op_build_head,
    .on_head = op_on_head,
    .on_body = op_on_body,
    .on_end = op_on_end,
};

static int is_chat_completions(const struct client *c)
{
    static const char path[] = "/v1/chat/completions";
    size_t n = sizeof(path) - 1;
    return client_creq(c)->url_len >= n && memcmp(client_creq(c)->url, path, n) == 0 &&
           (client_creq(c)->url_len == n || client_creq(c)->url[n] == '?');
}

/* Parses the JSON body for "model", "stream" and the pool's json:FIELD hash key; -1 when it is
 * not a JSON object. */
static int client_parse_body(struct client *c)
{
    const struct conf_pool *pool = client_pool(c);
    const char *field = pool->hash_src == HASH_JSON ? pool->hash_name : NULL;
    return proxy_parse_body_key(client_creq(c)->body, client_creq(c)->body_len, field,
                                &client_creq(c)->info) == 0
               ? 0
               : -1;
}

/* A whole request is in (parser paused after it): answer it or forward it. */
static void client_dispatch(struct client *c)
{
    struct worker *w = c->w;

    c->state = CS_WAIT;
    client_creq(c)->resp_started = 0;
    client_timer_stop(c);
    if (client_creq(c)->err == 404 || client_creq(c)->err == 400) {
        client_path_error(c, 0);
        return;
    }
    client_creq(c)->info.model = NULL;
    client_creq(c)->info.model_len = 0;
    client_creq(c)->info.stream = 0;
    client_creq(c)->info.key = NULL;
    client_creq(c)->info.key_len = 0;
    int json_ok = client_creq(c)->body_len ? client_parse_body(c) == 0 : 0;
    if (!json_ok && client_creq(c)->parser.method == HTTP_POST && is_chat_completions(c)) {
        client_error(c, 400, "invalid_request_error", "invalid_json",
                     "the request body is not a JSON object", 0, 0);
        return;
    }

    const struct conf_pool *pool = client_pool(c);
    struct tries *t = client_tries(c);
    memset(t, 0, sizeof(*t));
    t->trial = -1;
    if (pool->request_timeout_ms)
        t->deadline = uv_now(&w->loop) + pool->request_timeout_ms;
    if (pool->hash_src == HASH_HEADER) {
        const struct proxy_hdr *h = find_hdr(c, pool->hash_name);
        if (h && h->value_len) {
            t->key = balancer_hash(h->value, h->value_len);
            t->has_key = 1;
        }
    } else if (pool->hash_src == HASH_JSON && client_creq(c)->info.key) {
        t->key = balancer_hash(client_creq(c)->info.key, client_creq(c)->info.key_len);
        t->has_key = 1;
    }
    c->tries_on = 1;
    client_try(c);
}

/* The response went out: next pipelined request, or idle, or close. */
static void client_request_done(struct client *c)
{
    struct worker *w = c->w;

    c->tries_on = 0;
    shm_counter_add(&shm_worker(w->shm, (uint32_t)w->slot)->requests, 1);
    client_free_body(c);
    c->fresh = 0;
    if (client_creq(c)->resp_close || c->close_after || w->draining) {
        client_linger(c);
        return;
    }
    if (c->pos < c->len) {
        /* pipelined bytes: move them to the front so the next request starts at 0 */
        memmove(c->buf, c->buf + c->pos, c->len - c->pos);
        c->len -= c->pos;
        c->pos = 0;
        c->state = CS_HEAD;
        llhttp_resume(&client_creq(c)->parser);
        client_timer(c, T_HEADER);
        client_read_start(c);
        client_process(c);
        return;
    }
    if (c->eof) {
        client_close(c);
        return;
    }
    client_drop_buf(c); /* the parser goes with it: a new one starts the next request */
    c->state = CS_IDLE;
    client_timer(c, T_KEEPALIVE);
    client_read_start(c);
}

/* ---- reading ---- */

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    struct client *c = h->data;
    struct worker *w = c->w;
    if (c->state == CS_LINGER) {
        *b = uv_buf_init(w->scratch, (unsigned)w->data_size);
        return;
    }
    client_take_buf(c);
    if (!c->buf) {
        *b = uv_buf_init(NULL, 0);
        return;
    }
    *b = uv_buf_init(c->buf + c->len, (unsigned)(w->data_size - c->len));
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    struct client *c = s->data;

    if (c->state == CS_CLOSED)
        return;
    if (c->state == CS_LINGER) {
        if (n < 0)
            client_close(c);
        return;
    }
    if (n == 0) {
        if (c->state == CS_IDLE && c->len == 0)
            client_drop_buf(c); /* nothing came: an idle connection holds no buffer */
        return;
    }
    if (n < 0) {
        if (n == UV_ENOBUFS && !c->buf) {
            /* no buffer to be had (out of memory): nothing would restart reading later, so
             * the connection would hang until a timeout; give it up now */
            log_warn("client %s: out of memory for a read buffer, closing", c->ip);
            client_close(c);
            return;
        }
        if (n == UV_ENOBUFS) {
            /* buffer full while a request is in flight: wait until it is answered */
            uv_read_stop(s);
            c->reading = 0;
            if (c->state == CS_HEAD)
                client_error(c, 431, "invalid_request_error", "request_header_too_large",
                             "request header too large", 1, 0);
            return;
        }
        if (n == UV_EOF) {
            c->eof = 1;
            c->reading = 0;
            /* half-close: a request in flight still gets its answer */
            if (c->state == CS_WAIT)
                return;
        }
        client_close(c);
        return;
    }
    c->len += (uint32_t)n;
    switch ((enum cstate)c->state) {
    case CS_IDLE:
        c->state = CS_HEAD;
        if (!c->fresh)
            client_timer(c, T_HEADER);
        break;
    case CS_BODY:
        client_timer(c, T_BODY);
        break;
    case CS_WAIT:
        /* pipelined bytes wait in the buffer; stop reading once it is full */
        if (c->len >= c->w->data_size) {
            uv_read_stop(s);
            c->reading = 0;
        }
        return;
    default:
        break;
    }
    client_process(c);
}

static void client_read_start(struct client *c)
{
    if (c->reading || c->eof || c->state == CS_CLOSED)
        return;
    c->reading = 1;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

/* ---- accepting ---- */

static void on_connection(uv_stream_t *server, int status)
{
    struct listener *l = server->data;
    struct worker *w = l->w;
    struct client *c;

    if (status < 0 || w->draining)
        return;
    c = w->free_clients;
    if (c)
        w->free_clients = c->next;
    else if (!(c = malloc(sizeof(*c))))
        return;
    memset(c, 0, sizeof(*c));
    c->w = w;
    c->ln = &w->conf->listens[l->idx];
    uv_tcp_init(&w->loop, &c->tcp);
    c->tcp.data = c;
    c->li = (uint16_t)l->idx;
    c->handles = 1;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        /* another worker took it */
        c->state = CS_CLOSED;
        uv_close((uv_handle_t *)&c->tcp, client_handle_closed);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);

    struct sockaddr_storage ss;
    int sl = sizeof(ss);
    strcpy(c->ip, "unknown");
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET)
            uv_ip4_name((struct sockaddr_in *)&ss, c->ip, sizeof(c->ip));
        else if (ss.ss_family == AF_INET6)
            uv_ip6_name((struct sockaddr_in6 *)&ss, c->ip, sizeof(c->ip));
    }

    c->state = CS_IDLE;
    c->fresh = 1;
    c->next = w->clients;
    if (w->clients)
        w->clients->prev = c;
    w->clients = c;
    w->n_clients++;
    conns_add(w, 1);
    client_timer(c, T_HEADER);
    c->reading = 1;
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

/* ---- stopping ---- */

static void on_handle_closed_noop(uv_handle_t *h)
{
}

static void worker_close_listeners(struct worker *w)
{
    for (int i = 0; i < w->n_listeners; i++)
        if (!uv_is_closing((uv_handle_t *)&w->listeners[i].tcp))
            uv_close((uv_handle_t *)&w->listeners[i].tcp, on_handle_closed_noop);
}

static void worker_check_exit(struct worker *w)
{
    if (!(w->draining || w->stopping) || w->n_clients > 0)
        return;
    if (!uv_is_closing((uv_handle_t *)&w->sigterm)) {
        uv_close((uv_handle_t *)&w->sigterm, on_handle_closed_noop);
        uv_close((uv_handle_t *)&w->sigint, on_handle_closed_noop);
        /* libuv put the default action back: a Ctrl-C reaches a worker twice (terminal and
         * master), and the second must not kill it in the middle of its exit */
        signal(SIGTERM, SIG_IGN);
        signal(SIGINT, SIG_IGN);
        uv_close((uv_handle_t *)&w->hard_stop, on_handle_closed_noop);
        uv_close((uv_handle_t *)&w->retry_q.timer, on_handle_closed_noop);
        for (int i = 0; i < w->n_tqs; i++)
            uv_close((uv_handle_t *)&w->tqs[i].timer, on_handle_closed_noop);
    }
}

static void worker_stop_now(struct worker *w)
{
    w->stopping = 1;
    worker_close_listeners(w);
    upstream_drain(&w->up);
    while (w->clients)
        client_close(w->clients);
    worker_check_exit(w);
}

static void on_hard_stop(uv_timer_t *t)
{
    struct worker *w = t->data;
    log_warn("graceful stop took longer than hard_stop_after: closing %d connections",
             w->n_clients);
    worker_stop_now(w);
}

static void on_signal(uv_signal_t *s, int signum)
{
    struct worker *w = s->data;
    if (signum == SIGINT) {
        worker_stop_now(w);
        return;
    }
    if (w->draining)
        return;
    w->draining = 1;
    worker_close_listeners(w);
    upstream_drain(&w->up);
    for (struct client *c = w->clients, *next; c; c = next) {
        next = c->next;
        if (c->state == CS_IDLE && c->len == 0)
            client_close(c);
        else
            c->close_after = 1;
    }
    if (w->conf->global.hard_stop_after_ms)
        uv_timer_start(&w->hard_stop, on_hard_stop, w->conf->global.hard_stop_after_ms, 0);
    worker_check_exit(w);
}

/* ---- setup ---- */

static void settings_init(void)
{
    llhttp_settings_init(&req_settings);
    req_settings.on_message_begin = on_req_begin;
    req_settings.on_url = on_req_url;
    req_settings.on_header_field = on_req_hfield;
    req_settings.on_header_value = on_req_hvalue;
    req_settings.on_headers_complete = on_req_headers;
    req_settings.on_body = on_req_body;
    req_settings.on_message_complete = on_req_done;
}

/* Seeds a pool's balancer for this worker and moves it `slot` picks ahead over the configured
 * backends, so that with light traffic the workers do not all start on the same backend. */
static void balancer_start(struct balancer *bal, const struct conf *conf, int pool, int slot,
                           uint64_t seed)
{
    const struct conf_pool *p = &conf->pools[pool];
    struct balancer_cand cands[64];
    uint32_t n = p->n_backends < 64 ? (uint32_t)p->n_backends : 64;

    balancer_seed(bal, (seed ^ ((uint64_t)getpid() << 32) ^
                        ((uint64_t)slot * 0x9e3779b97f4a7c15ULL) ^ (uint64_t)pool) |
                           1);
    if ((uint32_t)p->n_backends != n)
        return;
    memset(cands, 0, sizeof(cands));
    for (uint32_t i = 0; i < n; i++) {
        const struct conf_backend *cb = &conf->backends[p->first_backend + (int)i];
        cands[i].weight = cb->weight;
        cands[i].eligible = 1;
        cands[i].backup = (uint8_t)(cb->backup != 0);
        cands[i].id = cb->name_hash;
    }
    for (int k = 0; k < slot; k++)
        balancer_pick(bal, cands, n);
}

static int worker_setup(struct worker *w, struct conf *conf, struct shm *shm, int slot,
                        const int *listen_fds)
{
    size_t data = BUF_MIN;
    uint32_t max_hdrs = 128;
    int max_pool = 1;

    w->conf = conf;
    w->shm = shm;
    w->slot = slot;
    uv_signal_init(&w->loop, &w->sigterm);
    uv_signal_init(&w->loop, &w->sigint);
    uv_timer_init(&w->loop, &w->hard_stop);
    uv_timer_init(&w->loop, &w->retry_q.timer);
    w->retry_q.timer.data = &w->retry_q;
    w->retry_q.w = w;
    w->sigterm.data = w->sigint.data = w->hard_stop.data = w;
    uv_signal_start(&w->sigterm, on_signal, SIGTERM);
    uv_signal_start(&w->sigint, on_signal, SIGINT);
    int n_tqs = conf->n_listens * T_KINDS + 1;
    if (!(w->tqs = calloc((size_t)n_tqs, sizeof(*w->tqs))))
        return -ENOMEM;
    for (int i = 0; i < n_tqs; i++) {
        struct tq *q = &w->tqs[i];
        const struct conf_listen *ln = &conf->listens[i / T_KINDS];
        uv_timer_init(&w->loop, &q->timer);
        q->timer.data = q;
        q->w = w;
        if (i == n_tqs - 1)
            q->ms = LINGER_MS;
        else if (i % T_KINDS == T_HEADER)
            q->ms = ln->client_header_timeout_ms;
        else if (i % T_KINDS == T_BODY)
            q->ms = ln->client_body_timeout_ms;
        else if (i % T_KINDS == T_SEND)
            q->ms = conf->pools[ln->pool].idle_timeout_ms;
        else
            q->ms = ln->keepalive_timeout_ms;
    }
    w->n_tqs = n_tqs;
    for (int i = 0; i < conf->n_listens; i++) {
        if (conf->listens[i].max_header_size + 1024 > data)
            data = conf->listens[i].max_header_size + 1024;
        if (conf->listens[i].max_headers > max_hdrs)
            max_hdrs = conf->listens[i].max_headers;
    }
    w->data_size = data;
    w->max_hdrs = max_hdrs;
    w->rid_off = (sizeof(struct creq) + 15) & ~(size_t)15;
    w->hdrs_off = w->rid_off + 32;
    w->data_off = (w->hdrs_off + max_hdrs * sizeof(struct proxy_hdr) + 63) & ~(size_t)63;
    bufpool_init(&w->bufs, w->data_off + data, MAX_FREE_BUFS);
    if (!(w->scratch = malloc(w->bufs.size)))
        return -ENOMEM;
    if (getrandom(&w->rid_seed1, sizeof(w->rid_seed1), 0) != sizeof(w->rid_seed1) ||
        getrandom(&w->rid_seed2, sizeof(w->rid_seed2), 0) != sizeof(w->rid_seed2)) {
        w->rid_seed1 = time_real_ms() ^ ((uint64_t)getpid() << 32);
        w->rid_seed2 = time_mono_ns();
    }
    settings_init();
    int r = upstream_init(&w->up, &w->loop, conf, shm, slot, &w->bufs, w->data_off, data,
                          w->hdrs_off, max_hdrs);
    if (r < 0)
        return r;

    w->bal = calloc((size_t)(conf->n_pools ? conf->n_pools : 1), sizeof(*w->bal));
    if (!w->bal)
        return -ENOMEM;
    for (int i = 0; i < conf->n_pools; i++) {
        if (conf->pools[i].n_backends > max_pool)
            max_pool = conf->pools[i].n_backends;
        r = balancer_init(&w->bal[i], conf->pools[i].balance, (uint32_t)conf->pools[i].n_backends);
        if (r < 0)
            return r;
        w->bal[i].hash_load_pct = conf->pools[i].hash_load_pct; /* hash_balance_factor */
    }
    w->cands = calloc((size_t)max_pool, sizeof(*w->cands));
    w->cand_limit = calloc((size_t)max_pool, sizeof(*w->cand_limit));
    w->cand_epoch = calloc((size_t)max_pool, sizeof(*w->cand_epoch));
    w->auth_log_ns =
        calloc((size_t)(conf->n_backends ? conf->n_backends : 1), sizeof(*w->auth_log_ns));
    if (!w->cands || !w->cand_limit || !w->cand_epoch || !w->auth_log_ns)
        return -ENOMEM;
    for (int i = 0; i < conf->n_pools; i++)
        balancer_start(&w->bal[i], conf, i, slot, w->rid_seed1);

    w->listeners = calloc((size_t)(conf->n_listens ? conf->n_listens : 1), sizeof(*w->listeners));
    if (!w->listeners)
        return -ENOMEM;
    for (int i = 0; i < conf->n_listens; i++) {
        struct listener *l = &w->listeners[i];
        l->w = w;
        l->idx = i;
        uv_tcp_init(&w->loop, &l->tcp);
        l->tcp.data = l;
        w->n_listeners++;
        if ((r = uv_tcp_open(&l->tcp, listen_fds[i])) != 0 ||
            (r = uv_listen((uv_stream_t *)&l->tcp, conf->listens[i].backlog, on_connection)) != 0) {
            log_err("listen %s: %s", conf->listens[i].bind, uv_strerror(r));
            return r;
        }
    }
    return 0;
}

static void worker_teardown(struct worker *w)
{
    for (int i = 0; i < w->conf->n_pools && w->bal; i++)
        if (w->bal[i].ops)
            balancer_free(&w->bal[i]);
    free(w->bal);
    free(w->cands);
    free(w->cand_limit);
    free(w->cand_epoch);
    free(w->auth_log_ns);
    free(w->listeners);
    free(w->tqs);
    upstream_free(&w->up);
    while (w->free_clients) {
        struct client *c = w->free_clients;
        w->free_clients = c->next;
        free(c);
    }
    bufpool_free(&w->bufs);
    free(w->scratch);
    free(w->body_cache);
}

int worker_main(struct conf *conf, struct shm *shm, int slot, const int *listen_fds)
{
    struct worker *w = calloc(1, sizeof(*w));
    int rc = 1;

    if (!w)
        return 1;
    signal(SIGPIPE, SIG_IGN);
    if (tls_global_init() != 0)
        log_warn("TLS random generator setup failed");
    if (uv_loop_init(&w->loop) != 0)
        goto out;
    if (worker_setup(w, conf, shm, slot, listen_fds) < 0) {
        worker_stop_now(w);
        uv_run(&w->loop, UV_RUN_DEFAULT);
        uv_loop_close(&w->loop);
        goto out;
    }
    log_debug("worker %d ready", slot);
    uv_run(&w->loop, UV_RUN_DEFAULT);
    log_debug("worker %d stopped (%llu client aborts)", slot, (unsigned long long)w->up.aborts);
    if (uv_loop_close(&w->loop) != 0)
        log_warn("worker %d: loop closed with handles open", slot);
    rc = 0;
out:
    worker_teardown(w);
    free(w);
    return rc;
}
