/* Unit tests for core/rewrite.c: upstream bodies as pieces of the client's body. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/json.h"
#include "core/rewrite.h"

static struct json_parser jp;

/* Rewrites body and checks the joined pieces are want (NULL: unchanged), that they are the
 * body's own bytes where not inserted, and that they parse back as asked. */
static void check(const char *body, const char *model, int iu, const char *want)
{
    struct json_req jr, back;
    struct rewrite rw;
    char out[2048];
    size_t o = 0;

    assert_int_equal(json_req_parse(&jp, &jr, NULL, body, strlen(body)), 0);
    int r = rewrite_body(&rw, body, strlen(body), &jr, model, model ? strlen(model) : 0, iu);
    assert_int_equal(r, want ? 1 : 0);
    assert_true(rw.n <= REWRITE_PIECES);
    for (int i = 0; i < rw.n; i++) {
        const char *p = rw.iov[i].iov_base;
        /* a piece is in the body or in rw.buf / static text: never a copy of the body */
        memcpy(out + o, p, rw.iov[i].iov_len);
        o += rw.iov[i].iov_len;
    }
    assert_int_equal(o, rw.len);
    if (!want) {
        assert_int_equal(rw.n, 1);
        assert_ptr_equal(rw.iov[0].iov_base, body);
        want = body;
    }
    if (o != strlen(want) || memcmp(out, want, o) != 0)
        fail_msg("got  %.*s\nwant %s", (int)o, out, want);
    assert_int_equal(json_req_parse(&jp, &back, NULL, out, o), 0);
    if (iu)
        assert_true(back.flags & JSON_REQ_INCLUDE_USAGE);
    if (model) {
        assert_int_equal(back.model_len, strlen(model));
        assert_memory_equal(back.model, model, strlen(model));
    }
}

static void test_unchanged(void **state)
{
    (void)state;
    check("{\"model\":\"gpt-4o\",\"stream\":true}", NULL, 0, NULL);
    check("{\"model\":\"gpt-4o\",\"stream\":true}", "gpt-4o", 0, NULL);
    check("{\"model\":\"gpt-4o\",\"stream_options\":{\"include_usage\":true}}", NULL, 1, NULL);
}

static void test_model(void **state)
{
    (void)state;
    check("{\"model\":\"gpt-4o\",\"stream\":true}", "up-4o", 0,
          "{\"model\":\"up-4o\",\"stream\":true}");
    check("{ \"messages\":[{\"model\":\"x\"}],\"model\" :  \"g\\u0070t\" }", "a\"b\\c", 0,
          "{ \"messages\":[{\"model\":\"x\"}],\"model\" :  \"a\\\"b\\\\c\" }");
    /* twice: the last one is the one upstreams read */
    check("{\"model\":\"a\",\"model\":\"b\"}", "c", 0, "{\"model\":\"a\",\"model\":\"c\"}");
}

static void test_include_usage(void **state)
{
    (void)state;
    check("{\"model\":\"m\",\"stream\":true}", NULL, 1,
          "{\"stream_options\":{\"include_usage\":true},\"model\":\"m\",\"stream\":true}");
    check("  {\"model\":\"m\"}", NULL, 1,
          "  {\"stream_options\":{\"include_usage\":true},\"model\":\"m\"}");
    check("{\"stream_options\":{},\"model\":\"m\"}", NULL, 1,
          "{\"stream_options\":{\"include_usage\":true},\"model\":\"m\"}");
    check("{\"stream_options\":{ \n},\"model\":\"m\"}", NULL, 1,
          "{\"stream_options\":{\"include_usage\":true \n},\"model\":\"m\"}");
    check("{\"stream_options\":{\"x\":1},\"model\":\"m\"}", NULL, 1,
          "{\"stream_options\":{\"include_usage\":true,\"x\":1},\"model\":\"m\"}");
    check("{\"stream_options\":{\"include_usage\":false,\"x\":1}}", NULL, 1,
          "{\"stream_options\":{\"include_usage\":true,\"x\":1}}");
    check("{\"stream_options\":{\"include_usage\" : null}}", NULL, 1,
          "{\"stream_options\":{\"include_usage\" : true}}");
    check("{\"stream_options\":null,\"model\":\"m\"}", NULL, 1,
          "{\"stream_options\":{\"include_usage\":true},\"model\":\"m\"}");
    /* white space as yajl takes it (\v, \f too): the object is still empty */
    check("{\"stream_options\":{\f\v},\"model\":\"m\"}", NULL, 1,
          "{\"stream_options\":{\"include_usage\":true\f\v},\"model\":\"m\"}");
}

static void test_both(void **state)
{
    (void)state;
    check("{\"stream_options\":{\"include_usage\":false},\"model\":\"gpt-4o\",\"stream\":true}",
          "upstream-model", 1,
          "{\"stream_options\":{\"include_usage\":true},\"model\":\"upstream-model\","
          "\"stream\":true}");
    check("{\"model\":\"gpt-4o\",\"stream\":true,\"stream_options\":{}}", "u", 1,
          "{\"model\":\"u\",\"stream\":true,\"stream_options\":{\"include_usage\":true}}");
    check("{\"model\":\"gpt-4o\",\"stream\":true}", "u", 1,
          "{\"stream_options\":{\"include_usage\":true},\"model\":\"u\",\"stream\":true}");
}

static void test_errors(void **state)
{
    (void)state;
    struct json_req jr;
    struct rewrite rw;
    const char *b = "{\"model\":5}";
    char big[REWRITE_BUF + 10];

    assert_int_equal(json_req_parse(&jp, &jr, NULL, b, strlen(b)), 0);
    assert_int_equal(rewrite_body(&rw, b, strlen(b), &jr, "x", 1, 0), -EINVAL);
    b = "{\"model\":\"m\"}";
    assert_int_equal(json_req_parse(&jp, &jr, NULL, b, strlen(b)), 0);
    memset(big, 'a', sizeof(big));
    assert_int_equal(rewrite_body(&rw, b, strlen(b), &jr, big, sizeof(big), 0), -ENOSPC);
}

static int teardown(void **state)
{
    (void)state;
    json_parser_free(&jp);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unchanged),     cmocka_unit_test(test_model),
        cmocka_unit_test(test_include_usage), cmocka_unit_test(test_both),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, NULL, teardown);
}
