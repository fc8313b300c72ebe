/* Unit tests for admin_exec: tables and JSON over a real shm segment and a hand-built conf. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#define JSMN_STATIC
#include <jsmn.h>

#include "core/admin.h"
#define cell limit_cell_of /* test_admin has its own cell() */
#include "shm/limit.c"     /* to hold a limiter's lock */
#undef cell
#include "core/util.h"

/* Two pools, three backends, two workers. */
struct fixture {
    struct conf conf;
    struct conf_pool pools[2];
    struct conf_backend backends[3];
    struct conf_apikey keys[2];
    struct conf_model models[2];
    struct shm shm;
    struct admin_info info;
};

static void backend_init(struct conf_backend *b, const char *name, int pool, int tls,
                         const char *host, uint16_t port, const char *prefix, int weight)
{
    snprintf(b->name, sizeof(b->name), "%s", name);
    b->pool = pool;
    b->url.tls = tls;
    snprintf(b->url.host, sizeof(b->url.host), "%s", host);
    b->url.port = port;
    snprintf(b->url.prefix, sizeof(b->url.prefix), "%s", prefix);
    b->weight = weight;
}

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    snprintf(f->pools[0].name, sizeof(f->pools[0].name), "chat");
    f->pools[0].first_backend = 0;
    f->pools[0].n_backends = 2;
    snprintf(f->pools[1].name, sizeof(f->pools[1].name), "embeddings-pool");
    f->pools[1].first_backend = 2;
    f->pools[1].n_backends = 1;
    backend_init(&f->backends[0], "a1", 0, 0, "127.0.0.1", 9101, "/v1", 3);
    backend_init(&f->backends[1], "a2-with-a-long-name", 0, 1, "::1", 443, "/openai/v1", 1);
    backend_init(&f->backends[2], "e1", 1, 0, "127.0.0.1", 9103, "", 0);
    f->conf.pools = f->pools;
    f->conf.n_pools = 2;
    f->conf.backends = f->backends;
    f->conf.n_backends = 3;
    snprintf(f->conf.global.admin_socket, sizeof(f->conf.global.admin_socket), "aigw.sock");

    assert_int_equal(shm_create(&f->shm, 3, 2, 1), 0);
    for (uint32_t b = 0; b < 3; b++) {
        shm_backend_init(&f->shm, b, (uint32_t)f->backends[b].weight, 0);
    }
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    shm_destroy(&f->shm);
    free(f);
    return 0;
}

/* admin_exec with the pending command it reports. */
static char *run_pending(struct fixture *f, const char *line, int expect_rc,
                         struct admin_pending *pending)
{
    char *out = NULL;
    size_t len = 0;
    pending->backend = 12345; /* admin_exec must always set it */
    int rc = admin_exec(line, &f->conf, &f->shm, NULL, 0, NULL, pending, &out, &len);
    assert_int_equal(rc, expect_rc);
    assert_non_null(out);
    assert_int_equal(strlen(out), len);
    return out;
}

static char *run(struct fixture *f, const char *line, const struct admin_proc *procs, int n,
                 int expect_rc)
{
    char *out = NULL;
    size_t len = 0;
    int rc = admin_exec(line, &f->conf, &f->shm, procs, n, &f->info, NULL, &out, &len);
    assert_int_equal(rc, expect_rc);
    assert_non_null(out);
    assert_int_equal(strlen(out), len); /* NUL-terminated, length consistent */
    return out;
}

/* Parsed JSON: tokens over the text. */
struct json {
    const char *s;
    jsmntok_t tok[512];
    int n;
};

static void json_parse(struct json *j, const char *s)
{
    jsmn_parser p;
    jsmn_init(&p);
    j->s = s;
    j->n = jsmn_parse(&p, s, strlen(s), j->tok, 512);
    assert_true(j->n > 0);
}

/* Index of the token after token i, skipping its whole subtree. */
static int json_skip(const struct json *j, int i)
{
    int end = i + 1;
    for (int k = 0; k < j->tok[i].size; k++)
        end = json_skip(j, end);
    return end;
}

/* The value token of `key` in the object at token `obj`, or -1. */
static int json_get(const struct json *j, int obj, const char *key)
{
    assert_int_equal(j->tok[obj].type, JSMN_OBJECT);
    int i = obj + 1;
    for (int k = 0; k < j->tok[obj].size; k++) {
        const jsmntok_t *t = &j->tok[i];
        if (t->type == JSMN_STRING && (size_t)(t->end - t->start) == strlen(key) &&
            !memcmp(j->s + t->start, key, strlen(key)))
            return i + 1;
        i = json_skip(j, i + 1);
    }
    return -1;
}

/* The i-th element of the array at token `arr`. */
static int json_elem(const struct json *j, int arr, int idx)
{
    assert_int_equal(j->tok[arr].type, JSMN_ARRAY);
    assert_true(idx < j->tok[arr].size);
    int i = arr + 1;
    while (idx-- > 0)
        i = json_skip(j, i);
    return i;
}

static void assert_json_text(const struct json *j, int obj, const char *key, const char *want)
{
    int v = json_get(j, obj, key);
    assert_true(v > 0);
    char buf[512];
    int len = j->tok[v].end - j->tok[v].start;
    assert_true(len < (int)sizeof(buf));
    memcpy(buf, j->s + j->tok[v].start, (size_t)len);
    buf[len] = '\0';
    assert_string_equal(buf, want);
}

static void test_backends_json(void **state)
{
    struct fixture *f = *state;

    /* Counters are summed over both workers' slots. */
    atomic_store(&shm_wb(&f->shm, 0, 0)->active, 2);
    atomic_store(&shm_wb(&f->shm, 1, 0)->active, 3);
    atomic_store(&shm_wb(&f->shm, 0, 0)->requests, 100);
    atomic_store(&shm_wb(&f->shm, 1, 0)->requests, 23);
    atomic_store(&shm_wb(&f->shm, 1, 0)->failures, 7);
    shm_backend_set_state(&f->shm, 1, BACKEND_DOWN, REASON_CHECK_TIMEOUT, 1000);
    shm_backend_set_check(&f->shm, 1, -ETIMEDOUT, 2000500, 1000);
    shm_backend_set_check(&f->shm, 0, 200, 12345, 1000);
    atomic_store(&shm_backend(&f->shm, 2)->admin, BACKEND_MAINT);
    shm_backend_set_weight(&f->shm, 0, 2); /* effective, not configured */

    char *out = run(f, "show backends json", NULL, 0, 0);
    struct json j;
    json_parse(&j, out);
    assert_int_equal(j.tok[0].type, JSMN_ARRAY);
    assert_int_equal(j.tok[0].size, 3);

    int b0 = json_elem(&j, 0, 0), b1 = json_elem(&j, 0, 1), b2 = json_elem(&j, 0, 2);
    assert_json_text(&j, b0, "pool", "chat");
    assert_json_text(&j, b0, "name", "a1");
    assert_json_text(&j, b0, "url", "http://127.0.0.1:9101/v1");
    assert_json_text(&j, b0, "state", "UP");
    assert_json_text(&j, b0, "admin", "READY");
    assert_json_text(&j, b0, "breaker", "closed");
    assert_json_text(&j, b0, "weight", "2");
    assert_json_text(&j, b0, "active", "5");
    assert_json_text(&j, b0, "requests", "123");
    assert_json_text(&j, b0, "failures", "7");
    assert_json_text(&j, b0, "check_ms", "12");
    assert_json_text(&j, b0, "check_status", "200");
    assert_json_text(&j, b0, "reason", "none");

    assert_json_text(&j, b1, "url", "https://[::1]:443/openai/v1");
    assert_json_text(&j, b1, "state", "DOWN");
    assert_json_text(&j, b1, "reason", "check timeout");
    assert_json_text(&j, b1, "check_ms", "2001");
    char status[16];
    snprintf(status, sizeof(status), "%d", -ETIMEDOUT);
    assert_json_text(&j, b1, "check_status", status);

    assert_json_text(&j, b2, "pool", "embeddings-pool");
    assert_json_text(&j, b2, "admin", "MAINT");
    assert_json_text(&j, b2, "weight", "0");
    assert_json_text(&j, b2, "check_ms", "null");
    assert_json_text(&j, b2, "check_status", "null");
    assert_json_text(&j, b2, "requests", "0");
    free(out);

    /* "--json" is the same command. */
    char *out2 = run(f, "show backends --json", NULL, 0, 0);
    out = run(f, "show backends json", NULL, 0, 0);
    assert_string_equal(out, out2);
    free(out);
    free(out2);
}

/* Offset of column `name` in the header line. */
static int column(const char *header, const char *name)
{
    const char *p = strstr(header, name);
    assert_non_null(p);
    return (int)(p - header);
}

