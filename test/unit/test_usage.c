/* Unit tests for core/usage.c: usage read from JSON bodies and event streams cut anywhere, and
 * the filter that removes the usage-only chunk leaving every other byte as it was. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/usage.h"

static struct usage_pool pool = {NULL, 0, 4};

/* ---- JSON bodies ---- */

static const char chat_body[] =
    "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"choices\":[{\"index\":0,"
    "\"message\":{\"role\":\"assistant\",\"content\":\"Hi \\\"there\\\"\",\"usage\":"
    "{\"prompt_tokens\":999}}}],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10,"
    "\"total_tokens\":29,\"prompt_tokens_details\":{\"cached_tokens\":3,\"audio_tokens\":0},"
    "\"completion_tokens_details\":{\"reasoning_tokens\":4,\"audio_tokens\":0}},"
    "\"note\":\"\\\"usage\\\":{\\\"prompt_tokens\\\":5}\"}\n";

static const char embed_body[] =
    "{\"object\":\"list\",\"data\":[{\"object\":\"embedding\",\"index\":0,\"embedding\":"
    "[0.1,-0.2,3e-4]}],\"model\":\"text-embedding-3-small\",\"usage\":{\"prompt_tokens\":8,"
    "\"total_tokens\":8}}";

static const char resp_body[] =
    "{\"id\":\"resp_1\",\"object\":\"response\",\"output\":[{\"type\":\"message\",\"content\":"
    "[{\"type\":\"output_text\",\"text\":\"Hello\"}]}],\"usage\":{\"input_tokens\":36,"
    "\"input_tokens_details\":{\"cached_tokens\":7},\"output_tokens\":87,"
    "\"output_tokens_details\":{\"reasoning_tokens\":12},\"total_tokens\":123}}";

/* Reads body in pieces cut at a and b (a <= b <= len). */
static void read_json(const char *body, size_t a, size_t b, struct usage *u)
{
    size_t len = strlen(body);
    struct usage_rd *rd = usage_get(&pool);
    assert_non_null(rd);
    usage_begin(rd, USAGE_JSON, 0);
    usage_json_feed(rd, body, a);
    usage_json_feed(rd, body + a, b - a);
    usage_json_feed(rd, body + b, len - b);
    usage_end(rd, u);
    usage_put(&pool, rd);
}

static void check_json_cuts(const char *body, const struct usage *want)
{
    size_t len = strlen(body);
    for (size_t a = 0; a <= len; a++) {
        for (size_t b = a; b <= len; b += (len / 7) + 1) {
            struct usage u;
            read_json(body, a, b, &u);
            if (u.flags != want->flags || u.prompt != want->prompt ||
                u.completion != want->completion || u.cached != want->cached ||
                u.reasoning != want->reasoning || u.total != want->total || u.text_bytes)
                fail_msg("%s\ncut at %zu, %zu: flags %u prompt %llu completion %llu total %llu",
                         body, a, b, u.flags, (unsigned long long)u.prompt,
                         (unsigned long long)u.completion, (unsigned long long)u.total);
        }
    }
}

/* Body cut in three pieces everywhere gives want; so does the same body behind a first key
 * written with an escape, which has yajl read all of it past that key (one object, as before
 * the structural pass). */
static void check_json_everywhere(const char *body, const struct usage *want)
{
    check_json_cuts(body, want);
    if (body[0] == '{' && body[1] != '}') {
        char *b2 = malloc(strlen(body) + 16);
        sprintf(b2, "{\"\\u0078\":0,%s", body + 1);
        check_json_cuts(b2, want);
        free(b2);
    }
}

static void test_json_bodies(void **state)
{
    (void)state;
    struct usage chat = {.flags = USAGE_HAVE, 19, 10, 3, 4, 29, 0, 0};
    struct usage emb = {.flags = USAGE_HAVE, 8, 0, 0, 0, 8, 0, 0};
    struct usage resp = {.flags = USAGE_HAVE, 36, 87, 7, 12, 123, 0, 0};
    check_json_everywhere(chat_body, &chat);
    check_json_everywhere(embed_body, &emb);
    check_json_everywhere(resp_body, &resp);
}

