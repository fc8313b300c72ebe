/* Admin commands: renders backend state and the process list as text tables or JSON. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/admin.h"

/* Growing output buffer; `failed` latches an allocation failure so callers check once. */
struct abuf {
    char *p;
    size_t len, cap;
    int failed;
};

static void abuf_reserve(struct abuf *b, size_t more)
{
    if (b->failed || b->len + more + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + more + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->failed = 1;
        return;
    }
    b->p = p;
    b->cap = cap;
}

static void abuf_printf(struct abuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void abuf_printf(struct abuf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->failed = 1;
        return;
    }
    abuf_reserve(b, (size_t)n);
    if (b->failed)
        return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* A JSON string literal, quotes included. */
static void abuf_json_str(struct abuf *b, const char *s)
{
    abuf_printf(b, "\"");
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (*c == '"' || *c == '\\')
            abuf_printf(b, "\\%c", *c);
        else if (*c == '\n')
            abuf_printf(b, "\\n");
        else if (*c == '\r')
            abuf_printf(b, "\\r");
        else if (*c == '\t')
            abuf_printf(b, "\\t");
        else if (*c < 0x20 || *c == 0x7f)
            abuf_printf(b, "\\u%04x", *c);
        else
            abuf_printf(b, "%c", *c);
    }
    abuf_printf(b, "\"");
}

/* The backend's URL as configured: scheme://host:port/prefix (IPv6 hosts in brackets). */
static void url_format(const struct url *u, char *out, size_t size)
{
    int v6 = strchr(u->host, ':') != NULL;
    snprintf(out, size, "%s://%s%s%s:%u%s", u->tls ? "https" : "http", v6 ? "[" : "", u->host,
             v6 ? "]" : "", u->port, u->prefix);
}

/* Last check outcome for the table: HTTP status, errno name, or "-" when never checked. */
static void check_format(int checked, int32_t status, char *out, size_t size)
{
    if (!checked) {
        snprintf(out, size, "-");
    } else if (status >= 0) {
        snprintf(out, size, "%d", status);
    } else {
        const char *name = strerrorname_np(-status);
        snprintf(out, size, "%s", name ? name : "error");
    }
}

/* Everything one backend row shows, read once from shm. */
struct backend_row {
    const char *pool, *name, *state, *admin, *breaker, *reason;
    char url[CONF_HOST_MAX + CONF_PATH_MAX + 32];
    uint32_t weight;
    struct shm_backend_totals t;
    int checked;
    int32_t check_status;
    uint32_t check_us;
    char check[32]; /* check_status as the table shows it */
};

static void backend_row_read(const struct conf *conf, const struct shm *shm, int i,
                             struct backend_row *r)
{
    const struct conf_backend *cb = &conf->backends[i];
    const struct shm_backend *sb = shm_backend(shm, (uint32_t)i);

    r->pool = cb->pool >= 0 && cb->pool < conf->n_pools ? conf->pools[cb->pool].name : "?";
    r->name = cb->name;
    url_format(&cb->url, r->url, sizeof(r->url));
    r->state = shm_state_str(shm_backend_state(shm, (uint32_t)i));
    r->admin =
        shm_admin_str((enum backend_admin)atomic_load_explicit(&sb->admin, memory_order_relaxed));
    r->breaker = shm_breaker_str(
        (enum breaker_state)atomic_load_explicit(&sb->breaker, memory_order_relaxed));
    r->reason = shm_reason_str(
        (enum backend_reason)atomic_load_explicit(&sb->reason, memory_order_relaxed));
    r->weight = atomic_load_explicit(&sb->weight_eff, memory_order_relaxed);
    shm_backend_totals(shm, (uint32_t)i, &r->t);
    r->checked = atomic_load_explicit(&sb->check_at_ns, memory_order_acquire) != 0;
    r->check_status = atomic_load_explicit(&sb->check_status, memory_order_relaxed);
    r->check_us = atomic_load_explicit(&sb->check_us, memory_order_relaxed);
}

/* Column widths grow to the longest cell so the table stays aligned with long names. */
static int width(int cur, const char *s)
{
    int n = (int)strlen(s);
    return n > cur ? n : cur;
}

