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
#include "core/tls.h"
#include "core/upstream.h"
#include "core/util.h"
#include "core/worker.h"

#define BUF_MIN       16384 /* smallest request/response buffer */
#define LINGER_MS     2000  /* how long a closing connection drains what the client still sends */
#define RID_MAX       128   /* longest client X-Request-Id kept as is */
#define MAX_FREE_BUFS 1024  /* buffers kept for reuse beyond those in use */

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
};

struct listener {
    uv_tcp_t tcp;
    struct worker *w;
    int idx;
};

struct client {
    uv_tcp_t tcp;
    struct worker *w;
    const struct conf_listen *ln;
    int li;        /* listener index */
    struct tq *tq; /* the timeout queue the client waits in, or NULL */
    struct client *tprev, *tnext;
    uint64_t deadline;          /* loop time (ms) the current timeout expires at */
    struct client *prev, *next; /* worker's list of open clients, or free list (next) */
    llhttp_t parser;
    char *buf; /* request bytes [0, len), parsed up to pos; NULL while idle */
    uint32_t len, pos;
    uint32_t head_end; /* offset just after the request head */
    enum cstate state;
    int handles;         /* open libuv handles; recycled at 0 */
    uint8_t fresh;       /* no request yet on this connection */
    uint8_t eof;         /* the client shut its write side */
    uint8_t close_after; /* close once the current response is sent (graceful stop) */
    uint8_t hstate, ev, reading, writing;
    uint8_t keepalive, http10, head_method, resp_started, resp_close;
    uint8_t body_heap, has_body;
    int err; /* status decided while parsing the request (404, 413, 431) */
    const char *url;
    size_t url_len;
    struct proxy_hdr *hdrs; /* at the tail of buf */
    uint32_t n_hdrs;
    const char *rid; /* X-Request-Id: the client's or generated */
    size_t rid_len;
    char *body; /* in buf at head_end, or malloc'd (body_heap) */
    uint64_t body_len, body_cap;
    struct proxy_body_info info;
    struct upstream_req rq;
    char *wbuf; /* only while a write waits: a pool buffer holding its uv_write_t and head */
    char ip[INET6_ADDRSTRLEN];
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
    size_t data_size; /* bytes of a buffer for data; header spans and the request id follow */
    uint32_t max_hdrs;
    struct upstream up;
    struct balancer *bal; /* per pool */
    struct balancer_cand *cands;
    struct client *clients, *free_clients;
    int n_clients;
    void *tokens; /* jsmn tokens, grown on demand */
    unsigned n_tokens;
    uint64_t rid_seed1, rid_seed2, rid_counter;
    char *scratch; /* one buffer for heads built and written at once */
};

static llhttp_settings_t req_settings;

