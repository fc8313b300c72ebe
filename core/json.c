/* Request-body JSON fields through libyajl's streaming parser, in a reused memory region. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "balancer/balancer.h"
#include "core/json.h"

/* ---- yajl's memory: a bump region reused parse after parse ---- */

/* A parse that needed more than this keeps allocating on the heap past it (a body whose model
 * or hash key is a huge escaped string, or that ends inside a long token): the region is not
 * grown for it. */
#define JSON_MEM_MAX (64 * 1024)
#define JSON_MEM_MIN 2048
#define JSON_HDR     16 /* each block starts with its size, keeping yajl's blocks 16-aligned */

static int mem_in(const struct json_mem *p, const char *b)
{
    return p->mem && b >= p->mem && b < p->mem + p->cap;
}

static void *mem_malloc(void *ctx, size_t sz)
{
    struct json_mem *p = ctx;
    size_t n = JSON_HDR + ((sz + JSON_HDR - 1) & ~(size_t)(JSON_HDR - 1));
    char *b;

    if (n <= p->cap - p->used) {
        b = p->mem + p->used;
        p->used += n;
    } else {
        /* past the region: the heap, and the region grows to fit at the end of the parse */
        if (!(b = malloc(n)))
            return NULL;
        p->over += n;
        p->heap_allocs++;
    }
    memcpy(b, &sz, sizeof(sz));
    return b + JSON_HDR;
}

static void mem_free(void *ctx, void *ptr)
{
    struct json_mem *p = ctx;
    char *b;
    size_t sz;

    if (!ptr)
        return;
    b = (char *)ptr - JSON_HDR;
    if (!mem_in(p, b)) {
        free(b);
        return;
    }
    /* the last block goes back to the region; others wait for the end of the parse */
    memcpy(&sz, b, sizeof(sz));
    if (b + JSON_HDR + ((sz + JSON_HDR - 1) & ~(size_t)(JSON_HDR - 1)) == p->mem + p->used)
        p->used = (size_t)(b - p->mem);
}

static void *mem_realloc(void *ctx, void *ptr, size_t sz)
{
    struct json_mem *p = ctx;
    char *b;
    size_t old, oldn, n;
    void *nb;

    if (!ptr)
        return mem_malloc(ctx, sz);
    b = (char *)ptr - JSON_HDR;
    memcpy(&old, b, sizeof(old));
    oldn = JSON_HDR + ((old + JSON_HDR - 1) & ~(size_t)(JSON_HDR - 1));
    n = JSON_HDR + ((sz + JSON_HDR - 1) & ~(size_t)(JSON_HDR - 1));
    if (mem_in(p, b) && b + oldn == p->mem + p->used && n <= p->cap - (size_t)(b - p->mem)) {
        /* the last block grows (or shrinks) in place */
        p->used = (size_t)(b - p->mem) + n;
        memcpy(b, &sz, sizeof(sz));
        return ptr;
    }
    if (!(nb = mem_malloc(ctx, sz)))
        return NULL;
    memcpy(nb, ptr, old < sz ? old : sz);
    mem_free(ctx, ptr);
    return nb;
}

void json_mem_reset(struct json_mem *p)
{
    size_t want = p->cap + p->over, cap = p->cap ? p->cap : JSON_MEM_MIN;

    p->used = 0;
    if (!p->over)
        return;
    p->over = 0;
    while (cap < want)
        cap *= 2;
    if (cap > JSON_MEM_MAX)
        return;
    char *m = malloc(cap);
    if (!m)
        return; /* the heap keeps serving past the region */
    free(p->mem);
    p->mem = m;
    p->cap = cap;
}

void json_mem_funcs(struct json_mem *m, yajl_alloc_funcs *af)
{
    af->malloc = mem_malloc;
    af->realloc = mem_realloc;
    af->free = mem_free;
    af->ctx = m;
}

void json_mem_free(struct json_mem *m)
{
    free(m->mem);
    m->mem = NULL;
    m->cap = m->used = m->over = 0;
}

/* ---- request fields ---- */

