/* Header rewriting: the upstream request head and the client response head built afresh from
 * parsed spans, hop-by-hop rules, chunk framing, request ids. Pure functions, no I/O. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "core/out.h"
#include "core/proxy.h"
#include "core/util.h"

int proxy_path_ok(const char *path, size_t len)
{
    return len >= 4 && memcmp(path, "/v1/", 4) == 0;
}

/* 1 when p[i..] starts with "%XY" for the hex byte (upper-case XY given, any case matches). */
static int pct_is(const char *p, size_t len, size_t i, char x, char y)
{
    return i + 2 < len && p[i] == '%' && p[i + 1] == x && (p[i + 2] | 0x20) == (y | 0x20);
}

/* The bytes a path is checked further at: '.', '%' and '\\' may make it unsafe, '?' and '#'
 * end it. */
static const unsigned char path_stop[256] = {
    ['.'] = 1, ['%'] = 1, ['\\'] = 1, ['?'] = 1, ['#'] = 1,
};

int proxy_path_safe(const char *path, size_t len)
{
    size_t end = 0, seg = 0, dots = 0, other = 0;

    /* the usual path has none of them before its query: safe, in one pass */
    while (end < len && !path_stop[(unsigned char)path[end]])
        end++;
    if (end == len || path[end] == '?' || path[end] == '#')
        return 1;
    end = 0;
    while (end < len && path[end] != '?' && path[end] != '#')
        end++;
    for (size_t i = 0; i <= end; i++) {
        char ch = i < end ? path[i] : '/';
        if (ch == '/') {
            /* a segment of only one or two dots, each raw or %2e, is a dot-segment */
            if (i > seg && !other && (dots == 1 || dots == 2))
                return 0;
            seg = i + 1;
            dots = other = 0;
            continue;
        }
        if (ch == '.') {
            dots++;
            continue;
        }
        if (ch == '\\')
            return 0;
        if (ch == '%') { /* only a '%' can start %5C, %2F or %2E */
            if (pct_is(path, end, i, '5', 'C') || pct_is(path, end, i, '2', 'F'))
                return 0;
            if (pct_is(path, end, i, '2', 'E')) {
                dots++;
                i += 2;
                continue;
            }
        }
        other = 1;
    }
    return 1;
}

/* Header names the request path treats specially. */
enum hname {
    HN_OTHER = 0,
    HN_TE, /* hop-by-hop: HN_TE .. HN_TRANSFER_ENCODING */
    HN_TRAILER,
    HN_UPGRADE,
    HN_CONNECTION,
    HN_KEEP_ALIVE,
    HN_PROXY_CONNECTION,
    HN_PROXY_AUTHORIZATION,
    HN_TRANSFER_ENCODING,
    HN_HOST,
    HN_EXPECT,
    HN_X_REAL_IP,
    HN_X_REQUEST_ID,
    HN_AUTHORIZATION,
    HN_CONTENT_LENGTH,
    HN_X_AIGW_BACKEND,
    HN_X_FORWARDED_FOR,
    HN_X_AIGW_ATTEMPTS,
    HN_X_FORWARDED_PROTO,
};

static int is_hop(enum hname k)
{
    return k >= HN_TE && k <= HN_TRANSFER_ENCODING;
}

#define NAME_IS(p, len, lit) proxy_name_eq(p, len, lit, sizeof(lit) - 1)

/* Sorts a header name into enum hname: the length picks the few candidates, so a header that
 * matters to no one costs one switch (this runs for every header of every request and
 * response). */