static void test_json_no_usage(void **state)
{
    (void)state;
    static const char *bodies[] = {
        "{\"error\":{\"message\":\"no\",\"type\":\"invalid_request_error\"}}",
        "{\"usage\":null}",
        "{\"usage\":{\"prompt_tokens\":1}", /* cut */
        "[{\"usage\":{\"prompt_tokens\":1}}]",
        "{\"a\":{\"usage\":{\"prompt_tokens\":1}}}",
        "not json",
        "{\"usage\":{\"prompt_tokens\":1}} {\"x\":1}",
        /* the usage key as a value, or inside one, or in a string with escapes */
        "{\"a\":\"usage\",\"b\":[\"usage\",{\"usage\":{\"prompt_tokens\":1}}]}",
        "{\"a\":\"x\\\\\\\",\\\"usage\\\":{\\\"prompt_tokens\\\":1}}\"}",
        "{\"usage\":{\"prompt_tokens\":1},\"a\":\"cut",
        /* malformed around a usage object */
        "{\"usage\":{\"prompt_tokens\":1},}",
        "{,\"usage\":{\"prompt_tokens\":1}}",
        "{\"a\":1,,\"usage\":{\"prompt_tokens\":1}}",
        "{\"usage\":{\"prompt_tokens\":1}]",
        "{\"a\":[1},\"usage\":{\"prompt_tokens\":1}}",
        "{\"usage\":{\"prompt_tokens\":1}}}",
        "{\"usage\" 1,\"usage\":{\"prompt_tokens\":1}}",
        "{\"usage\":{\"prompt_tokens\":1,}}",
        "{\"usage\":{\"prompt_tokens\":1} 2}",
        "{\"usage\":}",
        "{\"usage\":{\"prompt_tokens\":01}}",
        "{\"usage\":{\"prompt_tokens\":1 \"a\":2}}",
        "{\"usage\":{\"prompt_tokens\":1,\"a\":nul}}",
        "{\"usage\":{\"prompt_tokens\":1,\"a\":\"\\x\"}}",
        "{\"usage\":{\"prompt_tokens\":1,\"a\":\"\x01\"}}",
        "{\"usage\":{\"prompt_tokens\":1,\"a\":{\"b\":[}}}",
        "{\"usage\":{\"prompt_tokens\":1}x}",
        "{\"us\\u0061ge\":{\"prompt_tokens\":1},}",
        "{\"us\\u0061ge\":{\"prompt_tokens\":1}",
        "{\"us\\qge\":1,\"usage\":{\"prompt_tokens\":1}}",
        " ",
        "",
    };
    for (size_t i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++) {
        size_t len = strlen(bodies[i]);
        for (size_t a = 0; a <= len; a++) {
            struct usage u;
            read_json(bodies[i], a, a + (len - a) / 2, &u);
            if (u.flags || u.prompt)
                fail_msg("%s: usage read (cut at %zu)", bodies[i], a);
        }
    }
    /* a reader keeps working after a bad body */
    struct usage u;
    read_json(embed_body, 3, 9, &u);
    assert_int_equal(u.flags, USAGE_HAVE);
    assert_int_equal(u.total, 8);
}

/* What the structural pass must get right: top-level keys written with escapes (read by yajl
 * from there on), strings ending in backslashes, nesting deeper than it tracks, a usage key
 * that comes twice (the last object counts, a later null does not clear it). */
