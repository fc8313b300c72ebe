/* Unit tests of the shared-memory segment: layout, sharing across fork, the published record and
 * admission, counters, claims raced by processes, reset. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sched.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "shm/shm.h"

static struct shm_backend_view view(const struct shm *shm, uint32_t b)
{
    struct shm_backend_view v;

    shm_backend_view(shm, b, &v);
    return v;
}

static enum shm_admit admit(const struct shm *shm, uint32_t b, uint64_t now, uint32_t *trials)
{
    struct shm_backend_view v = view(shm, b);
    uint32_t t = 0;
    enum shm_admit a = shm_admit(&v, now, &t);

    if (trials)
        *trials = t;
    return a;
}

/* The checker's side: publishes b's record with admission *a (a new epoch when new_epoch). */
static uint32_t publish(struct shm *shm, uint32_t b, const struct shm_admission *a,
                        uint64_t since_ns, int new_epoch)
{
    struct shm_health h = *view(shm, b).h;

    h.adm = *a;
    h.since_ns = since_ns;
    shm_backend_publish(shm, b, &h, new_epoch);
    return h.epoch;
}

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
    /* A fresh segment says UP / READY, never checked, everything admitted (weight aside). */
    assert_int_equal(view(&shm, 2).h->state, BACKEND_UP);
    assert_int_equal(view(&shm, 2).admin, BACKEND_READY);
    assert_int_equal(view(&shm, 2).h->check_at_ns, 0);
    assert_int_equal(admit(&shm, 2, 1, NULL), SHM_ADMIT_ALL);
    shm_destroy(&shm);
}

/* The AI regions: inside the segment, limiters and totals shared across fork, and a dead
 * worker's parallel slots given back by shm_worker_reset. */
static void test_ai_regions(void **state)
{
    struct limit_spec specs[3] = {{.max_parallel = 1}, {.rpm = 5}, {.tpm = 10}};
    struct shm_ai ai = {.n_keys = 1, .n_models = 1, .n_pools = 1, .limits = specs, .wall_s = 0};
    struct shm shm;
    struct limit_ticket t;
    struct limit_verdict v;
    struct acct_usage u = {.requests = 1, .prompt = 7}, got;
    uint32_t ids[3] = {0, 1, 2};
    pid_t pid;
    int status;

    assert_int_equal(shm_create(&shm, 2, 2, 1), 0);
    assert_null(shm_limits(&shm));
    assert_null(shm_acct(&shm));
    shm_destroy(&shm);
    ai.limits = NULL;
    assert_int_equal(shm_create_ai(&shm, 2, 2, 1, &ai), -EINVAL);
    ai.limits = specs;
    assert_int_equal(shm_create_ai(&shm, 2, 2, 1, &ai), 0);
    assert_non_null(shm_limits(&shm));
    assert_non_null(shm_acct(&shm));
    assert_true((char *)shm_limits(&shm) > (char *)shm_wb(&shm, 1, 1));
    assert_true((char *)shm_acct(&shm) > (char *)shm_limits(&shm));
    assert_true((char *)shm_acct(&shm) < (char *)shm.base + shm.size);
    assert_int_equal(limit_region_count(shm_limits(&shm)), 3);
    assert_int_equal(acct_count(shm_acct(&shm), ACCT_BACKEND), 2);
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        /* Worker 1 takes the key's only parallel slot, counts usage and dies. */
        if (limit_admit(shm_limits(&shm), ids, 3, 0, 0, 1, 0, 1, &t, &v) != 0)
            _exit(1);
        acct_add(shm_acct(&shm), 1, 0, 0, 1, &u);
        _exit(0);
    }
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert_int_equal(limit_admit(shm_limits(&shm), ids, 3, 0, 0, 1, 0, 0, &t, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_PARALLEL);
    shm_worker_reset(&shm, 1);
    assert_int_equal(limit_admit(shm_limits(&shm), ids, 3, 0, 0, 1, 0, 0, &t, &v), 0);
    assert_int_equal(v.req.remaining, 3);
    assert_int_equal(acct_get(shm_acct(&shm), ACCT_BACKEND, 1, &got), 0);
    assert_int_equal(got.prompt, 7);
    shm_destroy(&shm);
}

static void test_rejects_bad_sizes(void **state)
{
    struct shm shm;

    assert_int_equal(shm_create(&shm, 1, 0, 1), -EINVAL);
}

/* Binary upgrade: the new master maps the old one's segment by its memfd and sees what the old
 * one writes; a segment of another layout version is refused. */