static enum hname hname_of(const char *p, size_t len)
{
    switch (len) {
    case 2:
        return NAME_IS(p, len, "te") ? HN_TE : HN_OTHER;
    case 4:
        return NAME_IS(p, len, "host") ? HN_HOST : HN_OTHER;
    case 6:
        return NAME_IS(p, len, "expect") ? HN_EXPECT : HN_OTHER;
    case 7:
        if (NAME_IS(p, len, "trailer"))
            return HN_TRAILER;
        return NAME_IS(p, len, "upgrade") ? HN_UPGRADE : HN_OTHER;
    case 9:
        return NAME_IS(p, len, "x-real-ip") ? HN_X_REAL_IP : HN_OTHER;
    case 10:
        if (NAME_IS(p, len, "connection"))
            return HN_CONNECTION;
        return NAME_IS(p, len, "keep-alive") ? HN_KEEP_ALIVE : HN_OTHER;
    case 12:
        return NAME_IS(p, len, "x-request-id") ? HN_X_REQUEST_ID : HN_OTHER;
    case 13:
        return NAME_IS(p, len, "authorization") ? HN_AUTHORIZATION : HN_OTHER;
    case 14:
        if (NAME_IS(p, len, "content-length"))
            return HN_CONTENT_LENGTH;
        return NAME_IS(p, len, "x-aigw-backend") ? HN_X_AIGW_BACKEND : HN_OTHER;
    case 15:
        if (NAME_IS(p, len, "x-forwarded-for"))
            return HN_X_FORWARDED_FOR;
        return NAME_IS(p, len, "x-aigw-attempts") ? HN_X_AIGW_ATTEMPTS : HN_OTHER;
    case 16:
        return NAME_IS(p, len, "proxy-connection") ? HN_PROXY_CONNECTION : HN_OTHER;
    case 17:
        if (NAME_IS(p, len, "transfer-encoding"))
            return HN_TRANSFER_ENCODING;
        return NAME_IS(p, len, "x-forwarded-proto") ? HN_X_FORWARDED_PROTO : HN_OTHER;
    case 19:
        return NAME_IS(p, len, "proxy-authorization") ? HN_PROXY_AUTHORIZATION : HN_OTHER;
    default:
        return HN_OTHER;
    }
}

int proxy_hop_by_hop(const char *name, size_t len)
{
    return is_hop(hname_of(name, len));
}

/* 1 when any of hdrs is a Connection header: only then can it list other names. */
static int has_connection(const struct proxy_hdr *hdrs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (hdrs[i].name_len == 10 && NAME_IS(hdrs[i].name, 10, "connection"))
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
        if (e - s == len && len > 0 && strncasecmp(v + s, name, len) == 0)
            return 1;
    }
    return 0;
}

/* The tokens of a head's Connection headers, parsed once per head (not once per header). */
#define CONN_TOKENS_MAX 32
struct conn_tokens {
    const struct proxy_hdr *hdrs; /* the head, for the slow path */
    size_t n_hdrs;
    uint64_t lens; /* bit min(len, 63) set for each token length: most names miss at once */
    uint32_t n;
    int overflow; /* more tokens than fit: fall back to scanning the headers */
    struct {
        const char *p;
        size_t len;
    } t[CONN_TOKENS_MAX];
};