static void test_json_edges(void **state)
{
    (void)state;
    struct usage one = {.flags = USAGE_HAVE, 1, 0, 0, 0, 0, 0, 0};
    struct usage two = {.flags = USAGE_HAVE, 2, 3, 0, 0, 5, 0, 0};
    struct usage seven = {.flags = USAGE_HAVE, 7, 0, 0, 0, 0, 0, 0};
    static const char *ones[] = {
        "{\"us\\u0061ge\":{\"prompt_tokens\":1}}",
        "{\"\\u0075sage\":{\"prompt_tokens\":1}}",
        "{\"usag\\u0065\" : {\"prompt_tokens\" :1 } }\n",
        "{\"\\u0069d\":\"x\",\"usage\":{\"prompt_tokens\":1}}",
        "{\"ab\\\"c\":\"\\\"usage\\\"\",\"usage\":{\"prompt_tokens\":1}}",
        "{\"a\":\"\\\\\",\"usage\":{\"prompt_tokens\":1}}",
        "{\"a\":\"\\\\\\\\\\\"\\\\\",\"usage\":{\"prompt_tokens\":1}}",
        "{\"usage\":{\"prompt_tokens\":9},\"usage\":{\"prompt_tokens\":1}}",
        "{\"usage\":{\"prompt_tokens\":1},\"usage\":null}",
        "{\"usage\":{\"prompt_tokens\":1},\"usage\":[{\"prompt_tokens\":5}]}",
        "{\"usage\":{\"prompt_tokens\":1,\"x\":{\"usage\":{\"prompt_tokens\":4}}}}",
        "{\"us\\u0061ge\":{\"prompt_tokens\":9},\"usage\":{\"prompt_tokens\":1}}",
        " {\"usage\":{\"prompt_tokens\":1,\"total_tokens\":\"x\"}} \r\n",
        "{\"usage\":{\"prompt_tokens\":1,\"total_tokens\":1.5}}",
        "{\"usage\":{\"prompt_tokens\":1,\"total_tokens\":-7}}",
        "{\"usage\":{\"prompt_tokens\":1,\"total_tokens\":0,\"s\":\"\\u00e9 \xc3\xa9\"}}",
        "{\"usage\":{\"prompt_tokens\":1,\"a\":true,\"b\":false,\"c\":null,\"d\":\"\"}}",
        "{\"usage\":{\"x\":{\"prompt_tokens\":5},\"prompt_tokens\":1,\"cached_tokens\":6}}",
        "{\"usage\":{\"prompt_tokens\":1,\"x\":{\"a\":{\"b\":{\"c\":{\"d\":{}}}}}}}",
        "{\"usage\":{\"prompt_tokens\":1,\"x\":[1,{\"prompt_tokens\":3}]}}",
        "{\"usage\":{\"prompt_tokens\":5,\"prompt_tokens\":1}}",
        "{\"usage\":{\"prompt_tokens_details\":null,\"prompt_tokens\":1}}",
        "{\"usage\":{\"prompt_tokens_details\":{\"reasoning_tokens\":3},\"prompt_tokens\":1}}",
        "{\"usage\":{\"prompt\\u005ftokens\":1}}",
        "{\"usage\":true,\"usage\":{\"prompt_tokens\":1},\"usage\":\"x\",\"usage\":5}",
    };
    for (size_t i = 0; i < sizeof(ones) / sizeof(ones[0]); i++)
        check_json_everywhere(ones[i], &one);
    check_json_everywhere("{\"usage\":{\"prompt_tokens\":1},\"n\":[1,{\"a\":\"b\"}],"
                          "\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3,"
                          "\"total_tokens\":5}}",
                          &two);
    check_json_everywhere("{\"usage\":{\"prompt_tokens\":1},\"us\\u0061ge\":{\"prompt_tokens\":7}}",
                          &seven);

    /* a usage value longer than what is kept for the direct read */
    char *pad = malloc(USAGE_HOLD * 2 + 100);
    sprintf(pad, "{\"usage\":{\"pad\":\"%0*d\",\"prompt_tokens\":7}}", USAGE_HOLD, 0);
    check_json_cuts(pad, &seven);
    free(pad);

    /* nesting far deeper than the 64 levels whose kind is checked */
    char *b = malloc(1024), *q = b;
    q += sprintf(q, "{\"deep\":");
    for (int i = 0; i < 200; i++)
        *q++ = i % 3 ? '[' : '{', q += i % 3 ? 0 : sprintf(q, "\"k\":");
    for (int i = 199; i >= 0; i--)
        *q++ = i % 3 ? ']' : '}';
    sprintf(q, ",\"usage\":{\"prompt_tokens\":7}}");
    check_json_cuts(b, &seven);
    free(b);

    /* once warm, a body allocates nothing */
    struct usage u;
    read_json(chat_body, 10, 300, &u);
    struct usage_rd *rd = usage_get(&pool);
    uint64_t heap = rd->m.heap_allocs;
    usage_put(&pool, rd);
    for (int i = 0; i < 20; i++)
        read_json(i % 2 ? chat_body : ones[0], (size_t)i, 40, &u);
    rd = usage_get(&pool);
    assert_int_equal(rd->m.heap_allocs, heap);
    usage_put(&pool, rd);
}

