/* Token usage read from an AI answer as it passes (JSON body or event stream) with libyajl, and
 * the filter that takes the usage-only chunk aigw asked for out of a stream. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/usage.h"

/* What a container is (rd->kind): only these are looked into. */
enum {
    K_SKIP = 0,
    K_TOP,      /* the text's object */
    K_USAGE,    /* its "usage" object, or "response"."usage" */
    K_PDET,     /* usage.prompt_tokens_details / input_tokens_details */
    K_CDET,     /* usage.completion_tokens_details / output_tokens_details */
    K_CHOICES,  /* the top-level "choices" array */
    K_CHOICE,   /* an object in it */
    K_DELTA,    /* a choice's "delta" object */
    K_RESPONSE, /* the top-level "response" object (Responses API events) */
};

/* What the key just read names (rd->key), in the container it was read in. */
enum {
    KEY_NONE = 0,
    KEY_USAGE,
    KEY_CHOICES,
    KEY_TYPE,
    KEY_RESPONSE,
    KEY_DELTA,
    KEY_TEXT,
    KEY_CONTENT,
    KEY_PROMPT,
    KEY_COMPLETION,
    KEY_TOTAL,
    KEY_PDET,
    KEY_CDET,
    KEY_CACHED,
    KEY_REASONING,
};

/* A Responses API event's "type" (rd->type). */
enum {
    T_NONE = 0,
    T_OTHER,
    T_DONE,  /* response.completed, .incomplete, .failed: "response" carries the final usage */
    T_DELTA, /* response.output_text.delta: "delta" is completion text */
};

/* Line states of the SSE reader (rd->line). */
enum {
    L_BOL = 0, /* at the start of a line */
    L_NAME,    /* in a field name */
    L_SP,      /* right after "data:" (one space may follow) */
    L_DATA,    /* in a data value */
    L_SKIP,    /* in another field's value, or a comment */
    L_CR,      /* right after a CR that ended a line (an LF here belongs to it) */
    L_CR_END,  /* the same, the line being the blank one that ended an event */
};

/* struct usage.flags of a usage object being read (rd->ev), never handed over. */
#define EV_PROMPT 0x100 /* it has a prompt count (prompt_tokens | input_tokens) */
#define EV_BAD    0x200 /* its prompt or completion count is not a non-negative integer */

/* ---- the readers' pool ---- */

struct usage_rd *usage_get(struct usage_pool *pool)
{
    struct usage_rd *rd = pool->free;
    if (rd) {
        pool->free = rd->next;
        pool->n_free--;
        return rd;
    }
    return calloc(1, sizeof(*rd));
}

static void rd_drop(struct usage_rd *rd)
{
    if (rd->h) {
        yajl_free(rd->h);
        rd->h = NULL;
    }
    json_mem_reset(&rd->m);
}

void usage_put(struct usage_pool *pool, struct usage_rd *rd)
{
    if (!rd)
        return;
    if (pool->n_free >= pool->max_free) {
        rd_drop(rd);
        json_mem_free(&rd->m);
        free(rd);
        return;
    }
    rd->next = pool->free;
    pool->free = rd;
    pool->n_free++;
}

void usage_pool_free(struct usage_pool *pool)
{
    uint32_t max = pool->max_free;
    pool->max_free = 0;
    while (pool->free) {
        struct usage_rd *rd = pool->free;
        pool->free = rd->next;
        pool->n_free--;
        usage_put(pool, rd);
    }
    pool->max_free = max;
}

/* ---- the JSON of one text (a body, or an event's data) ---- */

static uint8_t cur_kind(const struct usage_rd *rd)
{
    return rd->depth && rd->depth <= USAGE_DEPTH ? rd->kind[rd->depth - 1] : K_SKIP;
}

#define KEYIS(lit) (n == sizeof(lit) - 1 && memcmp(k, lit, n) == 0)

