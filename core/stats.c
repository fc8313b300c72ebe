/* The [stats] listener on the master's loop: one GET or HEAD per connection (Connection:
 * close), a bounded head, a deadline for the head and one for the whole exchange, a bounded
 * number of connections (when full, the oldest one still without a whole request makes room).
 * A scrape every few seconds is all it serves, so it favours being unable to hurt the master
 * over speed: nothing it is sent can block the loop or make it allocate without bound. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <llhttp.h>

#include "core/log.h"
#include "core/metrics.h"
#include "core/stats.h"
#include "core/util.h"

#define STATS_HEAD_MAX   8192 /* request line and headers; more is answered 431 */
#define STATS_URL_MAX    256  /* longer paths are none of ours: 404 */
#define STATS_TIMEOUT_MS 5000 /* the whole exchange, from accept to the last byte written */
#define STATS_HEAD_MS    2000 /* the request head, from accept: a scraper sends it at once */
#define STATS_CONNS_MAX  64   /* open at once (see stats_make_room) */
#define STATS_PROCS_MAX  (1 + 2 + 64)

struct stats_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wr;
    uv_shutdown_t sd;
    llhttp_t parser;
    struct stats_conn *prev, *next; /* every open connection, for stats_stop */
    struct mbuf body;
    char head[512];
    int open_handles; /* freed when both handles have closed */
    int answered;     /* the answer is on its way: input is ignored */
    int closing;      /* conn_close was called: no longer counted in S.n_conns */
    int head_done;    /* the request head is complete */
    size_t len;       /* bytes of the request read so far */
    size_t url_len;
    int url_over;
    char url[STATS_URL_MAX];
    char buf[STATS_HEAD_MAX];
};

static struct {
    uv_tcp_t listener;
    int listening;
    int inherited; /* fd + 1 of a listening socket to take instead of binding; 0 = none */
    int stopping;
    int starting; /* [cluster]: the workers wait for the first leases */
    int n_conns;  /* open and not closing */
    struct stats_conn *conns;
    const struct conf *conf;
    struct shm *shm;
    int (*procs)(struct admin_proc *procs, int max);
    void (*refresh)(void);
    int max_procs;
    uint64_t started_ms;
    llhttp_settings_t settings;
} S;

static void conn_closed(uv_handle_t *h)
{
    struct stats_conn *c = h->data;

    if (--c->open_handles)
        return;
    if (c->prev)
        c->prev->next = c->next;
    else
        S.conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    mbuf_free(&c->body);
    free(c);
}

static void conn_close(struct stats_conn *c)
{
    if (!c->closing) {
        c->closing = 1;
        S.n_conns--;
    }
    if (!uv_is_closing((uv_handle_t *)&c->tcp))
        uv_close((uv_handle_t *)&c->tcp, conn_closed);
    if (!uv_is_closing((uv_handle_t *)&c->timer))
        uv_close((uv_handle_t *)&c->timer, conn_closed);
}

static void conn_timeout(uv_timer_t *t)
{
    conn_close(t->data);
}

static void conn_shut(uv_shutdown_t *req, int status)
{
    conn_close(req->data);
}

static void conn_written(uv_write_t *req, int status)
{
    struct stats_conn *c = req->data;

    /* a FIN after the answer, rather than a close that may reset it if the client sent more */
    c->sd.data = c;
    if (status < 0 || uv_shutdown(&c->sd, (uv_stream_t *)&c->tcp, conn_shut) < 0)
        conn_close(c);
}

static void conn_send(struct stats_conn *c, int status, const char *reason, const char *ctype,
                      const char *extra, int head_only)
{
    uv_buf_t bufs[2];
    int n;

    c->answered = 1;
    uv_read_stop((uv_stream_t *)&c->tcp);
    n = snprintf(c->head, sizeof(c->head),
                 "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                 "Cache-Control: no-store\r\n%sConnection: close\r\n\r\n",
                 status, reason, ctype, c->body.len, extra ? extra : "");
    if (n < 0 || (size_t)n >= sizeof(c->head)) {
        conn_close(c);
        return;
    }
    bufs[0] = uv_buf_init(c->head, (unsigned)n);
    bufs[1] = uv_buf_init(c->body.p ? c->body.p : c->head, head_only ? 0 : (unsigned)c->body.len);
    c->wr.data = c;
    if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, bufs, 2, conn_written) < 0)
        conn_close(c);
}

static void conn_error(struct stats_conn *c, int status, const char *reason)
{
    mbuf_free(&c->body);
    mbuf_printf(&c->body, "%d %s\n", status, reason);
    conn_send(c, status, reason, "text/plain; charset=utf-8", NULL, 0);
}

