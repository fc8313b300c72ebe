/* Unit tests of core/util.c: clocks, the strict value parsers of the config, the hash mixer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "core/util.h"

static uint64_t dur(const char *s)
{
    uint64_t v = 12345;

    assert_int_equal(util_parse_duration_ms(s, &v), 0);
    return v;
}

static void test_duration_valid(void **state)
{
    assert_int_equal(dur("250ms"), 250);
    assert_int_equal(dur("5s"), 5000);
    assert_int_equal(dur("5"), 5000); /* bare number = seconds */
    assert_int_equal(dur("0"), 0);
    assert_int_equal(dur("2m"), 120000);
    assert_int_equal(dur("1h"), 3600000);
    assert_int_equal(dur("1d"), 86400000);
    assert_int_equal(dur("10MS"), 10);
    assert_int_equal(dur("007s"), 7000);
}

static void test_duration_invalid(void **state)
{
    const char *bad[] = {"", "-5s", "+5s", "5x", "s", "5 s", " 5s", "5s ", "1.5s", "5sec", "5mss",
                         "ms", "0x10", "5ss", "99999999999999999999",
                         /* fits in uint64 as a number, overflows once multiplied to ms */
                         "18446744073709551615h"};
    uint64_t v = 777;

    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        if (util_parse_duration_ms(bad[i], &v) != -EINVAL)
            fail_msg("duration '%s' should be rejected", bad[i]);
    }
    assert_int_equal(v, 777); /* untouched on error */
    assert_int_equal(util_parse_duration_ms(NULL, &v), -EINVAL);
}

static void test_size(void **state)
{
    uint64_t v;
    const char *bad[] = {
        "", "k", "-1", "16q", "16kk", "16 k", "1.5m", "16kbb", "18446744073709551615k"};

    assert_int_equal(util_parse_size("512", &v), 0);
    assert_int_equal(v, 512);
    assert_int_equal(util_parse_size("16k", &v), 0);
    assert_int_equal(v, 16384);
    assert_int_equal(util_parse_size("16K", &v), 0);
    assert_int_equal(v, 16384);
    assert_int_equal(util_parse_size("16kb", &v), 0);
    assert_int_equal(v, 16384);
    assert_int_equal(util_parse_size("8m", &v), 0);
    assert_int_equal(v, 8u << 20);
    assert_int_equal(util_parse_size("8MB", &v), 0);
    assert_int_equal(v, 8u << 20);
    assert_int_equal(util_parse_size("1g", &v), 0);
    assert_int_equal(v, 1u << 30);
    assert_int_equal(util_parse_size("100b", &v), 0);
    assert_int_equal(v, 100);
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        if (util_parse_size(bad[i], &v) != -EINVAL)
            fail_msg("size '%s' should be rejected", bad[i]);
    }
}

static void test_bool(void **state)
{
    const char *yes[] = {"yes", "YES", "on", "true", "True", "1"};
    const char *no[] = {"no", "off", "false", "0", "NO"};
    const char *bad[] = {"", "y", "n", "2", "yess", "enable", " yes"};

    for (size_t i = 0; i < ARRAY_SIZE(yes); i++)
        assert_int_equal(util_parse_bool(yes[i]), 1);
    for (size_t i = 0; i < ARRAY_SIZE(no); i++)
        assert_int_equal(util_parse_bool(no[i]), 0);
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++)
        assert_int_equal(util_parse_bool(bad[i]), -EINVAL);
    assert_int_equal(util_parse_bool(NULL), -EINVAL);
}

