/* Unit tests of the balancing algorithms with fixed inputs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <errno.h>
#include <stdint.h>
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

static void test_ops_lookup(void **state)
{
    struct balancer b;

    assert_ptr_equal(balancer_ops_find("roundrobin"), &balancer_roundrobin);
    assert_null(balancer_ops_find("nope"));
    assert_int_equal(balancer_init(&b, (enum balance_algo)99, 2), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rr_smooth_sequence),
        cmocka_unit_test(test_rr_proportions),
        cmocka_unit_test(test_rr_skips_ineligible_tried_and_zero),
        cmocka_unit_test(test_rr_recovered_backend_rejoins),
        cmocka_unit_test(test_ops_lookup),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
