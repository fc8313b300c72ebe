/* Unit tests of core/alog.c: the access log line is one line of valid JSON (checked with yajl)
 * whatever a client put in its path or model, long fields are cut to fit, numbers and nulls
 * are what was given; and the ring drops (and counts) lines it has no room for. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <yajl/yajl_tree.h>

#include "core/alog.h"

static const char PATH[] = "/v1/chat/completions";

static void line_base(struct alog_line *l)
{
    memset(l, 0, sizeof(*l));
    l->start_ms = 1767323045678; /* 2026-01-02T03:04:05.678Z */
    l->rid = "0123456789abcdef0123456789abcdef";
    l->rid_len = 32;
    l->client = "127.0.0.1";
    l->key = "team-a";
    l->method = "POST";
    l->path = PATH;
    l->path_len = sizeof(PATH) - 1;
    l->model = "gpt-4o";
    l->model_len = 6;
    l->pool = "main";
    l->backend = "b1";
    l->attempts = 2;
    l->status = 200;
    l->bytes_in = 321;
    l->bytes_out = 4567;
    l->tokens_in = 10;
    l->tokens_out = 20;
    l->tokens_cached = 3;
    l->cost_nano = 7500000;
    l->ttfb_us = 12345;
    l->duration_us = 67890;
}

/* Formats l, checks it is one line of JSON, returns the parsed tree (free with yajl_tree_free). */
static yajl_val format_parse(const struct alog_line *l, char *buf)
{
    char err[256];
    int n = alog_format(buf, ALOG_LINE_MAX, l);

    assert_true(n > 0 && n <= ALOG_LINE_MAX);
    assert_int_equal(buf[n - 1], '\n');
    assert_null(memchr(buf, '\n', (size_t)n - 1));
    buf[n] = '\0';
    yajl_val v = yajl_tree_parse(buf, err, sizeof(err));
    if (!v)
        fail_msg("not JSON (%s): %s", err, buf);
    assert_true(YAJL_IS_OBJECT(v));
    return v;
}

static yajl_val field(yajl_val v, const char *name)
{
    const char *path[] = {name, NULL};
    yajl_val f = yajl_tree_get(v, path, yajl_t_any);

    if (!f)
        fail_msg("no field %s", name);
    return f;
}

static void assert_str_field(yajl_val v, const char *name, const char *want)
{
    yajl_val f = field(v, name);

    assert_true(YAJL_IS_STRING(f));
    assert_string_equal(YAJL_GET_STRING(f), want);
}

static void assert_int_field(yajl_val v, const char *name, long long want)
{
    yajl_val f = field(v, name);

    assert_true(YAJL_IS_INTEGER(f));
    assert_int_equal(YAJL_GET_INTEGER(f), want);
}

static void test_fields(void **state)
{
    char buf[ALOG_LINE_MAX + 1];
    struct alog_line l;

    (void)state;
    line_base(&l);
    yajl_val v = format_parse(&l, buf);
    assert_str_field(v, "time", "2026-01-02T03:04:05.678Z");
    assert_str_field(v, "request_id", "0123456789abcdef0123456789abcdef");
    assert_str_field(v, "client", "127.0.0.1");
    assert_str_field(v, "key", "team-a");
    assert_str_field(v, "method", "POST");
    assert_str_field(v, "path", PATH);
    assert_str_field(v, "model", "gpt-4o");
    assert_true(YAJL_IS_NULL(field(v, "model_served")));
    assert_str_field(v, "pool", "main");
    assert_str_field(v, "backend", "b1");
    assert_int_field(v, "attempts", 2);
    assert_int_field(v, "status", 200);
    assert_int_field(v, "bytes_in", 321);
    assert_int_field(v, "bytes_out", 4567);
    assert_int_field(v, "tokens_in", 10);
    assert_int_field(v, "tokens_out", 20);
    assert_int_field(v, "tokens_cached", 3);
    assert_true(YAJL_IS_DOUBLE(field(v, "cost")));
    assert_true(YAJL_GET_DOUBLE(field(v, "cost")) == 0.0075);
    assert_true(YAJL_IS_FALSE(field(v, "partial")));
    assert_true(YAJL_GET_DOUBLE(field(v, "ttfb_ms")) == 12.345);
    assert_true(YAJL_GET_DOUBLE(field(v, "duration_ms")) == 67.89);
    assert_true(YAJL_IS_NULL(field(v, "error")));
    assert_non_null(strstr(buf, "\"cost\":0.0075,"));
    yajl_tree_free(v);
}

/* An early answer: no head, nothing sent, an error code; every unknown is null or 0. */
static void test_nulls(void **state)
{
    char buf[ALOG_LINE_MAX + 1];
    struct alog_line l;

    (void)state;
    memset(&l, 0, sizeof(l));
    l.start_ms = 0;
    l.client = "::1";
    l.status = 408;
    l.err = "request_timeout";
    l.partial = 1;
    l.ttfb_us = -1;
    yajl_val v = format_parse(&l, buf);
    assert_str_field(v, "time", "1970-01-01T00:00:00.000Z");
    const char *nulls[] = {"request_id",   "key",  "method",  "path",   "model",
                           "model_served", "pool", "backend", "ttfb_ms"};
    for (size_t i = 0; i < sizeof(nulls) / sizeof(nulls[0]); i++)
        assert_true(YAJL_IS_NULL(field(v, nulls[i])));
    assert_int_field(v, "status", 408);
    assert_int_field(v, "cost", 0);
    assert_true(YAJL_IS_TRUE(field(v, "partial")));
    assert_str_field(v, "error", "request_timeout");
    yajl_tree_free(v);
}