static void test_int(void **state)
{
    long v = 99;

    assert_int_equal(util_parse_int("0", 0, 256, &v), 0);
    assert_int_equal(v, 0);
    assert_int_equal(util_parse_int("256", 0, 256, &v), 0);
    assert_int_equal(v, 256);
    assert_int_equal(util_parse_int("-5", -10, 10, &v), 0);
    assert_int_equal(v, -5);
    assert_int_equal(util_parse_int("+7", 0, 10, &v), 0);
    assert_int_equal(v, 7);
    assert_int_equal(util_parse_int("9223372036854775807", 0, LONG_MAX, &v), 0);
    assert_true(v == LONG_MAX);
    assert_int_equal(util_parse_int("-9223372036854775808", LONG_MIN, 0, &v), 0);
    assert_true(v == LONG_MIN);

    v = 99;
    assert_int_equal(util_parse_int("257", 0, 256, &v), -ERANGE);
    assert_int_equal(util_parse_int("-1", 0, 256, &v), -ERANGE);
    assert_int_equal(util_parse_int("99999999999999999999999", 0, 256, &v), -ERANGE);
    assert_int_equal(util_parse_int("9223372036854775808", 0, LONG_MAX, &v), -ERANGE);
    assert_int_equal(util_parse_int("", 0, 256, &v), -EINVAL);
    assert_int_equal(util_parse_int("-", 0, 256, &v), -EINVAL);
    assert_int_equal(util_parse_int("12a", 0, 256, &v), -EINVAL);
    assert_int_equal(util_parse_int(" 12", 0, 256, &v), -EINVAL);
    assert_int_equal(util_parse_int("0x10", 0, 256, &v), -EINVAL);
    assert_int_equal(util_parse_int("1e3", 0, 10000, &v), -EINVAL);
    assert_int_equal(v, 99); /* untouched on error */
}

static void test_span_ieq(void **state)
{
    const char *buf = "Content-LengthXYZ";

    assert_true(util_span_ieq(buf, 14, "content-length"));
    assert_true(util_span_ieq(buf, 14, "CONTENT-LENGTH"));
    assert_false(util_span_ieq(buf, 13, "content-length"));
    assert_false(util_span_ieq(buf, 15, "content-length"));
    assert_false(util_span_ieq(buf, 14, "content-lengtx"));
    assert_true(util_span_ieq(buf, 0, ""));
}

static uint64_t clock_ns(clockid_t id)
{
    struct timespec ts;

    assert_int_equal(clock_gettime(id, &ts), 0);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The clock helpers read CLOCK_MONOTONIC (shm times are compared across processes and must not
 * jump with the wall clock): each value lies between two CLOCK_MONOTONIC reads taken around it,
 * and far from CLOCK_REALTIME, which counts from 1970 while the monotonic clock counts from
 * boot. A helper switched to another clock fails here. */
static void test_clocks(void **state)
{
    uint64_t lo = clock_ns(CLOCK_MONOTONIC);
    uint64_t ns = time_mono_ns();
    uint64_t ms = time_mono_ms();
    uint64_t hi = clock_ns(CLOCK_MONOTONIC);
    uint64_t real = clock_ns(CLOCK_REALTIME);

    assert_true(lo <= ns && ns <= hi);
    assert_true(lo / 1000000 <= ms && ms <= hi / 1000000);
    /* a machine up for 30 years would be the first where the two could meet */
    assert_true(real - ns > 30ull * 365 * 86400 * 1000000000ull);

    uint64_t rlo = clock_ns(CLOCK_REALTIME) / 1000000;
    uint64_t rms = time_real_ms();
    uint64_t rhi = clock_ns(CLOCK_REALTIME) / 1000000;
    assert_true(rlo <= rms && rms <= rhi);

    struct timespec ts = {0, 2 * 1000 * 1000};
    nanosleep(&ts, NULL);
    assert_true(time_mono_ns() - ns >= 2 * 1000 * 1000);
}

static void test_mix64(void **state)
{
    /* splitmix64's finaliser: the values of the reference implementation */
    assert_true(util_mix64(0) == 0);
    assert_true(util_mix64(1) == 0x5692161d100b05e5ULL);
    assert_true(util_mix64(0x9e3779b97f4a7c15ULL) == 0xe220a8397b1dcdafULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_duration_valid),
        cmocka_unit_test(test_duration_invalid),
        cmocka_unit_test(test_size),
        cmocka_unit_test(test_bool),
        cmocka_unit_test(test_int),
        cmocka_unit_test(test_span_ieq),
        cmocka_unit_test(test_clocks),
        cmocka_unit_test(test_mix64),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