/* /healthz: the gateway can serve: the health checker and at least one worker run, the master
 * is not stopping, and ([cluster]) its workers no longer wait for the first leases. */
static int stats_healthy(const struct admin_proc *p, int n)
{
    int health = 0, workers = 0;

    for (int i = 0; i < n; i++) {
        if (!strcmp(p[i].role, "health"))
            health |= p[i].pid > 0;
        else if (p[i].slot >= 0)
            workers += p[i].pid > 0;
    }
    return !S.stopping && !S.starting && health && workers > 0;
}

/* Answers the request whose head is complete. */
static void conn_answer(struct stats_conn *c)
{
    int method = llhttp_get_method(&c->parser);
    int head_only = method == HTTP_HEAD;
    struct admin_proc procs[STATS_PROCS_MAX];
    struct metrics_ctx m;
    size_t plen;
    int rc = 0;

    if (method != HTTP_GET && method != HTTP_HEAD) {
        mbuf_printf(&c->body, "405 Method Not Allowed\n");
        conn_send(c, 405, "Method Not Allowed", "text/plain; charset=utf-8", "Allow: GET, HEAD\r\n",
                  0);
        return;
    }
    if (c->url_over) {
        conn_error(c, 404, "Not Found");
        return;
    }
    c->url[c->url_len] = '\0';
    plen = strcspn(c->url, "?#");
    c->url[plen] = '\0';

    if (S.refresh)
        S.refresh(); /* what draining generations counted, up to now */
    m.conf = S.conf;
    m.shm = S.shm;
    m.procs = procs;
    m.n_procs = S.procs(procs, S.max_procs < STATS_PROCS_MAX ? S.max_procs : STATS_PROCS_MAX);
    m.started_ms = S.started_ms;

    if (!strcmp(c->url, "/metrics")) {
        rc = metrics_prometheus(&m, &c->body);
        if (rc == 0)
            conn_send(c, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", NULL, head_only);
    } else if (!strcmp(c->url, "/status.json")) {
        rc = metrics_status_json(&m, &c->body);
        if (rc == 0)
            conn_send(c, 200, "OK", "application/json", NULL, head_only);
    } else if (!strcmp(c->url, "/")) {
        mbuf_printf(&c->body, "%s", metrics_status_page);
        rc = c->body.failed ? -ENOMEM : 0;
        if (rc == 0)
            conn_send(c, 200, "OK", "text/html; charset=utf-8", NULL, head_only);
    } else if (!strcmp(c->url, "/healthz")) {
        int ok = stats_healthy(procs, m.n_procs);
        mbuf_printf(&c->body, ok ? "ok\n" : "unavailable\n");
        if (!c->body.failed)
            conn_send(c, ok ? 200 : 503, ok ? "OK" : "Service Unavailable",
                      "text/plain; charset=utf-8", NULL, head_only);
        rc = c->body.failed ? -ENOMEM : 0;
    } else {
        conn_error(c, 404, "Not Found");
    }
    if (rc < 0) {
        log_warn("stats: out of memory answering %s", c->url);
        conn_error(c, 500, "Internal Server Error");
    }
}

static int on_url(llhttp_t *p, const char *at, size_t len)
{
    struct stats_conn *c = p->data;

    if (c->url_len + len >= sizeof(c->url)) {
        c->url_over = 1;
        return 0;
    }
    memcpy(c->url + c->url_len, at, len);
    c->url_len += len;
    return 0;
}

static int on_headers_complete(llhttp_t *p)
{
    struct stats_conn *c = p->data;

    c->head_done = 1;
    return HPE_PAUSED; /* nothing after the head is read: no body is taken */
}

static void conn_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    struct stats_conn *c = h->data;

    *buf = uv_buf_init(c->buf + c->len, (unsigned)(sizeof(c->buf) - c->len));
}

static void conn_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct stats_conn *c = s->data;
    enum llhttp_errno err;

    if (c->answered)
        return;
    if (nread < 0) {
        conn_close(c); /* EOF before a whole head, or an error: nothing to answer */
        return;
    }
    if (nread == 0)
        return;
    err = llhttp_execute(&c->parser, buf->base, (size_t)nread);
    c->len += (size_t)nread;
    if (err == HPE_PAUSED && c->head_done) {
        /* the answer gets what is left of the whole exchange's time */
        uv_timer_start(&c->timer, conn_timeout, STATS_TIMEOUT_MS - STATS_HEAD_MS, 0);
        conn_answer(c);
    } else if (err != HPE_OK) {
        log_debug("stats: bad request: %s", llhttp_errno_name(err));
        conn_error(c, 400, "Bad Request");
    } else if (c->len >= sizeof(c->buf)) {
        conn_error(c, 431, "Request Header Fields Too Large");
    }
}

