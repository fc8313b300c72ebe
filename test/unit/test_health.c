/* Unit tests of the health checker: rise/fall, check EWMA and outcome window, request text,
 * status judgement, and active checks end to end through the upstream client against an
 * in-process loopback server (a host name with two addresses through a getaddrinfo of the
 * test's own). */
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netdb.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <uv.h>

#include "core/tls.h"
#include "core/upstream.h"
#include "core/util.h"
#include "health/check.h"
#include "health/health.h"
#include "health/stats.h"

/* Feeds a sequence of results ('+' pass, '-' fail) and returns the positions (1-based) of the
 * state changes as a string of digits, e.g. "3" when the third result flipped the state. */
static void rf_run(const char *seq, enum backend_state start, int rise, int fall, char *changes,
                   enum backend_state *end)
{
    struct health_rf rf = {0};
    enum backend_state st = start;
    char *p = changes;

    for (int i = 0; seq[i]; i++)
        if (health_rf_on_result(&rf, &st, seq[i] == '+', rise, fall))
            *p++ = (char)('1' + i);
    *p = '\0';
    *end = st;
}

static void test_rf_fall_after_consecutive_failures(void **state)
{
    char ch[32];
    enum backend_state st;

    rf_run("--", BACKEND_UP, 2, 3, ch, &st);
    assert_string_equal(ch, "");
    assert_int_equal(st, BACKEND_UP);
    rf_run("---", BACKEND_UP, 2, 3, ch, &st);
    assert_string_equal(ch, "3");
    assert_int_equal(st, BACKEND_DOWN);
    /* Further failures while DOWN change nothing. */
    rf_run("-----", BACKEND_UP, 2, 3, ch, &st);
    assert_string_equal(ch, "3");
    assert_int_equal(st, BACKEND_DOWN);
}

static void test_rf_pass_resets_fail_streak(void **state)
{
    char ch[32];
    enum backend_state st;

    rf_run("--+--+--", BACKEND_UP, 2, 3, ch, &st);
    assert_string_equal(ch, "");
    assert_int_equal(st, BACKEND_UP);
    rf_run("--+---", BACKEND_UP, 2, 3, ch, &st);
    assert_string_equal(ch, "6");
    assert_int_equal(st, BACKEND_DOWN);
}

static void test_rf_rise_after_consecutive_passes(void **state)
{
    char ch[32];
    enum backend_state st;

    rf_run("+", BACKEND_DOWN, 2, 3, ch, &st);
    assert_string_equal(ch, "");
    assert_int_equal(st, BACKEND_DOWN);
    rf_run("+-+-+", BACKEND_DOWN, 2, 3, ch, &st);
    assert_string_equal(ch, "");
    assert_int_equal(st, BACKEND_DOWN);
    rf_run("+-++", BACKEND_DOWN, 2, 3, ch, &st);
    assert_string_equal(ch, "4");
    assert_int_equal(st, BACKEND_UP);
}

static void test_rf_full_cycle(void **state)
{
    char ch[32];
    enum backend_state st;

    /* down after 2, up after 3, down again after 2: streaks start afresh after each change. */
    rf_run("+--+-+++--", BACKEND_UP, 3, 2, ch, &st);
    assert_string_equal(ch, "38:");
    assert_int_equal(st, BACKEND_DOWN);
}

static void test_rf_one_and_zero_thresholds(void **state)
{
    char ch[32];
    enum backend_state st;

    rf_run("-+-+", BACKEND_UP, 1, 1, ch, &st);
    assert_string_equal(ch, "1234");
    assert_int_equal(st, BACKEND_UP);
    /* 0 is treated as 1 rather than flapping or never changing. */
    rf_run("-+", BACKEND_UP, 0, 0, ch, &st);
    assert_string_equal(ch, "12");
}

static void test_status_expected(void **state)
{
    const int exp[] = {200, 204};

    assert_true(check_status_expected(200, exp, 2));
    assert_true(check_status_expected(204, exp, 2));
    assert_false(check_status_expected(201, exp, 2));
    assert_false(check_status_expected(503, exp, 2));
    assert_false(check_status_expected(200, exp, 0));
}

static void test_build_request(void **state)
{
    char buf[512];
    int n;

    n = check_build_request(buf, sizeof(buf), 0, "/v1/models", "127.0.0.1", 9101, 0, NULL);
    assert_string_equal(buf, "GET /v1/models HTTP/1.1\r\n"
                             "Host: 127.0.0.1:9101\r\n"
                             "User-Agent: aigw-health\r\n"
                             "Accept: */*\r\n"
                             "Connection: close\r\n\r\n");
    assert_int_equal(n, (int)strlen(buf));

    n = check_build_request(buf, sizeof(buf), 1, "/models", "api.example.com", 443, 1, "sk-1");
    assert_string_equal(buf, "HEAD /models HTTP/1.1\r\n"
                             "Host: api.example.com\r\n"
                             "Authorization: Bearer sk-1\r\n"
                             "User-Agent: aigw-health\r\n"
                             "Accept: */*\r\n"
                             "Connection: close\r\n\r\n");
    assert_int_equal(n, (int)strlen(buf));

    /* Port 80 is the default only for http; IPv6 literals are bracketed. */
    check_build_request(buf, sizeof(buf), 0, "/h", "::1", 80, 1, NULL);
    assert_non_null(strstr(buf, "\r\nHost: [::1]:80\r\n"));
    check_build_request(buf, sizeof(buf), 0, "/h", "::1", 80, 0, NULL);
    assert_non_null(strstr(buf, "\r\nHost: [::1]\r\n"));

    assert_int_equal(check_build_request(buf, 40, 0, "/v1/models", "h", 1, 0, NULL), -ENOSPC);
}

#define SEC 1000000000ULL

