/* Unit tests of the balancing algorithms with fixed inputs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "balancer/balancer.h"

static void set(struct balancer_cand *c, int weight)
{
    memset(c, 0, sizeof(*c));
    c->weight = weight;
    c->eligible = 1;
}

/* Weights 5,1,1: nginx's documented smooth sequence a a b a c a a, repeating. */
static void test_rr_smooth_sequence(void **state)
{
    struct balancer b;
    struct balancer_cand c[3];
    const int want[14] = {0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0};

    set(&c[0], 5);
    set(&c[1], 1);
    set(&c[2], 1);
    assert_int_equal(balancer_init(&b, BALANCE_ROUNDROBIN, 3), 0);
    for (int i = 0; i < 14; i++)
        assert_int_equal(balancer_pick(&b, c, 3), want[i]);
    balancer_free(&b);
}

static void test_rr_proportions(void **state)
{
    struct balancer b;
    struct balancer_cand c[2];
    int count[2] = {0, 0};

    set(&c[0], 3);
    set(&c[1], 1);
    assert_int_equal(balancer_init(&b, BALANCE_ROUNDROBIN, 2), 0);
    for (int i = 0; i < 4000; i++)
        count[balancer_pick(&b, c, 2)]++;
    assert_int_equal(count[0], 3000);
    assert_int_equal(count[1], 1000);
    balancer_free(&b);
}

static void test_rr_skips_ineligible_tried_and_zero(void **state)
{
    struct balancer b;
    struct balancer_cand c[4];

    set(&c[0], 1);
    set(&c[1], 1);
    set(&c[2], 0);
    set(&c[3], 1);
    c[0].eligible = 0; /* DOWN */
    c[1].tried = 1;    /* already failed for this request */
    assert_int_equal(balancer_init(&b, BALANCE_ROUNDROBIN, 4), 0);
    for (int i = 0; i < 5; i++)
        assert_int_equal(balancer_pick(&b, c, 4), 3);
    c[3].eligible = 0;
    assert_int_equal(balancer_pick(&b, c, 4), -1);
    balancer_free(&b);
}

static void test_rr_recovered_backend_rejoins(void **state)
{
    struct balancer b;
    struct balancer_cand c[2];
    int count[2] = {0, 0};

    set(&c[0], 1);
    set(&c[1], 1);
    assert_int_equal(balancer_init(&b, BALANCE_ROUNDROBIN, 2), 0);
    c[1].eligible = 0;
    for (int i = 0; i < 10; i++)
        assert_int_equal(balancer_pick(&b, c, 2), 0);
    c[1].eligible = 1;
    for (int i = 0; i < 100; i++)
        count[balancer_pick(&b, c, 2)]++;
    assert_int_equal(count[0], 50);
    assert_int_equal(count[1], 50);
    balancer_free(&b);
}

static void test_algo_lookup(void **state)
{
    struct balancer b;

    assert_int_equal(balancer_algo_find("roundrobin"), BALANCE_ROUNDROBIN);
    assert_int_equal(balancer_algo_find("least_conn"), BALANCE_LEAST_CONN);
    assert_int_equal(balancer_algo_find("p2c"), BALANCE_P2C);
    assert_int_equal(balancer_algo_find("random"), BALANCE_RANDOM);
    assert_int_equal(balancer_algo_find("hash"), BALANCE_HASH);
    assert_int_equal(balancer_algo_find("first"), BALANCE_FIRST);
    assert_int_equal(balancer_algo_find("nope"), -1);
    assert_string_equal(balancer_algo_name(BALANCE_P2C), "p2c");
    assert_int_equal(balancer_init(&b, (enum balance_algo)99, 2), -EINVAL);
}