/* The callbacks that report values and keys are set in the table yajl reads only where a value
 * or key is used: yajl then neither decodes the escapes of a skipped string nor converts a
 * skipped number. (yajl 2.1 keeps a pointer to the table; were it to copy it, the callbacks
 * would only be called more, and they check where they are anyway.) */
static void req_narrow(struct json_parser *p);

/* The field a top-level key names, by its unescaped text. */
static enum json_req_field req_field(const unsigned char *k, size_t n)
{
    switch (n) {
    case 5:
        return memcmp(k, "model", 5) == 0 ? JSON_F_MODEL : JSON_F_NONE;
    case 6:
        return memcmp(k, "stream", 6) == 0 ? JSON_F_STREAM : JSON_F_NONE;
    case 1:
        return k[0] == 'n' ? JSON_F_N : JSON_F_NONE;
    case 7:
        return memcmp(k, "best_of", 7) == 0 ? JSON_F_BEST_OF : JSON_F_NONE;
    case 10:
        return memcmp(k, "max_tokens", 10) == 0 ? JSON_F_MAX_TOKENS : JSON_F_NONE;
    case 14:
        return memcmp(k, "stream_options", 14) == 0 ? JSON_F_STREAM_OPTIONS : JSON_F_NONE;
    case 17:
        return memcmp(k, "max_output_tokens", 17) == 0 ? JSON_F_MAX_OUTPUT : JSON_F_NONE;
    case 21:
        return memcmp(k, "max_completion_tokens", 21) == 0 ? JSON_F_MAX_COMPLETION : JSON_F_NONE;
    }
    return JSON_F_NONE;
}

static int is_gap(unsigned char c)
{
    /* what yajl skips between a key and its value: its white space (it takes \v and \f too) and
     * the colon */
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == ':' || c == '\v' || c == '\f';
}

/* Finds where the value of field f starts: after the key just read, past white space and ':'
 * in the piece being parsed, or else at the start of a later one (json_req_feed). */
static void req_mark(struct json_parser *p, enum json_req_field f)
{
    size_t i = yajl_get_bytes_consumed(p->h);

    if (p->out->span[f].end) /* given before: the last one counts */
        p->out->dup |= (uint16_t)(1u << f);
    p->out->span[f].off = p->out->span[f].end = 0;
    p->pending = JSON_F_NONE;
    for (; i < p->chunk_len; i++) {
        if (!is_gap(p->chunk[i])) {
            p->out->span[f].off = p->fed + i;
            return;
        }
    }
    p->pending = (uint8_t)f;
}

/* The field whose value is read at the current depth, or JSON_F_NONE: a value at depth 1 is the
 * top-level field's, one at depth 2 inside the stream_options object is its field's. */
static enum json_req_field req_cur(const struct json_parser *p)
{
    if (p->depth == 1)
        return (enum json_req_field)p->top;
    if (p->depth == 2 && p->so_obj)
        return (enum json_req_field)p->sub;
    return JSON_F_NONE;
}

/* A value starts at the current depth: forget what an earlier value of its field set (the last
 * value of a field counts, whatever its type). */
static void req_value_begin(struct json_parser *p, enum json_req_field f)
{
    static const uint32_t clear[JSON_F_COUNT] = {
        [JSON_F_MODEL] = JSON_REQ_MODEL,
        [JSON_F_STREAM] = JSON_REQ_STREAM | JSON_REQ_BAD_STREAM,
        [JSON_F_STREAM_OPTIONS] =
            JSON_REQ_STREAM_OPTS | JSON_REQ_INCLUDE_USAGE | JSON_REQ_BAD_USAGE,
        [JSON_F_INCLUDE_USAGE] = JSON_REQ_INCLUDE_USAGE | JSON_REQ_BAD_USAGE,
    };
    /* set until the value turns out a boolean or null (req_typed): "true", 1 or {} are not
     * what OpenAI takes (400), and an upstream that coerces them would stream an answer aigw
     * does not expect */
    static const uint32_t bad[JSON_F_COUNT] = {
        [JSON_F_STREAM] = JSON_REQ_BAD_STREAM,
        [JSON_F_INCLUDE_USAGE] = JSON_REQ_BAD_USAGE,
    };

    if (p->depth == 1 && p->is_key)
        p->out->flags &= ~JSON_REQ_KEY;
    p->out->flags = (p->out->flags & ~clear[f]) | bad[f];
    if (f >= JSON_F_MAX_TOKENS)
        p->out->max_tokens[f - JSON_F_MAX_TOKENS] = -1;
    if (f == JSON_F_STREAM_OPTIONS)
        p->out->span[JSON_F_INCLUDE_USAGE].off = p->out->span[JSON_F_INCLUDE_USAGE].end = 0;
}