static void show_backends(struct abuf *b, const struct conf *conf, const struct shm *shm)
{
    int n = conf->n_backends;
    if ((uint32_t)n > shm_n_backends(shm))
        n = (int)shm_n_backends(shm);

    /* Rows are read first so every column is as wide as its longest cell. */
    struct backend_row *rows = calloc(n ? (size_t)n : 1, sizeof(*rows));
    if (!rows) {
        b->failed = 1;
        return;
    }
    int wpool = 4, wname = 4, wstate = 5, wbreaker = 7, wcheck = 5, wreason = 6;
    for (int i = 0; i < n; i++) {
        struct backend_row *r = &rows[i];
        backend_row_read(conf, shm, i, r);
        check_format(r->checked, r->check_status, r->check, sizeof(r->check));
        wpool = width(wpool, r->pool);
        wname = width(wname, r->name);
        wstate = width(wstate, r->state);
        wbreaker = width(wbreaker, r->breaker);
        wcheck = width(wcheck, r->check);
        wreason = width(wreason, r->reason);
    }

    abuf_printf(b, "%-*s  %-*s  %-*s  %-5s  %-*s  %6s  %6s  %10s  %10s  %-*s  %13s  %-*s  %s\n",
                wpool, "POOL", wname, "NAME", wstate, "STATE", "ADMIN", wbreaker, "BREAKER",
                "WEIGHT", "ACTIVE", "REQUESTS", "FAILURES", wcheck, "CHECK", "LAST_CHECK_MS",
                wreason, "REASON", "URL");
    for (int i = 0; i < n; i++) {
        const struct backend_row *r = &rows[i];
        char ms[32];
        if (r->checked)
            snprintf(ms, sizeof(ms), "%u.%u", r->check_us / 1000, r->check_us % 1000 / 100);
        else
            snprintf(ms, sizeof(ms), "-");
        abuf_printf(b,
                    "%-*s  %-*s  %-*s  %-5s  %-*s  %6u  %6lld  %10llu  %10llu  %-*s  %13s  %-*s  "
                    "%s\n",
                    wpool, r->pool, wname, r->name, wstate, r->state, r->admin, wbreaker,
                    r->breaker, r->weight, (long long)r->t.active,
                    (unsigned long long)r->t.requests, (unsigned long long)r->t.failures, wcheck,
                    r->check, ms, wreason, r->reason, r->url);
    }
    free(rows);
}

static void show_backends_json(struct abuf *b, const struct conf *conf, const struct shm *shm)
{
    int n = conf->n_backends;
    if ((uint32_t)n > shm_n_backends(shm))
        n = (int)shm_n_backends(shm);

    abuf_printf(b, "[");
    for (int i = 0; i < n; i++) {
        struct backend_row r;
        backend_row_read(conf, shm, i, &r);
        abuf_printf(b, "%s\n  {\"pool\":", i ? "," : "");
        abuf_json_str(b, r.pool);
        abuf_printf(b, ",\"name\":");
        abuf_json_str(b, r.name);
        abuf_printf(b, ",\"url\":");
        abuf_json_str(b, r.url);
        abuf_printf(b, ",\"state\":");
        abuf_json_str(b, r.state);
        abuf_printf(b, ",\"admin\":");
        abuf_json_str(b, r.admin);
        abuf_printf(b, ",\"breaker\":");
        abuf_json_str(b, r.breaker);
        abuf_printf(b, ",\"weight\":%u,\"active\":%lld,\"requests\":%llu,\"failures\":%llu",
                    r.weight, (long long)r.t.active, (unsigned long long)r.t.requests,
                    (unsigned long long)r.t.failures);
        if (r.checked)
            /* Whole milliseconds, rounded: consumers expect an integer here. */
            abuf_printf(b, ",\"check_ms\":%u,\"check_status\":%d", (r.check_us + 500) / 1000,
                        r.check_status);
        else
            abuf_printf(b, ",\"check_ms\":null,\"check_status\":null");
        abuf_printf(b, ",\"reason\":");
        abuf_json_str(b, r.reason);
        abuf_printf(b, "}");
    }
    abuf_printf(b, "%s]\n", n ? "\n" : "");
}

static void started_format(uint64_t ms, char *out, size_t size)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    if (ms == 0 || !gmtime_r(&t, &tm) || !strftime(out, size, "%Y-%m-%dT%H:%M:%SZ", &tm))
        snprintf(out, size, "-");
}