static void test_attach_by_fd(void **state)
{
    struct shm a, b;
    int fd;

    (void)state;
    assert_int_equal(shm_create(&a, 2, 3, 7), 0);
    fd = fcntl(a.fd, F_DUPFD_CLOEXEC, 3);
    assert_true(fd >= 0);
    assert_int_equal(shm_attach(&b, fd), 0);
    assert_int_equal(b.hdr->generation, 7);
    assert_int_equal(shm_n_backends(&b), 2);
    shm_backend_init(&a, 1, 42, 0);
    assert_int_equal(atomic_load(&shm_backend(&b, 1)->weight_cfg), 42);
    shm_destroy(&b);

    a.hdr->version = SHM_LAYOUT_VERSION + 1;
    fd = fcntl(a.fd, F_DUPFD_CLOEXEC, 3);
    assert_int_equal(shm_attach(&b, fd), -EPROTO);
    close(fd);
    a.hdr->version = SHM_LAYOUT_VERSION;
    fd = memfd_create("not-a-segment", MFD_CLOEXEC);
    assert_int_equal(ftruncate(fd, 4096), 0);
    assert_int_equal(shm_attach(&b, fd), -EPROTO);
    close(fd);
    shm_destroy(&a);
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
    struct shm_backend_view v = view(&shm, 1);
    assert_int_equal(v.h->state, BACKEND_DOWN);
    assert_int_equal(v.h->reason, REASON_CHECK_CONNECT);
    assert_int_equal(v.h->since_ns, 42);
    assert_int_equal(v.h->transitions, 1);
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

/* Reload: the new segment's carried counters follow the old one's totals (its own carried ones
 * and its workers') each time they are carried, the old workers' later traffic included; the
 * new workers' counts add to them, and nothing is counted twice. */
static void test_carry_counters(void **state)
{
    struct shm old, cur, next;
    struct shm_backend_totals t;
    struct shm_backend_stats st;
    struct shm_proc_totals pt;
    uint64_t ok, failed;

    assert_int_equal(shm_create(&old, 2, 2, 1), 0);
    assert_int_equal(shm_create(&cur, 3, 1, 2), 0);
    assert_int_equal(shm_create(&next, 1, 1, 3), 0);
    shm_counter_add(&shm_wb(&old, 0, 1)->requests, 5);
    shm_counter_add(&shm_wb(&old, 1, 1)->requests, 2);
    shm_wb_note_status(&old, 1, 1, 503);
    shm_wb_observe(&old, 0, 1, 0, 7000000);
    shm_wb_record_fail(&old, 0, 1, 1000);
    shm_counter_add(&shm_worker(&old, 1)->requests, 7);
    /* old backend 1 is cur's backend 2 */
    shm_carry_counters(&cur, 2, &old, 1);
    shm_carry_proc(&cur, &old);
    shm_counter_add(&shm_wb(&cur, 0, 2)->requests, 1); /* cur's own worker */
    shm_backend_totals(&cur, 2, &t);
    assert_int_equal(t.requests, 8);
    shm_backend_totals(&cur, 0, &t);
    assert_int_equal(t.requests, 0);
    /* the old workers go on while they drain: carried again, set to the new totals */
    shm_counter_add(&shm_wb(&old, 1, 1)->requests, 3);
    shm_counter_add(&shm_worker(&old, 0)->requests, 1);
    shm_worker_note_limited(&old, 0, 0, 1, 0);
    shm_carry_counters(&cur, 2, &old, 1);
    shm_carry_proc(&cur, &old);
    shm_backend_totals(&cur, 2, &t);
    assert_int_equal(t.requests, 11);
    shm_backend_stats(&cur, 2, &st);
    assert_int_equal(st.status[4], 1);
    assert_int_equal(st.lat_bkt[1], 1); /* 7 ms: the 10 ms bucket */
    assert_int_equal(st.lat_sum_us, 7000);
    shm_backend_outcomes(&cur, 2, &ok, &failed);
    assert_int_equal(failed, 1);
    shm_proc_totals(&cur, &pt);
    assert_int_equal(pt.requests, 8);
    assert_int_equal(pt.limited[0][0], 1);
    /* and on through a second reload: cur's carried and own counts both reach next */
    shm_carry_counters(&next, 0, &cur, 2);
    shm_carry_proc(&next, &cur);
    shm_backend_totals(&next, 0, &t);
    assert_int_equal(t.requests, 11);
    shm_proc_totals(&next, &pt);
    assert_int_equal(pt.requests, 8);
    shm_destroy(&old);
    shm_destroy(&cur);
    shm_destroy(&next);
}

/* The record is published whole and read whole; the master's fields apart. */
static void test_record_and_admin(void **state)
{
    struct shm shm;
    struct shm_backend_view v;

    assert_int_equal(shm_create(&shm, 2, 1, 1), 0);
    shm_backend_init(&shm, 0, 3, 0);
    shm_backend_init(&shm, 1, 5, 7);
    v = view(&shm, 0);
    assert_int_equal(v.h->weight_eff, 3);
    assert_int_equal(v.weight_cfg, 3);
    assert_int_equal(view(&shm, 1).h->weight_eff, 5);
    shm_backend_set_state(&shm, 0, BACKEND_DOWN, REASON_CHECK_STATUS, 1);
    shm_backend_set_check(&shm, 0, 503, 1500, 1);
    shm_backend_set_state(&shm, 0, BACKEND_UP, REASON_CHECK_OK, 2);
    shm_backend_set_weight(&shm, 0, 2);
    v = view(&shm, 0);
    assert_int_equal(v.h->state, BACKEND_UP);
    assert_int_equal(v.h->reason, REASON_CHECK_OK);
    assert_int_equal(v.h->since_ns, 2);
    assert_int_equal(v.h->transitions, 2);
    assert_int_equal(v.h->check_status, 503);
    assert_int_equal(v.h->weight_eff, 2);
    assert_int_equal(v.weight_cfg, 3);
    assert_int_equal(shm_backend_set_admin(&shm, 0, BACKEND_MAINT), BACKEND_READY);
    assert_int_equal(view(&shm, 0).admin, BACKEND_MAINT);
    assert_int_equal(admit(&shm, 0, 5, NULL), SHM_ADMIT_NONE);
    assert_int_equal(shm_backend_set_admin(&shm, 0, BACKEND_READY), BACKEND_MAINT);
    assert_int_equal(admit(&shm, 0, 5, NULL), SHM_ADMIT_ALL);
    assert_string_equal(shm_reason_str(REASON_CHECK_OK), "check passed");
    assert_string_equal(shm_state_str(BACKEND_DOWN), "DOWN");
    shm_destroy(&shm);
}

/* A checker that dies halfway through writing a record leaves readers the last whole one, and
 * the next checker writes over it. */
static void test_record_writer_dies_midway(void **state)
{
    struct shm shm;
    struct shm_backend *be;

    assert_int_equal(shm_create(&shm, 1, 1, 1), 0);
    shm_backend_init(&shm, 0, 4, 0);
    shm_backend_set_state(&shm, 0, BACKEND_DEGRADED, REASON_CHECK_SLOW, 9);
    be = shm_backend(&shm, 0);
    /* the copy not in use, mid-write: odd counter, half a record */
    struct shm_health_rec *r = &be->rec[(atomic_load(&be->cur) & 1) ^ 1];
    atomic_store(&r->seq, atomic_load(&r->seq) + 1);
    atomic_store(&r->w[0], 0xdeadbeefULL);
    assert_int_equal(view(&shm, 0).h->state, BACKEND_DEGRADED);
    assert_int_equal(view(&shm, 0).h->since_ns, 9);
    shm_backend_set_state(&shm, 0, BACKEND_UP, REASON_CHECK_OK, 10);
    assert_int_equal(view(&shm, 0).h->state, BACKEND_UP);
    assert_int_equal(view(&shm, 0).h->weight_eff, 4);
    assert_int_equal(atomic_load(&r->seq) & 1, 0);
    shm_destroy(&shm);
}

/* Pure logic: what shm_admit makes of a published admission, the time and the trips. */
static void test_admit_logic(void **state)
{
    struct shm_backend_view v;
    struct shm_health h;
    uint32_t trials = 0;

    memset(&v, 0, sizeof(v));
    memset(&h, 0, sizeof(h));
    v.h = &h;
    assert_int_equal(shm_admit(&v, 0, &trials), SHM_ADMIT_ALL);
    v.trips = SHM_TRIP_PASSIVE;
    assert_int_equal(shm_admit(&v, 0, &trials), SHM_ADMIT_NONE);
    v.trips = SHM_TRIP_BREAKER;
    assert_int_equal(shm_admit(&v, 0, &trials), SHM_ADMIT_NONE);
    v.trips = SHM_TRIP_AUTH;
    assert_int_equal(shm_admit(&v, 0, &trials), SHM_ADMIT_NONE);
    v.trips = 0;
    v.admin = BACKEND_DRAIN;
    assert_int_equal(shm_admit(&v, 0, &trials), SHM_ADMIT_NONE);
    v.admin = BACKEND_READY;
    h.adm.kind = SHM_ADMIT_NONE;
    assert_int_equal(shm_admit(&v, 0, &trials), SHM_ADMIT_NONE);
    /* trials: none before from_ns, then `trials` at a time */
    h.adm.kind = SHM_ADMIT_TRIAL;
    h.adm.trials = 3;
    h.adm.from_ns = 100;
    assert_int_equal(shm_admit(&v, 99, &trials), SHM_ADMIT_NONE);
    assert_int_equal(shm_admit(&v, 100, &trials), SHM_ADMIT_TRIAL);
    assert_int_equal(trials, 3);
    /* the trials passed: everything, at once; one failed: nothing */
    v.trips = SHM_TRIP_PASSED;
    assert_int_equal(shm_admit(&v, 100, &trials), SHM_ADMIT_ALL);
    v.trips = SHM_TRIP_FAILED;
    assert_int_equal(shm_admit(&v, 100, &trials), SHM_ADMIT_NONE);
}

/* Workers trip the gate at the published thresholds; trips count within their epoch only. */
static void test_trips(void **state)
{
    struct shm shm;
    struct shm_admission all = {
        .kind = SHM_ADMIT_ALL, .max_fails = 3, .fail_window_ns = 1000, .consec = 5};
    struct shm_admission trial = {
        .kind = SHM_ADMIT_TRIAL, .trials = 1, .need = 2, .fail_stops = 1, .from_ns = 50};
    uint32_t e;

    assert_int_equal(shm_create(&shm, 2, 2, 1), 0);
    e = publish(&shm, 0, &all, 0, 1);
    assert_int_equal(e, 1);
    /* max_fails 3 within 1000 ns: the third failure trips, from two workers together */
    shm_wb_record_fail(&shm, 0, 0, 100);
    shm_wb_record_fail(&shm, 1, 0, 1500);
    shm_wb_record_fail(&shm, 0, 0, 1600);
    assert_int_equal(view(&shm, 0).trips, 0); /* the one at 100 is out of the window */
    assert_int_equal(admit(&shm, 0, 1600, NULL), SHM_ADMIT_ALL);
    shm_wb_record_fail(&shm, 1, 0, 1700);
    assert_int_equal(view(&shm, 0).trips, SHM_TRIP_PASSIVE);
    assert_int_equal(admit(&shm, 0, 1700, NULL), SHM_ADMIT_NONE);
    assert_int_equal(view(&shm, 0).consec, 4);
    /* another backend is not touched */
    assert_int_equal(view(&shm, 1).trips, 0);

    /* the checker acts on it: a new epoch leaves the trips (and counts) behind */
    e = publish(&shm, 0, &all, 1800, 1);
    assert_int_equal(e, 2);
    assert_int_equal(view(&shm, 0).trips, 0);
    assert_int_equal(view(&shm, 0).consec, 0);
    /* failures before the state change (since 1800) no longer count toward max_fails... */
    shm_wb_record_fail(&shm, 0, 0, 1900);
    shm_wb_record_fail(&shm, 0, 0, 1950);
    assert_int_equal(view(&shm, 0).trips, 0);
    /* ...consecutive failures do, a success ends them */
    shm_wb_record_ok(&shm, 1, 0, 1960, 1);
    assert_int_equal(view(&shm, 0).consec, 0);
    all.max_fails = 0;
    e = publish(&shm, 0, &all, 1800, 1);
    for (int i = 0; i < 4; i++)
        shm_wb_record_fail(&shm, (uint32_t)i % 2, 0, 2000 + (uint64_t)i);
    assert_int_equal(view(&shm, 0).trips, 0);
    shm_wb_record_fail(&shm, 0, 0, 2005);
    assert_int_equal(view(&shm, 0).trips, SHM_TRIP_BREAKER);
    assert_int_equal(view(&shm, 0).consec, 5);
    /* 401/403 */
    e = publish(&shm, 0, &all, 1800, 1);
    shm_wb_record_auth(&shm, 1, 0);
    assert_int_equal(view(&shm, 0).trips, SHM_TRIP_AUTH);
    assert_int_equal(shm_backend_auth_failures(&shm, 0), 1);

    /* trials: `need` successes of this epoch pass them, the first verdict stands */
    e = publish(&shm, 0, &trial, 1800, 1);
    assert_int_equal(admit(&shm, 0, 49, NULL), SHM_ADMIT_NONE);
    assert_int_equal(admit(&shm, 0, 50, NULL), SHM_ADMIT_TRIAL);
    shm_wb_record_fail(&shm, 0, 0, 3000); /* no thresholds while trials decide */
    shm_wb_record_auth(&shm, 0, 0);
    assert_int_equal(view(&shm, 0).trips, 0);
    shm_trial_outcome(&shm, 0, e - 1, 1); /* an older epoch's trial counts for nothing */
    shm_trial_outcome(&shm, 0, e, 1);
    assert_int_equal(view(&shm, 0).trips, 0);
    assert_int_equal(view(&shm, 0).trial_ok, 1);
    shm_trial_outcome(&shm, 0, e, 1);
    assert_int_equal(view(&shm, 0).trips, SHM_TRIP_PASSED);
    assert_int_equal(admit(&shm, 0, 60, NULL), SHM_ADMIT_ALL);
    shm_trial_outcome(&shm, 0, e, 0); /* too late */
    assert_int_equal(view(&shm, 0).trips, SHM_TRIP_PASSED);
    e = publish(&shm, 0, &trial, 1800, 1);
    shm_trial_outcome(&shm, 0, e, 1);
    shm_trial_outcome(&shm, 0, e, 0);
    assert_int_equal(view(&shm, 0).trips, SHM_TRIP_FAILED);
    assert_int_equal(admit(&shm, 0, 60, NULL), SHM_ADMIT_NONE);
    shm_trial_outcome(&shm, 0, e, 1);
    assert_int_equal(view(&shm, 0).trips, SHM_TRIP_FAILED);
    /* a trial whose failure does not stop the trials (checks off, passive DOWN) */
    trial.fail_stops = 0;
    trial.need = 1;
    e = publish(&shm, 0, &trial, 1800, 1);
    shm_trial_outcome(&shm, 0, e, 0);
    assert_int_equal(admit(&shm, 0, 60, NULL), SHM_ADMIT_TRIAL);
    shm_trial_outcome(&shm, 0, e, 1);
    assert_int_equal(admit(&shm, 0, 60, NULL), SHM_ADMIT_ALL);
    /* a record published without a new epoch keeps the trips */
    publish(&shm, 0, &trial, 1800, 0);
    assert_int_equal(view(&shm, 0).trips, SHM_TRIP_PASSED);
    shm_destroy(&shm);
}

static void test_outcomes_and_failure_window(void **state)
{
    struct shm shm;
    uint64_t ok, failed;

    assert_int_equal(shm_create(&shm, 2, 2, 1), 0);
    shm_wb_record_fail(&shm, 0, 0, 100);
    shm_wb_record_fail(&shm, 1, 0, 200);
    shm_wb_record_ok(&shm, 0, 0, 250, 5000);
    shm_wb_record_fail(&shm, 1, 0, 300);
    shm_wb_record_fail(&shm, 0, 1, 400); /* another backend */
    assert_int_equal(shm_backend_failures_since(&shm, 0, 0), 3);
    assert_int_equal(shm_backend_failures_since(&shm, 0, 150), 2);
    /* consecutive failures = those after the latest success of any worker */
    assert_int_equal(shm_backend_last_ok(&shm, 0), 250);
    assert_int_equal(shm_backend_failures_since(&shm, 0, shm_backend_last_ok(&shm, 0)), 1);
    shm_backend_outcomes(&shm, 0, &ok, &failed);
    assert_int_equal(ok, 1);
    assert_int_equal(failed, 3);
    /* The ring keeps the latest SHM_FAIL_RING failures of a worker. */
    for (int i = 0; i < SHM_FAIL_RING + 5; i++)
        shm_wb_record_fail(&shm, 0, 1, 1000 + (uint64_t)i);
    assert_int_equal(shm_backend_failures_since(&shm, 1, 0), SHM_FAIL_RING);
    assert_int_equal(shm_backend_failures_since(&shm, 1, 1000 + SHM_FAIL_RING + 2), 2);
    shm_destroy(&shm);
}

static void test_peak_ewma_and_cooling(void **state)
{
    struct shm shm;

    assert_int_equal(shm_create(&shm, 1, 2, 1), 0);
    assert_int_equal(shm_backend_ewma(&shm, 0, 4), 0);
    shm_wb_record_ok(&shm, 0, 0, 1, 800);
    assert_int_equal(shm_backend_ewma(&shm, 0, 4), 800);
    shm_wb_record_ok(&shm, 0, 0, 2, 8000); /* slower: taken at once */
    assert_int_equal(shm_backend_ewma(&shm, 0, 4), 8000);
    shm_wb_record_ok(&shm, 0, 0, 3, 0 + 800); /* faster: 1/8 of the way down */
    assert_int_equal(shm_backend_ewma(&shm, 0, 4), 8000 - 7200 / 8);
    shm_wb_record_ok(&shm, 1, 0, 4, 1000); /* mean over the workers that measured */
    assert_int_equal(shm_backend_ewma(&shm, 0, 4), (8000 - 900 + 1000) / 2);

    assert_int_equal(shm_backend_cool_until(&shm, 0), 0);
    atomic_store(&shm_wb(&shm, 1, 0)->cool_until_ns, 5000);
    atomic_store(&shm_wb(&shm, 0, 0)->cool_until_ns, 3000);
    assert_int_equal(shm_backend_cool_until(&shm, 0), 5000);
    shm_destroy(&shm);
}

/* p2c must not see a fast failure as a fast backend, nor keep an old slow figure for ever. */
static void test_ewma_failure_penalty_and_decay(void **state)
{
    struct shm shm;
    const uint64_t s = 1000000000ULL;

    assert_int_equal(shm_create(&shm, 1, 1, 1), 0);
    shm_wb_record_fail(&shm, 0, 0, 10 * s); /* never measured, fails fast */
    assert_int_equal(shm_backend_ewma(&shm, 0, 10 * s), SHM_EWMA_FAIL_NS);
    shm_wb_record_fail(&shm, 0, 0, 10 * s); /* doubles */
    assert_int_equal(shm_backend_ewma(&shm, 0, 10 * s), 2 * SHM_EWMA_FAIL_NS);
    /* halves every half-life without a new sample, down to nothing */
    assert_int_equal(shm_backend_ewma(&shm, 0, 10 * s + SHM_EWMA_HALF_LIFE_NS), SHM_EWMA_FAIL_NS);
    assert_int_equal(shm_backend_ewma(&shm, 0, 10 * s + 3 * SHM_EWMA_HALF_LIFE_NS),
                     SHM_EWMA_FAIL_NS / 4);
    assert_int_equal(shm_backend_ewma(&shm, 0, 10 * s + 100 * SHM_EWMA_HALF_LIFE_NS), 0);
    /* capped at 60 s however often it fails */
    for (int i = 0; i < 20; i++)
        shm_wb_record_fail(&shm, 0, 0, 11 * s);
    assert_int_equal(shm_backend_ewma(&shm, 0, 11 * s), 60 * SHM_EWMA_FAIL_NS);
    shm_destroy(&shm);
}

/* The retry budget window is pool-wide: every worker's buckets of every backend of the pool,
 * over the last SHM_BUDGET_SECS seconds. */
static void test_budget_window(void **state)
{
    struct shm shm;
    uint64_t req, ret;
    const uint64_t s = 1000000000ULL;

    assert_int_equal(shm_create(&shm, 3, 2, 1), 0);
    for (int i = 0; i < 10; i++)
        shm_wb_budget_note(&shm, 0, 0, 100 * s, 0);
    for (int i = 0; i < 5; i++)
        shm_wb_budget_note(&shm, 1, 1, 103 * s + 500000000ULL, 0);
    shm_wb_budget_note(&shm, 1, 1, 104 * s, 1);
    shm_wb_budget_note(&shm, 0, 2, 104 * s, 1); /* another pool's backend */
    shm_budget_window(&shm, 0, 2, 105 * s, &req, &ret);
    assert_int_equal(req, 15);
    assert_int_equal(ret, 1);
    /* 10 s after the first second, it has left the window */
    shm_budget_window(&shm, 0, 2, 110 * s, &req, &ret);
    assert_int_equal(req, 5);
    assert_int_equal(ret, 1);
    /* a bucket reused for a new second starts from zero */
    shm_wb_budget_note(&shm, 0, 0, 110 * s, 0);
    shm_budget_window(&shm, 0, 1, 110 * s, &req, &ret);
    assert_int_equal(req, 1);
    shm_budget_window(&shm, 0, 3, 119 * s, &req, &ret);
    assert_int_equal(req, 1);
    assert_int_equal(ret, 0);
    shm_destroy(&shm);
}

/* Two processes, workers 0 and 1, each try 200,000 times to be admitted to backend 0 (limit 1)
 * while the other may be; an admitted one counts itself in a shared counter apart from shm.
 * Returns 1 when the limit held throughout. */
static int race_admission(struct shm *shm, int (*acquire)(struct shm *, uint32_t, uint32_t),
                          void (*release)(struct shm *, uint32_t, uint32_t))
{
    _Atomic int *admitted =
        mmap(NULL, sizeof(*admitted), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    pid_t pids[2];
    int status, ok = 1;

    assert_true(admitted != MAP_FAILED);
    *admitted = 0;
    for (int w = 0; w < 2; w++) {
        pids[w] = fork();
        assert_true(pids[w] >= 0);
        if (pids[w] == 0) {
            int bad = 0;

            for (int i = 0; i < 200000; i++) {
                if (acquire(shm, (uint32_t)w, 0)) {
                    if (atomic_fetch_add(admitted, 1) != 0)
                        bad = 1;
                    atomic_fetch_sub(admitted, 1);
                    release(shm, (uint32_t)w, 0);
                }
            }
            _exit(bad);
        }
    }
    for (int w = 0; w < 2; w++) {
        assert_int_equal(waitpid(pids[w], &status, 0), pids[w]);
        ok &= WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }
    munmap((void *)admitted, sizeof(*admitted));
    return ok;
}

/* Rounds raced by n processes (workers 0..n-1): the parent prepares round r, releases them all
 * at once, each calls act(w, r) (its result kept in got[w]), waits until all have, then calls
 * after(w, r, got[w]); then the parent asks check(r, got). Returns the number of rounds that
 * check refused. */
#define RACE_MAX 8
struct race {
    _Atomic int round, acted, done;
    _Atomic uint64_t start_ns; /* when round `round` starts */
    int got[RACE_MAX];
};

static uint64_t race_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

struct race_ops {
    void (*prepare)(struct shm *shm, int r);
    int (*act)(struct shm *shm, uint32_t w, int r);
    void (*after)(struct shm *shm, uint32_t w, int r, int got);
    int (*check)(struct shm *shm, int r, const int *got, int n);
};

static void race_wait(_Atomic int *v, int want)
{
    while (atomic_load(v) < want)
        sched_yield();
}

static int race_rounds(struct shm *shm, int n, int rounds, const struct race_ops *ops)
{
    struct race *rc =
        mmap(NULL, sizeof(*rc), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    pid_t pids[RACE_MAX];
    int status, bad = 0;

    assert_true(rc != MAP_FAILED && n <= RACE_MAX);
    memset(rc, 0, sizeof(*rc));
    atomic_store(&rc->round, -1);
    for (int w = 0; w < n; w++) {
        pids[w] = fork();
        assert_true(pids[w] >= 0);
        if (pids[w] == 0) {
            for (int r = 0; r < rounds; r++) {
                /* wait for the round, yielding so that the parent runs on a busy machine, then
                 * spin to its start time: the processes start within nanoseconds */
                while (atomic_load(&rc->round) < r)
                    sched_yield();
                while (race_now() < atomic_load(&rc->start_ns))
                    ;
                rc->got[w] = ops->act(shm, (uint32_t)w, r);
                atomic_fetch_add(&rc->acted, 1);
                race_wait(&rc->acted, n * (r + 1));
                if (ops->after)
                    ops->after(shm, (uint32_t)w, r, rc->got[w]);
                atomic_fetch_add(&rc->done, 1);
            }
            _exit(0);
        }
    }
    for (int r = 0; r < rounds; r++) {
        if (ops->prepare)
            ops->prepare(shm, r);
        atomic_store(&rc->start_ns, race_now() + 200000);
        atomic_store(&rc->round, r);
        race_wait(&rc->done, n * (r + 1));
        bad += !ops->check(shm, r, rc->got, n);
    }
    for (int w = 0; w < n; w++) {
        assert_int_equal(waitpid(pids[w], &status, 0), pids[w]);
        assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    munmap(rc, sizeof(*rc));
    return bad;
}

static int trial_acquire_1(struct shm *shm, uint32_t w, uint32_t b)
{
    return shm_trial_acquire(shm, w, b, 1);
}

/* Trial admission is exact across processes: the limit of 1 is never exceeded. */
static void test_trials_never_exceed_limit(void **state)
{
    struct shm shm;

    assert_int_equal(shm_create(&shm, 1, 3, 1), 0);
    assert_true(race_admission(&shm, trial_acquire_1, shm_trial_release));
    assert_int_equal(shm_trials_in_flight(&shm, 0), 0);
    /* A dead worker's trials are given back by the slot reset. */
    assert_true(shm_trial_acquire(&shm, 2, 0, 2));
    assert_true(shm_trial_acquire(&shm, 2, 0, 2));
    assert_false(shm_trial_acquire(&shm, 0, 0, 2));
    assert_int_equal(shm_trials_in_flight(&shm, 0), 2);
    shm_worker_reset(&shm, 2);
    assert_int_equal(shm_trials_in_flight(&shm, 0), 0);
    assert_true(shm_trial_acquire(&shm, 0, 0, 2));
    shm_destroy(&shm);
}

/* max_conns admission: exact across processes, like trials; unlimited just counts. */
static void test_active_acquire(void **state)
{
    struct shm shm;
    struct shm_backend_totals t;

    assert_int_equal(shm_create(&shm, 2, 2, 1), 0);
    shm_backend_init(&shm, 0, 1, 2);
    shm_backend_init(&shm, 1, 1, 0);
    assert_true(shm_active_acquire(&shm, 0, 1));
    assert_true(shm_active_acquire(&shm, 1, 1));
    shm_backend_totals(&shm, 1, &t);
    assert_int_equal(t.active, 2);
    assert_true(shm_active_acquire(&shm, 0, 0));
    assert_true(shm_active_acquire(&shm, 1, 0));
    assert_false(shm_active_acquire(&shm, 0, 0)); /* full: refused, share unchanged */
    assert_int_equal(shm_wb(&shm, 0, 0)->active, 1);
    shm_active_release(&shm, 0, 0);
    shm_active_release(&shm, 1, 0);
    shm_active_release(&shm, 1, 0); /* nothing of worker 1's left: no effect */
    shm_backend_totals(&shm, 0, &t);
    assert_int_equal(t.active, 0);
    assert_true(shm_active_acquire(&shm, 1, 0));
    assert_true(shm_active_acquire(&shm, 0, 0));
    shm_active_release(&shm, 1, 0);
    shm_active_release(&shm, 0, 0);
    shm_backend_init(&shm, 0, 1, 1); /* race_admission races for backend 0, limit 1 */
    assert_true(race_admission(&shm, shm_active_acquire, shm_active_release));
    assert_int_equal(shm_wb(&shm, 0, 0)->active + shm_wb(&shm, 1, 0)->active, 0);
    assert_int_equal(atomic_load(&shm_backend(&shm, 0)->inflight.active), 0);
    shm_destroy(&shm);
}

/* Two workers racing for the last max_conns slot: exactly one gets it, every round (a claim
 * where both count themselves and then both see the other would refuse both: a 503 with a slot
 * free). Backend 0 has max_conns 2, one slot held by a third worker. */
static int last_slot_act(struct shm *shm, uint32_t w, int r)
{
    return shm_active_acquire(shm, w, 0);
}

static void last_slot_after(struct shm *shm, uint32_t w, int r, int got)
{
    if (got)
        shm_active_release(shm, w, 0);
}

static int last_slot_check(struct shm *shm, int r, const int *got, int n)
{
    return got[0] + got[1] == 1;
}

static void test_last_slot_exactly_one_wins(void **state)
{
    static const struct race_ops ops = {NULL, last_slot_act, last_slot_after, last_slot_check};
    struct shm shm;

    assert_int_equal(shm_create(&shm, 1, 3, 1), 0);
    shm_backend_init(&shm, 0, 1, 2);
    assert_true(shm_active_acquire(&shm, 2, 0));
    assert_int_equal(race_rounds(&shm, 2, 5000, &ops), 0);
    shm_destroy(&shm);
}

/* A worker that dies in the middle of a claim: the shared count is set right from the workers'
 * own shares once the master has reset the dead one, never while a claim is under way. */
static void test_claims_repair_after_death(void **state)
{
    struct shm shm;
    struct shm_backend *be;

    assert_int_equal(shm_create(&shm, 1, 2, 1), 0);
    shm_backend_init(&shm, 0, 1, 2);
    be = shm_backend(&shm, 0);
    assert_true(shm_active_acquire(&shm, 0, 0));
    assert_int_equal(shm_claims_repair(&shm, 0), 0); /* settled and right */
    /* worker 1 dies between its compare-and-swap and counting its share */
    atomic_store(&shm_wb(&shm, 1, 0)->claim_seq, 1);
    atomic_fetch_add(&be->inflight.active, 1);
    assert_int_equal(shm_claims_repair(&shm, 0), 0); /* a claim under way: left alone */
    assert_false(shm_active_acquire(&shm, 0, 0));    /* full, by the lost claim */
    shm_worker_reset(&shm, 1);
    assert_int_equal(atomic_load(&be->inflight.active), 1);
    assert_true(shm_active_acquire(&shm, 0, 0));
    /* worker 1 again, after counting its share (trials too): the reset gives both back */
    assert_true(shm_trial_acquire(&shm, 1, 0, 5));
    atomic_store(&shm_wb(&shm, 1, 0)->claim_seq, atomic_load(&shm_wb(&shm, 1, 0)->claim_seq) + 1);
    atomic_fetch_add(&be->inflight.trials, 1);
    atomic_fetch_add(&shm_wb(&shm, 1, 0)->trials, 1);
    shm_worker_reset(&shm, 1);
    assert_int_equal(shm_trials_in_flight(&shm, 0), 0);
    assert_int_equal(atomic_load(&be->inflight.active), 2);
    /* a drift with no claim under way is repaired by whoever looks (the checker) */
    atomic_fetch_add(&be->inflight.trials, 3);
    assert_int_equal(shm_claims_repair(&shm, 0), 1);
    assert_int_equal(shm_trials_in_flight(&shm, 0), 0);
    shm_destroy(&shm);
}

/* Thresholds hold however many workers fail at once: 4 processes each record one failure per
 * round, together the 4th: the gate trips in every round (max_fails 4 within the window, and 4
 * consecutive failures), never in a round one short of it. */
static const struct shm_admission race_all = {
    .kind = SHM_ADMIT_ALL, .max_fails = 4, .fail_window_ns = 1000000, .consec = 4};

static void trip_prepare(struct shm *shm, int r)
{
    publish(shm, 0, &race_all, (uint64_t)r * 100, 1);
}

static int trip_act(struct shm *shm, uint32_t w, int r)
{
    /* round r % 3 == 2: worker 3 sits it out, 3 failures */
    if (r % 3 == 2 && w == 3)
        return 0;
    shm_wb_record_fail(shm, w, 0, (uint64_t)r * 100 + 1 + w);
    return 1;
}

static int trip_check(struct shm *shm, int r, const int *got, int n)
{
    uint32_t trips = view(shm, 0).trips;

    if (r % 3 == 2)
        return trips == 0;
    return trips == (SHM_TRIP_PASSIVE | SHM_TRIP_BREAKER);
}

/* Trials: 4 processes each report a success of the epoch's trials, `need` 4: PASSED every
 * round, with the count exact. */
static void pass_prepare(struct shm *shm, int r)
{
    struct shm_admission a = {.kind = SHM_ADMIT_TRIAL, .trials = 4, .need = 4, .fail_stops = 1};

    publish(shm, 0, &a, 0, 1);
}

static int pass_act(struct shm *shm, uint32_t w, int r)
{
    shm_trial_outcome(shm, 0, view(shm, 0).h->epoch, 1);
    return 1;
}

static int pass_check(struct shm *shm, int r, const int *got, int n)
{
    struct shm_backend_view v = view(shm, 0);

    return v.trips == SHM_TRIP_PASSED && v.trial_ok == 4;
}

static void test_trips_race(void **state)
{
    static const struct race_ops trip = {trip_prepare, trip_act, NULL, trip_check};
    static const struct race_ops pass = {pass_prepare, pass_act, NULL, pass_check};
    struct shm shm;

    assert_int_equal(shm_create(&shm, 1, 4, 1), 0);
    assert_int_equal(race_rounds(&shm, 4, 600, &trip), 0);
    assert_int_equal(race_rounds(&shm, 4, 600, &pass), 0);
    shm_destroy(&shm);
}

static void test_breaker_fields_and_commands(void **state)
{
    struct shm shm;

    assert_int_equal(shm_create(&shm, 1, 1, 1), 0);
    assert_int_equal(view(&shm, 0).h->breaker, BREAKER_CLOSED);
    assert_int_equal(shm_backend_breaker_cmd_take(&shm, 0), BREAKER_CMD_NONE);
    shm_backend_breaker_cmd(&shm, 0, BREAKER_CMD_OPEN);
    assert_int_equal(shm_backend_breaker_cmd_take(&shm, 0), BREAKER_CMD_OPEN);
    assert_int_equal(shm_backend_breaker_cmd_take(&shm, 0), BREAKER_CMD_NONE); /* once */
    shm_backend_set_breaker(&shm, 0, BREAKER_OPEN, 77, 10);
    assert_int_equal(view(&shm, 0).h->breaker, BREAKER_OPEN);
    assert_int_equal(view(&shm, 0).h->breaker_until_ns, 77);
    assert_int_equal(view(&shm, 0).h->breaker_open_ns, 10);
    assert_string_equal(shm_breaker_str(BREAKER_HALF_OPEN), "half-open");
    assert_string_equal(shm_state_str(BACKEND_DEGRADED), "DEGRADED");
    assert_string_equal(shm_reason_str(REASON_PASSIVE), "passive");
    shm_destroy(&shm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout),
        cmocka_unit_test(test_rejects_bad_sizes),
        cmocka_unit_test(test_attach_by_fd),
        cmocka_unit_test(test_ai_regions),
        cmocka_unit_test(test_shared_across_fork),
        cmocka_unit_test(test_totals_and_worker_reset),
        cmocka_unit_test(test_carry_counters),
        cmocka_unit_test(test_record_and_admin),
        cmocka_unit_test(test_record_writer_dies_midway),
        cmocka_unit_test(test_admit_logic),
        cmocka_unit_test(test_trips),
        cmocka_unit_test(test_outcomes_and_failure_window),
        cmocka_unit_test(test_peak_ewma_and_cooling),
        cmocka_unit_test(test_ewma_failure_penalty_and_decay),
        cmocka_unit_test(test_budget_window),
        cmocka_unit_test(test_trials_never_exceed_limit),
        cmocka_unit_test(test_active_acquire),
        cmocka_unit_test(test_last_slot_exactly_one_wins),
        cmocka_unit_test(test_claims_repair_after_death),
        cmocka_unit_test(test_trips_race),
        cmocka_unit_test(test_breaker_fields_and_commands),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