static void test_backends_table(void **state)
{
    struct fixture *f = *state;
    atomic_store(&shm_wb(&f->shm, 1, 2)->requests, 42);
    shm_backend_set_state(&f->shm, 2, BACKEND_DOWN, REASON_CHECK_CONNECT, 1000);
    shm_backend_set_check(&f->shm, 2, -ECONNREFUSED, 1500, 1000);
    shm_backend_set_breaker(&f->shm, 2, BREAKER_HALF_OPEN, 0, 0);
    shm_backend_set_state(&f->shm, 0, BACKEND_DEGRADED, REASON_CHECK_SLOW, 1000);

    char *out = run(f, "show backends", NULL, 0, 0);
    char *lines[8];
    int n = 0;
    for (char *save = NULL, *l = strtok_r(out, "\n", &save); l && n < 8;
         l = strtok_r(NULL, "\n", &save))
        lines[n++] = l;
    assert_int_equal(n, 4); /* header + 3 backends */

    const char *cols[] = {"POOL", "NAME", "STATE", "ADMIN", "BREAKER", "CHECK ", "REASON", "URL"};
    int pos[8];
    for (int i = 0; i < 8; i++)
        pos[i] = column(lines[0], cols[i]);
    for (int i = 1; i < 8; i++)
        assert_true(pos[i] > pos[i - 1]);

    /* Left-aligned cells start exactly under their header in every row. */
    const char *e1[] = {"embeddings-pool",
                        "e1",
                        "DOWN",
                        "READY",
                        "half-open",
                        "ECONNREFUSED",
                        "check connect failed",
                        "http://127.0.0.1:9103"};
    for (int i = 0; i < 8; i++)
        assert_memory_equal(lines[3] + pos[i], e1[i], strlen(e1[i]));
    assert_memory_equal(lines[2] + pos[1], "a2-with-a-long-name", 19);
    assert_memory_equal(lines[1] + pos[2], "DEGRADED", 8);
    assert_memory_equal(lines[1] + pos[4], "closed", 6);
    assert_memory_equal(lines[1] + pos[5], "-", 1); /* never checked */
    assert_non_null(strstr(lines[3], " 42 "));
    assert_non_null(strstr(lines[3], " 1.5 ")); /* LAST_CHECK_MS */
    assert_string_equal(lines[3] + pos[7], "http://127.0.0.1:9103");
    free(out);
}

static void test_proc(void **state)
{
    struct fixture *f = *state;
    struct admin_proc procs[] = {
        {"master", -1, 100, 1795672807000ULL, 0},
        {"health", -1, 101, 1795672807500ULL, 2},
        {"worker", 0, 102, 1795672808999ULL, 0},
        {"worker", 1, 0, 1795672807000ULL, 5}, /* being restarted */
    };

    char *out = run(f, "show proc json", procs, 4, 0);
    struct json j;
    json_parse(&j, out);
    assert_int_equal(j.tok[0].type, JSMN_ARRAY);
    assert_int_equal(j.tok[0].size, 4);
    int m = json_elem(&j, 0, 0), h = json_elem(&j, 0, 1), w0 = json_elem(&j, 0, 2),
        w1 = json_elem(&j, 0, 3);
    assert_json_text(&j, m, "role", "master");
    assert_json_text(&j, m, "slot", "-1");
    assert_json_text(&j, m, "pid", "100");
    assert_json_text(&j, m, "started", "1795672807");
    assert_json_text(&j, h, "role", "health");
    assert_json_text(&j, h, "restarts", "2");
    assert_json_text(&j, w0, "slot", "0");
    assert_json_text(&j, w0, "started", "1795672808"); /* seconds, truncated */
    assert_json_text(&j, w1, "slot", "1");
    assert_json_text(&j, w1, "pid", "0");
    assert_json_text(&j, w1, "restarts", "5");
    free(out);

    out = run(f, "  show   proc \r", procs, 4, 0);
    assert_non_null(strstr(out, "ROLE"));
    assert_non_null(strstr(out, "RESTARTS"));
    assert_non_null(strstr(out, "2026-11-26T06:00:07Z"));
    char *w1line = strstr(out, "worker     1");
    assert_non_null(w1line);
    assert_non_null(strstr(w1line, " - ")); /* no pid while restarting */
    int lines = 0;
    for (const char *p = out; *p; p++)
        lines += *p == '\n';
    assert_int_equal(lines, 5);
    free(out);
}

static void test_errors_and_help(void **state)
{
    struct fixture *f = *state;
    const char *bad[] = {
        "",          "show", "show nothing", "show backends xml json extra", "show proc json extra",
        "SHOW proc", "halt"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char *out = run(f, bad[i], NULL, 0, -EINVAL);
        assert_memory_equal(out, "error:", 6);
        free(out);
    }
    char *out = run(f, "help", NULL, 0, 0);
    assert_non_null(strstr(out, "show backends"));
    assert_non_null(strstr(out, "show proc"));
    assert_non_null(strstr(out, "breaker reset BACKEND"));
    assert_non_null(strstr(out, "breaker open BACKEND"));
    free(out);
}

/* Writes "breaker\0" at every 8-byte step of the stack below the caller, where admin_exec's
 * word array will be: a word the splitter never set then reads as "breaker". */
static void __attribute__((noinline)) stack_fill_breaker(void)
{
    volatile char pad[32768];
    for (size_t i = 0; i < sizeof(pad); i++)
        pad[i] = "breaker"[i % 8];
}

/* The splitter never reads a word it did not set: a first word too long to be a name leaves
 * none set, and the answer must not depend on what the stack held (it said "usage: breaker"
 * when it held "breaker"). Also many, empty and odd words. */
