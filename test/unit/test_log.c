/* Unit tests of the rate-limited log helper: once per LOG_RATE_MS, with a count of the rest. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "core/log.h"

static void test_log_rate(void **state)
{
    struct log_rate r = {0};
    uint64_t skipped = 99;
    char note[LOG_RATE_NOTE];

    /* the first of a burst at once, even at time 0 */
    assert_int_equal(log_rate_ok(&r, 0, &skipped), 1);
    assert_int_equal(skipped, 0);
    assert_string_equal(log_rate_note(skipped, note), "");
    /* the rest of the second is counted */
    for (uint64_t t = 1; t < LOG_RATE_MS; t += 100)
        assert_int_equal(log_rate_ok(&r, t, &skipped), 0);
    /* the next one reports them */
    assert_int_equal(log_rate_ok(&r, LOG_RATE_MS, &skipped), 1);
    assert_int_equal(skipped, 10);
    assert_string_equal(log_rate_note(skipped, note), " (10 more since the last report)");
    /* a quiet spell: the next is logged at once, with nothing to report */
    assert_int_equal(log_rate_ok(&r, 10 * LOG_RATE_MS, &skipped), 1);
    assert_int_equal(skipped, 0);
    assert_int_equal(log_rate_ok(&r, 10 * LOG_RATE_MS + 1, &skipped), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_log_rate),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
