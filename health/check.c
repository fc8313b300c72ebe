/* One active health check: resolve, connect, optional TLS, send the request, judge the status
 * line. The socket is driven with uv_poll so plain and TLS connections share one path. */
#include "health/check.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/conf.h"
#include "core/util.h"

/* A response head larger than this is not a plausible health answer. */
#define CHECK_HEAD_MAX (64 * 1024)

static void check_drive(struct check *ck);

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

static const char *check_step_str(enum check_step s)
{
    switch (s) {
    case CHECK_RESOLVE:
        return "resolving the host";
    case CHECK_CONNECT:
        return "connecting";
    case CHECK_HANDSHAKE:
        return "in the TLS handshake";
    case CHECK_SEND:
        return "sending the request";
    case CHECK_RECV:
        return "waiting for the response";
    default:
        return "idle";
    }
}

static void check_report(struct check *ck)
{
    ck->busy = 0;
    ck->done(ck, &ck->res);
}

static void check_on_poll_closed(uv_handle_t *h)
{
    struct check *ck = h->data;

    ck->poll_open = 0;
    if (!ck->closing)
        check_report(ck);
}

static void check_on_report_timer(uv_timer_t *t)
{
    check_report(t->data);
}

/* Tears the attempt down; the result is reported once the poll handle has closed (or on the
 * next loop turn when there was none), so the check is reusable when the callback runs. */
static void check_finish(struct check *ck)
{
    ck->step = CHECK_IDLE;
    uv_timer_stop(&ck->timer);
    ck->res.dur_us = (uint32_t)((time_mono_ns() - ck->start_ns) / 1000);
    if (ck->tls_open) {
        tls_conn_free(&ck->tls);
        ck->tls_open = 0;
    }
    if (ck->poll_open) {
        uv_poll_stop(&ck->poll);
        close(ck->fd);
        ck->fd = -1;
        uv_close((uv_handle_t *)&ck->poll, check_on_poll_closed);
        return;
    }
    if (ck->fd >= 0) {
        close(ck->fd);
        ck->fd = -1;
    }
    uv_timer_start(&ck->timer, check_on_report_timer, 0, 0); /* not closing: cannot fail */
}

static void check_fail(struct check *ck, enum backend_reason why, int32_t status, const char *fmt,
                       ...) __attribute__((format(printf, 4, 5)));

static void check_fail(struct check *ck, enum backend_reason why, int32_t status, const char *fmt,
                       ...)
{
    va_list ap;

    if (ck->step == CHECK_IDLE)
        return;
    ck->res.ok = 0;
    ck->res.why = why;
    ck->res.status = status;
    va_start(ap, fmt);
    vsnprintf(ck->res.detail, sizeof(ck->res.detail), fmt, ap);
    va_end(ap);
    check_finish(ck);
}

static void check_fail_connect(struct check *ck, int err, int connecting)
{
    /* the checker's own shortage, as the workers classify it (core/upstream.c) */
    if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM ||
        (connecting && (err == EADDRNOTAVAIL || err == EAGAIN))) {
        ck->res.local = 1;
        check_fail(ck, REASON_CHECK_CONNECT, -err,
                   "%s: %s (the health checker is out of a local "
                   "resource)",
                   connecting ? "connect" : "socket", strerror(err));
        return;
    }
    if (err == ECONNREFUSED)
        check_fail(ck, REASON_CHECK_CONNECT, -err, "connect refused (%s)", ck->addr);
    else
        check_fail(ck, REASON_CHECK_CONNECT, -err, "connect failed: %s (%s)", strerror(err),
                   ck->addr);
}

static void check_on_timeout(uv_timer_t *t)
{
    struct check *ck = t->data;

    if (ck->step == CHECK_RESOLVE && ck->gai_pending)
        uv_cancel((uv_req_t *)&ck->gai); /* EBUSY when already running: its callback ignores it */
    check_fail(ck, REASON_CHECK_TIMEOUT, -ETIMEDOUT, "timeout after %llu ms %s (%s)",
               (unsigned long long)ck->spec->timeout_ms, check_step_str(ck->step),
               ck->addr[0] ? ck->addr : ck->spec->host);
}

static void check_on_poll(uv_poll_t *p, int status, int events)
{
    struct check *ck = p->data;

    /* An error event still leaves the real cause to the step's own syscall (SO_ERROR, recv). */
    (void)status;
    (void)events;
    check_drive(ck);
}