/* Counts are bounded: each at USAGE_MAX_TOKENS, cached within prompt, reasoning within
 * completion. */
static void test_json_bounds(void **state)
{
    (void)state;
    struct usage cap = {.flags = USAGE_HAVE,
                        USAGE_MAX_TOKENS,
                        USAGE_MAX_TOKENS,
                        USAGE_MAX_TOKENS,
                        9,
                        USAGE_MAX_TOKENS,
                        0,
                        0};
    struct usage clamp = {.flags = USAGE_HAVE, 5, 3, 5, 3, 8, 0, 0};
    struct usage edge = {
        .flags = USAGE_HAVE, USAGE_MAX_TOKENS, USAGE_MAX_TOKENS - 1, 0, 0, 0, 0, 0};

    check_json_everywhere("{\"usage\":{\"prompt_tokens\":99999999999999999999999,"
                          "\"completion_tokens\":18446744073709551615,"
                          "\"total_tokens\":18446744073709551616,"
                          "\"prompt_tokens_details\":{\"cached_tokens\":18446744073709551615},"
                          "\"completion_tokens_details\":{\"reasoning_tokens\":9}}}",
                          &cap);
    check_json_everywhere("{\"usage\":{\"input_tokens\":5,\"output_tokens\":3,\"total_tokens\":8,"
                          "\"input_tokens_details\":{\"cached_tokens\":18446744073709551615},"
                          "\"output_tokens_details\":{\"reasoning_tokens\":50}}}",
                          &clamp);
    check_json_everywhere("{\"usage\":{\"prompt_tokens\":1000000001,"
                          "\"completion_tokens\":999999999}}",
                          &edge);
}

/* A usage object whose prompt or completion count is not a non-negative integer, or that has no
 * prompt count, is no usage: the request is billed from the estimate, never as free. */
