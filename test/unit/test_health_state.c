/* Unit tests of the health checker's pure decisions, driven with a fake clock. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "health/state.h"

#define MS 1000000ULL

static const struct health_breaker_cfg brc = {
    .failures = 3, .open_ns = 1000 * MS, .open_max_ns = 5000 * MS, .successes = 2, .trials = 1};

static int eval(struct health_breaker *br, uint64_t now, uint32_t consecutive, uint32_t trips)
{
    struct health_breaker_in in = {consecutive, trips};

    return health_breaker_eval(br, &brc, now, &in);
}

static void test_breaker_full_cycle(void **state)
{
    struct health_breaker br;
    uint64_t t = 10000 * MS;

    health_breaker_init(&br, &brc);
    assert_int_equal(br.st, BREAKER_CLOSED);
    assert_false(eval(&br, t, 2, 0));
    /* the third consecutive failure opens it: counted, or tripped by the worker */
    assert_true(eval(&br, t, 3, 0));
    assert_int_equal(br.st, BREAKER_OPEN);
    assert_int_equal(br.until_ns, t + 1000 * MS);
    health_breaker_init(&br, &brc);
    assert_true(eval(&br, t, 0, SHM_TRIP_BREAKER));
    assert_int_equal(br.st, BREAKER_OPEN);
    /* stays open for open_for */
    assert_false(eval(&br, t + 999 * MS, 3, 0));
    assert_true(eval(&br, t + 1000 * MS, 3, 0));
    assert_int_equal(br.st, BREAKER_HALF_OPEN);
    /* the trials decide (the workers count them: PASSED once `successes` did) */
    assert_false(eval(&br, t + 1100 * MS, 0, 0));
    assert_true(eval(&br, t + 1200 * MS, 0, SHM_TRIP_PASSED));
    assert_int_equal(br.st, BREAKER_CLOSED);
    assert_int_equal(br.until_ns, 0);
    /* a verdict of trials admitted past until_ns may come before the checker saw HALF_OPEN */
    assert_true(eval(&br, t, 3, 0));
    assert_true(eval(&br, t + 1000 * MS, 0, SHM_TRIP_PASSED));
    assert_int_equal(br.st, BREAKER_CLOSED);
}

static void test_breaker_failed_trial_doubles_open_time(void **state)
{
    struct health_breaker br;
    uint64_t t = 0;

    health_breaker_init(&br, &brc);
    assert_true(eval(&br, t, 3, 0));
    for (uint64_t want = 2000; want <= 5000; want = want * 2 > 5000 ? 5000 : want * 2) {
        t = br.until_ns;
        assert_true(eval(&br, t, 0, 0)); /* half-open */
        assert_int_equal(br.st, BREAKER_HALF_OPEN);
        assert_true(eval(&br, t + MS, 0, SHM_TRIP_FAILED)); /* trial fails */
        assert_int_equal(br.st, BREAKER_OPEN);
        assert_int_equal(br.open_ns, want * MS);
        assert_int_equal(br.until_ns, t + MS + want * MS);
        if (want == 5000)
            break;
    }
    /* capped at open_max, and reset to open_for once it closes */
    t = br.until_ns;
    assert_true(eval(&br, t, 0, 0));
    assert_true(eval(&br, t + MS, 0, SHM_TRIP_PASSED));
    assert_int_equal(br.st, BREAKER_CLOSED);
    assert_int_equal(br.open_ns, 1000 * MS);
}

static void test_breaker_commands_and_off(void **state)
{
    struct health_breaker br;
    struct health_breaker_cfg off = brc;
    struct health_breaker_in in = {1000, SHM_TRIP_BREAKER};

    health_breaker_init(&br, &brc);
    assert_true(health_breaker_command(&br, &brc, BREAKER_CMD_OPEN, 50));
    assert_int_equal(br.st, BREAKER_OPEN);
    assert_int_equal(br.until_ns, 50 + 1000 * MS);
    assert_true(health_breaker_command(&br, &brc, BREAKER_CMD_RESET, 60));
    assert_int_equal(br.st, BREAKER_CLOSED);
    assert_false(health_breaker_command(&br, &brc, BREAKER_CMD_NONE, 70));
    off.failures = 0;
    health_breaker_init(&br, &off);
    assert_false(health_breaker_eval(&br, &off, 1, &in));
}

static const struct health_live_cfg lc = {
    .max_fails = 3,
    .fail_timeout_ns = 10000 * MS,
    .checks = 1,
    .degraded_latency_us = 500000,
    .degraded_error_pct = 20,
    .degraded_min_requests = 10,
};

