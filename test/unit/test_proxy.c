/* Unit tests for core/proxy.c: exact bytes of upstream request heads, client response heads and
 * gateway errors; hop-by-hop rules; request ids; JSON body fields. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "core/proxy.h"

#define H(n, v)                                                                                    \
    {                                                                                              \
        n, v, sizeof(n) - 1, sizeof(v) - 1                                                         \
    }

static void backend_init(struct conf_backend *be, int tls, const char *host, uint16_t port,
                         const char *prefix, char *key, int keepalive)
{
    memset(be, 0, sizeof(*be));
    strcpy(be->name, "b");
    be->url.tls = tls;
    strcpy(be->url.host, host);
    be->url.port = port;
    strcpy(be->url.prefix, prefix);
    be->api_key = key;
    be->keepalive = keepalive;
    be->weight = 1;
}

static void assert_bytes(const char *buf, int n, const char *want)
{
    assert_true(n >= 0);
    char tmp[4096];
    assert_true((size_t)n < sizeof(tmp));
    memcpy(tmp, buf, (size_t)n);
    tmp[n] = 0;
    assert_string_equal(tmp, want);
}

static void test_path_ok(void **state)
{
    assert_true(proxy_path_ok("/v1/models", 10));
    assert_true(proxy_path_ok("/v1/", 4));
    assert_false(proxy_path_ok("/v1", 3));
    assert_false(proxy_path_ok("/v2/models", 10));
    assert_false(proxy_path_ok("/", 1));
    assert_false(proxy_path_ok("http://x/v1/models", 18));
}

static void test_hop_by_hop(void **state)
{
    static const char *hop[] = {
        "Connection", "keep-alive", "Proxy-Connection",  "TE",
        "Trailer",    "UPGRADE",    "Transfer-Encoding", "proxy-authorization"};
    for (size_t i = 0; i < sizeof(hop) / sizeof(hop[0]); i++)
        assert_true(proxy_hop_by_hop(hop[i], strlen(hop[i])));
    assert_false(proxy_hop_by_hop("Content-Type", 12));
    assert_false(proxy_hop_by_hop("Authorization", 13));
    assert_false(proxy_hop_by_hop("T", 1));
    assert_false(proxy_hop_by_hop("Trailers", 8));

    struct proxy_hdr h[] = {
        H("Connection", "keep-alive, X-Secret ,x-other"),
        H("X-Secret", "1"),
        H("X-Other", "2"),
        H("X-Sec", "3"),
        H("Accept", "*/*"),
    };
    assert_true(proxy_conn_lists(h, 5, "x-secret", 8));
    assert_true(proxy_conn_lists(h, 5, "X-OTHER", 7));
    assert_false(proxy_conn_lists(h, 5, "x-sec", 5));
    assert_true(proxy_header_is_hop(h, 5, 0));
    assert_true(proxy_header_is_hop(h, 5, 1));
    assert_true(proxy_header_is_hop(h, 5, 2));
    assert_false(proxy_header_is_hop(h, 5, 3));
    assert_false(proxy_header_is_hop(h, 5, 4));
}

static void test_build_request_full(void **state)
{
    struct conf_backend be;
    char key[] = "sk-backend";
    backend_init(&be, 1, "api.example.com", 8443, "/openai/v1", key, 32);
    struct proxy_hdr h[] = {
        H("Host", "gw.local:8080"),
        H("Connection", "keep-alive, X-Drop"),
        H("X-Drop", "secret"),
        H("Keep-Alive", "timeout=5"),
        H("Authorization", "Bearer client-key"),
        H("Content-Type", "application/json"),
        H("Transfer-Encoding", "chunked"),
        H("X-Forwarded-For", "10.0.0.1"),
        H("Expect", "100-continue"),
        H("TE", "trailers"),
        H("Proxy-Authorization", "Basic xx"),
        H("X-Real-IP", "6.6.6.6"),
        H("X-Forwarded-For", "10.0.0.2"),
        H("Accept", "*/*"),
    };
    struct proxy_req r = {
        .method = "POST",
        .method_len = 4,
        .path = "/v1/chat/completions?x=1",
        .path_len = 24,
        .hdrs = h,
        .n_hdrs = sizeof(h) / sizeof(h[0]),
        .client_ip = "127.0.0.1",
        .request_id = "0123456789abcdef0123456789abcdef",
        .request_id_len = 32,
        .has_body = 1,
        .body_len = 42,
    };
    char buf[2048];
    int n = proxy_build_request(buf, sizeof(buf), &r, &be);
    assert_bytes(buf, n,
                 "POST /openai/v1/chat/completions?x=1 HTTP/1.1\r\n"
                 "Host: api.example.com:8443\r\n"
                 "Content-Type: application/json\r\n"
                 "X-Forwarded-For: 10.0.0.1, 10.0.0.2, 127.0.0.1\r\n"
                 "Accept: */*\r\n"
                 "X-Real-IP: 127.0.0.1\r\n"
                 "X-Forwarded-Proto: http\r\n"
                 "X-Request-Id: 0123456789abcdef0123456789abcdef\r\n"
                 "Authorization: Bearer sk-backend\r\n"
                 "Content-Length: 42\r\n"
                 "\r\n");

    /* too small a buffer is reported, never truncated */
    assert_int_equal(proxy_build_request(buf, (size_t)n - 1, &r, &be), -ENOSPC);
    assert_int_equal(proxy_build_request(buf, (size_t)n, &r, &be), n);
}