static void test_json_bad_counts(void **state)
{
    (void)state;
    static const char *bodies[] = {
        "{\"usage\":{\"prompt_tokens\":-5,\"completion_tokens\":3}}",
        "{\"usage\":{\"prompt_tokens\":-0,\"completion_tokens\":3}}",
        "{\"usage\":{\"prompt_tokens\":1.5,\"completion_tokens\":3}}",
        "{\"usage\":{\"prompt_tokens\":1e3,\"completion_tokens\":3}}",
        "{\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":-1}}",
        "{\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2.0}}",
        "{\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":-18446744073709551615}}",
        "{\"usage\":{\"prompt_tokens\":\"7\",\"completion_tokens\":3}}",
        "{\"usage\":{\"prompt_tokens\":null,\"completion_tokens\":3}}",
        "{\"usage\":{\"prompt_tokens\":{},\"completion_tokens\":3}}",
        "{\"usage\":{\"prompt_tokens\":[1],\"completion_tokens\":3}}",
        "{\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":true}}",
        "{\"usage\":{\"prompt_tokens\":4,\"prompt_tokens\":-4}}",
        "{\"usage\":{\"input_tokens\":-3,\"output_tokens\":3}}",
        "{\"usage\":{\"input_tokens\":3,\"output_tokens\":\"3\"}}",
        "{\"usage\":{}}",
        "{\"usage\":{\"completion_tokens\":5,\"total_tokens\":5}}",
        /* a later bad usage object replaces a sound one */
        "{\"usage\":{\"prompt_tokens\":4},\"usage\":{\"prompt_tokens\":-4}}",
    };
    for (size_t i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++) {
        size_t len = strlen(bodies[i]);
        for (size_t a = 0; a <= len; a++) {
            struct usage u;
            read_json(bodies[i], a, a + (len - a) / 2, &u);
            if (u.flags || u.prompt || u.completion)
                fail_msg("%s: usage read (cut at %zu): flags %u prompt %llu", bodies[i], a, u.flags,
                         (unsigned long long)u.prompt);
        }
    }
    /* other counts that are not integers are 0, the usage still stands */
    struct usage ok = {.flags = USAGE_HAVE, 4, 3, 0, 0, 0, 0, 0};
    check_json_everywhere("{\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":3,"
                          "\"total_tokens\":-7,\"prompt_tokens_details\":{\"cached_tokens\":1.5}}}",
                          &ok);
}

/* ---- event streams ---- */

#define CHUNK(delta)                                                                               \
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,"         \
    "\"delta\":" delta ",\"finish_reason\":null}]}\n\n"
#define USAGE_CHUNK                                                                                \
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":"          \
    "{\"prompt_tokens\":21,\"completion_tokens\":5,\"total_tokens\":26,"                           \
    "\"prompt_tokens_details\":{\"cached_tokens\":2},"                                             \
    "\"completion_tokens_details\":{\"reasoning_tokens\":1}}}\n\n"

/* content bytes: "Hel" 3 + "lo \u00e9\n" 6 ("lo ", é (2 bytes), \n) = 9 */
static const char chat_stream[] = CHUNK("{\"role\":\"assistant\",\"content\":\"\"}")
    CHUNK("{\"content\":\"Hel\"}") ": keep-alive\n\n" CHUNK("{\"content\":\"lo \\u00e9\\n\"}")
        CHUNK("{}") USAGE_CHUNK "data: [DONE]\n\n";

static const char chat_stream_no_usage[] = CHUNK("{\"role\":\"assistant\",\"content\":\"\"}")
    CHUNK("{\"content\":\"Hel\"}") ": keep-alive\n\n" CHUNK("{\"content\":\"lo \\u00e9\\n\"}")
        CHUNK("{}") "data: [DONE]\n\n";

/* Feeds stream s (len bytes) cut at the given positions (ascending) and returns what the client
 * gets in out (malloc'd, *out_len). */
static void run_stream(const char *s, size_t len, const size_t *cuts, size_t n_cuts, int filter,
                       int finish, struct usage *u, char **out, size_t *out_len)
{
    struct usage_rd *rd = usage_get(&pool);
    char *copy = malloc(len + 1), *o = malloc(len + 1);
    char pre[USAGE_HOLD];
    size_t ol = 0, at = 0;

    assert_non_null(rd);
    memcpy(copy, s, len);
    usage_begin(rd, USAGE_SSE, filter);
    for (size_t k = 0; k <= n_cuts; k++) {
        size_t end = k < n_cuts ? cuts[k] : len, pl;
        int last = finish && k == n_cuts;
        size_t m = usage_sse_feed(rd, copy + at, end - at, last, pre, &pl);
        assert_true(pl <= USAGE_HOLD);
        assert_true(m <= end - at);
        if (!filter) {
            assert_int_equal(pl, 0);
            assert_int_equal(m, end - at);
        }
        memcpy(o + ol, pre, pl);
        ol += pl;
        memcpy(o + ol, copy + at, m);
        ol += m;
        at = end;
    }
    usage_end(rd, u);
    usage_put(&pool, rd);
    free(copy);
    *out = o;
    *out_len = ol;
}