static void test_split_words(void **state)
{
    struct fixture *f = *state;
    char line[600];

    memset(line, 'x', 300);
    line[300] = '\0';
    stack_fill_breaker();
    char *out = run(f, line, NULL, 0, -EINVAL);
    assert_memory_equal(out, "error: unknown command 'xxx", 27);
    free(out);

    /* a long first word after blanks, and followed by more words */
    snprintf(line, sizeof(line), " \t%.*s show backends", 400,
             "yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy"
             "yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy"
             "yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy");
    stack_fill_breaker();
    out = run(f, line, NULL, 0, -EINVAL);
    assert_non_null(strstr(out, "unknown command"));
    free(out);

    /* the command word is set, a later one too long: the command's usage */
    snprintf(line, sizeof(line), "breaker reset %0300d", 7);
    out = run(f, line, NULL, 0, -EINVAL);
    assert_string_equal(out, "error: usage: breaker reset|open BACKEND\n");
    free(out);

    static const struct {
        const char *line, *answer;
    } cases[] = {
        {"", "error: unknown command ''; try 'help'\n"},
        {" \t\r\n ", "error: unknown command ' ?'; try 'help'\n"},
        {"a b c d e f g h i j k l",
         "error: unknown command 'a b c d e f g h i j k l'; try 'help'\n"},
        {"breaker", "error: usage: breaker reset|open BACKEND\n"},
        {"breaker reset a1 json extra more", "error: usage: breaker reset|open BACKEND\n"},
        {"set", "error: usage: set weight BACKEND N|N% | set backend BACKEND ready|drain|maint\n"},
        {"set backend a1 ready json x", "error: usage: set backend BACKEND ready|drain|maint\n"},
        {"\x01\xff help", "error: unknown command '?? help'; try 'help'\n"},
        /* aigwctl --json frobnicate: the json word is aigwctl's, not the operator's */
        {"frobnicate json", "error: unknown command 'frobnicate'; try 'help'\n"},
        {"frob nicate --json", "error: unknown command 'frob nicate'; try 'help'\n"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        stack_fill_breaker();
        out = run(f, cases[i].line, NULL, 0, -EINVAL);
        assert_string_equal(out, cases[i].answer);
        free(out);
    }
    /* blanks around a good command do not matter */
    out = run(f, "\t show   proc \r\n", NULL, 0, 0);
    free(out);
}

static void test_json_escaping(void **state)
{
    struct fixture *f = *state;
    /* Config names are restricted, but the output must stay valid JSON whatever they hold. */
    snprintf(f->backends[0].name, sizeof(f->backends[0].name), "q\"b\\s\x01\n");
    char *out = run(f, "show backends json", NULL, 0, 0);
    assert_non_null(strstr(out, "\"name\":\"q\\\"b\\\\s\\u0001\\n\""));
    struct json j;
    json_parse(&j, out);
    assert_int_equal(j.tok[0].size, 3);
    free(out);

    struct admin_proc p = {"work\"er", 0, 1, 0, 0};
    out = run(f, "show proc json", &p, 1, 0);
    assert_non_null(strstr(out, "\"role\":\"work\\\"er\""));
    free(out);
}

static void test_no_backends(void **state)
{
    struct fixture *f = *state;
    f->conf.n_backends = 0;
    char *out = run(f, "show backends json", NULL, 0, 0);
    assert_string_equal(out, "[]\n");
    free(out);
    out = run(f, "show proc json", NULL, 0, 0);
    assert_string_equal(out, "[]\n");
    free(out);
    out = run(f, "show backends", NULL, 0, 0);
    assert_non_null(strstr(out, "POOL"));
    assert_ptr_equal(strchr(out, '\n') + 1, out + strlen(out)); /* the header line only */
    free(out);
}

/* The integer value of a JSON number token. */
static long long json_int(const struct json *j, int obj, const char *key)
{
    int v = json_get(j, obj, key);
    assert_true(v > 0);
    assert_int_equal(j->tok[v].type, JSMN_PRIMITIVE);
    char buf[32];
    int len = j->tok[v].end - j->tok[v].start;
    assert_true(len > 0 && len < (int)sizeof(buf));
    memcpy(buf, j->s + j->tok[v].start, (size_t)len);
    buf[len] = '\0';
    char *end;
    long long x = strtoll(buf, &end, 10);
    assert_true(*end == '\0');
    return x;
}

/* Sets breaker, cooling, latency, retries and state-change times on the fixture's backends:
 * a1 open for 30 s more, cooling 8 s, EWMA 12.4 ms, changed 5 s ago;
 * a2 half-open, EWMA from one worker only; e1 untouched. */
static uint64_t resilience_state(struct fixture *f)
{
    uint64_t now = time_mono_ns();
    const uint64_t s = 1000000000ULL;

    shm_backend_set_breaker(&f->shm, 0, BREAKER_OPEN, now + 30 * s, 30 * s);
    atomic_store(&shm_wb(&f->shm, 1, 0)->cool_until_ns, now + 8 * s);
    atomic_store(&shm_wb(&f->shm, 0, 0)->cool_until_ns, now + 2 * s); /* the latest counts */
    shm_wb_record_ok(&f->shm, 0, 0, now, 12300000);                   /* first sample: taken */
    shm_wb_record_ok(&f->shm, 1, 0, now, 12500000);                   /* mean of workers */
    atomic_store(&shm_wb(&f->shm, 0, 0)->retries, 4);
    atomic_store(&shm_wb(&f->shm, 1, 0)->retries, 3);
    shm_backend_set_state(&f->shm, 0, BACKEND_DEGRADED, REASON_CHECK_SLOW, now - 5 * s - s / 2);
    shm_backend_set_weight(&f->shm, 0, 1);

    shm_backend_set_breaker(&f->shm, 1, BREAKER_HALF_OPEN, 0, 30 * s);
    shm_wb_record_ok(&f->shm, 1, 1, now, 40);                         /* 40 ns: 0.0 ms, not null */
    atomic_store(&shm_wb(&f->shm, 0, 1)->cool_until_ns, now - 1 * s); /* cooling is over */
    return now;
}

static void test_backends_json_resilience(void **state)
{
    struct fixture *f = *state;
    resilience_state(f);

    char *out = run(f, "show backends json", NULL, 0, 0);
    struct json j;
    json_parse(&j, out);
    assert_int_equal(j.tok[0].size, 3);
    int b0 = json_elem(&j, 0, 0), b1 = json_elem(&j, 0, 1), b2 = json_elem(&j, 0, 2);

    assert_json_text(&j, b0, "state", "DEGRADED");
    assert_json_text(&j, b0, "breaker", "open");
    long long left = json_int(&j, b0, "breaker_left_ms");
    assert_true(left > 29000 && left <= 30000);
    long long cool = json_int(&j, b0, "cooling_ms");
    assert_true(cool > 7000 && cool <= 8000);
    assert_json_text(&j, b0, "ewma_ms", "12.4");
    assert_json_text(&j, b0, "weight", "1");
    assert_json_text(&j, b0, "weight_cfg", "3");
    assert_json_text(&j, b0, "retries", "7");
    assert_json_text(&j, b0, "reason", "check slow");
    assert_json_text(&j, b0, "since_s", "5");
    /* The fields from before are all still there. */
    const char *keys[] = {"pool",         "name",   "url",      "state",    "admin",
                          "weight",       "active", "requests", "failures", "check_ms",
                          "check_status", "reason", "breaker"};
    for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++)
        assert_true(json_get(&j, b0, keys[k]) > 0);

    assert_json_text(&j, b1, "breaker", "half-open");
    assert_json_text(&j, b1, "breaker_left_ms", "0"); /* only an open breaker has time left */
    assert_json_text(&j, b1, "cooling_ms", "0");
    assert_json_text(&j, b1, "ewma_ms", "0.0");
    assert_json_text(&j, b1, "retries", "0");
    assert_json_text(&j, b1, "weight_cfg", "1");

    assert_json_text(&j, b2, "breaker", "closed");
    assert_json_text(&j, b2, "breaker_left_ms", "0");
    assert_json_text(&j, b2, "cooling_ms", "0");
    assert_json_text(&j, b2, "ewma_ms", "null");
    assert_json_text(&j, b2, "since_s", "null"); /* never changed */
    free(out);

    /* An open breaker whose time has run out (the checker has not moved it on yet) shows 0. */
    shm_backend_set_breaker(&f->shm, 0, BREAKER_OPEN, time_mono_ns() - 1000, 1000);
    out = run(f, "show backends json", NULL, 0, 0);
    json_parse(&j, out);
    assert_json_text(&j, json_elem(&j, 0, 0), "breaker", "open");
    assert_json_text(&j, json_elem(&j, 0, 0), "breaker_left_ms", "0");
    free(out);
}

/* The cell of `row` under the header column that starts at `pos` (up to the next blank). */
static void cell(const char *row, int pos, char *out, size_t size)
{
    size_t n = strcspn(row + pos, " ");
    assert_true(n < size);
    memcpy(out, row + pos, n);
    out[n] = '\0';
}

/* The right-aligned cell that ends where the header column `name` ends. */
static void rcell(const char *header, const char *row, const char *name, char *out, size_t size)
{
    int end = column(header, name) + (int)strlen(name);
    int start = end;
    while (start > 0 && row[start - 1] != ' ')
        start--;
    assert_true((size_t)(end - start) < size);
    memcpy(out, row + start, (size_t)(end - start));
    out[end - start] = '\0';
}

static void test_backends_table_resilience(void **state)
{
    struct fixture *f = *state;
    resilience_state(f);
    atomic_store(&shm_wb(&f->shm, 1, 2)->retries, 11);

    char *out = run(f, "show backends", NULL, 0, 0);
    char *lines[8];
    int n = 0;
    for (char *save = NULL, *l = strtok_r(out, "\n", &save); l && n < 8;
         l = strtok_r(NULL, "\n", &save))
        lines[n++] = l;
    assert_int_equal(n, 4);
    const char *h = lines[0];
    const char *order[] = {"BREAKER",  "WEIGHT",  "ACTIVE", "COOLING",       "EWMA_MS", "REQUESTS",
                           "FAILURES", "RETRIES", "CHECK ", "LAST_CHECK_MS", "SINCE",   "REASON"};
    for (size_t i = 1; i < sizeof(order) / sizeof(order[0]); i++)
        assert_true(column(h, order[i]) > column(h, order[i - 1]));

    char c[64];
    /* BREAKER: state and, when open, the time left ("open 29.9s"). */
    cell(lines[1], column(h, "BREAKER"), c, sizeof(c));
    assert_string_equal(c, "open");
    const char *br = lines[1] + column(h, "BREAKER");
    assert_true(!strncmp(br, "open 29.", 8) || !strncmp(br, "open 30.0s ", 11));
    cell(lines[2], column(h, "BREAKER"), c, sizeof(c));
    assert_string_equal(c, "half-open");
    /* WEIGHT: effective/configured. */
    rcell(h, lines[1], "WEIGHT", c, sizeof(c));
    assert_string_equal(c, "1/3");
    rcell(h, lines[3], "WEIGHT", c, sizeof(c));
    assert_string_equal(c, "0/0");
    rcell(h, lines[1], "COOLING", c, sizeof(c));
    assert_true(!strncmp(c, "7.", 2) || !strcmp(c, "8.0s"));
    assert_int_equal(c[strlen(c) - 1], 's');
    rcell(h, lines[2], "COOLING", c, sizeof(c));
    assert_string_equal(c, "-");
    rcell(h, lines[1], "EWMA_MS", c, sizeof(c));
    assert_string_equal(c, "12.4");
    rcell(h, lines[3], "EWMA_MS", c, sizeof(c));
    assert_string_equal(c, "-");
    rcell(h, lines[1], "RETRIES", c, sizeof(c));
    assert_string_equal(c, "7");
    rcell(h, lines[3], "RETRIES", c, sizeof(c));
    assert_string_equal(c, "11");
    rcell(h, lines[1], "SINCE", c, sizeof(c));
    assert_string_equal(c, "5s");
    rcell(h, lines[3], "SINCE", c, sizeof(c));
    assert_string_equal(c, "-");
    free(out);

    /* Longer times read as minutes / hours. */
    uint64_t now = time_mono_ns();
    const uint64_t s = 1000000000ULL;
    shm_backend_set_breaker(&f->shm, 0, BREAKER_OPEN, now + 125 * s + s / 2, 200 * s);
    /* Monotonic time starts at boot: hours back only on a host up for over an hour. */
    uint64_t back = now > 3726 * s ? 3725 : 125;
    shm_backend_set_state(&f->shm, 2, BACKEND_DOWN, REASON_CHECK_CONNECT, now - back * s - s / 2);
    out = run(f, "show backends", NULL, 0, 0);
    n = 0;
    for (char *save = NULL, *l = strtok_r(out, "\n", &save); l && n < 8;
         l = strtok_r(NULL, "\n", &save))
        lines[n++] = l;
    assert_int_equal(n, 4);
    h = lines[0];
    assert_memory_equal(lines[1] + column(h, "BREAKER"), "open 2m05s ", 11);
    rcell(h, lines[3], "SINCE", c, sizeof(c));
    assert_string_equal(c, back == 3725 ? "1h02m" : "2m05s");
    free(out);
}

