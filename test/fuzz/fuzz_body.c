/* Fuzz target: the request-body JSON reader (core/json.c over yajl). The body is read whole by
 * the parser every input goes through (its yajl handle kept from one body to the next), again in
 * two pieces split where its first byte says, and by a new parser: all must give the same
 * answer and fields, and every value span found must lie in the body and look like its value. */
#include <stdlib.h>
#include <string.h>

#include "core/json.h"
#include "test/fuzz/fuzz.h"

static struct json_parser jp;

static int req_same(const struct json_req *a, const struct json_req *b)
{
    return a->flags == b->flags && a->model_len == b->model_len && a->key_hash == b->key_hash &&
           a->dup == b->dup && memcmp(a->max_tokens, b->max_tokens, sizeof(a->max_tokens)) == 0 &&
           memcmp(a->span, b->span, sizeof(a->span)) == 0 &&
           (!(a->flags & JSON_REQ_MODEL) ||
            memcmp(a->model, b->model,
                   a->model_len < JSON_MODEL_MAX ? a->model_len : JSON_MODEL_MAX) == 0);
}

static void check_spans(const struct json_req *r, const char *body, size_t size)
{
    for (int f = JSON_F_MODEL; f < JSON_F_COUNT; f++) {
        const struct json_span *s = &r->span[f];
        if (!s->end)
            continue;
        if (s->off >= s->end || s->end > size)
            abort();
    }
    if (r->flags & JSON_REQ_MODEL) {
        /* the model's span is its string, quotes included */
        const struct json_span *s = &r->span[JSON_F_MODEL];
        if (s->end - s->off < 2 || body[s->off] != '"' || body[s->end - 1] != '"')
            abort();
        if (r->model_len > s->end - s->off - 2)
            abort(); /* unescaping never lengthens a string */
    }
    if ((r->flags & JSON_REQ_STREAM) &&
        (r->span[JSON_F_STREAM].end - r->span[JSON_F_STREAM].off != 4 ||
         memcmp(body + r->span[JSON_F_STREAM].off, "true", 4) != 0))
        abort();
    if ((r->flags & JSON_REQ_INCLUDE_USAGE) && !(r->flags & JSON_REQ_STREAM_OPTS))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *body = (const char *)data;
    struct json_req whole, split, fresh;
    struct json_parser np;

    int a = json_req_parse(&jp, &whole, "prompt_cache_key", body, size);
    size_t cut = size ? data[0] % (size + 1) : 0;
    int b = json_req_begin(&jp, &split, "prompt_cache_key");
    if (b == 0)
        b = json_req_feed(&jp, body, cut);
    if (b == 0)
        b = json_req_feed(&jp, body + cut, size - cut);
    if (b == 0)
        b = json_req_end(&jp);
    else
        json_req_end(&jp);
    memset(&np, 0, sizeof(np));
    int c = json_req_parse(&np, &fresh, "prompt_cache_key", body, size);
    json_parser_free(&np);
    if (a != b || a != c)
        abort();
    if (a == 0) {
        check_spans(&whole, body, size);
        if (!req_same(&whole, &split) || !req_same(&whole, &fresh))
            abort();
    }
    return 0;
}