/* The value of field f just begun is a boolean or null: of the type its field takes. */
static inline void req_typed(struct json_req *o, enum json_req_field f)
{
    if (f == JSON_F_STREAM)
        o->flags &= ~(uint32_t)JSON_REQ_BAD_STREAM;
    else if (f == JSON_F_INCLUDE_USAGE)
        o->flags &= ~(uint32_t)JSON_REQ_BAD_USAGE;
}

/* A value of field f ended (the piece being parsed holds its last byte): record where. */
static void req_value_end(struct json_parser *p, enum json_req_field f)
{
    if (f != JSON_F_NONE)
        p->out->span[f].end = p->fed + yajl_get_bytes_consumed(p->h);
}

/* A scalar value: checks it is not the whole body, records where it ended and returns the
 * field it is the value of (JSON_F_NONE for none). *key: it is the hash key's value. */
static int req_scalar(struct json_parser *p, enum json_req_field *f, int *key)
{
    if (p->depth == 0)
        return 0; /* the body must be an object */
    *f = req_cur(p);
    *key = p->depth == 1 && p->is_key;
    req_value_begin(p, *f);
    req_value_end(p, *f);
    return 1;
}

static int req_null(void *ctx)
{
    struct json_parser *p = ctx;
    enum json_req_field f;
    int key;
    if (!req_scalar(p, &f, &key))
        return 0;
    req_typed(p->out, f);
    return 1;
}

static int req_boolean(void *ctx, int v)
{
    struct json_parser *p = ctx;
    enum json_req_field f;
    int key;

    if (!req_scalar(p, &f, &key))
        return 0;
    req_typed(p->out, f);
    if (v && f == JSON_F_STREAM)
        p->out->flags |= JSON_REQ_STREAM;
    else if (v && f == JSON_F_INCLUDE_USAGE)
        p->out->flags |= JSON_REQ_INCLUDE_USAGE;
    return 1;
}

static int64_t sat_mul10(int64_t v, int d)
{
    return v > (INT64_MAX - d) / 10 ? INT64_MAX : v * 10 + d;
}

int64_t json_count(const char *s, size_t n)
{
    size_t i = 0;
    int64_t v = 0, e = 0;
    int frac = 0, neg = 0, digits = 0, eneg = 0;
    int64_t shift = 0; /* decimal digits after the point taken into v */

    while (i < n && (s[i] == ' ' || s[i] == '\t'))
        i++;
    while (n > i && (s[n - 1] == ' ' || s[n - 1] == '\t'))
        n--;
    if (i < n && (s[i] == '-' || s[i] == '+'))
        neg = s[i++] == '-';
    for (; i < n && s[i] >= '0' && s[i] <= '9'; i++, digits++)
        v = sat_mul10(v, s[i] - '0');
    if (i < n && s[i] == '.') {
        for (i++; i < n && s[i] >= '0' && s[i] <= '9'; i++, digits++) {
            if (v <= (INT64_MAX - 9) / 10) {
                v = v * 10 + (s[i] - '0');
                shift++;
            } else if (s[i] != '0') {
                frac = 1;
            }
        }
    }
    if (!digits)
        return JSON_NUM_BAD;
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '-' || s[i] == '+'))
            eneg = s[i++] == '-';
        if (i == n)
            return JSON_NUM_BAD;
        for (; i < n && s[i] >= '0' && s[i] <= '9'; i++)
            e = e > 100000 ? e : e * 10 + (s[i] - '0');
    }
    if (i != n)
        return JSON_NUM_BAD;
    e = (eneg ? -e : e) - shift;
    for (; e > 0; e--)
        v = sat_mul10(v, 0);
    for (; e < 0 && v; e++) {
        frac |= v % 10 != 0;
        v /= 10;
    }
    if (frac && v < INT64_MAX)
        v++; /* a part of a token is a token */
    if (neg && (v || frac))
        return JSON_NUM_BAD;
    return v;
}

