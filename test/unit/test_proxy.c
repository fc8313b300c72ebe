/* Unit tests for core/proxy.c: exact bytes of upstream request heads and client response heads;
 * header spans from llhttp; hop-by-hop rules; chunk framing; request ids. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <llhttp.h>

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

#define SAFE(s) proxy_path_safe(s, sizeof(s) - 1)

static void test_path_safe(void **state)
{
    assert_true(SAFE("/v1/chat/completions"));
    assert_true(SAFE("/v1/models?x=../..&y=%2f"));    /* the query is not the path */
    assert_true(SAFE("/v1/files/a.b/..c/.../x%2e1")); /* dots inside names are names */
    assert_true(SAFE("/v1/models#/../x"));
    assert_true(SAFE("/v1/a%2"));
    assert_false(SAFE("/v1/../../admin"));
    assert_false(SAFE("/v1/.."));
    assert_false(SAFE("/v1/./models"));
    assert_false(SAFE("/v1/."));
    assert_false(SAFE("/v1/%2e%2e/admin"));
    assert_false(SAFE("/v1/%2E%2e/admin"));
    assert_false(SAFE("/v1/.%2E/admin"));
    assert_false(SAFE("/v1/%2e/admin"));
    assert_false(SAFE("/v1/a/..?q=1"));
    assert_false(SAFE("/v1/a%2fb"));
    assert_false(SAFE("/v1/a%2Fb"));
    assert_false(SAFE("/v1/a\\b"));
    assert_false(SAFE("/v1/a%5cb"));
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

/* Header names are sorted by length and compared case-insensitively: every case form of a
 * special name is caught, and a name of the same length that differs in one byte is not. */
static void test_header_names(void **state)
{
    assert_true(proxy_name_eq("X-Request-ID", 12, "x-request-id", 12));
    assert_true(proxy_name_eq("x-request-id", 12, "x-request-id", 12));
    assert_false(proxy_name_eq("X_Request_Id", 12, "x-request-id", 12));
    assert_false(proxy_name_eq("x-request-i", 11, "x-request-id", 12));
    assert_false(proxy_name_eq("x-request-ie", 12, "x-request-id", 12));
    assert_true(proxy_hop_by_hop("PROXY-CONNECTION", 16));
    assert_true(proxy_hop_by_hop("Transfer-encoding", 17));
    assert_false(proxy_hop_by_hop("Transfer-encodinG2", 18));
    assert_false(proxy_hop_by_hop("X-Forwarded-Proto", 17));
    /* names compare in words: a difference in the first, a middle or the last one counts */
    assert_true(proxy_hop_by_hop("Proxy-AuthoriZATION", 19));
    assert_false(proxy_hop_by_hop("Proxz-Authorization", 19));
    assert_false(proxy_hop_by_hop("Proxy-AutXorization", 19));
    assert_false(proxy_hop_by_hop("Proxy-Authorizatioo", 19));
    assert_false(proxy_hop_by_hop("Keep-Alivf", 10));
    assert_false(proxy_hop_by_hop("Kfep-Alive", 10));
    assert_true(proxy_hop_by_hop("KEEP-ALIVE", 10));

    struct conf_backend be;
    char key[] = "k";
    backend_init(&be, 0, "h", 80, "", key, 8);
    struct proxy_hdr h[] = {
        H("HOST", "a"),
        H("Hoxt", "1"),
        H("EXPECT", "100-continue"),
        H("Expecx", "2"),
        H("X-REAL-IP", "a"),
        H("X-Real-IQ", "3"),
        H("X-REQUEST-ID", "a"),
        H("X_Request_Id", "4"),
        H("AUTHORIZATION", "a"),
        H("Authorizatiox", "5"),
        H("CONTENT-LENGTH", "9"),
        H("Content-Lengtx", "6"),
        H("X-FORWARDED-PROTO", "a"),
        H("X-Forwarded-Protx", "7"),
        H("UPGRADE", "a"),
        H("Trailex", "8"),
        H("tE", "a"),
        H("Tf", "9"),
        H("x-forwarded-FOR", "10.0.0.9"),
    };
    struct proxy_req r = {
        .method = "POST",
        .method_len = 4,
        .path = "/v1/x",
        .path_len = 5,
        .hdrs = h,
        .n_hdrs = sizeof(h) / sizeof(h[0]),
        .client_ip = "127.0.0.1",
        .request_id = "rid",
        .request_id_len = 3,
    };
    char buf[2048];
    int n = proxy_build_request(buf, sizeof(buf), &r, &be);
    assert_bytes(buf, n,
                 "POST /x HTTP/1.1\r\n"
                 "Host: h\r\n"
                 "Hoxt: 1\r\n"
                 "Expecx: 2\r\n"
                 "X-Real-IQ: 3\r\n"
                 "X_Request_Id: 4\r\n"
                 "Authorizatiox: 5\r\n"
                 "Content-Lengtx: 6\r\n"
                 "X-Forwarded-Protx: 7\r\n"
                 "Trailex: 8\r\n"
                 "Tf: 9\r\n"
                 "X-Forwarded-For: 10.0.0.9, 127.0.0.1\r\n"
                 "X-Real-IP: 127.0.0.1\r\n"
                 "X-Forwarded-Proto: http\r\n"
                 "X-Request-Id: rid\r\n"
                 "Authorization: Bearer k\r\n"
                 "\r\n");

    /* response: a name listed in an upper-case Connection header goes, whatever its case */
    struct proxy_hdr rh[] = {
        H("CONNECTION", "x-drop"),    H("X-DROP", "1"),
        H("X-Dropped", "2"),          H("TRANSFER-ENCODING", "chunked"),
        H("X-AIGW-BACKEND", "other"), H("x-aigw-backenx", "3"),
        H("X-AIGW-ATTEMPTS", "9"),    H("X-REQUEST-ID", "up"),
    };
    struct proxy_resp rr = {
        .status = 200,
        .reason = "OK",
        .reason_len = 2,
        .hdrs = rh,
        .n_hdrs = sizeof(rh) / sizeof(rh[0]),
        .request_id = "rid",
        .request_id_len = 3,
        .backend = "b1",
        .attempts = 1,
    };
    n = proxy_build_response_head(buf, sizeof(buf), &rr);
    assert_bytes(buf, n,
                 "HTTP/1.1 200 OK\r\n"
                 "X-Dropped: 2\r\n"
                 "x-aigw-backenx: 3\r\n"
                 "x-aigw-backend: b1\r\n"
                 "x-aigw-attempts: 1\r\n"
                 "X-Request-Id: rid\r\n"
                 "\r\n");
}

