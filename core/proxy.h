/* Header rewriting, free of I/O: header spans as llhttp hands them over, the upstream request
 * head, the response head sent back to the client, hop-by-hop rules, chunk framing and request
 * ids. Gateway answers are core/answer.c's, 429 cool-downs core/cool.c's, the JSON body
 * core/json.c's. */
#ifndef AIGW_CORE_PROXY_H
#define AIGW_CORE_PROXY_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "core/conf.h"

/* One header as (pointer, length) spans into the bytes it was parsed from. */
struct proxy_hdr {
    const char *name;
    const char *value;
    uint32_t name_len;
    uint32_t value_len;
};

/* What the upstream request head is built from. */
struct proxy_req {
    const char *method; /* "POST" */
    size_t method_len;
    const char *path; /* client request target, "/v1/chat/completions?x=1" */
    size_t path_len;
    const struct proxy_hdr *hdrs; /* client headers in arrival order */
    size_t n_hdrs;
    const char *client_ip;  /* NUL-terminated */
    const char *request_id; /* X-Request-Id value (the client's or a generated one) */
    size_t request_id_len;
    int has_body;      /* the client sent a body (Content-Length or chunked): send Content-Length */
    uint64_t body_len; /* de-chunked body length */
    int strip_auth;    /* the client's Authorization was aigw's own key: never sent upstream */
};

/* 1 when p[0, len) equals `lower` (lower_len bytes of lower-case letters, digits and '-'),
 * ignoring ASCII case: the header-name test of the request path, a few word compares without a
 * call. p must be an HTTP token, as llhttp checks header names to be: OR-ing 0x20 into each
 * byte folds case, and only non-token bytes (control characters) could fold onto '-' or a
 * digit. */
static inline int proxy_name_eq(const char *p, size_t len, const char *lower, size_t lower_len)
{
    uint64_t a, b;
    uint32_t c, d;

    if (len != lower_len)
        return 0;
    if (len >= 8) {
        /* whole words, the last one overlapping the one before it */
        for (size_t i = 0; i + 8 < len; i += 8) {
            memcpy(&a, p + i, 8);
            memcpy(&b, lower + i, 8);
            if ((a | 0x2020202020202020ULL) != b)
                return 0;
        }
        memcpy(&a, p + len - 8, 8);
        memcpy(&b, lower + len - 8, 8);
        return (a | 0x2020202020202020ULL) == b;
    }
    if (len >= 4) {
        memcpy(&c, p, 4);
        memcpy(&d, lower, 4);
        if ((c | 0x20202020U) != d)
            return 0;
        memcpy(&c, p + len - 4, 4);
        memcpy(&d, lower + len - 4, 4);
        return (c | 0x20202020U) == d;
    }
    for (size_t i = 0; i < len; i++)
        if ((char)(p[i] | 0x20) != lower[i])
            return 0;
    return 1;
}

/* Which llhttp header callback a piece of a header comes from. */
enum proxy_piece {
    PROXY_PIECE_NONE = 0, /* no header piece yet in this message */
    PROXY_PIECE_NAME = 1, /* on_header_field */
    PROXY_PIECE_VALUE = 2 /* on_header_value */
};

/* Adds one piece of a header name or value, as llhttp's on_header_field / on_header_value hand
 * them over, to the spans hdrs[0, *n): a name piece after a value (or first) starts a new header
 * (at most max of them), a value piece after a name starts its value, and a piece of the same
 * kind as the last one extends it. *last is the kind of the last piece (PROXY_PIECE_NONE at the
 * start of a message). Shared by the request (client.c) and response (upstream.c) parsers.
 * Returns 0; -ENOSPC when a new header would exceed max; -EPROTO when a piece does not directly
 * follow the one before it in memory. That happens for obs-fold ("X-A: a\r\n b"), which
 * llhttp accepts and reports in pieces with the line break between them: spliced into a head
 * we forward, those bytes would end it early (request smuggling), so it is refused (RFC 9112
 * 5.2 allows that). */
static inline int proxy_hdr_piece(struct proxy_hdr *hdrs, uint32_t *n, uint32_t max, uint8_t *last,
                                  enum proxy_piece kind, const char *at, size_t len)
{
    struct proxy_hdr *h;