static void test_breaker_command(void **state)
{
    struct fixture *f = *state;
    struct shm_backend *a1 = shm_backend(&f->shm, 0), *a2 = shm_backend(&f->shm, 1);
    struct admin_pending p;

    char *out = run_pending(f, "breaker reset a1", 0, &p);
    assert_string_equal(out, "ok: breaker of chat/a1 will be reset\n");
    free(out);
    assert_int_equal(atomic_load(&a1->breaker_cmd), BREAKER_CMD_RESET);
    assert_int_equal(atomic_load(&a1->breaker_cmd_seq), 1);
    assert_int_equal(atomic_load(&a2->breaker_cmd_seq), 0);
    assert_int_equal(p.backend, 0);
    assert_int_equal(p.seq, 1);
    assert_int_equal(p.want, BREAKER_CLOSED);
    /* Done only once the checker has taken it; closed already, so that is enough. */
    assert_int_equal(admin_pending_done(&f->shm, &p), 0);
    assert_int_equal(shm_backend_breaker_cmd_take(&f->shm, 0), BREAKER_CMD_RESET);
    assert_int_equal(admin_pending_done(&f->shm, &p), 1);

    /* POOL/NAME; the answer waits for the breaker itself, not just the taken command. */
    out = run_pending(f, "  breaker   open chat/a2-with-a-long-name ", 0, &p);
    assert_string_equal(out, "ok: breaker of chat/a2-with-a-long-name will be opened\n");
    free(out);
    assert_int_equal(atomic_load(&a2->breaker_cmd), BREAKER_CMD_OPEN);
    assert_int_equal(atomic_load(&a2->breaker_cmd_seq), 1);
    assert_int_equal(p.backend, 1);
    assert_int_equal(p.want, BREAKER_OPEN);
    assert_int_equal(shm_backend_breaker_cmd_take(&f->shm, 1), BREAKER_CMD_OPEN);
    assert_int_equal(admin_pending_done(&f->shm, &p), 0); /* taken, not yet published */
    shm_backend_set_breaker(&f->shm, 1, BREAKER_OPEN, time_mono_ns() + 1000000000ULL, 1000000000);
    assert_int_equal(admin_pending_done(&f->shm, &p), 1);

    /* A second command bumps the sequence; the one before does not count as its completion. */
    out = run_pending(f, "breaker open a1 json", 0, &p);
    assert_string_equal(out,
                        "{\"ok\":true,\"pool\":\"chat\",\"name\":\"a1\",\"breaker\":\"open\"}\n");
    free(out);
    assert_int_equal(atomic_load(&a1->breaker_cmd), BREAKER_CMD_OPEN);
    assert_int_equal(atomic_load(&a1->breaker_cmd_seq), 2);
    assert_int_equal(p.seq, 2);
    shm_backend_set_breaker(&f->shm, 0, BREAKER_OPEN, 0, 0);
    assert_int_equal(admin_pending_done(&f->shm, &p), 0); /* seq 2 not taken yet */

    /* Unknown backends and wrong pools leave shm alone. */
    const char *unknown[] = {"breaker open nosuch", "breaker reset embeddings-pool/a1",
                             "breaker reset chat/", "breaker reset /a1", "breaker open chat/e1x"};
    for (size_t i = 0; i < sizeof(unknown) / sizeof(unknown[0]); i++) {
        out = run_pending(f, unknown[i], -ENOENT, &p);
        assert_memory_equal(out, "error: no backend called '", 26);
        assert_int_equal(p.backend, -1);
        free(out);
    }
    out = run_pending(f, "breaker open nosuch", -ENOENT, &p);
    assert_string_equal(out, "error: no backend called 'nosuch'\n");
    free(out);
    out = run_pending(f, "breaker open embeddings-pool/e1", 0, &p);
    assert_int_equal(p.backend, 2);
    free(out);
    assert_int_equal(atomic_load(&a1->breaker_cmd_seq), 2);
    assert_int_equal(atomic_load(&a2->breaker_cmd_seq), 1);

    /* Malformed breaker commands. */
    const char *bad[] = {"breaker",
                         "breaker reset",
                         "breaker close a1",
                         "breaker reset a1 a2",
                         "breaker open a1 xml",
                         "BREAKER reset a1"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        out = run_pending(f, bad[i], -EINVAL, &p);
        assert_memory_equal(out, "error:", 6);
        assert_int_equal(p.backend, -1);
        free(out);
    }
    /* A word longer than any POOL/NAME is refused, never truncated into another name. */
    char line[400];
    snprintf(line, sizeof(line), "breaker open a1%0300d", 0);
    out = run_pending(f, line, -EINVAL, &p);
    free(out);
    assert_int_equal(atomic_load(&a1->breaker_cmd_seq), 2);

    /* A show command has nothing to wait for. */
    out = run_pending(f, "show backends", 0, &p);
    assert_int_equal(p.backend, -1);
    free(out);
    struct admin_pending none = {.backend = -1};
    assert_int_equal(admin_pending_done(&f->shm, &none), 1);
}

/* What a worker may send to b now (the operator's state counts). */
static enum shm_admit admit(const struct shm *shm, uint32_t b)
{
    struct shm_backend_view v;
    uint32_t trials = 0;

    shm_backend_view(shm, b, &v);
    return shm_admit(&v, 1, &trials);
}

static void test_set_backend_state(void **state)
{
    struct fixture *f = *state;
    struct shm_backend *a1 = shm_backend(&f->shm, 0), *a2 = shm_backend(&f->shm, 1);
    char *out;

    shm_backend_set_weight(&f->shm, 0, 1);
    out = run(f, "set backend a1 drain", NULL, 0, 0);
    assert_string_equal(out, "ok: chat/a1 is DRAIN\n");
    free(out);
    assert_int_equal(atomic_load(&a1->admin), BACKEND_DRAIN);
    assert_int_equal(atomic_load(&a2->admin), BACKEND_READY);
    assert_int_equal(admit(&f->shm, 0), SHM_ADMIT_NONE);

    out = run(f, "set backend chat/a1 MAINT json", NULL, 0, 0);
    assert_string_equal(out,
                        "{\"ok\":true,\"pool\":\"chat\",\"name\":\"a1\",\"admin\":\"MAINT\"}\n");
    free(out);
    assert_int_equal(atomic_load(&a1->admin), BACKEND_MAINT);

    out = run(f, "set backend a1 ready", NULL, 0, 0);
    free(out);
    assert_int_equal(atomic_load(&a1->admin), BACKEND_READY);
    assert_int_equal(admit(&f->shm, 0), SHM_ADMIT_ALL);

    /* Bad state, unknown backend, missing words: errors, nothing changed. */
    out = run(f, "set backend a1 asleep", NULL, 0, -ERANGE); /* a bad value: refused, exit 1 */
    assert_string_equal(out, "error: bad state; usage: set backend BACKEND ready|drain|maint\n");
    free(out);
    out = run(f, "set backend nosuch drain", NULL, 0, -ENOENT);
    assert_string_equal(out, "error: no backend called 'nosuch'\n");
    free(out);
    out = run(f, "set backend a1", NULL, 0, -EINVAL);
    assert_string_equal(out, "error: usage: set backend BACKEND ready|drain|maint\n");
    free(out);
    assert_int_equal(atomic_load(&a1->admin), BACKEND_READY);
    assert_int_equal(atomic_load(&a2->admin), BACKEND_READY);
}

/* ---- show keys, show usage ---- */

static char *team_a_models[] = {"gpt-4o*", "gpt-4.1"};

/* The fixture with two keys and two models, and a segment with their limiters and totals. */
static int setup_ai(void **state)
{
    assert_int_equal(setup(state), 0);
    struct fixture *f = *state;
    shm_destroy(&f->shm);

    struct conf_apikey *a = &f->keys[0], *b = &f->keys[1];
    snprintf(a->name, sizeof(a->name), "team-a");
    memset(a->sha256, 0xab, sizeof(a->sha256));
    a->models = (struct conf_list){team_a_models, 2};
    a->expires = 1801353600; /* 2027-01-31 */
    a->lim = (struct conf_limits){100, 10000, 4};
    a->budget_nusd = 12500000000ull; /* 12.5 USD */
    a->budget_period = BUDGET_DAY;
    snprintf(b->name, sizeof(b->name), "ci-bot-with-a-long-name");
    memset(b->sha256, 0xcd, sizeof(b->sha256));
    b->expires = 1000000000; /* 2001-09-09T01:46:40Z: expired */
    snprintf(f->models[0].name, sizeof(f->models[0].name), "gpt-4o");
    snprintf(f->models[1].name, sizeof(f->models[1].name), "text-embedding-3-small");
    f->conf.keys = f->keys;
    f->conf.n_keys = 2;
    f->conf.models = f->models;
    f->conf.n_models = 2;

    struct limit_spec specs[6] = {
        {.rpm = 100,
         .tpm = 10000,
         .max_parallel = 4,
         .budget_nano = 12500000000ull,
         .period = LIMIT_PERIOD_DAY},
    };
    struct shm_ai ai = {2, 2, 2, specs, (int64_t)(time_real_ms() / 1000)};
    assert_int_equal(shm_create_ai(&f->shm, 3, 2, 1, &ai), 0);
    for (uint32_t i = 0; i < 3; i++)
        shm_backend_init(&f->shm, i, (uint32_t)f->backends[i].weight, 0);
    return 0;
}