static void test_build_request_plain(void **state)
{
    struct conf_backend be;
    backend_init(&be, 0, "127.0.0.1", 80, "", NULL, 0);
    struct proxy_hdr h[] = {
        H("host", "x"),
        H("authorization", "Bearer client"),
        H("x-request-id", "client-id"),
    };
    struct proxy_req r = {
        .method = "GET",
        .method_len = 3,
        .path = "/v1/models",
        .path_len = 10,
        .hdrs = h,
        .n_hdrs = 3,
        .client_ip = "::1",
        .request_id = "client-id",
        .request_id_len = 9,
    };
    char buf[1024];
    int n = proxy_build_request(buf, sizeof(buf), &r, &be);
    /* no prefix: "/v1/models" -> "/models"; default port omitted; key kept; no body: no
     * Content-Length; keepalive 0: Connection: close */
    assert_bytes(buf, n,
                 "GET /models HTTP/1.1\r\n"
                 "Host: 127.0.0.1\r\n"
                 "authorization: Bearer client\r\n"
                 "X-Forwarded-For: ::1\r\n"
                 "X-Real-IP: ::1\r\n"
                 "X-Forwarded-Proto: http\r\n"
                 "X-Request-Id: client-id\r\n"
                 "Connection: close\r\n"
                 "\r\n");

    /* IPv6 literal backends are bracketed; an empty body still says Content-Length: 0 */
    backend_init(&be, 0, "::1", 9101, "/v1", NULL, 8);
    r.n_hdrs = 0;
    r.has_body = 1;
    r.method = "POST";
    r.method_len = 4;
    n = proxy_build_request(buf, sizeof(buf), &r, &be);
    assert_bytes(buf, n,
                 "POST /v1/models HTTP/1.1\r\n"
                 "Host: [::1]:9101\r\n"
                 "X-Forwarded-For: ::1\r\n"
                 "X-Real-IP: ::1\r\n"
                 "X-Forwarded-Proto: http\r\n"
                 "X-Request-Id: client-id\r\n"
                 "Content-Length: 0\r\n"
                 "\r\n");
}

static void test_build_response_head(void **state)
{
    struct proxy_hdr h[] = {
        H("Content-Type", "text/event-stream"),
        H("Transfer-Encoding", "chunked"),
        H("Connection", "keep-alive, X-Hop"),
        H("X-Hop", "1"),
        H("Keep-Alive", "timeout=5"),
        H("x-request-id", "upstream-id"),
        H("x-mock-name", "m1"),
    };
    struct proxy_resp r = {
        .status = 200,
        .reason = "OK",
        .reason_len = 2,
        .hdrs = h,
        .n_hdrs = 7,
        .keep_chunked = 1,
        .request_id = "rid",
        .request_id_len = 3,
    };
    char buf[1024];
    int n = proxy_build_response_head(buf, sizeof(buf), &r);
    assert_bytes(buf, n,
                 "HTTP/1.1 200 OK\r\n"
                 "Content-Type: text/event-stream\r\n"
                 "Transfer-Encoding: chunked\r\n"
                 "x-mock-name: m1\r\n"
                 "X-Request-Id: rid\r\n"
                 "\r\n");

    r.keep_chunked = 0;
    r.close = 1;
    r.status = 503;
    r.reason = "Service Unavailable";
    r.reason_len = 19;
    n = proxy_build_response_head(buf, sizeof(buf), &r);
    assert_bytes(buf, n,
                 "HTTP/1.1 503 Service Unavailable\r\n"
                 "Content-Type: text/event-stream\r\n"
                 "x-mock-name: m1\r\n"
                 "X-Request-Id: rid\r\n"
                 "Connection: close\r\n"
                 "\r\n");

    r.close = 0;
    r.http10_keepalive = 1;
    r.n_hdrs = 0;
    n = proxy_build_response_head(buf, sizeof(buf), &r);
    assert_bytes(buf, n,
                 "HTTP/1.1 503 Service Unavailable\r\n"
                 "X-Request-Id: rid\r\n"
                 "Connection: keep-alive\r\n"
                 "\r\n");
    assert_int_equal(proxy_build_response_head(buf, 10, &r), -ENOSPC);
}

