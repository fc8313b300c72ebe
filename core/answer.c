/* Gateway answers: the responses aigw makes itself (OpenAI-shaped JSON errors, the answer to
 * OPTIONS, the error end of an SSE stream). Pure functions, no I/O. */
#include <errno.h>
#include <string.h>

#include "core/answer.h"
#include "core/out.h"
#include "core/proxy.h"

const char *answer_status_reason(int status)
{
    switch (status) {
    case 100:
        return "Continue";
    case 200:
        return "OK";
    case 204:
        return "No Content";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 413:
        return "Payload Too Large";
    case 417:
        return "Expectation Failed";
    case 429:
        return "Too Many Requests";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    case 501:
        return "Not Implemented";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    case 505:
        return "HTTP Version Not Supported";
    default:
        return "Unknown";
    }
}

/* JSON string contents for s: quotes, backslashes and control characters escaped. */
static void out_json_str(struct out *o, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') {
            char e[2] = {'\\', (char)ch};
            out_mem(o, e, 2);
        } else if (ch == '\n') {
            out_mem(o, "\\n", 2);
        } else if (ch == '\r') {
            out_mem(o, "\\r", 2);
        } else if (ch == '\t') {
            out_mem(o, "\\t", 2);
        } else if (ch < 0x20 || ch == 0x7f) {
            char e[6] = {'\\', 'u', '0', '0', hex[ch >> 4], hex[ch & 15]};
            out_mem(o, e, 6);
        } else {
            out_mem(o, (const char *)&ch, 1);
        }
    }
}

int answer_error(char *buf, size_t cap, int status, const char *type, const char *code,
                 const char *message, int close, int retry_after, const char *request_id,
                 size_t request_id_len)
{
    return answer_error_via(buf, cap, status, type, code, message, close, retry_after, request_id,
                            request_id_len, NULL, 0, 0);
}

int answer_error_via(char *buf, size_t cap, int status, const char *type, const char *code,
                     const char *message, int close, int retry_after, const char *request_id,
                     size_t request_id_len, const char *backend, int attempts, int head_only)
{
    return answer_error_hdrs(buf, cap, status, type, code, message, close, retry_after, request_id,
                             request_id_len, backend, attempts, head_only, NULL);
}

int answer_error_hdrs(char *buf, size_t cap, int status, const char *type, const char *code,
                      const char *message, int close, int retry_after, const char *request_id,
                      size_t request_id_len, const char *backend, int attempts, int head_only,
                      const char *extra)
{
    char body[1024];
    struct out b = {body, 0, sizeof(body), 0};
    out_str(&b, "{\"error\":{\"message\":\"");
    out_json_str(&b, message);
    out_str(&b, "\",\"type\":\"");
    out_json_str(&b, type);
    out_str(&b, "\",\"code\":\"");
    out_json_str(&b, code);
    out_str(&b, "\"}}\n");
    if (b.over)
        return -ENOSPC;

    struct out o = {buf, 0, cap, 0};
    out_str(&o, "HTTP/1.1 ");
    out_u64(&o, (uint64_t)status);
    out_mem(&o, " ", 1);
    out_str(&o, answer_status_reason(status));
    out_str(&o, "\r\nContent-Type: application/json\r\nContent-Length: ");
    out_u64(&o, b.len);
    out_mem(&o, "\r\n", 2);
    if (retry_after > 0) {
        out_str(&o, "Retry-After: ");
        out_u64(&o, (uint64_t)retry_after);
        out_mem(&o, "\r\n", 2);
    }
    if (extra)
        out_str(&o, extra);
    out_via(&o, backend, attempts);
    if (request_id && request_id_len)
        out_hdr(&o, "X-Request-Id", request_id, request_id_len);
    out_str(&o, close ? "Connection: close\r\n\r\n" : "Connection: keep-alive\r\n\r\n");
    if (!head_only)
        out_mem(&o, body, b.len);
    return out_done(&o);
}

int answer_json_head(char *buf, size_t cap, int status, size_t body_len, int close,
                     const char *request_id, size_t request_id_len)
{
    struct out o = {buf, 0, cap, 0};
    OUT_LIT(&o, "HTTP/1.1 ");
    out_u64(&o, (uint64_t)status);
    out_mem(&o, " ", 1);
    out_str(&o, answer_status_reason(status));
    OUT_LIT(&o, "\r\nContent-Type: application/json\r\nContent-Length: ");
    out_u64(&o, body_len);
    OUT_LIT(&o, "\r\n");
    if (request_id && request_id_len)
        out_hdr(&o, "X-Request-Id", request_id, request_id_len);
    out_str(&o, close ? "Connection: close\r\n\r\n" : "Connection: keep-alive\r\n\r\n");
    return out_done(&o);
}

int answer_options(char *buf, size_t cap, const char *allow, int close, const char *request_id,
                   size_t request_id_len)
{
    struct out o = {buf, 0, cap, 0};
    OUT_LIT(&o, "HTTP/1.1 204 No Content\r\nAllow: ");
    out_str(&o, allow);
    OUT_LIT(&o, "\r\n");
    if (request_id && request_id_len)
        out_hdr(&o, "X-Request-Id", request_id, request_id_len);
    out_str(&o, close ? "Connection: close\r\n\r\n" : "Connection: keep-alive\r\n\r\n");
    return out_done(&o);
}

int answer_sse_error(char *buf, size_t cap, const char *prefix, const char *message,
                     const char *code)
{
    char ev[1024];
    struct out e = {ev, 0, sizeof(ev), 0};
    out_str(&e, prefix);
    out_str(&e, "event: error\ndata: {\"error\":{\"message\":\"");
    out_json_str(&e, message);
    out_str(&e, "\",\"type\":\"upstream_error\",\"code\":\"");
    out_json_str(&e, code);
    out_str(&e, "\"}}\n\n");
    if (e.over)
        return -ENOSPC;

    struct out o = {buf, 0, cap, 0};
    char line[20];
    out_mem(&o, line, proxy_chunk_line(line, e.len));
    out_mem(&o, ev, e.len);
    out_str(&o, "\r\n0\r\n\r\n");
    return out_done(&o);
}
