/* Request-path text transformations: upstream request head, client response head, gateway
 * errors, hop-by-hop rules, request ids, JSON body fields. Pure functions, no I/O. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#define JSMN_STATIC
#define JSMN_STRICT
#include <jsmn.h>

#include "core/proxy.h"
#include "core/util.h"

/* Bounded output buffer: appends past cap only set `over`, so callers check once at the end. */
struct out {
    char *p;
    size_t len, cap;
    int over;
};

static void out_mem(struct out *o, const char *s, size_t n)
{
    if (o->over || n > o->cap - o->len) {
        o->over = 1;
        return;
    }
    memcpy(o->p + o->len, s, n);
    o->len += n;
}

static void out_str(struct out *o, const char *s)
{
    out_mem(o, s, strlen(s));
}

static void out_u64(struct out *o, uint64_t v)
{
    char tmp[24];
    size_t i = sizeof(tmp);
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    out_mem(o, tmp + i, sizeof(tmp) - i);
}

static void out_hdr(struct out *o, const char *name, const char *v, size_t vlen)
{
    out_str(o, name);
    out_mem(o, ": ", 2);
    out_mem(o, v, vlen);
    out_mem(o, "\r\n", 2);
}

static int out_done(const struct out *o)
{
    return o->over ? -ENOSPC : (int)o->len;
}

static int span_ieq(const char *p, size_t len, const char *s)
{
    size_t n = strlen(s);
    if (len != n)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char a = p[i], b = s[i];
        if (a >= 'A' && a <= 'Z')
            a = (char)(a - 'A' + 'a');
        if (b >= 'A' && b <= 'Z')
            b = (char)(b - 'A' + 'a');
        if (a != b)
            return 0;
    }
    return 1;
}

int proxy_path_ok(const char *path, size_t len)
{
    return len >= 4 && memcmp(path, "/v1/", 4) == 0;
}

int proxy_hop_by_hop(const char *name, size_t len)
{
    static const char *const hop[] = {
        "connection", "keep-alive", "proxy-connection",    "te",
        "trailer",    "upgrade",    "proxy-authorization", "transfer-encoding",
    };
    /* cheap length filter first: these are looked up for every forwarded header */
    if (len < 2 || len > 19)
        return 0;
    for (size_t i = 0; i < ARRAY_SIZE(hop); i++)
        if (span_ieq(name, len, hop[i]))
            return 1;
    return 0;
}