static void test_ewma_first_sample_and_smoothing(void **state)
{
    uint64_t a = health_ewma_add(0, 800000);

    /* the first sample is taken as it is: a slow backend shows at its first check */
    assert_int_equal(a, 800000);
    /* a quarter of the way toward each new sample, both ways */
    a = health_ewma_add(a, 400000);
    assert_int_equal(a, 700000);
    a = health_ewma_add(a, 1100000);
    assert_int_equal(a, 800000);
    /* one odd sample moves it little; a lasting change wins within a few */
    a = health_ewma_add(100000, 1000000);
    assert_int_equal(a, 325000);
    for (int i = 0; i < 3; i++)
        a = health_ewma_add(a, 1000000);
    assert_true(a > 700000 && a < 1000000);
    /* 0 means "no sample": a 0 us sample still leaves a figure */
    assert_int_equal(health_ewma_add(0, 0), 1);
    assert_true(health_ewma_add(3, 0) >= 1);
}

static void test_window_empty_and_filling(void **state)
{
    struct health_window w;
    uint64_t ok, failed;

    memset(&w, 0, sizeof(w));
    health_window_delta(&w, 100 * SEC, 5, 5, &ok, &failed);
    assert_int_equal(ok, 0);
    assert_int_equal(failed, 0);
    /* the snapshot of a second is its first update: later ones in that second don't move it */
    health_window_update(&w, 100 * SEC, 10, 2);
    health_window_update(&w, 100 * SEC + SEC / 2, 15, 3);
    health_window_delta(&w, 100 * SEC + SEC / 2, 15, 3, &ok, &failed);
    assert_int_equal(ok, 5);
    assert_int_equal(failed, 1);
    health_window_update(&w, 103 * SEC, 40, 10);
    health_window_delta(&w, 103 * SEC, 40, 10, &ok, &failed);
    assert_int_equal(ok, 30);
    assert_int_equal(failed, 8);
}

static void test_window_slides(void **state)
{
    struct health_window w;
    uint64_t ok = 0, failed = 0, wok, wfailed;

    memset(&w, 0, sizeof(w));
    /* 10 ok and 1 failure per second for 30 s, updated every 25 ms */
    for (uint64_t t = 1000 * SEC; t < 1030 * SEC; t += SEC / 40) {
        health_window_update(&w, t, ok, failed);
        if (t % SEC == 0) {
            ok += 10;
            failed += 1;
        }
    }
    /* now = 1029.975 s: the oldest snapshot in the window is 1019 s's, taken before that
     * second's traffic: 11 seconds of it */
    health_window_delta(&w, 1030 * SEC - SEC / 40, ok, failed, &wok, &wfailed);
    assert_int_equal(wok, 110);
    assert_int_equal(wfailed, 11);
    /* traffic stops: it leaves the window as the seconds pass */
    for (uint64_t t = 1030 * SEC; t < 1036 * SEC; t += SEC / 40)
        health_window_update(&w, t, ok, failed);
    health_window_delta(&w, 1036 * SEC - SEC / 40, ok, failed, &wok, &wfailed);
    assert_int_equal(wok, 50);
    assert_int_equal(wfailed, 5);
    for (uint64_t t = 1036 * SEC; t < 1042 * SEC; t += SEC / 40)
        health_window_update(&w, t, ok, failed);
    health_window_delta(&w, 1042 * SEC - SEC / 40, ok, failed, &wok, &wfailed);
    assert_int_equal(wok, 0);
    assert_int_equal(wfailed, 0);
}

static void test_window_after_stall_and_reset(void **state)
{
    struct health_window w;
    uint64_t wok, wfailed;

    memset(&w, 0, sizeof(w));
    health_window_update(&w, 50 * SEC, 100, 10);
    health_window_update(&w, 51 * SEC, 200, 20);
    /* the loop stalled for 30 s: every snapshot is too old, the window starts again */
    health_window_delta(&w, 81 * SEC, 900, 90, &wok, &wfailed);
    assert_int_equal(wok, 0);
    assert_int_equal(wfailed, 0);
    health_window_update(&w, 81 * SEC, 900, 90);
    health_window_delta(&w, 82 * SEC, 950, 91, &wok, &wfailed);
    assert_int_equal(wok, 50);
    assert_int_equal(wfailed, 1);
    /* totals that went backwards count as no traffic, not as a huge number */
    health_window_delta(&w, 82 * SEC, 10, 1, &wok, &wfailed);
    assert_int_equal(wok, 0);
    assert_int_equal(wfailed, 0);
}

/* A loopback server in the test's own loop: answers each connection with `reply` (or stays
 * silent when reply is NULL), delay_ms after the request, and keeps the request it got. */
struct srv {
    uv_tcp_t tcp;
    const char *reply;
    unsigned delay_ms;
    char got[1024];
    size_t got_len;
    int port;
    int conns; /* connections accepted */
};

struct srv_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    int open; /* handles not closed yet: freed with the last */
    struct srv *srv;
    uv_write_t wr;
};

static void srv_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b)
{
    static char mem[4096];

    b->base = mem;
    b->len = sizeof(mem);
}

static void srv_conn_closed(uv_handle_t *h)
{
    struct srv_conn *c = h->data;

    if (--c->open == 0)
        free(c);
}

static void srv_written(uv_write_t *w, int status)
{
    struct srv_conn *c = w->data;

    uv_close((uv_handle_t *)&c->tcp, srv_conn_closed);
}

static void srv_reply_later(uv_timer_t *t)
{
    struct srv_conn *c = t->data;
    uv_buf_t out = uv_buf_init((char *)c->srv->reply, (unsigned)strlen(c->srv->reply));

    uv_close((uv_handle_t *)t, srv_conn_closed);
    c->wr.data = c;
    uv_write(&c->wr, (uv_stream_t *)&c->tcp, &out, 1, srv_written);
}

static void srv_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    struct srv_conn *c = s->data;
    struct srv *srv = c->srv;
    uv_buf_t out;

    if (n < 0) {
        uv_close((uv_handle_t *)&c->tcp, srv_conn_closed);
        return;
    }
    if (n > 0 && srv->got_len + (size_t)n < sizeof(srv->got)) {
        memcpy(srv->got + srv->got_len, b->base, (size_t)n);
        srv->got_len += (size_t)n;
        srv->got[srv->got_len] = '\0';
    }
    if (!strstr(srv->got, "\r\n\r\n") || !srv->reply)
        return;
    uv_read_stop(s);
    if (srv->delay_ms) {
        uv_timer_init(s->loop, &c->timer);
        c->timer.data = c;
        c->open++;
        uv_timer_start(&c->timer, srv_reply_later, srv->delay_ms, 0);
        return;
    }
    out = uv_buf_init((char *)srv->reply, (unsigned)strlen(srv->reply));
    c->wr.data = c;
    uv_write(&c->wr, s, &out, 1, srv_written);
}

