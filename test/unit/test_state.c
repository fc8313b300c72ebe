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
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/state.h"

#define WALL 1773615600LL /* 2026-03-15T23:00:00Z */

struct world {
    struct limit_region *limits;
    struct acct_region *acct;
    void *lmem, *amem;
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

    w->lmem = aligned_alloc(64, ls);
    w->amem = aligned_alloc(64, as);
    assert_int_equal(limit_region_init(w->lmem, ls, n_keys, specs, 2, WALL), 0);
    assert_int_equal(acct_region_init(w->amem, as, n_keys, 1, 2, 2), 0);
    w->limits = w->lmem;
    w->acct = w->amem;
}

static void world_free(struct world *w)
{
    free(w->lmem);
    free(w->amem);
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_corrupt),
        cmocka_unit_test(test_missing_and_unknown),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
