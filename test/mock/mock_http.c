/* aigw-mock HTTP layer: llhttp callbacks, routing, faults, OpenAI-shaped JSON bodies and SSE
 * streams. Bodies are built into per-connection buffers and sent as one write. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define JSMN_STATIC
#define JSMN_STRICT
#include <jsmn.h>

#include "mock.h"

#define MOCK_MODELS_CREATED 1700000000LL

struct piece {
    const char *p;
    size_t n;
};

/* What the mock reads from a chat completion request body. */
struct chat_req {
    const char *model; /* raw JSON string contents (escapes kept), NULL: absent */
    size_t model_len;
    int stream;
    int include_usage;
    const char *user; /* content of the last user message, raw JSON string contents */
    size_t user_len;
    /* the top-level "stream_options" member with a comma next to it, [so_off, so_end); left
       out of the answer's id, so that a gateway adding it upstream changes no byte the
       client gets but the usage chunk (0, 0: none) */
    size_t so_off, so_end;
};

static const char *const mock_model_ids[] = {"demo", "gpt-4o-mini"};

/* ---- request parsing (llhttp callbacks) ---- */

static int on_message_begin(llhttp_t *p)
{
    struct mock_req *r = &((struct mock_conn *)p->data)->req;

    r->arena_len = 0;
    r->url_len = 0;
    r->nhdrs = 0;
    r->cur = 0;
    r->too_large = 0;
    r->body.len = 0;
    return 0;
}

static int arena_put(struct mock_req *r, const char *at, size_t n, int lower)
{
    if (n > MOCK_ARENA_SIZE - r->arena_len) {
        r->too_large = 431;
        return -1;
    }
    if (lower) {
        for (size_t i = 0; i < n; i++) {
            char ch = at[i];
            r->arena[r->arena_len + i] = (ch >= 'A' && ch <= 'Z') ? (char)(ch + 32) : ch;
        }
    } else {
        memcpy(r->arena + r->arena_len, at, n);
    }
    r->arena_len += n;
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n)
{
    struct mock_req *r = &((struct mock_conn *)p->data)->req;

    if (!r->too_large && arena_put(r, at, n, 0) == 0)
        r->url_len += n;
    return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    struct mock_req *r = &((struct mock_conn *)p->data)->req;

    if (r->too_large)
        return 0;
    if (r->cur != 1) {
        if (r->nhdrs == MOCK_MAX_HEADERS) {
            r->too_large = 431;
            return 0;
        }
        struct mock_hdr *h = &r->hdrs[r->nhdrs++];
        h->name_off = (uint16_t)r->arena_len;
        h->name_len = 0;
        h->val_off = (uint16_t)r->arena_len;
        h->val_len = 0;
        r->cur = 1;
    }
    if (arena_put(r, at, n, 1) == 0)
        r->hdrs[r->nhdrs - 1].name_len += (uint16_t)n;
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    struct mock_req *r = &((struct mock_conn *)p->data)->req;
    struct mock_hdr *h;

    if (r->too_large || r->nhdrs == 0)
        return 0;
    h = &r->hdrs[r->nhdrs - 1];
    if (r->cur != 2) {
        h->val_off = (uint16_t)r->arena_len;
        r->cur = 2;
    }
    if (arena_put(r, at, n, 0) == 0)
        h->val_len += (uint16_t)n;
    return 0;
}

static const char *req_header(const struct mock_req *r, const char *name, size_t *len)
{
    size_t nl = strlen(name);

    for (unsigned i = 0; i < r->nhdrs; i++) {
        const struct mock_hdr *h = &r->hdrs[i];
        if (h->name_len == nl && memcmp(r->arena + h->name_off, name, nl) == 0) {
            *len = h->val_len;
            return r->arena + h->val_off;
        }
    }
    return NULL;
}

static int on_headers_complete(llhttp_t *p)
{
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    struct mock_conn *c = p->data;
    size_t n;
    const char *v = req_header(&c->req, "expect", &n);

    if (v && n == 12 && strncasecmp(v, "100-continue", 12) == 0 && !c->req.too_large)
        conn_write_nowait(c, cont, sizeof(cont) - 1);
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    struct mock_req *r = &((struct mock_conn *)p->data)->req;

    if (r->too_large)
        return 0;
    if (n > MOCK_BODY_MAX - r->body.len || mock_buf_append(&r->body, at, n) != 0)
        r->too_large = 413;
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    struct mock_req *r = &((struct mock_conn *)p->data)->req;

    r->method = llhttp_get_method(p);
    r->http_minor = llhttp_get_http_minor(p);
    r->keep_alive = llhttp_should_keep_alive(p);
    /* One request at a time: conn_pump() answers it, then resumes the parser. */
    return HPE_PAUSED;
}

void http_settings_init(llhttp_settings_t *s)
{
    llhttp_settings_init(s);
    s->on_message_begin = on_message_begin;
    s->on_url = on_url;
    s->on_header_field = on_header_field;
    s->on_header_value = on_header_value;
    s->on_headers_complete = on_headers_complete;
    s->on_body = on_body;
    s->on_message_complete = on_message_complete;
}

/* ---- small helpers ---- */

static const char *http_reason(int status)
{
    switch (status) {
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
    case 409:
        return "Conflict";
    case 413:
        return "Payload Too Large";
    case 422:
        return "Unprocessable Entity";
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
        return status < 400 ? "OK" : status < 500 ? "Client Error" : "Server Error";
    }
}

/* JSON-escapes src into dst (NUL-terminated); never cuts an escape sequence in half. */
static size_t json_escape(char *dst, size_t cap, const char *src, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;

    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)src[i];
        char e[6];
        size_t el = 0;

        if (ch == '"' || ch == '\\') {
            e[el++] = '\\';
            e[el++] = (char)ch;
        } else if (ch == '\n') {
            e[el++] = '\\';
            e[el++] = 'n';
        } else if (ch == '\r') {
            e[el++] = '\\';
            e[el++] = 'r';
        } else if (ch == '\t') {
            e[el++] = '\\';
            e[el++] = 't';
        } else if (ch < 0x20 || ch == 0x7f) {
            memcpy(e, "\\u00", 4);
            e[4] = hex[ch >> 4];
            e[5] = hex[ch & 15];
            el = 6;
        } else {
            e[el++] = (char)ch;
        }
        if (o + el + 1 > cap)
            break;
        memcpy(dst + o, e, el);
        o += el;
    }
    if (cap)
        dst[o] = '\0';
    return o;
}

