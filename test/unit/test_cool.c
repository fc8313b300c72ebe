/* Unit tests for core/cool.c: Retry-After (seconds and HTTP dates), OpenAI reset durations
 * (saturating, never wrapping) and the cool-down a 429 gets from them. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "core/cool.h"

#define H(n, v)                                                                                    \
    {                                                                                              \
        n, v, sizeof(n) - 1, sizeof(v) - 1                                                         \
    }

static void test_retry_after(void **state)
{
    /* Sun, 06 Nov 1994 08:49:37 GMT = 784111777 */
    const int64_t t = 784111777;
    assert_int_equal(cool_retry_after_ms("7", 1, t), 7000);
    assert_int_equal(cool_retry_after_ms(" 0 ", 3, t), 0);
    assert_int_equal(cool_retry_after_ms("120", 3, t), 120000);
    const char *d = "Sun, 06 Nov 1994 08:49:47 GMT";
    assert_int_equal(cool_retry_after_ms(d, strlen(d), t), 10000);
    d = "Sunday, 06-Nov-94 08:50:37 GMT";
    assert_int_equal(cool_retry_after_ms(d, strlen(d), t), 60000);
    d = "Sun Nov  6 08:49:40 1994";
    assert_int_equal(cool_retry_after_ms(d, strlen(d), t), 3000);
    /* a date in the past: now */
    d = "Sun, 06 Nov 1994 08:49:00 GMT";
    assert_int_equal(cool_retry_after_ms(d, strlen(d), t), 0);
    /* across a month and a leap day: Thu, 01 Mar 2024 00:00:00 GMT = 1709251200 */
    d = "Fri, 01 Mar 2024 00:00:05 GMT";
    assert_int_equal(cool_retry_after_ms(d, strlen(d), 1709251200), 5000);
    static const char *bad[] = {"",
                                "-1",
                                "1.5",
                                "soon",
                                "Sun, 06 Nov 1994 08:49:47 CET",
                                "Sun, 06 Foo 1994 08:49:47 GMT",
                                "Sun, 06 Nov 1994 08:49 GMT",
                                "Sun, 06 Nov 1994 08:49:47 GMT extra"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(cool_retry_after_ms(bad[i], strlen(bad[i]), t), -1);
}

