/* Unit tests for core/json.c: request-body fields read through yajl, whole or in pieces. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "balancer/balancer.h"
#include "core/json.h"

static struct json_parser jp;

static int parse(const char *b, struct json_req *r)
{
    return json_req_parse(&jp, r, "prompt_cache_key", b, strlen(b));
}

/* The bytes of field f's value as the body has them. */
static void assert_span(const char *b, const struct json_req *r, enum json_req_field f,
                        const char *want)
{
    const struct json_span *s = &r->span[f];
    if (!want) {
        assert_int_equal(s->off, 0);
        assert_int_equal(s->end, 0);
        return;
    }
    assert_true(s->off < s->end);
    assert_true(s->end <= strlen(b));
    if (s->end - s->off != strlen(want) || memcmp(b + s->off, want, strlen(want)) != 0)
        fail_msg("span %d is '%.*s', expected '%s'", f, (int)(s->end - s->off), b + s->off, want);
}

static void assert_req_equal(const struct json_req *a, const struct json_req *b)
{
    assert_int_equal(a->flags, b->flags);
    assert_int_equal(a->model_len, b->model_len);
    if (a->flags & JSON_REQ_MODEL)
        assert_memory_equal(a->model, b->model,
                            a->model_len < JSON_MODEL_MAX ? a->model_len : JSON_MODEL_MAX);
    if (a->flags & JSON_REQ_KEY)
        assert_true(a->key_hash == b->key_hash);
    assert_memory_equal(a->max_tokens, b->max_tokens, sizeof(a->max_tokens));
    assert_memory_equal(a->span, b->span, sizeof(a->span));
    assert_int_equal(a->dup, b->dup);
}

static void test_fields(void **state)
{
    struct json_req r;

    const char *b = "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\",\"model\":\"inner\"}],"
                    "\"model\":\"gpt-4o-mini\",\"stream\":true,\"prompt_cache_key\":\"conv-42\","
                    "\"stream_options\":{\"x\":[1],\"include_usage\":true},\"max_tokens\":100,"
                    "\"max_completion_tokens\":7,\"max_output_tokens\":0}";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.flags, JSON_REQ_MODEL | JSON_REQ_STREAM | JSON_REQ_KEY |
                                  JSON_REQ_STREAM_OPTS | JSON_REQ_INCLUDE_USAGE);
    assert_int_equal(r.model_len, 11);
    assert_memory_equal(r.model, "gpt-4o-mini", 11);
    assert_true(r.key_hash == balancer_hash("conv-42", 7));
    assert_int_equal(r.max_tokens[0], 100);
    assert_int_equal(r.max_tokens[1], 7);
    assert_int_equal(r.max_tokens[2], 0);
    assert_int_equal(r.dup, 0);
    assert_span(b, &r, JSON_F_MODEL, "\"gpt-4o-mini\"");
    assert_span(b, &r, JSON_F_STREAM, "true");
    assert_span(b, &r, JSON_F_STREAM_OPTIONS, "{\"x\":[1],\"include_usage\":true}");
    assert_span(b, &r, JSON_F_INCLUDE_USAGE, "true");
    assert_span(b, &r, JSON_F_MAX_TOKENS, "100");
    assert_span(b, &r, JSON_F_MAX_COMPLETION, "7");
    assert_span(b, &r, JSON_F_MAX_OUTPUT, "0");

    /* white space everywhere, false values, a number ending the body */
    b = " {\n\"stream\" : false ,\t\"model\"\r\n:\n \"m\", \"stream_options\": {\"include_usage\" "
        ": false}, \"max_tokens\": 5 }\n";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.flags, JSON_REQ_MODEL | JSON_REQ_STREAM_OPTS);
    assert_int_equal(r.model_len, 1);
    assert_span(b, &r, JSON_F_MODEL, "\"m\"");
    assert_span(b, &r, JSON_F_STREAM, "false");
    assert_span(b, &r, JSON_F_INCLUDE_USAGE, "false");
    assert_span(b, &r, JSON_F_MAX_TOKENS, "5");
    b = "{\"max_tokens\":12}";
    assert_int_equal(parse(b, &r), 0);
    assert_span(b, &r, JSON_F_MAX_TOKENS, "12");

    /* absent fields; fields of other types */
    b = "{\"x\":1}";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.flags, 0);
    for (int f = JSON_F_MODEL; f < JSON_F_COUNT; f++)
        assert_span(b, &r, (enum json_req_field)f, NULL);
    assert_int_equal(r.max_tokens[0], -1);
    b = "{\"model\":7,\"stream\":\"true\",\"prompt_cache_key\":42,\"stream_options\":[true],"
        "\"max_tokens\":1.5,\"max_completion_tokens\":-3,\"max_output_tokens\":\"9\"}";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.flags, JSON_REQ_BAD_STREAM);
    assert_span(b, &r, JSON_F_MODEL, "7");
    assert_span(b, &r, JSON_F_STREAM_OPTIONS, "[true]");
    assert_int_equal(r.max_tokens[0], 2);
    assert_int_equal(r.max_tokens[1], JSON_NUM_BAD);
    assert_int_equal(r.max_tokens[2], 9);
    /* include_usage counts only inside a top-level stream_options object */
    b = "{\"include_usage\":true,\"a\":{\"stream_options\":{\"include_usage\":true}}}";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.flags, 0);
    /* no hash key asked for */
    b = "{\"prompt_cache_key\":\"k\"}";
    assert_int_equal(json_req_parse(&jp, &r, NULL, b, strlen(b)), 0);
    assert_int_equal(r.flags, 0);
    /* the hash key may be any field, model included */
    b = "{\"model\":\"m\"}";
    assert_int_equal(json_req_parse(&jp, &r, "model", b, strlen(b)), 0);
    assert_int_equal(r.flags, JSON_REQ_MODEL | JSON_REQ_KEY);
    assert_true(r.key_hash == balancer_hash("m", 1));
}