static int cb_map_key(void *ctx, const unsigned char *k, size_t n)
{
    struct usage_rd *rd = ctx;
    uint8_t key = KEY_NONE;

    switch (cur_kind(rd)) {
    case K_TOP:
        if (KEYIS("usage"))
            key = KEY_USAGE;
        else if (KEYIS("choices"))
            key = KEY_CHOICES;
        else if (KEYIS("type"))
            key = KEY_TYPE;
        else if (KEYIS("response"))
            key = KEY_RESPONSE;
        else if (KEYIS("delta"))
            key = KEY_DELTA;
        break;
    case K_RESPONSE:
        key = KEYIS("usage") ? KEY_USAGE : KEY_NONE;
        break;
    case K_USAGE:
        if (KEYIS("prompt_tokens") || KEYIS("input_tokens"))
            key = KEY_PROMPT;
        else if (KEYIS("completion_tokens") || KEYIS("output_tokens"))
            key = KEY_COMPLETION;
        else if (KEYIS("total_tokens"))
            key = KEY_TOTAL;
        else if (KEYIS("prompt_tokens_details") || KEYIS("input_tokens_details"))
            key = KEY_PDET;
        else if (KEYIS("completion_tokens_details") || KEYIS("output_tokens_details"))
            key = KEY_CDET;
        break;
    case K_PDET:
        key = KEYIS("cached_tokens") ? KEY_CACHED : KEY_NONE;
        break;
    case K_CDET:
        key = KEYIS("reasoning_tokens") ? KEY_REASONING : KEY_NONE;
        break;
    case K_CHOICE:
        if (KEYIS("delta"))
            key = KEY_DELTA;
        else if (KEYIS("text"))
            key = KEY_TEXT;
        break;
    case K_DELTA:
        key = KEYIS("content") ? KEY_CONTENT : KEY_NONE;
        break;
    }
    rd->key = key;
    return 1;
}

/* A value starts in the current container: a scalar (obj = -1), an object (1), an array (0).
 * Returns 0 to stop yajl (the text is not one object). */
static int is_count(uint8_t k, uint8_t key)
{
    return k == K_USAGE && (key == KEY_PROMPT || key == KEY_COMPLETION);
}

/* The next digit of a count, which stays within USAGE_MAX_TOKENS. */
static uint64_t count_push(uint64_t v, char c)
{
    v = v * 10 + (uint64_t)(c - '0');
    return v > USAGE_MAX_TOKENS ? USAGE_MAX_TOKENS : v;
}

/* A value that is not a number starts: a prompt or completion count that is one spoils its usage
 * object. */
static void not_a_number(struct usage_rd *rd)
{
    if (is_count(cur_kind(rd), rd->key))
        rd->ev.flags |= EV_BAD;
}

static int value_begin(struct usage_rd *rd, int obj)
{
    uint8_t k = cur_kind(rd), child = K_SKIP;

    if (rd->depth == 0) {
        if (obj != 1 || rd->closed)
            return 0; /* not an object, or a second text in the same event */
        child = K_TOP;
    } else if (k == K_CHOICES) {
        rd->choices = 2; /* an element: not the usage-only chunk */
        child = obj == 1 ? K_CHOICE : K_SKIP;
    } else if (obj == 1) {
        if ((k == K_TOP || k == K_RESPONSE) && rd->key == KEY_USAGE) {
            child = K_USAGE;
            /* the last usage object counts */
            memset(&rd->ev, 0, sizeof(rd->ev));
            rd->ev_usage = k == K_TOP ? 1 : 2;
        } else if (k == K_TOP && rd->key == KEY_RESPONSE) {
            child = K_RESPONSE;
        } else if (k == K_USAGE && rd->key == KEY_PDET) {
            child = K_PDET;
        } else if (k == K_USAGE && rd->key == KEY_CDET) {
            child = K_CDET;
        } else if (k == K_CHOICE && rd->key == KEY_DELTA) {
            child = K_DELTA;
        }
    } else if (obj == 0 && k == K_TOP && rd->key == KEY_CHOICES) {
        child = K_CHOICES;
        rd->choices = 1;
    }
    if (obj >= 0) {
        if (rd->depth < USAGE_DEPTH)
            rd->kind[rd->depth] = child;
        rd->depth++;
        rd->key = KEY_NONE;
    }
    return 1;
}

static int cb_start_map(void *ctx)
{
    not_a_number(ctx);
    return value_begin(ctx, 1);
}

static int cb_start_array(void *ctx)
{
    not_a_number(ctx);
    return value_begin(ctx, 0);
}

static int cb_end(void *ctx)
{
    struct usage_rd *rd = ctx;
    if (--rd->depth == 0)
        rd->closed = 1;
    rd->key = KEY_NONE;
    return 1;
}

static int cb_null(void *ctx)
{
    struct usage_rd *rd = ctx;
    int r;

    not_a_number(rd);
    r = value_begin(rd, -1);
    rd->key = KEY_NONE;
    return r;
}

static int cb_boolean(void *ctx, int v)
{
    (void)v;
    return cb_null(ctx);
}

/* Token counts: plain non-negative integers (capped at USAGE_MAX_TOKENS); any other number is
 * taken as 0, and spoils its usage object when it is the prompt or completion count. */
