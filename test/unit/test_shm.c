/* Unit tests of the shared-memory segment: layout, sharing across fork, counters, reset. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <errno.h>
#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "shm/shm.h"

static void test_layout(void **state)
{
    struct shm shm;

    assert_int_equal(shm_create(&shm, 3, 2, 7), 0);
    assert_true(shm.hdr->magic == SHM_MAGIC);
    assert_int_equal(shm.hdr->version, SHM_LAYOUT_VERSION);
    assert_int_equal(shm.hdr->generation, 7);
    assert_int_equal(shm_n_backends(&shm), 3);
    assert_int_equal(shm_n_workers(&shm), 2);
    /* Records are cache-line aligned and inside the segment. */
    for (uint32_t b = 0; b < 3; b++) {
        assert_int_equal((uintptr_t)shm_backend(&shm, b) % SHM_CACHELINE, 0);
        for (uint32_t w = 0; w < 2; w++) {
            struct shm_wb *wb = shm_wb(&shm, w, b);

            assert_int_equal((uintptr_t)wb % SHM_CACHELINE, 0);
            assert_true((char *)(wb + 1) <= (char *)shm.base + shm.size);
        }
    }
    assert_int_equal((uintptr_t)shm_worker(&shm, 1) % SHM_CACHELINE, 0);
    /* (worker, backend) slots are all distinct. */
    assert_ptr_not_equal(shm_wb(&shm, 0, 2), shm_wb(&shm, 1, 0));
    assert_ptr_equal(shm_wb(&shm, 0, 2) + 1, shm_wb(&shm, 1, 0));
    /* A fresh segment says UP / READY, never checked. */
    assert_int_equal(shm_backend_state(&shm, 2), BACKEND_UP);
    assert_int_equal(shm_backend(&shm, 2)->check_at_ns, 0);
    shm_destroy(&shm);
}

static void test_rejects_bad_sizes(void **state)
{
    struct shm shm;

    assert_int_equal(shm_create(&shm, 1, 0, 1), -EINVAL);
}

static void test_shared_across_fork(void **state)
{
    struct shm shm;
    pid_t pid;
    int status;

    assert_int_equal(shm_create(&shm, 2, 2, 1), 0);
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        /* The child plays the health checker and worker 1. */
        shm_backend_set_state(&shm, 1, BACKEND_DOWN, REASON_CHECK_CONNECT, 42);
        shm_counter_add(&shm_wb(&shm, 1, 1)->requests, 5);
        shm_gauge_add(&shm_wb(&shm, 1, 1)->active, 2);
        _exit(0);
    }
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert_int_equal(shm_backend_state(&shm, 1), BACKEND_DOWN);
    assert_int_equal(shm_backend(&shm, 1)->reason, REASON_CHECK_CONNECT);
    assert_int_equal(shm_backend(&shm, 1)->since_ns, 42);
    assert_int_equal(shm_backend(&shm, 1)->transitions, 1);
    assert_false(shm_backend_eligible(&shm, 1));
    assert_int_equal(shm_wb(&shm, 1, 1)->requests, 5);
    shm_destroy(&shm);
}

static void test_totals_and_worker_reset(void **state)
{
    struct shm shm;
    struct shm_backend_totals t;

    assert_int_equal(shm_create(&shm, 2, 3, 1), 0);
    for (uint32_t w = 0; w < 3; w++) {
        shm_gauge_add(&shm_wb(&shm, w, 0)->active, (int32_t)w + 1);
        shm_counter_add(&shm_wb(&shm, w, 0)->requests, 10);
        shm_counter_add(&shm_wb(&shm, w, 0)->failures, 1);
        shm_counter_add(&shm_wb(&shm, w, 0)->bytes_in, 100);
    }
    shm_counter_add(&shm_wb(&shm, 0, 1)->requests, 99); /* another backend: not summed */
    shm_backend_totals(&shm, 0, &t);
    assert_int_equal(t.active, 6);
    assert_int_equal(t.requests, 30);
    assert_int_equal(t.failures, 3);
    assert_int_equal(t.bytes_in, 300);

    /* Worker 2 dies: its in-flight count goes, its history stays. */
    shm_worker_reset(&shm, 2);
    shm_backend_totals(&shm, 0, &t);
    assert_int_equal(t.active, 3);
    assert_int_equal(t.requests, 30);
    shm_destroy(&shm);
}

static void test_eligibility(void **state)
{
    struct shm shm;

    assert_int_equal(shm_create(&shm, 1, 1, 1), 0);
    /* weight 0 is not eligible, even when UP */
    assert_false(shm_backend_eligible(&shm, 0));
    atomic_store(&shm_backend(&shm, 0)->weight_eff, 3);
    assert_true(shm_backend_eligible(&shm, 0));
    atomic_store(&shm_backend(&shm, 0)->admin, BACKEND_MAINT);
    assert_false(shm_backend_eligible(&shm, 0));
    atomic_store(&shm_backend(&shm, 0)->admin, BACKEND_READY);
    shm_backend_set_state(&shm, 0, BACKEND_DOWN, REASON_CHECK_STATUS, 1);
    assert_false(shm_backend_eligible(&shm, 0));
    shm_backend_set_state(&shm, 0, BACKEND_UP, REASON_CHECK_OK, 2);
    assert_true(shm_backend_eligible(&shm, 0));
    assert_int_equal(shm_backend(&shm, 0)->transitions, 2);
    assert_string_equal(shm_reason_str(REASON_CHECK_OK), "check passed");
    assert_string_equal(shm_state_str(BACKEND_DOWN), "DOWN");
    shm_destroy(&shm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout),
        cmocka_unit_test(test_rejects_bad_sizes),
        cmocka_unit_test(test_shared_across_fork),
        cmocka_unit_test(test_totals_and_worker_reset),
        cmocka_unit_test(test_eligibility),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
