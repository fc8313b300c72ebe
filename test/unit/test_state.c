/* Unit tests of core/state.c: budgets and usage totals saved and loaded back by name, unknown
 * names skipped, the file replaced whole, and damaged files reported with FILE:LINE. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/state.h"
#include "shm/limit.c" /* to hold a limiter's lock */

#define WALL 1773615600LL /* 2026-03-15T23:00:00Z */

struct world {
    struct limit_region *limits;
    struct acct_region *acct;
    void *lmem, *amem;
    size_t ls, as;
};

static const char *const key_names[] = {"team a", "ci", "100%"};
static const char *const model_names[] = {"gpt-4o"};
static const char *const backend_names[] = {"b1", "b2"};

static void world_new(struct world *w, uint32_t n_keys)
{
    struct limit_spec specs[3] = {{.budget_nano = 1000000, .period = LIMIT_PERIOD_DAY},
                                  {.budget_nano = 500, .period = LIMIT_PERIOD_TOTAL},
                                  {.rpm = 5}};
    size_t ls = limit_region_size(n_keys, specs, 2), as = acct_region_size(n_keys, 1, 2, 2);

    /* shared, as in the segment: a forked child's lock is seen */
    w->lmem = mmap(NULL, ls, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    w->amem = mmap(NULL, as, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(w->lmem != MAP_FAILED && w->amem != MAP_FAILED);
    w->ls = ls;
    w->as = as;
    assert_int_equal(limit_region_init(w->lmem, ls, n_keys, specs, 2, WALL), 0);
    assert_int_equal(acct_region_init(w->amem, as, n_keys, 1, 2, 2), 0);
    w->limits = w->lmem;
    w->acct = w->amem;
}

static void world_free(struct world *w)
{
    munmap(w->lmem, w->ls);
    munmap(w->amem, w->as);
}

static char *tmpdir(void)
{
    char *d = strdup("/tmp/aigw-state-XXXXXX");

    assert_non_null(mkdtemp(d));
    return d;
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");

    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_round_trip(void **state)
{
    struct state_names names = {key_names, 3, model_names, 1, backend_names, 2};
    struct acct_usage u = {.requests = 1,
                           .prompt = 10,
                           .completion = 20,
                           .cached = 3,
                           .reasoning = 4,
                           .partial = 1,
                           .cost_nano = 900,
                           .list_cost_nano = 1800},
                      got;
    struct limit_ticket t;
    struct limit_verdict v;
    struct limit_budget b;
    struct world w, w2;
    char *dir = tmpdir(), path[256], *err = NULL;
    uint32_t id = 0;
    struct stat st;

    world_new(&w, 3);
    assert_int_equal(limit_admit(w.limits, &id, 1, 0, WALL, 0, 5000, 0, &t, &v), 0);
    limit_settle(w.limits, &t, 0, WALL, 0, 4321);
    id = 1;
    assert_int_equal(limit_admit(w.limits, &id, 1, 0, WALL, 0, 400, 1, &t, &v), 0);
    limit_settle(w.limits, &t, 0, WALL, 0, 400);
    acct_add(w.acct, 0, 0, 0, 1, &u);
    acct_add(w.acct, 1, 0, 0, 1, &u);
    acct_add(w.acct, 1, 2, -1, 0, &u);
    snprintf(path, sizeof(path), "%s/state", dir);
    assert_int_equal(state_save(path, &names, w.limits, w.acct, WALL, &err), 0);
    assert_null(err);
    /* Saved again over the old one: no temp file left behind. */
    assert_int_equal(state_save(path, &names, w.limits, w.acct, WALL, &err), 0);
    assert_int_equal(stat(path, &st), 0);

    /* A new start, with the keys in another order, one removed and one added. */
    {
        static const char *const keys2[] = {"100%", "new", "ci", "team a"};
        struct state_names names2 = {keys2, 4, model_names, 1, backend_names, 2};

        world_new(&w2, 3);
        names2.n_keys = 3; /* "team a" removed from the config */
        assert_int_equal(state_load(path, &names2, w2.limits, w2.acct, &err), 0);
        assert_null(err);
        /* "100%" is now key 0, its usage follows it; its budget was saved with another
         * period kind (month) than key 0's (day): not taken. */
        assert_int_equal(limit_budget_get(w2.limits, 0, &b), 0);
        assert_int_equal(b.spent_nano, 0);
        assert_int_equal(acct_get(w2.acct, ACCT_KEY, 0, &got), 0);
        assert_int_equal(got.requests, 1);
        assert_int_equal(acct_get(w2.acct, ACCT_KEY, 2, &got), 0);
        assert_int_equal(got.requests, 0);
        world_free(&w2);
    }
    world_new(&w2, 3);
    assert_int_equal(state_load(path, &names, w2.limits, w2.acct, &err), 0);
    assert_int_equal(limit_budget_get(w2.limits, 0, &b), 0);
    assert_int_equal(b.period, LIMIT_PERIOD_DAY);
    assert_int_equal(b.period_start, 1773532800LL);
    assert_int_equal(b.spent_nano, 4321);
    assert_int_equal(b.reserved_nano, 0);
    assert_int_equal(limit_budget_get(w2.limits, 1, &b), 0);
    assert_int_equal(b.spent_nano, 400);
    /* The restored budget holds: 100 left of the total 500. */
    id = 1;
    assert_int_equal(limit_admit(w2.limits, &id, 1, 0, WALL, 0, 101, 0, &t, &v), -EAGAIN);
    assert_int_equal(v.dim, LIMIT_BUDGET);
    assert_int_equal(limit_admit(w2.limits, &id, 1, 0, WALL, 0, 100, 0, &t, &v), 0);
    assert_int_equal(acct_get(w2.acct, ACCT_KEY, 0, &got), 0);
    assert_int_equal(got.requests, 2);
    assert_int_equal(got.prompt, 20);
    assert_int_equal(got.completion, 40);
    assert_int_equal(got.cached, 6);
    assert_int_equal(got.reasoning, 8);
    assert_int_equal(got.partial, 2);
    assert_int_equal(got.cost_nano, 1800);
    assert_int_equal(got.list_cost_nano, 3600);
    assert_int_equal(acct_get(w2.acct, ACCT_MODEL, 0, &got), 0);
    assert_int_equal(got.requests, 2);
    assert_int_equal(acct_get(w2.acct, ACCT_BACKEND, 1, &got), 0);
    assert_int_equal(got.requests, 2);
    assert_int_equal(acct_get(w2.acct, ACCT_BACKEND, 0, &got), 0);
    assert_int_equal(got.requests, 1);
    assert_int_equal(acct_get(w2.acct, ACCT_KEY, 2, &got), 0);
    assert_int_equal(got.requests, 1);
    /* Workers add to what was loaded. */
    acct_add(w2.acct, 1, 0, -1, -1, &u);
    assert_int_equal(acct_get(w2.acct, ACCT_KEY, 0, &got), 0);
    assert_int_equal(got.requests, 3);
    world_free(&w2);
    world_free(&w);
    unlink(path);
    rmdir(dir);
    free(dir);
}

static void expect_error(const char *text, const char *msg_tail)
{
    struct state_names names = {key_names, 3, model_names, 1, backend_names, 2};
    struct acct_usage got;
    struct world w;
    char *dir = tmpdir(), path[256], *err = NULL, *want;

    snprintf(path, sizeof(path), "%s/state", dir);
    write_file(path, text);
    world_new(&w, 3);
    assert_int_equal(state_load(path, &names, w.limits, w.acct, &err), -EINVAL);
    assert_non_null(err);
    assert_int_not_equal(asprintf(&want, "%s:%s", path, msg_tail), -1);
    assert_string_equal(err, want);
    /* Nothing of a damaged file is taken. */
    assert_int_equal(acct_get(w.acct, ACCT_KEY, 1, &got), 0);
    assert_int_equal(got.requests, 0);
    free(want);
    free(err);
    world_free(&w);
    unlink(path);
    rmdir(dir);
    free(dir);
}

static void test_corrupt(void **state)
{
    const char *good = "usage key ci requests=5\n";
    char buf[512];

    expect_error("", "1: empty file");
    expect_error("hello\n", "1: not an aigw state file");
    expect_error("aigw-state 2\nend\n", "1: unsupported state file version");
    snprintf(buf, sizeof(buf), "aigw-state 1\n%susage key ci requests=x\nend\n", good);
    expect_error(buf, "3: bad number");
    snprintf(buf, sizeof(buf), "aigw-state 1\n%sbudget ci period=week\nend\n", good);
    expect_error(buf, "3: bad period");
    snprintf(buf, sizeof(buf), "aigw-state 1\n%sfrobnicate\nend\n", good);
    expect_error(buf, "3: unknown line");
    snprintf(buf, sizeof(buf), "aigw-state 1\n%s", good);
    expect_error(buf, "3: file ends before 'end' (cut short)");
    snprintf(buf, sizeof(buf), "aigw-state 1\n%susage key ci requ", good);
    expect_error(buf, "3: line without an end (file cut short)");
    snprintf(buf, sizeof(buf), "aigw-state 1\n%send\nusage key ci requests=1\n", good);
    expect_error(buf, "4: text after 'end'");
    snprintf(buf, sizeof(buf), "aigw-state 1\nusage key %%zz requests=1\nend\n");
    expect_error(buf, "2: bad name");
}

static void test_missing_and_unknown(void **state)
{
    struct state_names names = {key_names, 3, model_names, 1, backend_names, 2};
    struct acct_usage got;
    struct world w;
    char *dir = tmpdir(), path[256], *err = NULL;

    snprintf(path, sizeof(path), "%s/state", dir);
    world_new(&w, 3);
    /* No file: a first start. */
    assert_int_equal(state_load(path, &names, w.limits, w.acct, &err), -ENOENT);
    assert_null(err);
    /* Unknown names and fields are skipped; comments are allowed. */
    write_file(path, "aigw-state 1\n# by hand\nsaved 5\nusage model gone requests=9\n"
                     "usage model gpt-4o requests=2 future=7\nbudget nobody spent=3\nend\n");
    assert_int_equal(state_load(path, &names, w.limits, w.acct, &err), 0);
    assert_int_equal(acct_get(w.acct, ACCT_MODEL, 0, &got), 0);
    assert_int_equal(got.requests, 2);
    /* A directory that cannot be written: an error naming the file, the old file stays. */
    assert_int_equal(state_save("/nonexistent-dir/state", &names, w.limits, w.acct, WALL, &err),
                     -ENOENT);
    assert_non_null(err);
    assert_non_null(strstr(err, "/nonexistent-dir/state.tmp"));
    free(err);
    world_free(&w);
    unlink(path);
    rmdir(dir);
    free(dir);
}

/* Two lines for the same budget or the same usage KIND NAME are an error with FILE:LINE (the
 * same name under two kinds is not; nor are unknown names, which are skipped). */
static void test_duplicates(void **state)
{
    expect_error("aigw-state 1\nbudget ci period=total spent=1\nbudget ci period=total spent=2\n"
                 "end\n",
                 "3: a second budget line for this key");
    expect_error("aigw-state 1\nusage key ci requests=1\nusage model gpt-4o requests=1\n"
                 "usage key ci requests=2\nend\n",
                 "4: a second usage line for this name");
    expect_error("aigw-state 1\nusage backend b2 requests=1\nusage backend b1 requests=1\n"
                 "usage backend b2 requests=2\nend\n",
                 "4: a second usage line for this name");

    struct state_names names = {key_names, 3, model_names, 1, backend_names, 2};
    struct acct_usage got;
    struct world w;
    char *dir = tmpdir(), path[256], *err = NULL;

    snprintf(path, sizeof(path), "%s/state", dir);
    write_file(path, "aigw-state 1\nusage key ci requests=1\nusage model ci requests=2\n"
                     "budget ci period=total spent=3\nusage key gone requests=1\n"
                     "usage key gone requests=1\nend\n");
    world_new(&w, 3);
    assert_int_equal(state_load(path, &names, w.limits, w.acct, &err), 0);
    assert_int_equal(acct_get(w.acct, ACCT_KEY, 1, &got), 0);
    assert_int_equal(got.requests, 1);
    world_free(&w);
    unlink(path);
    rmdir(dir);
    free(dir);
}

/* The log lines (stderr) written while fn runs on path. */
static char *stderr_of(int (*fn)(const char *, struct world *), const char *path, struct world *w,
                       int *rc)
{
    char tmp[] = "/tmp/aigw-state-log-XXXXXX";
    int fd = mkstemp(tmp), saved = dup(2);
    char *text = calloc(1, 8192);

    assert_true(fd >= 0 && saved >= 0 && text);
    fflush(stderr);
    dup2(fd, 2);
    *rc = fn(path, w);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    assert_true(pread(fd, text, 8191, 0) >= 0);
    close(fd);
    unlink(tmp);
    return text;
}

static int load_it(const char *path, struct world *w)
{
    struct state_names names = {key_names, 3, model_names, 1, backend_names, 2};
    char *err = NULL;
    int rc = state_load(path, &names, w->limits, w->acct, &err);

    free(err);
    return rc;
}

/* budget_period changed since the save: spent carried into a period that holds the saved one,
 * dropped otherwise, and a warning names the key either way. */
static void test_period_change(void **state)
{
    struct limit_budget b;
    struct world w;
    char *dir = tmpdir(), path[256], *log;
    int rc;

    snprintf(path, sizeof(path), "%s/state", dir);
    /* "team a" counts by day now (was total), "ci" in total (was day), "100%" by month (as
     * saved: no word) */
    write_file(path, "aigw-state 1\nbudget team%20a period=total start=0 spent=7000000000\n"
                     "budget ci period=day start=1773532800 spent=300\n"
                     "budget 100%25 period=month start=1772323200 spent=5\nend\n");
    world_new(&w, 3);
    log = stderr_of(load_it, path, &w, &rc);
    assert_int_equal(rc, 0);
    assert_int_equal(limit_budget_get(w.limits, 0, &b), 0);
    assert_int_equal(b.spent_nano, 0);
    assert_int_equal(limit_budget_get(w.limits, 1, &b), 0);
    assert_int_equal(b.spent_nano, 300);
    assert_non_null(strstr(log, ":2: key 'team a': budget_period is now day, was total when "
                                "saved: the 7.000000000 USD spent is dropped"));
    assert_non_null(strstr(log, ":3: key 'ci': budget_period is now total, was day when saved: "
                                "the 0.000000300 USD spent is carried into the new period"));
    assert_null(strstr(log, "100%"));
    free(log);
    world_free(&w);
    unlink(path);
    rmdir(dir);
    free(dir);
}

/* A worker stopped holding a key's limiter lock: the save gives up in bounded time, keeps the
 * previous file whole, leaves no temp file, and says which key. */
static void test_save_busy(void **state)
{
    struct state_names names = {key_names, 3, model_names, 1, backend_names, 2};
    struct world w;
    char *dir = tmpdir(), path[256], *err = NULL, buf[64] = {0};
    pid_t pid;
    int st;
    FILE *f;

    snprintf(path, sizeof(path), "%s/state", dir);
    write_file(path, "previous\n");
    world_new(&w, 3);
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        cell_lock(w.limits, 1);
        raise(SIGSTOP);
        _exit(0);
    }
    assert_int_equal(waitpid(pid, &st, WUNTRACED), pid);
    assert_true(WIFSTOPPED(st));
    alarm(10);
    assert_int_equal(state_save(path, &names, w.limits, w.acct, WALL, &err), -EBUSY);
    alarm(0);
    assert_non_null(err);
    assert_non_null(strstr(err, "the previous file is kept: the limiter of key 'ci' is busy"));
    free(err);
    f = fopen(path, "r");
    assert_non_null(f);
    assert_non_null(fgets(buf, sizeof(buf), f));
    fclose(f);
    assert_string_equal(buf, "previous\n");
    kill(pid, SIGKILL);
    assert_int_equal(waitpid(pid, &st, 0), pid);
    /* once it is gone the save goes through */
    err = NULL;
    assert_int_equal(state_save(path, &names, w.limits, w.acct, WALL, &err), 0);
    world_free(&w);
    unlink(path);
    assert_int_equal(rmdir(dir), 0); /* no temp file left */
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),          cmocka_unit_test(test_corrupt),
        cmocka_unit_test(test_missing_and_unknown), cmocka_unit_test(test_duplicates),
        cmocka_unit_test(test_period_change),       cmocka_unit_test(test_save_busy),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