static void check_wait(struct check *ck, int events)
{
    int ret = uv_poll_start(&ck->poll, events, check_on_poll);

    if (ret < 0)
        check_fail(ck, REASON_CHECK_CONNECT, ret, "poll failed: %s", uv_strerror(ret));
}

static void check_connect(struct check *ck, const struct sockaddr *sa, socklen_t salen)
{
    char ip[INET6_ADDRSTRLEN];
    int ret, one = 1;

    if (sa->sa_family == AF_INET6) {
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, ip, sizeof(ip));
        snprintf(ck->addr, sizeof(ck->addr), "[%s]:%u", ip, (unsigned)ck->spec->port);
    } else {
        inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, ip, sizeof(ip));
        snprintf(ck->addr, sizeof(ck->addr), "%s:%u", ip, (unsigned)ck->spec->port);
    }
    ck->fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (ck->fd == -1) {
        check_fail_connect(ck, errno, 0);
        return;
    }
    /* mbedTLS writes each handshake record with its own send(): without NODELAY, Nagle holds
     * the second one until the peer's delayed ACK, adding ~40 ms to every TLS check. */
    setsockopt(ck->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(ck->fd, sa, salen) == -1 && errno != EINPROGRESS) {
        check_fail_connect(ck, errno, 1);
        return;
    }
    ret = uv_poll_init_socket(ck->loop, &ck->poll, ck->fd);
    if (ret < 0) {
        /* epoll_ctl or ioctl on our own new socket: only a local shortage makes these fail */
        ck->res.local = 1;
        check_fail(ck, REASON_CHECK_CONNECT, ret, "poll init failed: %s", uv_strerror(ret));
        return;
    }
    ck->poll.data = ck;
    ck->poll_open = 1;
    ck->step = CHECK_CONNECT;
    check_wait(ck, UV_WRITABLE);
}

static void check_on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *ai)
{
    struct check *ck = req->data;

    ck->gai_pending = 0;
    /* The check may have timed out or been closed while the resolver ran. */
    if (ck->closing || ck->step != CHECK_RESOLVE) {
        uv_freeaddrinfo(ai);
        return;
    }
    if (status < 0 || !ai) {
        check_fail(ck, REASON_CHECK_CONNECT, -EHOSTUNREACH, "cannot resolve %s: %s", ck->spec->host,
                   uv_strerror(status));
        uv_freeaddrinfo(ai);
        return;
    }
    check_connect(ck, ai->ai_addr, ai->ai_addrlen);
    uv_freeaddrinfo(ai);
}

static int check_on_headers_complete(llhttp_t *p)
{
    struct check *ck = p->data;

    /* 1xx interim answers are followed by the real one. */
    if (p->status_code >= 100 && p->status_code < 200)
        return 0;
    ck->head_done = 1;
    /* Only the status matters: stop here, whether or not a body follows (HEAD has none). */
    return HPE_PAUSED;
}

static const llhttp_settings_t check_llhttp_settings = {
    .on_headers_complete = check_on_headers_complete,
};

/* Feeds response bytes; returns 1 when the check is over. */
static int check_feed(struct check *ck, const char *buf, size_t n)
{
    llhttp_errno_t err = llhttp_execute(&ck->parser, buf, n);
    int status;

    ck->head_bytes += n;
    if (ck->head_done) {
        status = ck->parser.status_code;
        ck->res.status = status;
        if (check_status_expected(status, ck->spec->expect, ck->spec->n_expect)) {
            ck->res.ok = 1;
            ck->res.why = REASON_CHECK_OK;
            snprintf(ck->res.detail, sizeof(ck->res.detail), "status %d", status);
            check_finish(ck);
        } else {
            check_fail(ck, REASON_CHECK_STATUS, status, "unexpected status %d (%s)", status,
                       ck->addr);
        }
        return 1;
    }
    if (err != HPE_OK) {
        check_fail(ck, REASON_CHECK_PROTO, -EBADMSG, "bad HTTP response: %s (%s)",
                   llhttp_get_error_reason(&ck->parser), ck->addr);
        return 1;
    }
    if (ck->head_bytes > CHECK_HEAD_MAX) {
        check_fail(ck, REASON_CHECK_PROTO, -EMSGSIZE, "response head over %d bytes (%s)",
                   CHECK_HEAD_MAX, ck->addr);
        return 1;
    }
    return 0;
}