/* A number as JSON writes it: the max_*tokens, n and best_of fields take any (upstreams
 * coerce 9.0 and 1e3 as well), rounded up and saturated; a negative one is marked bad. */
static int req_number(void *ctx, const char *s, size_t n)
{
    struct json_parser *p = ctx;
    enum json_req_field f;
    int key;

    if (!req_scalar(p, &f, &key))
        return 0;
    if (f < JSON_F_MAX_TOKENS)
        return 1;
    p->out->max_tokens[f - JSON_F_MAX_TOKENS] = json_count(s, n);
    return 1;
}

/* A string value, unescaped by yajl (it is handed over whole, whatever pieces it came in). */
static int req_string(void *ctx, const unsigned char *s, size_t n)
{
    struct json_parser *p = ctx;
    struct json_req *o = p->out;
    enum json_req_field f;
    int key;

    if (!req_scalar(p, &f, &key))
        return 0;
    if (f >= JSON_F_MAX_TOKENS) /* "9": lenient upstreams take a numeric string too */
        o->max_tokens[f - JSON_F_MAX_TOKENS] = json_count((const char *)s, n);
    if (f == JSON_F_MODEL) {
        o->flags |= JSON_REQ_MODEL;
        o->model_len = n > UINT32_MAX ? UINT32_MAX : (uint32_t)n;
        memcpy(o->model, s, n < JSON_MODEL_MAX ? n : JSON_MODEL_MAX);
    }
    if (key) {
        o->flags |= JSON_REQ_KEY;
        o->key_hash = balancer_hash(s, n);
    }
    return 1;
}

static int req_map_key(void *ctx, const unsigned char *k, size_t n)
{
    struct json_parser *p = ctx;
    enum json_req_field f;

    if (p->depth == 1) {
        f = req_field(k, n);
        p->top = (uint8_t)f;
        p->is_key = p->key && n == p->key_len && memcmp(k, p->key, n) == 0;
    } else if (p->depth == 2 && p->so_obj) {
        f = n == 13 && memcmp(k, "include_usage", 13) == 0 ? JSON_F_INCLUDE_USAGE : JSON_F_NONE;
        p->sub = (uint8_t)f;
    } else {
        return 1;
    }
    if (f != JSON_F_NONE)
        req_mark(p, f);
    req_narrow(p);
    return 1;
}

static int req_open(struct json_parser *p, int obj)
{
    if (p->depth >= 2 && !p->so_obj && p->depth < JSON_MAX_DEPTH) {
        p->depth++; /* deeper inside a skipped value: nothing to note */
        return 1;
    }
    if (p->depth == JSON_MAX_DEPTH || (p->depth == 0 && (!obj || p->closed)))
        return 0; /* too deep, a body that is an array, or a second text after the object */
    if (p->depth)
        req_value_begin(p, req_cur(p));
    p->depth++;
    if (p->depth == 2) {
        p->so_obj = obj && p->top == JSON_F_STREAM_OPTIONS;
        p->sub = JSON_F_NONE;
    }
    req_narrow(p);
    return 1;
}

static int req_close(struct json_parser *p)
{
    if (p->depth > 2 && !p->so_obj) {
        p->depth--;
        return 1;
    }
    if (--p->depth == 0) {
        p->closed = 1;
        p->end = p->fed + yajl_get_bytes_consumed(p->h);
    }
    req_value_end(p, req_cur(p));
    if (p->depth == 1 && p->so_obj) {
        p->out->flags |= JSON_REQ_STREAM_OPTS;
        p->so_obj = 0;
    }
    req_narrow(p);
    return 1;
}

static int req_start_map(void *ctx)
{
    return req_open(ctx, 1);
}

static int req_start_array(void *ctx)
{
    return req_open(ctx, 0);
}

static int req_end(void *ctx)
{
    return req_close(ctx);
}