static int cb_number(void *ctx, const char *s, size_t n)
{
    struct usage_rd *rd = ctx;
    uint64_t v = 0, *f = NULL;
    uint8_t k = cur_kind(rd);
    uint32_t seen = k == K_USAGE && rd->key == KEY_PROMPT ? EV_PROMPT : 0;
    int count = is_count(k, rd->key);

    if (!value_begin(rd, -1))
        return 0;
    if (k == K_USAGE && rd->key == KEY_PROMPT)
        f = &rd->ev.prompt;
    else if (k == K_USAGE && rd->key == KEY_COMPLETION)
        f = &rd->ev.completion;
    else if (k == K_USAGE && rd->key == KEY_TOTAL)
        f = &rd->ev.total;
    else if (k == K_PDET && rd->key == KEY_CACHED)
        f = &rd->ev.cached;
    else if (k == K_CDET && rd->key == KEY_REASONING)
        f = &rd->ev.reasoning;
    rd->key = KEY_NONE;
    if (!f)
        return 1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') {
            v = 0;
            if (count)
                rd->ev.flags |= EV_BAD;
            break;
        }
        v = count_push(v, s[i]);
    }
    *f = v;
    rd->ev.flags |= seen;
    return 1;
}

/* Strings come unescaped: their length is the text's UTF-8 bytes. */
static int cb_string(void *ctx, const unsigned char *s, size_t n)
{
    struct usage_rd *rd = ctx;
    uint8_t k = cur_kind(rd);

    not_a_number(rd);
    if (!value_begin(rd, -1))
        return 0;
    if (k == K_TOP && rd->key == KEY_TYPE) {
        if ((n == 18 && memcmp(s, "response.completed", 18) == 0) ||
            (n == 19 && memcmp(s, "response.incomplete", 19) == 0) ||
            (n == 15 && memcmp(s, "response.failed", 15) == 0))
            rd->type = T_DONE;
        else if (n == 26 && memcmp(s, "response.output_text.delta", 26) == 0)
            rd->type = T_DELTA;
        else
            rd->type = T_OTHER;
    } else if (k == K_TOP && rd->key == KEY_DELTA) {
        rd->ev_delta += n;
    } else if ((k == K_CHOICE && rd->key == KEY_TEXT) || (k == K_DELTA && rd->key == KEY_CONTENT)) {
        rd->ev_text += n;
    }
    rd->key = KEY_NONE;
    return 1;
}

/* Starts a JSON text through the handle (a fresh one when the last was dropped), keeping what
 * the texts before it said (a JSON body's usage values are read as one text each). */
static void text_restart(struct usage_rd *rd)
{
    rd->depth = 0;
    rd->key = KEY_NONE;
    rd->type = T_NONE;
    rd->choices = rd->closed = rd->broken = 0;
    if (rd->h)
        return;
    memset(&rd->cb, 0, sizeof(rd->cb));
    rd->cb.yajl_null = cb_null;
    rd->cb.yajl_boolean = cb_boolean;
    rd->cb.yajl_number = cb_number;
    rd->cb.yajl_string = cb_string;
    rd->cb.yajl_start_map = cb_start_map;
    rd->cb.yajl_map_key = cb_map_key;
    rd->cb.yajl_end_map = cb_end;
    rd->cb.yajl_start_array = cb_start_array;
    rd->cb.yajl_end_array = cb_end;
    json_mem_funcs(&rd->m, &rd->af);
    if (!(rd->h = yajl_alloc(&rd->cb, &rd->af, rd))) {
        json_mem_reset(&rd->m);
        rd->broken = 1;
        return;
    }
    /* one text after another through the same handle (yajl 2 has no reset) */
    yajl_config(rd->h, yajl_allow_multiple_values, 1);
}

/* Starts a JSON text that says nothing yet. */
static void text_begin(struct usage_rd *rd)
{
    memset(&rd->ev, 0, sizeof(rd->ev));
    rd->ev_text = rd->ev_delta = 0;
    rd->ev_usage = 0;
    text_restart(rd);
}

static int is_ws(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static int all_ws(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!is_ws((unsigned char)p[i]))
            return 0;
    return 1;
}

static void text_feed(struct usage_rd *rd, const char *p, size_t n)
{
    if (rd->broken || !n)
        return;
    if (rd->closed) {
        /* after the object, white space only; yajl need not see it */
        rd->broken = !all_ws(p, n);
        return;
    }
    if (yajl_parse(rd->h, (const unsigned char *)p, n) != yajl_status_ok) {
        rd->broken = 1;
        return;
    }
    /* yajl read on past the object (the start of a next text): that must be white space, or
     * the handle is not clean between two texts. yajl stops right after the closing brace only
     * when nothing follows in this piece, so the rest is checked from where it ended. */
    if (rd->closed) {
        size_t at = yajl_get_bytes_consumed(rd->h);
        if (at < n && !all_ws(p + at, n - at))
            rd->broken = 1;
    }
}