static int buf_append_json(struct mock_buf *b, const char *s, size_t n)
{
    if (mock_buf_reserve(b, n * 6 + 1) != 0)
        return -1;
    b->len += json_escape(b->p + b->len, n * 6 + 1, s, n);
    return 0;
}

static int buf_printf(struct mock_buf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || mock_buf_reserve(b, (size_t)n + 1) != 0)
        return -1;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

static uint64_t fnv1a64_from(uint64_t h, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static uint64_t fnv1a64(const char *p, size_t n)
{
    return fnv1a64_from(0xcbf29ce484222325ULL, p, n);
}

/* Append-only formatting into a fixed buffer, cheaper than snprintf on the request path. The
 * buffers are sized for the longest output; overflow truncates. */
struct fmt {
    char *p;
    char *end;
};

static void fmt_mem(struct fmt *f, const char *s, size_t n)
{
    size_t room = (size_t)(f->end - f->p);

    if (n > room)
        n = room;
    memcpy(f->p, s, n);
    f->p += n;
}

#define FMT_LIT(f, s) fmt_mem((f), (s), sizeof(s) - 1)

static void fmt_str(struct fmt *f, const char *s)
{
    fmt_mem(f, s, strlen(s));
}

static void fmt_u64(struct fmt *f, uint64_t v)
{
    char b[20];
    int i = 20;

    do {
        b[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    fmt_mem(f, b + i, (size_t)(20 - i));
}

static void fmt_hex16(struct fmt *f, uint64_t v)
{
    static const char hex[] = "0123456789abcdef";
    char b[16];

    for (int i = 15; i >= 0; i--) {
        b[i] = hex[v & 15];
        v >>= 4;
    }
    fmt_mem(f, b, 16);
}

static long long mock_created(const struct mock_server *srv)
{
    return srv->opts.created >= 0 ? (long long)srv->opts.created : (long long)time(NULL);
}

static size_t path_len(const struct mock_req *r)
{
    const char *q = memchr(r->arena, '?', r->url_len);

    return q ? (size_t)(q - r->arena) : r->url_len;
}

static int span_ends(const char *p, size_t n, const char *suffix)
{
    size_t sl = strlen(suffix);

    return n >= sl && memcmp(p + n - sl, suffix, sl) == 0;
}

/* ---- sending ---- */

static const char *conn_header(const struct mock_conn *c)
{
    if (!c->resp.keep_alive)
        return "Connection: close\r\n";
    return c->req.http_minor == 0 ? "Connection: keep-alive\r\n" : "";
}

static void log_request(struct mock_conn *c, const char *what)
{
    if (!c->srv->opts.verbose)
        return;
    fprintf(stderr, "aigw-mock %s: %s %.*s -> %s\n", c->srv->opts.name,
            llhttp_method_name((llhttp_method_t)c->req.method), (int)c->req.url_len, c->req.arena,
            what);
}

/* Writes bufs (the first nhead of them are header bytes) after cutting the body at the
 * reset-after or close-after limit; the connection is reset (or closed) once a cut write is
 * done. */
static void send_clipped(struct mock_conn *c, uv_buf_t *bufs, unsigned n, unsigned nhead)
{
    struct mock_resp *rs = &c->resp;
    int64_t limit = rs->f.reset_after;
    int by_close = rs->f.close_after >= 0 && (limit < 0 || rs->f.close_after < limit);

    if (by_close)
        limit = rs->f.close_after;
    if (limit >= 0) {
        int64_t allow = limit - rs->body_sent;
        for (unsigned i = nhead; i < n; i++) {
            if ((int64_t)bufs[i].len >= allow) {
                bufs[i].len = (size_t)allow;
                n = i + 1;
                if (by_close)
                    rs->close_now = 1;
                else
                    rs->reset_now = 1;
                break;
            }
            allow -= (int64_t)bufs[i].len;
        }
    }
    for (unsigned i = nhead; i < n; i++)
        rs->body_sent += (int64_t)bufs[i].len;
    conn_write(c, bufs, n);
}

/* A complete response with Content-Length; body is nbody pieces. */
static void send_simple(struct mock_conn *c, int status, const char *ctype, const char *extra,
                        uv_buf_t *body, unsigned nbody)
{
    uv_buf_t bufs[5];
    size_t blen = 0;
    unsigned n = 1;
    int hl;

    for (unsigned i = 0; i < nbody; i++)
        blen += body[i].len;
    struct fmt f = {c->head, c->head + sizeof(c->head)};
    FMT_LIT(&f, "HTTP/1.1 ");
    fmt_u64(&f, (uint64_t)status);
    FMT_LIT(&f, " ");
    fmt_str(&f, http_reason(status));
    FMT_LIT(&f, "\r\nContent-Type: ");
    fmt_str(&f, ctype);
    FMT_LIT(&f, "\r\nContent-Length: ");
    fmt_u64(&f, blen);
    FMT_LIT(&f, "\r\nx-mock-name: ");
    fmt_str(&f, c->srv->opts.name);
    FMT_LIT(&f, "\r\n");
    if (extra)
        fmt_str(&f, extra);
    fmt_str(&f, conn_header(c));
    FMT_LIT(&f, "\r\n");
    hl = (int)(f.p - c->head);
    bufs[0] = uv_buf_init(c->head, (unsigned)hl);
    if (c->req.method != HTTP_HEAD) {
        for (unsigned i = 0; i < nbody && i < 4; i++)
            bufs[n++] = body[i];
    }
    c->resp.kind = MOCK_RESP_SIMPLE;
    c->resp.status = status;
    if (c->srv->opts.verbose) {
        char st[16];
        snprintf(st, sizeof(st), "%d", status);
        log_request(c, st);
    }
    send_clipped(c, bufs, n, 1);
}

static void send_json(struct mock_conn *c, int status, const char *extra, const char *body,
                      size_t len)
{
    uv_buf_t b = uv_buf_init((char *)body, (unsigned)len);

    send_simple(c, status, "application/json", extra, &b, 1);
}

/* An OpenAI-shaped error body: {"error":{"message","type","param","code"}}. */
static void send_error(struct mock_conn *c, int status, const char *extra, const char *type,
                       const char *code, const char *fmt, ...)
{
    char msg[512];
    char esc[1024];
    va_list ap;
    int n;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    json_escape(esc, sizeof(esc), msg, strlen(msg));
    n = snprintf(c->tail, sizeof(c->tail),
                 "{\"error\":{\"message\":\"%s\",\"type\":\"%s\",\"param\":null,\"code\":%s%s%s}}",
                 esc, type, code ? "\"" : "", code ? code : "null", code ? "\"" : "");
    if (n < 0 || (size_t)n >= sizeof(c->tail))
        n = (int)sizeof(c->tail) - 1;
    send_json(c, status, extra, c->tail, (size_t)n);
}

static void send_fault_status(struct mock_conn *c, int status)
{
    char extra[160] = "";
    const char *type = "server_error";
    const char *code = NULL;
    size_t n = 0;

    if ((status == 429 || status == 503) && c->resp.f.retry_after >= 0) {
        if (c->resp.f.retry_after_date) {
            time_t at = time(NULL) + c->resp.f.retry_after;
            struct tm tm;

            gmtime_r(&at, &tm);
            n = strftime(extra, sizeof(extra), "Retry-After: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
        } else {
            n = (size_t)snprintf(extra, sizeof(extra), "Retry-After: %d\r\n",
                                 c->resp.f.retry_after);
        }
    }
    /* OpenAI's own form: "x-ratelimit-reset-requests: 1s" / "20ms" */
    if (status == 429 && c->resp.f.ratelimit_reset_ms >= 0 && n < sizeof(extra)) {
        int64_t ms = c->resp.f.ratelimit_reset_ms;

        if (ms % 1000 == 0)
            snprintf(extra + n, sizeof(extra) - n, "x-ratelimit-reset-requests: %llds\r\n",
                     (long long)(ms / 1000));
        else
            snprintf(extra + n, sizeof(extra) - n, "x-ratelimit-reset-requests: %lldms\r\n",
                     (long long)ms);
    }
    if (status == 429) {
        type = "requests";
        code = "rate_limit_exceeded";
    } else if (status == 401) {
        type = "invalid_request_error";
        code = "invalid_api_key";
    } else if (status < 500) {
        type = "invalid_request_error";
    }
    send_error(c, status, extra, type, code, "aigw-mock %s: injected status %d", c->srv->opts.name,
               status);
}

/* ---- JSON request body ---- */

/* Index of the token after the subtree rooted at i (jsmn keys have size 1: their value). */
static int tok_skip(const jsmntok_t *t, int n, int i)
{
    int pending = 1;

    while (pending > 0 && i < n) {
        pending += t[i].size - 1;
        i++;
    }
    return i;
}

static int tok_is(const char *js, const jsmntok_t *t, const char *s)
{
    size_t n = strlen(s);

    return t->type == JSMN_STRING && (size_t)(t->end - t->start) == n &&
           memcmp(js + t->start, s, n) == 0;
}

static int chat_parse(struct mock_server *srv, const char *js, size_t len, struct chat_req *q)
{
    jsmn_parser p;
    jsmntok_t *t;
    int n;

    memset(q, 0, sizeof(*q));
    jsmn_init(&p);
    n = jsmn_parse(&p, js, len, srv->tokens, srv->ntokens);
    if (n == JSMN_ERROR_NOMEM) {
        jsmn_init(&p);
        n = jsmn_parse(&p, js, len, NULL, 0);
        if (n < 0)
            return -1;
        void *nt = realloc(srv->tokens, (size_t)n * sizeof(jsmntok_t));
        if (!nt)
            return -1;
        srv->tokens = nt;
        srv->ntokens = (unsigned)n;
        jsmn_init(&p);
        n = jsmn_parse(&p, js, len, srv->tokens, srv->ntokens);
    }
    t = srv->tokens;
    if (n < 1 || t[0].type != JSMN_OBJECT)
        return -1;
    for (int k = 1, keys = t[0].size; keys > 0 && k + 1 < n; keys--) {
        int v = k + 1;
        const jsmntok_t *tv = &t[v];

        if (tok_is(js, &t[k], "model") && tv->type == JSMN_STRING) {
            q->model = js + tv->start;
            q->model_len = (size_t)(tv->end - tv->start);
        } else if (tok_is(js, &t[k], "stream") && tv->type == JSMN_PRIMITIVE) {
            q->stream = js[tv->start] == 't';
        } else if (tok_is(js, &t[k], "stream_options") && tv->type == JSMN_OBJECT) {
            size_t a = (size_t)t[k].start - 1, z = (size_t)tv->end, e = z;
            while (e < len && (js[e] == ' ' || js[e] == '\n' || js[e] == '\r' || js[e] == '\t'))
                e++;
            if (e < len && js[e] == ',') {
                z = e + 1;
            } else {
                size_t b = a;
                while (b > 0 && (js[b - 1] == ' ' || js[b - 1] == '\n' || js[b - 1] == '\r' ||
                                 js[b - 1] == '\t'))
                    b--;
                if (b > 0 && js[b - 1] == ',')
                    a = b - 1;
            }
            q->so_off = a;
            q->so_end = z;
            for (int i = v + 1, m = tv->size; m > 0 && i + 1 < n; m--) {
                if (tok_is(js, &t[i], "include_usage") && t[i + 1].type == JSMN_PRIMITIVE)
                    q->include_usage = js[t[i + 1].start] == 't';
                i = tok_skip(t, n, i + 1);
            }
        } else if (tok_is(js, &t[k], "messages") && tv->type == JSMN_ARRAY) {
            for (int i = v + 1, m = tv->size; m > 0 && i < n; m--) {
                int next = tok_skip(t, n, i);
                if (t[i].type == JSMN_OBJECT) {
                    int is_user = 0;
                    const jsmntok_t *content = NULL;
                    for (int j = i + 1, f = t[i].size; f > 0 && j + 1 < n; f--) {
                        if (tok_is(js, &t[j], "role"))
                            is_user = tok_is(js, &t[j + 1], "user");
                        else if (tok_is(js, &t[j], "content") && t[j + 1].type == JSMN_STRING)
                            content = &t[j + 1];
                        j = tok_skip(t, n, j + 1);
                    }
                    if (is_user && content) {
                        q->user = js + content->start;
                        q->user_len = (size_t)(content->end - content->start);
                    }
                }
                i = next;
            }
        }
        k = tok_skip(t, n, v);
    }
    return 0;
}

/* ---- endpoints ---- */

static void last_record(struct mock_last *l, const struct mock_req *r)
{
    l->arena.len = 0;
    l->body.len = 0;
    l->has_user = 0;
    l->valid = mock_buf_append(&l->arena, r->arena, r->arena_len) == 0 &&
               mock_buf_append(&l->body, r->body.p, r->body.len) == 0;
    l->method = r->method;
    l->url_len = r->url_len;
    l->nhdrs = r->nhdrs;
    memcpy(l->hdrs, r->hdrs, r->nhdrs * sizeof(r->hdrs[0]));
}

static void mock_last(struct mock_conn *c, const struct mock_last *l)
{
    struct mock_buf *b = &c->dyn;
    int err = 0;

    b->len = 0;
    if (!l->valid) {
        err |= buf_printf(b, "{\"method\":null,\"path\":null,\"headers\":{},\"body\":null,"
                             "\"user\":null}");
        goto out;
    }
    err |= buf_printf(b, "{\"method\":\"%s\",\"path\":\"",
                      llhttp_method_name((llhttp_method_t)l->method));
    err |= buf_append_json(b, l->arena.p, l->url_len);
    err |= buf_printf(b, "\",\"headers\":{");
    for (unsigned i = 0; i < l->nhdrs; i++) {
        const struct mock_hdr *h = &l->hdrs[i];
        err |= buf_printf(b, "%s\"", i ? "," : "");
        err |= buf_append_json(b, l->arena.p + h->name_off, h->name_len);
        err |= buf_printf(b, "\":\"");
        err |= buf_append_json(b, l->arena.p + h->val_off, h->val_len);
        err |= buf_printf(b, "\"");
    }
    err |= buf_printf(b, "},\"body\":\"");
    err |= buf_append_json(b, l->body.p, l->body.len);
    err |= buf_printf(b, "\",\"user\":");
    if (l->has_user) {
        err |= buf_printf(b, "\"");
        err |= mock_buf_append(b, l->body.p + l->user_off, l->user_len);
        err |= buf_printf(b, "\"}");
    } else {
        err |= buf_printf(b, "null}");
    }
out:
    if (err) {
        send_error(c, 500, NULL, "server_error", NULL, "out of memory");
        return;
    }
    send_json(c, 200, NULL, b->p, b->len);
}

static void mock_endpoint(struct mock_conn *c, const char *path, size_t plen)
{
    struct mock_server *srv = c->srv;
    int n;

    if (plen == 11 && memcmp(path, "/mock/stats", 11) == 0) {
        n = snprintf(c->tail, sizeof(c->tail),
                     "{\"name\":\"%s\",\"connections\":%llu,\"requests\":%llu,\"active\":%llu,"
                     "\"aborted\":%llu,\"chat_completions\":%llu,\"models\":%llu,"
                     "\"tls_handshakes\":%llu,\"tls_resumed\":%llu,\"in_flight\":%llu,"
                     "\"in_flight_max\":%llu}",
                     srv->name_json, (unsigned long long)srv->connections,
                     (unsigned long long)srv->requests, (unsigned long long)srv->active,
                     (unsigned long long)srv->aborted, (unsigned long long)srv->chat,
                     (unsigned long long)srv->models,
                     (unsigned long long)(srv->tls ? srv->tls->handshakes : 0),
                     (unsigned long long)(srv->tls ? srv->tls->resumed : 0),
                     (unsigned long long)srv->in_flight, (unsigned long long)srv->in_flight_max);
        send_json(c, 200, NULL, c->tail, (size_t)n);
    } else if (plen == 10 && memcmp(path, "/mock/last", 10) == 0) {
        mock_last(c, &srv->last);
    } else if (plen == 16 && memcmp(path, "/mock/last_check", 16) == 0) {
        mock_last(c, &srv->last_check);
    } else if (plen == 11 && memcmp(path, "/mock/reset", 11) == 0) {
        /* Counters start again from zero; the connection count keeps this one. */
        srv->connections = 1;
        srv->requests = 0;
        srv->aborted = 0;
        srv->chat = 0;
        srv->models = 0;
        srv->in_flight_max = srv->in_flight;
        srv->last.valid = 0;
        srv->last_check.valid = 0;
        send_json(c, 200, NULL, "{\"ok\":true}", 11);
    } else {
        send_error(c, 404, NULL, "invalid_request_error", NULL, "Invalid URL (%s %.*s)",
                   llhttp_method_name((llhttp_method_t)c->req.method), (int)plen, path);
    }
}

static void models_list(struct mock_conn *c)
{
    c->srv->models++;
    send_json(c, 200, NULL, c->srv->models_body, c->srv->models_len);
}

static void models_get(struct mock_conn *c, const char *id, size_t idlen)
{
    for (size_t i = 0; i < sizeof(mock_model_ids) / sizeof(mock_model_ids[0]); i++) {
        if (strlen(mock_model_ids[i]) == idlen && memcmp(mock_model_ids[i], id, idlen) == 0) {
            int n = snprintf(c->tail, sizeof(c->tail),
                             "{\"id\":\"%s\",\"object\":\"model\",\"created\":%lld,"
                             "\"owned_by\":\"aigw-mock\"}",
                             mock_model_ids[i],
                             c->srv->opts.created >= 0 ? (long long)c->srv->opts.created
                                                       : MOCK_MODELS_CREATED);
            send_json(c, 200, NULL, c->tail, (size_t)n);
            return;
        }
    }
    send_error(c, 404, NULL, "invalid_request_error", "model_not_found",
               "The model '%.*s' does not exist", (int)(idlen > 100 ? 100 : idlen), id);
}

/* Appends one SSE event (`data: ...\n\n`) made of pieces, in its own HTTP chunk if chunked. */
static int stream_event(struct mock_conn *c, const struct piece *pc, unsigned n)
{
    struct mock_buf *b = &c->dyn;
    size_t len = 8; /* "data: " and "\n\n" */

    for (unsigned i = 0; i < n; i++)
        len += pc[i].n;
    if (mock_buf_reserve(b, len + 32) != 0)
        return -1;
    if (c->resp.chunked)
        b->len += (size_t)sprintf(b->p + b->len, "%zx\r\n", len);
    memcpy(b->p + b->len, "data: ", 6);
    b->len += 6;
    for (unsigned i = 0; i < n; i++) {
        memcpy(b->p + b->len, pc[i].p, pc[i].n);
        b->len += pc[i].n;
    }
    memcpy(b->p + b->len, "\n\n", 2);
    b->len += 2;
    if (c->resp.chunked) {
        memcpy(b->p + b->len, "\r\n", 2);
        b->len += 2;
    }
    return 0;
}

#define PIECE(s) ((struct piece){(s), sizeof(s) - 1})

/* Appends stream event number rs->step to c->dyn: role, N content deltas, finish, [usage],
 * [DONE] (followed by the last chunk). */
static int stream_step(struct mock_conn *c)
{
    struct mock_server *srv = c->srv;
    struct mock_resp *rs = &c->resp;
    unsigned chunks = rs->f.chunks;
    unsigned step = rs->step++;
    struct piece pfx = {rs->pfx, rs->pfx_len};

    if (step == 0) {
        struct piece pc[] = {
            pfx,
            PIECE("{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},"
                  "\"finish_reason\":null}]}"),
        };
        return stream_event(c, pc, 2);
    }
    if (step <= chunks) {
        /* Delta i carries words [i*W/N, (i+1)*W/N), each with the space before it, so the
         * deltas joined give the non-stream content exactly. */
        uint64_t i = step - 1;
        unsigned a = (unsigned)(i * srv->words / chunks);
        unsigned z = (unsigned)((i + 1) * srv->words / chunks);
        /* Stamped: when the chunk is made, right before it is written (same loop turn). */
        char ts[48];
        struct piece end = PIECE("}");
        if (rs->f.stamp) {
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            end.p = ts;
            end.n = (size_t)snprintf(ts, sizeof(ts), ",\"mock_sent_ns\":%llu}",
                                     (unsigned long long)now.tv_sec * 1000000000ull +
                                         (unsigned long long)now.tv_nsec);
        }
        struct piece pc[] = {
            pfx,
            PIECE("{\"index\":0,\"delta\":{\"content\":\""),
            {srv->content + srv->word_off[a], srv->word_off[z] - srv->word_off[a]},
            PIECE("\"},\"finish_reason\":null}]"),
            end,
        };
        return stream_event(c, pc, 5);
    }
    if (step == chunks + 1) {
        struct piece pc[] = {
            pfx,
            PIECE("{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}"),
        };
        return stream_event(c, pc, 2);
    }
    if (rs->include_usage && step == chunks + 2) {
        char usage[160];
        int n = snprintf(usage, sizeof(usage),
                         "],\"usage\":{\"prompt_tokens\":%u,\"completion_tokens\":%u,"
                         "\"total_tokens\":%u}}",
                         rs->prompt_tokens, srv->words, rs->prompt_tokens + srv->words);
        struct piece pc[] = {pfx, {usage, (size_t)n}};
        return stream_event(c, pc, 2);
    }
    struct piece done = PIECE("[DONE]");
    if (stream_event(c, &done, 1) != 0)
        return -1;
    if (rs->chunked)
        return mock_buf_append(&c->dyn, "0\r\n\r\n", 5);
    return 0;
}

static void stream_send_next(struct mock_conn *c, unsigned nhead, uv_buf_t *head)
{
    struct mock_resp *rs = &c->resp;
    uv_buf_t bufs[2];
    unsigned n = 0;

    c->dyn.len = 0;
    do {
        if (stream_step(c) != 0) {
            conn_close(c);
            return;
        }
    } while (rs->f.chunk_interval_ms == 0 && rs->step < rs->nsteps);
    if (nhead)
        bufs[n++] = *head;
    bufs[n++] = uv_buf_init(c->dyn.p, (unsigned)c->dyn.len);
    send_clipped(c, bufs, n, nhead);
}

static void stream_on_timer(uv_timer_t *t)
{
    stream_send_next(t->data, 0, NULL);
}

static void chat_completions(struct mock_conn *c)
{
    struct mock_server *srv = c->srv;
    struct mock_req *r = &c->req;
    struct mock_resp *rs = &c->resp;
    struct chat_req q;
    const char *model = "demo";
    size_t model_len = 4;
    int n;

    srv->chat++;
    if (chat_parse(srv, r->body.p, r->body.len, &q) != 0) {
        send_error(c, 400, NULL, "invalid_request_error", NULL,
                   "We could not parse the JSON body of your request.");
        return;
    }
    if (q.user && srv->last.valid) {
        srv->last.has_user = 1;
        srv->last.user_off = (size_t)(q.user - r->body.p);
        srv->last.user_len = q.user_len;
    }
    if (q.model && q.model_len <= MOCK_MODEL_MAX) {
        model = q.model;
        model_len = q.model_len;
    }
    rs->prompt_tokens = (unsigned)((r->body.len + 3) / 4);
    struct fmt f = {rs->pfx, rs->pfx + sizeof(rs->pfx)};
    FMT_LIT(&f, "{\"id\":\"chatcmpl-");
    fmt_hex16(&f, fnv1a64_from(fnv1a64(r->body.p, q.so_off), r->body.p + q.so_end,
                               r->body.len - q.so_end));
    if (q.stream)
        FMT_LIT(&f, "\",\"object\":\"chat.completion.chunk\",\"created\":");
    else
        FMT_LIT(&f, "\",\"object\":\"chat.completion\",\"created\":");
    fmt_u64(&f, (uint64_t)mock_created(srv));
    FMT_LIT(&f, ",\"model\":\"");
    fmt_mem(&f, model, model_len);
    FMT_LIT(&f, "\",\"choices\":[");
    rs->pfx_len = (size_t)(f.p - rs->pfx);

    if (!q.stream) {
        uv_buf_t body[3];
        struct fmt t = {c->tail, c->tail + sizeof(c->tail)};
        FMT_LIT(&t, "\"},\"logprobs\":null,\"finish_reason\":\"stop\"}],"
                    "\"usage\":{\"prompt_tokens\":");
        fmt_u64(&t, rs->prompt_tokens);
        FMT_LIT(&t, ",\"completion_tokens\":");
        fmt_u64(&t, srv->words);
        FMT_LIT(&t, ",\"total_tokens\":");
        fmt_u64(&t, (uint64_t)rs->prompt_tokens + srv->words);
        FMT_LIT(&t, "}}");
        /* The message head goes after the shared prefix, in the same buffer. */
        FMT_LIT(&f, "{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"");
        body[0] = uv_buf_init(rs->pfx, (unsigned)(f.p - rs->pfx));
        body[1] = uv_buf_init(srv->content, (unsigned)srv->content_len);
        body[2] = uv_buf_init(c->tail, (unsigned)(t.p - c->tail));
        /* an upstream's own limits, as OpenAI sends them, for a gateway to replace */
        char rl[200];
        if (rs->f.ratelimit_reset_ms >= 0)
            snprintf(rl, sizeof(rl),
                     "x-ratelimit-limit-requests: 10000\r\nx-ratelimit-remaining-requests: 9999"
                     "\r\nx-ratelimit-reset-requests: %lldms\r\nx-ratelimit-limit-tokens: "
                     "2000000\r\nx-ratelimit-remaining-tokens: 1999000\r\n",
                     (long long)rs->f.ratelimit_reset_ms);
        send_simple(c, 200, "application/json", rs->f.ratelimit_reset_ms >= 0 ? rl : NULL, body, 3);
        return;
    }

    uv_buf_t head;
    rs->kind = MOCK_RESP_STREAM;
    rs->status = 200;
    rs->include_usage = q.include_usage;
    rs->chunked = r->http_minor != 0 && rs->f.framing == MOCK_FRAMING_AUTO;
    if (!rs->chunked && rs->f.framing != MOCK_FRAMING_LENGTH)
        rs->keep_alive = 0; /* the end of the body is the end of the connection */
    rs->step = 0;
    rs->nsteps = rs->f.chunks + 3 + (rs->include_usage ? 1 : 0);
    if (rs->f.framing == MOCK_FRAMING_LENGTH) {
        /* the whole stream at once, its length known */
        uv_buf_t bufs[2];
        c->dyn.len = 0;
        while (rs->step < rs->nsteps) {
            if (stream_step(c) != 0) {
                conn_close(c);
                return;
            }
        }
        n = snprintf(c->head, sizeof(c->head),
                     "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     "Cache-Control: no-cache\r\nx-mock-name: %s\r\nContent-Length: %zu\r\n%s\r\n",
                     srv->opts.name, c->dyn.len, conn_header(c));
        bufs[0] = uv_buf_init(c->head, (unsigned)n);
        bufs[1] = uv_buf_init(c->dyn.p, (unsigned)c->dyn.len);
        log_request(c, "200 stream (Content-Length)");
        send_clipped(c, bufs, 2, 1);
        return;
    }
    n = snprintf(c->head, sizeof(c->head),
                 "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 "Cache-Control: no-cache\r\nx-mock-name: %s\r\n%s%s\r\n",
                 srv->opts.name, rs->chunked ? "Transfer-Encoding: chunked\r\n" : "",
                 conn_header(c));
    head = uv_buf_init(c->head, (unsigned)n);
    log_request(c, "200 stream");
    stream_send_next(c, 1, &head);
}

/* Authentication, injected status, then the endpoint. */
static void respond(struct mock_conn *c)
{
    struct mock_server *srv = c->srv;
    struct mock_req *r = &c->req;
    const char *path = r->arena;
    size_t plen = path_len(r);

    if (srv->opts.api_key) {
        size_t n, kl = strlen(srv->opts.api_key);
        const char *v = req_header(r, "authorization", &n);
        if (!v || n != 7 + kl || strncasecmp(v, "Bearer ", 7) != 0 ||
            memcmp(v + 7, srv->opts.api_key, kl) != 0) {
            send_error(c, 401, NULL, "invalid_request_error", "invalid_api_key",
                       "Incorrect API key provided.");
            return;
        }
    }
    if (c->resp.f.status >= 300) {
        send_fault_status(c, c->resp.f.status);
        return;
    }
    if (span_ends(path, plen, "/chat/completions")) {
        if (r->method == HTTP_POST)
            chat_completions(c);
        else
            send_error(c, 405, "Allow: POST\r\n", "invalid_request_error", NULL,
                       "Method %s not allowed on %.*s",
                       llhttp_method_name((llhttp_method_t)r->method), (int)plen, path);
        return;
    }
    if (span_ends(path, plen, "/models")) {
        if (r->method == HTTP_GET || r->method == HTTP_HEAD)
            models_list(c);
        else
            send_error(c, 405, "Allow: GET, HEAD\r\n", "invalid_request_error", NULL,
                       "Method %s not allowed on %.*s",
                       llhttp_method_name((llhttp_method_t)r->method), (int)plen, path);
        return;
    }
    const char *m = memmem(path, plen, "/models/", 8);
    if (m && (r->method == HTTP_GET || r->method == HTTP_HEAD)) {
        const char *id = m + 8;
        models_get(c, id, plen - (size_t)(id - path));
        return;
    }
    send_error(c, 404, NULL, "invalid_request_error", NULL, "Invalid URL (%s %.*s)",
               llhttp_method_name((llhttp_method_t)r->method), (int)(plen > 200 ? 200 : plen),
               path);
}

static void delay_on_timer(uv_timer_t *t)
{
    respond(t->data);
}

static int hdr_value(const struct mock_req *r, const struct mock_hdr *h, char *dst, size_t cap)
{
    if (h->val_len == 0 || h->val_len >= cap)
        return -1;
    memcpy(dst, r->arena + h->val_off, h->val_len);
    dst[h->val_len] = '\0';
    return 0;
}

static int flag_on(const char *v)
{
    return !(strcmp(v, "0") == 0 || strcasecmp(v, "false") == 0 || strcasecmp(v, "no") == 0 ||
             strcasecmp(v, "off") == 0);
}

/* x-mock-* request headers override the command line for this request; bad values are ignored. */
static void apply_overrides(struct mock_conn *c)
{
    const struct mock_req *r = &c->req;
    struct mock_fault *f = &c->resp.f;
    char v[32];
    long l;
    uint64_t ms;

    for (unsigned i = 0; i < r->nhdrs; i++) {
        const struct mock_hdr *h = &r->hdrs[i];
        const char *name = r->arena + h->name_off;
        size_t nl = h->name_len;

        if (nl <= 7 || memcmp(name, "x-mock-", 7) != 0 || hdr_value(r, h, v, sizeof(v)) != 0)
            continue;
        name += 7;
        nl -= 7;
#define IS(s) (nl == sizeof(s) - 1 && memcmp(name, s, nl) == 0)
        if (IS("status") && mock_parse_long(v, 0, 599, &l) == 0)
            f->status = (int)l;
        else if (IS("delay") && mock_parse_duration_ms(v, &ms) == 0)
            f->delay_ms = ms;
        else if (IS("chunks") && mock_parse_long(v, 0, 100000, &l) == 0)
            f->chunks = (unsigned)l;
        else if (IS("chunk-interval") && mock_parse_duration_ms(v, &ms) == 0)
            f->chunk_interval_ms = ms;
        else if (IS("reset-after") && mock_parse_long(v, -1, MOCK_BODY_MAX, &l) == 0)
            f->reset_after = l;
        else if (IS("close-after") && mock_parse_long(v, -1, MOCK_BODY_MAX, &l) == 0)
            f->close_after = l;
        else if (IS("framing") && mock_parse_framing(v) >= 0)
            f->framing = mock_parse_framing(v);
        else if (IS("drop"))
            f->drop = flag_on(v);
        else if (IS("retry-after") && mock_parse_long(v, 0, 86400 * 365, &l) == 0)
            f->retry_after = (int)l;
        else if (IS("retry-after-date") && mock_parse_long(v, 0, 86400 * 365, &l) == 0) {
            f->retry_after = (int)l;
            f->retry_after_date = 1;
        } else if (IS("ratelimit-reset") && mock_parse_duration_ms(v, &ms) == 0)
            f->ratelimit_reset_ms = (int64_t)ms;
        else if (IS("stamp"))
            f->stamp = strcmp(v, "0") != 0;
        else if (IS("tls-record-size") && mock_parse_long(v, 1, 16384, &l) == 0)
            f->tls_record = (size_t)l;
        else if (IS("stall"))
            f->stall = flag_on(v);
#undef IS
    }
}

static void resp_init(struct mock_conn *c)
{
    struct mock_resp *rs = &c->resp;

    rs->kind = MOCK_RESP_NONE;
    rs->f = c->srv->opts.fault;
    rs->status = 0;
    rs->keep_alive = c->req.keep_alive;
    rs->chunked = 0;
    rs->include_usage = 0;
    rs->body_sent = 0;
    rs->reset_now = 0;
    rs->close_now = 0;
    rs->step = 0;
    rs->nsteps = 0;
}

/* TRACE, as a server that implements it answers: the request head it received as the body
 * (message/http), credentials included. A gateway must never let it through. */
static void trace_echo(struct mock_conn *c)
{
    const struct mock_req *r = &c->req;
    struct mock_buf *b = &c->dyn;
    int err = 0;

    b->len = 0;
    err |= buf_printf(b, "TRACE %.*s HTTP/1.1\r\n", (int)r->url_len, r->arena);
    for (unsigned i = 0; i < r->nhdrs; i++)
        err |= buf_printf(b, "%.*s: %.*s\r\n", (int)r->hdrs[i].name_len,
                          r->arena + r->hdrs[i].name_off, (int)r->hdrs[i].val_len,
                          r->arena + r->hdrs[i].val_off);
    err |= buf_printf(b, "\r\n");
    if (err) {
        send_error(c, 500, NULL, "server_error", NULL, "out of memory");
        return;
    }
    uv_buf_t body = uv_buf_init(b->p, (unsigned)b->len);
    send_simple(c, 200, "message/http", NULL, &body, 1);
}

void http_on_request(struct mock_conn *c)
{
    struct mock_server *srv = c->srv;
    struct mock_req *r = &c->req;
    size_t plen = path_len(r);

    resp_init(c);
    /* Faults are for the OpenAI endpoints only; the mock's own answers are always whole. */
    c->resp.f.reset_after = -1;
    c->resp.f.close_after = -1;
    if (r->too_large) {
        c->resp.keep_alive = 0;
        send_error(c, r->too_large, NULL, "invalid_request_error", NULL,
                   r->too_large == 413 ? "Request body too large" : "Request headers too large");
        return;
    }
    if (plen >= 6 && memcmp(r->arena, "/mock/", 6) == 0) {
        mock_endpoint(c, r->arena, plen);
        return;
    }
    srv->requests++;
    if (r->method == HTTP_TRACE) {
        log_request(c, "200 trace");
        trace_echo(c);
        return;
    }
    {
        /* A gateway's health checks must not hide the request a test looks for. */
        size_t ualen = 0;
        const char *ua = req_header(r, "user-agent", &ualen);
        int is_check = ua && ualen >= 11 && memcmp(ua, "aigw-health", 11) == 0;

        last_record(is_check ? &srv->last_check : &srv->last, r);
        if (!is_check) { /* what a gateway's limits hold: its checks are not counted */
            c->held = 1;
            if (++srv->in_flight > srv->in_flight_max)
                srv->in_flight_max = srv->in_flight;
        }
    }
    c->resp.f.reset_after = srv->opts.fault.reset_after;
    c->resp.f.close_after = srv->opts.fault.close_after;
    apply_overrides(c);
    if (c->resp.f.drop) {
        /* read, then gone: the request may have started something the client never hears of */
        log_request(c, "dropped");
        conn_close(c);
        return;
    }
    if (c->resp.f.stall) {
        c->resp.kind = MOCK_RESP_STALL;
        log_request(c, "stall");
        return;
    }
    if (c->resp.f.delay_ms > 0) {
        uv_timer_start(&c->timer, delay_on_timer, c->resp.f.delay_ms, 0);
        return;
    }
    respond(c);
}

void http_on_sent(struct mock_conn *c)
{
    struct mock_resp *rs = &c->resp;

    if (rs->reset_now) {
        conn_reset(c);
        return;
    }
    if (rs->close_now) {
        conn_close(c); /* a FIN; a TLS peer gets no close_notify */
        return;
    }
    if (rs->kind == MOCK_RESP_STREAM && rs->step < rs->nsteps) {
        uv_timer_start(&c->timer, stream_on_timer, rs->f.chunk_interval_ms, 0);
        return;
    }
    conn_response_done(c);
}

void http_bad_request(struct mock_conn *c, int status)
{
    c->busy = 1;
    c->req.url_len = 0;
    c->req.method = HTTP_GET;
    c->req.http_minor = 1;
    c->req.keep_alive = 0;
    resp_init(c);
    c->resp.f.reset_after = -1;
    c->resp.f.close_after = -1;
    send_error(c, status, NULL, "invalid_request_error", NULL, "Malformed HTTP request: %s",
               llhttp_errno_name(llhttp_get_errno(&c->parser)));
}

/* ---- start-up ---- */

/* The assistant message: "Hello from NAME! Hello from NAME! ..." of about content_bytes
 * bytes (JSON-escaped once here), and where each word starts. */
int http_content_init(struct mock_server *srv)
{
    const char *name = srv->opts.name;
    size_t nl = strlen(name);
    size_t want = srv->opts.content_bytes;
    char *esc = malloc(nl * 6 + 2);
    struct mock_buf content = {0};
    size_t cap_words = want / 2 + 2;
    size_t *off = malloc((cap_words + 1) * sizeof(*off));
    unsigned w = 0;
    int n;

    if (!esc || !off)
        goto fail;
    json_escape(esc, nl * 6 + 1, name, nl);
    srv->name_json = strdup(esc);
    if (!srv->name_json)
        goto fail;
    strcat(esc, "!");
    while (want > 0) {
        const char *word = (w % 3 == 0) ? "Hello" : (w % 3 == 1) ? "from" : esc;
        size_t wl = strlen(word);
        size_t add = wl + (w ? 1 : 0);
        if (w > 0 && content.len + add > want)
            break;
        if (w > 0 && mock_buf_append(&content, " ", 1) != 0)
            goto fail;
        off[w++] = content.len;
        if (mock_buf_append(&content, word, wl) != 0)
            goto fail;
        if (w == cap_words)
            break;
    }
    if (mock_buf_reserve(&content, 1) != 0)
        goto fail;
    content.p[content.len] = '\0';
    /* A word's slice runs to the next word's start, so it carries the space before it; the
     * first slice starts at 0. */
    for (unsigned i = 1; i < w; i++)
        off[i] -= 1;
    off[w] = content.len;
    srv->content = content.p;
    srv->content_len = content.len;
    srv->word_off = off;
    srv->words = w;
    free(esc);

    long long created = srv->opts.created >= 0 ? (long long)srv->opts.created : MOCK_MODELS_CREATED;
    n = snprintf(NULL, 0,
                 "{\"object\":\"list\",\"data\":["
                 "{\"id\":\"%s\",\"object\":\"model\",\"created\":%lld,\"owned_by\":\"aigw-mock\"},"
                 "{\"id\":\"%s\",\"object\":\"model\",\"created\":%lld,\"owned_by\":\"aigw-mock\"}"
                 "]}",
                 mock_model_ids[0], created, mock_model_ids[1], created);
    srv->models_body = malloc((size_t)n + 1);
    if (!srv->models_body)
        return -1;
    snprintf(srv->models_body, (size_t)n + 1,
             "{\"object\":\"list\",\"data\":["
             "{\"id\":\"%s\",\"object\":\"model\",\"created\":%lld,\"owned_by\":\"aigw-mock\"},"
             "{\"id\":\"%s\",\"object\":\"model\",\"created\":%lld,\"owned_by\":\"aigw-mock\"}"
             "]}",
             mock_model_ids[0], created, mock_model_ids[1], created);
    srv->models_len = (size_t)n;
    srv->ntokens = 256;
    srv->tokens = calloc(srv->ntokens, sizeof(jsmntok_t));
    return srv->tokens ? 0 : -1;
fail:
    free(esc);
    free(off);
    mock_buf_free(&content);
    return -1;
}

void http_server_free(struct mock_server *srv)
{
    free(srv->content);
    free(srv->word_off);
    free(srv->models_body);
    free(srv->name_json);
    free(srv->tokens);
    mock_buf_free(&srv->last.arena);
    mock_buf_free(&srv->last.body);
    mock_buf_free(&srv->last_check.arena);
    mock_buf_free(&srv->last_check.body);
}
