/* aigw-mock connections: accept, buffered reads, llhttp pausing per request, ordered writes,
 * TLS records through memory buffers, graceful close and reset. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/error.h>

#include "mock.h"

static void conn_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);
static void conn_pump(struct mock_conn *c);
static void tls_flush_out(struct mock_conn *c);

static void conn_on_close(uv_handle_t *h)
{
    struct mock_conn *c = h->data;

    if (--c->open_handles > 0)
        return;
    if (c->prev)
        c->prev->next = c->next;
    else
        c->srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->srv->active--;
    if (c->tls)
        tls_conn_free(c);
    mock_buf_free(&c->req.body);
    mock_buf_free(&c->dyn);
    free(c);
}

/* The request's answer is over (sent in full, or its connection closed). */
void conn_release(struct mock_conn *c)
{
    if (c->held) {
        c->held = 0;
        c->srv->in_flight--;
    }
}

void conn_close(struct mock_conn *c)
{
    if (c->closing)
        return;
    conn_release(c);
    c->closing = 1;
    uv_close((uv_handle_t *)&c->tcp, conn_on_close);
    uv_close((uv_handle_t *)&c->timer, conn_on_close);
}

/* RST instead of FIN: SO_LINGER 0, then close. */
void conn_reset(struct mock_conn *c)
{
    if (c->closing)
        return;
    conn_release(c);
    c->closing = 1;
    if (uv_tcp_close_reset(&c->tcp, conn_on_close) != 0)
        uv_close((uv_handle_t *)&c->tcp, conn_on_close);
    uv_close((uv_handle_t *)&c->timer, conn_on_close);
}

/* Close after the response: a TLS peer gets close_notify first. */
static void conn_finish(struct mock_conn *c)
{
    struct mock_tls_conn *t = c->tls;

    if (c->closing)
        return;
    if (t && t->handshake_done) {
        mbedtls_ssl_close_notify(&t->ssl);
        t->close_when_flushed = 1;
        tls_flush_out(c);
        if (t->inflight)
            return;
    }
    conn_close(c);
}

void conn_close_all(struct mock_server *srv)
{
    for (struct mock_conn *c = srv->conns; c; c = c->next)
        conn_close(c);
}

static void conn_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    struct mock_conn *c = h->data;

    if (c->tls) {
        buf->base = c->tls->in + c->tls->in_len;
        buf->len = MOCK_TLS_IN_SIZE - c->tls->in_len;
    } else {
        buf->base = c->in + c->in_len;
        buf->len = MOCK_IN_SIZE - c->in_len;
    }
}

/* Reads while there is room; a busy connection keeps buffering so pipelined requests wait. */
static void conn_update_reading(struct mock_conn *c)
{
    size_t used = c->tls ? c->tls->in_len : c->in_len;
    size_t cap = c->tls ? MOCK_TLS_IN_SIZE : MOCK_IN_SIZE;
    int want = !c->closing && !c->eof && used < cap;

    if (want && !c->reading) {
        if (uv_read_start((uv_stream_t *)&c->tcp, conn_alloc, conn_on_read) == 0)
            c->reading = 1;
    } else if (!want && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
    }
}

static void conn_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct mock_conn *c = s->data;

    if (nread > 0) {
        if (c->tls)
            c->tls->in_len += (size_t)nread;
        else
            c->in_len += (size_t)nread;
        if (c->busy)
            conn_update_reading(c);
        else
            conn_pump(c);
        return;
    }
    if (nread == 0)
        return;
    if (nread == UV_ENOBUFS) {
        conn_update_reading(c);
        return;
    }
    /* EOF or error: a stalled or idle connection goes away now; a response in progress is
     * finished first (the peer may have only shut down its sending side). */
    c->eof = 1;
    if (c->busy)
        c->srv->aborted++;
    conn_release(c); /* whoever sent it holds it no more */
    if (nread != UV_EOF || !c->busy || c->resp.kind == MOCK_RESP_STALL) {
        conn_close(c);
        return;
    }
    conn_update_reading(c);
}