/* A usage object read whole (ev) becomes the answer's usage *u (its stream text kept): when it
 * holds a prompt count and its counts are sound, with cached <= prompt and reasoning <=
 * completion; otherwise it says the answer's usage is unknown. */
static void usage_commit(struct usage *u, const struct usage *ev)
{
    uint64_t tb = u->text_bytes;

    memset(u, 0, sizeof(*u));
    u->text_bytes = tb;
    if ((ev->flags & (EV_PROMPT | EV_BAD)) != EV_PROMPT)
        return;
    u->flags = USAGE_HAVE;
    u->prompt = ev->prompt;
    u->completion = ev->completion;
    u->cached = ev->cached < ev->prompt ? ev->cached : ev->prompt;
    u->reasoning = ev->reasoning < ev->completion ? ev->reasoning : ev->completion;
    u->total = ev->total;
}

/* The text is over: what it said is committed (when it was one whole object), and the handle
 * is kept only when it is clean between two texts and within its region. */
static void text_end(struct usage_rd *rd)
{
    int ok = rd->closed && !rd->broken && rd->h;

    if (ok) {
        if (rd->ev_usage == 1 || (rd->ev_usage == 2 && rd->type == T_DONE))
            usage_commit(&rd->u, &rd->ev);
        rd->u.text_bytes += rd->ev_text + (rd->type == T_DELTA ? rd->ev_delta : 0);
    }
    if (!ok || rd->m.over)
        rd_drop(rd);
}

/* ---- JSON bodies ---- */

/* Only the top-level "usage" value of a body matters, and it is a few dozen bytes at the end of
 * one that may be long: a structural pass finds it (string bounds, nesting, top-level keys) at
 * a small cost per byte, and yajl reads only that value, as the text {"usage":VALUE}, with the
 * callbacks the whole body would have had. yajl checks the value; the pass checks the rest's
 * structure (one object, strings closed, brackets matched, white space after it), not its
 * scalars. A top-level key written with an escape that may spell "usage" hands the rest of the
 * body to yajl as it is. */

/* Scan states (rd->js). */
enum {
    J_START = 0, /* before the body's object */
    J_OUT,       /* in it, outside strings */
    J_STR,       /* in a string, not a top-level key */
    J_KEY,       /* in a top-level key, rd->jkey bytes of "usage" matched */
    J_COLON,     /* after the top-level key "usage" */
    J_END,       /* after the object: white space only */
    J_BAD,       /* not one JSON object: nothing read */
    J_YAJL,      /* the rest goes to yajl as one text */
};

/* The bytes J_OUT stops at. */
static const uint8_t json_stop[256] = {
    ['"'] = 1, ['{'] = 1, ['}'] = 1, ['['] = 1, [']'] = 1, [','] = 1,
};

/* The usage value in its usual shape (an object of plain keys, natural numbers, plain strings,
 * literals and objects of the same, a few levels deep) is read here, in one go: p[0, n) is all
 * of it. Returns 0 when it was read (rd->ev set as yajl's callbacks would have), -1 when it is
 * of another shape, or malformed: yajl then reads it. */
struct uv {
    const char *p, *end;
};

/* Inline: it is called around every key and value, where there is mostly no white space. */
static inline __attribute__((always_inline)) void uv_ws(struct uv *v)
{
    while (v->p < v->end && is_ws((unsigned char)*v->p))
        v->p++;
}

/* The bytes uv_str stops at: the closing quote, and what it leaves to yajl. */
static const uint8_t uv_stop[256] = {
    [0x00 ... 0x1f] = 1,
    ['"'] = 1,
    ['\\'] = 1,
    [0x7f ... 0xff] = 1,
};

/* A string without escapes or bytes outside printable ASCII (yajl checks the rest). */
static inline __attribute__((always_inline)) int uv_str(struct uv *v, const char **s, size_t *n)
{
    const char *a = ++v->p;
    while (v->p < v->end && !uv_stop[(unsigned char)*v->p])
        v->p++;
    if (v->p == v->end || *v->p != '"')
        return -1;
    *s = a;
    *n = (size_t)(v->p++ - a);
    return 0;
}

static int uv_lit(struct uv *v, const char *lit, size_t n)
{
    if ((size_t)(v->end - v->p) < n || memcmp(v->p, lit, n) != 0)
        return -1;
    v->p += n;
    return 0;
}