static void check_chat_usage(const struct usage *u)
{
    assert_int_equal(u->flags, USAGE_HAVE);
    assert_int_equal(u->prompt, 21);
    assert_int_equal(u->completion, 5);
    assert_int_equal(u->cached, 2);
    assert_int_equal(u->reasoning, 1);
    assert_int_equal(u->total, 26);
    assert_int_equal(u->text_bytes, 9);
    assert_int_equal(u->text_tokens, 3);
}

/* Stream s cut in two and in three pieces at every position: usage read, and the client gets
 * want (filter on) or s itself (filter off). */
static void check_stream_everywhere(const char *s, const char *want, int filter,
                                    void (*check)(const struct usage *))
{
    size_t len = strlen(s), wl = strlen(want);
    for (size_t a = 0; a <= len; a++) {
        for (size_t b = a; b <= len; b += filter ? 1 + (a % 5) * 3 : len / 5 + 1) {
            size_t cuts[2] = {a, b};
            struct usage u;
            char *o;
            size_t ol;
            run_stream(s, len, cuts, 2, filter, 1, &u, &o, &ol);
            if (ol != wl || memcmp(o, want, wl) != 0)
                fail_msg("cut at %zu, %zu: got\n%.*s", a, b, (int)ol, o);
            free(o);
            if (check)
                check(&u);
        }
    }
}

static void test_sse_pass_through(void **state)
{
    (void)state;
    check_stream_everywhere(chat_stream, chat_stream, 0, check_chat_usage);
}

static void test_sse_filter(void **state)
{
    (void)state;
    check_stream_everywhere(chat_stream, chat_stream_no_usage, 1, check_chat_usage);
}

/* The same stream with CRLF line ends, then CR alone. */
static char *line_ends(const char *s, const char *eol)
{
    char *o = malloc(strlen(s) * 2 + 1), *q = o;
    for (; *s; s++) {
        if (*s == '\n') {
            memcpy(q, eol, strlen(eol));
            q += strlen(eol);
        } else {
            *q++ = *s;
        }
    }
    *q = 0;
    return o;
}

static void test_sse_line_ends(void **state)
{
    (void)state;
    static const char *eols[] = {"\r\n", "\r"};
    for (int i = 0; i < 2; i++) {
        char *s = line_ends(chat_stream, eols[i]);
        char *w = line_ends(chat_stream_no_usage, eols[i]);
        check_stream_everywhere(s, w, 1, check_chat_usage);
        check_stream_everywhere(s, s, 0, check_chat_usage);
        free(s);
        free(w);
    }
}

/* One byte at a time. */
static void test_sse_bytewise(void **state)
{
    (void)state;
    size_t len = strlen(chat_stream);
    size_t *cuts = malloc(len * sizeof(*cuts));
    for (size_t i = 0; i < len; i++)
        cuts[i] = i;
    for (int filter = 0; filter < 2; filter++) {
        struct usage u;
        char *o;
        size_t ol;
        run_stream(chat_stream, len, cuts, len, filter, 1, &u, &o, &ol);
        const char *want = filter ? chat_stream_no_usage : chat_stream;
        assert_int_equal(ol, strlen(want));
        assert_memory_equal(o, want, ol);
        free(o);
        check_chat_usage(&u);
    }
    free(cuts);
}

/* What the filter must leave: usage in a chunk with choices, a usage chunk of another shape,
 * events with several data lines, other fields. */