/* Every algorithm: backups only when no primary is usable; max_conns is a hard limit. */
static void test_backup_and_max_conns_all_algos(void **state)
{
    for (int algo = 0; algo < BALANCE_COUNT; algo++) {
        struct balancer b;
        struct balancer_cand c[3];
        struct balancer_req req = {balancer_hash("k", 1), 1};

        set(&c[0], 1);
        set(&c[1], 1);
        set(&c[2], 1);
        c[2].backup = 1;
        assert_int_equal(balancer_init(&b, (enum balance_algo)algo, 3), 0);
        for (int i = 0; i < 50; i++)
            assert_int_not_equal(balancer_pick_req(&b, c, 3, &req), 2);
        c[0].eligible = 0;
        c[1].max_conns = 4;
        c[1].active = 4; /* full */
        for (int i = 0; i < 20; i++)
            assert_int_equal(balancer_pick_req(&b, c, 3, &req), 2);
        c[1].active = 3;
        for (int i = 0; i < 20; i++)
            assert_int_equal(balancer_pick_req(&b, c, 3, &req), 1);
        c[1].eligible = 0;
        c[2].tried = 1;
        assert_int_equal(balancer_pick_req(&b, c, 3, &req), -1);
        balancer_free(&b);
    }
}

static void test_least_conn(void **state)
{
    struct balancer b;
    struct balancer_cand c[3];
    int count[3] = {0, 0, 0};

    set(&c[0], 1);
    set(&c[1], 1);
    set(&c[2], 2);
    assert_int_equal(balancer_init(&b, BALANCE_LEAST_CONN, 3), 0);
    c[0].active = 5;
    c[1].active = 1;
    c[2].active = 4; /* (4+1)/2 = 2.5 > (1+1)/1 = 2 */
    assert_int_equal(balancer_pick(&b, c, 3), 1);
    c[1].active = 2; /* 3 > 2.5 */
    assert_int_equal(balancer_pick(&b, c, 3), 2);
    /* Idle equal backends take turns instead of piling on the first. */
    set(&c[0], 1);
    set(&c[1], 1);
    set(&c[2], 1);
    for (int i = 0; i < 30; i++)
        count[balancer_pick(&b, c, 3)]++;
    assert_int_equal(count[0], 10);
    assert_int_equal(count[1], 10);
    assert_int_equal(count[2], 10);
    balancer_free(&b);
}

/* A simulated pool where backend 0 answers 10x faster: with a fixed arrival pattern, the
 * in-flight counts follow from the latencies, and p2c sends most traffic to the fast one. */
static void test_p2c_prefers_fast_backend(void **state)
{
    struct balancer b;
    struct balancer_cand c[2];
    int count[2] = {0, 0};

    set(&c[0], 1);
    set(&c[1], 1);
    c[0].ewma_ns = 10 * 1000000ULL;
    c[1].ewma_ns = 100 * 1000000ULL;
    assert_int_equal(balancer_init(&b, BALANCE_P2C, 2), 0);
    balancer_seed(&b, 42);
    for (int i = 0; i < 1000; i++) {
        int k = balancer_pick(&b, c, 2);

        assert_true(k == 0 || k == 1);
        count[k]++;
        /* one request per ms: in flight ~ latency x rate share */
        c[0].active = (int32_t)(count[0] * 10 / (i + 1));
        c[1].active = (int32_t)(count[1] * 100 / (i + 1));
    }
    assert_true(count[0] > 3 * count[1]);
    /* An unmeasured backend is tried (cost 0), and a lone candidate is taken. */
    c[1].ewma_ns = 0;
    c[1].active = 0;
    assert_int_equal(balancer_pick(&b, c, 2), 1);
    c[1].eligible = 0;
    assert_int_equal(balancer_pick(&b, c, 2), 0);
    balancer_free(&b);
}

static void test_random_weighted(void **state)
{
    struct balancer b;
    struct balancer_cand c[2];
    int count[2] = {0, 0};

    set(&c[0], 3);
    set(&c[1], 1);
    assert_int_equal(balancer_init(&b, BALANCE_RANDOM, 2), 0);
    balancer_seed(&b, 7);
    for (int i = 0; i < 40000; i++)
        count[balancer_pick(&b, c, 2)]++;
    /* 75% +- 1.5% over 40,000 draws */
    assert_in_range(count[0], 29400, 30600);
    balancer_free(&b);
}

static void test_first(void **state)
{
    struct balancer b;
    struct balancer_cand c[3];

    set(&c[0], 1);
    set(&c[1], 5);
    set(&c[2], 5);
    assert_int_equal(balancer_init(&b, BALANCE_FIRST, 3), 0);
    for (int i = 0; i < 10; i++)
        assert_int_equal(balancer_pick(&b, c, 3), 0);
    c[0].eligible = 0;
    assert_int_equal(balancer_pick(&b, c, 3), 1);
    balancer_free(&b);
}

