/* The HTTP/1 server side of a worker: a client connection from accept to close. Reads and
 * parses requests with llhttp (head checks: core/request.c), holds their bodies, writes answers
 * (forwarded ones and aigw's own), timeouts, keep-alive, pipelining, linger. A whole request
 * goes on to core/stages.c. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <llhttp.h>
#include <uv.h>

#include "core/answer.h"
#include "core/log.h"
#include "core/proxy.h"
#include "core/request.h"
#include "core/route.h"
#include "core/util.h"
#include "core/worker_priv.h"

#define RID_MAX        128     /* longest client X-Request-Id kept as is */
#define BODY_HEAP_MIN  65536   /* first size of a body that outgrows the buffer; then doubled */
#define BODY_CACHE_MAX 1048576 /* a body buffer up to this size is kept for the next request */

static llhttp_settings_t req_settings;

static void client_process(struct client *c);
static void client_read_start(struct client *c);
static void client_poll(struct client *c);
static void client_dispatch(struct client *c);

static void conns_add(struct worker *w, int d)
{
    _Atomic uint32_t *g = &shm_worker(w->shm, (uint32_t)w->slot)->conns;
    atomic_store_explicit(g, atomic_load_explicit(g, memory_order_relaxed) + (uint32_t)d,
                          memory_order_relaxed);
}

/* ---- timeouts ---- */

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

void client_on_timeout(struct tq_node *n)
{
    on_client_timeout(tq_entry(n, struct client, tn));
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
    /* a new request state: the buffer may come from another connection. All of it zeroed
     * but the bytes nothing reads before writing them: the rewrite's (at the end) and the
     * model name's (info.model_len says there is none) */
    struct creq *r = client_creq(c);
    size_t model_at = offsetof(struct creq, info) + offsetof(struct json_req, model);
    size_t model_end = model_at + sizeof(r->info.model);
    memset(r, 0, model_at);
    memset((char *)r + model_end, 0, offsetof(struct creq, rw) - model_end);
    /* llhttp_init leaves every lenient flag off: what llhttp still takes that RFC 9112 does not
     * (bare LF at some line ends, white space in names, other versions) client_validate refuses */
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
    close(c->fd); /* the poll handle does not own it */
    client_free_body(c);
    if (c->buf)
        bufpool_put(&w->bufs, c->buf - w->data_off);
    bufpool_put(&w->bufs, c->wbuf);
    c->buf = c->wbuf = NULL;
    c->next = w->free_clients;
    w->free_clients = c;
    acceptor_closed(&w->acc, c->li); /* its fd is released: below maxconn again */
    worker_check_exit(w);
}

void client_close(struct client *c)
{
    struct worker *w = c->w;
    if (c->state == CS_CLOSED)
        return;
    if (c->buf && client_creq(c)->rq.conn)
        upstream_abort(&client_creq(c)->rq);
    if (c->buf) {
        forward_usage_end(c, 1); /* an answer being read was cut */
        alog_request(c, 1);
        stages_settle(c);
    }
    client_body_deadline_stop(c);
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
    uv_close((uv_handle_t *)&c->poll, client_handle_closed);
}

/* Closes after a response: shut the write side, then read and drop what the client still
 * sends for a moment, so that closing with unread input does not reset the response away. */
static void client_linger(struct client *c)
{
    if (c->eof) {
        client_close(c);
        return;
    }
    shutdown(c->fd, SHUT_WR);
    c->state = CS_LINGER;
    client_free_body(c);
    client_drop_buf(c);
    tq_add(&c->w->tqs[c->w->n_tqs - 1], &c->tn);
}

/* ---- writing ---- */

