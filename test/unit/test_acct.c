/* Unit tests of shm/acct.c: totals per key, model and backend from several processes, whole
 * requests in every snapshot, the carried-over base, and a writer that died mid-write. Includes
 * the .c to reach a cell. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "shm/acct.c"

static struct acct_region *region_new(uint32_t k, uint32_t m, uint32_t b, uint32_t owners,
                                      size_t *size)
{
    void *mem;

    *size = acct_region_size(k, m, b, owners);
    mem = mmap(NULL, *size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(mem != MAP_FAILED);
    assert_int_equal(acct_region_init(mem, *size, k, m, b, owners), 0);
    return mem;
}

static struct acct_usage one(uint64_t prompt)
{
    struct acct_usage u = {.requests = 1,
                           .prompt = prompt,
                           .completion = 2 * prompt,
                           .cached = 3,
                           .reasoning = 4,
                           .partial = 0,
                           .cost_nano = 1000,
                           .list_cost_nano = 1500};
    return u;
}

static void test_add_get(void **state)
{
    size_t size;
    struct acct_region *a = region_new(2, 3, 4, 2, &size);
    struct acct_usage u = one(10), t, base = {.requests = 100, .cost_nano = 7};

    assert_int_equal(acct_count(a, ACCT_KEY), 2);
    assert_int_equal(acct_count(a, ACCT_MODEL), 3);
    assert_int_equal(acct_count(a, ACCT_BACKEND), 4);
    acct_add(a, 0, 1, 2, 3, &u);
    acct_add(a, 1, 1, -1, 0, &u);
    u.partial = 1;
    acct_add(a, 1, -1, 2, 3, &u);
    assert_int_equal(acct_get(a, ACCT_KEY, 1, &t), 0);
    assert_int_equal(t.requests, 2);
    assert_int_equal(t.prompt, 20);
    assert_int_equal(t.completion, 40);
    assert_int_equal(t.cached, 6);
    assert_int_equal(t.reasoning, 8);
    assert_int_equal(t.partial, 0);
    assert_int_equal(t.cost_nano, 2000);
    assert_int_equal(t.list_cost_nano, 3000);
    assert_int_equal(acct_get(a, ACCT_MODEL, 2, &t), 0);
    assert_int_equal(t.requests, 2);
    assert_int_equal(t.partial, 1);
    assert_int_equal(acct_get(a, ACCT_BACKEND, 3, &t), 0);
    assert_int_equal(t.requests, 2);
    assert_int_equal(acct_get(a, ACCT_BACKEND, 0, &t), 0);
    assert_int_equal(t.requests, 1);
    assert_int_equal(acct_get(a, ACCT_KEY, 0, &t), 0);
    assert_int_equal(t.requests, 0);
    /* The base carried over adds to what the workers counted; setting it again replaces it. */
    assert_int_equal(acct_base_set(a, ACCT_KEY, 1, &base), 0);
    assert_int_equal(acct_base_set(a, ACCT_KEY, 1, &base), 0);
    assert_int_equal(acct_get(a, ACCT_KEY, 1, &t), 0);
    assert_int_equal(t.requests, 102);
    assert_int_equal(t.cost_nano, 2007);
    /* Bad indexes. */
    assert_int_equal(acct_get(a, ACCT_KEY, 2, &t), -EINVAL);
    assert_int_equal(acct_base_set(a, ACCT_BACKEND, 4, &base), -EINVAL);
    acct_add(a, 2, 0, 0, 0, &u); /* no such owner: nothing */
    assert_int_equal(acct_get(a, ACCT_KEY, 0, &t), 0);
    assert_int_equal(t.requests, 0);
    assert_string_equal(acct_kind_str(ACCT_MODEL), "model");
    munmap(a, size);
}

/* 4 workers add to the same entries while a reader checks every snapshot is made of whole
 * requests; the totals at the end are exact. */