static void req_narrow(struct json_parser *p)
{
    enum { KEYS = 1, VALS = 2 };
    uint8_t mode;

    /* keys at the top level and in stream_options; values where a field's is expected (and at
     * depth 0, where any scalar is refused) */
    if (p->depth == 1)
        mode = KEYS | (p->top != JSON_F_NONE || p->is_key ? VALS : 0);
    else if (p->depth == 2 && p->so_obj)
        mode = KEYS | (p->sub != JSON_F_NONE ? VALS : 0);
    else
        mode = p->depth == 0 ? VALS : 0;
    if (mode == p->narrow)
        return;
    p->narrow = mode;
    p->cb.yajl_map_key = mode & KEYS ? req_map_key : NULL;
    p->cb.yajl_null = mode & VALS ? req_null : NULL;
    p->cb.yajl_boolean = mode & VALS ? req_boolean : NULL;
    p->cb.yajl_number = mode & VALS ? req_number : NULL;
    p->cb.yajl_string = mode & VALS ? req_string : NULL;
}

/* ---- the parse ---- */

/* Frees the yajl handle and empties the region (grown to what it lacked). */
static void req_drop(struct json_parser *p)
{
    if (p->h) {
        yajl_free(p->h);
        p->h = NULL;
    }
    json_mem_reset(&p->m);
}

void json_parser_free(struct json_parser *p)
{
    req_drop(p);
    json_mem_free(&p->m);
    p->active = 0;
}

void json_req_reset(struct json_req *out)
{
    /* all but the model's bytes, which model_len says are not there */
    memset(out, 0, offsetof(struct json_req, model));
    memset(&out->key_hash, 0, sizeof(*out) - offsetof(struct json_req, key_hash));
    for (int i = 0; i < 5; i++)
        out->max_tokens[i] = -1;
}

int json_req_begin(struct json_parser *p, struct json_req *out, const char *key_field)
{
    if (p->active) /* the last parse was left unfinished: its handle is mid-body */
        req_drop(p);
    json_req_reset(out);
    p->out = out;
    p->key = key_field;
    p->key_len = key_field ? strlen(key_field) : 0;
    p->chunk = NULL;
    p->chunk_len = 0;
    p->fed = 0;
    p->depth = 0;
    p->top = p->sub = p->is_key = p->so_obj = p->pending = 0;
    p->closed = p->failed = 0;
    if (!p->h) {
        memset(&p->cb, 0, sizeof(p->cb));
        p->cb.yajl_start_map = req_start_map;
        p->cb.yajl_end_map = req_end;
        p->cb.yajl_start_array = req_start_array;
        p->cb.yajl_end_array = req_end;
        p->narrow = 0xff; /* none of the narrowed callbacks set yet */
        json_mem_funcs(&p->m, &p->af);
        if (!(p->h = yajl_alloc(&p->cb, &p->af, p))) {
            json_mem_reset(&p->m);
            return -ENOMEM;
        }
        /* one body after another through the same handle: yajl 2 has no reset, but it can
         * read a sequence of JSON texts. That a body holds exactly one is checked here. */
        yajl_config(p->h, yajl_allow_multiple_values, 1);
    }
    req_narrow(p);
    p->active = 1;
    return 0;
}

/* 1 when b[0, n) is only white space (as yajl takes it). */
static int all_space(const unsigned char *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (b[i] == ':' || !is_gap(b[i]))
            return 0;
    return 1;
}

int json_req_feed(struct json_parser *p, const char *buf, size_t len)
{
    const unsigned char *s = (const unsigned char *)buf;

    if (!p->active || p->failed)
        return -EINVAL;
    if (p->closed) {
        /* after the object, white space only; yajl need not see it */
        p->fed += len;
        p->failed = !all_space(s, len);
        return p->failed ? -EINVAL : 0;
    }
    if (p->pending) {
        for (size_t i = 0; i < len; i++) {
            if (!is_gap(s[i])) {
                p->out->span[p->pending].off = p->fed + i;
                p->pending = JSON_F_NONE;
                break;
            }
        }
    }
    p->chunk = s;
    p->chunk_len = len;
    yajl_status st = yajl_parse(p->h, s, len);
    p->chunk = NULL;
    p->chunk_len = 0;
    /* yajl read on after the object (the next text of a sequence, to it): only white space
     * may be there */
    if (st != yajl_status_ok ||
        (p->closed && !all_space(s + (p->end - p->fed), len - (size_t)(p->end - p->fed))))
        p->failed = 1;
    p->fed += len;
    return p->failed ? -EINVAL : 0;
}

