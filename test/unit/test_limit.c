/* Unit tests of shm/limit.c: exact sliding windows (across processes too), Retry-After, token
 * reservations settled up and down, parallel slots and dead owners, budgets and their periods,
 * conservative merging, and a lock holder that dies. Includes the .c to reach its lock. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <errno.h>
#include <stdint.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "shm/limit.c"

#define W LIMIT_WINDOW_MS

/* 2026-03-15T23:00:00Z */
#define WALL_MAR15_23H 1773615600LL

struct fixture {
    struct limit_region *r;
    size_t size;
};

/* A region in MAP_SHARED memory (as in the segment), so forked children share it. */
static struct limit_region *region_new(const struct limit_spec *specs, uint32_t n, uint32_t owners,
                                       size_t *size)
{
    void *mem;

    *size = limit_region_size(n, specs, owners);
    mem = mmap(NULL, *size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(mem != MAP_FAILED);
    assert_int_equal(limit_region_init(mem, *size, n, specs, owners, WALL_MAR15_23H), 0);
    return mem;
}

static void region_free(struct limit_region *r, size_t size)
{
    munmap(r, size);
}

/* One admission against limiter 0 (owner 0); returns 0 or -EAGAIN. */
static int admit1(struct limit_region *r, uint64_t now, uint64_t tokens, uint64_t cost,
                  struct limit_ticket *t, struct limit_verdict *v)
{
    uint32_t id = 0;
    struct limit_ticket tt;
    struct limit_verdict vv;

    return limit_admit(r, &id, 1, now, WALL_MAR15_23H, tokens, cost, 0, t ? t : &tt, v ? v : &vv);
}

static void test_rpm_exact_and_sliding(void **state)
{
    struct limit_spec s = {.rpm = 100};
    struct limit_verdict v;
    size_t size;
    struct limit_region *r = region_new(&s, 1, 1, &size);

    /* A burst at t = 59.9 s: exactly 100, then nothing until t = 119.9 s. */
    for (int i = 0; i < 100; i++)
        assert_int_equal(admit1(r, 59900, 0, 0, NULL, &v), 0);
    assert_int_equal(v.req.remaining, 0);
    assert_int_equal(v.req.limit, 100);
    assert_int_equal(v.req.reset_ms, W);
    assert_int_equal(admit1(r, 60000, 0, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_REQUESTS);
    assert_int_equal(v.limiter, 0);
    assert_int_equal(v.retry_ms, 59900);
    assert_int_equal(admit1(r, 119899, 0, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.retry_ms, 1);
    for (int i = 0; i < 100; i++)
        assert_int_equal(admit1(r, 119900, 0, 0, NULL, &v), 0);
    assert_int_equal(admit1(r, 119900, 0, 0, NULL, &v), -EAGAIN);
    region_free(r, size);

    /* Not fixed buckets: 50 at 0 s, 50 at 30 s; at 60 s only the first 50 have left. */
    r = region_new(&s, 1, 1, &size);
    for (int i = 0; i < 50; i++)
        assert_int_equal(admit1(r, 0, 0, 0, NULL, &v), 0);
    for (int i = 0; i < 50; i++)
        assert_int_equal(admit1(r, 30000, 0, 0, NULL, &v), 0);
    assert_int_equal(admit1(r, 59999, 0, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.retry_ms, 1);
    for (int i = 0; i < 50; i++)
        assert_int_equal(admit1(r, 60000, 0, 0, NULL, &v), 0);
    assert_int_equal(v.req.remaining, 0);
    assert_int_equal(admit1(r, 60000, 0, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.retry_ms, 30000);
    region_free(r, size);
}

static void test_retry_after_exact(void **state)
{
    struct limit_spec s = {.rpm = 3, .tpm = 100};
    struct limit_verdict v;
    size_t size;
    struct limit_region *r = region_new(&s, 1, 1, &size);

    assert_int_equal(admit1(r, 1000, 40, 0, NULL, &v), 0);
    assert_int_equal(v.tok.remaining, 60);
    assert_int_equal(v.req.remaining, 2);
    assert_int_equal(admit1(r, 2000, 40, 0, NULL, &v), 0);
    /* 50 more tokens: 30 must leave, which the first admission does at 61 s. */
    assert_int_equal(admit1(r, 3000, 50, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_TOKENS);
    assert_int_equal(v.retry_ms, 61000 - 3000);
    /* 90: 70 must leave, the second one too (62 s). */
    assert_int_equal(admit1(r, 3000, 90, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.retry_ms, 62000 - 3000);
    assert_int_equal(v.tok.remaining, 20);
    assert_int_equal(v.tok.reset_ms, 62000 - 3000);
    /* More than the whole tpm: never. */
    assert_int_equal(admit1(r, 3000, 101, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.retry_ms, LIMIT_RETRY_NEVER);
    /* Requests and tokens both refuse: the longer wait is the answer. */
    assert_int_equal(admit1(r, 3000, 0, 0, NULL, &v), 0);
    assert_int_equal(admit1(r, 10000, 90, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.retry_ms, 62000 - 10000); /* requests alone: 61 s */
    assert_int_equal(v.dim, LIMIT_TOKENS);
    assert_int_equal(admit1(r, 10000, 0, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_REQUESTS);
    assert_int_equal(v.retry_ms, 61000 - 10000);
    region_free(r, size);
}

static void test_settle_tokens(void **state)
{
    struct limit_spec s = {.tpm = 100};
    struct limit_ticket t, t2;
    struct limit_verdict v;
    struct limit_info info;
    size_t size;
    struct limit_region *r = region_new(&s, 1, 1, &size);

    assert_int_equal(admit1(r, 0, 100, 0, &t, &v), 0);
    assert_int_equal(admit1(r, 1, 1, 0, NULL, &v), -EAGAIN);
    /* Corrected down to 10: 90 fit again. */
    limit_settle(r, &t, 2, WALL_MAR15_23H, 10, 0);
    assert_int_equal(t.n, 0);
    assert_int_equal(admit1(r, 3, 91, 0, NULL, &v), -EAGAIN);
    assert_int_equal(admit1(r, 3, 90, 0, &t2, &v), 0);
    /* Corrected up: the window holds the real figure. */
    limit_settle(r, &t2, 4, WALL_MAR15_23H, 95, 0);
    assert_int_equal(limit_info(r, 0, 5, WALL_MAR15_23H, &info), 0);
    assert_int_equal(info.tokens, 105);
    assert_int_equal(info.requests, 2);
    assert_int_equal(admit1(r, 5, 0, 0, NULL, &v), -EAGAIN);
    /* Settling twice does nothing. */
    limit_settle(r, &t2, 6, WALL_MAR15_23H, 0, 0);
    assert_int_equal(limit_info(r, 0, 6, WALL_MAR15_23H, &info), 0);
    assert_int_equal(info.tokens, 105);
    /* A settle after the admission left the window changes nothing. */
    assert_int_equal(admit1(r, W + 10, 50, 0, &t, &v), 0);
    limit_settle(r, &t, 2 * W + 10, WALL_MAR15_23H, 80, 0);
    assert_int_equal(limit_info(r, 0, 2 * W + 10, WALL_MAR15_23H, &info), 0);
    assert_int_equal(info.tokens, 0);
    region_free(r, size);
}

/* Each settlement corrects its own admission's entry, whether it is among the last few of the
 * log (looked at from the tail) or further back (searched by halves): 30 admissions of 1..30
 * tokens, settled to 0 newest first, then oldest first, each taking back exactly its own. */
static void test_settle_finds_its_entry(void **state)
{
    struct limit_spec s = {.rpm = 1000, .tpm = 100000};
    struct limit_ticket t[30];
    struct limit_verdict v;
    struct limit_info info;
    size_t size;
    struct limit_region *r = region_new(&s, 1, 1, &size);
    uint64_t sum = 0;
    static const int order[2][5] = {{29, 28, 27, 20, 21}, {0, 1, 2, 10, 15}};

    for (int i = 0; i < 30; i++) {
        assert_int_equal(admit1(r, (uint64_t)i, (uint64_t)i + 1, 0, &t[i], &v), 0);
        sum += (uint64_t)i + 1;
    }
    for (int k = 0; k < 2; k++) {
        for (int j = 0; j < 5; j++) {
            int i = order[k][j];
            limit_settle(r, &t[i], 40, WALL_MAR15_23H, 0, 0);
            sum -= (uint64_t)i + 1;
            assert_int_equal(limit_info(r, 0, 40, WALL_MAR15_23H, &info), 0);
            if (info.tokens != sum)
                fail_msg("after settling admission %d: %llu tokens, expected %llu", i,
                         (unsigned long long)info.tokens, (unsigned long long)sum);
        }
    }
    region_free(r, size);
}

static void test_all_or_nothing(void **state)
{
    struct limit_spec s[3] = {{.rpm = 10, .tpm = 1000}, {.rpm = 1}, {.max_parallel = 5}};
    uint32_t ids[3] = {2, 0, 1}, dup[3] = {0, 0, 0};
    struct limit_ticket t;
    struct limit_verdict v;
    struct limit_info info;
    size_t size;
    struct limit_region *r = region_new(s, 3, 2, &size);

    assert_int_equal(limit_admit(r, ids, 3, 0, WALL_MAR15_23H, 10, 0, 1, &t, &v), 0);
    assert_int_equal(t.n, 3);
    assert_int_equal(v.req.limit, 1); /* the most constraining one: nothing left of limiter 1 */
    assert_int_equal(v.req.remaining, 0);
    assert_int_equal(v.tok.limit, 1000);
    assert_int_equal(v.tok.remaining, 990);
    assert_int_equal(limit_admit(r, ids, 3, 10, WALL_MAR15_23H, 10, 0, 1, &t, &v), -EAGAIN);
    assert_int_equal(v.limiter, 1);
    assert_int_equal(v.dim, LIMIT_REQUESTS);
    assert_int_equal(t.n, 0);
    /* The refusal changed nothing in limiters 0 and 2. */
    assert_int_equal(limit_info(r, 0, 10, WALL_MAR15_23H, &info), 0);
    assert_int_equal(info.requests, 1);
    assert_int_equal(info.tokens, 10);
    assert_int_equal(limit_info(r, 2, 10, WALL_MAR15_23H, &info), 0);
    assert_int_equal(info.parallel, 1);
    /* The same limiter named three times counts once. */
    assert_int_equal(limit_admit(r, dup, 3, 10, WALL_MAR15_23H, 10, 0, 0, &t, &v), 0);
    assert_int_equal(t.n, 1);
    assert_int_equal(limit_info(r, 0, 10, WALL_MAR15_23H, &info), 0);
    assert_int_equal(info.requests, 2);
    /* Bad arguments. */
    ids[0] = 3;
    assert_int_equal(limit_admit(r, ids, 3, 10, WALL_MAR15_23H, 10, 0, 0, &t, &v), -EINVAL);
    assert_int_equal(limit_admit(r, dup, 3, 10, WALL_MAR15_23H, 10, 0, 2, &t, &v), -EINVAL);
    region_free(r, size);
}

static void test_parallel_release_owner(void **state)
{
    struct limit_spec s = {.max_parallel = 2, .budget_nano = 1000};
    uint32_t id = 0;
    struct limit_ticket t0, t1, t2;
    struct limit_verdict v;
    struct limit_info info;
    size_t size;
    struct limit_region *r = region_new(&s, 1, 3, &size);

    assert_int_equal(limit_admit(r, &id, 1, 0, WALL_MAR15_23H, 0, 300, 0, &t0, &v), 0);
    assert_int_equal(limit_admit(r, &id, 1, 0, WALL_MAR15_23H, 0, 300, 0, &t1, &v), 0);
    assert_int_equal(limit_admit(r, &id, 1, 0, WALL_MAR15_23H, 0, 300, 1, &t2, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_PARALLEL);
    assert_int_equal(v.retry_ms, LIMIT_PARALLEL_MS);
    /* Owner 0 dies: both its slots and its reservations come back. */
    limit_release_owner(r, 0);
    assert_int_equal(limit_info(r, 0, 0, WALL_MAR15_23H, &info), 0);
    assert_int_equal(info.parallel, 0);
    assert_int_equal(info.budget.reserved_nano, 0);
    assert_int_equal(info.budget.spent_nano, 0);
    assert_int_equal(limit_admit(r, &id, 1, 0, WALL_MAR15_23H, 0, 300, 1, &t2, &v), 0);
    /* A stale ticket of the dead owner gives back nothing of owner 1's. */
    limit_settle(r, &t0, 1, WALL_MAR15_23H, 0, 0);
    assert_int_equal(limit_info(r, 0, 0, WALL_MAR15_23H, &info), 0);
    assert_int_equal(info.parallel, 1);
    assert_int_equal(info.budget.reserved_nano, 300);
    assert_int_equal(limit_admit(r, &id, 1, 0, WALL_MAR15_23H, 0, 300, 2, &t0, &v), 0);
    assert_int_equal(limit_admit(r, &id, 1, 0, WALL_MAR15_23H, 0, 300, 2, &t1, &v), -EAGAIN);
    limit_settle(r, &t2, 1, WALL_MAR15_23H, 0, 100);
    limit_settle(r, &t0, 1, WALL_MAR15_23H, 0, 100);
    assert_int_equal(limit_info(r, 0, 0, WALL_MAR15_23H, &info), 0);
    assert_int_equal(info.parallel, 0);
    assert_int_equal(info.budget.reserved_nano, 0);
    assert_int_equal(info.budget.spent_nano, 200);
    region_free(r, size);
}

static void test_budget_periods(void **state)
{
    struct limit_spec s[3] = {{.budget_nano = 1000, .period = LIMIT_PERIOD_DAY},
                              {.budget_nano = 1000, .period = LIMIT_PERIOD_MONTH},
                              {.budget_nano = 1000, .period = LIMIT_PERIOD_TOTAL}};
    struct limit_ticket t, t2;
    struct limit_verdict v;
    struct limit_budget b;
    size_t size;
    struct limit_region *r = region_new(s, 3, 1, &size);
    int64_t wall = WALL_MAR15_23H;
    uint32_t id;

    /* Calendar arithmetic, UTC. */
    assert_int_equal(limit_period_start(LIMIT_PERIOD_DAY, wall), 1773532800LL);
    assert_int_equal(limit_period_next(LIMIT_PERIOD_DAY, 1773532800LL), 1773619200LL);
    assert_int_equal(limit_period_start(LIMIT_PERIOD_MONTH, wall), 1772323200LL); /* Mar 1 */
    assert_int_equal(limit_period_next(LIMIT_PERIOD_MONTH, 1772323200LL), 1775001600LL);
    assert_int_equal(limit_period_next(LIMIT_PERIOD_MONTH, 1796083200LL), 1798761600LL);
    assert_int_equal(limit_period_next(LIMIT_PERIOD_MONTH, 1798761600LL), 1801440000LL);
    assert_int_equal(limit_period_start(LIMIT_PERIOD_MONTH, 1801439999LL), 1798761600LL);
    assert_true(limit_period_next(LIMIT_PERIOD_TOTAL, 0) == INT64_MAX);

    for (id = 0; id < 3; id++) {
        /* Two reservations of 600 cannot both be in flight within 1000. */
        assert_int_equal(limit_admit(r, &id, 1, 0, wall, 0, 600, 0, &t, &v), 0);
        assert_int_equal(limit_admit(r, &id, 1, 0, wall, 0, 600, 0, &t2, &v), -EAGAIN);
        assert_int_equal(v.dim, LIMIT_BUDGET);
        limit_settle(r, &t, 0, wall, 0, 700);
        /* 700 spent: 300 is left, 301 does not fit. */
        assert_int_equal(limit_admit(r, &id, 1, 0, wall, 0, 301, 0, &t2, &v), -EAGAIN);
        assert_int_equal(v.dim, LIMIT_BUDGET);
        assert_int_equal(limit_budget_get(r, id, &b), 0);
        assert_int_equal(b.spent_nano, 700);
    }
    /* day: the next period starts at midnight, an hour away. */
    id = 0;
    assert_int_equal(limit_admit(r, &id, 1, 0, wall, 0, 301, 0, &t, &v), -EAGAIN);
    assert_int_equal(v.retry_ms, 3600 * 1000);
    assert_int_equal(limit_admit(r, &id, 1, 0, wall + 3599, 0, 301, 0, &t, &v), -EAGAIN);
    assert_int_equal(v.retry_ms, 1000);
    assert_int_equal(limit_admit(r, &id, 1, 0, wall + 3600, 0, 301, 0, &t, &v), 0);
    assert_int_equal(limit_budget_get(r, id, &b), 0);
    assert_int_equal(b.spent_nano, 0);
    assert_int_equal(b.period_start, 1773619200LL);
    /* month: not at midnight, at April 1st. */
    id = 1;
    assert_int_equal(limit_admit(r, &id, 1, 0, wall + 3600, 0, 301, 0, &t, &v), -EAGAIN);
    assert_int_equal(v.retry_ms, (1775001600LL - wall - 3600) * 1000);
    assert_int_equal(limit_admit(r, &id, 1, 0, 1775001600LL, 0, 301, 0, &t, &v), 0);
    /* total: never. */
    id = 2;
    assert_int_equal(limit_admit(r, &id, 1, 0, wall + 86400 * 400, 0, 301, 0, &t, &v), -EAGAIN);
    assert_int_equal(v.retry_ms, LIMIT_RETRY_NEVER);
    /* budget_set: the same kind keeps spent; a past period rolls over. */
    enum limit_budget_fate fate = LIMIT_BUDGET_DROPPED;
    b.period = LIMIT_PERIOD_DAY;
    b.period_start = 1773532800LL;
    b.spent_nano = 999;
    assert_int_equal(limit_budget_set(r, 0, &b, &fate), 0);
    assert_int_equal(fate, LIMIT_BUDGET_SAME);
    id = 0;
    assert_int_equal(limit_admit(r, &id, 1, 0, 1773532800LL + 5, 0, 2, 0, &t, &v), -EAGAIN);
    assert_int_equal(limit_admit(r, &id, 1, 0, 1773619200LL, 0, 2, 0, &t, &v), 0);
    region_free(r, size);
}

/* budget_period changed between the save and the start: spent is carried into a period that
 * holds the saved one whole (day -> month, anything -> total), else the period starts at 0. */
static void test_budget_set_period_change(void **state)
{
    struct limit_spec s[3] = {{.budget_nano = 1000, .period = LIMIT_PERIOD_DAY},
                              {.budget_nano = 1000, .period = LIMIT_PERIOD_MONTH},
                              {.budget_nano = 1000, .period = LIMIT_PERIOD_TOTAL}};
    struct limit_ticket t;
    struct limit_verdict v;
    struct limit_budget b;
    enum limit_budget_fate fate;
    size_t size;
    struct limit_region *r = region_new(s, 3, 1, &size);
    int64_t wall = WALL_MAR15_23H; /* Mar 15 23:00 */
    uint32_t id;

    /* day (Mar 15) -> month: carried into March. */
    b = (struct limit_budget){LIMIT_PERIOD_DAY, 1773532800LL, 900, 0};
    assert_int_equal(limit_budget_set(r, 1, &b, &fate), 0);
    assert_int_equal(fate, LIMIT_BUDGET_CARRIED);
    assert_int_equal(limit_budget_get(r, 1, &b), 0);
    assert_int_equal(b.spent_nano, 900);
    assert_int_equal(b.period_start, 1772323200LL); /* Mar 1 */
    id = 1;
    assert_int_equal(limit_admit(r, &id, 1, 0, wall, 0, 101, 0, &t, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_BUDGET);
    /* month -> total and day -> total: carried. */
    b = (struct limit_budget){LIMIT_PERIOD_MONTH, 1772323200LL, 800, 0};
    assert_int_equal(limit_budget_set(r, 2, &b, &fate), 0);
    assert_int_equal(fate, LIMIT_BUDGET_CARRIED);
    assert_int_equal(limit_budget_get(r, 2, &b), 0);
    assert_int_equal(b.spent_nano, 800);
    assert_int_equal(b.period_start, 0);
    b = (struct limit_budget){LIMIT_PERIOD_DAY, 1773532800LL, 700, 0};
    assert_int_equal(limit_budget_set(r, 2, &b, &fate), 0);
    assert_int_equal(fate, LIMIT_BUDGET_CARRIED);
    assert_int_equal(limit_budget_get(r, 2, &b), 0);
    assert_int_equal(b.spent_nano, 700);
    /* month -> day, total -> month, total -> day: dropped, the current period starts at 0. */
    b = (struct limit_budget){LIMIT_PERIOD_MONTH, 1772323200LL, 600, 0};
    assert_int_equal(limit_budget_set(r, 0, &b, &fate), 0);
    assert_int_equal(fate, LIMIT_BUDGET_DROPPED);
    assert_int_equal(limit_budget_get(r, 0, &b), 0);
    assert_int_equal(b.spent_nano, 0);
    assert_int_equal(b.period_start, 1773532800LL); /* today, from init */
    b = (struct limit_budget){LIMIT_PERIOD_TOTAL, 0, 500, 0};
    assert_int_equal(limit_budget_set(r, 1, &b, &fate), 0);
    assert_int_equal(fate, LIMIT_BUDGET_DROPPED);
    assert_int_equal(limit_budget_get(r, 1, &b), 0);
    assert_int_equal(b.spent_nano, 0);
    b = (struct limit_budget){LIMIT_PERIOD_TOTAL, 0, 500, 0};
    assert_int_equal(limit_budget_set(r, 0, &b, NULL), 0);
    assert_int_equal(limit_budget_get(r, 0, &b), 0);
    assert_int_equal(b.spent_nano, 0);
    /* a bad period */
    b.period = (enum limit_period)7;
    assert_int_equal(limit_budget_set(r, 0, &b, &fate), -EINVAL);
    region_free(r, size);
}

/* A worker stopped while it holds a limiter's lock: the master's readers give up after
 * LIMIT_MASTER_WAIT_MS with -EBUSY instead of hanging, and get it again once it is gone. */
static void test_master_bounded_wait(void **state)
{
    struct limit_spec s = {.rpm = 10, .max_parallel = 5, .budget_nano = 1000};
    struct limit_info info;
    struct limit_budget b;
    size_t size, so;
    struct limit_region *r = region_new(&s, 1, 2, &size), *o = region_new(&s, 1, 1, &so);
    struct limit_carry c = {.from = 0, .to = 0};
    struct timespec t0, t1;
    pid_t pid;
    int st;

    assert_int_equal(admit1(r, 0, 3, 0, NULL, NULL), 0); /* owner 0 holds a parallel slot */
    assert_int_equal(admit1(o, 0, 0, 0, NULL, NULL), 0);
    assert_int_equal(limit_carry_sync(r, o, 1, &c, 1), 0); /* owner 1: the old one's slot */
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* not left stopped if the test dies */
        cell_lock(r, 0);
        raise(SIGSTOP);
        _exit(0);
    }
    assert_int_equal(waitpid(pid, &st, WUNTRACED), pid);
    assert_true(WIFSTOPPED(st));
    alarm(10); /* without the bound, the reader would hang: die instead of passing */
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(limit_info(r, 0, 1, WALL_MAR15_23H, &info), -EBUSY);
    assert_int_equal(info.spec.rpm, 10); /* the spec is still there, the counts are 0 */
    assert_int_equal(info.requests, 0);
    assert_int_equal(limit_budget_get(r, 0, &b), -EBUSY);
    /* a reaped worker's shares and a reload's carry wait as long, and are kept for later */
    assert_int_equal(limit_release_owner(r, 0), -EBUSY);
    assert_int_equal(limit_carry_sync(r, o, 1, &c, 2), -EBUSY);
    assert_int_equal(limit_carry_end(r, 1, &c), -EBUSY);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    alarm(0);
    int64_t ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
    assert_true(ms >= 5 * (int64_t)LIMIT_MASTER_WAIT_MS - 5 && ms < 2000);
    assert_int_equal(owner_of(r, 0, 0)->parallel, 1);
    assert_int_equal(owner_of(r, 0, 1)->parallel, 1);
    /* it goes on and dies with the lock held: the next reader repairs and reads */
    kill(pid, SIGKILL);
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_int_equal(limit_info(r, 0, 1, WALL_MAR15_23H, &info), 0);
    assert_int_equal(info.requests, 2); /* its own, and the one carried */
    assert_int_equal(limit_budget_get(r, 0, &b), 0);
    assert_int_equal(info.parallel, 2);
    assert_int_equal(limit_release_owner(r, 0), 0);
    assert_int_equal(limit_carry_end(r, 1, &c), 0);
    assert_int_equal(limit_info(r, 0, 1, WALL_MAR15_23H, &info), 0);
    assert_int_equal(info.parallel, 0);
    region_free(r, size);
    region_free(o, so);
}

/* The same arrivals admitted by an exact reference that keeps every admission. */
static uint32_t merge_ideal(const struct limit_spec *s, uint32_t steps, uint64_t tokmax,
                            uint32_t step_ms)
{
    uint64_t *at = calloc(steps, sizeof(*at)), *tk = calloc(steps, sizeof(*tk));
    uint32_t n = 0, first = 0;
    uint64_t now = 0;

    srandom(7);
    for (uint32_t i = 0; i < steps; i++) {
        uint64_t tokens = tokmax ? (uint64_t)random() % tokmax : 0, win_req = 0, win_tok = 0;

        now += (uint64_t)random() % step_ms;
        while (first < n && at[first] + W <= now)
            first++;
        for (uint32_t k = first; k < n; k++)
            win_req++, win_tok += tk[k];
        if ((!s->rpm || win_req + 1 <= s->rpm) && (!s->tpm || win_tok + tokens <= s->tpm)) {
            at[n] = now;
            tk[n++] = tokens;
        }
    }
    free(at);
    free(tk);
    return n;
}

/* Admissions checked against the windows of what was admitted, kept in full: a merged log may
 * refuse what an exact one would admit, never the other way round; and it stays close. */
static void merge_run(const struct limit_spec *s, uint32_t steps, uint64_t tokmax, uint32_t step_ms)
{
    size_t size;
    struct limit_region *r = region_new(s, 1, 1, &size);
    uint64_t *at = calloc(steps, sizeof(*at)), *tk = calloc(steps, sizeof(*tk));
    uint32_t n = 0, first = 0, ideal = merge_ideal(s, steps, tokmax, step_ms);
    uint64_t now = 0;

    srandom(7);
    for (uint32_t i = 0; i < steps; i++) {
        uint64_t tokens = tokmax ? (uint64_t)random() % tokmax : 0, win_req = 0, win_tok = 0;
        struct limit_verdict v;

        now += (uint64_t)random() % step_ms;
        while (first < n && at[first] + W <= now)
            first++;
        for (uint32_t k = first; k < n; k++)
            win_req++, win_tok += tk[k];
        if (admit1(r, now, tokens, 0, NULL, &v) == 0) {
            if (s->rpm)
                assert_true(win_req + 1 <= s->rpm);
            if (s->tpm)
                assert_true(win_tok + tokens <= s->tpm);
            at[n] = now;
            tk[n++] = tokens;
        }
    }
    /* Close to exact: the merges cost a few per cent of the admissions at most. */
    print_message("merge: %u admitted of %u arrivals, exact: %u\n", n, steps, ideal);
    assert_true(ideal < steps);
    assert_true(n >= ideal - ideal / 20);
    free(at);
    free(tk);
    region_free(r, size);
}

static void test_merge_conservative(void **state)
{
    struct limit_spec rpm = {.rpm = 20000}; /* more than LIMIT_LOG_MAX entries */
    struct limit_spec tpm = {.tpm = 30000}; /* LIMIT_LOG_DEFAULT entries */

    merge_run(&rpm, 80000, 0, 3);
    merge_run(&tpm, 30000, 20, 20);
}

/* ---- across processes ------------------------------------------------------------------------ */

struct race {
    _Atomic uint32_t admitted;
    _Atomic uint32_t go;
};

static void hammer(struct limit_region *r, struct race *rc, uint32_t owner, uint32_t tries,
                   uint64_t tokens, int settle_to)
{
    while (!atomic_load(&rc->go))
        ;
    for (uint32_t i = 0; i < tries; i++) {
        struct limit_ticket t;
        struct limit_verdict v;
        uint32_t id = 0;

        if (limit_admit(r, &id, 1, 1000, WALL_MAR15_23H, tokens, 0, owner, &t, &v) == 0) {
            atomic_fetch_add(&rc->admitted, 1);
            if (settle_to >= 0)
                limit_settle(r, &t, 1000, WALL_MAR15_23H, (uint64_t)settle_to, 0);
        }
    }
}

static uint32_t race_run(struct limit_region *r, uint64_t tokens, int settle_to)
{
    struct race *rc =
        mmap(NULL, sizeof(*rc), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    pid_t pids[4];
    uint32_t n;

    assert_true(rc != MAP_FAILED);
    for (uint32_t w = 0; w < 4; w++) {
        pids[w] = fork();
        assert_true(pids[w] >= 0);
        if (pids[w] == 0) {
            hammer(r, rc, w, 400, tokens, settle_to);
            _exit(0);
        }
    }
    atomic_store(&rc->go, 1);
    for (uint32_t w = 0; w < 4; w++) {
        int st;

        assert_int_equal(waitpid(pids[w], &st, 0), pids[w]);
        assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    n = atomic_load(&rc->admitted);
    munmap(rc, sizeof(*rc));
    return n;
}

static void test_processes_exact(void **state)
{
    struct limit_spec s = {.rpm = 100}, st = {.tpm = 1000};
    struct limit_info info;
    size_t size;
    struct limit_region *r = region_new(&s, 1, 4, &size);
    uint32_t n;

    /* 4 processes, 1600 attempts in the same minute: exactly 100. */
    assert_int_equal(race_run(r, 0, -1), 100);
    assert_int_equal(limit_info(r, 0, 1000, WALL_MAR15_23H, &info), 0);
    assert_int_equal(info.requests, 100);
    region_free(r, size);

    /* tpm: reservations of 30 held by everyone at once never pass 1000 together. */
    r = region_new(&st, 1, 4, &size);
    assert_int_equal(race_run(r, 30, -1), 33);
    region_free(r, size);

    /* Settled down to 10 as they end: more get in, still within 1000 once settled. */
    r = region_new(&st, 1, 4, &size);
    n = race_run(r, 100, 10);
    assert_true(n > 10 && n <= 100);
    assert_int_equal(limit_info(r, 0, 1000, WALL_MAR15_23H, &info), 0);
    assert_int_equal(info.tokens, 10 * n);
    assert_int_equal(info.parallel, 0);
    while (admit1(r, 1000, 100, 0, NULL, NULL) == 0)
        n++;
    assert_int_equal(n, 91); /* 90 settled at 10, and one more reservation of 100 */
    region_free(r, size);
}

static void test_dead_lock_holder(void **state)
{
    struct limit_spec s = {.rpm = 10, .max_parallel = 1};
    struct limit_verdict v;
    struct limit_info info;
    size_t size;
    struct limit_region *r = region_new(&s, 1, 2, &size);
    pid_t pid;
    int st;

    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct limit_ticket t;
        uint32_t id = 0;

        /* Owner 1 admits, then dies holding the lock in the middle of a change. */
        if (limit_admit(r, &id, 1, 0, WALL_MAR15_23H, 5, 0, 1, &t, &v) != 0)
            _exit(1);
        cell_lock(r, 0);
        cell(r, 0)->sum_req = 77;
        cell(r, 0)->parallel = 9;
        _exit(0);
    }
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    /* The next taker repairs it from the log and the owners' shares. */
    assert_int_equal(limit_info(r, 0, 1, WALL_MAR15_23H, &info), 0);
    assert_int_equal(info.requests, 1);
    assert_int_equal(info.tokens, 5);
    assert_int_equal(info.parallel, 1);
    assert_int_equal(admit1(r, 1, 0, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_PARALLEL);
    /* The master reaps owner 1: its slot comes back. */
    limit_release_owner(r, 1);
    assert_int_equal(admit1(r, 1, 0, 0, NULL, &v), 0);
    assert_int_equal(v.req.remaining, 8);
    region_free(r, size);
}

/* Reload: the new region sees the old one's window (at its times), its later admissions, its
 * in-flight parallel slots until they end, and what it spent. */
static void test_carry(void **state)
{
    struct limit_spec s = {.rpm = 10, .max_parallel = 20, .budget_nano = 1000};
    struct limit_ticket t1, t2;
    struct limit_verdict v;
    struct limit_carry c = {.from = 0, .to = 0};
    struct limit_info in;
    size_t so, sn;
    struct limit_region *o = region_new(&s, 1, 1, &so), *n = region_new(&s, 1, 2, &sn);

    (void)state;
    for (int i = 0; i < 4; i++)
        assert_int_equal(admit1(o, 1000 + (uint64_t)i, 0, 0, NULL, NULL), 0);
    assert_int_equal(admit1(o, 2000, 0, 100, &t1, &v), 0); /* in flight */
    assert_int_equal(limit_carry_sync(n, o, 1, &c, 3000), 0);
    assert_int_equal(limit_info(n, 0, 3000, WALL_MAR15_23H, &in), 0);
    assert_int_equal(in.requests, 5);
    assert_int_equal(in.parallel, 5); /* admit1 without a ticket never settles */
    assert_int_equal(in.budget.reserved_nano, 100);
    /* the old one admits once more while it drains, and its first request ends */
    assert_int_equal(admit1(o, 3500, 0, 0, &t2, &v), 0);
    limit_settle(o, &t1, 3600, WALL_MAR15_23H, 0, 40);
    assert_int_equal(limit_carry_sync(n, o, 1, &c, 4000), 0);
    assert_int_equal(limit_info(n, 0, 4000, WALL_MAR15_23H, &in), 0);
    assert_int_equal(in.requests, 6);
    assert_int_equal(in.parallel, 5); /* t1 ended, t2 came */
    assert_int_equal(in.budget.spent_nano, 40);
    assert_int_equal(in.budget.reserved_nano, 0);
    /* 4 more fit in the new one (10 in the window), not 5 */
    for (int i = 0; i < 4; i++)
        assert_int_equal(admit1(n, 5000, 0, 0, NULL, NULL), 0);
    assert_int_equal(admit1(n, 5000, 0, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_REQUESTS);
    /* the carried admissions leave the window at their own times */
    assert_int_equal(admit1(n, 61000 + 1, 0, 0, NULL, NULL), 0);
    assert_int_equal(limit_carry_end(n, 1, &c), 0);
    assert_int_equal(limit_info(n, 0, 61001, WALL_MAR15_23H, &in), 0);
    assert_int_equal(in.parallel, 5); /* the new ones' own, never settled here */
    region_free(o, so);
    region_free(n, sn);
}

static void test_region_args(void **state)
{
    struct limit_spec s = {.rpm = 1};
    size_t size = limit_region_size(1, &s, 1);
    void *mem = aligned_alloc(64, size);

    assert_true(size % 64 == 0);
    assert_int_equal(limit_region_init(mem, size - 1, 1, &s, 1, 0), -EINVAL);
    assert_int_equal(limit_region_init(mem, size, 1, &s, 0, 0), -EINVAL);
    assert_int_equal(limit_region_init((char *)mem + 8, size, 1, &s, 1, 0), -EINVAL);
    assert_int_equal(limit_region_init(mem, size, 1, &s, 1, 0), 0);
    assert_int_equal(limit_region_count(mem), 1);
    free(mem);
    {
        enum limit_period p;

        assert_int_equal(limit_period_parse("day", &p), 0);
        assert_int_equal(p, LIMIT_PERIOD_DAY);
        assert_int_equal(limit_period_parse("week", &p), -EINVAL);
        assert_string_equal(limit_dim_str(LIMIT_BUDGET), "budget");
    }
}

static int lease_grant1(struct limit_region *r, int64_t req, int64_t tok, uint32_t par,
                        uint64_t until, int64_t low_req, int64_t low_tok)
{
    struct limit_grant g = {.add_req = req,
                            .add_tok = tok,
                            .par = par,
                            .until_ms = until,
                            .low_req = low_req,
                            .low_tok = low_tok};

    return limit_lease_grant(r, 0, &g);
}

/* [cluster]: a leased limiter admits only what its lease holds, until the lease ends, counts what
 * was used for the next renewal, raises hungry when low or refused, and its fallbacks. */
static void test_lease(void **state)
{
    struct limit_spec s = {.rpm = 100, .tpm = 10000, .leased = 1, .lease_retry_ms = 200};
    struct limit_ticket t;
    struct limit_verdict v;
    struct limit_lease l;
    size_t size;
    struct limit_region *r = region_new(&s, 1, 1, &size);

    /* no lease yet: refused with the short Retry-After, hungry raised */
    assert_int_equal(admit1(r, 1000, 10, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_REQUESTS);
    assert_int_equal(v.retry_ms, 200);
    /* the lease's refusal (/metrics tells it apart); the fleet counted nothing at the last
     * renewal (none yet): a top-up may come, the request may wait for it (2) */
    assert_int_equal(v.lease, 2);
    assert_int_equal(limit_lease_hungry(r, 0), 1);
    assert_int_equal(limit_lease_hungry(r, 0), 0);
    {
        /* the fleet at its rpm at the last renewal: nothing to wait for (1) */
        struct limit_grant g = {.until_ms = 5000, .fleet_req = 100, .fleet_tok = 10};
        assert_int_equal(limit_lease_grant(r, 0, &g), 0);
        assert_int_equal(admit1(r, 1000, 10, 0, NULL, &v), -EAGAIN);
        assert_int_equal(v.lease, 1);
        g.fleet_req = 99; /* room for one: worth waiting for */
        assert_int_equal(limit_lease_grant(r, 0, &g), 0);
        assert_int_equal(admit1(r, 1000, 10, 0, NULL, &v), -EAGAIN);
        assert_int_equal(v.lease, 2);
        g.fleet_req = 0;
        assert_int_equal(limit_lease_grant(r, 0, &g), 0);
        limit_lease_hungry(r, 0);
    }

    /* 3 requests and 100 tokens, until t = 5 s; low-water 2 requests */
    assert_int_equal(lease_grant1(r, 3, 100, 0, 5000, 2, 0), 0);
    assert_int_equal(admit1(r, 1000, 40, 0, &t, &v), 0);
    assert_int_equal(limit_lease_hungry(r, 0), 0);    /* 2 left: not below the low-water */
    limit_settle(r, &t, 1100, WALL_MAR15_23H, 50, 0); /* 10 more than reserved: a debt */
    assert_int_equal(admit1(r, 1200, 40, 0, NULL, &v), 0);
    assert_int_equal(limit_lease_hungry(r, 0), 1);               /* 1 left */
    assert_int_equal(admit1(r, 1300, 40, 0, NULL, &v), -EAGAIN); /* 100-50-40 = 10 tokens */
    assert_int_equal(v.dim, LIMIT_TOKENS);
    assert_int_equal(v.retry_ms, 200);
    assert_int_equal(limit_lease_take(r, 0, 0, INT64_MAX, INT64_MAX, UINT32_MAX, &l), 0);
    assert_int_equal(l.req, 1);
    assert_int_equal(l.tok, 10);
    assert_int_equal(l.used_req, 2);
    assert_int_equal(l.used_tok, 90);
    assert_int_equal(l.need_tok, 40);
    assert_int_equal(l.win_req, 2);
    assert_int_equal(l.win_tok, 90);
    /* the counts restart with each take; the rest of the lease stays */
    assert_int_equal(limit_lease_take(r, 0, 0, INT64_MAX, INT64_MAX, UINT32_MAX, &l), 0);
    assert_int_equal(l.used_req, 0);
    assert_int_equal(l.need_tok, 0);
    assert_int_equal(l.req, 1);
    assert_int_equal(admit1(r, 1400, 5, 0, NULL, &v), 0);
    assert_int_equal(admit1(r, 1500, 5, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_REQUESTS);

    /* a lease past its end is not used */
    assert_int_equal(lease_grant1(r, 10, 1000, 0, 5000, 0, 0), 0);
    assert_int_equal(admit1(r, 4999, 5, 0, NULL, &v), 0);
    assert_int_equal(admit1(r, 5000, 5, 0, NULL, &v), -EAGAIN);
    /* cut to what is kept, then given back whole: the used counts reported once */
    assert_int_equal(limit_lease_take(r, 0, 0, 8, 400, 0, &l), 0);
    assert_int_equal(l.req, 9);
    assert_int_equal(l.tok, 1000);
    assert_int_equal(l.used_req, 2);
    assert_int_equal(l.used_tok, 10);
    assert_int_equal(limit_lease_take(r, 0, 0, 0, 0, 0, &l), 0);
    assert_int_equal(l.req, 8);
    assert_int_equal(l.tok, 400);
    assert_int_equal(l.used_req, 0);
    assert_int_equal(limit_lease_get(r, 0, &l), 0);
    assert_int_equal(l.req, 0);
    assert_int_equal(l.tok, 0);

    /* fallbacks: share caps this host's window (4 admitted so far), open lets the local limits
     * decide, closed refuses for good; the used counts go on */
    assert_int_equal(limit_lease_fallback(r, 0, LIMIT_FALLBACK_SHARE, 6, 10000, 0, 0), 0);
    assert_int_equal(admit1(r, 6000, 5, 0, NULL, &v), 0);
    assert_int_equal(admit1(r, 6000, 5, 0, NULL, &v), 0);
    assert_int_equal(admit1(r, 6000, 5, 0, NULL, &v), -EAGAIN);
    assert_int_equal(limit_lease_fallback(r, 0, LIMIT_FALLBACK_OPEN, 0, 0, 0, 0), 0);
    assert_int_equal(admit1(r, 6000, 5, 0, NULL, &v), 0);
    assert_int_equal(limit_lease_fallback(r, 0, LIMIT_FALLBACK_CLOSED, 0, 0, 0, 0), 0);
    assert_int_equal(admit1(r, 6000, 5, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_FLEET);
    assert_int_equal(v.retry_ms, 200);
    assert_int_equal(limit_lease_take(r, 0, 0, 0, 0, 0, &l), 0);
    assert_int_equal(l.used_req, 3);
    assert_int_equal(l.fallback, LIMIT_FALLBACK_CLOSED);
    /* a grant ends the fallback */
    assert_int_equal(lease_grant1(r, 1, 100, 0, 9000, 0, 0), 0);
    assert_int_equal(admit1(r, 6000, 5, 0, NULL, &v), 0);
    region_free(r, size);

    /* parallel slots: the lease's, cut to what is in flight at most */
    s = (struct limit_spec){.max_parallel = 5, .leased = 1, .lease_retry_ms = 100};
    r = region_new(&s, 1, 1, &size);
    assert_int_equal(lease_grant1(r, 0, 0, 2, 5000, 0, 0), 0);
    {
        struct limit_ticket t2;

        assert_int_equal(admit1(r, 1000, 0, 0, &t, &v), 0);
        assert_int_equal(admit1(r, 1000, 0, 0, &t2, &v), 0);
        assert_int_equal(admit1(r, 1000, 0, 0, NULL, &v), -EAGAIN);
        assert_int_equal(v.dim, LIMIT_PARALLEL);
        assert_int_equal(v.retry_ms, 100);
        assert_int_equal(limit_lease_take(r, 0, 0, INT64_MAX, INT64_MAX, 0, &l), 0);
        assert_int_equal(l.par, 2);
        assert_int_equal(l.parallel, 2);
        assert_int_equal(limit_lease_get(r, 0, &l), 0);
        assert_int_equal(l.par, 2); /* not below what is in flight */
        limit_settle(r, &t2, 1100, WALL_MAR15_23H, 0, 0);
        assert_int_equal(limit_lease_take(r, 0, 0, INT64_MAX, INT64_MAX, 0, &l), 0);
        assert_int_equal(limit_lease_get(r, 0, &l), 0);
        assert_int_equal(l.par, 1);
        assert_int_equal(admit1(r, 1200, 0, 0, NULL, &v), -EAGAIN);
        limit_settle(r, &t, 1300, WALL_MAR15_23H, 0, 0);
    }
    region_free(r, size);

    /* a budget lease: reservations drawn, the settled cost reported as spent, the rest back */
    s = (struct limit_spec){.budget_nano = 1000, .leased = 1, .lease_retry_ms = 100};
    r = region_new(&s, 1, 1, &size);
    assert_int_equal(admit1(r, 1000, 0, 100, NULL, &v), -EAGAIN); /* no lease yet */
    assert_int_equal(v.dim, LIMIT_FLEET_WAIT);
    assert_int_equal(v.retry_ms, 100);
    assert_int_equal(limit_lease_hungry(r, 0), 1);
    assert_int_equal(limit_lease_grant_budget(r, 0, 250, 5000, 0), 0);
    assert_int_equal(admit1(r, 1000, 0, 100, &t, &v), 0);
    assert_int_equal(admit1(r, 1000, 0, 200, NULL, &v), -EAGAIN); /* 150 left */
    assert_int_equal(v.dim, LIMIT_FLEET_WAIT);
    /* the fleet's budget spent (as of the last renewal): the quota is gone */
    assert_int_equal(limit_lease_grant_budget(r, 0, 0, 5000, 900), 0);
    assert_int_equal(admit1(r, 1000, 0, 200, NULL, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_BUDGET);
    limit_settle(r, &t, 1100, WALL_MAR15_23H, 0, 60);
    assert_int_equal(limit_lease_take_budget(r, 0, WALL_MAR15_23H, INT64_MAX, &l), 0);
    assert_int_equal(l.nano, 190);
    assert_int_equal(l.used_nano, 60);
    assert_int_equal(l.need_nano, 200);
    assert_int_equal(limit_lease_take_budget(r, 0, WALL_MAR15_23H, 50, &l), 0);
    assert_int_equal(l.used_nano, 0);
    assert_int_equal(limit_lease_get(r, 0, &l), 0);
    assert_int_equal(l.nano, 50);
    /* share: this host's own spent against its cap */
    assert_int_equal(limit_lease_fallback(r, 0, LIMIT_FALLBACK_SHARE, 0, 0, 0, 100), 0);
    assert_int_equal(admit1(r, 1200, 0, 40, NULL, &v), 0); /* 60 spent + 40 */
    assert_int_equal(admit1(r, 1200, 0, 1, NULL, &v), -EAGAIN);
    region_free(r, size);

    /* a refusal by the limit itself is not the lease's */
    s = (struct limit_spec){.rpm = 1, .leased = 1, .lease_retry_ms = 100};
    r = region_new(&s, 1, 1, &size);
    assert_int_equal(lease_grant1(r, 5, 0, 0, 5000, 0, 0), 0);
    assert_int_equal(admit1(r, 1000, 0, 0, NULL, &v), 0);
    assert_int_equal(admit1(r, 1000, 0, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_REQUESTS);
    assert_int_equal(v.lease, 0);
    region_free(r, size);

    /* not leased: the lease calls refuse, admissions are as without [cluster] */
    s = (struct limit_spec){.rpm = 100, .tpm = 10000};
    r = region_new(&s, 1, 1, &size);
    assert_int_equal(limit_lease_take(r, 0, 0, INT64_MAX, INT64_MAX, UINT32_MAX, &l), -EINVAL);
    assert_int_equal(admit1(r, 1000, 10, 0, NULL, &v), 0);
    assert_int_equal(limit_lease_hungry(r, 0), 0);
    region_free(r, size);
}

/* [cluster]: a refusal by the lease's tokens is worth waiting for only while the fleet's tpm
 * (as Redis counted it at the last renewal) has room for the request. */
static void test_lease_wait_tokens(void **state)
{
    struct limit_spec s = {.tpm = 1000, .leased = 1, .lease_retry_ms = 200};
    struct limit_verdict v;
    size_t size;
    struct limit_region *r = region_new(&s, 1, 1, &size);
    struct limit_grant g = {.add_tok = 5, .until_ms = 5000, .fleet_tok = 990};

    (void)state;
    assert_int_equal(limit_lease_grant(r, 0, &g), 0);
    assert_int_equal(admit1(r, 1000, 10, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_TOKENS);
    assert_int_equal(v.lease, 2); /* 990 + 10 fits the fleet's 1000 */
    g.add_tok = 0;
    g.fleet_tok = 991;
    assert_int_equal(limit_lease_grant(r, 0, &g), 0);
    assert_int_equal(admit1(r, 1000, 10, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.lease, 1); /* it does not */
    region_free(r, size);
}

/* [cluster] start: a leased limiter starts in its lease_start mode with the whole limits as its
 * share (no other host seen), until the first grant puts it on its lease. */
static void test_lease_start(void **state)
{
    struct limit_spec s = {.rpm = 3,
                           .max_parallel = 10,
                           .leased = 1,
                           .lease_retry_ms = 100,
                           .lease_start = LIMIT_FALLBACK_SHARE};
    struct limit_verdict v;
    struct limit_lease l;
    size_t size;
    struct limit_region *r = region_new(&s, 1, 1, &size);

    assert_int_equal(limit_lease_get(r, 0, &l), 0);
    assert_int_equal(l.fallback, LIMIT_FALLBACK_SHARE);
    assert_int_equal(admit1(r, 1000, 0, 0, NULL, &v), 0);
    assert_int_equal(admit1(r, 1000, 0, 0, NULL, &v), 0);
    /* the first renewal reports them as used under no lease */
    assert_int_equal(limit_lease_take(r, 0, 1000, INT64_MAX, INT64_MAX, UINT32_MAX, &l), 0);
    assert_int_equal(l.used_req, 2);
    assert_int_equal(l.fallback, LIMIT_FALLBACK_SHARE);
    /* the grant: the lease decides from now on */
    assert_int_equal(lease_grant1(r, 0, 0, 10, 5000, 0, 0), 0);
    assert_int_equal(admit1(r, 1000, 0, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_REQUESTS);
    assert_int_equal(v.lease, 2); /* the fleet had room (it counted nothing): a top-up is due */
    region_free(r, size);

    /* closed: nothing before the first grant */
    s.lease_start = LIMIT_FALLBACK_CLOSED;
    r = region_new(&s, 1, 1, &size);
    assert_int_equal(admit1(r, 1000, 0, 0, NULL, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_FLEET);
    assert_int_equal(v.lease, 1);
    region_free(r, size);
    (void)state;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rpm_exact_and_sliding),
        cmocka_unit_test(test_retry_after_exact),
        cmocka_unit_test(test_settle_tokens),
        cmocka_unit_test(test_settle_finds_its_entry),
        cmocka_unit_test(test_all_or_nothing),
        cmocka_unit_test(test_parallel_release_owner),
        cmocka_unit_test(test_budget_periods),
        cmocka_unit_test(test_budget_set_period_change),
        cmocka_unit_test(test_master_bounded_wait),
        cmocka_unit_test(test_merge_conservative),
        cmocka_unit_test(test_processes_exact),
        cmocka_unit_test(test_dead_lock_holder),
        cmocka_unit_test(test_region_args),
        cmocka_unit_test(test_carry),
        cmocka_unit_test(test_lease),
        cmocka_unit_test(test_lease_start),
        cmocka_unit_test(test_lease_wait_tokens),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