/* Quotes, backslashes, control bytes, DEL and bytes that are not UTF-8 in a path or model: the
 * line stays one line of valid JSON, UTF-8 passes as it is, the rest is escaped. */
static void test_escaping(void **state)
{
    static const char odd_path[] = "/v1/a\"b\\c\n\r\t\x01\x7f/\xc3\xa9/\xff\xfe/\xe2\x82";
    static const char odd_model[] = "m\"}\n{\"key\":\"sk-evil";
    char buf[ALOG_LINE_MAX + 1];
    struct alog_line l;

    (void)state;
    line_base(&l);
    l.path = odd_path;
    l.path_len = sizeof(odd_path) - 1;
    l.model = odd_model;
    l.model_len = sizeof(odd_model) - 1;
    l.served = "real\tmodel";
    l.served_len = 10;
    yajl_val v = format_parse(&l, buf);
    assert_str_field(v, "path",
                     "/v1/a\"b\\c\n\r\t\x01\x7f/\xc3\xa9/\xef\xbf\xbd\xef\xbf\xbd/"
                     "\xef\xbf\xbd\xef\xbf\xbd");
    assert_str_field(v, "model", odd_model);
    assert_str_field(v, "model_served", "real\tmodel");
    /* the model could not add a field of its own */
    assert_str_field(v, "key", "team-a");
    yajl_tree_free(v);
}

/* Fields longer than their share are cut at a character and end in "...": the line fits. */
static void test_long_fields(void **state)
{
    static char path[8192], model[4096];
    char buf[ALOG_LINE_MAX + 1];
    struct alog_line l;

    (void)state;
    memset(path, '\x01', sizeof(path)); /* 6 bytes each once escaped */
    path[0] = '/';
    for (size_t i = 0; i < sizeof(model); i += 2)
        memcpy(model + i, "\xc3\xa9", 2);
    line_base(&l);
    l.path = path;
    l.path_len = sizeof(path);
    l.model = l.served = model;
    l.model_len = l.served_len = sizeof(model);
    l.rid = path;
    l.rid_len = sizeof(path);
    yajl_val v = format_parse(&l, buf);
    const char *p = YAJL_GET_STRING(field(v, "path"));
    size_t pl = strlen(p);
    assert_true(pl > 100 && pl < 1024);
    assert_string_equal(p + pl - 3, "...");
    const char *m = YAJL_GET_STRING(field(v, "model"));
    size_t ml = strlen(m);
    assert_true(ml > 400 && ml <= 515);
    assert_memory_equal(m + ml - 5, "\xc3\xa9...", 5); /* never half a character */
    assert_int_field(v, "status", 200);
    yajl_tree_free(v);
    /* too small a buffer is refused, never overrun */
    assert_int_equal(alog_format(buf, 64, &l), -ENOSPC);
}

/* The ring: lines go out whole to the target; a line that does not fit is dropped and
 * counted (here in a stand-in for the shm counter), never blocking. A pipe nobody reads fills
 * up: writes stop at EAGAIN and later lines are dropped. */
static void test_ring_drops(void **state)
{
    uv_loop_t loop;
    struct alog a;
    _Atomic uint64_t drops = 0;
    int fds[2];
    char line[1000], got[65536];

    (void)state;
    assert_int_equal(uv_loop_init(&loop), 0);
    assert_int_equal(pipe(fds), 0);
    /* the log writes to "stderr": point fd 2 at the pipe for the test */
    int saved = dup(2);
    assert_int_equal(dup2(fds[1], 2), 2);
    assert_int_equal(alog_open(&a, &loop, ALOG_STDERR, NULL, 4096, &drops), 0);
    dup2(saved, 2);
    close(saved);
    assert_true(a.fd >= 0 && a.fd != 2 && a.pipe);
    memset(line, 'x', sizeof(line));
    line[sizeof(line) - 1] = '\n';
    /* 2 lines stay pending (under half the ring), the third flushes all three */
    alog_append(&a, line, sizeof(line));
    alog_append(&a, line, sizeof(line));
    assert_int_equal(a.head - a.tail, 2000);
    alog_append(&a, line, sizeof(line));
    assert_int_equal(a.head, a.tail);
    ssize_t n = read(fds[0], got, sizeof(got));
    assert_int_equal(n, 3000);
    /* nobody reads: the pipe fills (64 KiB), then the ring, then lines are dropped */
    for (int i = 0; i < 200; i++)
        alog_append(&a, line, sizeof(line));
    assert_true(a.drops > 0);
    assert_int_equal(atomic_load(&drops), a.drops);
    assert_true(a.head - a.tail <= a.cap);
    alog_stop(&a, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    alog_free(&a);
    assert_int_equal(uv_loop_close(&loop), 0);
    /* every byte read is whole lines */
    size_t total = 0;
    while ((n = read(fds[0], got, sizeof(got))) > 0) {
        total += (size_t)n;
        if (n < (ssize_t)sizeof(got))
            break;
    }
    assert_int_equal(total % sizeof(line), 0);
    assert_int_equal(total / sizeof(line) + a.drops, 200);
    close(fds[0]);
    close(fds[1]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fields),     cmocka_unit_test(test_nulls),
        cmocka_unit_test(test_escaping),   cmocka_unit_test(test_long_fields),
        cmocka_unit_test(test_ring_drops),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