/* Strings reach the fields unescaped, keys too: "mod\u0065l" is the model field, as it is to
 * every upstream's parser. */
static void test_escapes(void **state)
{
    struct json_req r;

    const char *b = "{\"model\":\"a\\\"b\\\\c\\/d\\u00e9\\n\",\"stream\":true}";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.model_len, 10);
    assert_memory_equal(r.model, "a\"b\\c/d\xc3\xa9\n", 10);
    assert_span(b, &r, JSON_F_MODEL, "\"a\\\"b\\\\c\\/d\\u00e9\\n\"");
    assert_true(r.flags & JSON_REQ_STREAM);

    b = "{\"mod\\u0065l\":\"x\",\"str\\u0065am\":true,\"prompt_cache_\\u006bey\":\"c\\u006fnv\"}";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.flags, JSON_REQ_MODEL | JSON_REQ_STREAM | JSON_REQ_KEY);
    assert_int_equal(r.model_len, 1);
    assert_true(r.key_hash == balancer_hash("conv", 4));
    assert_span(b, &r, JSON_F_MODEL, "\"x\"");

    /* a surrogate pair is one character */
    b = "{\"model\":\"\\ud83d\\ude00\"}";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.model_len, 4);
    assert_memory_equal(r.model, "\xf0\x9f\x98\x80", 4);

    /* a model longer than what is kept: its length and first bytes */
    char big[JSON_MODEL_MAX + 64];
    int n = snprintf(big, sizeof(big), "{\"model\":\"");
    memset(big + n, 'm', JSON_MODEL_MAX + 20);
    n += JSON_MODEL_MAX + 20;
    n += snprintf(big + n, sizeof(big) - (size_t)n, "\"}");
    assert_int_equal(json_req_parse(&jp, &r, NULL, big, (size_t)n), 0);
    assert_int_equal(r.model_len, JSON_MODEL_MAX + 20);
    assert_int_equal(r.model[JSON_MODEL_MAX - 1], 'm');
}

