/* Unit tests of core/retry.c: the conditions an outcome carries, failure and retry decisions,
 * back-off with full jitter, and the pool-wide retry budget. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "core/retry.h"
#include "shm/shm.h"

static void pool_init(struct conf_pool *p)
{
    memset(p, 0, sizeof(*p));
    p->fail_on = COND_CONNECT | COND_TLS | COND_TIMEOUT | COND_RESET | COND_5XX;
    p->retry_on = COND_CONNECT | COND_TIMEOUT | COND_RESET | COND_5XX | COND_429;
    p->retry_backoff_base_ms = 25;
    p->retry_backoff_max_ms = 1000;
    p->retry_backoff_mult_x100 = 200;
}

static void test_retry_conditions(void **state)
{
    struct conf_pool p;
    pool_init(&p);
    assert_int_equal(retry_cond(UPSTREAM_ECONNECT, 0), COND_CONNECT);
    assert_int_equal(retry_cond(UPSTREAM_ETLS, 0), COND_TLS);
    assert_int_equal(retry_cond(UPSTREAM_ETIMEOUT, 0), COND_TIMEOUT);
    assert_int_equal(retry_cond(UPSTREAM_ERESET, 0), COND_RESET);
    assert_int_equal(retry_cond(UPSTREAM_ESTALE, 0), COND_STALE);
    assert_int_equal(retry_cond(UPSTREAM_EPROTO, 0), COND_RESET);
    assert_int_equal(retry_cond(UPSTREAM_ECLIENT, 0), 0);
    /* the gateway's own shortage is neither a backend failure nor worth a retry */
    assert_int_equal(retry_cond(UPSTREAM_ELOCAL, 0), 0);
    assert_int_equal(retry_cond(UPSTREAM_ENOMEM, 0), 0);
    assert_int_equal(retry_cond(UPSTREAM_OK, 503), COND_5XX);
    assert_int_equal(retry_cond(UPSTREAM_OK, 429), COND_429);
    assert_int_equal(retry_cond(UPSTREAM_OK, 404), 0);
    assert_int_equal(retry_cond(UPSTREAM_OK, 200), 0);

    /* failures: default set; a client's 4xx and a 429 are not */
    assert_true(retry_is_failure(&p, COND_5XX, 500));
    assert_true(retry_is_failure(&p, COND_TIMEOUT, 0));
    assert_false(retry_is_failure(&p, 0, 404));
    assert_false(retry_is_failure(&p, COND_429, 429));
    p.fail_on = COND_CONNECT;
    assert_false(retry_is_failure(&p, COND_5XX, 502));
    p.fail_on_status[p.n_fail_on_status++] = 502;
    assert_true(retry_is_failure(&p, COND_5XX, 502));
    assert_true(retry_is_failure(&p, 0, 502));
    assert_false(retry_is_failure(&p, COND_5XX, 503));

    /* a stale pooled connection is not the backend failing */
    assert_false(retry_is_failure(&p, COND_STALE, 0));

    /* retryable: retry_on bits and statuses */
    assert_true(retry_is_retryable(&p, COND_429, 429));
    assert_true(retry_is_retryable(&p, COND_CONNECT, 0));
    assert_false(retry_is_retryable(&p, 0, 404));
    p.retry_on = COND_5XX;
    assert_false(retry_is_retryable(&p, COND_RESET, 0));
    assert_false(retry_is_retryable(&p, COND_TIMEOUT, 0));
    /* the upstream cannot have seen the request: retried whatever retry_on says */
    assert_true(retry_is_retryable(&p, COND_CONNECT, 0));
    assert_true(retry_is_retryable(&p, COND_TLS, 0));
    assert_true(retry_is_retryable(&p, COND_STALE, 0));
    p.retry_on = COND_CONNECT;
    assert_false(retry_is_retryable(&p, COND_5XX, 503));
    p.retry_on_status[p.n_retry_on_status++] = 503;
    assert_true(retry_is_retryable(&p, COND_5XX, 503));
    assert_false(retry_is_retryable(&p, COND_5XX, 500));
}

static void test_retry_backoff(void **state)
{
    struct conf_pool p;
    pool_init(&p);
    /* cap = min(max, base x mult^(n-1)): 25, 50, 100, ... 800, 1000, 1000; rnd picks in [0, cap] */
    static const uint64_t caps[] = {25, 50, 100, 200, 400, 800, 1000, 1000};
    for (uint32_t n = 1; n <= 8; n++) {
        uint64_t cap = caps[n - 1];
        assert_int_equal(retry_backoff_ms(&p, n, cap), cap);
        assert_int_equal(retry_backoff_ms(&p, n, cap + 1), 0);
        assert_int_equal(retry_backoff_ms(&p, n, 2 * cap + 1), cap);
        assert_int_equal(retry_backoff_ms(&p, n, 7), 7 % (cap + 1));
    }
    /* x1.5 */
    p.retry_backoff_mult_x100 = 150;
    p.retry_backoff_base_ms = 100;
    assert_int_equal(retry_backoff_ms(&p, 3, 225), 225);
    assert_int_equal(retry_backoff_ms(&p, 3, 226), 0);
    /* 0..0: immediate */
    p.retry_backoff_base_ms = p.retry_backoff_max_ms = 0;
    assert_int_equal(retry_backoff_ms(&p, 1, 12345), 0);
    assert_int_equal(retry_backoff_ms(&p, 4, 12345), 0);
}