static void conn_tokens_init(struct conn_tokens *ct, const struct proxy_hdr *hdrs, size_t n)
{
    ct->hdrs = hdrs;
    ct->n_hdrs = n;
    ct->lens = 0;
    ct->n = 0;
    ct->overflow = 0;
    for (size_t h = 0; h < n; h++) {
        if (hdrs[h].name_len != 10 || !NAME_IS(hdrs[h].name, 10, "connection"))
            continue;
        const char *v = hdrs[h].value;
        size_t vlen = hdrs[h].value_len, i = 0;
        while (i < vlen) {
            while (i < vlen && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
                i++;
            size_t s = i;
            while (i < vlen && v[i] != ',')
                i++;
            size_t e = i;
            while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t'))
                e--;
            if (e == s)
                continue;
            if (ct->n == CONN_TOKENS_MAX) {
                ct->overflow = 1;
                return;
            }
            ct->t[ct->n].p = v + s;
            ct->t[ct->n++].len = e - s;
            ct->lens |= 1ULL << (e - s < 63 ? e - s : 63);
        }
    }
}

/* 1 when a Connection header of the head lists name. */
static int conn_tokens_has(const struct conn_tokens *ct, const char *name, size_t len)
{
    if (ct->overflow)
        return proxy_conn_lists(ct->hdrs, ct->n_hdrs, name, len);
    if (!(ct->lens & (1ULL << (len < 63 ? len : 63))))
        return 0;
    for (uint32_t i = 0; i < ct->n; i++)
        if (ct->t[i].len == len && strncasecmp(ct->t[i].p, name, len) == 0)
            return 1;
    return 0;
}

int proxy_conn_lists(const struct proxy_hdr *hdrs, size_t n, const char *name, size_t len)
{
    for (size_t i = 0; i < n; i++)
        if (hdrs[i].name_len == 10 && NAME_IS(hdrs[i].name, 10, "connection") &&
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
    int conn = has_connection(r->hdrs, r->n_hdrs);
    size_t ip_len = strlen(r->client_ip);
    struct conn_tokens ct;

    if (conn)
        conn_tokens_init(&ct, r->hdrs, r->n_hdrs);

    out_mem(&o, r->method, r->method_len);
    OUT_LIT(&o, " ");
    out_str(&o, be->url.prefix);
    /* "/v1/REST" -> prefix + "/REST"; callers checked proxy_path_ok */
    if (r->path_len >= 3 && memcmp(r->path, "/v1", 3) == 0)
        out_mem(&o, r->path + 3, r->path_len - 3);
    else
        out_mem(&o, r->path, r->path_len);
    OUT_LIT(&o, " HTTP/1.1\r\nHost: ");
    out_hostport(&o, &be->url);
    OUT_LIT(&o, "\r\n");

    for (size_t i = 0; i < r->n_hdrs; i++) {
        const struct proxy_hdr *h = &r->hdrs[i];
        enum hname k = hname_of(h->name, h->name_len);
        if (is_hop(k))
            continue;
        if (conn && conn_tokens_has(&ct, h->name, h->name_len))
            continue;
        switch (k) {
        case HN_HOST:
        case HN_CONTENT_LENGTH:
        case HN_EXPECT:
        case HN_X_REAL_IP:
        case HN_X_FORWARDED_PROTO:
        case HN_X_REQUEST_ID:
            continue;
        case HN_AUTHORIZATION:
            if (be->api_key || r->strip_auth)
                continue;
            break;
        case HN_OTHER:
            /* where other clients put a key (Azure's api-key, Anthropic's x-api-key): with
             * aigw's own keys, one sent there may be one of them, and stays here */
            if (r->strip_auth && (NAME_IS(h->name, h->name_len, "api-key") ||
                                  NAME_IS(h->name, h->name_len, "x-api-key")))
                continue;
            break;
        case HN_X_FORWARDED_FOR:
            /* every X-Forwarded-For the client sent, joined, then the client itself */
            if (xff_seen)
                continue;
            xff_seen = 1;
            OUT_LIT(&o, "X-Forwarded-For: ");
            for (size_t j = i; j < r->n_hdrs; j++) {
                const struct proxy_hdr *x = &r->hdrs[j];
                if (x->value_len == 0 || !NAME_IS(x->name, x->name_len, "x-forwarded-for"))
                    continue;
                out_mem(&o, x->value, x->value_len);
                OUT_LIT(&o, ", ");
            }
            out_mem(&o, r->client_ip, ip_len);
            OUT_LIT(&o, "\r\n");
            continue;
        default:
            break;
        }
        out_mem(&o, h->name, h->name_len);
        OUT_LIT(&o, ": ");
        out_mem(&o, h->value, h->value_len);
        OUT_LIT(&o, "\r\n");
    }
    if (!xff_seen) {
        OUT_LIT(&o, "X-Forwarded-For: ");
        out_mem(&o, r->client_ip, ip_len);
        OUT_LIT(&o, "\r\n");
    }
    OUT_LIT(&o, "X-Real-IP: ");
    out_mem(&o, r->client_ip, ip_len);
    OUT_LIT(&o, "\r\nX-Forwarded-Proto: http\r\nX-Request-Id: ");
    out_mem(&o, r->request_id, r->request_id_len);
    OUT_LIT(&o, "\r\n");
    if (be->api_key) {
        OUT_LIT(&o, "Authorization: Bearer ");
        out_str(&o, be->api_key);
        OUT_LIT(&o, "\r\n");
    }
    if (r->has_body || r->body_len) {
        OUT_LIT(&o, "Content-Length: ");
        out_u64(&o, r->body_len);
        OUT_LIT(&o, "\r\n");
    }
    if (be->keepalive == 0)
        OUT_LIT(&o, "Connection: close\r\n");
    OUT_LIT(&o, "\r\n");
    return out_done(&o);
}

int proxy_build_response_head(char *buf, size_t cap, const struct proxy_resp *r)
{
    struct out o = {buf, 0, cap, 0};
    int conn = has_connection(r->hdrs, r->n_hdrs);
    struct conn_tokens ct;

    if (conn)
        conn_tokens_init(&ct, r->hdrs, r->n_hdrs);
    if (r->status >= 100 && r->status <= 999) {
        char line[13] = "HTTP/1.1 000 ";
        line[9] = (char)('0' + r->status / 100);
        line[10] = (char)('0' + r->status / 10 % 10);
        line[11] = (char)('0' + r->status % 10);
        out_mem(&o, line, sizeof(line));
    } else {
        OUT_LIT(&o, "HTTP/1.1 ");
        out_u64(&o, (uint64_t)r->status);
        OUT_LIT(&o, " ");
    }
    out_mem(&o, r->reason, r->reason_len);
    OUT_LIT(&o, "\r\n");
    for (size_t i = 0; i < r->n_hdrs; i++) {
        const struct proxy_hdr *h = &r->hdrs[i];
        enum hname k = hname_of(h->name, h->name_len);
        /* Transfer-Encoding stays when the body passes through with its chunk framing */
        if (k == HN_TRANSFER_ENCODING) {
            if (!r->keep_chunked)
                continue;
        } else if (is_hop(k) || k == HN_X_REQUEST_ID || (k == HN_CONTENT_LENGTH && r->chunk_self)) {
            continue;
        } else if (conn && k != HN_CONTENT_LENGTH && conn_tokens_has(&ct, h->name, h->name_len)) {
            /* never the framing: a keep-alive answer without Content-Length (or the
             * Transfer-Encoding kept above) would leave the client waiting for a close */
            continue;
        }
        /* ours replace what an upstream (another aigw, say) said */
        if (r->backend && (k == HN_X_AIGW_BACKEND || k == HN_X_AIGW_ATTEMPTS))
            continue;
        if (r->own_ratelimit && h->name_len > 12 && NAME_IS(h->name, 12, "x-ratelimit-"))
            continue;
        out_mem(&o, h->name, h->name_len);
        OUT_LIT(&o, ": ");
        out_mem(&o, h->value, h->value_len);
        OUT_LIT(&o, "\r\n");
    }
    if (r->chunk_self)
        OUT_LIT(&o, "Transfer-Encoding: chunked\r\n");
    out_via(&o, r->backend, r->attempts);
    if (r->extra)
        out_mem(&o, r->extra, r->extra_len);
    OUT_LIT(&o, "X-Request-Id: ");
    out_mem(&o, r->request_id, r->request_id_len);
    OUT_LIT(&o, "\r\n");
    if (r->close)
        OUT_LIT(&o, "Connection: close\r\n");
    else if (r->http10_keepalive)
        OUT_LIT(&o, "Connection: keep-alive\r\n");
    OUT_LIT(&o, "\r\n");
    return out_done(&o);
}

size_t proxy_chunk_line(char out[20], size_t n)
{
    static const char hex[] = "0123456789abcdef";
    char tmp[16];
    size_t i = sizeof(tmp), len = 0;
    do {
        tmp[--i] = hex[n & 15];
        n >>= 4;
    } while (n);
    memcpy(out, tmp + i, sizeof(tmp) - i);
    len = sizeof(tmp) - i;
    out[len++] = '\r';
    out[len++] = '\n';
    return len;
}

int proxy_sse_newlines(int prev, const char *p, size_t n)
{
    int nl = 0;
    for (size_t i = n; i > 0; i--) {
        char ch = p[i - 1];
        if (ch == '\r')
            continue;
        if (ch != '\n')
            return nl;
        if (++nl == 2)
            return 2;
    }
    nl += prev;
    return nl > 2 ? 2 : nl;
}

/* 16 lower-case hex digits of v: a byte (two digits) per step, as this runs per request. */
static void hex64(char *out, uint64_t v)
{
    static const char hex[] = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
                              "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
                              "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
                              "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
                              "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
                              "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
                              "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf"
                              "e0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff";
    for (int i = 14; i >= 0; i -= 2) {
        memcpy(out + i, hex + 2 * (v & 0xff), 2);
        v >>= 8;
    }
}

void proxy_request_id(char out[32], uint64_t seed1, uint64_t seed2, uint64_t counter)
{
    hex64(out, seed1);
    hex64(out + 16, util_mix64(counter ^ seed2)); /* a bijection: distinct counters, ids */
}