static void test_chunk_framing(void **state)
{
    char line[20];
    assert_int_equal(proxy_chunk_line(line, 0), 3);
    assert_memory_equal(line, "0\r\n", 3);
    assert_int_equal(proxy_chunk_line(line, 0x1a2f), 6);
    assert_memory_equal(line, "1a2f\r\n", 6);

    /* newlines at the end of a stream: two end an event, '\r' does not count */
    assert_int_equal(proxy_sse_newlines(2, "data: x", 7), 0);
    assert_int_equal(proxy_sse_newlines(0, "data: x\n", 8), 1);
    assert_int_equal(proxy_sse_newlines(0, "data: x\r\n\r\n", 11), 2);
    assert_int_equal(proxy_sse_newlines(1, "\n", 1), 2);
    assert_int_equal(proxy_sse_newlines(1, "", 0), 1);
    assert_int_equal(proxy_sse_newlines(0, "\r", 1), 0);
    assert_int_equal(proxy_sse_newlines(2, "\n\n\n", 3), 2);
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

static void test_response_head_via(void **state)
{
    struct proxy_hdr h[] = {
        H("Content-Type", "application/json"),
        H("x-aigw-backend", "inner"),
        H("X-AIGW-Attempts", "3"),
    };
    struct proxy_resp r = {
        .status = 200,
        .reason = "OK",
        .reason_len = 2,
        .hdrs = h,
        .n_hdrs = 3,
        .request_id = "rid",
        .request_id_len = 3,
        .backend = "b2",
        .attempts = 2,
    };
    char buf[1024];
    int n = proxy_build_response_head(buf, sizeof(buf), &r);
    /* ours replace the upstream's */
    assert_bytes(buf, n,
                 "HTTP/1.1 200 OK\r\n"
                 "Content-Type: application/json\r\n"
                 "x-aigw-backend: b2\r\n"
                 "x-aigw-attempts: 2\r\n"
                 "X-Request-Id: rid\r\n"
                 "\r\n");
    /* hidden (expose_headers = no): the upstream's pass as they are */
    r.backend = NULL;
    n = proxy_build_response_head(buf, sizeof(buf), &r);
    assert_bytes(buf, n,
                 "HTTP/1.1 200 OK\r\n"
                 "Content-Type: application/json\r\n"
                 "x-aigw-backend: inner\r\n"
                 "X-AIGW-Attempts: 3\r\n"
                 "X-Request-Id: rid\r\n"
                 "\r\n");
}

/* A body aigw frames in chunks itself (an SSE stream with a Content-Length, a body delimited by
 * the close): the upstream's Content-Length goes, Transfer-Encoding: chunked comes. */
static void test_response_head_chunk_self(void **state)
{
    struct proxy_hdr h[] = {
        H("Content-Type", "text/event-stream"),
        H("Content-Length", "1234"),
    };
    struct proxy_resp r = {
        .status = 200,
        .reason = "OK",
        .reason_len = 2,
        .hdrs = h,
        .n_hdrs = 2,
        .chunk_self = 1,
        .request_id = "rid",
        .request_id_len = 3,
    };
    char buf[1024];
    int n = proxy_build_response_head(buf, sizeof(buf), &r);
    assert_bytes(buf, n,
                 "HTTP/1.1 200 OK\r\n"
                 "Content-Type: text/event-stream\r\n"
                 "Transfer-Encoding: chunked\r\n"
                 "X-Request-Id: rid\r\n"
                 "\r\n");
}

/* ---- header pieces (proxy_hdr_piece) driven by llhttp, as client.c and upstream.c do ---- */

struct piece_ctx {
    struct proxy_hdr hdrs[8];
    uint32_t n;
    uint8_t last;
};

static int piece_field(llhttp_t *p, const char *at, size_t len)
{
    struct piece_ctx *x = p->data;
    return proxy_hdr_piece(x->hdrs, &x->n, 8, &x->last, PROXY_PIECE_NAME, at, len) ? -1 : 0;
}

static int piece_value(llhttp_t *p, const char *at, size_t len)
{
    struct piece_ctx *x = p->data;
    return proxy_hdr_piece(x->hdrs, &x->n, 8, &x->last, PROXY_PIECE_VALUE, at, len) ? -1 : 0;
}

/* Parses text (fed in pieces of `step` bytes from one buffer, as the worker's reads append to
 * one) with the shared piece callbacks; llhttp's error code. */
static llhttp_errno_t piece_parse(struct piece_ctx *x, llhttp_type_t type, const char *text,
                                  size_t step)
{
    llhttp_settings_t st;
    llhttp_t p;
    llhttp_errno_t e = HPE_OK;
    size_t len = strlen(text);

    memset(x, 0, sizeof(*x));
    llhttp_settings_init(&st);
    st.on_header_field = piece_field;
    st.on_header_value = piece_value;
    llhttp_init(&p, type, &st);
    p.data = x;
    for (size_t off = 0; off < len && e == HPE_OK; off += step)
        e = llhttp_execute(&p, text + off, len - off < step ? len - off : step);
    return e;
}

static void assert_hdr(const struct proxy_hdr *h, const char *name, const char *value)
{
    assert_int_equal(h->name_len, strlen(name));
    assert_memory_equal(h->name, name, h->name_len);
    assert_int_equal(h->value_len, strlen(value));
    assert_memory_equal(h->value, value, h->value_len);
}

static void test_hdr_pieces(void **state)
{
    struct piece_ctx x;
    static const char req[] = "POST /v1/x HTTP/1.1\r\nHost: a\r\nX-Long-Name: some value\r\n"
                              "Empty:\r\nContent-Length: 2\r\n\r\n{}";

    /* whole, or split anywhere: the pieces join into the same spans */
    for (size_t step = 1; step <= sizeof(req); step++) {
        assert_int_equal(piece_parse(&x, HTTP_REQUEST, req, step), HPE_OK);
        assert_int_equal(x.n, 4);
        assert_hdr(&x.hdrs[0], "Host", "a");
        assert_hdr(&x.hdrs[1], "X-Long-Name", "some value");
        assert_int_equal(x.hdrs[2].name_len, 5);
        assert_int_equal(x.hdrs[2].value_len, 0);
        assert_hdr(&x.hdrs[3], "Content-Length", "2");
    }

    /* obs-fold: llhttp accepts it and hands the value over in two pieces around the CRLF; the
     * shared helper refuses it, for requests and responses, however the bytes arrive */
    static const char fold_req[] = "POST /v1/x HTTP/1.1\r\nHost: a\r\nX-Foo: a\r\n b\r\n"
                                   "Content-Length: 2\r\n\r\n{}";
    static const char fold_resp[] = "HTTP/1.1 200 OK\r\nX-A: a\r\n\tb\r\nContent-Length: 2\r\n\r\n"
                                    "{}";
    for (size_t step = 1; step <= sizeof(fold_req); step++) {
        assert_int_equal(piece_parse(&x, HTTP_REQUEST, fold_req, step), HPE_USER);
        assert_int_equal(piece_parse(&x, HTTP_RESPONSE, fold_resp, step), HPE_USER);
    }
    /* nothing in the spans kept so far holds a line break */
    for (uint32_t i = 0; i < x.n; i++)
        assert_null(memchr(x.hdrs[i].value, '\n', x.hdrs[i].value_len));

    /* the helper on its own: a gap between pieces of a name or value is refused, too many
     * headers are -ENOSPC */
    struct proxy_hdr h[2];
    uint32_t n = 0;
    uint8_t last = PROXY_PIECE_NONE;
    const char *buf = "ab:cd";
    assert_int_equal(proxy_hdr_piece(h, &n, 1, &last, PROXY_PIECE_NAME, buf, 1), 0);
    assert_int_equal(proxy_hdr_piece(h, &n, 1, &last, PROXY_PIECE_NAME, buf + 1, 1), 0);
    assert_int_equal(proxy_hdr_piece(h, &n, 1, &last, PROXY_PIECE_VALUE, buf + 3, 1), 0);
    assert_int_equal(proxy_hdr_piece(h, &n, 1, &last, PROXY_PIECE_VALUE, buf + 4, 1), 0);
    assert_int_equal(h[0].name_len, 2);
    assert_int_equal(h[0].value_len, 2);
    assert_int_equal(proxy_hdr_piece(h, &n, 1, &last, PROXY_PIECE_NAME, buf, 1), -ENOSPC);
    n = 0;
    last = PROXY_PIECE_NONE;
    assert_int_equal(proxy_hdr_piece(h, &n, 2, &last, PROXY_PIECE_NAME, buf, 1), 0);
    assert_int_equal(proxy_hdr_piece(h, &n, 2, &last, PROXY_PIECE_NAME, buf + 2, 1), -EPROTO);
    assert_int_equal(proxy_hdr_piece(h, &n, 2, &last, PROXY_PIECE_VALUE, buf + 3, 1), 0);
    assert_int_equal(proxy_hdr_piece(h, &n, 2, &last, PROXY_PIECE_VALUE, buf + 3, 1), -EPROTO);
}

/* Connection never strips the response framing; the tokens are parsed once, and a Connection
 * header with more tokens than the fast path keeps still works. */
static void test_connection_tokens(void **state)
{
    char buf[8192], many[64 * 8];
    struct proxy_hdr rh[] = {
        H("Content-Type", "application/json"),
        H("Content-Length", "2"),
        H("X-A", "1"),
        H("Connection", "close, Content-Length, x-a, X-Request-Id, transfer-encoding"),
    };
    struct proxy_resp rr = {
        .status = 200,
        .reason = "OK",
        .reason_len = 2,
        .hdrs = rh,
        .n_hdrs = 4,
        .request_id = "rid",
        .request_id_len = 3,
    };
    int n = proxy_build_response_head(buf, sizeof(buf), &rr);
    assert_bytes(buf, n,
                 "HTTP/1.1 200 OK\r\n"
                 "Content-Type: application/json\r\n"
                 "Content-Length: 2\r\n"
                 "X-Request-Id: rid\r\n"
                 "\r\n");

    /* 40 tokens (beyond the 32 kept): the listed names still go, the others stay */
    size_t m = 0;
    for (int i = 0; i < 40; i++)
        m += (size_t)snprintf(many + m, sizeof(many) - m, "%sx-t%d", i ? ", " : "", i);
    struct proxy_hdr rq[] = {
        {"Connection", many, 10, (uint32_t)m},
        H("X-T39", "a"),
        H("X-T3", "b"),
        H("X-T40", "c"),
    };
    struct conf_backend be;
    backend_init(&be, 0, "h", 80, "/v1", NULL, 1);
    struct proxy_req r = {
        .method = "GET",
        .method_len = 3,
        .path = "/v1/models",
        .path_len = 10,
        .hdrs = rq,
        .n_hdrs = 4,
        .client_ip = "1.2.3.4",
        .request_id = "rid",
        .request_id_len = 3,
    };
    n = proxy_build_request(buf, sizeof(buf), &r, &be);
    assert_true(n > 0);
    buf[n] = 0;
    assert_null(strstr(buf, "X-T39"));
    assert_null(strstr(buf, "X-T3:"));
    assert_non_null(strstr(buf, "X-T40: c\r\n"));
    rr.hdrs = rq;
    n = proxy_build_response_head(buf, sizeof(buf), &rr);
    assert_true(n > 0);
    buf[n] = 0;
    assert_null(strstr(buf, "X-T39"));
    assert_non_null(strstr(buf, "X-T40: c\r\n"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_path_ok),
        cmocka_unit_test(test_path_safe),
        cmocka_unit_test(test_hop_by_hop),
        cmocka_unit_test(test_build_request_full),
        cmocka_unit_test(test_build_request_plain),
        cmocka_unit_test(test_build_response_head),
        cmocka_unit_test(test_header_names),
        cmocka_unit_test(test_request_id),
        cmocka_unit_test(test_chunk_framing),
        cmocka_unit_test(test_response_head_via),
        cmocka_unit_test(test_response_head_chunk_self),
        cmocka_unit_test(test_hdr_pieces),
        cmocka_unit_test(test_connection_tokens),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