static int hash_key_pick(struct balancer *b, struct balancer_cand *c, uint32_t n, int key)
{
    char s[32];
    int len = snprintf(s, sizeof(s), "session-%d", key);
    struct balancer_req req = {balancer_hash(s, (size_t)len), 1};

    return balancer_pick_req(b, c, n, &req);
}

/* A third backend joins two: at most 38% of keys move, and every moved key goes to it. */
static void test_hash_consistency(void **state)
{
    enum { KEYS = 10000 };
    static int before[KEYS];
    struct balancer b2, b3;
    struct balancer_cand c[3];
    int moved = 0, per[3] = {0, 0, 0};

    for (int i = 0; i < 3; i++) {
        set(&c[i], 1);
        {
            static const char *const names[3] = {"alpha", "beta", "gamma"};

            c[i].id = balancer_hash(names[i], strlen(names[i]));
        }
    }
    assert_int_equal(balancer_init(&b2, BALANCE_HASH, 2), 0);
    assert_int_equal(balancer_init(&b3, BALANCE_HASH, 3), 0);
    for (int k = 0; k < KEYS; k++)
        before[k] = hash_key_pick(&b2, c, 2, k);
    for (int k = 0; k < KEYS; k++) {
        int now = hash_key_pick(&b3, c, 3, k);

        per[now]++;
        if (now != before[k]) {
            moved++;
            assert_int_equal(now, 2);
        }
        /* Same key, same answer. */
        assert_int_equal(hash_key_pick(&b3, c, 3, k), now);
    }
    assert_true(moved <= KEYS * 38 / 100);
    assert_true(moved >= KEYS * 20 / 100); /* the new backend does get its share */
    assert_true(per[0] > KEYS / 5 && per[1] > KEYS / 5);
    balancer_free(&b2);
    balancer_free(&b3);
}

/* Bounded load: a key whose backend is over its share overflows to the next one, and comes
 * back once the load drops. */
static void test_hash_bounded_load(void **state)
{
    struct balancer b;
    struct balancer_cand c[3];
    int home, other;

    for (int i = 0; i < 3; i++) {
        set(&c[i], 1);
        c[i].id = (uint64_t)(i + 1) * 0x1234567ULL;
    }
    assert_int_equal(balancer_init(&b, BALANCE_HASH, 3), 0);
    home = hash_key_pick(&b, c, 3, 99);
    c[home].active = 10; /* cap = ceil(1.25 * 11 / 3) = 5 */
    other = hash_key_pick(&b, c, 3, 99);
    assert_int_not_equal(other, home);
    assert_int_equal(hash_key_pick(&b, c, 3, 99), other); /* overflow is stable too */
    /* Everyone busy alike: home is within its share again (cap = ceil(1.25 * 10 / 3) = 5). */
    for (int i = 0; i < 3; i++)
        c[i].active = 3;
    assert_int_equal(hash_key_pick(&b, c, 3, 99), home);
    for (int i = 0; i < 3; i++)
        c[i].active = 0;
    /* Home DOWN: the key moves, and back when it returns. */
    c[home].active = 0;
    c[home].eligible = 0;
    assert_int_not_equal(hash_key_pick(&b, c, 3, 99), home);
    c[home].eligible = 1;
    assert_int_equal(hash_key_pick(&b, c, 3, 99), home);
    /* No key: weighted random over the usable ones. */
    assert_true(balancer_pick(&b, c, 3) >= 0);
    balancer_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rr_smooth_sequence),
        cmocka_unit_test(test_rr_proportions),
        cmocka_unit_test(test_rr_skips_ineligible_tried_and_zero),
        cmocka_unit_test(test_rr_recovered_backend_rejoins),
        cmocka_unit_test(test_algo_lookup),
        cmocka_unit_test(test_backup_and_max_conns_all_algos),
        cmocka_unit_test(test_least_conn),
        cmocka_unit_test(test_p2c_prefers_fast_backend),
        cmocka_unit_test(test_random_weighted),
        cmocka_unit_test(test_first),
        cmocka_unit_test(test_hash_consistency),
        cmocka_unit_test(test_hash_bounded_load),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