/* An object whose kind is k (K_USAGE, K_PDET, K_CDET or K_SKIP) at v->p ('{'). */
static int uv_obj(struct uv *v, uint8_t k, int levels, struct usage *u)
{
    if (!levels)
        return -1;
    v->p++;
    uv_ws(v);
    if (v->p < v->end && *v->p == '}') {
        v->p++;
        return 0;
    }
    for (;;) {
        const char *key;
        size_t kn;
        if (v->p == v->end || *v->p != '"' || uv_str(v, &key, &kn) < 0)
            return -1;
        uv_ws(v);
        if (v->p == v->end || *v->p++ != ':')
            return -1;
        uv_ws(v);
        if (v->p == v->end)
            return -1;
        char c = *v->p;
#define UVKEY(lit) (kn == sizeof(lit) - 1 && memcmp(key, lit, kn) == 0)
        int prompt = k == K_USAGE && (UVKEY("prompt_tokens") || UVKEY("input_tokens"));
        int completion = k == K_USAGE && (UVKEY("completion_tokens") || UVKEY("output_tokens"));
        if ((prompt || completion) && !(c >= '0' && c <= '9'))
            return -1; /* not a count (or a negative one): yajl reads it, as cb_number says */
        if (c >= '0' && c <= '9') {
            uint64_t x = 0;
            if (c == '0' && v->p + 1 < v->end && v->p[1] >= '0' && v->p[1] <= '9')
                return -1;
            for (; v->p < v->end && *v->p >= '0' && *v->p <= '9'; v->p++)
                x = count_push(x, *v->p);
            if (v->p < v->end && (*v->p == '.' || *v->p == 'e' || *v->p == 'E'))
                return -1;
            if (prompt)
                u->prompt = x, u->flags |= EV_PROMPT;
            else if (completion)
                u->completion = x;
            else if (k == K_USAGE && UVKEY("total_tokens"))
                u->total = x;
            else if (k == K_PDET && UVKEY("cached_tokens"))
                u->cached = x;
            else if (k == K_CDET && UVKEY("reasoning_tokens"))
                u->reasoning = x;
        } else if (c == '{') {
            uint8_t child = K_SKIP;
            if (k == K_USAGE && (UVKEY("prompt_tokens_details") || UVKEY("input_tokens_details")))
                child = K_PDET;
            else if (k == K_USAGE &&
                     (UVKEY("completion_tokens_details") || UVKEY("output_tokens_details")))
                child = K_CDET;
#undef UVKEY
            if (uv_obj(v, child, levels - 1, u) < 0)
                return -1;
        } else if (c == '"') {
            if (uv_str(v, &key, &kn) < 0)
                return -1;
        } else if (uv_lit(v, "null", 4) < 0 && uv_lit(v, "true", 4) < 0 &&
                   uv_lit(v, "false", 5) < 0) {
            return -1;
        }
        uv_ws(v);
        if (v->p == v->end)
            return -1;
        if (*v->p == '}') {
            v->p++;
            return 0;
        }
        if (*v->p++ != ',')
            return -1;
        uv_ws(v);
    }
}

static int usage_value(struct usage_rd *rd, const char *p, size_t n)
{
    struct uv v = {p, p + n};
    struct usage u;
    int obj = 0;

    memset(&u, 0, sizeof(u));
    uv_ws(&v);
    if (v.p < v.end && *v.p == '{') {
        if (uv_obj(&v, K_USAGE, 4, &u) < 0)
            return -1;
        obj = 1;
    } else if (uv_lit(&v, "null", 4) < 0 && uv_lit(&v, "true", 4) < 0 &&
               uv_lit(&v, "false", 5) < 0) {
        return -1;
    }
    uv_ws(&v);
    if (v.p != v.end)
        return -1;
    if (obj) { /* the last usage object counts */
        rd->ev = u;
        rd->ev_usage = 1;
    }
    return 0;
}

/* The usage value is handed to yajl, as the text {"usage":VALUE (its bytes so far first). */
static void json_cap_yajl(struct usage_rd *rd)
{
    text_restart(rd);
    text_feed(rd, "{\"usage\":", 9);
    text_feed(rd, rd->hold, rd->hold_len);
    rd->jcap = 2;
}

/* Bytes of the usage value: kept in hold while they fit, then through yajl. */
static void json_cap(struct usage_rd *rd, const char *p, size_t n)
{
    if (rd->jcap == 1 && rd->hold_len + n > USAGE_HOLD)
        json_cap_yajl(rd);
    if (rd->jcap == 2) {
        text_feed(rd, p, n);
        return;
    }
    memcpy(rd->hold + rd->hold_len, p, n);
    rd->hold_len = (uint16_t)(rd->hold_len + n);
}