/* Only top-level fields count, whatever is nested and however large. */
static void test_nested_ignored(void **state)
{
    struct json_req r;

    const char *b = "{\"a\":[1,2,3,{\"model\":\"no\",\"stream\":true,\"prompt_cache_key\":\"no\","
                    "\"max_tokens\":9,\"b\":[[],{}]},\"x\\\"y\"],\"model\":\"m\",\"c\":{\"model\":"
                    "{\"model\":\"deeper\"},\"stream_options\":{\"include_usage\":true}}}";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.flags, JSON_REQ_MODEL);
    assert_int_equal(r.model_len, 1);
    assert_memory_equal(r.model, "m", 1);
    assert_int_equal(r.max_tokens[0], -1);
    assert_span(b, &r, JSON_F_MODEL, "\"m\"");
    assert_span(b, &r, JSON_F_STREAM, NULL);
    assert_span(b, &r, JSON_F_INCLUDE_USAGE, NULL);
}

/* A field given twice counts with its last value (as the upstreams' parsers take it), and says
 * it came twice. */
/* "stream" and include_usage take a boolean or null; any other type is flagged (a 400), and
 * the last value of the field decides. */
static void test_stream_types(void **state)
{
    (void)state;
    struct json_req r;
    static const struct {
        const char *body;
        uint32_t flags;
    } cases[] = {
        {"{\"stream\":true}", JSON_REQ_STREAM},
        {"{\"stream\":false}", 0},
        {"{\"stream\":null}", 0},
        {"{\"stream\":1}", JSON_REQ_BAD_STREAM},
        {"{\"stream\":\"true\"}", JSON_REQ_BAD_STREAM},
        {"{\"stream\":{}}", JSON_REQ_BAD_STREAM},
        {"{\"stream\":\"x\",\"stream\":true}", JSON_REQ_STREAM},
        {"{\"stream\":true,\"stream\":0}", JSON_REQ_BAD_STREAM},
        {"{\"a\":{\"stream\":1}}", 0},
        {"{\"stream_options\":{\"include_usage\":true}}",
         JSON_REQ_STREAM_OPTS | JSON_REQ_INCLUDE_USAGE},
        {"{\"stream_options\":{\"include_usage\":\"yes\"}}",
         JSON_REQ_STREAM_OPTS | JSON_REQ_BAD_USAGE},
        {"{\"stream_options\":{\"include_usage\":null}}", JSON_REQ_STREAM_OPTS},
        {"{\"stream_options\":{\"include_usage\":[1]},\"stream_options\":{}}",
         JSON_REQ_STREAM_OPTS},
        {"{\"stream_options\":{\"x\":{\"include_usage\":1}}}", JSON_REQ_STREAM_OPTS},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        assert_int_equal(parse(cases[i].body, &r), 0);
        if (r.flags != cases[i].flags)
            fail_msg("%s: flags 0x%x, expected 0x%x", cases[i].body, r.flags, cases[i].flags);
    }
}

static void test_duplicate_keys(void **state)
{
    struct json_req r;

    const char *b = "{\"model\":\"a\",\"stream\":true,\"model\":\"bb\",\"stream\":false,"
                    "\"prompt_cache_key\":\"k1\",\"prompt_cache_key\":\"k2\"}";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.flags, JSON_REQ_MODEL | JSON_REQ_KEY);
    assert_int_equal(r.model_len, 2);
    assert_memory_equal(r.model, "bb", 2);
    assert_true(r.key_hash == balancer_hash("k2", 2));
    assert_span(b, &r, JSON_F_MODEL, "\"bb\"");
    assert_span(b, &r, JSON_F_STREAM, "false");
    assert_int_equal(r.dup, (1 << JSON_F_MODEL) | (1 << JSON_F_STREAM));

    /* a later value of another type takes the field away */
    b = "{\"model\":\"a\",\"prompt_cache_key\":\"k\",\"stream\":true,\"model\":null,"
        "\"prompt_cache_key\":{\"x\":\"y\"},\"stream\":[true]}";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.flags, JSON_REQ_BAD_STREAM);
    assert_span(b, &r, JSON_F_MODEL, "null");
    assert_span(b, &r, JSON_F_STREAM, "[true]");

    /* a second stream_options replaces the first, include_usage with it */
    b = "{\"stream_options\":{\"include_usage\":true},\"stream_options\":{}}";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.flags, JSON_REQ_STREAM_OPTS);
    assert_span(b, &r, JSON_F_STREAM_OPTIONS, "{}");
    assert_span(b, &r, JSON_F_INCLUDE_USAGE, NULL);
    b = "{\"stream_options\":{\"include_usage\":true,\"include_usage\":false}}";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.flags, JSON_REQ_STREAM_OPTS);
    assert_int_equal(r.dup, 1 << JSON_F_INCLUDE_USAGE);
}