static void client_process(struct client *c);
static void client_close(struct client *c);
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
    switch (c->state) {
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

static void on_tq(uv_timer_t *t)
{
    struct tq *q = t->data;
    uint64_t now = uv_now(&q->w->loop);
    struct client *c;
    while ((c = q->head) && c->deadline <= now) {
        client_timer_stop(c);
        on_client_timeout(c);
    }
    if (q->head)
        uv_timer_start(&q->timer, on_tq, q->head->deadline - now, 0);
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
        uv_timer_start(&q->timer, on_tq, q->ms, 0);
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
    c->buf = bufpool_get(&c->w->bufs);
    c->len = c->pos = 0;
}

static void client_drop_buf(struct client *c)
{
    bufpool_put(&c->w->bufs, c->buf);
    c->buf = NULL;
    c->len = c->pos = 0;
}

static void client_free_body(struct client *c)
{
    if (c->body_heap)
        free(c->body);
    c->body = NULL;
    c->body_heap = 0;
    c->body_len = c->body_cap = 0;
}

/* ---- closing ---- */

static void client_handle_closed(uv_handle_t *h)
{
    struct client *c = h->data;
    struct worker *w = c->w;
    if (--c->handles > 0)
        return;
    client_free_body(c);
    bufpool_put(&w->bufs, c->buf);
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
    if (c->rq.conn)
        upstream_abort(&c->rq);
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

/* Room for a head built in the scratch buffer: it must fit behind a pending write's request. */
static size_t head_cap(const struct worker *w)
{
    return w->bufs.size - WHEAD_OFF;
}

static void on_written(uv_write_t *req, int status)
{
    struct client *c = req->data;
    c->writing = 0;
    bufpool_put(&c->w->bufs, c->wbuf);
    c->wbuf = NULL;
    if (c->state == CS_CLOSED)
        return;
    if (status < 0) {
        client_close(c);
        return;
    }
    if (c->rq.conn)
        upstream_resume(&c->rq); /* continues the stream, or ends it (on_end) */
    else
        client_request_done(c); /* a response aigw made itself */
}

/* Writes head (copied if it must wait) then data (kept by the caller until the write ends).
 * 0 = all written, 1 = pending (on_written follows), -1 = the client is gone. */
static int client_write(struct client *c, const char *head, size_t hl, const char *data, size_t dl)
{
    uv_buf_t b[2];
    unsigned n = 0;
    if (hl)
        b[n++] = uv_buf_init((char *)head, (unsigned)hl);
    if (dl)
        b[n++] = uv_buf_init((char *)data, (unsigned)dl);
    if (!n)
        return 0;
    int r = uv_try_write((uv_stream_t *)&c->tcp, b, n);
    if (r == (int)(hl + dl))
        return 0;
    if (r < 0 && r != UV_EAGAIN)
        return -1;
    size_t done = r > 0 ? (size_t)r : 0;
    n = 0;
    if (!(c->wbuf = bufpool_get(&c->w->bufs)))
        return -1;
    uv_write_t *req = (uv_write_t *)c->wbuf;
    if (done < hl) {
        memcpy(c->wbuf + WHEAD_OFF, head + done, hl - done);
        b[n++] = uv_buf_init(c->wbuf + WHEAD_OFF, (unsigned)(hl - done));
        done = 0;
    } else {
        done -= hl;
    }
    if (dl > done)
        b[n++] = uv_buf_init((char *)data + done, (unsigned)(dl - done));
    req->data = c;
    if (uv_write(req, (uv_stream_t *)&c->tcp, b, n, on_written) != 0)
        return -1;
    c->writing = 1;
    return 1;
}

static void client_error(struct client *c, int status, const char *type, const char *code,
                         const char *msg, int close, int retry_after)
{
    struct worker *w = c->w;
    client_timer_stop(c);
    c->state = CS_WAIT;
    c->resp_close = close || !c->keepalive || w->draining || c->close_after;
    int n = proxy_build_error(w->scratch, head_cap(w), status, type, code, msg, c->resp_close,
                              retry_after, c->rid, c->rid_len);
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

/* ---- request parsing ---- */

static int on_req_begin(llhttp_t *p)
{
    struct client *c = p->data;
    c->url = NULL;
    c->url_len = 0;
    c->n_hdrs = 0;
    c->hstate = 0;
    c->err = 0;
    c->rid = NULL;
    c->rid_len = 0;
    c->has_body = 0;
    client_free_body(c);
    return 0;
}

static int on_req_url(llhttp_t *p, const char *at, size_t len)
{
    struct client *c = p->data;
    if (!c->url)
        c->url = at;
    c->url_len += len;
    return 0;
}

static int on_req_hfield(llhttp_t *p, const char *at, size_t len)
{
    struct client *c = p->data;
    if (c->hstate != 1) {
        if (c->n_hdrs >= c->ln->max_headers) {
            c->err = 431;
            return -1;
        }
        struct proxy_hdr *h = &c->hdrs[c->n_hdrs++];
        h->name = at;
        h->name_len = (uint32_t)len;
        h->value = at;
        h->value_len = 0;
        c->hstate = 1;
    } else {
        c->hdrs[c->n_hdrs - 1].name_len += (uint32_t)len;
    }
    return 0;
}

static int on_req_hvalue(llhttp_t *p, const char *at, size_t len)
{
    struct client *c = p->data;
    struct proxy_hdr *h = &c->hdrs[c->n_hdrs - 1];
    if (c->hstate != 2) {
        h->value = at;
        h->value_len = (uint32_t)len;
        c->hstate = 2;
    } else {
        h->value_len += (uint32_t)len;
    }
    return 0;
}

static int on_req_headers(llhttp_t *p)
{
    struct client *c = p->data;
    c->ev = CEV_HEAD;
    return HPE_PAUSED;
}

static int on_req_body(llhttp_t *p, const char *at, size_t len)
{
    struct client *c = p->data;
    if (c->err)
        return 0; /* the answer is already decided: drop the body */
    if (c->body_len + len > c->ln->max_body_size) {
        c->err = 413;
        return -1;
    }
    if (c->body_heap) {
        if (c->body_len + len > c->body_cap) {
            uint64_t cap = c->body_cap * 2;
            if (cap < c->body_len + len)
                cap = c->body_len + len;
            if (cap > c->ln->max_body_size)
                cap = c->ln->max_body_size;
            char *nb = realloc(c->body, cap);
            if (!nb) {
                c->err = 500;
                return -1;
            }
            c->body = nb;
            c->body_cap = cap;
        }
        memcpy(c->body + c->body_len, at, len);
    } else {
        /* in place: de-chunking only ever moves bytes towards the head */
        memmove(c->body + c->body_len, at, len);
    }
    c->body_len += len;
    return 0;
}

static int on_req_done(llhttp_t *p)
{
    struct client *c = p->data;
    c->ev = CEV_DONE;
    return HPE_PAUSED;
}

static const struct proxy_hdr *find_hdr(const struct client *c, const char *name)
{
    for (uint32_t i = 0; i < c->n_hdrs; i++)
        if (util_span_ieq(c->hdrs[i].name, c->hdrs[i].name_len, name))
            return &c->hdrs[i];
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

/* The request head is complete (parser resumed). 0 to go on with the body, -1 when an answer
 * was sent instead. */
static int client_on_head(struct client *c)
{
    struct worker *w = c->w;
    const struct conf_listen *ln = c->ln;
    llhttp_t *p = &c->parser;

    c->head_end = c->pos;
    if (c->head_end > ln->max_header_size || c->err == 431) {
        client_error(c, 431, "invalid_request_error", "request_header_too_large",
                     "request header too large", 1, 0);
        return -1;
    }
    c->keepalive = llhttp_should_keep_alive(p);
    c->http10 = p->http_major == 1 && p->http_minor == 0;
    c->head_method = p->method == HTTP_HEAD;

    const struct proxy_hdr *h = find_hdr(c, "x-request-id");
    if (h && rid_ok(h->value, h->value_len)) {
        c->rid = h->value;
        c->rid_len = h->value_len;
    } else {
        char *id = c->buf + w->data_size + w->max_hdrs * sizeof(struct proxy_hdr);
        proxy_request_id(id, w->rid_seed1, w->rid_seed2, w->rid_counter++);
        c->rid = id;
        c->rid_len = 32;
    }

    if (!c->url || !proxy_path_ok(c->url, c->url_len))
        c->err = 404;
    c->has_body = (p->flags & (F_CHUNKED | F_CONTENT_LENGTH)) != 0;
    int chunked = (p->flags & F_CHUNKED) != 0;
    uint64_t cl = chunked ? 0 : p->content_length;
    if (!chunked && (p->flags & F_CONTENT_LENGTH) && cl > ln->max_body_size) {
        client_error(c, 413, "invalid_request_error", "request_too_large", "request body too large",
                     1, 0);
        return -1;
    }
    int body_coming = chunked || cl > 0;
    h = find_hdr(c, "expect");
    if (h && body_coming && !c->http10) {
        if (!util_span_ieq(h->value, h->value_len, "100-continue")) {
            client_error(c, 417, "invalid_request_error", "expectation_failed",
                         "unsupported Expect", 1, 0);
            return -1;
        }
        if (c->err == 404) {
            /* the client waits for our word before sending the body: answer now */
            client_error(c, 404, "invalid_request_error", "not_found", "unknown path", 1, 0);
            return -1;
        }
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        uv_buf_t b = uv_buf_init((char *)cont, sizeof(cont) - 1);
        /* a client that did not wait for it already sent body bytes: no need */
        if (c->pos == c->len && uv_try_write((uv_stream_t *)&c->tcp, &b, 1) != (int)b.len) {
            client_close(c);
            return -1;
        }
    }

    c->body_len = 0;
    if (!chunked && c->head_end + cl > w->data_size) {
        c->body = malloc(cl);
        if (!c->body) {
            client_error(c, 500, "server_error", "out_of_memory", "out of memory", 1, 0);
            return -1;
        }
        c->body_heap = 1;
        c->body_cap = cl;
    } else {
        c->body = c->buf + c->head_end;
        c->body_heap = 0;
    }
    c->state = CS_BODY;
    client_timer(c, T_BODY);
    return 0;
}

/* Chunked bodies start in the buffer; once it runs short of room they move to the heap. */
static int client_body_to_heap(struct client *c)
{
    uint64_t cap = c->body_len * 2;
    if (cap < 65536)
        cap = 65536;
    if (cap > c->ln->max_body_size)
        cap = c->ln->max_body_size;
    if (cap < c->body_len)
        cap = c->body_len;
    char *nb = malloc(cap ? cap : 1);
    if (!nb)
        return -1;
    memcpy(nb, c->body, c->body_len);
    c->body = nb;
    c->body_cap = cap;
    c->body_heap = 1;
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
        c->ev = CEV_NONE;
        c->hdrs = (struct proxy_hdr *)(c->buf + w->data_size);
        llhttp_errno_t e = llhttp_execute(&c->parser, c->buf + c->pos, c->len - c->pos);
        if (e == HPE_OK) {
            c->pos = c->len;
            break;
        }
        if (e == HPE_PAUSED) {
            c->pos = (uint32_t)(llhttp_get_error_pos(&c->parser) - c->buf);
            if (c->ev == CEV_HEAD) {
                llhttp_resume(&c->parser);
                if (client_on_head(c) < 0)
                    return;
                force = 1; /* a body-less request completes without more bytes */
                continue;
            }
            client_dispatch(c);
            return;
        }
        if (c->err == 431) {
            client_error(c, 431, "invalid_request_error", "request_header_too_large",
                         "too many request headers", 1, 0);
        } else if (c->err == 413) {
            client_error(c, 413, "invalid_request_error", "request_too_large",
                         "request body too large", 1, 0);
        } else if (c->err == 500) {
            client_error(c, 500, "server_error", "out_of_memory", "out of memory", 1, 0);
        } else {
            log_debug("client %s: bad request: %s", c->ip, llhttp_get_error_reason(&c->parser));
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
        c->len = c->pos = c->head_end + (c->body_heap ? 0 : (uint32_t)c->body_len);
        if (!c->body_heap && (c->parser.flags & F_CHUNKED) &&
            w->data_size - c->len < w->data_size / 4) {
            if (client_body_to_heap(c) < 0) {
                client_error(c, 500, "server_error", "out_of_memory", "out of memory", 1, 0);
                return;
            }
            c->len = c->pos = c->head_end;
        }
    }
}

/* ---- forwarding ---- */

static int op_build_head(void *ctx, const struct conf_backend *be, char *buf, size_t cap)
{
    struct client *c = ctx;
    struct proxy_req r;
    const char *m = llhttp_method_name((llhttp_method_t)c->parser.method);
    r.method = m;
    r.method_len = strlen(m);
    r.path = c->url;
    r.path_len = c->url_len;
    r.hdrs = c->hdrs;
    r.n_hdrs = c->n_hdrs;
    r.client_ip = c->ip;
    r.request_id = c->rid;
    r.request_id_len = c->rid_len;
    r.has_body = c->has_body;
    r.body_len = c->body_len;
    return proxy_build_request(buf, cap, &r, be);
}

static int op_on_head(void *ctx, const struct upstream_resp *ur, const char *body, size_t n,
                      int complete)
{
    struct client *c = ctx;
    struct worker *w = c->w;
    struct proxy_resp r;

    c->resp_started = 1;
    c->resp_close = !c->keepalive || ur->until_close || w->draining || c->close_after;
    r.status = ur->status;
    r.reason = ur->reason;
    r.reason_len = ur->reason_len;
    r.hdrs = ur->hdrs;
    r.n_hdrs = ur->n_hdrs;
    r.keep_chunked = ur->chunked;
    r.close = c->resp_close;
    r.http10_keepalive = c->http10 && !c->resp_close;
    r.request_id = c->rid;
    r.request_id_len = c->rid_len;
    int hl = proxy_build_response_head(w->scratch, head_cap(w), &r);
    if (hl < 0)
        return -1;
    return client_write(c, w->scratch, (size_t)hl, body, n);
}

static int op_on_body(void *ctx, const char *p, size_t n, int complete)
{
    return client_write(ctx, NULL, 0, p, n);
}

static void client_gateway_error(struct client *c, enum upstream_err e)
{
    switch (e) {
    case UPSTREAM_ETIMEOUT:
        client_error(c, 504, "upstream_error", "upstream_timeout", "the upstream timed out", 0, 0);
        break;
    case UPSTREAM_ETLS:
        client_error(c, 502, "upstream_error", "upstream_tls_failed",
                     "TLS handshake with the upstream failed", 0, 0);
        break;
    case UPSTREAM_ECONNECT:
        client_error(c, 502, "upstream_error", "upstream_connect_failed",
                     "could not connect to the upstream", 0, 0);
        break;
    case UPSTREAM_ERESET:
        client_error(c, 502, "upstream_error", "upstream_reset",
                     "the upstream closed the connection", 0, 0);
        break;
    default:
        client_error(c, 502, "upstream_error", "upstream_bad_response",
                     "invalid response from the upstream", 0, 0);
        break;
    }
}

static void op_on_end(void *ctx, enum upstream_err err)
{
    struct client *c = ctx;
    if (err == UPSTREAM_OK)
        client_request_done(c);
    else if (err == UPSTREAM_ECLIENT || c->resp_started)
        client_close(c); /* bytes already went out: all that is left is to cut it */
    else
        client_gateway_error(c, err);
}

static const struct upstream_ops client_ops = {
    .build_head = op_build_head,
    .on_head = op_on_head,
    .on_body = op_on_body,
    .on_end = op_on_end,
};

/* Picks a backend of the listener's pool from the shared view; -1 when none is eligible. */
static int client_pick(struct client *c)
{
    struct worker *w = c->w;
    const struct conf_pool *pool = &w->conf->pools[c->ln->pool];
    uint32_t nw = shm_n_workers(w->shm);

    for (int i = 0; i < pool->n_backends; i++) {
        uint32_t b = (uint32_t)(pool->first_backend + i);
        struct balancer_cand *k = &w->cands[i];
        int64_t active = 0;
        for (uint32_t x = 0; x < nw; x++)
            active += atomic_load_explicit(&shm_wb(w->shm, x, b)->active, memory_order_relaxed);
        k->eligible = (uint8_t)shm_backend_eligible(w->shm, b);
        k->weight =
            (int)atomic_load_explicit(&shm_backend(w->shm, b)->weight_eff, memory_order_relaxed);
        k->active = (int32_t)active;
        k->tried = 0;
    }
    int i = balancer_pick(&w->bal[c->ln->pool], w->cands, (uint32_t)pool->n_backends);
    return i < 0 ? -1 : pool->first_backend + i;
}

static int is_chat_completions(const struct client *c)
{
    static const char path[] = "/v1/chat/completions";
    size_t n = sizeof(path) - 1;
    return c->url_len >= n && memcmp(c->url, path, n) == 0 && (c->url_len == n || c->url[n] == '?');
}

/* Parses the JSON body for "model" and "stream"; -1 when it is not a JSON object. */
static int client_parse_body(struct client *c)
{
    struct worker *w = c->w;
    for (;;) {
        int r = proxy_parse_body(c->body, c->body_len, w->tokens, w->n_tokens, &c->info);
        if (r != -ENOMEM)
            return r == 0 ? 0 : -1;
        unsigned n = w->n_tokens ? w->n_tokens * 2 : 256;
        void *t = realloc(w->tokens, n * proxy_token_size());
        if (!t)
            return -1;
        w->tokens = t;
        w->n_tokens = n;
    }
}

/* A whole request is in (parser paused after it): answer it or forward it. */
static void client_dispatch(struct client *c)
{
    struct worker *w = c->w;

    c->state = CS_WAIT;
    c->resp_started = 0;
    client_timer_stop(c);
    if (c->err == 404) {
        client_error(c, 404, "invalid_request_error", "not_found", "unknown path", 0, 0);
        return;
    }
    c->info.model = NULL;
    c->info.model_len = 0;
    c->info.stream = 0;
    int json_ok = c->body_len ? client_parse_body(c) == 0 : 0;
    if (!json_ok && c->parser.method == HTTP_POST && is_chat_completions(c)) {
        client_error(c, 400, "invalid_request_error", "invalid_json",
                     "the request body is not a JSON object", 0, 0);
        return;
    }
    int b = client_pick(c);
    if (b < 0) {
        client_error(c, 503, "upstream_error", "no_backend_available", "no backend is available", 0,
                     1);
        return;
    }
    c->rq.ops = &client_ops;
    c->rq.ctx = c;
    c->rq.body = c->body;
    c->rq.body_len = c->body_len;
    c->rq.head_only = c->head_method;
    c->rq.dechunk = c->http10;
    c->rq.backend = b;
    int r = upstream_start(&w->up, &c->rq);
    if (r < 0)
        client_gateway_error(c, (enum upstream_err) - r);
}

/* The response went out: next pipelined request, or idle, or close. */
static void client_request_done(struct client *c)
{
    struct worker *w = c->w;

    shm_counter_add(&shm_worker(w->shm, (uint32_t)w->slot)->requests, 1);
    client_free_body(c);
    c->fresh = 0;
    if (c->resp_close || c->close_after || w->draining) {
        client_linger(c);
        return;
    }
    if (c->pos < c->len) {
        /* pipelined bytes: move them to the front so the next request starts at 0 */
        memmove(c->buf, c->buf + c->pos, c->len - c->pos);
        c->len -= c->pos;
        c->pos = 0;
        c->state = CS_HEAD;
        llhttp_resume(&c->parser);
        client_timer(c, T_HEADER);
        client_read_start(c);
        client_process(c);
        return;
    }
    if (c->eof) {
        client_close(c);
        return;
    }
    llhttp_resume(&c->parser);
    client_drop_buf(c);
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
    switch (c->state) {
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
    c->li = l->idx;
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

    llhttp_init(&c->parser, HTTP_REQUEST, &req_settings);
    c->parser.data = c;
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
        uv_close((uv_handle_t *)&w->hard_stop, on_handle_closed_noop);
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
    bufpool_init(&w->bufs, data + max_hdrs * sizeof(struct proxy_hdr) + 64, MAX_FREE_BUFS);
    if (!(w->scratch = malloc(w->bufs.size)))
        return -ENOMEM;
    if (getrandom(&w->rid_seed1, sizeof(w->rid_seed1), 0) != sizeof(w->rid_seed1) ||
        getrandom(&w->rid_seed2, sizeof(w->rid_seed2), 0) != sizeof(w->rid_seed2)) {
        w->rid_seed1 = time_real_ms() ^ ((uint64_t)getpid() << 32);
        w->rid_seed2 = time_mono_ns();
    }
    settings_init();
    int r = upstream_init(&w->up, &w->loop, conf, shm, slot, &w->bufs, data, max_hdrs);
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
    }
    w->cands = calloc((size_t)max_pool, sizeof(*w->cands));
    if (!w->cands)
        return -ENOMEM;

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
    free(w->tokens);
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
