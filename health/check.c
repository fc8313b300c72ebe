/* One active health check as an exchange of the checker's upstream client: core/upstream.c
 * resolves the backend (cached, the address that last worked first, as in the workers),
 * connects, runs TLS with the backend's own tls_client and parses the answer; this file writes
 * the request, judges the status line and turns every other outcome into a result with a
 * reason a person can read. */
#include "health/check.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "core/conf.h"
#include "core/util.h"

int check_build_request(char *buf, size_t len, int head, const char *path, const char *host,
                        uint16_t port, int tls, const char *api_key)
{
    char hostport[CONF_HOST_MAX + 16];
    int v6 = strchr(host, ':') != NULL;
    int n;

    if (port == (tls ? 443 : 80))
        snprintf(hostport, sizeof(hostport), v6 ? "[%s]" : "%s", host);
    else
        snprintf(hostport, sizeof(hostport), v6 ? "[%s]:%u" : "%s:%u", host, (unsigned)port);
    n = snprintf(buf, len,
                 "%s %s HTTP/1.1\r\n"
                 "Host: %s\r\n"
                 "%s%s%s"
                 "User-Agent: aigw-health\r\n"
                 "Accept: */*\r\n"
                 "Connection: close\r\n"
                 "\r\n",
                 head ? "HEAD" : "GET", path, hostport, api_key ? "Authorization: Bearer " : "",
                 api_key ? api_key : "", api_key ? "\r\n" : "");
    if (n < 0 || (size_t)n >= len)
        return -ENOSPC;
    return n;
}

int check_status_expected(int status, const int *expect, int n)
{
    for (int i = 0; i < n; i++)
        if (expect[i] == status)
            return 1;
    return 0;
}

static const char *check_host(const struct check *ck)
{
    return ck->spec->up->backends[ck->spec->backend].cb->url.host;
}

/* "127.0.0.1:9101": the address the check's latest connection went to, else the host name. */
static const char *check_where(const struct check *ck, char *buf, size_t len)
{
    upstream_peer_str(ck->spec->up, ck->spec->backend, ck->rq.peer, buf, len);
    return buf[0] ? buf : check_host(ck);
}

