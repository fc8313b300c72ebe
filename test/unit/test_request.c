/* Unit tests of core/request.c: request-target forms, tokens, Host values, extension methods
 * and version forms. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "core/request.h"

static int target(const char *t, const char **path, size_t *len)
{
    return request_target(t, strlen(t), path, len);
}

static void target_is(const char *t, int form, const char *want_path)
{
    const char *p = NULL;
    size_t n = 0;
    int r = target(t, &p, &n);
    if (r != form)
        fail_msg("'%s': form %d, expected %d", t, r, form);
    if (want_path && (n != strlen(want_path) || memcmp(p, want_path, n) != 0))
        fail_msg("'%s': path '%.*s', expected '%s'", t, (int)n, p, want_path);
}

static void test_target_forms(void **state)
{
    target_is("/v1/models", REQUEST_TARGET_ORIGIN, "/v1/models");
    target_is("/v1/chat/completions?a=b&c=%20", REQUEST_TARGET_ORIGIN,
              "/v1/chat/completions?a=b&c=%20");
    target_is("*", REQUEST_TARGET_ASTERISK, NULL);
    target_is("http://api.example.com/v1/models", REQUEST_TARGET_ABSOLUTE, "/v1/models");
    target_is("HTTPS://API.example.com:443/v1/x?y=1", REQUEST_TARGET_ABSOLUTE, "/v1/x?y=1");
    target_is("http://[::1]:8080/v1/models", REQUEST_TARGET_ABSOLUTE, "/v1/models");
    target_is("http://10.0.0.1/v1/models", REQUEST_TARGET_ABSOLUTE, "/v1/models");
    /* no path: nothing the gateway serves, but a valid form (the path check says 404) */
    target_is("http://h", REQUEST_TARGET_ABSOLUTE, "");
    target_is("http://h?q", REQUEST_TARGET_ABSOLUTE, "?q");
}

static void test_target_invalid(void **state)
{
    static const char *bad[] = {
        "",
        "v1/models",              /* relative */
        "127.0.0.1:443",          /* authority form: CONNECT's */
        "api.example.com:443",    /* authority form */
        "**",                     /* not the asterisk form */
        "*/v1",                   /* nor this */
        "ftp://h/v1/models",      /* scheme */
        "http:/h/v1/models",      /* not a URI with an authority */
        "http:///v1/models",      /* empty authority */
        "http://u@h/v1/models",   /* userinfo */
        "http://u:p@h/v1/models", /* userinfo */
        "http://h h/v1",          /* space */
        "http://[::1/v1/models",  /* unclosed literal */
        "http://h:8a/v1/models",  /* port */
        "/v1/models#frag",        /* fragment */
        "/v1/mod els",            /* space */
        "/v1/mod\tels",           /* control */
        "/v1/mod\x7f"
        "els",                        /* DEL */
        "/v1/mod\xc3\xa9ls",          /* non-ASCII */
        "/v1/models\r\nX-Injected: 1" /* CRLF */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        const char *p;
        size_t n;
        if (target(bad[i], &p, &n) != -EINVAL)
            fail_msg("'%s' accepted", bad[i]);
    }
}

static void test_token(void **state)
{
    assert_true(request_token("Content-Type", 12));
    assert_true(request_token("x-a!#$%&'*+.^_`|~9", 18));
    assert_false(request_token("", 0));
    assert_false(request_token("Host ", 5));
    assert_false(request_token("Ho st", 5));
    assert_false(request_token("X(A)", 4));
    assert_false(request_token("X:A", 3));
    assert_false(request_token("X\"A", 3));
    assert_false(request_token("X\tA", 3));
    assert_false(request_token("X\xc3\xa9", 3));
    assert_false(request_token("X/A", 3));
}

static void test_host(void **state)
{
    static const char *good[] = {"",
                                 "api.example.com",
                                 "api.example.com:443",
                                 "h:",
                                 "127.0.0.1:8080",
                                 "[::1]",
                                 "[::1]:443",
                                 "[2001:db8::1.2.3.4]:1",
                                 "xn--bcher-kva.de",
                                 "a_b~c!$&'()*+,;=%41"};
    static const char *bad[] = {"a b",  "a/b", "a@b",   "h:x", "h:1:2",     ":80",
                                "[::1", "[]",  "[::g]", "h\t", "h\xc3\xa9", "[::1]x"};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        if (!request_host_ok(good[i], strlen(good[i])))
            fail_msg("Host '%s' refused", good[i]);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (request_host_ok(bad[i], strlen(bad[i])))
            fail_msg("Host '%s' accepted", bad[i]);
}

static int ext(const char *s)
{
    return request_ext_method(s, strlen(s));
}

static void test_ext_method(void **state)
{
    assert_int_equal(ext("FOO / HTTP/1.1\r\n"), 1);
    assert_int_equal(ext("get /"), 1);
    assert_int_equal(ext("M-GET /v1"), 1);
    assert_int_equal(ext("\r\nBREW "), 1);
    assert_int_equal(ext("FOO"), -EAGAIN); /* the space may still come */
    assert_int_equal(ext(""), -EAGAIN);
    assert_int_equal(ext("\x16\x03\x01"), 0); /* a TLS hello */
    assert_int_equal(ext("GARBAGE\r\n"), 0);
    assert_int_equal(ext(" GET /"), 0);
    assert_int_equal(ext("G(T /"), 0);
    char longm[80];
    memset(longm, 'A', 70);
    longm[70] = '\0';
    assert_int_equal(ext(longm), 0); /* no method that long: no waiting for its end */
}

static void test_version_form(void **state)
{
    static const char a[] = "GET / HTTP/1.2", b[] = "GET / HTTP/x.1", c[] = "GET / HTTP/12";
    assert_true(request_version_form(a, a + sizeof(a) - 1));
    assert_false(request_version_form(b, b + sizeof(b) - 1));
    assert_false(request_version_form(c, c + sizeof(c) - 1));
    assert_false(request_version_form(a + 8, a + sizeof(a) - 1)); /* fewer than 8 bytes */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_target_forms), cmocka_unit_test(test_target_invalid),
        cmocka_unit_test(test_token),        cmocka_unit_test(test_host),
        cmocka_unit_test(test_ext_method),   cmocka_unit_test(test_version_form),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