static void show_proc(struct abuf *b, const struct admin_proc *procs, int n)
{
    abuf_printf(b, "%-6s  %4s  %8s  %-20s  %8s\n", "ROLE", "SLOT", "PID", "STARTED", "RESTARTS");
    for (int i = 0; i < n; i++) {
        const struct admin_proc *p = &procs[i];
        char slot[16], pid[16], started[32];
        if (p->slot >= 0)
            snprintf(slot, sizeof(slot), "%d", p->slot);
        else
            snprintf(slot, sizeof(slot), "-");
        if (p->pid > 0)
            snprintf(pid, sizeof(pid), "%d", p->pid);
        else
            snprintf(pid, sizeof(pid), "-");
        started_format(p->started_ms, started, sizeof(started));
        abuf_printf(b, "%-6s  %4s  %8s  %-20s  %8u\n", p->role, slot, pid, started, p->restarts);
    }
}

static void show_proc_json(struct abuf *b, const struct admin_proc *procs, int n)
{
    abuf_printf(b, "[");
    for (int i = 0; i < n; i++) {
        const struct admin_proc *p = &procs[i];
        abuf_printf(b, "%s\n  {\"role\":", i ? "," : "");
        abuf_json_str(b, p->role);
        abuf_printf(b, ",\"slot\":%d,\"pid\":%d,\"started\":%llu,\"restarts\":%u}", p->slot, p->pid,
                    (unsigned long long)(p->started_ms / 1000), p->restarts);
    }
    abuf_printf(b, "%s]\n", n ? "\n" : "");
}

static const char admin_help[] = "commands:\n"
                                 "  show backends [json]  backend state, weights and counters\n"
                                 "  show proc [json]      master, health checker and workers\n"
                                 "  help                  this list\n";

/* Splits the line into at most 4 blank-separated words; returns the word count, or 5 when
 * there are more (which no command accepts). */
static int split_words(const char *line, char words[4][32])
{
    int n = 0;
    const char *p = line;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
            p++;
        if (!*p)
            return n;
        if (n == 4)
            return 5;
        size_t len = strcspn(p, " \t\r\n");
        if (len >= sizeof(words[0]))
            len = sizeof(words[0]) - 1; /* too long for any keyword: still fails to match */
        memcpy(words[n], p, len);
        words[n][len] = '\0';
        n++;
        p += strcspn(p, " \t\r\n");
    }
}

/* "json" and "--json" both ask for JSON. */
static int is_json(const char *w)
{
    return !strcmp(w, "json") || !strcmp(w, "--json");
}

int admin_exec(const char *line, const struct conf *conf, const struct shm *shm,
               const struct admin_proc *procs, int n_procs, char **out, size_t *out_len)
{
    struct abuf b = {0};
    char w[4][32];
    int rc = 0;
    int n = split_words(line, w);

    if (n == 1 && !strcmp(w[0], "help")) {
        abuf_printf(&b, "%s", admin_help);
    } else if (n >= 2 && n <= 3 && !strcmp(w[0], "show") && (n == 2 || is_json(w[2])) &&
               (!strcmp(w[1], "backends") || !strcmp(w[1], "proc"))) {
        int json = n == 3;
        if (!strcmp(w[1], "backends") && json)
            show_backends_json(&b, conf, shm);
        else if (!strcmp(w[1], "backends"))
            show_backends(&b, conf, shm);
        else if (json)
            show_proc_json(&b, procs, n_procs);
        else
            show_proc(&b, procs, n_procs);
    } else {
        /* Echo at most a short, printable prefix of what was sent. */
        char echo[64];
        size_t k = 0;
        for (const char *p = line; *p && *p != '\n' && *p != '\r' && k < sizeof(echo) - 1; p++)
            echo[k++] = (*p >= 0x20 && *p < 0x7f) ? *p : '?';
        echo[k] = '\0';
        abuf_printf(&b, "error: unknown command '%s'; try 'help'\n", echo);
        rc = -EINVAL;
    }

    if (b.failed || !b.p) {
        free(b.p);
        *out = NULL;
        *out_len = 0;
        return -ENOMEM;
    }
    *out = b.p;
    *out_len = b.len;
    return rc;
}