int json_req_end(struct json_parser *p)
{
    int ok = p->active && p->closed && !p->failed;

    p->active = 0;
    /* the handle is kept for the next body only when this one left it clean (between two
     * texts) and within the region */
    if (!ok || p->m.over)
        req_drop(p);
    return ok ? 0 : -EINVAL;
}

/* ---- a whole body at once, without yajl ---- */

/* A body in one piece is first read by the scan below, which takes only plain JSON (RFC 8259
 * white space, nesting up to FAST_DEPTH, no escape in a string whose text is used) and records
 * exactly what the yajl callbacks above record for it. Whatever it does not take, valid or
 * not, goes through yajl, which then decides: a body is refused exactly as before. */
#define FAST_DEPTH 63 /* bits of the scan's container stack, minus depth 0 */

/* string bytes the scan stops at: '"', '\\', control bytes, and the lead bytes of UTF-8 */
static const uint8_t fast_str_stop[256] = {
    [0x00 ... 0x1f] = 1,
    ['"'] = 1,
    ['\\'] = 1,
    [0x80 ... 0xff] = 1,
};

static const uint8_t fast_hex[256] = {
    ['0' ... '9'] = 1,
    ['a' ... 'f'] = 1,
    ['A' ... 'F'] = 1,
};

static inline __attribute__((always_inline)) size_t fast_ws(const unsigned char *b, size_t i,
                                                            size_t n)
{
    while (i < n && (b[i] == ' ' || b[i] == '\n' || b[i] == '\r' || b[i] == '\t'))
        i++;
    return i;
}

/* The string whose opening quote is at b[i]: the index past its closing quote, or 0 when it is
 * not one yajl takes (its checks: no control byte, escapes \" \\ \/ \b \f \n \r \t \uXXXX,
 * UTF-8 lead bytes followed by their continuation bytes). *esc: it holds an escape. */
static inline __attribute__((always_inline)) size_t fast_str(const unsigned char *b, size_t i,
                                                             size_t n, int *esc)
{
    const uint64_t ones = 0x0101010101010101ull, high = 0x8080808080808080ull;

    *esc = 0;
    for (i++;;) {
        /* 8 bytes at a time while none of them is a stop byte: a high bit for a byte below
         * 0x20, a '"', a '\\' or a byte from 0x80. The lowest one flagged is the first stop
         * byte (a borrow can only flag bytes above a real one) */
        while (n - i >= 8) {
            uint64_t x, q, s, m;
            memcpy(&x, b + i, 8);
            q = x ^ (ones * '"');
            s = x ^ (ones * '\\');
            m = (((x - ones * 0x20) & ~x) | ((q - ones) & ~q) | ((s - ones) & ~s) | x) & high;
            if (m) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
                i += (size_t)__builtin_ctzll(m) >> 3; /* b[i] is the lowest byte of x */
#endif
                break;
            }
            i += 8;
        }
        while (i < n && !fast_str_stop[b[i]])
            i++;
        if (i >= n)
            return 0;
        unsigned char c = b[i];
        if (c == '"')
            return i + 1;
        if (c < 0x20)
            return 0;
        if (c == '\\') {
            *esc = 1;
            if (i + 1 >= n)
                return 0;
            c = b[i + 1];
            if (c == 'u') {
                if (i + 5 >= n || !fast_hex[b[i + 2]] || !fast_hex[b[i + 3]] ||
                    !fast_hex[b[i + 4]] || !fast_hex[b[i + 5]])
                    return 0;
                i += 6;
            } else if (c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' ||
                       c == 'r' || c == 't') {
                i += 2;
            } else {
                return 0;
            }
            continue;
        }
        /* c >= 0x80 */
        size_t more = (c >> 5) == 0x6 ? 1 : (c >> 4) == 0xe ? 2 : (c >> 3) == 0x1e ? 3 : 0;
        if (!more || i + more >= n)
            return 0;
        for (size_t k = 1; k <= more; k++)
            if ((b[i + k] >> 6) != 0x2)
                return 0;
        i += more + 1;
    }
}

