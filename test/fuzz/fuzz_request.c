/* Fuzz target: the request head path of the worker. The input is parsed as an HTTP request by
 * llhttp with the shared header-piece callbacks (proxy_hdr_piece), in two reads split where the
 * first byte says; a head that parses is rewritten with proxy_build_request and
 * proxy_build_response_head, and each result must parse back as exactly one head that ends where
 * the built bytes end (no line break spliced in from the input, which would smuggle a header). The
 * head passes the worker's validate stage first (core/request.c: token names, request-target form),
 * and an absolute-form target is forwarded by its path as the worker does. */
#include <stdlib.h>
#include <string.h>

#include <llhttp.h>

#include "core/proxy.h"
#include "core/request.h"
#include "core/url.h"
#include "test/fuzz/fuzz.h"

#define MAX_HDRS 64

struct ctx {
    struct proxy_hdr hdrs[MAX_HDRS];
    uint32_t n;
    uint8_t last;
    const char *url;
    size_t url_len;
    int head_done;
};

static int on_url(llhttp_t *p, const char *at, size_t len)
{
    struct ctx *x = p->data;
    if (!x->url)
        x->url = at;
    else if (at != x->url + x->url_len)
        return -1;
    x->url_len += len;
    return 0;
}

static int on_field(llhttp_t *p, const char *at, size_t len)
{
    struct ctx *x = p->data;
    return proxy_hdr_piece(x->hdrs, &x->n, MAX_HDRS, &x->last, PROXY_PIECE_NAME, at, len) ? -1 : 0;
}

static int on_value(llhttp_t *p, const char *at, size_t len)
{
    struct ctx *x = p->data;
    return proxy_hdr_piece(x->hdrs, &x->n, MAX_HDRS, &x->last, PROXY_PIECE_VALUE, at, len) ? -1 : 0;
}

static int on_head(llhttp_t *p)
{
    struct ctx *x = p->data;
    x->head_done = 1;
    return HPE_PAUSED;
}

struct reparse {
    int done;
};

static int re_head(llhttp_t *p)
{
    ((struct reparse *)p->data)->done = 1;
    return HPE_PAUSED;
}

/* buf[0, n) must be one complete head of `type` and nothing after it. */
static void check_head(llhttp_type_t type, const char *buf, size_t n)
{
    llhttp_settings_t st;
    llhttp_t p;
    struct reparse r = {0};

    llhttp_settings_init(&st);
    st.on_headers_complete = re_head;
    llhttp_init(&p, type, &st);
    p.data = &r;
    llhttp_errno_t e = llhttp_execute(&p, buf, n);
    if (e != HPE_PAUSED || !r.done || llhttp_get_error_pos(&p) != buf + n)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char out[65536];
    llhttp_settings_t st;
    llhttp_t p;
    struct ctx x;

    if (size < 1)
        return 0;
    size_t split = data[0] % (size);
    const char *in = (const char *)data + 1;
    size_t len = size - 1;
    if (split > len)
        split = len;

    memset(&x, 0, sizeof(x));
    llhttp_settings_init(&st);
    st.on_url = on_url;
    st.on_header_field = on_field;
    st.on_header_value = on_value;
    st.on_headers_complete = on_head;
    llhttp_init(&p, HTTP_REQUEST, &st);
    p.data = &x;
    llhttp_errno_t e = llhttp_execute(&p, in, split);
    if (e == HPE_OK)
        e = llhttp_execute(&p, in + split, len - split);
    if (e != HPE_PAUSED || !x.head_done || !x.url)
        return 0;
    for (uint32_t i = 0; i < x.n; i++)
        if (!request_token(x.hdrs[i].name, x.hdrs[i].name_len))
            return 0;
    const char *path;
    size_t path_len;
    int form = request_target(x.url, x.url_len, &path, &path_len);
    if (form != REQUEST_TARGET_ORIGIN && form != REQUEST_TARGET_ABSOLUTE)
        return 0;
    if (path < x.url || path + path_len != x.url + x.url_len)
        abort(); /* the path is the target's tail */
    x.url = path;
    x.url_len = path_len;
    if (!proxy_path_ok(x.url, x.url_len))
        return 0;

    struct conf_backend be;
    memset(&be, 0, sizeof(be));
    strcpy(be.name, "b");
    strcpy(be.url.host, "127.0.0.1");
    be.url.port = 9000;
    strcpy(be.url.prefix, "/openai/v1");
    be.api_key = "sk-secret";
    be.keepalive = 1;

    struct proxy_req rq = {0};
    rq.method = "POST";
    rq.method_len = 4;
    rq.path = x.url;
    rq.path_len = x.url_len;
    rq.hdrs = x.hdrs;
    rq.n_hdrs = x.n;
    rq.client_ip = "127.0.0.1";
    rq.request_id = "0123456789abcdef0123456789abcdef";
    rq.request_id_len = 32;
    rq.has_body = 1;
    rq.body_len = 2;
    int n = proxy_build_request(out, sizeof(out), &rq, &be);
    if (n > 0)
        check_head(HTTP_REQUEST, out, (size_t)n);

    struct proxy_resp rs = {0};
    rs.status = 200;
    rs.reason = "OK";
    rs.reason_len = 2;
    rs.hdrs = x.hdrs;
    rs.n_hdrs = x.n;
    rs.request_id = rq.request_id;
    rs.request_id_len = rq.request_id_len;
    rs.backend = "b";
    rs.attempts = 1;
    n = proxy_build_response_head(out, sizeof(out), &rs);
    if (n > 0)
        check_head(HTTP_RESPONSE, out, (size_t)n);
    return 0;
}