static void test_live_passive_down_and_auth(void **state)
{
    struct health_live_in in = {.st = BACKEND_UP};
    enum backend_state st;
    enum backend_reason why;

    in.recent_failures = 2;
    assert_false(health_live_eval(&lc, &in, 1, &st, &why));
    in.recent_failures = 3;
    assert_true(health_live_eval(&lc, &in, 1, &st, &why));
    assert_int_equal(st, BACKEND_DOWN);
    assert_int_equal(why, REASON_PASSIVE);
    /* with checks on, a live success doesn't bring it back: the check does */
    in.st = BACKEND_DOWN;
    in.reason = REASON_PASSIVE;
    in.since_ns = 5;
    in.last_ok_ns = 9;
    assert_false(health_live_eval(&lc, &in, 10, &st, &why));
    /* a new 401/403 marks DOWN with reason auth, once */
    in.st = BACKEND_UP;
    in.recent_failures = 0;
    in.auth_failures = 1;
    assert_true(health_live_eval(&lc, &in, 11, &st, &why));
    assert_int_equal(st, BACKEND_DOWN);
    assert_int_equal(why, REASON_AUTH);
    in.auth_seen = 1;
    assert_false(health_live_eval(&lc, &in, 12, &st, &why));
}

static void test_live_checks_off_trial_recovery(void **state)
{
    struct health_live_cfg nochk = lc;
    struct health_live_in in = {.st = BACKEND_DOWN, .reason = REASON_PASSIVE, .since_ns = 1000};
    enum backend_state st;
    enum backend_reason why;

    nochk.checks = 0;
    assert_false(health_live_eval(&nochk, &in, 2000, &st, &why));
    in.last_ok_ns = 1500; /* a trial succeeded */
    assert_true(health_live_eval(&nochk, &in, 2000, &st, &why));
    assert_int_equal(st, BACKEND_UP);
    assert_int_equal(why, REASON_LIVE_OK);
    /* or the workers said so (PASSED) before the success reached the counters */
    in.last_ok_ns = 0;
    in.trips = SHM_TRIP_PASSED;
    assert_true(health_live_eval(&nochk, &in, 2000, &st, &why));
    assert_int_equal(why, REASON_LIVE_OK);
    /* with checks on, only checks bring it back */
    assert_false(health_live_eval(&lc, &in, 2000, &st, &why));
}

/* Workers' trips are acted on whatever the counters say by now. */
static void test_live_trips(void **state)
{
    struct health_live_in in = {.st = BACKEND_UP, .trips = SHM_TRIP_PASSIVE};
    enum backend_state st;
    enum backend_reason why;

    assert_true(health_live_eval(&lc, &in, 1, &st, &why));
    assert_int_equal(st, BACKEND_DOWN);
    assert_int_equal(why, REASON_PASSIVE);
    in.trips = SHM_TRIP_AUTH;
    assert_true(health_live_eval(&lc, &in, 1, &st, &why));
    assert_int_equal(why, REASON_AUTH);
    in.st = BACKEND_DEGRADED;
    in.trips = SHM_TRIP_PASSIVE | SHM_TRIP_BREAKER;
    assert_true(health_live_eval(&lc, &in, 1, &st, &why));
    assert_int_equal(why, REASON_PASSIVE);
    in.st = BACKEND_UP;
    in.trips = SHM_TRIP_BREAKER; /* the breaker's, not the state's */
    assert_false(health_live_eval(&lc, &in, 1, &st, &why));
}

/* The admission a state and breaker give: what the workers apply as it is. */
static void test_admission(void **state)
{
    struct health_live_cfg nochk = lc;
    struct health_breaker br;
    struct shm_admission a, b;

    nochk.checks = 0;
    health_breaker_init(&br, &brc);
    /* UP / DEGRADED, closed: everything, with the thresholds workers trip at */
    health_admission(&lc, &brc, BACKEND_UP, REASON_NONE, 0, &br, &a);
    assert_int_equal(a.kind, SHM_ADMIT_ALL);
    assert_int_equal(a.max_fails, 3);
    assert_int_equal(a.fail_window_ns, 10000 * MS);
    assert_int_equal(a.consec, 3);
    health_admission(&lc, &brc, BACKEND_DEGRADED, REASON_CHECK_SLOW, 7, &br, &b);
    assert_true(health_admission_equal(&a, &b));
    /* DOWN: nothing while checks decide; checks off, a passive or auth DOWN takes one trial
     * at a time from fail_timeout on, one success of which brings it back */
    health_admission(&lc, &brc, BACKEND_DOWN, REASON_PASSIVE, 100, &br, &a);
    assert_int_equal(a.kind, SHM_ADMIT_NONE);
    assert_int_equal(a.max_fails, 0);
    health_admission(&nochk, &brc, BACKEND_DOWN, REASON_CHECK_STATUS, 100, &br, &a);
    assert_int_equal(a.kind, SHM_ADMIT_NONE);
    health_admission(&nochk, &brc, BACKEND_DOWN, REASON_AUTH, 100, &br, &a);
    assert_int_equal(a.kind, SHM_ADMIT_TRIAL);
    assert_int_equal(a.trials, 1);
    assert_int_equal(a.need, 1);
    assert_int_equal(a.fail_stops, 0);
    assert_int_equal(a.from_ns, 100 + 10000 * MS);
    /* a breaker not closed: `trials` from until_ns, `successes` close it, a failure reopens */
    assert_true(eval(&br, 50, 3, 0));
    health_admission(&lc, &brc, BACKEND_UP, REASON_NONE, 0, &br, &a);
    assert_int_equal(a.kind, SHM_ADMIT_TRIAL);
    assert_int_equal(a.trials, 1);
    assert_int_equal(a.need, 2);
    assert_int_equal(a.fail_stops, 1);
    assert_int_equal(a.from_ns, 50 + 1000 * MS);
    assert_int_equal(a.max_fails, 0);
    /* half-open is the same admission: the trials admitted since until_ns go on counting */
    assert_true(eval(&br, 50 + 1000 * MS, 0, 0));
    health_admission(&lc, &brc, BACKEND_UP, REASON_NONE, 0, &br, &b);
    assert_true(health_admission_equal(&a, &b));
    /* both: the later start, the stricter limits */
    health_admission(&nochk, &brc, BACKEND_DOWN, REASON_PASSIVE, 100, &br, &a);
    assert_int_equal(a.kind, SHM_ADMIT_TRIAL);
    assert_int_equal(a.from_ns, 100 + 10000 * MS);
    assert_int_equal(a.need, 2);
    assert_int_equal(a.fail_stops, 1);
    health_admission(&lc, &brc, BACKEND_DOWN, REASON_CHECK_TIMEOUT, 100, &br, &a);
    assert_int_equal(a.kind, SHM_ADMIT_NONE);
    assert_false(health_admission_equal(&a, &b));
}