/* Handshake, then decrypt buffered records into c->in. 1: plaintext added, 0: none, -1: fatal. */
static int tls_pull(struct mock_conn *c)
{
    struct mock_tls_conn *t = c->tls;
    int progress = 0;
    int r;

    if (!t->handshake_done) {
        r = mbedtls_ssl_handshake(&t->ssl);
        tls_flush_out(c);
        if (r == MBEDTLS_ERR_SSL_WANT_READ || r == MBEDTLS_ERR_SSL_WANT_WRITE)
            goto out;
        if (r != 0) {
            if (c->srv->opts.verbose) {
                char msg[128];
                mbedtls_strerror(r, msg, sizeof(msg));
                fprintf(stderr, "aigw-mock %s: TLS handshake failed: %s\n", c->srv->opts.name, msg);
            }
            return -1;
        }
        t->handshake_done = 1;
        c->srv->tls->handshakes++;
    }
    while (c->in_len < MOCK_IN_SIZE) {
        r = mbedtls_ssl_read(&t->ssl, (unsigned char *)c->in + c->in_len, MOCK_IN_SIZE - c->in_len);
        if (r > 0) {
            c->in_len += (size_t)r;
            progress = 1;
            continue;
        }
        if (r == MBEDTLS_ERR_SSL_WANT_READ || r == MBEDTLS_ERR_SSL_WANT_WRITE)
            break;
        if (r == 0 || r == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY) {
            c->eof = 1;
            break;
        }
        return -1;
    }
out:
    if (t->in_off > 0) {
        memmove(t->in, t->in + t->in_off, t->in_len - t->in_off);
        t->in_len -= t->in_off;
        t->in_off = 0;
    }
    return progress;
}

/* Parses buffered requests one at a time: the parser pauses on each complete request, which is
 * answered before the next one is looked at, so pipelined requests are answered in order. */
static void conn_pump(struct mock_conn *c)
{
    c->in_pump = 1;
    while (!c->closing && !c->busy) {
        int more = 0;

        if (c->in_off > 0) {
            memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
            c->in_len -= c->in_off;
            c->in_off = 0;
        }
        if (c->tls) {
            more = tls_pull(c);
            if (more < 0) {
                conn_close(c);
                break;
            }
        }
        if (c->in_len == 0) {
            if (!more)
                break;
            continue;
        }
        llhttp_errno_t e = llhttp_execute(&c->parser, c->in, c->in_len);
        if (e == HPE_PAUSED) {
            c->in_off = (size_t)(llhttp_get_error_pos(&c->parser) - c->in);
            c->busy = 1;
            http_on_request(c);
            continue;
        }
        c->in_len = 0;
        if (e != HPE_OK) {
            http_bad_request(c, 400);
            break;
        }
    }
    c->in_pump = 0;
    if (c->closing)
        return;
    if (c->eof && !c->busy) {
        conn_finish(c);
        return;
    }
    conn_update_reading(c);
}

void conn_response_done(struct mock_conn *c)
{
    conn_release(c);
    c->busy = 0;
    c->resp.kind = MOCK_RESP_NONE;
    if (!c->resp.keep_alive) {
        conn_finish(c);
        return;
    }
    llhttp_resume(&c->parser);
    if (!c->in_pump)
        conn_pump(c);
}

static void conn_on_write(uv_write_t *w, int status)
{
    struct mock_conn *c = w->data;

    if (c->closing)
        return;
    if (status < 0) {
        conn_close(c);
        return;
    }
    http_on_sent(c);
}

/* Encrypts pending response bytes while the ciphertext buffer has room. */
static void tls_push(struct mock_conn *c)
{
    struct mock_tls_conn *t = c->tls;

    while (t->plain_off < t->plain.len) {
        size_t len = t->plain.len - t->plain_off;
        if (c->resp.f.tls_record && len > c->resp.f.tls_record)
            len = c->resp.f.tls_record; /* mbedtls_ssl_write makes one record per call */
        int r = mbedtls_ssl_write(&t->ssl, (const unsigned char *)t->plain.p + t->plain_off, len);
        if (r > 0) {
            t->plain_off += (size_t)r;
            continue;
        }
        if (r == MBEDTLS_ERR_SSL_WANT_WRITE)
            break;
        conn_close(c);
        return;
    }
    tls_flush_out(c);
}