static void test_retry_budget(void **state)
{
    /* min 1/s over 10 s: 10 retries allowed with no requests at all */
    assert_true(retry_budget_allow(0, 9, 20, 1));
    assert_false(retry_budget_allow(0, 10, 20, 1));
    /* 20 % of 100 requests = 20 > 10 */
    assert_true(retry_budget_allow(100, 19, 20, 1));
    assert_false(retry_budget_allow(100, 20, 20, 1));
    /* 20 % of 30 = 6 < the floor of 10 */
    assert_true(retry_budget_allow(30, 9, 20, 1));
    assert_false(retry_budget_allow(30, 10, 20, 1));
    /* budget 0 with min 0: never; 100 %: as many retries as requests */
    assert_false(retry_budget_allow(50, 0, 0, 0));
    assert_true(retry_budget_allow(50, 49, 100, 0));
    assert_false(retry_budget_allow(50, 50, 100, 0));
}

/* The budget is pool-wide: what every worker counts in shm for the pool's backends, over the
 * last 10 s, decides (review M9: it was per worker, N workers had N times the floor). */
static void test_retry_budget_shm(void **state)
{
    struct shm shm;
    const uint64_t S = 1000000000ULL, t0 = 1000 * S;
    uint64_t req, ret;

    assert_int_equal(shm_create(&shm, 3, 2, 1), 0);
    /* pool A = backends 0..1, pool B = backend 2 */
    for (int i = 0; i < 5; i++) {
        shm_wb_budget_note(&shm, 0, 0, t0, 1);
        shm_wb_budget_note(&shm, 1, 1, t0 + S / 2, 1);
    }
    shm_wb_budget_note(&shm, 1, 2, t0, 1);
    for (int i = 0; i < 30; i++)
        shm_wb_budget_note(&shm, i % 2, (uint32_t)(i % 2), t0, 0);
    shm_budget_window(&shm, 0, 2, t0 + S, &req, &ret);
    assert_int_equal(req, 30);
    assert_int_equal(ret, 10);
    /* the floor of 1/s is spent by the two workers together */
    assert_false(retry_budget_allow(req, ret, 20, 1));
    /* pool B sees only its own */
    shm_budget_window(&shm, 2, 1, t0 + S, &req, &ret);
    assert_int_equal(ret, 1);
    assert_true(retry_budget_allow(req, ret, 20, 1));
    /* after 10 s the window has moved past it all */
    shm_budget_window(&shm, 0, 2, t0 + 11 * S, &req, &ret);
    assert_int_equal(req + ret, 0);
    shm_destroy(&shm);
}

/* The record stage: what a try's outcome counts as for its backend. */
static void test_retry_record(void **state)
{
    struct conf_pool p;
    pool_init(&p);
    /* heads: 429 cools (never a failure), 401/403 count against the key, 5xx fails */
    assert_int_equal(retry_record_head(&p, 429), RETRY_REC_COOL);
    assert_int_equal(retry_record_head(&p, 401), RETRY_REC_AUTH);
    assert_int_equal(retry_record_head(&p, 403), RETRY_REC_AUTH);
    assert_int_equal(retry_record_head(&p, 503), RETRY_REC_FAIL);
    assert_int_equal(retry_record_head(&p, 200), 0);
    assert_int_equal(retry_record_head(&p, 404), 0);
    /* fail_on_status: a listed status fails, a 401 then both */
    int st[] = {401, 404};
    memcpy(p.fail_on_status, st, sizeof(st));
    p.n_fail_on_status = 2;
    assert_int_equal(retry_record_head(&p, 404), RETRY_REC_FAIL);
    assert_int_equal(retry_record_head(&p, 401), RETRY_REC_AUTH | RETRY_REC_FAIL);
    /* without 5xx in fail_on a 503 says nothing against the backend */
    p.fail_on &= ~(uint32_t)COND_5XX;
    assert_int_equal(retry_record_head(&p, 503), 0);

    /* ends: a whole answer succeeds; a client that leaves mid-answer too, before it nothing */
    pool_init(&p);
    assert_int_equal(retry_record_end(&p, UPSTREAM_OK, 1), RETRY_REC_OK);
    assert_int_equal(retry_record_end(&p, UPSTREAM_ECLIENT, 1), RETRY_REC_OK);
    assert_int_equal(retry_record_end(&p, UPSTREAM_ECLIENT, 0), 0);
    /* an answer cut after its head went out fails, whatever fail_on says */
    assert_int_equal(retry_record_end(&p, UPSTREAM_ERESET, 1), RETRY_REC_FAIL);
    assert_int_equal(retry_record_end(&p, UPSTREAM_ELOCAL, 1), RETRY_REC_FAIL);
    /* before it: what fail_on counts (here not stale-conn); the gateway's own shortage never */
    assert_int_equal(retry_record_end(&p, UPSTREAM_ECONNECT, 0), RETRY_REC_FAIL);
    assert_int_equal(retry_record_end(&p, UPSTREAM_ETIMEOUT, 0), RETRY_REC_FAIL);
    assert_int_equal(retry_record_end(&p, UPSTREAM_ELOCAL, 0), 0);
    assert_int_equal(retry_record_end(&p, UPSTREAM_ENOMEM, 0), 0);
    assert_int_equal(retry_record_end(&p, UPSTREAM_ESTALE, 0), 0);
    p.fail_on = COND_CONNECT;
    assert_int_equal(retry_record_end(&p, UPSTREAM_ETIMEOUT, 0), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_retry_conditions), cmocka_unit_test(test_retry_backoff),
        cmocka_unit_test(test_retry_budget),     cmocka_unit_test(test_retry_budget_shm),
        cmocka_unit_test(test_retry_record),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