/* The usage value's bytes that were in p[from, to) were the last: it is read. */
static void json_cap_end(struct usage_rd *rd, const char *p, size_t from, size_t to)
{
    json_cap(rd, p + from, to - from);
    if (rd->jcap == 1 && usage_value(rd, rd->hold, rd->hold_len) < 0)
        json_cap_yajl(rd);
    if (rd->jcap == 2) {
        text_feed(rd, "}", 1);
        if (rd->broken || !rd->closed)
            rd->js = J_BAD;
    }
    rd->jcap = 0;
}

static void json_scan(struct usage_rd *rd, const char *p, size_t n)
{
    size_t i = 0, cap = 0; /* cap: where the usage value's bytes in p start (rd->jcap) */
    size_t e, k;           /* J_STR: the quote found, the start of the backslashes before it */
    const char *q;
    uint8_t odd;
    uint32_t d;
    char c;

    while (i < n) {
        switch (rd->js) {
        case J_START:
            while (i < n && is_ws((unsigned char)p[i]))
                i++;
            if (i == n)
                break;
            if (p[i++] != '{') {
                rd->js = J_BAD;
                return;
            }
            rd->jdepth = 1;
            rd->jarr = 0;
            rd->jkeypos = 1;
            rd->js = J_OUT;
            continue;
        /* J_OUT, J_STR and J_KEY go from one to the other by goto, not through the switch:
         * an answer is mostly short strings and the bytes between them */
        case J_OUT:
        out:
            while (i < n && !json_stop[(unsigned char)p[i]])
                i++;
            if (i == n)
                break;
            c = p[i++];
            d = rd->jdepth;
            if (c == '"') {
                if (d == 1 && rd->jkeypos) {
                    rd->jkeypos = 0;
                    rd->jkey = 0;
                    rd->js = J_KEY;
                    goto key;
                }
                rd->jesc = 0;
                rd->js = J_STR;
                goto str;
            } else if (c == ',') {
                if (d == 1) {
                    if (rd->jkeypos) { /* "{," or ",," */
                        rd->js = J_BAD;
                        return;
                    }
                    if (rd->jcap)
                        json_cap_end(rd, p, cap, i - 1);
                    rd->jkeypos = 2;
                }
            } else if (c == '{' || c == '[') {
                if (d == UINT32_MAX) {
                    rd->js = J_BAD;
                    return;
                }
                if (d < 64)
                    rd->jarr = c == '[' ? rd->jarr | (1ull << d) : rd->jarr & ~(1ull << d);
                rd->jdepth = d + 1;
            } else { /* '}' or ']' */
                if ((d <= 64 && ((rd->jarr >> (d - 1)) & 1) != (c == ']')) ||
                    (d == 1 && rd->jkeypos == 2)) { /* mismatched, or ",}" */
                    rd->js = J_BAD;
                    return;
                }
                if (d == 1) {
                    if (rd->jcap)
                        json_cap_end(rd, p, cap, i - 1);
                    if (rd->js != J_BAD)
                        rd->js = J_END;
                }
                rd->jdepth = d - 1;
            }
            if (rd->js == J_OUT)
                goto out;
            continue;
        case J_STR:
        str:
            /* the string ends at a quote after an even run of backslashes */
            q = memchr(p + i, '"', n - i);
            e = q ? (size_t)(q - p) : n;
            k = e;
            while (k > i && p[k - 1] == '\\')
                k--;
            odd = (uint8_t)((e - k) & 1);
            if (k == i)
                odd ^= rd->jesc; /* the run goes on from the last piece */
            if (!q) {
                rd->jesc = odd;
                i = n;
                continue;
            }
            rd->jesc = 0;
            i = e + 1;
            if (odd)
                goto str;
            rd->js = J_OUT;
            goto out;
        case J_KEY:
        key:
            /* the bytes of "usage" it starts with */
            while (i < n && rd->jkey < 5 && p[i] == "usage"[rd->jkey]) {
                rd->jkey++;
                i++;
            }
            if (i == n)
                break;
            if (p[i] == '"') {
                i++;
                if (rd->jkey == 5) {
                    rd->js = J_COLON;
                    continue;
                }
                rd->js = J_OUT;
                goto out;
            }
            if (p[i] == '\\') {
                /* an escape in what may still be "usage": yajl reads the rest, from this key
                 * on (its bytes so far were the first jkey of "usage") */
                rd->js = J_YAJL;
                text_restart(rd);
                text_feed(rd, "{\"", 2);
                text_feed(rd, "usage", rd->jkey);
                continue;
            }
            /* another key: the rest of it is any string */
            rd->jesc = 0;
            rd->js = J_STR;
            i++;
            goto str;
        case J_COLON:
            while (i < n && is_ws((unsigned char)p[i]))
                i++;
            if (i == n)
                break;
            if (p[i++] != ':') {
                rd->js = J_BAD;
                return;
            }
            /* a later "usage" replaces an earlier one, as in one pass over the body */
            rd->hold_len = 0;
            rd->jcap = 1;
            cap = i;
            rd->js = J_OUT;
            continue;
        case J_END:
            if (!all_ws(p + i, n - i))
                rd->js = J_BAD;
            return;
        case J_BAD:
            return;
        case J_YAJL:
            text_feed(rd, p + i, n - i);
            return;
        }
    }
    if (rd->jcap)
        json_cap(rd, p + cap, n - cap);
}

