/* Unit tests of core/sync.c's pure parts: the chunk a host asks for, and what an idle host keeps.
 * Includes the .c to reach its static functions. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "core/sync.c"

static void test_want(void **state)
{
    /* no limit in that dimension: nothing asked */
    assert_int_equal(sync_want(0, 2, 50, 0, 0, 1), 0);
    /* a base chunk: limit / (8 x hosts), at least 1 */
    assert_int_equal(sync_want(100, 2, 0, 0, 0, 0), 6);
    assert_int_equal(sync_want(5, 4, 0, 0, 0, 0), 1);
    assert_int_equal(sync_want(100, 0, 0, 0, 0, 0), 12); /* hosts unknown: this one */
    /* what was used lately, less what is still held */
    assert_int_equal(sync_want(100, 2, 30, 10, 0, 0), 20);
    assert_int_equal(sync_want(100, 2, 30, 40, 0, 0), 0);
    /* ran low: a base chunk at least, whatever is held */
    assert_int_equal(sync_want(100, 2, 30, 40, 0, 1), 6);
    /* a request larger than what is held (tokens): enough for it */
    assert_int_equal(sync_want(10000, 2, 0, 600, 1174, 1), 625);
    assert_int_equal(sync_want(10000, 2, 0, 100, 1174, 1), 1074);
    /* never more than the limit */
    assert_int_equal(sync_want(100, 1, 500, 0, 0, 1), 100);
}

static void test_idle_keep(void **state)
{
    assert_int_equal(sync_base(100, 2), 6);
    assert_int_equal(sync_base(0, 2), 0);
    assert_int_equal(sync_idle_keep(100, 2, 6), 6);
    /* too small a limit for every idle host to keep one: nothing kept */
    assert_int_equal(sync_idle_keep(5, 4, 1), 0);
    assert_int_equal(sync_idle_keep(2, 2, 1), 0);
    assert_int_equal(sync_idle_keep(16, 2, 1), 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_want),
        cmocka_unit_test(test_idle_keep),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