/* Numbers of any size are valid JSON; the max_*tokens fields saturate. */
static void test_huge_numbers(void **state)
{
    struct json_req r;

    const char *b = "{\"a\":123456789012345678901234567890,\"b\":-1e999999,\"c\":1.5E+400,"
                    "\"max_tokens\":99999999999999999999999999,\"max_output_tokens\":"
                    "9223372036854775807,\"max_completion_tokens\":9223372036854775808}";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.max_tokens[0], INT64_MAX);
    assert_int_equal(r.max_tokens[1], INT64_MAX);
    assert_int_equal(r.max_tokens[2], INT64_MAX);
    /* any number, as lenient upstreams coerce it: rounded up; a negative one is bad */
    b = "{\"max_tokens\":1e3,\"max_output_tokens\":-0,\"max_completion_tokens\":0.0}";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.max_tokens[0], 1000);
    assert_int_equal(r.max_tokens[1], 0);
    assert_int_equal(r.max_tokens[2], 0);
    b = "{\"max_tokens\":100000.0,\"max_completion_tokens\":-3,\"max_output_tokens\":1.25E2,"
        "\"n\":\"4\",\"best_of\":2.5}";
    assert_int_equal(parse(b, &r), 0);
    assert_int_equal(r.max_tokens[0], 100000);
    assert_int_equal(r.max_tokens[1], JSON_NUM_BAD);
    assert_int_equal(r.max_tokens[2], 125);
    assert_int_equal(r.max_tokens[3], 4);
    assert_int_equal(r.max_tokens[4], 3);
    assert_int_equal(json_count("1.0000000000000000000000000000000001", 36), 2);
    assert_int_equal(json_count("1e400", 5), INT64_MAX);
    assert_int_equal(json_count("5e-1", 4), 1);
    assert_int_equal(json_count("0e5", 3), 0);
    assert_int_equal(json_count("abc", 3), JSON_NUM_BAD);
    assert_int_equal(json_count("", 0), JSON_NUM_BAD);
    assert_int_equal(json_count("1e", 2), JSON_NUM_BAD);
}

/* Nesting: up to JSON_MAX_DEPTH containers, the top object included. */
static void test_deep_nesting(void **state)
{
    struct json_req r;
    static char deep[2 * JSON_MAX_DEPTH + 64];
    size_t n;

    for (int extra = 0; extra < 2; extra++) {
        memcpy(deep, "{\"a\":", 5);
        n = 5;
        for (int i = 0; i < JSON_MAX_DEPTH - 1 + extra; i++)
            deep[n++] = '[';
        for (int i = 0; i < JSON_MAX_DEPTH - 1 + extra; i++)
            deep[n++] = ']';
        deep[n++] = '}';
        assert_int_equal(json_req_parse(&jp, &r, NULL, deep, n), extra ? -EINVAL : 0);
    }
    /* objects count as arrays do */
    char *obj = malloc(6 * (JSON_MAX_DEPTH + 1) + 1);
    assert_non_null(obj);
    for (int extra = 0; extra < 2; extra++) {
        n = 0;
        for (int i = 0; i < JSON_MAX_DEPTH + extra; i++)
            memcpy(obj + n, "{\"a\":", 5), n += 5;
        obj[n++] = '1';
        for (int i = 0; i < JSON_MAX_DEPTH + extra; i++)
            obj[n++] = '}';
        assert_int_equal(json_req_parse(&jp, &r, NULL, obj, n), extra ? -EINVAL : 0);
    }
    free(obj);
    /* the refusal comes as the bytes arrive, not only at the end */
    assert_int_equal(json_req_begin(&jp, &r, NULL), 0);
    memset(deep, '[', sizeof(deep));
    deep[0] = '{';
    memcpy(deep + 1, "\"a\":", 4);
    assert_int_equal(json_req_feed(&jp, deep, sizeof(deep)), -EINVAL);
    assert_int_equal(json_req_end(&jp), -EINVAL);
}