/* ---- answers ---- */

void usage_begin(struct usage_rd *rd, enum usage_kind kind, int filter)
{
    memset(&rd->u, 0, sizeof(rd->u));
    rd->mode = (uint8_t)kind;
    rd->filter = kind == USAGE_SSE && filter;
    rd->line = L_BOL;
    rd->fmatch = 0;
    rd->ev_json = rd->ev_data = rd->ev_keep = rd->ev_open = 0;
    rd->hold_len = 0;
    /* the handle is between two texts */
    memset(&rd->ev, 0, sizeof(rd->ev));
    rd->ev_text = rd->ev_delta = 0;
    rd->ev_usage = 0;
    rd->closed = 1;
    rd->broken = 0;
    rd->js = kind == USAGE_JSON ? J_START : J_BAD;
    rd->jcap = 0;
}

void usage_json_feed(struct usage_rd *rd, const char *p, size_t n)
{
    if (rd->mode == USAGE_JSON)
        json_scan(rd, p, n);
}

/* A JSON body is over: its last usage object counts when the body was one whole object. Its
 * text is not counted (text_bytes is a stream's). */
static void json_end(struct usage_rd *rd)
{
    if (rd->js == J_YAJL) {
        text_end(rd);
        rd->u.text_bytes = 0;
        return;
    }
    if (rd->js == J_END && rd->ev_usage == 1)
        usage_commit(&rd->u, &rd->ev);
    /* the handle is kept only when it is between two texts */
    if (rd->jcap == 2 || !rd->closed || rd->broken || rd->m.over)
        rd_drop(rd);
}

void usage_end(struct usage_rd *rd, struct usage *out)
{
    if (rd->mode == USAGE_JSON) {
        json_end(rd);
    } else if (rd->ev_json == 1) {
        /* an event cut before its end: its handle is mid-text */
        rd_drop(rd);
    }
    rd->ev_json = 0;
    rd->mode = USAGE_JSON;
    rd->js = J_BAD; /* a later usage_json_feed without usage_begin reads nothing */
    rd->jcap = 0;
    rd->u.text_tokens = usage_tokens_of_bytes(rd->u.text_bytes);
    *out = rd->u;
}

/* ---- event streams ---- */

/* Bytes of a data value: the event's JSON when its first non-blank byte is '{'. */
static void sse_data(struct usage_rd *rd, const char *p, size_t n)
{
    if (rd->ev_json == 0) {
        size_t i = 0;
        while (i < n && (p[i] == ' ' || p[i] == '\t'))
            i++;
        if (i == n)
            return;
        if (p[i] != '{') {
            rd->ev_json = 2; /* "[DONE]", or not JSON: passed on, not read */
            rd->ev_keep = 1;
            return;
        }
        rd->ev_json = 1;
        text_begin(rd);
        p += i;
        n -= i;
    }
    if (rd->ev_json == 1) {
        text_feed(rd, p, n);
        /* an element in "choices", or no JSON object: not the chunk to remove */
        if (rd->choices == 2 || rd->broken)
            rd->ev_keep = 1;
    }
}

/* A data line starts: the previous one's data ends with a newline (white space to JSON). */
static void sse_data_line(struct usage_rd *rd)
{
    if (rd->ev_data && rd->ev_json == 1)
        text_feed(rd, "\n", 1);
    rd->ev_data = 1;
}

/* The blank line that ends an event: 1 when the filter removes the event. */
static int sse_event_end(struct usage_rd *rd)
{
    int drop = 0;

    if (rd->ev_json == 1) {
        text_end(rd);
        drop = rd->filter && !rd->ev_keep && rd->closed && !rd->broken && rd->choices == 1 &&
               rd->ev_usage == 1;
    }
    rd->ev_json = rd->ev_data = rd->ev_keep = rd->ev_open = 0;
    return drop;
}

/* The filter's output: p[a, b) is passed on, moved down to *out. */
static void emit(char *p, size_t *out, size_t a, size_t b)
{
    if (*out != a && b > a)
        memmove(p + *out, p + a, b - a);
    *out += b - a;
}

