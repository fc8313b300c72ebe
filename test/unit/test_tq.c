/* Unit tests of core/tq.c: timer queues fire their nodes in deadline order behind one timer,
 * appended or inserted in order, and a node taken out never fires. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "core/tq.h"

struct item {
    int id;
    struct tq_node n;
};

static int fired[16];
static int n_fired;

static void on_fire(struct tq_node *n)
{
    fired[n_fired++] = tq_entry(n, struct item, n)->id;
}

static void reset(void)
{
    memset(fired, 0, sizeof(fired));
    n_fired = 0;
}

static void closed(uv_handle_t *h)
{
}

static void test_tq_append(void **state)
{
    uv_loop_t loop;
    struct tq q;
    struct item a = {.id = 1}, b = {.id = 2}, c = {.id = 3};

    reset();
    assert_int_equal(uv_loop_init(&loop), 0);
    tq_init(&q, &loop, 5, on_fire);
    tq_add(&q, &a.n);
    tq_add(&q, &b.n);
    tq_add(&q, &c.n);
    assert_ptr_equal(a.n.q, &q);
    assert_true(a.n.deadline <= b.n.deadline && b.n.deadline <= c.n.deadline);
    /* one taken out never fires; one queued again goes to the end */
    tq_remove(&b.n);
    assert_null(b.n.q);
    tq_add(&q, &a.n);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(n_fired, 2);
    assert_int_equal(fired[0], 3);
    assert_int_equal(fired[1], 1);
    assert_null(q.head);
    assert_null(q.tail);
    assert_null(a.n.q);
    tq_remove(&a.n); /* out of any queue: nothing to do */
    tq_close(&q, closed);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

static void test_tq_sorted(void **state)
{
    uv_loop_t loop;
    struct tq q;
    struct item it[5];
    const uint64_t delay[5] = {30, 10, 20, 10, 0};

    reset();
    assert_int_equal(uv_loop_init(&loop), 0);
    tq_init(&q, &loop, 0, on_fire);
    memset(it, 0, sizeof(it));
    for (int i = 0; i < 5; i++) {
        it[i].id = i + 1;
        tq_add_at(&q, &it[i].n, delay[i]);
    }
    /* in deadline order, equal deadlines in the order they came */
    int want[5] = {5, 2, 4, 3, 1};
    int i = 0;
    for (struct tq_node *n = q.head; n; n = n->next)
        assert_int_equal(tq_entry(n, struct item, n)->id, want[i++]);
    assert_int_equal(i, 5);
    assert_ptr_equal(q.tail, &it[0].n);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(n_fired, 5);
    for (i = 0; i < 5; i++)
        assert_int_equal(fired[i], want[i]);
    tq_close(&q, closed);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tq_append),
        cmocka_unit_test(test_tq_sorted),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