static void tls_on_write(uv_write_t *w, int status)
{
    struct mock_conn *c = w->data;
    struct mock_tls_conn *t = c->tls;

    t->out_len -= t->inflight;
    memmove(t->out, t->out + t->inflight, t->out_len);
    t->inflight = 0;
    if (c->closing)
        return;
    if (status < 0) {
        conn_close(c);
        return;
    }
    if (t->close_when_flushed) {
        tls_flush_out(c);
        if (!t->inflight)
            conn_close(c);
        return;
    }
    if (!t->handshake_done) {
        /* The handshake stopped on a full buffer (WANT_WRITE): go on. */
        tls_flush_out(c);
        conn_pump(c);
        return;
    }
    if (t->plain_pending) {
        tls_push(c);
        if (!c->closing && t->plain_off == t->plain.len && t->out_len == 0) {
            t->plain_pending = 0;
            t->plain.len = 0;
            t->plain_off = 0;
            http_on_sent(c);
        }
        return;
    }
    tls_flush_out(c);
}

/* One uv_write of the ciphertext gathered so far, unless one is already in flight. */
static void tls_flush_out(struct mock_conn *c)
{
    struct mock_tls_conn *t = c->tls;
    uv_buf_t b;

    if (c->closing || t->inflight || t->out_len == 0)
        return;
    t->inflight = t->out_len;
    b = uv_buf_init(t->out, (unsigned)t->inflight);
    if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, tls_on_write) != 0) {
        t->inflight = 0;
        conn_close(c);
    }
}

void conn_write(struct mock_conn *c, uv_buf_t *bufs, unsigned n)
{
    if (c->closing)
        return;
    if (c->tls) {
        struct mock_tls_conn *t = c->tls;
        for (unsigned i = 0; i < n; i++) {
            if (mock_buf_append(&t->plain, bufs[i].base, bufs[i].len) != 0) {
                conn_close(c);
                return;
            }
        }
        t->plain_pending = 1;
        tls_push(c);
        return;
    }
    /* Try first: a uv_write request, even one done at once, costs an epoll_ctl when it drains.
     * Only what the socket did not take goes through uv_write. */
    int r = uv_try_write((uv_stream_t *)&c->tcp, bufs, n);
    size_t done;
    unsigned i = 0;

    if (r == UV_EAGAIN)
        r = 0;
    if (r < 0) {
        conn_close(c);
        return;
    }
    done = (size_t)r;
    while (i < n && done >= bufs[i].len) {
        done -= bufs[i].len;
        i++;
    }
    if (i == n) {
        http_on_sent(c);
        return;
    }
    bufs[i].base += done;
    bufs[i].len -= done;
    if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, bufs + i, n - i, conn_on_write) != 0)
        conn_close(c);
}

void conn_write_nowait(struct mock_conn *c, const char *p, size_t n)
{
    if (c->closing)
        return;
    if (c->tls) {
        mbedtls_ssl_write(&c->tls->ssl, (const unsigned char *)p, n);
        tls_flush_out(c);
        return;
    }
    uv_buf_t b = uv_buf_init((char *)p, (unsigned)n);
    uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
}

void conn_on_connection(uv_stream_t *listener, int status)
{
    struct mock_server *srv = listener->data;
    struct mock_conn *c;

    if (status < 0)
        return;
    c = calloc(1, sizeof(*c));
    if (!c)
        return;
    c->srv = srv;
    c->tcp.data = c;
    c->timer.data = c;
    c->wreq.data = c;
    uv_tcp_init(srv->loop, &c->tcp);
    uv_timer_init(srv->loop, &c->timer);
    c->open_handles = 2;
    c->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = c;
    srv->conns = c;
    srv->active++;
    if (uv_accept(listener, (uv_stream_t *)&c->tcp) != 0) {
        conn_close(c);
        return;
    }
    srv->connections++;
    uv_tcp_nodelay(&c->tcp, 1);
    llhttp_init(&c->parser, HTTP_REQUEST, &srv->settings);
    c->parser.data = c;
    if (srv->tls && tls_conn_init(c) != 0) {
        conn_close(c);
        return;
    }
    conn_update_reading(c);
}