/* The number at b[i] (RFC 8259's grammar): the index past it, or 0. */
static size_t fast_num(const unsigned char *b, size_t i, size_t n)
{
    if (i < n && b[i] == '-')
        i++;
    if (i >= n)
        return 0;
    if (b[i] == '0') {
        i++;
    } else if (b[i] >= '1' && b[i] <= '9') {
        while (i < n && b[i] >= '0' && b[i] <= '9')
            i++;
    } else {
        return 0;
    }
    if (i < n && b[i] == '.') {
        size_t d = ++i;
        while (i < n && b[i] >= '0' && b[i] <= '9')
            i++;
        if (i == d)
            return 0;
    }
    if (i < n && (b[i] == 'e' || b[i] == 'E')) {
        i++;
        if (i < n && (b[i] == '+' || b[i] == '-'))
            i++;
        size_t d = i;
        while (i < n && b[i] >= '0' && b[i] <= '9')
            i++;
        if (i == d)
            return 0;
    }
    return i; /* what follows (a digit after "0" too) is checked as what follows a value */
}

/* A value of the field the callbacks would see at this depth ended at `end`. */
static void fast_value_end(struct json_parser *p, uint64_t end)
{
    enum json_req_field f = req_cur(p);
    if (f != JSON_F_NONE)
        p->out->span[f].end = end;
}

/* Reads body b[0, n) into p->out as the yajl callbacks would: 0 when it is one object read in
 * full, 1 when yajl must read it (p->out is then reset by json_req_begin). */
