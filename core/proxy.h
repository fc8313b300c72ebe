/* Request-path text transformations, free of I/O: the upstream request head, the response head
 * sent back to the client, gateway error responses, hop-by-hop rules, request ids, and the
 * "model"/"stream" fields of a JSON request body. */
#ifndef AIGW_CORE_PROXY_H
#define AIGW_CORE_PROXY_H

#include <stddef.h>
#include <stdint.h>

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
};

/* 1 when the path is under /v1/ (the only paths aigw forwards). */
int proxy_path_ok(const char *path, size_t len);

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
    int close;            /* the client connection closes after this response */
    int http10_keepalive; /* HTTP/1.0 client that keeps the connection: say so */
    const char *request_id;
    size_t request_id_len;
};

/* Builds the client response head: hop-by-hop headers and the upstream's X-Request-Id are
 * dropped, X-Request-Id and Connection are added. Returns the length or -ENOSPC. */
int proxy_build_response_head(char *buf, size_t cap, const struct proxy_resp *r);

/* Builds a complete gateway error response with an OpenAI-shaped JSON body. retry_after > 0
 * adds Retry-After; request_id may be NULL. Returns the length or -ENOSPC. */
int proxy_build_error(char *buf, size_t cap, int status, const char *type, const char *code,
                      const char *message, int close, int retry_after, const char *request_id,
                      size_t request_id_len);

/* Reason phrase for the statuses aigw makes itself ("Bad Gateway"); "Unknown" otherwise. */
const char *proxy_status_reason(int status);

/* Writes a 32-hex-digit request id (no NUL): unique per (seed1, counter), mixed with seed2. */
void proxy_request_id(char out[32], uint64_t seed1, uint64_t seed2, uint64_t counter);

/* Fields of a JSON request body aigw looks at. */
struct proxy_body_info {
    const char *model; /* raw JSON string contents (escapes untouched) or NULL */
    size_t model_len;
    int stream; /* "stream": true */
};

/* Parses body as JSON with jsmn using tokens (ntok of them; callers keep and grow it). Returns 0
 * when the body is a JSON object (info filled), -EINVAL when it is not, -ENOMEM when ntok is
 * too small (grow it and call again). */
int proxy_parse_body(const char *body, size_t len, void *tokens, unsigned ntok,
                     struct proxy_body_info *info);

/* Bytes one token takes, for callers sizing the tokens array of proxy_parse_body. */
size_t proxy_token_size(void);

#endif