static void test_sse_filter_keeps(void **state)
{
    (void)state;
    static const char *streams[] = {
        CHUNK("{\"content\":\"x\"}") "data: {\"choices\":[{\"index\":0,\"delta\":{}}],"
                                     "\"usage\":{\"prompt_tokens\":21}}\n\ndata: [DONE]\n\n",
        "data: {\"choices\":[],\"usage\":null}\n\ndata: {\"choices\":[]}\n\n",
        "data: {\"usage\":{\"prompt_tokens\":21}}\n\n",
        "event: x\ndata: {\"choices\":[1],\"usage\":{}}\n\n",
        "data: {\"choices\":[],\"usage\":{}} x\n\n",
        "data: {\"choices\":[],\n\n",
    };
    for (size_t i = 0; i < sizeof(streams) / sizeof(streams[0]); i++) {
        check_stream_everywhere(streams[i], streams[i], 1, NULL);
    }
}

/* A usage chunk in two data lines, with an event: field, is removed too; the stream around it
 * stays. */
static void test_sse_multiline(void **state)
{
    (void)state;
    static const char s[] = CHUNK("{\"content\":\"ab\"}") "event: chunk\nid: 7\ndata: {\"choices\""
                                                          "\ndata::[],\"usage\":\ndata:{\"prompt_to"
                                                          "kens\":4}}\n\ndata: [DONE]\n\n";
    static const char w[] = CHUNK("{\"content\":\"ab\"}") "data: [DONE]\n\n";
    check_stream_everywhere(s, w, 1, NULL);
}

/* An event longer than the hold is passed on whole, in order. */
static void test_sse_long_event(void **state)
{
    (void)state;
    size_t big = USAGE_HOLD * 3;
    char *s = malloc(big + 200), *q = s;
    q += sprintf(q, "data: {\"choices\":[],\"pad\":\"");
    memset(q, 'x', big);
    q += big;
    q += sprintf(q, "\",\"usage\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\n");
    size_t len = (size_t)(q - s);
    for (size_t a = 0; a < len; a += 97) {
        size_t cuts[3] = {a, a + (len - a) / 3, a + (len - a) / 2};
        struct usage u;
        char *o;
        size_t ol;
        run_stream(s, len, cuts, 3, 1, 1, &u, &o, &ol);
        assert_int_equal(ol, len);
        assert_memory_equal(o, s, len);
        assert_int_equal(u.prompt, 3);
        free(o);
    }
    free(s);
}

static void check_resp_usage(const struct usage *u)
{
    assert_int_equal(u->flags, USAGE_HAVE);
    assert_int_equal(u->prompt, 36);
    assert_int_equal(u->completion, 87);
    assert_int_equal(u->cached, 7);
    assert_int_equal(u->reasoning, 12);
    assert_int_equal(u->total, 123);
    assert_int_equal(u->text_bytes, 11);
}

/* The Responses API: text deltas counted, the usage of response.completed taken; the usage
 * objects of other events (null, or nested elsewhere) are not. */