static void test_duration(void **state)
{
    static const struct {
        const char *s;
        int64_t ms;
    } ok[] = {
        {"1s", 1000},     {"6m0s", 360000}, {"20ms", 20}, {"1.5s", 1500}, {"1h2m3.5s", 3723500},
        {"0.25", 250},    {"500us", 1},     {"2", 2000},  {"0s", 0},      {" 3s ", 3000},
        {"1m30s", 90000}, {"17.3ms", 18},   {"100ns", 1},
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++)
        assert_int_equal(cool_duration_ms(ok[i].s, strlen(ok[i].s)), ok[i].ms);
    static const char *bad[] = {"", "s", "1x", "1s2", "1.s.", "-1s", ".s", "1 s"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        assert_int_equal(cool_duration_ms(bad[i], strlen(bad[i])), -1);
}

/* Huge values from an upstream saturate instead of wrapping into a short cool-down (or, before,
 * being refused and replaced by the 1 s default); checked under UBSan in the sanitizer build. */
static void test_duration_huge(void **state)
{
    static const char *huge[] = {
        "99999999999999999999h", /* more digits than any integer type holds */
        "999999999999h",         /* fits the digits, not x 3600 s in ns */
        "18446744073709551616s", /* UINT64_MAX + 1 */
        "5124095576h30m",        /* each part fits, the sum does not */
        "99999999999999999999999999999999999999999999999999ms",
    };
    for (size_t i = 0; i < sizeof(huge) / sizeof(huge[0]); i++)
        assert_int_equal(cool_duration_ms(huge[i], strlen(huge[i])), COOL_DURATION_MAX_MS);
    /* a fraction of an hour with every digit kept: 0.999999999 h, not frac x ns wrapped */
    assert_int_equal(cool_duration_ms("0.999999999h", 12), 3600000); /* 3599999.9964 up */
    assert_int_equal(cool_duration_ms("0.000000001h", 12), 1);       /* 0.0036 ms up */
    assert_int_equal(cool_duration_ms("1.999999999999m", 15), 120000);
    /* one more digit than the 12 the old parser read */
    assert_int_equal(cool_duration_ms("1000000000000ms", 15), 1000000000000LL);
    /* not numbers at all stay malformed */
    assert_int_equal(cool_duration_ms("1e309s", 6), -1);
    assert_int_equal(cool_duration_ms("inf", 3), -1);
    assert_int_equal(cool_duration_ms("NaNs", 4), -1);

    assert_int_equal(cool_retry_after_ms("99999999999999999999", 20, 0), COOL_DURATION_MAX_MS);
    assert_int_equal(cool_retry_after_ms("9223372036854775807", 19, 0), COOL_DURATION_MAX_MS);
    assert_int_equal(cool_retry_after_ms("1000000000000000", 16, 0), COOL_DURATION_MAX_MS);
    assert_int_equal(cool_retry_after_ms("18446744073", 11, 0), 18446744073000LL);
    assert_int_equal(cool_retry_after_ms("1e309", 5, 0), -1);
    /* a header value is a span, not a string: no read past its length */
    assert_int_equal(cool_retry_after_ms("12345", 2, 0), 12000);

    /* through the 429 cool-down: the longest wins, saturated, never negative */
    struct proxy_hdr h[] = {
        H("x-ratelimit-reset-requests", "99999999999999999999h"),
        H("x-ratelimit-reset-tokens", "1s"),
    };
    assert_int_equal(cool_ms(h, 2, 0), COOL_DURATION_MAX_MS);
    struct proxy_hdr ms[] = {H("retry-after-ms", "99999999999999999999999")};
    assert_true(cool_ms(ms, 1, 0) >= COOL_DURATION_MAX_MS / 1000);
}

static void test_cool_ms(void **state)
{
    struct proxy_hdr none[] = {H("Content-Type", "application/json")};
    assert_int_equal(cool_ms(none, 1, 0), -1);
    /* the larger of the two resets */
    struct proxy_hdr resets[] = {
        H("x-ratelimit-reset-requests", "20ms"),
        H("x-ratelimit-reset-tokens", "6m0s"),
    };
    assert_int_equal(cool_ms(resets, 2, 0), 360000);
    /* Retry-After wins over the resets, retry-after-ms over both */
    struct proxy_hdr both[] = {
        H("x-ratelimit-reset-tokens", "6m0s"),
        H("Retry-After", "7"),
        H("retry-after-ms", "1500"),
    };
    assert_int_equal(cool_ms(both, 2, 0), 7000);
    assert_int_equal(cool_ms(both, 3, 0), 1500);
    /* an unreadable Retry-After falls back to the resets */
    struct proxy_hdr badra[] = {
        H("Retry-After", "later"),
        H("x-ratelimit-reset-requests", "1.5s"),
    };
    assert_int_equal(cool_ms(badra, 2, 0), 1500);
}

/* What the worker applies: the default when the answer does not say, capped at an hour. */
static void test_cool_429(void **state)
{
    struct proxy_hdr none[] = {H("Content-Type", "application/json")};
    assert_int_equal(cool_429_ms(none, 1, 0), COOL_DEFAULT_MS);
    assert_int_equal(cool_429_ms(none, 0, 0), COOL_DEFAULT_MS);
    struct proxy_hdr ra[] = {H("Retry-After", "7")};
    assert_int_equal(cool_429_ms(ra, 1, 0), 7000);
    struct proxy_hdr zero[] = {H("Retry-After", "0")};
    assert_int_equal(cool_429_ms(zero, 1, 0), 0);
    struct proxy_hdr day[] = {H("Retry-After", "86400")};
    assert_int_equal(cool_429_ms(day, 1, 0), COOL_MAX_MS);
    struct proxy_hdr huge[] = {H("x-ratelimit-reset-tokens", "99999999999999999999h")};
    assert_int_equal(cool_429_ms(huge, 1, 0), COOL_MAX_MS);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_retry_after),   cmocka_unit_test(test_duration),
        cmocka_unit_test(test_duration_huge), cmocka_unit_test(test_cool_ms),
        cmocka_unit_test(test_cool_429),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