static void check_tls_wait(struct check *ck, int ret)
{
    check_wait(ck, ret == TLS_WANT_WRITE ? UV_WRITABLE : UV_READABLE);
}

static void check_drive(struct check *ck)
{
    char buf[4096], eb[256];
    socklen_t slen;
    ssize_t n;
    int err, ret;

    for (;;) {
        switch (ck->step) {
        case CHECK_CONNECT:
            err = 0;
            slen = sizeof(err);
            if (getsockopt(ck->fd, SOL_SOCKET, SO_ERROR, &err, &slen) == -1)
                err = errno;
            if (err == EINPROGRESS || err == EALREADY) {
                check_wait(ck, UV_WRITABLE);
                return;
            }
            if (err != 0) {
                check_fail_connect(ck, err, 0); /* the network's answer, not a syscall's */
                return;
            }
            if (!ck->spec->tls) {
                ck->step = CHECK_SEND;
                break;
            }
            ret = tls_conn_init(&ck->tls, ck->spec->tls, ck->fd);
            if (ret < 0) {
                check_fail(ck, REASON_CHECK_TLS, ret, "TLS setup failed: %s", strerror(-ret));
                return;
            }
            ck->tls_open = 1;
            ck->step = CHECK_HANDSHAKE;
            break;
        case CHECK_HANDSHAKE:
            ret = tls_conn_handshake(&ck->tls);
            if (ret == TLS_WANT_READ || ret == TLS_WANT_WRITE) {
                check_tls_wait(ck, ret);
                return;
            }
            if (ret != 0) {
                check_fail(ck, REASON_CHECK_TLS, -EPROTO, "TLS handshake failed: %s (%s)",
                           tls_strerror(&ck->tls, ret, eb, sizeof(eb)), ck->addr);
                return;
            }
            ck->step = CHECK_SEND;
            break;
        case CHECK_SEND:
            while (ck->sent < ck->spec->request_len) {
                const char *p = ck->spec->request + ck->sent;
                size_t left = ck->spec->request_len - ck->sent;

                if (ck->tls_open) {
                    n = tls_conn_write(&ck->tls, p, left);
                    if (n == TLS_WANT_READ || n == TLS_WANT_WRITE) {
                        check_tls_wait(ck, (int)n);
                        return;
                    }
                    if (n < 0) {
                        check_fail(ck, REASON_CHECK_TLS, -EPROTO, "TLS write failed: %s (%s)",
                                   tls_strerror(&ck->tls, (int)n, eb, sizeof(eb)), ck->addr);
                        return;
                    }
                } else {
                    n = send(ck->fd, p, left, MSG_NOSIGNAL);
                    if (n == -1 && (errno == EAGAIN || errno == EINTR)) {
                        check_wait(ck, UV_WRITABLE);
                        return;
                    }
                    if (n == -1) {
                        check_fail(ck, REASON_CHECK_CONNECT, -errno, "send failed: %s (%s)",
                                   strerror(errno), ck->addr);
                        return;
                    }
                }
                ck->sent += (size_t)n;
            }
            llhttp_init(&ck->parser, HTTP_RESPONSE, &check_llhttp_settings);
            ck->parser.data = ck;
            ck->step = CHECK_RECV;
            break;
        case CHECK_RECV:
            for (;;) {
                if (ck->tls_open) {
                    n = tls_conn_read(&ck->tls, buf, sizeof(buf));
                    if (n == TLS_WANT_READ || n == TLS_WANT_WRITE) {
                        check_tls_wait(ck, (int)n);
                        return;
                    }
                    if (n < 0) {
                        check_fail(ck, REASON_CHECK_TLS, -EPROTO, "TLS read failed: %s (%s)",
                                   tls_strerror(&ck->tls, (int)n, eb, sizeof(eb)), ck->addr);
                        return;
                    }
                } else {
                    n = recv(ck->fd, buf, sizeof(buf), 0);
                    if (n == -1 && (errno == EAGAIN || errno == EINTR)) {
                        check_wait(ck, UV_READABLE);
                        return;
                    }
                    if (n == -1) {
                        check_fail(ck, REASON_CHECK_CONNECT, -errno,
                                   "connection failed %s: %s (%s)", check_step_str(ck->step),
                                   strerror(errno), ck->addr);
                        return;
                    }
                }
                if (n == 0) {
                    check_fail(ck, REASON_CHECK_PROTO, -EBADMSG,
                               ck->head_bytes ? "connection closed inside the response head (%s)"
                                              : "connection closed without a response (%s)",
                               ck->addr);
                    return;
                }
                if (check_feed(ck, buf, (size_t)n))
                    return;
            }
        default:
            return;
        }
    }
}