static int fast_parse(struct json_parser *p, const unsigned char *b, size_t n)
{
    struct json_req *o = p->out;
    uint64_t arr = 0; /* bit d: the container at depth d is an array */
    size_t i = fast_ws(b, 0, n), e;
    int esc;

    if (i >= n || b[i] != '{')
        return 1;
    i = fast_ws(b, i + 1, n);
    p->depth = 1;
    if (i < n && b[i] == '}')
        goto close;
    goto key;

value:
    /* b[i] starts a value at p->depth (after a key, or in an array) */
    if (i >= n)
        return 1;
    switch (b[i]) {
    case '{':
    case '[':
        if (p->depth >= FAST_DEPTH)
            return 1;
        req_value_begin(p, req_cur(p));
        p->depth++;
        if (p->depth == 2) {
            p->so_obj = b[i] == '{' && p->top == JSON_F_STREAM_OPTIONS;
            p->sub = JSON_F_NONE;
        }
        if (b[i] == '[') {
            arr |= 1ull << p->depth;
            i = fast_ws(b, i + 1, n);
            if (i < n && b[i] == ']')
                goto close;
            goto value;
        }
        arr &= ~(1ull << p->depth);
        i = fast_ws(b, i + 1, n);
        if (i < n && b[i] == '}')
            goto close;
        goto key;
    case '"': {
        enum json_req_field f = req_cur(p);
        int key = p->depth == 1 && p->is_key;
        if (!(e = fast_str(b, i, n, &esc)))
            return 1;
        if ((f != JSON_F_NONE || key) && esc)
            return 1; /* its text is used: yajl decodes it */
        req_value_begin(p, f);
        if (f != JSON_F_NONE)
            o->span[f].end = e;
        const unsigned char *s = b + i + 1;
        size_t sn = e - i - 2;
        if (f >= JSON_F_MAX_TOKENS)
            o->max_tokens[f - JSON_F_MAX_TOKENS] = json_count((const char *)s, sn);
        if (f == JSON_F_MODEL) {
            o->flags |= JSON_REQ_MODEL;
            o->model_len = sn > UINT32_MAX ? UINT32_MAX : (uint32_t)sn;
            memcpy(o->model, s, sn < JSON_MODEL_MAX ? sn : JSON_MODEL_MAX);
        }
        if (key) {
            o->flags |= JSON_REQ_KEY;
            o->key_hash = balancer_hash(s, sn);
        }
        i = e;
        goto next;
    }
    case 't':
    case 'f':
    case 'n': {
        enum json_req_field f = req_cur(p);
        size_t l = b[i] == 'f' ? 5 : 4;
        const char *lit = b[i] == 't' ? "true" : b[i] == 'f' ? "false" : "null";
        if (n - i < l || memcmp(b + i, lit, l) != 0)
            return 1;
        req_value_begin(p, f);
        req_typed(o, f);
        i += l;
        if (f != JSON_F_NONE)
            o->span[f].end = i;
        if (b[i - l] == 't' && f == JSON_F_STREAM)
            o->flags |= JSON_REQ_STREAM;
        else if (b[i - l] == 't' && f == JSON_F_INCLUDE_USAGE)
            o->flags |= JSON_REQ_INCLUDE_USAGE;
        goto next;
    }
    default: {
        enum json_req_field f = req_cur(p);
        if (!(e = fast_num(b, i, n)))
            return 1;
        req_value_begin(p, f);
        if (f != JSON_F_NONE)
            o->span[f].end = e;
        if (f >= JSON_F_MAX_TOKENS)
            o->max_tokens[f - JSON_F_MAX_TOKENS] = json_count((const char *)b + i, e - i);
        i = e;
        goto next;
    }
    }

close:
    /* b[i] is the '}' or ']' that closes the container at p->depth */
    if ((b[i] == ']') != (int)(arr >> p->depth & 1))
        return 1;
    i++;
    if (--p->depth == 0) {
        p->closed = 1;
        p->end = i;
        return fast_ws(b, i, n) == n ? 0 : 1;
    }
    fast_value_end(p, i);
    if (p->depth == 1 && p->so_obj) {
        o->flags |= JSON_REQ_STREAM_OPTS;
        p->so_obj = 0;
    }
    /* fall through to what follows a value */

next:
    i = fast_ws(b, i, n);
    if (i >= n)
        return 1;
    if (b[i] == ',') {
        i = fast_ws(b, i + 1, n);
        if (arr >> p->depth & 1)
            goto value;
        goto key;
    }
    if (b[i] == '}' || b[i] == ']')
        goto close;
    return 1;

key:
    /* b[i] should start a key in the object at p->depth */
    if (i >= n || b[i] != '"' || !(e = fast_str(b, i, n, &esc)))
        return 1;
    if (p->depth == 1 || (p->depth == 2 && p->so_obj)) {
        const unsigned char *k = b + i + 1;
        size_t kn = e - i - 2;
        enum json_req_field f;
        if (esc)
            return 1; /* yajl compares its unescaped text */
        if (p->depth == 1) {
            f = req_field(k, kn);
            p->top = (uint8_t)f;
            p->is_key = p->key && kn == p->key_len && memcmp(k, p->key, kn) == 0;
        } else {
            f = kn == 13 && memcmp(k, "include_usage", 13) == 0 ? JSON_F_INCLUDE_USAGE
                                                                : JSON_F_NONE;
            p->sub = (uint8_t)f;
        }
        i = fast_ws(b, e, n);
        if (i >= n || b[i] != ':')
            return 1;
        i = fast_ws(b, i + 1, n);
        if (f != JSON_F_NONE) {
            if (o->span[f].end) /* given before: the last one counts */
                o->dup |= (uint16_t)(1u << f);
            o->span[f].off = i;
            o->span[f].end = 0;
        }
        goto value;
    }
    i = fast_ws(b, e, n);
    if (i >= n || b[i] != ':')
        return 1;
    i = fast_ws(b, i + 1, n);
    goto value;
}

int json_req_parse(struct json_parser *p, struct json_req *out, const char *key_field,
                   const char *body, size_t len)
{
    if (p->active) /* the last parse was left unfinished: its handle is mid-body */
        req_drop(p);
    p->active = 0;
    json_req_reset(out);
    p->out = out;
    p->key = key_field;
    p->key_len = key_field ? strlen(key_field) : 0;
    p->depth = 0;
    p->top = p->sub = p->is_key = p->so_obj = 0;
    p->closed = 0;
    if (fast_parse(p, (const unsigned char *)body, len) == 0) {
        p->fast++;
        return 0;
    }
    int r = json_req_begin(p, out, key_field);
    if (r == 0)
        json_req_feed(p, body, len);
    return r == 0 ? json_req_end(p) : r;
}