/* Three requests of team-a admitted (500 tokens, 1 USD reserved each), one of them settled at
 * 100 tokens and 0.25 USD: the window holds 3 requests and 1100 tokens, 2 are in flight. */
static void admit_three(struct fixture *f, struct limit_ticket t[3])
{
    struct limit_region *lr = shm_limits(&f->shm);
    const uint32_t ids[3] = {0, 2, 4};
    struct limit_verdict v;
    int64_t wall = (int64_t)(time_real_ms() / 1000);

    for (int i = 0; i < 3; i++)
        assert_int_equal(
            limit_admit(lr, ids, 3, time_mono_ms(), wall, 500, 1000000000ull, 0, &t[i], &v), 0);
    limit_settle(lr, &t[0], time_mono_ms(), wall, 100, 250000000ull);
}

/* Usage totals over both worker slices. */
static void add_usage(struct fixture *f)
{
    struct acct_region *ar = shm_acct(&f->shm);
    const struct acct_usage u1 = {1, 100, 50, 20, 5, 0, 250000000ull, 400000000ull};
    const struct acct_usage u2 = {1, 1000, 0, 0, 0, 1, 1000, 1000};
    const struct acct_usage u3 = {2, 10, 20, 0, 0, 0, 30, 20}; /* list below cost: saved 0 */

    acct_add(ar, 0, 0, 0, 0, &u1);
    acct_add(ar, 1, 0, 1, 2, &u2);
    acct_add(ar, 1, 1, 0, 1, &u3);
}

static void test_keys_json(void **state)
{
    struct fixture *f = *state;
    struct limit_ticket t[3];

    admit_three(f, t);
    add_usage(f);
    char *out = run(f, "show keys json", NULL, 0, 0);
    struct json j;
    json_parse(&j, out);
    assert_int_equal(j.tok[0].type, JSMN_ARRAY);
    assert_int_equal(j.tok[0].size, 2);
    int a = json_elem(&j, 0, 0), b = json_elem(&j, 0, 1);

    assert_json_text(&j, a, "name", "team-a");
    int m = json_get(&j, a, "models");
    assert_int_equal(j.tok[m].type, JSMN_ARRAY);
    assert_int_equal(j.tok[m].size, 2);
    assert_memory_equal(out + j.tok[m + 1].start, "gpt-4o*", 7);
    assert_json_text(&j, a, "expires", "2027-01-31T00:00:00Z");
    assert_json_text(&j, a, "expired", "false");
    assert_json_text(&j, a, "rpm", "100");
    assert_json_text(&j, a, "rpm_used", "3");
    assert_json_text(&j, a, "tpm", "10000");
    assert_json_text(&j, a, "tpm_used", "1100");
    assert_json_text(&j, a, "max_parallel", "4");
    assert_json_text(&j, a, "in_flight", "2");
    assert_json_text(&j, a, "budget_usd", "12.5");
    assert_json_text(&j, a, "budget_period", "day");
    assert_json_text(&j, a, "spent_usd", "0.25");
    assert_json_text(&j, a, "reserved_usd", "2");
    assert_json_text(&j, a, "remaining_usd", "10.25");
    assert_json_text(&j, a, "requests", "2");
    assert_json_text(&j, a, "prompt_tokens", "1100");
    assert_json_text(&j, a, "completion_tokens", "50");
    assert_json_text(&j, a, "tokens", "1150");
    assert_json_text(&j, a, "cost_usd", "0.250001");

    assert_json_text(&j, b, "name", "ci-bot-with-a-long-name");
    assert_json_text(&j, b, "models", "null");
    assert_json_text(&j, b, "expires", "2001-09-09T01:46:40Z");
    assert_json_text(&j, b, "expired", "true");
    assert_json_text(&j, b, "rpm", "null");
    assert_json_text(&j, b, "max_parallel", "null");
    assert_json_text(&j, b, "in_flight", "0");
    assert_json_text(&j, b, "budget_usd", "null");
    assert_json_text(&j, b, "remaining_usd", "null");
    assert_json_text(&j, b, "requests", "2");
    assert_json_text(&j, b, "tokens", "30");
    assert_json_text(&j, b, "cost_usd", "0.00000003");

    /* Never the key nor its digest. */
    assert_null(strstr(out, "abab"));
    assert_null(strstr(out, "cdcd"));
    free(out);

    char *out2 = run(f, "show keys --json", NULL, 0, 0);
    out = run(f, "show keys json", NULL, 0, 0);
    assert_string_equal(out, out2);
    free(out);
    free(out2);

    /* Settling gives the slots and reservations back. */
    struct limit_region *lr = shm_limits(&f->shm);
    int64_t wall = (int64_t)(time_real_ms() / 1000);
    limit_settle(lr, &t[1], time_mono_ms(), wall, 500, 1000000000ull);
    limit_settle(lr, &t[2], time_mono_ms(), wall, 500, 1000000000ull);
    out = run(f, "show keys json", NULL, 0, 0);
    json_parse(&j, out);
    a = json_elem(&j, 0, 0);
    assert_json_text(&j, a, "in_flight", "0");
    assert_json_text(&j, a, "spent_usd", "2.25");
    assert_json_text(&j, a, "reserved_usd", "0");
    assert_json_text(&j, a, "remaining_usd", "10.25");
    free(out);
}

/* The lines of a table (modifies out). */
static int table_lines(char *out, char **lines, int max)
{
    int n = 0;
    for (char *save = NULL, *l = strtok_r(out, "\n", &save); l && n < max;
         l = strtok_r(NULL, "\n", &save))
        lines[n++] = l;
    return n;
}

/* Right-aligned: the cell of row `line` ends where header column `name` ends. */
static void assert_cell_right(const char *header, const char *line, const char *name,
                              const char *want)
{
    int end = column(header, name) + (int)strlen(name);
    int len = (int)strlen(want);
    assert_true(end - len >= 0);
    assert_memory_equal(line + end - len, want, (size_t)len);
    assert_true(line[end] == ' ' || line[end] == '\0');
    assert_true(line[end - len - 1] == ' ');
}

static void test_keys_table(void **state)
{
    struct fixture *f = *state;
    struct limit_ticket t[3];

    admit_three(f, t);
    add_usage(f);
    char *out = run(f, "show keys", NULL, 0, 0);
    assert_null(strstr(out, "abab"));
    char *l[8];
    assert_int_equal(table_lines(out, l, 8), 3);
    assert_int_equal(column(l[0], "NAME"), 0);
    assert_memory_equal(l[1], "team-a ", 7);
    assert_memory_equal(l[2], "ci-bot-with-a-long-name ", 24);
    assert_cell_right(l[0], l[1], "RPM", "3/100");
    assert_cell_right(l[0], l[1], "TPM", "1100/10000");
    assert_cell_right(l[0], l[1], "PARALLEL", "2/4");
    assert_cell_right(l[0], l[1], "BUDGET_USD", "12.5");
    assert_cell_right(l[0], l[1], "SPENT_USD", "0.25");
    assert_cell_right(l[0], l[1], "RESERVED_USD", "2");
    assert_cell_right(l[0], l[1], "REMAINING_USD", "10.25");
    assert_cell_right(l[0], l[1], "REQUESTS", "2");
    assert_cell_right(l[0], l[1], "TOKENS", "1150");
    assert_cell_right(l[0], l[1], "COST_USD", "0.250001");
    assert_memory_equal(l[1] + column(l[0], "PERIOD"), "day ", 4);
    assert_memory_equal(l[1] + column(l[0], "EXPIRES"), "2027-01-31T00:00:00Z ", 21);
    assert_string_equal(l[1] + column(l[0], "MODELS"), "gpt-4o*,gpt-4.1");

    assert_cell_right(l[0], l[2], "RPM", "-");
    assert_cell_right(l[0], l[2], "PARALLEL", "0/-");
    assert_cell_right(l[0], l[2], "BUDGET_USD", "-");
    assert_cell_right(l[0], l[2], "REMAINING_USD", "-");
    assert_cell_right(l[0], l[2], "TOKENS", "30");
    assert_memory_equal(l[2] + column(l[0], "EXPIRES"), "2001-09-09T01:46:40Z (expired)", 30);
    assert_string_equal(l[2] + column(l[0], "MODELS"), "*");
    free(out);
}

/* A worker stopped while it holds team-a's limiter lock: show keys answers within a bounded
 * time, says "busy" where team-a's limiter figures would be (null in JSON), and the rest as
 * usual. */