static void handle_free(uv_handle_t *h)
{
    free(h);
}

/* All STATS_CONNS_MAX places are taken: the oldest connection that has not sent a whole request
 * yet goes, so that idle or slow clients can never lock a scraper (or a load balancer's
 * /healthz) out. 0, or -EBUSY when every one is being answered. */
static int stats_make_room(void)
{
    struct stats_conn *victim = NULL;

    for (struct stats_conn *c = S.conns; c; c = c->next) /* newest first: the last found */
        if (!c->closing && !c->answered && !c->head_done)
            victim = c;
    if (!victim)
        return -EBUSY;
    log_debug("stats: %d connections open: closing the oldest one without a request",
              STATS_CONNS_MAX);
    conn_close(victim);
    return 0;
}

static void stats_on_connection(uv_stream_t *server, int status)
{
    struct stats_conn *c;

    if (status < 0)
        return;
    if (S.n_conns >= STATS_CONNS_MAX)
        stats_make_room(); /* none to close: the new one is closed below */
    c = calloc(1, sizeof(*c));
    if (!c) {
        /* still take the connection off the queue, or libuv would call again at once */
        uv_tcp_t *t = malloc(sizeof(*t));
        if (t && uv_tcp_init(server->loop, t) == 0) {
            uv_accept(server, (uv_stream_t *)t);
            uv_close((uv_handle_t *)t, handle_free);
        } else {
            free(t);
        }
        return;
    }
    uv_tcp_init(server->loop, &c->tcp); /* only initialises the handle */
    uv_timer_init(server->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->open_handles = 2;
    c->next = S.conns;
    if (S.conns)
        S.conns->prev = c;
    S.conns = c;
    S.n_conns++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0 || S.n_conns > STATS_CONNS_MAX) {
        conn_close(c);
        return;
    }
    llhttp_init(&c->parser, HTTP_REQUEST, &S.settings);
    c->parser.data = c;
    if (uv_read_start((uv_stream_t *)&c->tcp, conn_alloc, conn_read) < 0) {
        conn_close(c);
        return;
    }
    uv_timer_start(&c->timer, conn_timeout, STATS_HEAD_MS, 0);
}

int stats_start(uv_loop_t *loop, const struct conf *conf, struct shm *shm,
                int (*procs)(struct admin_proc *procs, int max), void (*refresh)(void),
                int max_procs, uint64_t started_ms)
{
    int rc;

    if (!conf->stats.enabled)
        return 0;
    S.conf = conf;
    S.shm = shm;
    S.procs = procs;
    S.refresh = refresh;
    S.max_procs = max_procs;
    S.started_ms = started_ms;
    S.stopping = 0;
    llhttp_settings_init(&S.settings);
    S.settings.on_url = on_url;
    S.settings.on_headers_complete = on_headers_complete;

    uv_tcp_init(loop, &S.listener); /* only initialises the handle */
    S.listener.data = NULL;
    S.listening = 1;
    if (S.inherited > 0) /* a binary upgrade's: the old master's socket, same address */
        rc = uv_tcp_open(&S.listener, S.inherited - 1);
    else
        rc = uv_tcp_bind(&S.listener, (const struct sockaddr *)&conf->stats.addr, 0);
    S.inherited = 0;
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&S.listener, 64, stats_on_connection);
    if (rc < 0) {
        log_err("cannot bind %s ([stats]): %s", conf->stats.bind, uv_strerror(rc));
        return rc;
    }
    log_info("stats listening on %s (/metrics, /healthz, /)", conf->stats.bind);
    return 0;
}

void stats_inherit_fd(int fd)
{
    S.inherited = fd + 1;
}

int stats_listen_fd(void)
{
    uv_os_fd_t fd;
    if (!S.listening || uv_fileno((uv_handle_t *)&S.listener, &fd) < 0)
        return -1;
    return fd;
}

void stats_set_stopping(void)
{
    S.stopping = 1;
}

void stats_set_starting(int on)
{
    S.starting = on;
}

void stats_stop(void)
{
    if (S.listening && !uv_is_closing((uv_handle_t *)&S.listener))
        uv_close((uv_handle_t *)&S.listener, NULL);
    S.listening = 0;
    for (struct stats_conn *c = S.conns; c; c = c->next)
        conn_close(c);
}

void stats_set_gen(const struct conf *conf, struct shm *shm, int max_procs)
{
    S.conf = conf;
    S.shm = shm;
    S.max_procs = max_procs;
}
