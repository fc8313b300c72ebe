/* Unit tests of core/upstream.c against a loopback server socket of the test's own: what an
 * exchange reports when its connection breaks before or after the request was written, that
 * the module never sends a request a second time by itself, and what an abort leaves. */
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cmocka.h>

#include "core/conf.h"
#include "core/upstream.h"
#include "shm/shm.h"

#define HDRS     32
#define DATA     4096
#define HDRS_OFF 64
#define DATA_OFF (HDRS_OFF + HDRS * sizeof(struct proxy_hdr))

static const char request[] = "POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\n"
                              "Content-Length: 2\r\n\r\n{}";
static const char answer[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

struct fx {
    uv_loop_t loop;
    struct conf *conf;
    struct shm shm;
    struct bufpool bufs;
    struct upstream up;
    int lfd;   /* the backend's listening socket */
    int sfd;   /* the backend's side of the current connection, or -1 */
    int conns; /* connections the backend accepted */
    char dir[64];
};

/* One exchange as the client side sees it. */
struct ex {
    struct upstream_req rq;
    int ended;
    enum upstream_err err;
    int status;
};

static int op_build_head(void *ctx, const struct conf_backend *be, char *buf, size_t cap)
{
    (void)ctx;
    (void)be;
    size_t n = sizeof(request) - 1 - 2; /* the body goes as rq.body */
    assert_true(n <= cap);
    memcpy(buf, request, n);
    return (int)n;
}

static int op_on_head(void *ctx, const struct upstream_resp *r, const char *body, size_t n,
                      int complete)
{
    struct ex *x = ctx;
    (void)body;
    (void)n;
    (void)complete;
    x->status = r->status;
    return 0;
}

static int op_on_body(void *ctx, const char *p, size_t n, int complete)
{
    (void)ctx;
    (void)p;
    (void)n;
    (void)complete;
    return 0;
}

static void op_on_end(void *ctx, enum upstream_err err)
{
    struct ex *x = ctx;
    x->ended = 1;
    x->err = err;
}

static const struct upstream_ops ops = {op_build_head, op_on_head, op_on_body, op_on_end};

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    char path[128], text[512];
    char *err = NULL;

    assert_non_null(f);
    signal(SIGPIPE, SIG_IGN); /* as in a worker: a write to a reset socket says EPIPE */
    f->sfd = -1;
    f->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    assert_true(f->lfd >= 0);
    assert_int_equal(bind(f->lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(f->lfd, 8), 0);
    assert_int_equal(getsockname(f->lfd, (struct sockaddr *)&sa, &sl), 0);

    strcpy(f->dir, "/tmp/aigw-test-upstream-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    snprintf(path, sizeof(path), "%s/t.ini", f->dir);
    snprintf(text, sizeof(text),
             "[listen main]\nbind = 127.0.0.1:8080\n[pool p]\ncheck = no\n"
             "[backend a]\nurl = http://127.0.0.1:%u/v1\n",
             ntohs(sa.sin_port));
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs(text, fp);
    fclose(fp);
    if (conf_load(path, &f->conf, &err) != 0)
        fail_msg("config: %s", err);
    unlink(path);
    rmdir(f->dir);

    assert_int_equal(uv_loop_init(&f->loop), 0);
    assert_int_equal(shm_create(&f->shm, 1, 1, 1), 0);
    bufpool_init(&f->bufs, DATA_OFF + DATA, 16);
    assert_int_equal(upstream_init(&f->up, &f->loop, f->conf, &f->shm, 0, &f->bufs, DATA_OFF, DATA,
                                   HDRS_OFF, HDRS),
                     0);
    *state = f;
    return 0;
}

static void server_close(struct fx *f, int rst);

static int teardown(void **state)
{
    struct fx *f = *state;
    server_close(f, 0);
    upstream_drain(&f->up);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    upstream_free(&f->up);
    assert_int_equal(uv_loop_close(&f->loop), 0);
    bufpool_free(&f->bufs);
    shm_destroy(&f->shm);
    conf_free(f->conf);
    close(f->lfd);
    free(f);
    return 0;
}

/* The backend side: accept a connection if one is waiting. */
static void server_accept(struct fx *f)
{
    int fd = accept4(f->lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) {
        assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
        return;
    }
    assert_int_equal(f->sfd, -1); /* one connection at a time in these tests */
    struct timeval tv = {2, 0};   /* a blocking read must not hang a test */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    f->sfd = fd;
    f->conns++;
}

/* Closes the backend's side of the connection: a FIN, or a RST (SO_LINGER 0). */
static void server_close(struct fx *f, int rst)
{
    if (f->sfd < 0)
        return;
    if (rst) {
        struct linger lg = {1, 0};
        setsockopt(f->sfd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    close(f->sfd);
    f->sfd = -1;
}

/* Runs the loop (and the backend's accept) until the backend holds the whole request. */
static void server_read_request(struct fx *f)
{
    char buf[1024];
    size_t got = 0;

    for (int i = 0; i < 2000 && got < sizeof(request) - 1; i++) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        if (f->sfd < 0) {
            server_accept(f);
            continue;
        }
        ssize_t n = recv(f->sfd, buf + got, sizeof(buf) - got, MSG_DONTWAIT);
        if (n > 0)
            got += (size_t)n;
        else if (n == 0)
            fail_msg("the connection closed before the request arrived");
        else
            usleep(1000);
    }
    assert_int_equal(got, sizeof(request) - 1);
    assert_memory_equal(buf, request, got);
}

static void run_until_ended(struct fx *f, struct ex *x)
{
    for (int i = 0; i < 2000 && !x->ended; i++) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        if (!x->ended)
            usleep(1000);
    }
    assert_true(x->ended);
}

static int ex_start(struct fx *f, struct ex *x)
{
    memset(x, 0, sizeof(*x));
    x->rq.ops = &ops;
    x->rq.ctx = x;
    x->rq.body = "{}";
    x->rq.body_len = 2;
    x->rq.backend = 0;
    return upstream_start(&f->up, &x->rq);
}

/* A complete exchange that leaves its connection in the pool. */
static void exchange_ok(struct fx *f)
{
    struct ex x;
    assert_int_equal(ex_start(f, &x), 0);
    server_read_request(f);
    assert_int_equal(send(f->sfd, answer, sizeof(answer) - 1, 0), (ssize_t)sizeof(answer) - 1);
    run_until_ended(f, &x);
    assert_int_equal(x.err, UPSTREAM_OK);
    assert_int_equal(x.status, 200);
}

/* A pooled connection the backend reset while idle, found on the first write of the next
 * request: UPSTREAM_ESTALE (never seen: safe to send elsewhere), no new connection. */
static void test_stale_before_write(void **state)
{
    struct fx *f = *state;
    struct ex x;

    exchange_ok(f);
    assert_int_equal(f->conns, 1);
    server_close(f, 1); /* on loopback the RST is there before the next call */
    int r = ex_start(f, &x);
    if (r == 0)
        run_until_ended(f, &x);
    else
        x.err = (enum upstream_err) - r;
    assert_int_equal(x.err, UPSTREAM_ESTALE);
    /* nothing was sent again on a new connection */
    for (int i = 0; i < 20; i++) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        server_accept(f);
    }
    assert_int_equal(f->conns, 1);

    /* no_reuse: a new connection even while another one is pooled */
    exchange_ok(f);
    assert_int_equal(f->conns, 2);
    struct ex y;
    memset(&y, 0, sizeof(y));
    y.rq.ops = &ops;
    y.rq.ctx = &y;
    y.rq.body = "{}";
    y.rq.body_len = 2;
    y.rq.no_reuse = 1;
    server_close(f, 0); /* the pooled one goes; the backend takes the new one */
    assert_int_equal(upstream_start(&f->up, &y.rq), 0);
    server_read_request(f);
    assert_int_equal(f->conns, 3);
    assert_int_equal(send(f->sfd, answer, sizeof(answer) - 1, 0), (ssize_t)sizeof(answer) - 1);
    run_until_ended(f, &y);
    assert_int_equal(y.err, UPSTREAM_OK);
}

/* The backend read the whole request on a reused connection, then closed it (FIN or RST): it
 * may be generating the answer. UPSTREAM_ERESET, and the request is not sent again. */
static void test_reset_after_write(void **state)
{
    struct fx *f = *state;

    for (int rst = 0; rst <= 1; rst++) {
        struct ex x;
        int before;

        exchange_ok(f);
        before = f->conns;
        assert_int_equal(ex_start(f, &x), 0);
        server_read_request(f); /* on the pooled connection: no new one */
        assert_int_equal(f->conns, before);
        server_close(f, rst);
        run_until_ended(f, &x);
        assert_int_equal(x.err, UPSTREAM_ERESET);
        for (int i = 0; i < 50; i++) {
            uv_run(&f->loop, UV_RUN_NOWAIT);
            server_accept(f);
            usleep(1000);
        }
        assert_int_equal(f->conns, before);
    }
}

/* A status line below 100 is no interim answer to wait past: the exchange fails at once as a
 * garbled response (a 502 and a failure of the backend's), not after the head timeout. */
static void test_status_below_100(void **state)
{
    struct fx *f = *state;
    static const char bad[] = "HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok";
    struct ex x;

    assert_int_equal(ex_start(f, &x), 0);
    server_read_request(f);
    assert_int_equal(send(f->sfd, bad, sizeof(bad) - 1, 0), (ssize_t)sizeof(bad) - 1);
    run_until_ended(f, &x);
    assert_int_equal(x.err, UPSTREAM_EPROTO);
}

/* 204 and 304 answers have no body whatever framing headers they carry (a 304 may well give
 * the Content-Length of what it stands for): the exchange ends with the head, and the
 * connection serves the next request. */
static void test_no_body_statuses(void **state)
{
    struct fx *f = *state;
    static const char *const answers[] = {
        "HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n",
        "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
        "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
    };
    static const int statuses[] = {304, 204, 204};

    exchange_ok(f);
    int before = f->conns;
    for (size_t i = 0; i < sizeof(answers) / sizeof(answers[0]); i++) {
        struct ex x;
        size_t n = strlen(answers[i]);

        assert_int_equal(ex_start(f, &x), 0);
        server_read_request(f);
        assert_int_equal(send(f->sfd, answers[i], n, 0), (ssize_t)n);
        run_until_ended(f, &x);
        assert_int_equal(x.err, UPSTREAM_OK);
        assert_int_equal(x.status, statuses[i]);
    }
    assert_int_equal(f->conns, before); /* each went on the pooled connection */
}

/* A client that leaves while its request's connection is still being set up: no byte went
 * out, so the connection goes on into the pool and serves the next request. */
static void test_abort_while_connecting(void **state)
{
    struct fx *f = *state;
    struct ex x;

    assert_int_equal(ex_start(f, &x), 0);
    upstream_abort(&x.rq);
    assert_null(x.rq.conn);
    for (int i = 0; i < 2000 && f->up.backends[0].n_idle == 0; i++) {
        uv_run(&f->loop, UV_RUN_NOWAIT);
        server_accept(f);
        usleep(1000);
    }
    assert_int_equal(f->up.backends[0].n_idle, 1);
    assert_int_equal(f->conns, 1);
    assert_false(x.ended); /* no callback for an aborted exchange */
    exchange_ok(f);        /* on the pooled connection */
    assert_int_equal(f->conns, 1);
}

/* A client that leaves once its request was written: the connection is closed, so that the
 * backend sees it go (and can stop generating), and nothing is pooled. */
static void test_abort_after_write(void **state)
{
    struct fx *f = *state;
    struct ex x;
    char b;

    assert_int_equal(ex_start(f, &x), 0);
    server_read_request(f);
    upstream_abort(&x.rq);
    assert_int_equal(recv(f->sfd, &b, 1, 0), 0); /* the backend's read says: closed */
    uv_run(&f->loop, UV_RUN_NOWAIT);
    assert_int_equal(f->up.backends[0].n_idle, 0);
    assert_false(x.ended);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_stale_before_write, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reset_after_write, setup, teardown),
        cmocka_unit_test_setup_teardown(test_status_below_100, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_body_statuses, setup, teardown),
        cmocka_unit_test_setup_teardown(test_abort_while_connecting, setup, teardown),
        cmocka_unit_test_setup_teardown(test_abort_after_write, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