static void test_processes(void **state)
{
    size_t size;
    struct acct_region *a = region_new(1, 1, 1, 4, &size);
    pid_t pids[4];
    struct acct_usage t;
    uint32_t reads = 0;

    for (uint32_t w = 0; w < 4; w++) {
        pids[w] = fork();
        assert_true(pids[w] >= 0);
        if (pids[w] == 0) {
            struct acct_usage u = one(5);

            for (int i = 0; i < 200000; i++)
                acct_add(a, w, 0, 0, 0, &u);
            _exit(0);
        }
    }
    for (;;) {
        int done = 0;

        assert_int_equal(acct_get(a, ACCT_MODEL, 0, &t), 0);
        assert_true(t.prompt == 5 * t.requests && t.completion == 10 * t.requests);
        assert_true(t.cost_nano == 1000 * t.requests && t.list_cost_nano == 1500 * t.requests);
        reads++;
        for (uint32_t w = 0; w < 4; w++) {
            int st;

            if (pids[w] == 0 || waitpid(pids[w], &st, WNOHANG) == pids[w])
                done++, pids[w] = 0;
        }
        if (done == 4)
            break;
    }
    assert_int_equal(acct_get(a, ACCT_KEY, 0, &t), 0);
    assert_int_equal(t.requests, 800000);
    assert_int_equal(t.prompt, 4000000);
    assert_int_equal(acct_get(a, ACCT_BACKEND, 0, &t), 0);
    assert_int_equal(t.cost_nano, 800000000);
    print_message("%u snapshots\n", reads);
    munmap(a, size);
}

static void test_dead_writer(void **state)
{
    size_t size;
    struct acct_region *a = region_new(1, 0, 0, 2, &size);
    struct acct_usage u = one(1), t;
    struct acct_cell *c = cell_at(a, 1, 0);

    acct_add(a, 1, 0, -1, -1, &u);
    /* Worker 1 died in the middle of its next write. */
    atomic_fetch_add(&c->seq, 1);
    assert_int_equal(acct_get(a, ACCT_KEY, 0, &t), 0); /* does not hang */
    assert_int_equal(t.requests, 1);
    acct_release_owner(a, 1);
    assert_int_equal(atomic_load(&c->seq) & 1, 0);
    /* The next worker in the slot goes on from its totals. */
    acct_add(a, 1, 0, -1, -1, &u);
    assert_int_equal(acct_get(a, ACCT_KEY, 0, &t), 0);
    assert_int_equal(t.requests, 2);
    munmap(a, size);
}

/* Totals saturate: a huge figure from one writer, then more from it and from another slice and
 * the base, never wraps to a small total. */
static void test_saturate(void **state)
{
    size_t size;
    struct acct_region *a = region_new(1, 0, 0, 2, &size);
    struct acct_usage big = {.requests = 1, .prompt = UINT64_MAX - 5, .cost_nano = UINT64_MAX};
    struct acct_usage u = one(10), t;

    acct_add(a, 0, 0, -1, -1, &big);
    acct_add(a, 0, 0, -1, -1, &u); /* in the same slice */
    assert_int_equal(acct_get(a, ACCT_KEY, 0, &t), 0);
    assert_true(t.prompt == UINT64_MAX);
    assert_true(t.cost_nano == UINT64_MAX);
    assert_int_equal(t.requests, 2);
    assert_int_equal(t.completion, 20);
    acct_add(a, 1, 0, -1, -1, &big); /* another slice: the reader's sum saturates */
    assert_int_equal(acct_base_set(a, ACCT_KEY, 0, &big), 0);
    assert_int_equal(acct_get(a, ACCT_KEY, 0, &t), 0);
    assert_true(t.prompt == UINT64_MAX);
    assert_true(t.cost_nano == UINT64_MAX);
    assert_int_equal(t.requests, 4);
    munmap(a, size);
}

/* The sync process's slices: the workers' own counts leave the base out, and the fleet, acked
 * and pending slices are stored apart from the totals (acct_get never adds them). */