/* 1 when the comma-separated token list v contains name (case-insensitive, spaces ignored). */
static int list_has(const char *v, size_t vlen, const char *name, size_t len)
{
    size_t i = 0;
    while (i < vlen) {
        while (i < vlen && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
            i++;
        size_t s = i;
        while (i < vlen && v[i] != ',')
            i++;
        size_t e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t'))
            e--;
        if (e - s == len && len > 0) {
            char tmp[64];
            if (len < sizeof(tmp)) {
                memcpy(tmp, v + s, len);
                tmp[len] = 0;
                if (span_ieq(name, len, tmp))
                    return 1;
            }
        }
    }
    return 0;
}

int proxy_conn_lists(const struct proxy_hdr *hdrs, size_t n, const char *name, size_t len)
{
    for (size_t i = 0; i < n; i++)
        if (span_ieq(hdrs[i].name, hdrs[i].name_len, "connection") &&
            list_has(hdrs[i].value, hdrs[i].value_len, name, len))
            return 1;
    return 0;
}

int proxy_header_is_hop(const struct proxy_hdr *hdrs, size_t n, size_t i)
{
    return proxy_hop_by_hop(hdrs[i].name, hdrs[i].name_len) ||
           proxy_conn_lists(hdrs, n, hdrs[i].name, hdrs[i].name_len);
}

static void out_hostport(struct out *o, const struct url *u)
{
    int v6 = strchr(u->host, ':') != NULL;
    if (v6)
        out_mem(o, "[", 1);
    out_str(o, u->host);
    if (v6)
        out_mem(o, "]", 1);
    if (u->port != (u->tls ? 443 : 80)) {
        out_mem(o, ":", 1);
        out_u64(o, u->port);
    }
}

int proxy_build_request(char *buf, size_t cap, const struct proxy_req *r,
                        const struct conf_backend *be)
{
    struct out o = {buf, 0, cap, 0};
    int xff_seen = 0;

    out_mem(&o, r->method, r->method_len);
    out_mem(&o, " ", 1);
    out_str(&o, be->url.prefix);
    /* "/v1/REST" -> prefix + "/REST"; callers checked proxy_path_ok */
    if (r->path_len >= 3 && memcmp(r->path, "/v1", 3) == 0)
        out_mem(&o, r->path + 3, r->path_len - 3);
    else
        out_mem(&o, r->path, r->path_len);
    out_str(&o, " HTTP/1.1\r\nHost: ");
    out_hostport(&o, &be->url);
    out_mem(&o, "\r\n", 2);

    for (size_t i = 0; i < r->n_hdrs; i++) {
        const struct proxy_hdr *h = &r->hdrs[i];
        if (proxy_header_is_hop(r->hdrs, r->n_hdrs, i))
            continue;
        if (span_ieq(h->name, h->name_len, "host") ||
            span_ieq(h->name, h->name_len, "content-length") ||
            span_ieq(h->name, h->name_len, "expect") ||
            span_ieq(h->name, h->name_len, "x-real-ip") ||
            span_ieq(h->name, h->name_len, "x-forwarded-proto") ||
            span_ieq(h->name, h->name_len, "x-request-id"))
            continue;
        if (be->api_key && span_ieq(h->name, h->name_len, "authorization"))
            continue;
        if (span_ieq(h->name, h->name_len, "x-forwarded-for")) {
            /* every X-Forwarded-For the client sent, joined, then the client itself */
            if (xff_seen)
                continue;
            xff_seen = 1;
            out_str(&o, "X-Forwarded-For: ");
            for (size_t j = i; j < r->n_hdrs; j++) {
                const struct proxy_hdr *x = &r->hdrs[j];
                if (!span_ieq(x->name, x->name_len, "x-forwarded-for") || x->value_len == 0)
                    continue;
                out_mem(&o, x->value, x->value_len);
                out_mem(&o, ", ", 2);
            }
            out_str(&o, r->client_ip);
            out_mem(&o, "\r\n", 2);
            continue;
        }
        out_mem(&o, h->name, h->name_len);
        out_mem(&o, ": ", 2);
        out_mem(&o, h->value, h->value_len);
        out_mem(&o, "\r\n", 2);
    }
    if (!xff_seen)
        out_hdr(&o, "X-Forwarded-For", r->client_ip, strlen(r->client_ip));
    out_hdr(&o, "X-Real-IP", r->client_ip, strlen(r->client_ip));
    out_str(&o, "X-Forwarded-Proto: http\r\n");
    out_hdr(&o, "X-Request-Id", r->request_id, r->request_id_len);
    if (be->api_key) {
        out_str(&o, "Authorization: Bearer ");
        out_str(&o, be->api_key);
        out_mem(&o, "\r\n", 2);
    }
    if (r->has_body || r->body_len) {
        out_str(&o, "Content-Length: ");
        out_u64(&o, r->body_len);
        out_mem(&o, "\r\n", 2);
    }
    if (be->keepalive == 0)
        out_str(&o, "Connection: close\r\n");
    out_mem(&o, "\r\n", 2);
    return out_done(&o);
}

int proxy_build_response_head(char *buf, size_t cap, const struct proxy_resp *r)
{
    struct out o = {buf, 0, cap, 0};

    out_str(&o, "HTTP/1.1 ");
    out_u64(&o, (uint64_t)r->status);
    out_mem(&o, " ", 1);
    out_mem(&o, r->reason, r->reason_len);
    out_mem(&o, "\r\n", 2);
    for (size_t i = 0; i < r->n_hdrs; i++) {
        const struct proxy_hdr *h = &r->hdrs[i];
        /* Transfer-Encoding stays when the body passes through with its chunk framing */
        int te = span_ieq(h->name, h->name_len, "transfer-encoding");
        if (te ? !r->keep_chunked
               : proxy_header_is_hop(r->hdrs, r->n_hdrs, i) ||
                     span_ieq(h->name, h->name_len, "x-request-id"))
            continue;
        out_mem(&o, h->name, h->name_len);
        out_mem(&o, ": ", 2);
        out_mem(&o, h->value, h->value_len);
        out_mem(&o, "\r\n", 2);
    }
    out_hdr(&o, "X-Request-Id", r->request_id, r->request_id_len);
    if (r->close)
        out_str(&o, "Connection: close\r\n");
    else if (r->http10_keepalive)
        out_str(&o, "Connection: keep-alive\r\n");
    out_mem(&o, "\r\n", 2);
    return out_done(&o);
}

const char *proxy_status_reason(int status)
{
    switch (status) {
    case 100:
        return "Continue";
    case 200:
        return "OK";
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

int proxy_build_error(char *buf, size_t cap, int status, const char *type, const char *code,
                      const char *message, int close, int retry_after, const char *request_id,
                      size_t request_id_len)
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
    out_str(&o, proxy_status_reason(status));
    out_str(&o, "\r\nContent-Type: application/json\r\nContent-Length: ");
    out_u64(&o, b.len);
    out_mem(&o, "\r\n", 2);
    if (retry_after > 0) {
        out_str(&o, "Retry-After: ");
        out_u64(&o, (uint64_t)retry_after);
        out_mem(&o, "\r\n", 2);
    }
    if (request_id && request_id_len)
        out_hdr(&o, "X-Request-Id", request_id, request_id_len);
    out_str(&o, close ? "Connection: close\r\n\r\n" : "Connection: keep-alive\r\n\r\n");
    out_mem(&o, body, b.len);
    return out_done(&o);
}

/* splitmix64's finaliser: a bijection, so distinct counters give distinct ids. */
static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static void hex64(char *out, uint64_t v)
{
    static const char hex[] = "0123456789abcdef";
    for (int i = 15; i >= 0; i--) {
        out[i] = hex[v & 15];
        v >>= 4;
    }
}

void proxy_request_id(char out[32], uint64_t seed1, uint64_t seed2, uint64_t counter)
{
    hex64(out, seed1);
    hex64(out + 16, mix64(counter ^ seed2));
}

size_t proxy_token_size(void)
{
    return sizeof(jsmntok_t);
}

int proxy_parse_body(const char *body, size_t len, void *tokens, unsigned ntok,
                     struct proxy_body_info *info)
{
    jsmn_parser p;
    jsmntok_t *t = tokens;

    info->model = NULL;
    info->model_len = 0;
    info->stream = 0;
    /* skip leading white space: jsmn would accept a primitive; aigw wants an object */
    size_t i0 = 0;
    while (i0 < len &&
           (body[i0] == ' ' || body[i0] == '\t' || body[i0] == '\r' || body[i0] == '\n'))
        i0++;
    if (i0 == len || body[i0] != '{')
        return -EINVAL;
    if (!t || ntok == 0)
        return -ENOMEM; /* jsmn would only count tokens */
    jsmn_init(&p);
    int n = jsmn_parse(&p, body, len, t, ntok);
    if (n == JSMN_ERROR_NOMEM)
        return -ENOMEM;
    if (n < 1 || t[0].type != JSMN_OBJECT)
        return -EINVAL;
    /* nothing but white space may follow the object */
    for (size_t k = (size_t)t[0].end; k < len; k++)
        if (body[k] != ' ' && body[k] != '\t' && body[k] != '\r' && body[k] != '\n')
            return -EINVAL;

    int i = 1;
    for (int pair = 0; pair < t[0].size && i + 1 < n; pair++) {
        const jsmntok_t *k = &t[i], *v = &t[i + 1];
        const char *ks = body + k->start;
        size_t kl = (size_t)(k->end - k->start);
        if (k->type == JSMN_STRING && kl == 5 && memcmp(ks, "model", 5) == 0) {
            if (v->type == JSMN_STRING) {
                info->model = body + v->start;
                info->model_len = (size_t)(v->end - v->start);
            }
        } else if (k->type == JSMN_STRING && kl == 6 && memcmp(ks, "stream", 6) == 0) {
            info->stream = v->type == JSMN_PRIMITIVE && v->end - v->start == 4 &&
                           memcmp(body + v->start, "true", 4) == 0;
        }
        /* skip the value and everything nested in it */
        int end = v->end;
        i += 2;
        while (i < n && t[i].start < end)
            i++;
    }
    return 0;
}