int check_init(struct check *ck, uv_loop_t *loop, const struct check_spec *spec, check_done_cb done,
               void *data)
{
    int ret;

    memset(ck, 0, sizeof(*ck));
    ck->loop = loop;
    ck->spec = spec;
    ck->done = done;
    ck->data = data;
    ck->fd = -1;
    ret = uv_timer_init(loop, &ck->timer);
    if (ret < 0)
        return ret;
    ck->timer.data = ck;
    ck->gai.data = ck;
    return 0;
}

int check_running(const struct check *ck)
{
    return ck->busy;
}

int check_start(struct check *ck)
{
    union {
        struct sockaddr sa;
        struct sockaddr_in in4;
        struct sockaddr_in6 in6;
    } addr;
    struct addrinfo hints;
    char port[8];
    int ret;

    if (ck->busy || ck->poll_open || ck->closing)
        return -EBUSY;
    memset(&ck->res, 0, sizeof(ck->res));
    ck->busy = 1;
    ck->sent = 0;
    ck->head_bytes = 0;
    ck->head_done = 0;
    ck->addr[0] = '\0';
    ck->start_ns = time_mono_ns();
    ck->step = CHECK_RESOLVE;
    uv_timer_start(&ck->timer, check_on_timeout, ck->spec->timeout_ms, 0);

    if (ck->spec->tls_err) {
        check_fail(ck, REASON_CHECK_TLS, -EPROTO, "%s", ck->spec->tls_err);
        return 0;
    }
    memset(&addr, 0, sizeof(addr));
    if (inet_pton(AF_INET, ck->spec->host, &addr.in4.sin_addr) == 1) {
        addr.in4.sin_family = AF_INET;
        addr.in4.sin_port = htons(ck->spec->port);
        check_connect(ck, &addr.sa, sizeof(addr.in4));
        return 0;
    }
    if (inet_pton(AF_INET6, ck->spec->host, &addr.in6.sin6_addr) == 1) {
        addr.in6.sin6_family = AF_INET6;
        addr.in6.sin6_port = htons(ck->spec->port);
        check_connect(ck, &addr.sa, sizeof(addr.in6));
        return 0;
    }
    if (ck->gai_pending) {
        /* The resolver is still busy with an earlier, abandoned lookup. */
        check_fail(ck, REASON_CHECK_TIMEOUT, -ETIMEDOUT, "still resolving %s", ck->spec->host);
        return 0;
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_ADDRCONFIG;
    snprintf(port, sizeof(port), "%u", (unsigned)ck->spec->port);
    ret = uv_getaddrinfo(ck->loop, &ck->gai, check_on_resolved, ck->spec->host, port, &hints);
    if (ret < 0) {
        check_fail(ck, REASON_CHECK_CONNECT, -EHOSTUNREACH, "cannot resolve %s: %s", ck->spec->host,
                   uv_strerror(ret));
        return 0;
    }
    ck->gai_pending = 1;
    return 0;
}

void check_close(struct check *ck)
{
    ck->closing = 1;
    ck->step = CHECK_IDLE;
    uv_timer_stop(&ck->timer);
    if (ck->tls_open) {
        tls_conn_free(&ck->tls);
        ck->tls_open = 0;
    }
    if (ck->poll_open && !uv_is_closing((uv_handle_t *)&ck->poll)) {
        uv_poll_stop(&ck->poll);
        uv_close((uv_handle_t *)&ck->poll, check_on_poll_closed);
    }
    if (ck->fd >= 0) {
        close(ck->fd);
        ck->fd = -1;
    }
    if (ck->gai_pending)
        uv_cancel((uv_req_t *)&ck->gai);
    uv_close((uv_handle_t *)&ck->timer, NULL);
}