static void test_keys_busy(void **state)
{
    struct fixture *f = *state;
    struct limit_region *lr = shm_limits(&f->shm);
    pid_t pid;
    int st;

    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        cell_lock(lr, 0);
        raise(SIGSTOP);
        _exit(0);
    }
    assert_int_equal(waitpid(pid, &st, WUNTRACED), pid);
    assert_true(WIFSTOPPED(st));
    alarm(10); /* without the bound, show keys would hang: die instead of passing */
    char *out = run(f, "show keys", NULL, 0, 0);
    char *js = run(f, "show keys json", NULL, 0, 0);
    alarm(0);
    kill(pid, SIGKILL);
    assert_int_equal(waitpid(pid, &st, 0), pid);

    char *l[8];
    assert_int_equal(table_lines(out, l, 8), 4);
    assert_cell_right(l[0], l[1], "RPM", "busy");
    assert_cell_right(l[0], l[1], "TPM", "busy");
    assert_cell_right(l[0], l[1], "PARALLEL", "busy");
    assert_cell_right(l[0], l[1], "BUDGET_USD", "12.5");
    assert_cell_right(l[0], l[1], "SPENT_USD", "busy");
    assert_cell_right(l[0], l[1], "REMAINING_USD", "busy");
    assert_cell_right(l[0], l[2], "PARALLEL", "0/-");
    assert_memory_equal(l[3], "busy: 1 key(s) not read", 23);

    struct json j;
    json_parse(&j, js);
    int a = json_elem(&j, 0, 0), b = json_elem(&j, 0, 1);
    assert_json_text(&j, a, "busy", "true");
    assert_json_text(&j, a, "rpm", "100");
    assert_json_text(&j, a, "rpm_used", "null");
    assert_json_text(&j, a, "in_flight", "null");
    assert_json_text(&j, a, "spent_usd", "null");
    assert_json_text(&j, b, "busy", "false");
    assert_json_text(&j, b, "in_flight", "0");
    free(out);
    free(js);
}

static void test_usage_json(void **state)
{
    struct fixture *f = *state;
    add_usage(f);

    char *out = run(f, "show usage json", NULL, 0, 0);
    char *out2 = run(f, "show usage --by key --json", NULL, 0, 0);
    assert_string_equal(out, out2);
    free(out2);
    out2 = run(f, "show usage json --by key", NULL, 0, 0);
    assert_string_equal(out, out2);
    free(out2);

    struct json j;
    json_parse(&j, out);
    assert_json_text(&j, 0, "by", "key");
    int e = json_get(&j, 0, "entries");
    assert_int_equal(j.tok[e].size, 2);
    int a = json_elem(&j, e, 0), t = json_get(&j, 0, "total");
    assert_json_text(&j, a, "name", "team-a");
    assert_json_text(&j, a, "requests", "2");
    assert_json_text(&j, a, "prompt_tokens", "1100");
    assert_json_text(&j, a, "completion_tokens", "50");
    assert_json_text(&j, a, "cached_tokens", "20");
    assert_json_text(&j, a, "reasoning_tokens", "5");
    assert_json_text(&j, a, "partial", "1");
    assert_json_text(&j, a, "cost_usd", "0.250001");
    assert_json_text(&j, a, "list_cost_usd", "0.400001");
    assert_json_text(&j, a, "saved_usd", "0.15");
    assert_json_text(&j, t, "requests", "4");
    assert_json_text(&j, t, "prompt_tokens", "1110");
    assert_json_text(&j, t, "completion_tokens", "70");
    assert_json_text(&j, t, "cost_usd", "0.25000103");
    assert_json_text(&j, t, "list_cost_usd", "0.40000102");
    assert_json_text(&j, t, "saved_usd", "0.14999999");
    free(out);

    out = run(f, "show usage --by model json", NULL, 0, 0);
    json_parse(&j, out);
    assert_json_text(&j, 0, "by", "model");
    e = json_get(&j, 0, "entries");
    assert_int_equal(j.tok[e].size, 2);
    int m0 = json_elem(&j, e, 0), m1 = json_elem(&j, e, 1);
    assert_json_text(&j, m0, "name", "gpt-4o");
    assert_json_text(&j, m0, "requests", "3");
    assert_json_text(&j, m0, "saved_usd", "0.14999999"); /* saved of the sums */
    assert_json_text(&j, m1, "name", "text-embedding-3-small");
    assert_json_text(&j, m1, "partial", "1");
    free(out);

    out = run(f, "show usage --by backend json", NULL, 0, 0);
    json_parse(&j, out);
    e = json_get(&j, 0, "entries");
    assert_int_equal(j.tok[e].size, 3);
    int b2 = json_elem(&j, e, 2);
    assert_json_text(&j, b2, "name", "e1");
    assert_json_text(&j, b2, "pool", "embeddings-pool");
    assert_json_text(&j, b2, "prompt_tokens", "1000");
    assert_json_text(&j, json_elem(&j, e, 1), "requests", "2");
    assert_json_text(&j, json_get(&j, 0, "total"), "requests", "4");
    free(out);
}

static void test_usage_table(void **state)
{
    struct fixture *f = *state;
    add_usage(f);

    char *out = run(f, "show usage", NULL, 0, 0);
    char *l[8];
    assert_int_equal(table_lines(out, l, 8), 4); /* header, 2 keys, total */
    assert_memory_equal(l[0], "KEY ", 4);
    assert_memory_equal(l[2], "ci-bot-with-a-long-name ", 24);
    assert_memory_equal(l[3], "TOTAL ", 6);
    assert_cell_right(l[0], l[1], "REQUESTS", "2");
    assert_cell_right(l[0], l[1], "PROMPT", "1100");
    assert_cell_right(l[0], l[1], "COMPLETION", "50");
    assert_cell_right(l[0], l[1], "CACHED", "20");
    assert_cell_right(l[0], l[1], "REASONING", "5");
    assert_cell_right(l[0], l[1], "PARTIAL", "1");
    assert_cell_right(l[0], l[1], "COST_USD", "0.250001");
    assert_cell_right(l[0], l[1], "LIST_USD", "0.400001");
    assert_cell_right(l[0], l[1], "SAVED_USD", "0.15");
    assert_cell_right(l[0], l[2], "SAVED_USD", "0");
    assert_cell_right(l[0], l[3], "REQUESTS", "4");
    assert_cell_right(l[0], l[3], "COST_USD", "0.25000103");
    assert_cell_right(l[0], l[3], "SAVED_USD", "0.14999999");
    free(out);

    out = run(f, "show usage --by backend", NULL, 0, 0);
    assert_int_equal(table_lines(out, l, 8), 5);
    assert_memory_equal(l[0], "BACKEND ", 8);
    assert_memory_equal(l[2], "a2-with-a-long-name ", 20);
    assert_cell_right(l[0], l[2], "REQUESTS", "2");
    free(out);

    out = run(f, "show usage --by model", NULL, 0, 0);
    assert_int_equal(table_lines(out, l, 8), 4);
    assert_memory_equal(l[0], "MODEL ", 6);
    free(out);
}