static void test_build_error(void **state)
{
    char buf[1024];
    int n = proxy_build_error(buf, sizeof(buf), 503, "upstream_error", "no_backend_available",
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
    n = proxy_build_error(buf, sizeof(buf), 400, "invalid_request_error", "bad",
                          "a \"q\" \\ b\n\x01", 1, 0, NULL, 0);
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
    assert_int_equal(proxy_build_error(buf, 40, 400, "t", "c", "m", 1, 0, NULL, 0), -ENOSPC);
    assert_string_equal(proxy_status_reason(504), "Gateway Timeout");
    assert_string_equal(proxy_status_reason(431), "Request Header Fields Too Large");
}

static void test_request_id(void **state)
{
    char a[33] = {0}, b[33] = {0}, c[33] = {0};
    proxy_request_id(a, 0x1122334455667788ULL, 42, 0);
    proxy_request_id(b, 0x1122334455667788ULL, 42, 1);
    proxy_request_id(c, 0x1122334455667788ULL, 42, 0);
    assert_int_equal(strlen(a), 32);
    assert_true(strspn(a, "0123456789abcdef") == 32);
    assert_memory_equal(a, "1122334455667788", 16);
    assert_string_not_equal(a, b);
    assert_string_equal(a, c);
    /* a run of counters gives distinct ids */
    char seen[64][33];
    for (int i = 0; i < 64; i++) {
        seen[i][32] = 0;
        proxy_request_id(seen[i], 7, 9, (uint64_t)i);
        for (int j = 0; j < i; j++)
            assert_string_not_equal(seen[i], seen[j]);
    }
}

static void test_parse_body(void **state)
{
    char tok[64 * 32];
    unsigned ntok = sizeof(tok) / proxy_token_size();
    struct proxy_body_info info;

    const char *b = "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\",\"model\":\"inner\"}],"
                    "\"model\":\"gpt-4o-mini\",\"stream\":true}";
    assert_int_equal(proxy_parse_body(b, strlen(b), tok, ntok, &info), 0);
    assert_int_equal(info.model_len, 11);
    assert_memory_equal(info.model, "gpt-4o-mini", 11);
    assert_int_equal(info.stream, 1);

    b = " {\"stream\":false,\"model\":\"m\"}\n";
    assert_int_equal(proxy_parse_body(b, strlen(b), tok, ntok, &info), 0);
    assert_int_equal(info.stream, 0);
    assert_int_equal(info.model_len, 1);

    b = "{\"x\":1}";
    assert_int_equal(proxy_parse_body(b, strlen(b), tok, ntok, &info), 0);
    assert_null(info.model);

    assert_int_equal(proxy_parse_body("[1,2]", 5, tok, ntok, &info), -EINVAL);
    assert_int_equal(proxy_parse_body("\"s\"", 3, tok, ntok, &info), -EINVAL);
    assert_int_equal(proxy_parse_body("{\"a\":", 5, tok, ntok, &info), -EINVAL);
    assert_int_equal(proxy_parse_body("{} x", 4, tok, ntok, &info), -EINVAL);
    assert_int_equal(proxy_parse_body("", 0, tok, ntok, &info), -EINVAL);
    assert_int_equal(proxy_parse_body("not json", 8, tok, ntok, &info), -EINVAL);

    /* too few tokens: asks for more instead of guessing */
    b = "{\"a\":[1,2,3,4,5,6,7,8],\"model\":\"m\"}";
    assert_int_equal(proxy_parse_body(b, strlen(b), tok, 4, &info), -ENOMEM);
    assert_int_equal(proxy_parse_body(b, strlen(b), NULL, 0, &info), -ENOMEM);
    assert_int_equal(proxy_parse_body(b, strlen(b), tok, ntok, &info), 0);
    assert_int_equal(info.model_len, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_path_ok),
        cmocka_unit_test(test_hop_by_hop),
        cmocka_unit_test(test_build_request_full),
        cmocka_unit_test(test_build_request_plain),
        cmocka_unit_test(test_build_response_head),
        cmocka_unit_test(test_build_error),
        cmocka_unit_test(test_request_id),
        cmocka_unit_test(test_parse_body),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