static void test_live_degraded(void **state)
{
    struct health_live_in in = {.st = BACKEND_UP};
    enum backend_state st;
    enum backend_reason why;

    in.check_us = 600000; /* slower than 500 ms */
    assert_true(health_live_eval(&lc, &in, 1, &st, &why));
    assert_int_equal(st, BACKEND_DEGRADED);
    assert_int_equal(why, REASON_CHECK_SLOW);
    in.st = BACKEND_DEGRADED;
    in.check_us = 450000; /* below the line but within the hysteresis band */
    assert_false(health_live_eval(&lc, &in, 2, &st, &why));
    in.check_us = 100000;
    assert_true(health_live_eval(&lc, &in, 3, &st, &why));
    assert_int_equal(st, BACKEND_UP);

    in.st = BACKEND_UP;
    in.window_ok = 7;
    in.window_failed = 2; /* 22% but only 9 requests: not enough to judge */
    assert_false(health_live_eval(&lc, &in, 4, &st, &why));
    in.window_ok = 70;
    in.window_failed = 20; /* 22% of 90 */
    assert_true(health_live_eval(&lc, &in, 5, &st, &why));
    assert_int_equal(why, REASON_ERROR_RATIO);
}

static void test_effective_weight(void **state)
{
    uint64_t up = 1000 * MS, ss = 10000 * MS;

    assert_int_equal(health_effective_weight(10, BACKEND_UP, 50, 0, 0, 5), 10);
    assert_int_equal(health_effective_weight(10, BACKEND_DEGRADED, 50, 0, 0, 5), 5);
    assert_int_equal(health_effective_weight(1, BACKEND_DEGRADED, 50, 0, 0, 5), 1);
    assert_int_equal(health_effective_weight(0, BACKEND_UP, 50, 0, 0, 5), 0);
    /* slow start: 1 at the start, half way at half time, full after */
    assert_int_equal(health_effective_weight(100, BACKEND_UP, 50, up, ss, up), 1);
    assert_int_equal(health_effective_weight(100, BACKEND_UP, 50, up, ss, up + 5000 * MS), 50);
    assert_int_equal(health_effective_weight(100, BACKEND_UP, 50, up, ss, up + ss), 100);
}

static void test_cadence(void **state)
{
    struct health_cadence_cfg c = {.inter_ns = 2000 * MS,
                                   .fastinter_ns = 500 * MS,
                                   .downinter_ns = 5000 * MS,
                                   .jitter_pct = 10};
    uint64_t lo = UINT64_MAX, hi = 0;

    assert_int_equal(health_next_check_ns(&c, BACKEND_UP, 0, 0), 1800 * MS);
    assert_int_equal(health_next_check_ns(&c, BACKEND_UP, 1, 0), 450 * MS);
    assert_int_equal(health_next_check_ns(&c, BACKEND_DOWN, 0, 0), 4500 * MS);
    for (uint64_t r = 0; r < 100000; r += 7) {
        uint64_t d = health_next_check_ns(&c, BACKEND_UP, 0, r * 2654435761ULL);

        lo = d < lo ? d : lo;
        hi = d > hi ? d : hi;
    }
    assert_true(lo >= 1800 * MS && hi <= 2200 * MS && hi - lo > 300 * MS);
    c.jitter_pct = 0;
    assert_int_equal(health_next_check_ns(&c, BACKEND_UP, 0, 12345), 2000 * MS);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_breaker_full_cycle),
        cmocka_unit_test(test_breaker_failed_trial_doubles_open_time),
        cmocka_unit_test(test_breaker_commands_and_off),
        cmocka_unit_test(test_live_passive_down_and_auth),
        cmocka_unit_test(test_live_checks_off_trial_recovery),
        cmocka_unit_test(test_live_trips),
        cmocka_unit_test(test_admission),
        cmocka_unit_test(test_live_degraded),
        cmocka_unit_test(test_effective_weight),
        cmocka_unit_test(test_cadence),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