/* The write that waited ended: all sent (status 0) or failed. */
static void client_write_done(struct client *c, int status)
{
    c->writing = 0;
    client_poll(c);
    if (c->tn.q == &c->w->tqs[c->li * T_KINDS + T_SEND])
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

/* One send(2) (sendmsg(2) for pieces) on the socket: the bytes taken, or -errno. A socket is
 * written here rather than by libuv's stream, whose write(v)/read(2) cost the kernel more per
 * call than send/recv (the vfs layer), twice per request. */
static ssize_t client_send(int fd, const struct iovec *iov, unsigned n)
{
    ssize_t r;
    do {
        if (n == 1) {
            r = send(fd, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL);
        } else {
            struct msghdr mh = {.msg_iov = (struct iovec *)iov, .msg_iovlen = n};
            r = sendmsg(fd, &mh, MSG_NOSIGNAL);
        }
    } while (r == -1 && errno == EINTR);
    return r == -1 ? -errno : r;
}

/* The first pieces of a waiting write the socket took: what is left moves up. */
static void cwrite_advance(struct cwrite *q, size_t done)
{
    while (q->i < q->n && done >= q->iov[q->i].iov_len)
        done -= q->iov[q->i++].iov_len;
    if (q->i < q->n) {
        q->iov[q->i].iov_base = (char *)q->iov[q->i].iov_base + done;
        q->iov[q->i].iov_len -= done;
    }
}

static const char cont_line[] = "HTTP/1.1 100 Continue\r\n\r\n";

/* The socket takes bytes again: first the rest of a 100 Continue, then the waiting write. */
static void client_on_writable(struct client *c)
{
    if (c->cont_left) {
        struct iovec v = {(char *)cont_line + sizeof(cont_line) - 1 - c->cont_left, c->cont_left};
        ssize_t r = client_send(c->fd, &v, 1);
        if (r < 0 && r != -EAGAIN) {
            client_close(c);
            return;
        }
        if (r > 0)
            c->cont_left = (uint8_t)(c->cont_left - r);
        if (c->cont_left)
            return;
    }
    if (!c->writing) {
        client_poll(c);
        return;
    }
    struct cwrite *q = (struct cwrite *)c->wbuf;
    ssize_t r = client_send(c->fd, q->iov + q->i, q->n - q->i);
    if (r == -EAGAIN)
        return;
    if (r < 0) {
        client_write_done(c, -1);
        return;
    }
    cwrite_advance(q, (size_t)r);
    if (q->i == q->n)
        client_write_done(c, 0);
}

/* Most answers are one head and a body piece of a few hundred bytes: they go out as one
 * buffer (a head is built in the scratch buffer, with room behind it), which costs the kernel
 * less than the pieces. */
#define COALESCE_MAX 4096

/* Writes head and tail (copied if they must wait; tail at most WTAIL_MAX bytes) around
 * data (kept by the caller until the write ends), in one system call where the socket takes
 * it. 0 = all written, 1 = pending (on_written follows), -1 = the client is gone. */
int client_write3(struct client *c, const char *head, size_t hl, const char *data, size_t dl,
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
    alog_req_sent(&client_creq(c)->alog, hl ? head : data, hl ? hl : dl, hl + dl + tl);
    if (c->writing)
        return -1; /* callers wait for on_written's continuation: never two writes */
    size_t total = hl + dl + tl;
    ssize_t r = -EAGAIN;
    if (!c->cont_left) {
        struct iovec one;
        const char *sc = c->w->scratch, *at = head + hl, *end = head + total;
        if (n > 1 && hl && total <= COALESCE_MAX && head >= sc && end <= sc + c->w->bufs.size &&
            (!dl || data + dl <= at || data >= end) && (!tl || tail + tl <= at || tail >= end)) {
            if (dl)
                memcpy((char *)at, data, dl);
            if (tl)
                memcpy((char *)at + dl, tail, tl);
            one.iov_base = (char *)head;
            one.iov_len = total;
            r = client_send(c->fd, &one, 1);
        } else {
            r = client_send(c->fd, (const struct iovec *)b, n);
        }
    }
    if (r == (ssize_t)total)
        return 0;
    if (r < 0 && r != -EAGAIN)
        return -1;
    size_t done = r > 0 ? (size_t)r : 0;
    n = 0;
    if (!(c->wbuf = bufpool_get(&c->w->bufs)))
        return -1;
    struct cwrite *q = (struct cwrite *)c->wbuf;
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
    memcpy(q->iov, b, n * sizeof(b[0])); /* uv_buf_t is laid out as struct iovec on Unix */
    q->n = n;
    q->i = 0;
    c->writing = 1;
    client_poll(c);
    if (c->w->tqs[c->li * T_KINDS + T_SEND].ms)
        client_timer(c, T_SEND);
    return 1;
}

/* A gateway error; after tries upstream, backend (NULL = none) and attempts go out as
 * x-aigw-backend / x-aigw-attempts; extra: more header lines (NULL = none). */
static void client_answer(struct client *c, int status, const char *type, const char *code,
                          const char *msg, int close, int retry_after, const char *backend,
                          int attempts, const char *extra)
{
    struct worker *w = c->w;
    client_timer_stop(c);
    client_body_deadline_stop(c);
    c->state = CS_WAIT;
    client_creq(c)->resp_close =
        close || !client_creq(c)->keepalive || w->draining || c->close_after;
    client_creq(c)->alog.err = code;
    int n = answer_error_hdrs(w->scratch, head_cap(w), status, type, code, msg,
                              client_creq(c)->resp_close, retry_after, client_creq(c)->rid,
                              client_creq(c)->rid_len, backend, attempts,
                              client_creq(c)->head_method, extra);
    client_send_last(c, n);
}

void client_send_last(struct client *c, int n)
{
    int r = n < 0 ? -1 : client_write(c, c->w->scratch, (size_t)n, NULL, 0);
    if (r < 0)
        client_close(c);
    else if (r == 0)
        client_request_done(c);
}

void client_error_via(struct client *c, int status, const char *type, const char *code,
                      const char *msg, int close, int retry_after, const char *backend,
                      int attempts)
{
    client_answer(c, status, type, code, msg, close, retry_after, backend, attempts, NULL);
}

void client_error(struct client *c, int status, const char *type, const char *code, const char *msg,
                  int close, int retry_after)
{
    client_error_via(c, status, type, code, msg, close, retry_after, NULL, 0);
}

void client_error_extra(struct client *c, int status, const char *type, const char *code,
                        const char *msg, int retry_after, const char *extra)
{
    client_answer(c, status, type, code, msg, 0, retry_after, NULL, 0, extra);
}

void client_json(struct client *c, int status, int body_len)
{
    struct worker *w = c->w;
    struct creq *r = client_creq(c);
    char head[512];
    int hl;

    if (body_len < 0) {
        client_error(c, 500, "server_error", "answer_too_large",
                     "the answer does not fit the gateway's buffer", 0, 0);
        return;
    }
    client_timer_stop(c);
    client_body_deadline_stop(c);
    c->state = CS_WAIT;
    r->resp_close = !r->keepalive || w->draining || c->close_after;
    hl = answer_json_head(head, sizeof(head), status, (size_t)body_len, r->resp_close, r->rid,
                          r->rid_len);
    if (hl < 0 || (size_t)hl > CLIENT_JSON_OFF) {
        client_send_last(c, -1);
        return;
    }
    memcpy(w->scratch, head, (size_t)hl);
    if (r->head_method)
        body_len = 0;
    memmove(w->scratch + hl, w->scratch + CLIENT_JSON_OFF, (size_t)body_len);
    client_send_last(c, hl + body_len);
}

/* The answer to a request whose path aigw does not forward (err 404 or 400). */
void client_path_error(struct client *c, int close)
{
    struct creq *r = client_creq(c);

    if (r->err == 404 && route_missing_v1(r->url, r->url_len)) {
        char msg[200];
        size_t n = r->url_len;
        const char *q = memchr(r->url, '?', n);

        n = q ? (size_t)(q - r->url) : n;
        snprintf(msg, sizeof(msg),
                 "Invalid URL (%s %.*s): the API is under /v1; set the client's base URL to "
                 "http://HOST:PORT/v1",
                 llhttp_method_name((llhttp_method_t)r->parser.method), (int)(n > 120 ? 120 : n),
                 r->url);
        client_error(c, 404, "invalid_request_error", "not_found", msg, close, 0);
    } else if (r->err == 404)
        client_error(c, 404, "invalid_request_error", "not_found", "unknown path", close, 0);
    else
        client_error(c, 400, "invalid_request_error", "invalid_path",
                     "the path has a dot-segment or an encoded slash", close, 0);
}

/* A request refused before it was read whole: the answer says Connection: close and the
 * connection closes after it, so nothing after the head (a body, a pipelined request) is ever
 * parsed as a request. */
static void client_refuse(struct client *c, int status, const char *code, const char *msg,
                          const char *extra)
{
    client_answer(c, status, "invalid_request_error", code, msg, 1, 0, NULL, 0, extra);
}

/* The answer to OPTIONS, which aigw gives itself (it is not forwarded: it says what aigw
 * serves, not what one backend would). */
void client_options(struct client *c)
{
    struct worker *w = c->w;
    struct creq *r = client_creq(c);

    r->resp_close = !r->keepalive || w->draining || c->close_after;
    int n =
        answer_options(w->scratch, head_cap(w), REQUEST_ALLOW, r->resp_close, r->rid, r->rid_len);
    client_send_last(c, n);
}

/* ---- whole-body deadline ---- */

/* 408 to a request whose body did not arrive in time: client_body_timeout only bounds the gap
 * between reads, so without this one byte every few seconds would hold a connection (and its
 * buffers) for as long as the client likes. */
void client_on_body_deadline(struct tq_node *n)
{
    struct client *c = tq_entry(n, struct creq, bn)->parser.data;
    client_error(c, 408, "invalid_request_error", "request_timeout",
                 "the request body did not arrive within client_body_total_timeout", 1, 0);
}

static void body_deadline_start(struct client *c)
{
    tq_add(&c->w->bdqs[c->li], &client_creq(c)->bn);
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
    client_creq(c)->local = 0;
    client_creq(c)->asterisk = 0;
    client_creq(c)->dropped = 0;
    /* what the stages set is unknown until they run (an early answer must not show the last
     * request's key, pool, model or usage) */
    client_creq(c)->key = client_creq(c)->pool = -1;
    client_creq(c)->model = client_creq(c)->served = -1;
    client_creq(c)->model_name = NULL;
    client_creq(c)->info.flags = 0;
    client_creq(c)->fb_attempts = 0;
    client_creq(c)->usage_got = 0;
    alog_req_begin(&client_creq(c)->alog, alog_on(&c->w->alog));
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
    if (client_creq(c)->err) {
        /* the answer is already decided: drop the body, but no more of it than of any other */
        client_creq(c)->dropped += len;
        if (client_creq(c)->dropped > c->ln->max_body_size) {
            client_creq(c)->err = 413;
            return -1;
        }
        return 0;
    }
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

const struct proxy_hdr *client_hdr(const struct client *c, const char *name)
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

/* 1 when the request line and the head end in CRLF: llhttp takes a bare LF there, where a
 * front proxy may see something else (a header, the rest of the head), so the two would not
 * agree on where the head ends. Lines in between are checked by llhttp. */
static int head_crlf_ok(const struct client *c)
{
    const struct creq *r = client_creq(c);
    const char *end = c->buf + r->head_end;

    if (r->head_end < 4 || memcmp(end - 4, "\r\n\r\n", 4) != 0)
        return 0;
    if (r->n_hdrs) {
        const char *first = r->hdrs[0].name;
        if (first - c->buf < 2 || first[-2] != '\r' || first[-1] != '\n')
            return 0;
    }
    return 1;
}

/* The validate stage, for what RFC 9112/9110 ask of a request beyond llhttp's checks: the
 * version, line ends, header names, Host, framing, method and request-target. A refusal goes
 * out at once with Connection: close. hosts: how many Host headers came, host the first one;
 * bad_name: a header name is not a token. 0 to go on, -1 when refused. */
static int client_validate(struct client *c, const struct proxy_hdr *host, uint32_t hosts,
                           int bad_name)
{
    struct creq *r = client_creq(c);
    const llhttp_t *p = &r->parser;
    const char *why = NULL, *path = NULL;
    size_t path_len = 0;

    if (p->http_major == 0) {
        /* HTTP/0.9: no version, no headers, and its answer would be a bare body */
        why = "HTTP/0.9 requests are not supported";
    } else if (p->http_major != 1 || p->http_minor > 1) {
        client_refuse(c, 505, "http_version_not_supported", "HTTP/1.0 and 1.1 only", NULL);
        return -1;
    } else if (!head_crlf_ok(c)) {
        why = "a line of the request head does not end in CRLF";
    } else if (bad_name) {
        why = "a header name is not a token (white space before the colon?)";
    } else if (hosts > 1 || (hosts == 0 && !r->http10)) {
        why = "a request needs exactly one Host header";
    } else if ((p->flags & F_TRANSFER_ENCODING) && r->http10) {
        /* RFC 9112 6.1: the framing of such a message is faulty */
        why = "Transfer-Encoding in an HTTP/1.0 request";
    }
    if (why) {
        client_refuse(c, 400, "bad_request", why, NULL);
        return -1;
    }

    switch (p->method) {
    case HTTP_GET:
    case HTTP_POST:
    case HTTP_DELETE:
    case HTTP_HEAD:
        break;
    case HTTP_OPTIONS:
        r->local = 1;
        break;
    default:
        /* TRACE would echo the backend's key, CONNECT would tunnel: only what the API uses
         * goes upstream */
        client_refuse(c, 405, "method_not_allowed", "method not allowed",
                      "Allow: " REQUEST_ALLOW "\r\n");
        return -1;
    }

    int form = r->url ? request_target(r->url, r->url_len, &path, &path_len) : -EINVAL;
    if (form == REQUEST_TARGET_ASTERISK && r->local) {
        r->asterisk = 1;
        return 0;
    }
    if (form < 0 || form == REQUEST_TARGET_ASTERISK)
        why = "invalid request-target";
    else if (form == REQUEST_TARGET_ORIGIN && host &&
             !request_host_ok(host->value, host->value_len))
        why = "invalid Host header"; /* the absolute form's authority replaces Host */
    if (why) {
        client_refuse(c, 400, "bad_request", why, NULL);
        return -1;
    }
    r->url = path;
    r->url_len = path_len;
    return 0;
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

    /* one pass for the names the worker itself looks at, and that every name is a token */
    const struct proxy_hdr *h = NULL, *expect = NULL, *host = NULL;
    uint32_t hosts = 0;
    int bad_name = 0;
    for (uint32_t i = 0; i < client_creq(c)->n_hdrs; i++) {
        const struct proxy_hdr *x = &client_creq(c)->hdrs[i];
        bad_name |= !request_token(x->name, x->name_len);
        if (x->name_len == 12 && !h && proxy_name_eq(x->name, 12, "x-request-id", 12)) {
            h = x;
        } else if (x->name_len == 6 && !expect && proxy_name_eq(x->name, 6, "expect", 6)) {
            expect = x;
        } else if (x->name_len == 4 && proxy_name_eq(x->name, 4, "host", 4)) {
            host = host ? host : x;
            hosts++;
        }
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

    if (client_validate(c, host, hosts, bad_name) < 0)
        return -1;
    if (client_creq(c)->asterisk)
        ; /* OPTIONS *: about the server, not a path */
    else if (!proxy_path_ok(client_creq(c)->url, client_creq(c)->url_len))
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
        struct iovec b = {(char *)cont_line, sizeof(cont_line) - 1};
        /* a client that did not wait for it already sent body bytes: no need */
        ssize_t r = c->pos == c->len ? client_send(c->fd, &b, 1) : (ssize_t)b.iov_len;
        if (r < 0 && r != -EAGAIN) {
            client_close(c);
            return -1;
        }
        if (r < (ssize_t)b.iov_len) {
            /* the socket took part of it (a slow reader of an earlier answer): the rest goes
             * when it takes bytes again, before any answer (client_write3 waits for it) */
            c->cont_left = (uint8_t)(b.iov_len - (size_t)(r > 0 ? r : 0));
            client_poll(c);
        }
    }

    /* the body starts in the buffer; one that outgrows it moves to the heap as it arrives
     * (client_body_to_heap), never sized by what the client only declared */
    client_creq(c)->body_len = 0;
    client_creq(c)->body_want = chunked ? ln->max_body_size : cl;
    client_creq(c)->body = c->buf + client_creq(c)->head_end;
    client_creq(c)->body_heap = 0;
    client_creq(c)->tail4 = 0;
    c->state = CS_BODY;
    client_timer(c, T_BODY);
    if (body_coming)
        body_deadline_start(c);
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

/* llhttp refused the method. A token and a space start a request line with a method aigw does
 * not know: 501. Anything else is no request: 400. The token may not have ended yet: then wait
 * for more bytes (the header timeout still runs). */
static void client_bad_method(struct client *c)
{
    int m = request_ext_method(c->buf, c->len);
    client_creq(c)->method_pending = m == -EAGAIN;
    if (m == -EAGAIN)
        return;
    if (m == 1)
        client_refuse(c, 501, "not_implemented", "unknown method", "Allow: " REQUEST_ALLOW "\r\n");
    else
        client_refuse(c, 400, "bad_request", "malformed request", NULL);
}

/* Feeds the raw bytes of a chunked body as llhttp consumed them to r->tail4, which keeps the
 * last four: the buffer is reused for each read, and llhttp takes a bare LF for the CRLF that
 * ends the body ("0\r\n\n"), where a front proxy may see the body go on and our next request
 * inside it. Framing bytes after the last data byte are never overwritten by de-chunking. */
static void body_tail_feed(struct creq *r, const char *p, size_t n)
{
    if (n > 4) {
        p += n - 4;
        n = 4;
    }
    for (size_t i = 0; i < n; i++)
        r->tail4 = r->tail4 << 8 | (uint8_t)p[i];
}

/* The llhttp error e (or the status decided while parsing) as the answer to the client; the
 * connection closes after it. */
static void client_parse_error(struct client *c, llhttp_errno_t e)
{
    struct creq *r = client_creq(c);
    const char *at = llhttp_get_error_pos(&r->parser);

    if (r->err == 431) {
        client_error(c, 431, "invalid_request_error", "request_header_too_large",
                     "too many request headers", 1, 0);
    } else if (r->err == 413) {
        client_error(c, 413, "invalid_request_error", "request_too_large", "request body too large",
                     1, 0);
    } else if (r->err == 500) {
        client_error(c, 500, "server_error", "out_of_memory", "out of memory", 1, 0);
    } else if (e == HPE_INVALID_METHOD && c->state == CS_HEAD) {
        client_bad_method(c);
    } else if ((e == HPE_INVALID_VERSION && at && request_version_form(c->buf, at)) ||
               e == HPE_PAUSED_H2_UPGRADE) {
        /* a well-formed version llhttp does not know (HTTP/1.2, HTTP/3.0), or the HTTP/2
         * connection preface */
        client_refuse(c, 505, "http_version_not_supported", "HTTP/1.0 and 1.1 only", NULL);
    } else {
        log_debug("client %s: bad request: %s", c->ip, llhttp_get_error_reason(&r->parser));
        client_refuse(c, 400, "bad_request", "malformed request", NULL);
    }
}

/* Runs the parser over buffered bytes until it needs more or a request is complete. */
static void client_process(struct client *c)
{
    struct worker *w = c->w;
    struct creq *r;
    int force = 0;

    while (c->state == CS_IDLE || c->state == CS_HEAD || c->state == CS_BODY) {
        if (c->pos == c->len && !force)
            break;
        force = 0;
        if (c->state == CS_IDLE)
            c->state = CS_HEAD;
        r = client_creq(c);
        if (r->method_pending) {
            client_bad_method(c);
            return;
        }
        r->ev = CEV_NONE;
        r->hdrs = (struct proxy_hdr *)(c->buf - w->data_off + w->hdrs_off);
        uint32_t start = c->pos;
        llhttp_errno_t e = llhttp_execute(&r->parser, c->buf + c->pos, c->len - c->pos);
        if (e == HPE_OK)
            c->pos = c->len;
        else if (e == HPE_PAUSED || e == HPE_PAUSED_UPGRADE)
            c->pos = (uint32_t)(llhttp_get_error_pos(&r->parser) - c->buf);
        if (c->state == CS_BODY && (r->parser.flags & F_CHUNKED))
            body_tail_feed(r, c->buf + start, c->pos - start);
        if (e == HPE_OK)
            break;
        if (e == HPE_PAUSED_UPGRADE) {
            /* after a request with Upgrade (never forwarded: it is hop-by-hop), the next bytes
             * are the next request. Not after CONNECT (refused at its head): its body would be. */
            if (r->parser.method == HTTP_CONNECT) {
                client_refuse(c, 405, "method_not_allowed", "method not allowed",
                              "Allow: " REQUEST_ALLOW "\r\n");
                return;
            }
            llhttp_resume_after_upgrade(&r->parser);
            continue;
        }
        if (e == HPE_PAUSED) {
            if (r->ev == CEV_HEAD) {
                llhttp_resume(&r->parser);
                if (client_on_head(c) < 0)
                    return;
                force = 1; /* a body-less request completes without more bytes */
                continue;
            }
            if ((r->parser.flags & F_CHUNKED) && r->tail4 != 0x0d0a0d0au) {
                client_refuse(c, 400, "bad_request", "the chunked body does not end in CRLF", NULL);
                return;
            }
            client_dispatch(c);
            return;
        }
        client_parse_error(c, e);
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

/* ---- a whole request ---- */

/* A whole request is in (parser paused after it): the client waits for its answer, which the
 * stages (core/stages.c) give or forward. */
static void client_dispatch(struct client *c)
{
    c->state = CS_WAIT;
    client_creq(c)->resp_started = 0;
    client_timer_stop(c);
    client_body_deadline_stop(c);
    stages_run(c);
}

/* ---- keep-alive and pipelining ---- */

/* The response went out: next pipelined request, or idle, or close. */
void client_request_done(struct client *c)
{
    struct worker *w = c->w;

    forward_usage_end(c, 0);
    alog_request(c, 0);
    stages_settle(c);
    c->tries_on = 0;
    struct shm_worker *sw = shm_worker(w->shm, (uint32_t)w->slot);
    unsigned cls = client_creq(c)->alog.status / 100u;
    shm_counter_add(&sw->requests, 1);
    if (cls >= 1 && cls <= 5)
        shm_counter_add(&sw->answered[cls - 1], 1);
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

/* Where the next read goes (len 0: no room, or no buffer to be had). */
static void read_room(struct client *c, char **p, size_t *len)
{
    struct worker *w = c->w;
    if (c->state == CS_LINGER) {
        *p = w->scratch;
        *len = w->data_size;
        return;
    }
    client_take_buf(c);
    if (!c->buf) {
        *p = NULL;
        *len = 0;
        return;
    }
    *p = c->buf + c->len;
    *len = w->data_size - c->len;
}

/* A request of the client is with an upstream, or waits out a retry back-off. */
static int client_forwarding(const struct client *c)
{
    return c->state == CS_WAIT && c->tries_on &&
           (client_creq(c)->rq.conn || c->tn.q == &c->w->retry_q || c->tn.q == &c->w->lease_q);
}

/* What a read brought: n bytes, 0 (nothing now), UV_EOF, UV_ENOBUFS (no room) or an error. */
static void on_read(struct client *c, ssize_t n)
{
    if (c->state == CS_CLOSED)
        return;
    if (c->state == CS_LINGER) {
        /* what a refused request still sends is dropped, but no more of it than
         * max_body_size (counted in len, unused while lingering) */
        uint64_t cap = c->ln->max_body_size < UINT32_MAX ? c->ln->max_body_size : UINT32_MAX;
        if (n < 0 || (uint64_t)c->len + (uint64_t)n > cap)
            client_close(c);
        else
            c->len += (uint32_t)n;
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
            c->reading = 0;
            client_poll(c);
            if (c->state == CS_HEAD)
                client_error(c, 431, "invalid_request_error", "request_header_too_large",
                             "request header too large", 1, 0);
            return;
        }
        if (n == UV_EOF) {
            c->eof = 1;
            c->reading = 0;
            client_poll(c);
            /* an answer of aigw's own still goes out to a half-closed client; a forwarded
             * request is cancelled, as nginx does (proxy_ignore_client_abort off): the upstream
             * must not keep generating, and holding an in-flight slot, for nobody */
            if (c->state == CS_WAIT && !client_forwarding(c))
                return;
        }
        if (client_forwarding(c))
            log_debug("client %s: gone while its request was forwarded, cancelling it", c->ip);
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
            c->reading = 0;
            client_poll(c);
        }
        return;
    default:
        break;
    }
    client_process(c);
}

/* The socket is readable: one recv(2) (level-triggered: more data polls again). */
static void client_on_readable(struct client *c)
{
    char *p;
    size_t len;
    read_room(c, &p, &len);
    if (!len) {
        on_read(c, UV_ENOBUFS);
        return;
    }
    ssize_t n;
    do
        n = recv(c->fd, p, len, 0);
    while (n == -1 && errno == EINTR);
    if (n > 0)
        on_read(c, n);
    else if (n == 0)
        on_read(c, UV_EOF);
    else if (errno == EAGAIN || errno == EWOULDBLOCK)
        on_read(c, 0);
    else
        on_read(c, -errno);
}

static void on_client_poll(uv_poll_t *h, int status, int events)
{
    struct client *c = h->data;
    if (c->state == CS_CLOSED)
        return;
    if (status < 0) {
        /* an error on the socket (libuv stopped polling it): the connection is gone */
        c->events = 0;
        on_read(c, status == UV_EBADF ? UV_ECONNRESET : status);
        return;
    }
    if (events & UV_WRITABLE)
        client_on_writable(c);
    if ((events & UV_READABLE) && c->reading && c->state != CS_CLOSED)
        client_on_readable(c);
}

/* Polls for what the connection waits for now: reading (c->reading), the rest of a write (c->
 * writing, or a 100 Continue). Cannot fail: the handle is open (uv_poll_start fails only for a
 * closing one; uv_poll_stop never). */
static void client_poll(struct client *c)
{
    if (c->state == CS_CLOSED)
        return;
    int ev = (c->reading ? UV_READABLE : 0) | (c->writing || c->cont_left ? UV_WRITABLE : 0);
    if (ev == c->events)
        return;
    c->events = (uint8_t)ev;
    if (ev)
        uv_poll_start(&c->poll, ev, on_client_poll);
    else
        uv_poll_stop(&c->poll);
}

static void client_read_start(struct client *c)
{
    if (c->reading || c->eof || c->state == CS_CLOSED)
        return;
    c->reading = 1;
    client_poll(c);
}

/* ---- accepting ---- */

/* The acceptor (core/accept.c) hands over a new connection on listener li. */
int client_accept(void *ctx, int li, int fd, const struct sockaddr *peer, socklen_t len)
{
    struct worker *w = ctx;
    struct client *c;
    int rc;

    if (w->draining)
        return -ECANCELED;
    c = w->free_clients;
    if (c)
        w->free_clients = c->next;
    else if (!(c = malloc(sizeof(*c))))
        return -ENOMEM;
    memset(c, 0, sizeof(*c));
    c->w = w;
    c->ln = &w->conf->listens[li];
    if ((rc = uv_poll_init(&w->loop, &c->poll, fd)) != 0) {
        /* nothing set up: the acceptor closes fd */
        log_warn("client connection: cannot set it up: %s", uv_strerror(rc));
        c->next = w->free_clients;
        w->free_clients = c;
        return rc;
    }
    c->poll.data = c;
    c->fd = fd;
    c->li = (uint16_t)li;
    c->handles = 1;
    int one = 1; /* without it only small writes wait a little: not fatal */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    strcpy(c->ip, "unknown");
    if (peer->sa_family == AF_INET && len >= sizeof(struct sockaddr_in))
        uv_ip4_name((const struct sockaddr_in *)peer, c->ip, sizeof(c->ip));
    else if (peer->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6))
        uv_ip6_name((const struct sockaddr_in6 *)peer, c->ip, sizeof(c->ip));

    c->state = CS_IDLE;
    c->fresh = 1;
    c->next = w->clients;
    if (w->clients)
        w->clients->prev = c;
    w->clients = c;
    w->n_clients++;
    conns_add(w, 1);
    client_timer(c, T_HEADER);
    client_read_start(c);
    return 0;
}

/* ---- setup ---- */

void client_parser_init(void)
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