static void test_sse_responses(void **state)
{
    (void)state;
    static const char s[] =
        "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":"
        "\"resp_1\",\"usage\":null}}\n\n"
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\","
        "\"item_id\":\"m\",\"delta\":\"Hello\"}\n\n"
        "event: response.output_text.delta\ndata: {\"delta\":\" world\",\"type\":"
        "\"response.output_text.delta\"}\n\n"
        "event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\","
        "\"text\":\"Hello world\",\"delta\":\"zzzz\"}\n\n"
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{"
        "\"id\":\"resp_1\",\"output\":[{\"content\":[{\"text\":\"Hello world\",\"usage\":{"
        "\"input_tokens\":1}}]}],\"usage\":{\"input_tokens\":36,\"input_tokens_details\":{"
        "\"cached_tokens\":7},\"output_tokens\":87,\"output_tokens_details\":{"
        "\"reasoning_tokens\":12},\"total_tokens\":123}}}\n\n";
    check_stream_everywhere(s, s, 0, check_resp_usage);
    check_stream_everywhere(s, s, 1, check_resp_usage);
}

/* A stream cut before its usage chunk: no usage, the text of the events delivered whole. */
static void test_sse_cut(void **state)
{
    (void)state;
    size_t cut = strlen(CHUNK("{\"role\":\"assistant\",\"content\":\"\"}")
                            CHUNK("{\"content\":\"Hel\"}") ": keep-alive\n\n") +
                 20;
    size_t cuts[1] = {10};
    struct usage u;
    char *o;
    size_t ol;
    run_stream(chat_stream, cut, cuts, 1, 1, 0, &u, &o, &ol);
    assert_int_equal(u.flags, 0);
    assert_int_equal(u.text_bytes, 3);
    assert_int_equal(u.text_tokens, 1);
    free(o);
    /* the reader is fine for the next stream */
    run_stream(chat_stream, strlen(chat_stream), cuts, 1, 1, 1, &u, &o, &ol);
    check_chat_usage(&u);
    free(o);
}

/* A stream's usage chunk with a negative prompt count: no usage (billed from the estimate and
 * the delivered text), and the chunk is still the one the filter removes. */
static void test_sse_bad_usage(void **state)
{
    (void)state;
    static const char s[] =
        CHUNK("{\"content\":\"Hello\"}") "data: "
                                         "{\"choices\":[],\"usage\":{\"prompt_tokens\":-21,"
                                         "\"completion_tokens\":5}}\n\n"
                                         "data: [DONE]\n\n";
    static const char want[] = CHUNK("{\"content\":\"Hello\"}") "data: [DONE]\n\n";
    size_t cuts[1] = {7};
    struct usage u;
    char *o;
    size_t ol;

    run_stream(s, strlen(s), cuts, 1, 1, 1, &u, &o, &ol);
    assert_int_equal(ol, strlen(want));
    assert_memory_equal(o, want, ol);
    assert_int_equal(u.flags, 0);
    assert_int_equal(u.prompt, 0);
    assert_int_equal(u.completion, 0);
    assert_int_equal(u.text_bytes, 5);
    assert_int_equal(u.text_tokens, 2);
    free(o);
}

/* Once warm, streams and events allocate nothing. */
static void test_sse_memory(void **state)
{
    (void)state;
    size_t cuts[2] = {100, 300};
    struct usage u;
    char *o;
    size_t ol;
    run_stream(chat_stream, strlen(chat_stream), cuts, 2, 1, 1, &u, &o, &ol);
    free(o);
    struct usage_rd *rd = usage_get(&pool);
    uint64_t heap = rd->m.heap_allocs;
    usage_put(&pool, rd);
    for (int i = 0; i < 50; i++) {
        run_stream(chat_stream, strlen(chat_stream), cuts, 2, 1, 1, &u, &o, &ol);
        free(o);
    }
    rd = usage_get(&pool);
    assert_int_equal(rd->m.heap_allocs, heap);
    usage_put(&pool, rd);
    assert_int_equal(usage_tokens_of_bytes(0), 0);
    assert_int_equal(usage_tokens_of_bytes(1), 1);
    assert_int_equal(usage_tokens_of_bytes(8), 2);
    assert_int_equal(usage_tokens_of_bytes(9), 3);
}

static int teardown(void **state)
{
    (void)state;
    usage_pool_free(&pool);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_json_bodies),     cmocka_unit_test(test_json_no_usage),
        cmocka_unit_test(test_json_edges),      cmocka_unit_test(test_json_bounds),
        cmocka_unit_test(test_json_bad_counts), cmocka_unit_test(test_sse_pass_through),
        cmocka_unit_test(test_sse_filter),      cmocka_unit_test(test_sse_line_ends),
        cmocka_unit_test(test_sse_bytewise),    cmocka_unit_test(test_sse_filter_keeps),
        cmocka_unit_test(test_sse_multiline),   cmocka_unit_test(test_sse_long_event),
        cmocka_unit_test(test_sse_responses),   cmocka_unit_test(test_sse_cut),
        cmocka_unit_test(test_sse_bad_usage),   cmocka_unit_test(test_sse_memory),
    };
    return cmocka_run_group_tests(tests, NULL, teardown);
}