static void check_set(struct check *ck, int ok, enum backend_reason why, int32_t status,
                      const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static void check_set(struct check *ck, int ok, enum backend_reason why, int32_t status,
                      const char *fmt, ...)
{
    va_list ap;

    ck->res.ok = ok;
    ck->res.why = why;
    ck->res.status = status;
    va_start(ap, fmt);
    vsnprintf(ck->res.detail, sizeof(ck->res.detail), fmt, ap);
    va_end(ap);
}

/* The result of an exchange that ended without a judged response head. */
static void check_set_failure(struct check *ck, enum upstream_err err)
{
    const struct check_spec *spec = ck->spec;
    int sys = ck->rq.sys_err;
    const char *text;
    char at[80];

    check_where(ck, at, sizeof(at));
    switch (err) {
    case UPSTREAM_ECONNECT:
        if ((text = upstream_resolve_error(spec->up, spec->backend)))
            check_set(ck, 0, REASON_CHECK_CONNECT, -EHOSTUNREACH, "%s", text);
        else if (sys == ECONNREFUSED)
            check_set(ck, 0, REASON_CHECK_CONNECT, -sys, "connect refused (%s)", at);
        else if (sys)
            check_set(ck, 0, REASON_CHECK_CONNECT, -sys, "connect failed: %s (%s)", strerror(sys),
                      at);
        else
            check_set(ck, 0, REASON_CHECK_CONNECT, -ECONNABORTED,
                      "connection closed before the request was sent (%s)", at);
        return;
    case UPSTREAM_ELOCAL:
    case UPSTREAM_ENOMEM:
        /* the checker's own shortage, classified as the workers do: not the backend's doing */
        ck->res.local = 1;
        if (!sys)
            sys = ENOMEM;
        check_set(ck, 0, REASON_CHECK_CONNECT, -sys,
                  "%s (the health checker is out of a local resource)", strerror(sys));
        return;
    case UPSTREAM_ETLS:
        if ((text = upstream_tls_error(spec->up, spec->backend)))
            check_set(ck, 0, REASON_CHECK_TLS, -EPROTO, "%s", text);
        else if (sys && (text = upstream_tls_why(spec->up, spec->backend)))
            check_set(ck, 0, REASON_CHECK_TLS, -EPROTO, "TLS handshake failed: %s (%s)", text, at);
        else
            check_set(ck, 0, REASON_CHECK_TLS, -EPROTO, "TLS handshake failed (%s)", at);
        return;
    case UPSTREAM_ETIMEOUT:
        check_set(ck, 0, REASON_CHECK_TIMEOUT, -ETIMEDOUT, "timeout (%s)", at);
        return;
    case UPSTREAM_ERESET:
    case UPSTREAM_ESTALE:
        check_set(ck, 0, REASON_CHECK_PROTO, -EBADMSG, "connection closed without a response (%s)",
                  at);
        return;
    case UPSTREAM_EPROTO:
    case UPSTREAM_OK:      /* an answer is always judged first: not reached */
    case UPSTREAM_ECLIENT: /* idem */
        break;
    }
    check_set(ck, 0, REASON_CHECK_PROTO, -EBADMSG, "bad HTTP response (%s)", at);
}

static void check_report(struct check *ck)
{
    ck->busy = 0;
    ck->done(ck, &ck->res);
}

/* The check is over: measured, reported now (the check is reusable inside the callback). */
static void check_finish(struct check *ck)
{
    uv_timer_stop(&ck->timer);
    ck->res.dur_us = (uint32_t)((time_mono_ns() - ck->start_ns) / 1000);
    check_report(ck);
}

static int check_build_head(void *ctx, const struct conf_backend *be, char *buf, size_t cap)
{
    struct check *ck = ctx;

    (void)be;
    if (ck->spec->request_len > cap)
        return -ENOSPC;
    memcpy(buf, ck->spec->request, ck->spec->request_len);
    return (int)ck->spec->request_len;
}

static int check_on_head(void *ctx, const struct upstream_resp *r, const char *body, size_t n,
                         int complete)
{
    struct check *ck = ctx;
    char at[80];

    (void)body;
    (void)n;
    ck->judged = 1;
    if (check_status_expected(r->status, ck->spec->expect, ck->spec->n_expect))
        check_set(ck, 1, REASON_CHECK_OK, r->status, "status %d", r->status);
    else
        check_set(ck, 0, REASON_CHECK_STATUS, r->status, "unexpected status %d (%s)", r->status,
                  check_where(ck, at, sizeof(at)));
    /* Only the status counts: the connection is closed rather than the body read. */
    return complete ? 0 : -1;
}

static int check_on_body(void *ctx, const char *p, size_t n, int complete)
{
    (void)ctx;
    (void)p;
    (void)n;
    (void)complete;
    return -1; /* not reached: the head ends the check */
}

static void check_on_end(void *ctx, enum upstream_err err)
{
    struct check *ck = ctx;

    ck->in_flight = 0;
    if (!ck->judged)
        check_set_failure(ck, err);
    check_finish(ck);
}

static const struct upstream_ops check_ops = {
    .build_head = check_build_head,
    .on_head = check_on_head,
    .on_body = check_on_body,
    .on_end = check_on_end,
};

/* The whole check's deadline, whatever step it is in; or the report of a check that failed at
 * once (never made from inside check_start). */
static void check_on_timer(uv_timer_t *t)
{
    struct check *ck = t->data;
    char at[80];

    if (!ck->in_flight) {
        check_report(ck);
        return;
    }
    enum upstream_step step = upstream_step(&ck->rq);
    check_where(ck, at, sizeof(at));
    upstream_abort(&ck->rq);
    ck->in_flight = 0;
    check_set(ck, 0, REASON_CHECK_TIMEOUT, -ETIMEDOUT, "timeout after %llu ms %s (%s)",
              (unsigned long long)ck->spec->timeout_ms, upstream_step_str(step), at);
    check_finish(ck);
}

int check_init(struct check *ck, uv_loop_t *loop, const struct check_spec *spec, check_done_cb done,
               void *data)
{
    int ret;

    memset(ck, 0, sizeof(*ck));
    ck->spec = spec;
    ck->done = done;
    ck->data = data;
    ret = uv_timer_init(loop, &ck->timer);
    if (ret < 0)
        return ret;
    ck->timer.data = ck;
    return 0;
}

int check_running(const struct check *ck)
{
    return ck->busy;
}

int check_start(struct check *ck)
{
    const struct check_spec *spec = ck->spec;
    int ret;

    if (ck->busy || ck->closing)
        return -EBUSY;
    memset(&ck->res, 0, sizeof(ck->res));
    memset(&ck->rq, 0, sizeof(ck->rq));
    ck->busy = 1;
    ck->judged = 0;
    ck->start_ns = time_mono_ns();
    ck->rq.ops = &check_ops;
    ck->rq.ctx = ck;
    ck->rq.backend = spec->backend;
    ck->rq.head_only = spec->head;
    /* A check opens its own connection, as HAProxy's do: it proves that one can be opened,
     * and a pooled one would say nothing of the backend's accept queue or TLS. */
    ck->rq.no_reuse = 1;
    /* Only the whole check's deadline counts (this timer, started first, fires first). */
    ck->rq.connect_timeout_ms = spec->timeout_ms;
    ck->rq.head_timeout_ms = spec->timeout_ms;
    uv_timer_start(&ck->timer, check_on_timer, spec->timeout_ms, 0); /* not closing */
    ret = upstream_start(spec->up, &ck->rq);
    if (ret == 0) {
        ck->in_flight = 1;
        return 0;
    }
    check_set_failure(ck, (enum upstream_err) - ret);
    ck->res.dur_us = (uint32_t)((time_mono_ns() - ck->start_ns) / 1000);
    uv_timer_start(&ck->timer, check_on_timer, 0, 0); /* reported on the next loop turn */
    return 0;
}

void check_close(struct check *ck)
{
    ck->closing = 1;
    if (ck->in_flight) {
        upstream_abort(&ck->rq);
        ck->in_flight = 0;
    }
    uv_close((uv_handle_t *)&ck->timer, NULL);
}