/* The held bytes of the current event are passed on: to pre, ahead of this piece's output. */
static void flush_hold(struct usage_rd *rd, char *pre, size_t *pre_len)
{
    if (!rd->hold_len)
        return;
    memcpy(pre + *pre_len, rd->hold, rd->hold_len);
    *pre_len += rd->hold_len;
    rd->hold_len = 0;
}

size_t usage_sse_feed(struct usage_rd *rd, char *p, size_t n, int last, char *pre, size_t *pre_len)
{
    static const char data[4] = {'d', 'a', 't', 'a'};
    size_t i = 0, a = 0, out = 0; /* a: where the current event's bytes in p start */
    int f = rd->filter;

    *pre_len = 0;
    while (i < n) {
        unsigned char ch = (unsigned char)p[i];
        switch (rd->line) {
        case L_CR_END:
        case L_CR:
            if (ch == '\n') {
                /* the LF of a CRLF: it goes with the line the CR ended; after an event's end,
                 * with that event (removed with it, or passed on now) */
                if (rd->line == L_CR_END && f) {
                    if (rd->ev_keep) /* ev_keep here: the ended event was kept */
                        emit(p, &out, i, i + 1);
                    a = i + 1;
                }
                rd->ev_keep = 0;
                rd->line = L_BOL;
                i++;
                continue;
            }
            rd->ev_keep = 0;
            rd->line = L_BOL;
            continue;
        case L_BOL:
            if (ch == '\n' || ch == '\r') {
                /* a blank line: the event (if any) ends with it */
                int cr = ch == '\r';
                int had = rd->ev_open;
                int drop = sse_event_end(rd);
                i++;
                /* longer than the hold, an event is passed on however it came in pieces */
                if (drop && rd->hold_len + (i - a) > USAGE_HOLD)
                    drop = 0;
                if (f && had) {
                    if (drop) {
                        rd->hold_len = 0;
                    } else {
                        flush_hold(rd, pre, pre_len);
                        emit(p, &out, a, i);
                    }
                    a = i;
                } else if (f) {
                    emit(p, &out, a, i); /* a blank line between events */
                    a = i;
                }
                /* remembered for the LF of a CRLF: was the event passed on? */
                rd->ev_keep = (uint8_t)(!f || !had || !drop);
                rd->line = cr ? L_CR_END : L_BOL;
                continue;
            }
            if (!rd->ev_open) { /* an event starts (ev_keep said how the last one went) */
                rd->ev_open = 1;
                rd->ev_keep = 0;
            }
            rd->fmatch = 0;
            rd->line = L_NAME;
            continue;
        case L_NAME:
            if (ch == ':') {
                if (rd->fmatch == 4) {
                    sse_data_line(rd);
                    rd->line = L_SP;
                } else {
                    rd->line = L_SKIP;
                }
                i++;
                continue;
            }
            if (ch == '\n' || ch == '\r') {
                if (rd->fmatch == 4) /* "data" alone: an empty data line */
                    sse_data_line(rd);
                rd->line = ch == '\r' ? L_CR : L_BOL;
                i++;
                continue;
            }
            rd->fmatch = rd->fmatch < 4 && (char)ch == data[rd->fmatch] ? rd->fmatch + 1 : 0xff;
            i++;
            continue;
        case L_SP:
            rd->line = L_DATA;
            if (ch == ' ')
                i++;
            continue;
        case L_DATA: {
            size_t j = i;
            while (j < n && p[j] != '\n' && p[j] != '\r')
                j++;
            sse_data(rd, p + i, j - i);
            if (j < n)
                rd->line = p[j] == '\r' ? L_CR : L_BOL;
            i = j < n ? j + 1 : j;
            continue;
        }
        case L_SKIP: {
            size_t j = i;
            while (j < n && p[j] != '\n' && p[j] != '\r')
                j++;
            if (j < n)
                rd->line = p[j] == '\r' ? L_CR : L_BOL;
            i = j < n ? j + 1 : j;
            continue;
        }
        }
    }
    if (!f)
        return n;
    /* the current event goes on unfinished: held back while it may be the one to remove */
    if (a < n || rd->hold_len) {
        if (last || rd->ev_keep || !rd->ev_open || rd->hold_len + (n - a) > USAGE_HOLD) {
            if (rd->ev_open)
                rd->ev_keep = 1;
            flush_hold(rd, pre, pre_len);
            emit(p, &out, a, n);
        } else {
            memcpy(rd->hold + rd->hold_len, p + a, n - a);
            rd->hold_len = (uint16_t)(rd->hold_len + (n - a));
        }
    }
    return out;
}