/* Anything but one JSON object is refused, as strictly as JSON is defined. */
static void test_invalid(void **state)
{
    struct json_req r;
    static const char *const good[] = {
        "{}",
        " { } ",
        "{\"a\":-0.5e+3,\"b\":[true,false,null,0,1.25,-7E2],\"c\":{\"d\":{}}}",
        "{\"s\":\"\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\",\"t\":\"caf\xc3\xa9\"}",
        "{\"a\":[[[[[]]]]],\"b\":\"\"}",
    };
    static const char *const bad[] = {
        "{\"a\":1,}",
        "{\"a\" 1}",
        "{\"a\":01}",
        "{\"a\":1.}",
        "{\"a\":.5}",
        "{\"a\":-}",
        "{\"a\":1e}",
        "{\"a\":tru}",
        "{\"a\":[1,]}",
        "{\"a\":[1 2]}",
        "{\"a\":[}",
        "{\"a\":{]}",
        "{\"a\":\"x}",
        "{\"a\":\"\\x\"}",
        "{\"a\":\"\\u12g4\"}",
        "{a:1}",
        "{\"a\":\"\x01\"}",
        "{\"a\":1}}",
        "{\"a\":[1]]}",
        "{,}",
        "{\"a\":{\"b\":1,}}",
        "{\"a\":{\"b\"}}",
        "{\"a\":+1}",
        "{\"a\":1 2}",
        "[1,2]",
        "\"s\"",
        "{\"a\":",
        "{} x",
        "",
        "not json",
        "1",
        "null",
        "{}{}",
        "{} {}",
        "{\"a\":1}//",
        "{/*c*/}",
        "{\"a\":'x'}",
        "{\"a\":NaN}",
        "{\"a\":\"\xff\"}",
        "{\"a\":\"\xc3\"}",
        "   ",
        "{\"model\":\"m\"",
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        if (parse(good[i], &r) != 0)
            fail_msg("refused %s", good[i]);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (parse(bad[i], &r) != -EINVAL)
            fail_msg("accepted %s", bad[i]);
    /* a NUL byte is not white space */
    assert_int_equal(json_req_parse(&jp, &r, NULL, "{}\0", 3), -EINVAL);
    assert_int_equal(json_req_parse(&jp, &r, NULL, "{\"a\":\"\0\"}", 8), -EINVAL);
    /* a feed after a refusal stays refused; a parse after it starts afresh */
    assert_int_equal(json_req_begin(&jp, &r, NULL), 0);
    assert_int_equal(json_req_feed(&jp, "{]", 2), -EINVAL);
    assert_int_equal(json_req_feed(&jp, "}", 1), -EINVAL);
    assert_int_equal(json_req_end(&jp), -EINVAL);
    assert_int_equal(parse("{\"model\":\"m\"}", &r), 0);
    assert_int_equal(r.model_len, 1);
    /* what follows an object, in its piece or a later one, leaves nothing behind for the next
     * body (the handle reads one body after another) */
    static const char *const tails[] = {"1", "\"x", "{\"model\":\"bad\"}", "[", "tru", "-", "}"};
    for (size_t i = 0; i < sizeof(tails) / sizeof(tails[0]); i++) {
        for (int later = 0; later < 2; later++) {
            char one[64];
            int n = snprintf(one, sizeof(one), "{\"model\":\"a\"} %s", tails[i]);
            assert_int_equal(json_req_begin(&jp, &r, NULL), 0);
            if (later) {
                json_req_feed(&jp, one, 14);
                json_req_feed(&jp, one + 14, (size_t)n - 14);
            } else {
                json_req_feed(&jp, one, (size_t)n);
            }
            assert_int_equal(json_req_end(&jp), -EINVAL);
            if (later) /* and a parse left unfinished */
                assert_int_equal(json_req_begin(&jp, &r, NULL) == 0 &&
                                     json_req_feed(&jp, "{\"a\":\"x", 7) == 0,
                                 1);
            assert_int_equal(parse("{\"model\":\"m\"}", &r), 0);
            assert_int_equal(r.flags, JSON_REQ_MODEL);
            assert_int_equal(r.model_len, 1);
            assert_int_equal(r.model[0], 'm');
            assert_int_equal(parse(" {} ", &r), 0);
            assert_int_equal(parse("", &r), -EINVAL);
            assert_int_equal(parse(" \n", &r), -EINVAL);
        }
    }
}

/* Bodies fed in two pieces cut at every byte, and byte by byte, read as they do whole: the
 * same answer, fields and offsets. */
static void test_split_everywhere(void **state)
{
    static const char *const bodies[] = {
        "{\"messages\":[{\"role\":\"user\",\"content\":\"h\\u00e9 \\\"x\\\"\\n\"}],\"model\": "
        "\"gpt-\\u0034o\" ,\"stream\":true,\"stream_options\" :\n{\"include_usage\":true},"
        "\"prompt_cache_key\":\"c\\\\k\",\"max_tokens\":  1234, \"max_output_tokens\":77}",
        "  {\"max_completion_tokens\":99999999999999999999999,\"model\":\"m\",\"stream\":false,"
        "\"model\":\"mm\",\"n\":-1.5e-7,\"t\":[true,false,null,{}]}  ",
        "{\"max_tokens\":42}",
        "{\"model\" \t:\t\"\xc3\xa9\\ud83d\\ude00\"}",
        "{\"a\":[1,2,}",
        "{\"model\":\"m\"} x",
        "{\"a\":\"\xe2\x82\"}",
    };
    struct json_req whole, piece;

    for (size_t k = 0; k < sizeof(bodies) / sizeof(bodies[0]); k++) {
        const char *b = bodies[k];
        size_t n = strlen(b);
        int want = parse(b, &whole);
        for (size_t cut = 0; cut <= n; cut++) {
            int got = json_req_begin(&jp, &piece, "prompt_cache_key");
            assert_int_equal(got, 0);
            got = json_req_feed(&jp, b, cut);
            if (got == 0)
                got = json_req_feed(&jp, b + cut, n - cut);
            if (got == 0)
                got = json_req_end(&jp);
            else
                json_req_end(&jp);
            if (got != want)
                fail_msg("body %zu cut at %zu: %d, whole %d", k, cut, got, want);
            if (want == 0)
                assert_req_equal(&whole, &piece);
        }
        int got = json_req_begin(&jp, &piece, "prompt_cache_key");
        for (size_t i = 0; i < n && got == 0; i++)
            got = json_req_feed(&jp, b + i, 1);
        if (got == 0)
            got = json_req_end(&jp);
        else
            json_req_end(&jp);
        assert_int_equal(got, want);
        if (want == 0)
            assert_req_equal(&whole, &piece);
    }
}

/* yajl's memory comes from the parser's region: after the first parse of a shape, a parse does
 * no malloc, and nested strings (never decoded) need no more of it however long they are. */
static void test_memory(void **state)
{
    struct json_parser p;
    struct json_req r;
    memset(&p, 0, sizeof(p));

    const char *b =
        "{\"model\":\"gpt-\\u0034o\",\"prompt_cache_key\":\"k\",\"messages\":[{\"role\":"
        "\"user\",\"content\":\"a\\nb\"}],\"stream\":true}";
    assert_int_equal(json_req_parse(&p, &r, "prompt_cache_key", b, strlen(b)), 0);
    uint64_t heap = p.m.heap_allocs;
    size_t cap = p.m.cap;
    assert_true(cap > 0 && cap <= 8192);
    for (int i = 0; i < 10; i++) {
        assert_int_equal(json_req_parse(&p, &r, "prompt_cache_key", b, strlen(b)), 0);
        assert_int_equal(json_req_parse(&p, &r, "prompt_cache_key", "{]", 2), -EINVAL);
    }
    assert_int_equal(p.m.heap_allocs, heap);
    assert_int_equal(p.m.cap, cap);
    /* a body that is one object leaves the handle ready for the next */
    assert_int_equal(json_req_parse(&p, &r, "prompt_cache_key", b, strlen(b)), 0);
    yajl_handle h = p.h;
    assert_non_null(h);
    assert_int_equal(json_req_parse(&p, &r, "prompt_cache_key", b, strlen(b)), 0);
    assert_ptr_equal(p.h, h);

    /* 4 MB of escaped text in a nested string and in a top-level one nobody reads, in pieces */
    size_t big = 4u << 20;
    char *huge = malloc(big + 64);
    assert_non_null(huge);
    size_t n = (size_t)sprintf(huge, "{\"messages\":[{\"content\":\"");
    while (n < big / 2)
        memcpy(huge + n, "x\\n", 3), n += 3;
    n += (size_t)sprintf(huge + n, "\"}],\"prompt\":\"");
    while (n < big)
        memcpy(huge + n, "y\\\"", 3), n += 3;
    n += (size_t)sprintf(huge + n, "\",\"model\":\"m\"}");
    assert_int_equal(json_req_parse(&p, &r, "prompt_cache_key", huge, n), 0);
    assert_int_equal(r.model_len, 1);
    assert_int_equal(p.m.heap_allocs, heap);
    assert_int_equal(p.m.cap, cap);

    /* the 8 MB body of 4 M tokens */
    static const char start[] = "{\"model\":\"x\",\"prompt_cache_key\":\"v\",\"a\":[";
    memcpy(huge, start, sizeof(start) - 1);
    size_t k = sizeof(start) - 1;
    while (k + 4 < big) {
        huge[k++] = '0';
        huge[k++] = ',';
    }
    huge[k++] = '0';
    huge[k++] = ']';
    huge[k++] = '}';
    assert_int_equal(json_req_parse(&p, &r, "prompt_cache_key", huge, k), 0);
    assert_int_equal(r.flags, JSON_REQ_MODEL | JSON_REQ_KEY);
    assert_int_equal(p.m.heap_allocs, heap);
    free(huge);

    /* an escaped model larger than the region: served from the heap, region not grown past
     * its bound, and the parse after it is back in the region */
    char *m = malloc(200000);
    assert_non_null(m);
    n = (size_t)sprintf(m, "{\"model\":\"");
    while (n < 190000)
        memcpy(m + n, "\\n", 2), n += 2;
    n += (size_t)sprintf(m + n, "\"}");
    assert_int_equal(json_req_parse(&p, &r, NULL, m, n), 0);
    assert_int_equal(r.model_len, (190000 - 10) / 2);
    assert_true(p.m.heap_allocs > heap);
    assert_true(p.m.cap <= 64 * 1024);
    heap = p.m.heap_allocs;
    assert_int_equal(json_req_parse(&p, &r, "prompt_cache_key", b, strlen(b)), 0);
    assert_int_equal(p.m.heap_allocs, heap);
    free(m);
    json_parser_free(&p);
    json_parser_free(&p); /* twice is harmless */
}

/* The body read whole (a scan without yajl where it can) and through yajl alone (the same
 * body fed to json_req_begin/feed/end): the same answer and the same fields, for plain bodies
 * and for every one-byte change of them (replaced, removed, doubled), valid or not. */
static void diff_one(const char *b, size_t n, uint64_t *fast)
{
    struct json_req whole, yajl;
    uint64_t before = jp.fast;
    int want, got = json_req_parse(&jp, &whole, "prompt_cache_key", b, n);

    *fast += jp.fast - before;
    assert_int_equal(json_req_begin(&jp, &yajl, "prompt_cache_key"), 0);
    json_req_feed(&jp, b, n);
    want = json_req_end(&jp);
    if (got != want)
        fail_msg("'%.*s': %d read whole, %d through yajl", (int)n, b, got, want);
    if (jp.fast != before && got != 0)
        fail_msg("'%.*s': the scan took a body yajl refuses", (int)n, b);
    assert_req_equal(&whole, &yajl);
}

static void test_scan_as_yajl(void **state)
{
    static const char *const bodies[] = {
        "{\"model\":\"demo\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
        " {\"model\" : \"gpt-4o\" ,\"stream\":true,\"stream_options\":{\"include_usage\":false,"
        "\"x\":[1,{\"include_usage\":true}]},\"max_tokens\":12.5,\"n\":\"3\",\"best_of\":-1}\n",
        "{\"prompt_cache_key\":\"k1\",\"model\":\"m\",\"model\":\"caf\xc3\xa9\",\"prompt\":"
        "\"a\\nb\\u00e9\",\"max_output_tokens\":1e3,\"stream_options\":[true],\"stream\":null}",
        "{\"max_completion_tokens\":0,\"stream_options\":{\"include_usage\":true},"
        "\"stream_options\":{},\"a\":[[],{},[[null]],\"\xe2\x82\xac\xf0\x9f\x98\x80\"],"
        "\"prompt_cache_key\":{\"x\":1},\"stream\":false}",
        "{\"stream_options\":{\"include_usage\":{\"a\":[]},\"include_usage\":true},\"n\":-0}",
        "{}",
    };
    static const char subst[] = "{}[]\",:\\ \t\n\x0b\x01-+.0159eEtfnu\xc3\x80\xff";
    uint64_t fast = 0;
    char m[512];

    for (size_t k = 0; k < sizeof(bodies) / sizeof(bodies[0]); k++) {
        const char *b = bodies[k];
        size_t n = strlen(b);
        uint64_t before = fast;
        diff_one(b, n, &fast);
        assert_true(fast == before + 1); /* a plain body is read without yajl */
        for (size_t i = 0; i <= n; i++) {
            diff_one(b, i, &fast); /* cut */
            if (i == n)
                break;
            memcpy(m, b, i);
            memcpy(m + i, b + i + 1, n - i - 1);
            diff_one(m, n - 1, &fast); /* removed */
            memcpy(m, b, i + 1);
            memcpy(m + i + 1, b + i, n - i);
            diff_one(m, n + 1, &fast); /* doubled */
            memcpy(m, b, n);
            for (size_t s = 0; s < sizeof(subst) - 1; s++) {
                m[i] = subst[s];
                diff_one(m, n, &fast); /* replaced */
            }
        }
    }
    /* deeper than the scan's stack: yajl reads it */
    char deep[300];
    size_t d = (size_t)sprintf(deep, "{\"model\":\"m\",\"a\":");
    for (int i = 0; i < 100; i++)
        deep[d++] = '[';
    for (int i = 0; i < 100; i++)
        deep[d++] = ']';
    deep[d++] = '}';
    uint64_t before = fast;
    diff_one(deep, d, &fast);
    assert_true(fast == before);
}

static int teardown(void **state)
{
    json_parser_free(&jp);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fields),         cmocka_unit_test(test_escapes),
        cmocka_unit_test(test_nested_ignored), cmocka_unit_test(test_duplicate_keys),
        cmocka_unit_test(test_huge_numbers),   cmocka_unit_test(test_deep_nesting),
        cmocka_unit_test(test_invalid),        cmocka_unit_test(test_split_everywhere),
        cmocka_unit_test(test_memory),         cmocka_unit_test(test_scan_as_yajl),
        cmocka_unit_test(test_stream_types),
    };
    return cmocka_run_group_tests(tests, NULL, teardown);
}
