/* Unit tests of url_parse: accepted forms, defaults, and every kind of rejected URL. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "core/url.h"
#include "core/util.h"

static void ok(const char *s, int tls, const char *host, int port, const char *prefix)
{
    struct url u;
    const char *why = NULL;

    if (url_parse(s, &u, &why) != 0)
        fail_msg("'%s' rejected: %s", s, why);
    assert_int_equal(u.tls, tls);
    assert_string_equal(u.host, host);
    assert_int_equal(u.port, port);
    assert_string_equal(u.prefix, prefix);
}

static void bad(const char *s, const char *why_part)
{
    struct url u;
    const char *why = NULL;

    if (url_parse(s, &u, &why) != -EINVAL)
        fail_msg("'%s' accepted", s);
    assert_non_null(why);
    if (!strstr(why, why_part))
        fail_msg("'%s': reason '%s' lacks '%s'", s, why, why_part);
}

static void test_url_valid(void **state)
{
    ok("http://127.0.0.1:9101/v1", 0, "127.0.0.1", 9101, "/v1");
    ok("http://example.com", 0, "example.com", 80, "");
    ok("https://api.openai.com/v1", 1, "api.openai.com", 443, "/v1");
    ok("HTTPS://Api.Example.com:8443/", 1, "Api.Example.com", 8443, "");
    ok("http://h/", 0, "h", 80, "");
    ok("http://h/openai/v1/", 0, "h", 80, "/openai/v1");
    ok("http://h/v1//", 0, "h", 80, "/v1");
    ok("http://[::1]:9101/v1", 0, "::1", 9101, "/v1");
    ok("https://[2001:db8::1]", 1, "2001:db8::1", 443, "");
    ok("http://my_host-1.internal:65535", 0, "my_host-1.internal", 65535, "");
    ok("http://h:1/a/b%20c", 0, "h", 1, "/a/b%20c");
}

static void test_url_invalid(void **state)
{
    bad("ftp://h/", "scheme");
    bad("h:80/v1", "scheme");
    bad("http:/h", "scheme");
    bad("http://", "empty host");
    bad("http:///v1", "empty host");
    bad("http://:80/v1", "empty host");
    bad("http://user:pw@h/v1", "user");
    bad("http://user@h", "user");
    bad("http://h/v1?x=1", "query");
    bad("http://h/v1#frag", "fragment");
    bad("http://h /v1", "space");
    bad("http://h/v 1", "space");
    bad("http://h:0/", "port");
    bad("http://h:65536/", "port");
    bad("http://h:99999999999/", "port");
    bad("http://h:/", "port");
    bad("http://h:8a/", "port");
    bad("http://[::1/", "']'");
    bad("http://[zz::1]/", "IPv6");
    bad("http://[]/", "IPv6");
    bad("http://[::1]x/", "after host");
    bad("http://h*st/", "host");
    bad("http://h/v1\"x", "path");
}

static void test_url_limits(void **state)
{
    char s[600];
    struct url u;
    const char *why;

    /* The longest host that fits (CONF_HOST_MAX - 1), then one more. */
    strcpy(s, "http://");
    memset(s + 7, 'a', CONF_HOST_MAX - 1);
    s[7 + CONF_HOST_MAX - 1] = '\0';
    assert_int_equal(url_parse(s, &u, &why), 0);
    assert_int_equal(strlen(u.host), CONF_HOST_MAX - 1);
    s[7 + CONF_HOST_MAX - 1] = 'a';
    s[7 + CONF_HOST_MAX] = '\0';
    assert_int_equal(url_parse(s, &u, &why), -EINVAL);

    strcpy(s, "http://h/");
    memset(s + 9, 'p', CONF_PATH_MAX);
    s[9 + CONF_PATH_MAX] = '\0';
    assert_int_equal(url_parse(s, &u, &why), -EINVAL);
    assert_non_null(strstr(why, "path"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_url_valid),
        cmocka_unit_test(test_url_invalid),
        cmocka_unit_test(test_url_limits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