static void srv_on_conn(uv_stream_t *l, int status)
{
    struct srv *srv = l->data;
    struct srv_conn *c = calloc(1, sizeof(*c));

    assert_non_null(c);
    c->srv = srv;
    srv->conns++;
    c->open = 1;
    uv_tcp_init(l->loop, &c->tcp);
    c->tcp.data = c;
    assert_int_equal(uv_accept(l, (uv_stream_t *)&c->tcp), 0);
    uv_read_start((uv_stream_t *)&c->tcp, srv_alloc, srv_read);
}

static void srv_start(uv_loop_t *loop, struct srv *srv, const char *reply)
{
    struct sockaddr_in sa;
    struct sockaddr_storage ss;
    int len = sizeof(ss);

    memset(srv, 0, sizeof(*srv));
    srv->reply = reply;
    uv_ip4_addr("127.0.0.1", 0, &sa);
    assert_int_equal(uv_tcp_init(loop, &srv->tcp), 0);
    srv->tcp.data = srv;
    assert_int_equal(uv_tcp_bind(&srv->tcp, (struct sockaddr *)&sa, 0), 0);
    assert_int_equal(uv_listen((uv_stream_t *)&srv->tcp, 16, srv_on_conn), 0);
    uv_tcp_getsockname(&srv->tcp, (struct sockaddr *)&ss, &len);
    srv->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

static void close_walk(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

struct run {
    struct check_result res;
    int calls;
};

static void on_done(struct check *ck, const struct check_result *res)
{
    struct run *r = ck->data;

    r->res = *res;
    r->calls++;
}

/* A name that resolves to two loopback addresses, the first with nothing listening: what a
 * host with an IPv6 and an IPv4 address looks like when the backend listens on one only.
 * Lookups of it are counted; every other name goes to the C library. */
#define TWO_ADDR_HOST "twoaddr.aigw.test"
static _Atomic int gai_calls; /* lookups run on libuv's thread pool */
static char fake_canon[] = "fake";

typedef int (*gai_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);
typedef void (*fai_fn)(struct addrinfo *);

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res)
{
    static const char *ips[] = {"127.0.0.2", "127.0.0.1"};
    struct addrinfo *head = NULL, **tail = &head;

    if (!node || strcmp(node, TWO_ADDR_HOST) != 0) {
        gai_fn real = (gai_fn)dlsym(RTLD_NEXT, "getaddrinfo");
        return real(node, service, hints, res);
    }
    if (hints && (hints->ai_flags & AI_NUMERICHOST))
        return EAI_NONAME;
    gai_calls++;
    for (size_t i = 0; i < sizeof(ips) / sizeof(ips[0]); i++) {
        struct fake_ai {
            struct addrinfo ai;
            struct sockaddr_in sa;
        } *n = calloc(1, sizeof(*n));
        if (!n)
            return EAI_MEMORY;
        n->sa.sin_family = AF_INET;
        n->sa.sin_port = htons((uint16_t)atoi(service ? service : "0"));
        inet_pton(AF_INET, ips[i], &n->sa.sin_addr);
        n->ai.ai_family = AF_INET;
        n->ai.ai_socktype = SOCK_STREAM;
        n->ai.ai_protocol = IPPROTO_TCP;
        n->ai.ai_addrlen = sizeof(n->sa);
        n->ai.ai_addr = (struct sockaddr *)&n->sa;
        n->ai.ai_canonname = fake_canon; /* marks ours for freeaddrinfo */
        *tail = &n->ai;
        tail = &n->ai.ai_next;
    }
    *res = head;
    return 0;
}

void freeaddrinfo(struct addrinfo *ai)
{
    if (ai && ai->ai_canonname == fake_canon) {
        while (ai) {
            struct addrinfo *next = ai->ai_next;
            free(ai);
            ai = next;
        }
        return;
    }
    fai_fn real = (fai_fn)dlsym(RTLD_NEXT, "freeaddrinfo");
    real(ai);
}

/* The checker's side: one backend in a configuration of its own, the checker's upstream client
 * (no shm, no pooling) and a check of that backend. */
#define CK_HDRS     32
#define CK_DATA     4096
#define CK_DATA_OFF (CK_HDRS * sizeof(struct proxy_hdr))

struct ckfx {
    struct conf_pool pool;
    struct conf_backend be;
    struct conf conf;
    struct bufpool bufs;
    struct upstream up;
    struct check_spec spec;
    struct check ck;
    char req[512];
    struct run run;
};

static void ckfx_init(struct ckfx *f, uv_loop_t *loop, const char *host, uint16_t port,
                      uint64_t timeout_ms, int head)
{
    static const int expect[] = {200, 204};

    memset(f, 0, sizeof(*f));
    snprintf(f->pool.name, sizeof(f->pool.name), "p");
    f->pool.check = 1;
    f->pool.connect_timeout_ms = 5000;
    f->pool.first_byte_timeout_ms = 5000;
    f->pool.idle_timeout_ms = 5000;
    f->pool.pool_idle_timeout_ms = 5000;
    snprintf(f->be.name, sizeof(f->be.name), "b");
    snprintf(f->be.url.host, sizeof(f->be.url.host), "%s", host);
    f->be.url.port = port;
    f->be.keepalive = 8; /* the checker pools nothing whatever this says */
    f->conf.pools = &f->pool;
    f->conf.n_pools = 1;
    f->conf.backends = &f->be;
    f->conf.n_backends = 1;
    bufpool_init(&f->bufs, CK_DATA_OFF + CK_DATA, 4);
    assert_int_equal(
        upstream_init(&f->up, loop, &f->conf, NULL, -1, &f->bufs, CK_DATA_OFF, CK_DATA, 0, CK_HDRS),
        0);
    f->up.no_pool = 1;
    f->spec.up = &f->up;
    f->spec.backend = 0;
    f->spec.head = head;
    f->spec.request = f->req;
    f->spec.request_len =
        (size_t)check_build_request(f->req, sizeof(f->req), head, "/v1/models", host, port, 0, "k");
    f->spec.expect = expect;
    f->spec.n_expect = 2;
    f->spec.timeout_ms = timeout_ms;
    assert_int_equal(check_init(&f->ck, loop, &f->spec, on_done, &f->run), 0);
}

/* Runs one check to its report. */
static void ckfx_check(struct ckfx *f, uv_loop_t *loop)
{
    memset(&f->run, 0, sizeof(f->run));
    assert_int_equal(check_start(&f->ck), 0);
    assert_int_equal(check_start(&f->ck), -EBUSY);
    /* The result is never reported from inside check_start. */
    assert_int_equal(f->run.calls, 0);
    while (f->run.calls == 0 && uv_run(loop, UV_RUN_ONCE))
        ;
    assert_int_equal(f->run.calls, 1);
    assert_false(check_running(&f->ck));
}

/* Closes the check and the client, then everything else on the loop, and the loop. */
static void ckfx_free(struct ckfx *f, uv_loop_t *loop)
{
    check_close(&f->ck);
    upstream_drain(&f->up);
    uv_run(loop, UV_RUN_NOWAIT);
    /* a check never leaves a connection behind, pooled or not */
    assert_int_equal(f->up.n_conns, 0);
    uv_walk(loop, close_walk, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    upstream_free(&f->up);
    bufpool_free(&f->bufs);
    assert_int_equal(uv_loop_close(loop), 0);
}

/* Runs one check against 127.0.0.1:port (or the server when srv is set) and returns its result. */
static void run_check(const char *reply, int use_srv, uint16_t port, uint64_t timeout_ms, int head,
                      struct run *r, char *got, size_t got_len)
{
    uv_loop_t loop;
    struct srv srv;
    struct ckfx f;

    assert_int_equal(uv_loop_init(&loop), 0);
    if (use_srv) {
        srv_start(&loop, &srv, reply);
        port = (uint16_t)srv.port;
    }
    ckfx_init(&f, &loop, "127.0.0.1", port, timeout_ms, head);
    ckfx_check(&f, &loop);
    *r = f.run;
    if (got && use_srv)
        snprintf(got, got_len, "%s", srv.got);
    ckfx_free(&f, &loop);
}

static void test_check_pass(void **state)
{
    struct run r;
    char got[1024];

    run_check("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 1, 0, 2000, 0, &r, got,
              sizeof(got));
    assert_true(r.res.ok);
    assert_int_equal(r.res.status, 200);
    assert_int_equal(r.res.why, REASON_CHECK_OK);
    assert_true(r.res.dur_us < 2000000);
    assert_non_null(strstr(got, "GET /v1/models HTTP/1.1\r\n"));
    assert_non_null(strstr(got, "\r\nAuthorization: Bearer k\r\n"));
    assert_non_null(strstr(got, "\r\nUser-Agent: aigw-health\r\n"));
}

static void test_check_head_without_length(void **state)
{
    struct run r;

    /* A HEAD answer announces a body it doesn't send: the status line is all that counts. */
    run_check("HTTP/1.1 204 No Content\r\nContent-Length: 100\r\n\r\n", 1, 0, 2000, 1, &r, NULL, 0);
    assert_true(r.res.ok);
    assert_int_equal(r.res.status, 204);
}

static void test_check_bad_status(void **state)
{
    struct run r;

    run_check("HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", 1, 0, 2000, 0, &r, NULL, 0);
    assert_false(r.res.ok);
    assert_int_equal(r.res.status, 503);
    assert_int_equal(r.res.why, REASON_CHECK_STATUS);
    assert_non_null(strstr(r.res.detail, "503"));
}

static void test_check_garbage(void **state)
{
    struct run r;

    run_check("SSH-2.0-OpenSSH_9.2\r\n\r\n", 1, 0, 2000, 0, &r, NULL, 0);
    assert_false(r.res.ok);
    assert_int_equal(r.res.why, REASON_CHECK_PROTO);
    assert_int_equal(r.res.status, -EBADMSG);
}

static void test_check_timeout(void **state)
{
    struct run r;

    run_check(NULL, 1, 0, 150, 0, &r, NULL, 0);
    assert_false(r.res.ok);
    assert_int_equal(r.res.why, REASON_CHECK_TIMEOUT);
    assert_int_equal(r.res.status, -ETIMEDOUT);
    assert_true(r.res.dur_us >= 140000);
    assert_non_null(strstr(r.res.detail, "waiting for the response"));
}

static void test_check_refused(void **state)
{
    struct run r;
    uv_loop_t loop;
    struct srv srv;
    uint16_t port;

    /* Find a free port, then close it so nothing listens there. */
    assert_int_equal(uv_loop_init(&loop), 0);
    srv_start(&loop, &srv, NULL);
    port = (uint16_t)srv.port;
    uv_close((uv_handle_t *)&srv.tcp, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);

    run_check(NULL, 0, port, 2000, 0, &r, NULL, 0);
    assert_false(r.res.ok);
    assert_int_equal(r.res.why, REASON_CHECK_CONNECT);
    assert_int_equal(r.res.status, -ECONNREFUSED);
    assert_non_null(strstr(r.res.detail, "connect refused (127.0.0.1:"));
}

/* A name with two addresses, the first refusing: the check goes through the upstream client's
 * resolver and address list as traffic does. It tries the next address rather than failing on
 * the first, starts later checks at the address that worked, and looks the name up once (at
 * start; again only on the workers' schedule), not once per check. */
static void test_check_uses_the_upstream_resolver(void **state)
{
    uv_loop_t loop;
    struct srv srv;
    struct ckfx f;

    assert_int_equal(uv_loop_init(&loop), 0);
    srv_start(&loop, &srv, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    gai_calls = 0;
    ckfx_init(&f, &loop, TWO_ADDR_HOST, (uint16_t)srv.port, 2000, 0);
    for (int i = 0; i < 3; i++) {
        ckfx_check(&f, &loop);
        if (!f.run.res.ok)
            fail_msg("check %d: %s", i, f.run.res.detail);
        assert_int_equal(f.run.res.status, 200);
        assert_int_equal(f.up.backends[0].n_addrs, 2);
        assert_int_equal(f.up.backends[0].addr_cur, 1); /* 127.0.0.1: the one that answered */
        assert_int_equal(f.ck.rq.peer, 1);
    }
    assert_int_equal(gai_calls, 1);
    assert_non_null(strstr(srv.got, "Host: " TWO_ADDR_HOST ":"));
    /* each check on a connection of its own, none kept */
    assert_int_equal(srv.conns, 3);
    ckfx_free(&f, &loop);
}

/* A name that does not resolve: the resolver's own message, as a worker's 502 has it. */
static void test_check_unresolvable(void **state)
{
    uv_loop_t loop;
    struct ckfx f;

    assert_int_equal(uv_loop_init(&loop), 0);
    ckfx_init(&f, &loop, "nonexistent.invalid", 9, 2000, 0);
    ckfx_check(&f, &loop);
    assert_false(f.run.res.ok);
    assert_int_equal(f.run.res.why, REASON_CHECK_CONNECT);
    assert_int_equal(f.run.res.status, -EHOSTUNREACH);
    assert_non_null(strstr(f.run.res.detail, "cannot resolve nonexistent.invalid"));
    assert_false(f.run.res.local);
    ckfx_free(&f, &loop);
}

static void test_tls_client_init_errors(void **state)
{
    struct tls_client t;
    char *err = NULL;

    /* A missing CA file is named with the system's reason. */
    assert_int_not_equal(tls_client_init(&t, "localhost", "/nonexistent/ca.pem", 1, &err), 0);
    assert_non_null(err);
    assert_non_null(strstr(err, "/nonexistent/ca.pem"));
    assert_non_null(strstr(err, "No such file"));
    free(err);
    err = NULL;

    /* A file that holds no certificate gets mbedTLS's reason. */
    assert_int_not_equal(tls_client_init(&t, "localhost", "/dev/null", 1, &err), 0);
    assert_non_null(err);
    assert_non_null(strstr(err, "/dev/null"));
    free(err);
    err = NULL;

    /* Without verification no CA file is read at all. */
    assert_int_equal(tls_client_init(&t, "localhost", "/nonexistent/ca.pem", 0, &err), 0);
    assert_null(err);
    assert_string_equal(t.sni, "localhost");
    assert_false(t.has_session);
    tls_client_free(&t);
}

static void test_tls_strerror(void **state)
{
    char buf[256];

    assert_non_null(
        strstr(tls_strerror(NULL, MBEDTLS_ERR_SSL_FATAL_ALERT_MESSAGE, buf, sizeof(buf)), "alert"));
    assert_string_equal(tls_strerror(NULL, TLS_WANT_READ, buf, sizeof(buf)),
                        "TLS operation would block");
}

/* The checker process itself, checks off, with the workers' side simulated through the shm
 * accessors the workers use: what it publishes for passive, auth, error-ratio and breaker
 * events, operator commands and slow start. */
enum { HP_PAS = 0, HP_AUTH, HP_ERR, HP_BRK, HP_N };

static pid_t hp_child = -1, hp_server = -1;

static int hp_teardown(void **state)
{
    int st;

    if (hp_child > 0) {
        kill(hp_child, SIGKILL);
        waitpid(hp_child, &st, 0);
        hp_child = -1;
    }
    if (hp_server > 0) {
        kill(hp_server, SIGKILL);
        waitpid(hp_server, &st, 0);
        hp_server = -1;
    }
    return 0;
}

/* Field of backend b: 0 state, 1 breaker, 2 effective weight, 3 reason. */
static struct shm_health hp_rec(const struct shm *shm, uint32_t b)
{
    struct shm_backend_view v;

    shm_backend_view(shm, b, &v);
    return *v.h;
}

static uint32_t hp_get(const struct shm *shm, uint32_t b, int field)
{
    struct shm_health h = hp_rec(shm, b);

    switch (field) {
    case 0:
        return h.state;
    case 1:
        return h.breaker;
    case 2:
        return h.weight_eff;
    default:
        return h.reason;
    }
}

/* Waits up to ms for the field to read want; returns the time it took (ms) or -1. */
static int hp_wait(const struct shm *shm, uint32_t b, int field, uint32_t want, int ms)
{
    uint64_t t0 = time_mono_ms();

    while (hp_get(shm, b, field) != want) {
        if (time_mono_ms() - t0 > (uint64_t)ms)
            return -1;
        usleep(2000);
    }
    return (int)(time_mono_ms() - t0);
}

static void hp_ok(struct shm *shm, uint32_t w, uint32_t b, int n)
{
    for (int i = 0; i < n; i++)
        shm_wb_record_ok(shm, w, b, time_mono_ns(), 1000000);
}

static void hp_fail(struct shm *shm, uint32_t w, uint32_t b, int n)
{
    for (int i = 0; i < n; i++)
        shm_wb_record_fail(shm, w, b, time_mono_ns());
}

/* A trial request, as a worker does one: admitted to it (shm_admit, shm_trial_acquire), its
 * outcome recorded in the epoch it was admitted in. */
static void hp_trial(struct shm *shm, uint32_t w, uint32_t b, int ok)
{
    struct shm_backend_view v;
    uint32_t trials = 0;

    shm_backend_view(shm, b, &v);
    assert_int_equal(shm_admit(&v, time_mono_ns(), &trials), SHM_ADMIT_TRIAL);
    assert_true(shm_trial_acquire(shm, w, b, (int32_t)trials));
    if (ok)
        hp_ok(shm, w, b, 1);
    else
        hp_fail(shm, w, b, 1);
    shm_trial_outcome(shm, b, v.h->epoch, ok);
    shm_trial_release(shm, w, b);
}

/* What a worker may send to b now. */
static enum shm_admit hp_admit(const struct shm *shm, uint32_t b)
{
    struct shm_backend_view v;
    uint32_t trials = 0;

    shm_backend_view(shm, b, &v);
    return shm_admit(&v, time_mono_ns(), &trials);
}

/* Every worker slot's request, byte and in-flight counters of every backend are still 0. */
static void hp_no_traffic(const struct shm *shm, uint32_t workers, uint32_t backends)
{
    for (uint32_t w = 0; w < workers; w++)
        for (uint32_t b = 0; b < backends; b++) {
            struct shm_wb *wb = shm_wb(shm, w, b);
            assert_int_equal(atomic_load(&wb->requests), 0);
            assert_int_equal(atomic_load(&wb->active), 0);
            assert_int_equal(atomic_load(&wb->bytes_in), 0);
            assert_int_equal(atomic_load(&wb->bytes_out), 0);
        }
}

static void test_process_live_evaluation(void **state)
{
    static const char *names[HP_N] = {"pas", "auth", "err", "brk"};
    struct conf_pool pools[2];
    struct conf_backend be[HP_N];
    struct conf conf;
    struct shm shm;
    int st, t;

    memset(pools, 0, sizeof(pools));
    memset(be, 0, sizeof(be));
    memset(&conf, 0, sizeof(conf));
    /* pool "live": passive detection and error ratio; pool "brk": breaker only */
    snprintf(pools[0].name, sizeof(pools[0].name), "live");
    pools[0].check_interval_ms = 1000;
    pools[0].degraded_error_pct = 50;
    pools[0].degraded_weight_pct = 50;
    snprintf(pools[1].name, sizeof(pools[1].name), "brk");
    pools[1].check_interval_ms = 1000;
    pools[1].breaker_failures = 3;
    pools[1].breaker_open_for_ms = 300;
    pools[1].breaker_open_max_ms = 1000;
    pools[1].breaker_successes = 2;
    pools[1].breaker_half_open_calls = 1;
    for (int i = 0; i < HP_N; i++) {
        snprintf(be[i].name, sizeof(be[i].name), "%s", names[i]);
        be[i].pool = i == HP_BRK;
        be[i].weight = 10;
        be[i].max_fails = i == HP_PAS || i == HP_AUTH ? 3 : 0;
        be[i].fail_timeout_ms = 500;
    }
    be[HP_PAS].slowstart_ms = 400;
    conf.pools = pools;
    conf.n_pools = 2;
    conf.backends = be;
    conf.n_backends = HP_N;

    assert_int_equal(shm_create(&shm, HP_N, 2, 1), 0);
    for (uint32_t b = 0; b < HP_N; b++)
        shm_backend_init(&shm, b, 10, 0);
    hp_child = fork();
    assert_true(hp_child >= 0);
    if (hp_child == 0)
        _exit(health_main(&conf, &shm));

    /* passive: max_fails failures from two workers together mark it DOWN; the workers stop
     * sending to it at the failure that makes max_fails, the checker then turns it DOWN */
    assert_true(hp_wait(&shm, HP_PAS, 0, BACKEND_UP, 0) >= 0);
    usleep(60000); /* the checker's first publication, with its thresholds */
    hp_fail(&shm, 0, HP_PAS, 2);
    assert_int_equal(hp_wait(&shm, HP_PAS, 0, BACKEND_DOWN, 150), -1);
    assert_int_equal(hp_admit(&shm, HP_PAS), SHM_ADMIT_ALL);
    hp_fail(&shm, 1, HP_PAS, 1);
    assert_int_equal(hp_admit(&shm, HP_PAS), SHM_ADMIT_NONE);
    assert_true(hp_wait(&shm, HP_PAS, 0, BACKEND_DOWN, 1000) >= 0);
    assert_int_equal(hp_get(&shm, HP_PAS, 3), REASON_PASSIVE);
    /* ...and with checks off, after fail_timeout, one live success (a trial) brings it back,
     * weight from ~0 */
    assert_int_equal(hp_admit(&shm, HP_PAS), SHM_ADMIT_NONE);
    usleep(520000);
    hp_trial(&shm, 1, HP_PAS, 1);
    assert_int_equal(hp_admit(&shm, HP_PAS), SHM_ADMIT_ALL);
    assert_true(hp_wait(&shm, HP_PAS, 0, BACKEND_UP, 1000) >= 0);
    assert_int_equal(hp_get(&shm, HP_PAS, 3), REASON_LIVE_OK);
    assert_true(hp_get(&shm, HP_PAS, 2) < 10);
    t = hp_wait(&shm, HP_PAS, 2, 10, 1000);
    assert_true(t >= 200 && t <= 600);
    /* old failures don't count again after it came back */
    hp_fail(&shm, 0, HP_PAS, 2);
    assert_int_equal(hp_wait(&shm, HP_PAS, 0, BACKEND_DOWN, 150), -1);

    /* auth: one 401/403 is enough */
    atomic_store(&shm_wb(&shm, 1, HP_AUTH)->auth_failures, 1);
    assert_true(hp_wait(&shm, HP_AUTH, 0, BACKEND_DOWN, 1000) >= 0);
    assert_int_equal(hp_get(&shm, HP_AUTH, 3), REASON_AUTH);
    atomic_store(&shm_wb(&shm, 1, HP_AUTH)->auth_failures, 2); /* a failed trial */
    hp_ok(&shm, 0, HP_AUTH, 1);
    assert_true(hp_wait(&shm, HP_AUTH, 0, BACKEND_UP, 1000) >= 0);
    /* the 401 from before the success is not news */
    assert_int_equal(hp_wait(&shm, HP_AUTH, 0, BACKEND_DOWN, 150), -1);

    /* error ratio: 8 of 12 failed in the window: DEGRADED at half weight; then it recovers */
    hp_ok(&shm, 0, HP_ERR, 4);
    hp_fail(&shm, 1, HP_ERR, 8);
    assert_true(hp_wait(&shm, HP_ERR, 0, BACKEND_DEGRADED, 1000) >= 0);
    assert_int_equal(hp_get(&shm, HP_ERR, 3), REASON_ERROR_RATIO);
    assert_true(hp_wait(&shm, HP_ERR, 2, 5, 200) >= 0);
    hp_ok(&shm, 0, HP_ERR, 60);
    assert_true(hp_wait(&shm, HP_ERR, 0, BACKEND_UP, 1000) >= 0);
    assert_true(hp_wait(&shm, HP_ERR, 2, 10, 200) >= 0);

    /* breaker: 3 consecutive failures open it; a success in between starts the count again */
    hp_fail(&shm, 0, HP_BRK, 2);
    hp_ok(&shm, 1, HP_BRK, 1);
    hp_fail(&shm, 1, HP_BRK, 2);
    assert_int_equal(hp_wait(&shm, HP_BRK, 1, BREAKER_OPEN, 150), -1);
    hp_fail(&shm, 0, HP_BRK, 1);
    assert_int_equal(hp_admit(&shm, HP_BRK), SHM_ADMIT_NONE); /* at once */
    assert_true(hp_wait(&shm, HP_BRK, 1, BREAKER_OPEN, 1000) >= 0);
    assert_int_equal(hp_rec(&shm, HP_BRK).breaker_open_ns, 300000000ULL);
    /* the breaker is not the backend's health */
    assert_int_equal(hp_get(&shm, HP_BRK, 0), BACKEND_UP);
    t = hp_wait(&shm, HP_BRK, 1, BREAKER_HALF_OPEN, 1000);
    assert_true(t >= 200 && t <= 450);
    /* a failed trial re-opens it for twice as long */
    hp_trial(&shm, 1, HP_BRK, 0);
    assert_int_equal(hp_admit(&shm, HP_BRK), SHM_ADMIT_NONE); /* at once */
    assert_true(hp_wait(&shm, HP_BRK, 1, BREAKER_OPEN, 1000) >= 0);
    assert_int_equal(hp_rec(&shm, HP_BRK).breaker_open_ns, 600000000ULL);
    t = hp_wait(&shm, HP_BRK, 1, BREAKER_HALF_OPEN, 1500);
    assert_true(t >= 500 && t <= 750);
    /* requests that were not trials (begun before it opened) decide nothing */
    hp_ok(&shm, 0, HP_BRK, 3);
    assert_int_equal(hp_wait(&shm, HP_BRK, 1, BREAKER_CLOSED, 150), -1);
    /* two trial successes close it: admission for all at the second, then the state */
    hp_trial(&shm, 0, HP_BRK, 1);
    assert_int_equal(hp_wait(&shm, HP_BRK, 1, BREAKER_CLOSED, 150), -1);
    hp_trial(&shm, 1, HP_BRK, 1);
    assert_int_equal(hp_admit(&shm, HP_BRK), SHM_ADMIT_ALL);
    assert_true(hp_wait(&shm, HP_BRK, 1, BREAKER_CLOSED, 1000) >= 0);
    /* operator commands */
    shm_backend_breaker_cmd(&shm, HP_BRK, BREAKER_CMD_OPEN);
    assert_true(hp_wait(&shm, HP_BRK, 1, BREAKER_OPEN, 1000) >= 0);
    shm_backend_breaker_cmd(&shm, HP_BRK, BREAKER_CMD_RESET);
    assert_true(hp_wait(&shm, HP_BRK, 1, BREAKER_CLOSED, 1000) >= 0);
    assert_int_equal(atomic_load(&shm_backend(&shm, HP_BRK)->breaker_cmd_done),
                     atomic_load(&shm_backend(&shm, HP_BRK)->breaker_cmd_seq));

    /* it stops cleanly on SIGTERM */
    assert_int_equal(kill(hp_child, SIGTERM), 0);
    assert_int_equal(waitpid(hp_child, &st, 0), hp_child);
    hp_child = -1;
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
    shm_destroy(&shm);
}

/* With checks on, a passive DOWN is ended by `rise` passing checks only (a live success does
 * not), at the check_downinter cadence. */
static void test_process_passive_with_checks(void **state)
{
    struct conf_pool pool;
    struct conf_backend be;
    struct conf conf;
    struct shm shm;
    struct srv srv;
    uv_loop_t loop;
    uint64_t t0;
    int st, t;

    /* the backend: a loopback server in its own process that always answers 200 */
    assert_int_equal(uv_loop_init(&loop), 0);
    srv_start(&loop, &srv, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    hp_server = fork();
    assert_true(hp_server >= 0);
    if (hp_server == 0) {
        uv_run(&loop, UV_RUN_DEFAULT);
        _exit(0);
    }

    memset(&pool, 0, sizeof(pool));
    memset(&be, 0, sizeof(be));
    memset(&conf, 0, sizeof(conf));
    snprintf(pool.name, sizeof(pool.name), "p");
    pool.check = 1;
    pool.check_expect[0] = 200;
    pool.n_check_expect = 1;
    pool.check_interval_ms = 100;
    pool.check_fastinter_ms = 50;
    pool.check_downinter_ms = 400;
    pool.check_timeout_ms = 500;
    pool.rise = 2;
    pool.fall = 2;
    snprintf(be.name, sizeof(be.name), "b");
    snprintf(be.url.host, sizeof(be.url.host), "127.0.0.1");
    be.url.port = (uint16_t)srv.port;
    be.weight = 1;
    be.max_fails = 2;
    be.fail_timeout_ms = 1000;
    conf.pools = &pool;
    conf.n_pools = 1;
    conf.backends = &be;
    conf.n_backends = 1;

    assert_int_equal(shm_create(&shm, 1, 1, 1), 0);
    shm_backend_init(&shm, 0, 1, 0);
    hp_child = fork();
    assert_true(hp_child >= 0);
    if (hp_child == 0)
        _exit(health_main(&conf, &shm));

    /* checks pass and measure the backend */
    t0 = time_mono_ms();
    while (hp_rec(&shm, 0).check_at_ns == 0 && time_mono_ms() - t0 < 1000)
        usleep(2000);
    assert_int_equal(hp_rec(&shm, 0).check_status, 200);
    assert_true(hp_wait(&shm, 0, 0, BACKEND_UP, 0) >= 0);
    /* checks are not traffic: no worker's counters moved (the test's own hp_* calls below
     * record only outcomes) */
    hp_no_traffic(&shm, 1, 1);

    hp_fail(&shm, 0, 0, 2);
    assert_true(hp_wait(&shm, 0, 0, BACKEND_DOWN, 1000) >= 0);
    assert_int_equal(hp_get(&shm, 0, 3), REASON_PASSIVE);
    /* the measure starts afresh once it is back */
    assert_int_equal(hp_rec(&shm, 0).ewma_check_us, 0);
    /* a live success does not end it while checks run... */
    hp_ok(&shm, 0, 0, 1);
    /* ...one passing check does ("until an active check passes"), check_downinter after the
     * last check */
    t = hp_wait(&shm, 0, 0, BACKEND_UP, 2000);
    assert_true(t >= 250 && t <= 1000);
    assert_int_equal(hp_get(&shm, 0, 3), REASON_CHECK_OK);
    assert_true(hp_rec(&shm, 0).ewma_check_us > 0);
    hp_no_traffic(&shm, 1, 1);

    assert_int_equal(kill(hp_child, SIGTERM), 0);
    assert_int_equal(waitpid(hp_child, &st, 0), hp_child);
    hp_child = -1;
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
    shm_destroy(&shm);
    hp_teardown(state);
    uv_walk(&loop, close_walk, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* A check that began before a passive DOWN says nothing of the backend since: only one begun
 * after it brings the backend back. The backend answers checks after 300 ms and they run back
 * to back, so one is under way when the failures come. */
static void test_process_check_begun_before_passive_down(void **state)
{
    struct conf_pool pool;
    struct conf_backend be;
    struct conf conf;
    struct shm shm;
    struct srv srv;
    uv_loop_t loop;
    uint64_t t0;
    int st;

    assert_int_equal(uv_loop_init(&loop), 0);
    srv_start(&loop, &srv, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    srv.delay_ms = 300;
    hp_server = fork();
    assert_true(hp_server >= 0);
    if (hp_server == 0) {
        uv_run(&loop, UV_RUN_DEFAULT);
        _exit(0);
    }

    memset(&pool, 0, sizeof(pool));
    memset(&be, 0, sizeof(be));
    memset(&conf, 0, sizeof(conf));
    snprintf(pool.name, sizeof(pool.name), "p");
    pool.check = 1;
    pool.check_expect[0] = 200;
    pool.n_check_expect = 1;
    pool.check_interval_ms = 100;
    pool.check_downinter_ms = 1500;
    pool.check_timeout_ms = 2000;
    pool.rise = 1;
    pool.fall = 1;
    snprintf(be.name, sizeof(be.name), "b");
    snprintf(be.url.host, sizeof(be.url.host), "127.0.0.1");
    be.url.port = (uint16_t)srv.port;
    be.weight = 1;
    be.max_fails = 2;
    be.fail_timeout_ms = 10000;
    conf.pools = &pool;
    conf.n_pools = 1;
    conf.backends = &be;
    conf.n_backends = 1;

    assert_int_equal(shm_create(&shm, 1, 1, 1), 0);
    shm_backend_init(&shm, 0, 1, 0);
    hp_child = fork();
    assert_true(hp_child >= 0);
    if (hp_child == 0)
        _exit(health_main(&conf, &shm));

    /* the first check is done: the next one is under way at once */
    t0 = time_mono_ms();
    while (hp_rec(&shm, 0).check_at_ns == 0 && time_mono_ms() - t0 < 2000)
        usleep(2000);
    assert_int_equal(hp_rec(&shm, 0).check_status, 200);
    hp_fail(&shm, 0, 0, 2);
    assert_true(hp_wait(&shm, 0, 0, BACKEND_DOWN, 500) >= 0);
    /* the check under way passes within 300 ms: it must not end the DOWN... */
    assert_int_equal(hp_wait(&shm, 0, 0, BACKEND_UP, 700), -1);
    /* ...the next one (check_downinter after it began) does */
    assert_true(hp_wait(&shm, 0, 0, BACKEND_UP, 2500) >= 0);
    assert_int_equal(hp_get(&shm, 0, 3), REASON_CHECK_OK);

    assert_int_equal(kill(hp_child, SIGTERM), 0);
    assert_int_equal(waitpid(hp_child, &st, 0), hp_child);
    hp_child = -1;
    shm_destroy(&shm);
    hp_teardown(state);
    uv_walk(&loop, close_walk, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rf_fall_after_consecutive_failures),
        cmocka_unit_test(test_rf_pass_resets_fail_streak),
        cmocka_unit_test(test_rf_rise_after_consecutive_passes),
        cmocka_unit_test(test_rf_full_cycle),
        cmocka_unit_test(test_rf_one_and_zero_thresholds),
        cmocka_unit_test(test_status_expected),
        cmocka_unit_test(test_build_request),
        cmocka_unit_test(test_ewma_first_sample_and_smoothing),
        cmocka_unit_test(test_window_empty_and_filling),
        cmocka_unit_test(test_window_slides),
        cmocka_unit_test(test_window_after_stall_and_reset),
        cmocka_unit_test(test_check_pass),
        cmocka_unit_test(test_check_head_without_length),
        cmocka_unit_test(test_check_bad_status),
        cmocka_unit_test(test_check_garbage),
        cmocka_unit_test(test_check_timeout),
        cmocka_unit_test(test_check_refused),
        cmocka_unit_test(test_check_uses_the_upstream_resolver),
        cmocka_unit_test(test_check_unresolvable),
        cmocka_unit_test(test_tls_client_init_errors),
        cmocka_unit_test(test_tls_strerror),
        cmocka_unit_test_teardown(test_process_live_evaluation, hp_teardown),
        cmocka_unit_test_teardown(test_process_passive_with_checks, hp_teardown),
        cmocka_unit_test_teardown(test_process_check_begun_before_passive_down, hp_teardown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