/* Bad arguments get the command's usage; a segment without the AI regions shows zeros. */
static void test_keys_usage_errors(void **state)
{
    struct fixture *f = *state;
    static const struct {
        const char *line, *answer;
    } cases[] = {
        {"show keys xml", "error: usage: show keys [json]\n"},
        {"show keys json json", "error: usage: show keys [json]\n"},
        {"show usage --by", "error: usage: show usage [--by key|model|backend] [--fleet] [json]\n"},
        {"show usage --by pool",
         "error: usage: show usage [--by key|model|backend] [--fleet] [json]\n"},
        {"show usage by key",
         "error: usage: show usage [--by key|model|backend] [--fleet] [json]\n"},
        {"show usage --by key --by model",
         "error: usage: show usage [--by key|model|backend] [--fleet] [json]\n"},
        {"show usage json json",
         "error: usage: show usage [--by key|model|backend] [--fleet] [json]\n"},
        {"show usage --by key json x",
         "error: usage: show usage [--by key|model|backend] [--fleet] [json]\n"},
        {"show usage --fleet --fleet",
         "error: usage: show usage [--by key|model|backend] [--fleet] [json]\n"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *out = run(f, cases[i].line, NULL, 0, -EINVAL);
        assert_string_equal(out, cases[i].answer);
        free(out);
    }
    char *out = run(f, "help", NULL, 0, 0);
    assert_non_null(strstr(out, "show keys"));
    assert_non_null(strstr(out, "show usage [--by key|model|backend]"));
    free(out);
    /* the fleet's totals need [cluster]: without it, said so (not this host's as the fleet's) */
    out = run(f, "show usage --fleet", NULL, 0, -ENOENT);
    assert_non_null(strstr(out, "no [cluster] section"));
    free(out);
}

static void test_keys_usage_no_regions(void **state)
{
    struct fixture *f = *state;

    /* The plain fixture's segment has no limiter or usage region. */
    struct conf_apikey k = {.name = "k", .lim = {.rpm = 7}};
    f->conf.keys = &k;
    f->conf.n_keys = 1;
    char *out = run(f, "show keys json", NULL, 0, 0);
    struct json j;
    json_parse(&j, out);
    int a = json_elem(&j, 0, 0);
    assert_json_text(&j, a, "rpm", "7");
    assert_json_text(&j, a, "rpm_used", "0");
    assert_json_text(&j, a, "requests", "0");
    free(out);
    out = run(f, "show usage --by backend json", NULL, 0, 0);
    json_parse(&j, out);
    assert_json_text(&j, json_get(&j, 0, "total"), "requests", "0");
    free(out);
    f->conf.n_keys = 0;
    out = run(f, "show keys", NULL, 0, 0);
    assert_non_null(strstr(out, "NAME"));
    free(out);
    out = run(f, "show keys json", NULL, 0, 0);
    assert_string_equal(out, "[]\n");
    free(out);
}

/* ---- show info, show pools, show backends POOL, set weight, check, stop ---- */

static void test_rate(void **state)
{
    struct admin_rate r = {0};
    unsigned secs;

    assert_int_equal(admin_rate_x10(&r, &secs), 0);
    assert_int_equal(secs, 0);
    admin_rate_push(&r, 100);
    assert_int_equal(admin_rate_x10(&r, &secs), 0);
    assert_int_equal(secs, 0);
    admin_rate_push(&r, 105); /* 5 in 1 s */
    assert_int_equal(admin_rate_x10(&r, &secs), 50);
    assert_int_equal(secs, 1);
    /* 11 samples 1 s apart, 3 requests each second: 10 s of 3/s; the 12th drops the first */
    for (int i = 0; i < 20; i++)
        admin_rate_push(&r, 1000 + 3 * (uint64_t)i);
    assert_int_equal(admin_rate_x10(&r, &secs), 30);
    assert_int_equal(secs, ADMIN_RATE_SECS);
    admin_rate_push(&r, 1000 + 3 * 19 + 40); /* a burst of 40 in the last second */
    assert_int_equal(admin_rate_x10(&r, &secs), (3 * 9 + 40) * 10 / 10);
    /* a count that went back (never expected) reads as 0, not a huge rate */
    admin_rate_push(&r, 5);
    assert_int_equal(admin_rate_x10(&r, &secs), 0);
}

static void info_fill(struct fixture *f)
{
    f->info = (struct admin_info){.version = "9.8.7",
                                  .pid = 4242,
                                  .started_ms = 1800000000000ULL,
                                  .now_ms = 1800000000000ULL + 3723000,
                                  .generation = 3,
                                  .workers = 2,
                                  .draining = 1,
                                  .conns = 17,
                                  .requests = 12345,
                                  .rate_x10 = 413,
                                  .rate_secs = 10,
                                  .alog_drops = 6,
                                  .config = "/etc/aigw/aigw.ini"};
}

static void test_show_info(void **state)
{
    struct fixture *f = *state;
    struct json j;

    info_fill(f);
    char *out = run(f, "show info", NULL, 0, 0);
    assert_non_null(strstr(out, "version:             9.8.7\n"));
    assert_non_null(strstr(out, "pid:                 4242\n"));
    assert_non_null(strstr(out, "uptime:              1h02m (started 2027-01-15T08:00:00Z)\n"));
    assert_non_null(strstr(out, "generation:          3 (older ones draining)\n"));
    assert_non_null(strstr(out, "workers:             2\n"));
    assert_non_null(strstr(out, "connections:         17\n"));
    assert_non_null(strstr(out, "requests:            12345\n"));
    assert_non_null(strstr(out, "requests/s:          41.3 (last 10 s)\n"));
    assert_non_null(strstr(out, "access log dropped:  6\n"));
    assert_non_null(strstr(out, "config:              /etc/aigw/aigw.ini\n"));
    free(out);

    out = run(f, "show info json", NULL, 0, 0);
    json_parse(&j, out);
    assert_json_text(&j, 0, "version", "9.8.7");
    assert_json_text(&j, 0, "pid", "4242");
    assert_json_text(&j, 0, "uptime_s", "3723");
    assert_json_text(&j, 0, "started", "2027-01-15T08:00:00Z");
    assert_json_text(&j, 0, "generation", "3");
    assert_json_text(&j, 0, "workers", "2");
    assert_json_text(&j, 0, "connections", "17");
    assert_json_text(&j, 0, "requests", "12345");
    assert_json_text(&j, 0, "requests_per_s", "41.3");
    assert_json_text(&j, 0, "rate_window_s", "10");
    assert_json_text(&j, 0, "access_log_dropped", "6");
    assert_json_text(&j, 0, "config", "/etc/aigw/aigw.ini");
    free(out);
    out = run(f, "show info --json", NULL, 0, 0);
    json_parse(&j, out);
    free(out);
}

static char *chat_models[] = {"gpt-4o*", "o3"};
static char *chat_paths[] = {"/v1/embeddings"};

static void test_show_pools(void **state)
{
    struct fixture *f = *state;
    struct json j;

    f->pools[0].models = (struct conf_list){chat_models, 2};
    f->pools[0].paths = (struct conf_list){chat_paths, 1};
    f->pools[0].lim.rpm = 600; /* no limiter region in this segment: shown, not counted */
    f->pools[1].balance = BALANCE_LEAST_CONN;
    atomic_store(&shm_wb(&f->shm, 0, 0)->active, 2);
    atomic_store(&shm_wb(&f->shm, 1, 1)->active, 1);
    atomic_store(&shm_wb(&f->shm, 0, 0)->requests, 10);
    atomic_store(&shm_wb(&f->shm, 1, 1)->requests, 5);
    atomic_store(&shm_wb(&f->shm, 1, 1)->failures, 4);
    atomic_store(&shm_wb(&f->shm, 0, 2)->requests, 7);
    shm_backend_set_state(&f->shm, 1, BACKEND_DOWN, REASON_CHECK_TIMEOUT, 1000);

    char *out = run(f, "show pools", NULL, 0, 0);
    assert_memory_equal(out, "POOL ", 5);
    assert_non_null(strstr(out, "ALGO"));
    assert_non_null(strstr(out, "MODELS"));
    char *chat = strstr(out, "\nchat ");
    char *emb = strstr(out, "\nembeddings-pool ");
    assert_non_null(chat);
    assert_non_null(emb);
    assert_non_null(strstr(emb, " least_conn "));
    assert_non_null(strstr(emb, " 1/1 "));
    *strchr(chat + 1, '\n') = '\0';
    assert_non_null(strstr(chat, " roundrobin "));
    assert_non_null(strstr(chat, " 1/2 "));
    assert_non_null(strstr(chat, " 3 "));  /* in flight */
    assert_non_null(strstr(chat, " 15 ")); /* requests */
    assert_non_null(strstr(chat, " 4 "));  /* failures */
    assert_non_null(strstr(chat, " 0/600 "));
    assert_non_null(strstr(chat, " gpt-4o*,o3 "));
    assert_non_null(strstr(chat, " /v1/embeddings"));
    free(out);

    /* DRAIN counts as not up */
    shm_backend_set_admin(&f->shm, 2, BACKEND_DRAIN);
    out = run(f, "show pools json", NULL, 0, 0);
    json_parse(&j, out);
    assert_int_equal(j.tok[0].size, 2);
    int p0 = json_elem(&j, 0, 0), p1 = json_elem(&j, 0, 1);
    assert_json_text(&j, p0, "name", "chat");
    assert_json_text(&j, p0, "algo", "roundrobin");
    assert_json_text(&j, p0, "backends_up", "1");
    assert_json_text(&j, p0, "backends", "2");
    assert_json_text(&j, p0, "active", "3");
    assert_json_text(&j, p0, "requests", "15");
    assert_json_text(&j, p0, "failures", "4");
    assert_json_text(&j, p0, "rpm", "600");
    assert_json_text(&j, p0, "rpm_used", "0");
    assert_json_text(&j, p0, "tpm", "null");
    int models = json_get(&j, p0, "models");
    assert_int_equal(j.tok[models].size, 2);
    assert_json_text(&j, p1, "name", "embeddings-pool");
    assert_json_text(&j, p1, "algo", "least_conn");
    assert_json_text(&j, p1, "backends_up", "0");
    assert_json_text(&j, p1, "requests", "7");
    assert_int_equal(j.tok[json_get(&j, p1, "models")].size, 0);
    free(out);
}

static void test_show_backends_pool(void **state)
{
    struct fixture *f = *state;
    struct json j;

    char *out = run(f, "show backends embeddings-pool", NULL, 0, 0);
    assert_non_null(strstr(out, " e1 "));
    assert_null(strstr(out, " a1 "));
    assert_null(strstr(out, "a2-with-a-long-name"));
    free(out);
    out = run(f, "show backends chat json", NULL, 0, 0);
    json_parse(&j, out);
    assert_int_equal(j.tok[0].size, 2);
    assert_json_text(&j, json_elem(&j, 0, 0), "name", "a1");
    assert_json_text(&j, json_elem(&j, 0, 1), "name", "a2-with-a-long-name");
    free(out);
    out = run(f, "show backends nosuch", NULL, 0, -ENOENT);
    assert_string_equal(out, "error: no pool called 'nosuch'\n");
    free(out);
    out = run(f, "show backends chat extra", NULL, 0, -EINVAL);
    assert_string_equal(out, "error: usage: show backends [POOL] [json]\n");
    free(out);
}

static void test_set_weight(void **state)
{
    struct fixture *f = *state;
    struct shm_backend *a1 = shm_backend(&f->shm, 0);

    f->backends[0].weight = 10; /* as configured */
    shm_backend_init(&f->shm, 0, 10, 0);
    char *out = run(f, "set weight a1 4", NULL, 0, 0);
    assert_string_equal(out, "ok: chat/a1 weight 4 (was 10, configured 10)\n");
    free(out);
    assert_int_equal(atomic_load(&a1->weight_cfg), 4);
    out = run(f, "set weight chat/a1 250%", NULL, 0, 0);
    assert_string_equal(out, "ok: chat/a1 weight 25 (was 4, configured 10)\n");
    free(out);
    out = run(f, "set weight a1 0 json", NULL, 0, 0);
    assert_string_equal(out, "{\"ok\":true,\"pool\":\"chat\",\"name\":\"a1\",\"weight\":0,"
                             "\"was\":25,\"configured\":10}\n");
    free(out);
    out = run(f, "set weight a1 256", NULL, 0, 0);
    free(out);
    assert_int_equal(atomic_load(&a1->weight_cfg), 256);

    /* refused: bad values, unknown backend; nothing changes */
    const char *bad[] = {"257", "-1", "5x", "%", "50%%", "2600%", "", "1e2"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char line[64];
        snprintf(line, sizeof(line), "set weight a1 %s", bad[i]);
        if (!*bad[i]) {
            out = run(f, line, NULL, 0, -EINVAL); /* missing word: usage */
            assert_string_equal(out, "error: usage: set weight BACKEND N|N%\n");
        } else {
            out = run(f, line, NULL, 0, -ERANGE);
            assert_memory_equal(out, "error: bad weight", 17);
        }
        free(out);
    }
    out = run(f, "set weight nosuch 3", NULL, 0, -ENOENT);
    assert_string_equal(out, "error: no backend called 'nosuch'\n");
    free(out);
    assert_int_equal(atomic_load(&a1->weight_cfg), 256);
}

static void test_check_command(void **state)
{
    struct fixture *f = *state;
    struct admin_pending p;
    struct shm_check_answer a = {.ok = SHM_CHECK_PASS, .status = 200, .dur_us = 1234};
    char *out;
    size_t len;
    struct json j;

    /* a pool without checks has nothing to run */
    out = run_pending(f, "check a1", -ENOENT, &p);
    assert_string_equal(out,
                        "error: pool chat has no active checks (check = off): nothing to run\n");
    free(out);
    assert_int_equal(p.backend, -1);

    f->pools[0].check = 1;
    f->pools[0].check_timeout_ms = 500;
    out = run_pending(f, "check chat/a2-with-a-long-name", 0, &p);
    free(out);
    assert_int_equal(p.backend, 1);
    assert_int_equal(p.kind, ADMIN_WAIT_CHECK);
    assert_int_equal(p.wait_ms, 1500);
    assert_int_equal(p.json, 0);
    assert_int_equal(shm_backend_check_cmd_seq(&f->shm, 1), p.seq);
    assert_int_equal(admin_pending_done(&f->shm, &p), 0);

    /* the checker has not answered by the deadline */
    assert_int_equal(admin_check_answer(&f->conf, &f->shm, &p, &out, &len), -ETIMEDOUT);
    assert_string_equal(out, "error: chat/a2-with-a-long-name: the health checker did not run "
                             "the check within 1500 ms\n");
    free(out);

    snprintf(a.detail, sizeof(a.detail), "status 200");
    shm_backend_check_answer(&f->shm, 1, p.seq, &a);
    assert_int_equal(admin_pending_done(&f->shm, &p), 1);
    assert_int_equal(admin_check_answer(&f->conf, &f->shm, &p, &out, &len), 0);
    assert_string_equal(out, "chat/a2-with-a-long-name: pass: 200 in 1.2 ms (status 200)\n");
    assert_int_equal(strlen(out), len);
    free(out);

    /* a failed check, as JSON: it ran, so it is no error */
    out = run_pending(f, "check a1 json", 0, &p);
    free(out);
    assert_int_equal(p.json, 1);
    assert_int_equal(admin_pending_done(&f->shm, &p), 0);
    a = (struct shm_check_answer){.ok = SHM_CHECK_FAIL, .status = -ECONNREFUSED, .dur_us = 300};
    snprintf(a.detail, sizeof(a.detail), "connect refused (127.0.0.1:9101)");
    shm_backend_check_answer(&f->shm, 0, p.seq, &a);
    assert_int_equal(admin_check_answer(&f->conf, &f->shm, &p, &out, &len), 0);
    json_parse(&j, out);
    assert_json_text(&j, 0, "pool", "chat");
    assert_json_text(&j, 0, "name", "a1");
    assert_json_text(&j, 0, "result", "fail");
    assert_json_text(&j, 0, "status", "null");
    assert_json_text(&j, 0, "error", "ECONNREFUSED");
    assert_json_text(&j, 0, "latency_ms", "0.3");
    assert_json_text(&j, 0, "detail", "connect refused (127.0.0.1:9101)");
    free(out);
    out = run_pending(f, "check a1", 0, &p);
    free(out);
    shm_backend_check_answer(&f->shm, 0, p.seq, &a);
    assert_int_equal(admin_check_answer(&f->conf, &f->shm, &p, &out, &len), 0);
    assert_string_equal(out, "chat/a1: fail: ECONNREFUSED in 0.3 ms (connect refused "
                             "(127.0.0.1:9101))\n");
    free(out);

    /* not run by the checker: an error */
    out = run_pending(f, "check a1", 0, &p);
    free(out);
    a = (struct shm_check_answer){.ok = SHM_CHECK_NOT_RUN, .status = -EMFILE};
    snprintf(a.detail, sizeof(a.detail), "out of file descriptors");
    shm_backend_check_answer(&f->shm, 0, p.seq, &a);
    assert_int_equal(admin_check_answer(&f->conf, &f->shm, &p, &out, &len), -EIO);
    assert_string_equal(out, "error: chat/a1: check not run: out of file descriptors\n");
    free(out);

    out = run_pending(f, "check nosuch", -ENOENT, &p);
    assert_string_equal(out, "error: no backend called 'nosuch'\n");
    free(out);
    out = run_pending(f, "check", -EINVAL, &p);
    assert_string_equal(out, "error: usage: check BACKEND [json]\n");
    free(out);
}

static void test_stop_and_errors(void **state)
{
    struct fixture *f = *state;
    struct admin_pending p;

    char *out = run_pending(f, "stop", 0, &p);
    assert_string_equal(out, "ok: stopping gracefully (in-flight requests finish)\n");
    assert_int_equal(p.stop, 1);
    assert_int_equal(p.backend, -1);
    free(out);
    out = run_pending(f, "show proc", 0, &p);
    assert_int_equal(p.stop, 0);
    free(out);
    out = run_pending(f, "stop now", -EINVAL, &p);
    assert_string_equal(out, "error: usage: stop\n");
    assert_int_equal(p.stop, 0);
    free(out);

    /* unknown commands and wrong words are told apart by their prefix (aigwctl exits 2) */
    out = run_pending(f, "frobnicate", -EINVAL, &p);
    assert_memory_equal(out, ADMIN_ERR_UNKNOWN, strlen(ADMIN_ERR_UNKNOWN));
    free(out);
    out = run_pending(f, "show pools extra", -EINVAL, &p);
    assert_string_equal(out, ADMIN_ERR_USAGE " show pools [json]\n");
    free(out);

    /* help lists every command */
    out = run_pending(f, "help", 0, &p);
    const char *cmds[] = {"show info",     "show proc",     "show pools",   "show backends [POOL]",
                          "show keys",     "show usage",    "set weight",   "set backend",
                          "check BACKEND", "breaker reset", "breaker open", "reload",
                          "stop",          "help"};
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
        assert_non_null(strstr(out, cmds[i]));
    free(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_backends_json, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backends_table, setup, teardown),
        cmocka_unit_test_setup_teardown(test_proc, setup, teardown),
        cmocka_unit_test_setup_teardown(test_errors_and_help, setup, teardown),
        cmocka_unit_test_setup_teardown(test_split_words, setup, teardown),
        cmocka_unit_test_setup_teardown(test_json_escaping, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_backends, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backends_json_resilience, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backends_table_resilience, setup, teardown),
        cmocka_unit_test_setup_teardown(test_breaker_command, setup, teardown),
        cmocka_unit_test_setup_teardown(test_set_backend_state, setup, teardown),
        cmocka_unit_test_setup_teardown(test_keys_json, setup_ai, teardown),
        cmocka_unit_test_setup_teardown(test_keys_table, setup_ai, teardown),
        cmocka_unit_test_setup_teardown(test_keys_busy, setup_ai, teardown),
        cmocka_unit_test_setup_teardown(test_usage_json, setup_ai, teardown),
        cmocka_unit_test_setup_teardown(test_usage_table, setup_ai, teardown),
        cmocka_unit_test_setup_teardown(test_keys_usage_errors, setup_ai, teardown),
        cmocka_unit_test_setup_teardown(test_keys_usage_no_regions, setup, teardown),
        cmocka_unit_test(test_rate),
        cmocka_unit_test_setup_teardown(test_show_info, setup, teardown),
        cmocka_unit_test_setup_teardown(test_show_pools, setup, teardown),
        cmocka_unit_test_setup_teardown(test_show_backends_pool, setup, teardown),
        cmocka_unit_test_setup_teardown(test_set_weight, setup, teardown),
        cmocka_unit_test_setup_teardown(test_check_command, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_and_errors, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