static void test_sync_slices(void **state)
{
    size_t size;
    struct acct_region *a = region_new(2, 1, 1, 2, &size);
    struct acct_usage u = one(10), base = one(100), got, fleet = {.requests = 42, .cost_nano = 7};

    (void)state;
    acct_add(a, 0, 1, 0, 0, &u);
    acct_add(a, 1, 1, -1, -1, &u);
    acct_base_set(a, ACCT_KEY, 1, &base);
    assert_int_equal(acct_own_get(a, ACCT_KEY, 1, &got), 0);
    assert_int_equal(got.requests, 2);
    assert_int_equal(got.prompt, 20);
    assert_int_equal(acct_slice_set(a, ACCT_FLEET, ACCT_KEY, 1, &fleet), 0);
    assert_int_equal(acct_slice_set(a, ACCT_ACKED, ACCT_KEY, 1, &u), 0);
    assert_int_equal(acct_get(a, ACCT_KEY, 1, &got), 0);
    assert_int_equal(got.requests, 3); /* base + two workers, no slice of the sync process */
    assert_int_equal(acct_slice_get(a, ACCT_FLEET, ACCT_KEY, 1, &got), 0);
    assert_int_equal(got.requests, 42);
    assert_int_equal(got.cost_nano, 7);
    assert_int_equal(acct_slice_get(a, ACCT_ACKED, ACCT_KEY, 1, &got), 0);
    assert_int_equal(got.prompt, 10);
    assert_int_equal(acct_slice_get(a, ACCT_FLEET, ACCT_KEY, 0, &got), 0);
    assert_int_equal(got.requests, 0);
    assert_int_equal(acct_slice_get(a, ACCT_FLEET, ACCT_BACKEND, 1, &got), -EINVAL);
    assert_int_equal(acct_slice_get(a, (enum acct_slice)ACCT_SLICES, ACCT_KEY, 0, &got), -EINVAL);
    assert_int_equal(acct_sync(a)->inc, 0); /* a new region: no flush identity yet */
    munmap(a, size);
}

/* A new generation inherits the old one's epoch and fleet totals (mapped by name), once. */
static void test_sync_inherit(void **state)
{
    size_t so, sn;
    struct acct_region *o = region_new(2, 0, 0, 1, &so), *n = region_new(3, 0, 0, 1, &sn);
    struct acct_usage f = {.requests = 9}, got;
    int32_t keys[3] = {1, -1, 0};
    const int32_t *from[3] = {keys, NULL, NULL};

    (void)state;
    snprintf(acct_sync(o)->epoch, sizeof(acct_sync(o)->epoch), "123.456");
    acct_slice_set(o, ACCT_FLEET, ACCT_KEY, 1, &f);
    atomic_store(&acct_sync(o)->fleet_ms, 77);
    acct_sync_inherit(n, o, from);
    assert_string_equal(acct_sync(n)->epoch, "123.456");
    assert_int_equal(atomic_load(&acct_sync(n)->fleet_ms), 77);
    acct_slice_get(n, ACCT_FLEET, ACCT_KEY, 0, &got);
    assert_int_equal(got.requests, 9);
    acct_slice_get(n, ACCT_FLEET, ACCT_KEY, 1, &got);
    assert_int_equal(got.requests, 0);
    /* once its sync process flushed, the new generation keeps what it knows */
    acct_sync(n)->seq = 1;
    snprintf(acct_sync(o)->epoch, sizeof(acct_sync(o)->epoch), "999.1");
    acct_sync_inherit(n, o, from);
    assert_string_equal(acct_sync(n)->epoch, "123.456");
    munmap(o, so);
    munmap(n, sn);
}

static void test_region_args(void **state)
{
    size_t size = acct_region_size(1, 1, 1, 1);
    void *mem = aligned_alloc(64, size);

    assert_true(size % 64 == 0);
    assert_int_equal(acct_region_init(mem, size - 1, 1, 1, 1, 1), -EINVAL);
    assert_int_equal(acct_region_init(mem, size, 1, 1, 1, 0), -EINVAL);
    assert_int_equal(acct_region_init(mem, size, 1, 1, 1, 1), 0);
    free(mem);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_add_get),      cmocka_unit_test(test_processes),
        cmocka_unit_test(test_dead_writer),  cmocka_unit_test(test_saturate),
        cmocka_unit_test(test_region_args),  cmocka_unit_test(test_sync_slices),
        cmocka_unit_test(test_sync_inherit),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
