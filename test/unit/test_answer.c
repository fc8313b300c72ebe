/* Unit tests for core/answer.c: exact bytes of the gateway's own answers (JSON errors with their
 * headers, the answer to OPTIONS, the error end of an SSE stream). */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "core/answer.h"

static void assert_bytes(const char *buf, int n, const char *want)
{
    assert_true(n >= 0);
    char tmp[4096];
    assert_true((size_t)n < sizeof(tmp));
    memcpy(tmp, buf, (size_t)n);
    tmp[n] = 0;
    assert_string_equal(tmp, want);
}

static void test_build_error(void **state)
{
    char buf[1024];
    int n = answer_error(buf, sizeof(buf), 503, "upstream_error", "no_backend_available",
                         "no backend is available", 0, 1, "abc", 3);
    const char *body = "{\"error\":{\"message\":\"no backend is available\",\"type\":"
                       "\"upstream_error\",\"code\":\"no_backend_available\"}}\n";
    char want[1024];
    snprintf(want, sizeof(want),
             "HTTP/1.1 503 Service Unavailable\r\n"
             "Content-Type: application/json\r\n"
             "Content-Length: %zu\r\n"
             "Retry-After: 1\r\n"
             "X-Request-Id: abc\r\n"
             "Connection: keep-alive\r\n"
             "\r\n%s",
             strlen(body), body);
    assert_bytes(buf, n, want);

    /* quotes, backslashes and control characters are escaped; close says so */
    n = answer_error(buf, sizeof(buf), 400, "invalid_request_error", "bad", "a \"q\" \\ b\n\x01", 1,
                     0, NULL, 0);
    body = "{\"error\":{\"message\":\"a \\\"q\\\" \\\\ b\\n\\u0001\",\"type\":"
           "\"invalid_request_error\",\"code\":\"bad\"}}\n";
    snprintf(want, sizeof(want),
             "HTTP/1.1 400 Bad Request\r\n"
             "Content-Type: application/json\r\n"
             "Content-Length: %zu\r\n"
             "Connection: close\r\n"
             "\r\n%s",
             strlen(body), body);
    assert_bytes(buf, n, want);
    assert_int_equal(answer_error(buf, 40, 400, "t", "c", "m", 1, 0, NULL, 0), -ENOSPC);
    assert_string_equal(answer_status_reason(504), "Gateway Timeout");
    assert_string_equal(answer_status_reason(431), "Request Header Fields Too Large");
}

/* The gateway's own protocol answers: a 405 carries Allow, OPTIONS gets a 204 without a body. */
static void test_build_allow(void **state)
{
    char buf[1024], want[1024];
    const char *body = "{\"error\":{\"message\":\"method not allowed\",\"type\":"
                       "\"invalid_request_error\",\"code\":\"method_not_allowed\"}}\n";
    int n =
        answer_error_hdrs(buf, sizeof(buf), 405, "invalid_request_error", "method_not_allowed",
                          "method not allowed", 1, 0, "r1", 2, NULL, 0, 0, "Allow: GET, POST\r\n");
    snprintf(want, sizeof(want),
             "HTTP/1.1 405 Method Not Allowed\r\n"
             "Content-Type: application/json\r\n"
             "Content-Length: %zu\r\n"
             "Allow: GET, POST\r\n"
             "X-Request-Id: r1\r\n"
             "Connection: close\r\n"
             "\r\n%s",
             strlen(body), body);
    assert_bytes(buf, n, want);
    n = answer_options(buf, sizeof(buf), "GET, OPTIONS", 0, "r2", 2);
    assert_bytes(buf, n,
                 "HTTP/1.1 204 No Content\r\n"
                 "Allow: GET, OPTIONS\r\n"
                 "X-Request-Id: r2\r\n"
                 "Connection: keep-alive\r\n"
                 "\r\n");
    n = answer_options(buf, sizeof(buf), "GET", 1, NULL, 0);
    assert_bytes(buf, n, "HTTP/1.1 204 No Content\r\nAllow: GET\r\nConnection: close\r\n\r\n");
    assert_int_equal(answer_options(buf, 30, "GET", 1, NULL, 0), -ENOSPC);
    assert_string_equal(answer_status_reason(505), "HTTP Version Not Supported");
    assert_string_equal(answer_status_reason(204), "No Content");
}

static void test_build_error_via(void **state)
{
    char buf[1024], want[1024];
    int n = answer_error_via(buf, sizeof(buf), 429, "requests", "rate_limit_exceeded", "slow", 0, 7,
                             "r", 1, "a", 2, 0);
    const char *body = "{\"error\":{\"message\":\"slow\",\"type\":\"requests\",\"code\":\"rate_"
                       "limit_exceeded\"}}\n";
    snprintf(want, sizeof(want),
             "HTTP/1.1 429 Too Many Requests\r\n"
             "Content-Type: application/json\r\n"
             "Content-Length: %zu\r\n"
             "Retry-After: 7\r\n"
             "x-aigw-backend: a\r\n"
             "x-aigw-attempts: 2\r\n"
             "X-Request-Id: r\r\n"
             "Connection: keep-alive\r\n"
             "\r\n%s",
             strlen(body), body);
    assert_bytes(buf, n, want);
    /* the answer to a HEAD request: the same head, Content-Length kept, no body */
    int hn = answer_error_via(buf, sizeof(buf), 429, "requests", "rate_limit_exceeded", "slow", 0,
                              7, "r", 1, "a", 2, 1);
    assert_int_equal(hn, n - (int)strlen(body));
    want[hn] = 0;
    assert_bytes(buf, hn, want);
}

static void test_sse_error(void **state)
{
    char buf[1024];
    int n = answer_sse_error(buf, sizeof(buf), "\n", "upstream lost \"x\"",
                             "upstream_stream_interrupted");
    const char *ev = "\nevent: error\ndata: {\"error\":{\"message\":\"upstream lost \\\"x\\\"\","
                     "\"type\":\"upstream_error\",\"code\":\"upstream_stream_interrupted\"}}\n\n";
    char want[1024];
    snprintf(want, sizeof(want), "%zx\r\n%s\r\n0\r\n\r\n", strlen(ev), ev);
    assert_bytes(buf, n, want);
    assert_int_equal(answer_sse_error(buf, 30, "", "m", "c"), -ENOSPC);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_build_error),
        cmocka_unit_test(test_build_allow),
        cmocka_unit_test(test_build_error_via),
        cmocka_unit_test(test_sse_error),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