    if (*last == kind) {
        h = &hdrs[*n - 1];
        if (kind == PROXY_PIECE_NAME) {
            if (at != h->name + h->name_len)
                return -EPROTO;
            h->name_len += (uint32_t)len;
        } else {
            if (at != h->value + h->value_len)
                return -EPROTO;
            h->value_len += (uint32_t)len;
        }
        return 0;
    }
    *last = (uint8_t)kind;
    if (kind == PROXY_PIECE_NAME) {
        if (*n >= max)
            return -ENOSPC;
        h = &hdrs[(*n)++];
        h->name = at;
        h->name_len = (uint32_t)len;
        h->value = at;
        h->value_len = 0;
        return 0;
    }
    if (*n == 0)
        return -EPROTO; /* a value with no name: llhttp never does this */
    h = &hdrs[*n - 1];
    h->value = at;
    h->value_len = (uint32_t)len;
    return 0;
}

/* 1 when the path is under /v1/ (the only paths aigw forwards). */
int proxy_path_ok(const char *path, size_t len);

/* 1 when the path part of a request target (up to '?') holds no segment a server could resolve
 * outside the backend's prefix: no "." or ".." segment, also percent-encoded in any case
 * ("%2e%2E", ".%2e"), no encoded slash "%2f" and no backslash, raw or "%5c" (some servers take
 * it for a slash). The target is forwarded as is after the prefix with the backend's key, so
 * such a path could reach any route of the provider host. */
int proxy_path_safe(const char *path, size_t len);

/* 1 for the fixed hop-by-hop names (Connection, Keep-Alive, Proxy-Connection, TE, Trailer,
 * Transfer-Encoding, Upgrade, Proxy-Authorization). */
int proxy_hop_by_hop(const char *name, size_t len);

/* 1 when one of the Connection headers among hdrs lists `name` as a token. */
int proxy_conn_lists(const struct proxy_hdr *hdrs, size_t n, const char *name, size_t len);

/* 1 when hdrs[i] must not be forwarded: a fixed hop-by-hop name or one listed in Connection. */
int proxy_header_is_hop(const struct proxy_hdr *hdrs, size_t n, size_t i);

/* Builds the upstream request head (request line, headers, blank line) for backend `be`:
 * path prefix mapping, hop-by-hop removal, Host, X-Forwarded-For/-Proto, X-Real-IP,
 * X-Request-Id, Authorization replacement when be->api_key is set, Content-Length, and
 * "Connection: close" when be->keepalive is 0. Returns the length, or -ENOSPC when cap is too
 * small. */
int proxy_build_request(char *buf, size_t cap, const struct proxy_req *r,
                        const struct conf_backend *be);

/* What the response head sent to the client is built from. */
struct proxy_resp {
    int status;
    const char *reason;
    size_t reason_len;
    const struct proxy_hdr *hdrs;
    size_t n_hdrs;
    int keep_chunked;     /* body passes through chunk-encoded: keep Transfer-Encoding */
    int chunk_self;       /* body framed in chunks by aigw: Content-Length dropped,
                             Transfer-Encoding: chunked added */
    int close;            /* the client connection closes after this response */
    int http10_keepalive; /* HTTP/1.0 client that keeps the connection: say so */
    const char *request_id;
    size_t request_id_len;
    const char *backend; /* x-aigw-backend (NULL = no x-aigw-* headers) */
    int attempts;        /* x-aigw-attempts */
    const char *extra;   /* more header lines of aigw's own (each ending "\r\n"), or NULL */
    size_t extra_len;
    int own_ratelimit; /* extra has aigw's x-ratelimit-*: the upstream's are dropped */
};

/* Builds the client response head: hop-by-hop headers and the upstream's X-Request-Id are
 * dropped, X-Request-Id and Connection are added, and with r->backend set x-aigw-backend and
 * x-aigw-attempts replace any the upstream sent. Returns the length or -ENOSPC. */
int proxy_build_response_head(char *buf, size_t cap, const struct proxy_resp *r);

/* Writes the chunk-size line for n bytes ("1a2\r\n") into out; returns its length. */
size_t proxy_chunk_line(char out[20], size_t n);

/* Newlines at the end of an SSE byte stream after p[0, n) was appended to one that ended with
 * `prev` of them ('\r' ignored; at most 2: two end an event). */
int proxy_sse_newlines(int prev, const char *p, size_t n);

/* Writes a 32-hex-digit request id (no NUL): unique per (seed1, counter), mixed with seed2. */
void proxy_request_id(char out[32], uint64_t seed1, uint64_t seed2, uint64_t counter);

#endif
