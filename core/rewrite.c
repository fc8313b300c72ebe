/* Upstream request bodies as pieces of the client's body around small inserted strings. */
#include <errno.h>
#include <string.h>

#include "core/rewrite.h"

/* One edit: body bytes [off, end) give way to ins (ins_len bytes). */
struct edit {
    size_t off, end;
    const char *ins;
    size_t ins_len;
};

static const char ADD_OPTS[] = "\"stream_options\":{\"include_usage\":true},";
static const char OPTS_OBJ[] = "{\"include_usage\":true}";
static const char IU_TRUE[] = "true";

/* JSON-quotes s into out (cap bytes): its length, or -ENOSPC. */
static int quote(char *out, size_t cap, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;

    if (cap < 2)
        return -ENOSPC;
    out[o++] = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (o + 7 > cap)
            return -ENOSPC;
        if (c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = (char)c;
        } else if (c < 0x20) {
            memcpy(out + o, "\\u00", 4);
            out[o + 4] = hex[c >> 4];
            out[o + 5] = hex[c & 15];
            o += 6;
        } else {
            out[o++] = (char)c;
        }
    }
    if (o + 1 > cap)
        return -ENOSPC;
    out[o++] = '"';
    return (int)o;
}

static int is_ws(char c)
{
    /* as yajl reads JSON: it skips \v and \f as well */
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* Where the value bytes of [off, end) start after white space, or end. */
static size_t skip_ws(const char *b, size_t off, size_t end)
{
    while (off < end && is_ws(b[off]))
        off++;
    return off;
}

int rewrite_body(struct rewrite *rw, const char *body, size_t len, const struct json_req *jr,
                 const char *model, size_t model_len, int include_usage)
{
    struct edit ed[2];
    int ne = 0;

    if (model) {
        const struct json_span *s = &jr->span[JSON_F_MODEL];
        if (!(jr->flags & JSON_REQ_MODEL) || !s->end || s->end > len)
            return -EINVAL;
        /* the same name as the client's: nothing to change */
        if (!(jr->model_len == model_len && model_len <= JSON_MODEL_MAX &&
              memcmp(jr->model, model, model_len) == 0)) {
            int q = quote(rw->buf, sizeof(rw->buf), model, model_len);
            if (q < 0)
                return q;
            ed[ne++] = (struct edit){s->off, s->end, rw->buf, (size_t)q};
        }
    }
    if (include_usage && !(jr->flags & JSON_REQ_INCLUDE_USAGE)) {
        const struct json_span *so = &jr->span[JSON_F_STREAM_OPTIONS];
        const struct json_span *iu = &jr->span[JSON_F_INCLUDE_USAGE];
        if (!so->end) {
            /* none: the first field of the object */
            size_t at = skip_ws(body, 0, len);
            if (at >= len || body[at] != '{')
                return -EINVAL;
            ed[ne++] = (struct edit){at + 1, at + 1, ADD_OPTS, sizeof(ADD_OPTS) - 1};
        } else if (!(jr->flags & JSON_REQ_STREAM_OPTS)) {
            /* not an object (null, false, ...): replaced by one */
            ed[ne++] = (struct edit){so->off, so->end, OPTS_OBJ, sizeof(OPTS_OBJ) - 1};
        } else if (iu->end) {
            /* include_usage given, and not true */
            ed[ne++] = (struct edit){iu->off, iu->end, IU_TRUE, sizeof(IU_TRUE) - 1};
        } else {
            /* an object without it: its first field, followed by a comma unless it is empty */
            size_t in = so->off + 1;
            int empty = body[skip_ws(body, in, so->end)] == '}';
            static const char IU[] = "\"include_usage\":true,";
            ed[ne++] = (struct edit){in, in, IU, sizeof(IU) - 1 - (empty ? 1 : 0)};
        }
    }
    rw->n = 0;
    rw->len = 0;
    if (ne == 0) {
        rw->iov[0] = (struct iovec){(void *)body, len};
        rw->n = len ? 1 : 0;
        rw->len = len;
        return 0;
    }
    if (ne == 2 && ed[1].off < ed[0].off) {
        struct edit t = ed[0];
        ed[0] = ed[1];
        ed[1] = t;
    }
    size_t at = 0;
    for (int i = 0; i < ne; i++) {
        if (ed[i].off > at)
            rw->iov[rw->n++] = (struct iovec){(void *)(body + at), ed[i].off - at};
        if (ed[i].ins_len)
            rw->iov[rw->n++] = (struct iovec){(void *)ed[i].ins, ed[i].ins_len};
        at = ed[i].end;
    }
    if (at < len)
        rw->iov[rw->n++] = (struct iovec){(void *)(body + at), len - at};
    for (int i = 0; i < rw->n; i++)
        rw->len += rw->iov[i].iov_len;
    return 1;
}
