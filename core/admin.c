/* Admin commands: renders backend state and the process list as text tables or JSON. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "core/admin.h"
#include "core/log.h"
#include "core/util.h"

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

/* Time left until `until_ns`, in whole milliseconds rounded up (so a state that is still on
 * never shows 0); 0 when it has passed or is unset. */
static uint64_t left_ms(uint64_t until_ns, uint64_t now_ns)
{
    return until_ns > now_ns ? (until_ns - now_ns + 999999) / 1000000 : 0;
}

/* Everything one backend row shows, read once from shm. */
struct backend_row {
    const char *pool, *name, *state, *admin, *breaker, *reason;
    char url[CONF_HOST_MAX + CONF_PATH_MAX + 32];
    uint32_t weight, weight_cfg;
    struct shm_backend_totals t;
    uint64_t retries;
    uint64_t breaker_left_ms; /* OPEN: until half-open; 0 otherwise */
    uint64_t cooling_ms;      /* 429 cool-down left, 0 = not cooling */
    uint64_t ewma_ns;         /* peak-EWMA latency, 0 = no sample yet */
    int changed;              /* the state changed at least once (since_s is known) */
    uint64_t since_s;         /* seconds since the last state change */
    int checked;
    int32_t check_status;
    uint32_t check_us;
    char check[32]; /* check_status as the table shows it */
};

static void backend_row_read(const struct conf *conf, const struct shm *shm, int i, uint64_t now_ns,
                             struct backend_row *r)
{
    const struct conf_backend *cb = &conf->backends[i];
    uint32_t b = (uint32_t)i;
    struct shm_backend_view v;

    shm_backend_view(shm, b, &v);
    r->pool = cb->pool >= 0 && cb->pool < conf->n_pools ? conf->pools[cb->pool].name : "?";
    r->name = cb->name;
    url_format(&cb->url, r->url, sizeof(r->url));
    r->state = shm_state_str(v.h->state);
    r->admin = shm_admin_str(v.admin);
    r->breaker = shm_breaker_str(v.h->breaker);
    r->breaker_left_ms = v.h->breaker == BREAKER_OPEN ? left_ms(v.h->breaker_until_ns, now_ns) : 0;
    r->reason = shm_reason_str(v.h->reason);
    r->weight = v.h->weight_eff;
    r->weight_cfg = v.weight_cfg;
    shm_backend_totals(shm, b, &r->t);
    r->retries = r->t.retries;
    r->cooling_ms = left_ms(shm_backend_cool_until(shm, b), now_ns);
    r->ewma_ns = shm_backend_ewma(shm, b, now_ns);
    r->changed = v.h->since_ns != 0;
    r->since_s =
        v.h->since_ns && now_ns > v.h->since_ns ? (now_ns - v.h->since_ns) / 1000000000 : 0;
    r->checked = v.h->check_at_ns != 0;
    r->check_status = v.h->check_status;
    r->check_us = v.h->check_us;
}

/* Column widths grow to the longest cell so the table stays aligned with long names. */
static int width(int cur, const char *s)
{
    int n = (int)strlen(s);
    return n > cur ? n : cur;
}

/* Milliseconds as the table shows a time left: "850ms", "12.3s", "4m05s". */
static void ms_format(uint64_t ms, char *out, size_t size)
{
    if (ms < 1000)
        snprintf(out, size, "%llums", (unsigned long long)ms);
    else if (ms < 60000)
        snprintf(out, size, "%llu.%llus", (unsigned long long)(ms / 1000),
                 (unsigned long long)(ms % 1000 / 100));
    else
        snprintf(out, size, "%llum%02llus", (unsigned long long)(ms / 60000),
                 (unsigned long long)(ms % 60000 / 1000));
}

/* Seconds as the SINCE column shows them: "42s", "12m05s", "3h07m", "5d04h". */
static void secs_format(uint64_t s, char *out, size_t size)
{
    unsigned long long v = s;
    if (v < 60)
        snprintf(out, size, "%llus", v);
    else if (v < 3600)
        snprintf(out, size, "%llum%02llus", v / 60, v % 60);
    else if (v < 86400)
        snprintf(out, size, "%lluh%02llum", v / 3600, v % 3600 / 60);
    else
        snprintf(out, size, "%llud%02lluh", v / 86400, v % 86400 / 3600);
}

/* Nanoseconds as milliseconds with one decimal, rounded ("12.3"), printed from integers: no
 * locale, no float rounding surprises. */
static void tenths_format(uint64_t ns, char *out, size_t size)
{
    unsigned long long tenths = (ns + 50000) / 100000;
    snprintf(out, size, "%llu.%llu", tenths / 10, tenths % 10);
}

/* Table cells other than the fixed-width numbers. */
struct backend_cells {
    char breaker[40]; /* "open 12.3s" */
    char weight[24];  /* "eff/cfg" */
    char cooling[24];
    char ewma[32];
    char since[24];
    char ms[32]; /* last check duration */
};

static void backend_cells_format(const struct backend_row *r, struct backend_cells *c)
{
    if (r->breaker_left_ms) {
        char left[24];
        ms_format(r->breaker_left_ms, left, sizeof(left));
        snprintf(c->breaker, sizeof(c->breaker), "%s %s", r->breaker, left);
    } else {
        snprintf(c->breaker, sizeof(c->breaker), "%s", r->breaker);
    }
    snprintf(c->weight, sizeof(c->weight), "%u/%u", r->weight, r->weight_cfg);
    if (r->cooling_ms)
        ms_format(r->cooling_ms, c->cooling, sizeof(c->cooling));
    else
        snprintf(c->cooling, sizeof(c->cooling), "-");
    if (r->ewma_ns)
        tenths_format(r->ewma_ns, c->ewma, sizeof(c->ewma));
    else
        snprintf(c->ewma, sizeof(c->ewma), "-");
    if (r->changed)
        secs_format(r->since_s, c->since, sizeof(c->since));
    else
        snprintf(c->since, sizeof(c->since), "-");
    if (r->checked)
        snprintf(c->ms, sizeof(c->ms), "%u.%u", r->check_us / 1000, r->check_us % 1000 / 100);
    else
        snprintf(c->ms, sizeof(c->ms), "-");
}

static void show_backends(struct abuf *b, const struct conf *conf, const struct shm *shm)
{
    int n = conf->n_backends;
    if ((uint32_t)n > shm_n_backends(shm))
        n = (int)shm_n_backends(shm);
    uint64_t now = time_mono_ns();

    /* Rows are read first so every column is as wide as its longest cell. */
    struct backend_row *rows = calloc(n ? (size_t)n : 1, sizeof(*rows));
    struct backend_cells *cells = calloc(n ? (size_t)n : 1, sizeof(*cells));
    if (!rows || !cells) {
        b->failed = 1;
        goto out;
    }
    int wpool = 4, wname = 4, wstate = 5, wbreaker = 7, wweight = 6, wcheck = 5, wreason = 6;
    for (int i = 0; i < n; i++) {
        struct backend_row *r = &rows[i];
        backend_row_read(conf, shm, i, now, r);
        check_format(r->checked, r->check_status, r->check, sizeof(r->check));
        backend_cells_format(r, &cells[i]);
        wpool = width(wpool, r->pool);
        wname = width(wname, r->name);
        wstate = width(wstate, r->state);
        wbreaker = width(wbreaker, cells[i].breaker);
        wweight = width(wweight, cells[i].weight);
        wcheck = width(wcheck, r->check);
        wreason = width(wreason, r->reason);
    }

    abuf_printf(b,
                "%-*s  %-*s  %-*s  %-5s  %-*s  %*s  %6s  %7s  %8s  %10s  %10s  %8s  %-*s  %13s  "
                "%7s  %-*s  %s\n",
                wpool, "POOL", wname, "NAME", wstate, "STATE", "ADMIN", wbreaker, "BREAKER",
                wweight, "WEIGHT", "ACTIVE", "COOLING", "EWMA_MS", "REQUESTS", "FAILURES",
                "RETRIES", wcheck, "CHECK", "LAST_CHECK_MS", "SINCE", wreason, "REASON", "URL");
    for (int i = 0; i < n; i++) {
        const struct backend_row *r = &rows[i];
        const struct backend_cells *c = &cells[i];
        abuf_printf(b,
                    "%-*s  %-*s  %-*s  %-5s  %-*s  %*s  %6lld  %7s  %8s  %10llu  %10llu  %8llu  "
                    "%-*s  %13s  %7s  %-*s  %s\n",
                    wpool, r->pool, wname, r->name, wstate, r->state, r->admin, wbreaker,
                    c->breaker, wweight, c->weight, (long long)r->t.active, c->cooling, c->ewma,
                    (unsigned long long)r->t.requests, (unsigned long long)r->t.failures,
                    (unsigned long long)r->retries, wcheck, r->check, c->ms, c->since, wreason,
                    r->reason, r->url);
    }
out:
    free(rows);
    free(cells);
}

static void show_backends_json(struct abuf *b, const struct conf *conf, const struct shm *shm)
{
    int n = conf->n_backends;
    if ((uint32_t)n > shm_n_backends(shm))
        n = (int)shm_n_backends(shm);
    uint64_t now = time_mono_ns();

    abuf_printf(b, "[");
    for (int i = 0; i < n; i++) {
        struct backend_row r;
        backend_row_read(conf, shm, i, now, &r);
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
        abuf_printf(b,
                    ",\"breaker_left_ms\":%llu,\"weight\":%u,\"weight_cfg\":%u,\"active\":%lld,"
                    "\"cooling_ms\":%llu",
                    (unsigned long long)r.breaker_left_ms, r.weight, r.weight_cfg,
                    (long long)r.t.active, (unsigned long long)r.cooling_ms);
        if (r.ewma_ns) {
            char ewma[32];
            tenths_format(r.ewma_ns, ewma, sizeof(ewma));
            abuf_printf(b, ",\"ewma_ms\":%s", ewma);
        } else {
            abuf_printf(b, ",\"ewma_ms\":null");
        }
        abuf_printf(b, ",\"requests\":%llu,\"failures\":%llu,\"retries\":%llu",
                    (unsigned long long)r.t.requests, (unsigned long long)r.t.failures,
                    (unsigned long long)r.retries);
        if (r.checked)
            /* Whole milliseconds, rounded: consumers expect an integer here. */
            abuf_printf(b, ",\"check_ms\":%u,\"check_status\":%d", (r.check_us + 500) / 1000,
                        r.check_status);
        else
            abuf_printf(b, ",\"check_ms\":null,\"check_status\":null");
        abuf_printf(b, ",\"reason\":");
        abuf_json_str(b, r.reason);
        if (r.changed)
            abuf_printf(b, ",\"since_s\":%llu}", (unsigned long long)r.since_s);
        else
            abuf_printf(b, ",\"since_s\":null}");
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

static const char admin_help[] =
    "commands:\n"
    "  show backends [json]     state, breaker, weights, latency and counters of each backend\n"
    "  show proc [json]         master, health checker and workers\n"
    "  breaker reset BACKEND    force the circuit breaker of BACKEND (NAME or POOL/NAME) closed\n"
    "  breaker open BACKEND     force it open for the pool's breaker_open_for\n"
    "  set backend BACKEND ready|drain|maint\n"
    "                           operator state: drain takes no new requests (in-flight ones\n"
    "                           finish), maint also pauses its checks, ready serves again\n"
    "  help                     this list\n";

#define WORD_MAX (2 * CONF_NAME_MAX + 2) /* room for POOL/NAME */

#define WORDS_MAX 5

/* Splits the line into words separated by blanks. Fills words[0, *n_set) (at most WORDS_MAX)
 * and returns the word count, or WORDS_MAX + 1 when there are more words or one is longer than
 * any name (no command accepts either). Only words[0, *n_set) are set: with a first word too
 * long, the count says "too many" while *n_set is 0. */
static int split_words(const char *line, char words[WORDS_MAX][WORD_MAX], int *n_set)
{
    int n = 0;
    const char *p = line;

    *n_set = 0;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')
            p++;
        if (!*p)
            return n;
        if (n == WORDS_MAX)
            return WORDS_MAX + 1;
        size_t len = strcspn(p, " \t\r\n");
        if (len >= sizeof(words[0]))
            return WORDS_MAX + 1; /* a truncated name could match another backend: refuse */
        memcpy(words[n], p, len);
        words[n][len] = '\0';
        *n_set = ++n;
        p += len;
    }
}

/* "json" and "--json" both ask for JSON. */
static int is_json(const char *w)
{
    return !strcmp(w, "json") || !strcmp(w, "--json");
}

/* Backend index of "NAME" or "POOL/NAME", or -1. */
static int backend_lookup(const struct conf *conf, const struct shm *shm, const char *arg)
{
    int n = conf->n_backends;
    if ((uint32_t)n > shm_n_backends(shm))
        n = (int)shm_n_backends(shm);
    const char *slash = strchr(arg, '/');
    for (int i = 0; i < n; i++) {
        const struct conf_backend *cb = &conf->backends[i];
        if (!strcmp(cb->name, arg))
            return i;
        if (slash && cb->pool >= 0 && cb->pool < conf->n_pools && !strcmp(cb->name, slash + 1) &&
            strlen(conf->pools[cb->pool].name) == (size_t)(slash - arg) &&
            !memcmp(conf->pools[cb->pool].name, arg, (size_t)(slash - arg)))
            return i;
    }
    return -1;
}

/* Prints "error: no backend called 'ARG'" with ARG made printable. */
static void no_such_backend(struct abuf *b, const char *arg)
{
    char echo[WORD_MAX];
    size_t k = 0;

    for (const char *p = arg; *p && k < sizeof(echo) - 1; p++)
        echo[k++] = (*p >= 0x20 && *p < 0x7f) ? *p : '?';
    echo[k] = '\0';
    abuf_printf(b, "error: no backend called '%s'\n", echo);
}

/* "breaker reset|open BACKEND": the master asks, the health checker (the only writer of
 * breaker state) carries it out on its next evaluation. */
static int breaker_command(struct abuf *b, const struct conf *conf, struct shm *shm,
                           const char *verb, const char *arg, int json,
                           struct admin_pending *pending)
{
    enum breaker_cmd cmd = !strcmp(verb, "reset") ? BREAKER_CMD_RESET : BREAKER_CMD_OPEN;
    int i = backend_lookup(conf, shm, arg);
    if (i < 0) {
        no_such_backend(b, arg);
        return -ENOENT;
    }
    const struct conf_backend *cb = &conf->backends[i];
    const char *pool = cb->pool >= 0 && cb->pool < conf->n_pools ? conf->pools[cb->pool].name : "?";

    uint32_t seq = shm_backend_breaker_cmd(shm, (uint32_t)i, cmd);
    if (pending) {
        pending->backend = i;
        pending->seq = seq;
        pending->want = cmd == BREAKER_CMD_RESET ? BREAKER_CLOSED : BREAKER_OPEN;
    }
    if (json) {
        abuf_printf(b, "{\"ok\":true,\"pool\":");
        abuf_json_str(b, pool);
        abuf_printf(b, ",\"name\":");
        abuf_json_str(b, cb->name);
        abuf_printf(b, ",\"breaker\":\"%s\"}\n", verb);
    } else {
        abuf_printf(b, "ok: breaker of %s/%s will be %s\n", pool, cb->name,
                    cmd == BREAKER_CMD_RESET ? "reset" : "opened");
    }
    return 0;
}

/* "set backend BACKEND ready|drain|maint": the operator state, whose only writer is the
 * master. Workers stop picking a backend that is not READY at once; the health checker
 * pauses the checks of one in MAINT. */
static int set_backend_command(struct abuf *b, const struct conf *conf, struct shm *shm,
                               const char *arg, const char *state, int json)
{
    static const char *const names[] = {
        [BACKEND_READY] = "ready", [BACKEND_DRAIN] = "drain", [BACKEND_MAINT] = "maint"};
    int i = backend_lookup(conf, shm, arg);
    int st = -1;

    for (int k = 0; k < (int)(sizeof(names) / sizeof(names[0])); k++)
        if (!strcasecmp(state, names[k]))
            st = k;
    if (st < 0) {
        abuf_printf(b, "error: usage: set backend BACKEND ready|drain|maint\n");
        return -EINVAL;
    }
    if (i < 0) {
        no_such_backend(b, arg);
        return -ENOENT;
    }
    const struct conf_backend *cb = &conf->backends[i];
    const char *pool = cb->pool >= 0 && cb->pool < conf->n_pools ? conf->pools[cb->pool].name : "?";
    enum backend_admin was = shm_backend_set_admin(shm, (uint32_t)i, (enum backend_admin)st);

    if (was != (enum backend_admin)st)
        log_info("backend %s/%s set to %s by the operator (was %s)", pool, cb->name,
                 shm_admin_str((enum backend_admin)st), shm_admin_str(was));
    if (json) {
        abuf_printf(b, "{\"ok\":true,\"pool\":");
        abuf_json_str(b, pool);
        abuf_printf(b, ",\"name\":");
        abuf_json_str(b, cb->name);
        abuf_printf(b, ",\"admin\":\"%s\"}\n", shm_admin_str((enum backend_admin)st));
    } else {
        abuf_printf(b, "ok: %s/%s is %s\n", pool, cb->name, shm_admin_str((enum backend_admin)st));
    }
    return 0;
}

int admin_pending_done(const struct shm *shm, const struct admin_pending *p)
{
    if (p->backend < 0 || (uint32_t)p->backend >= shm_n_backends(shm))
        return 1;
    struct shm_backend_view v;

    /* The checker marks the command done as it takes it and publishes the breaker just
     * after: the state is checked too, so the answer never beats the change. */
    shm_backend_view(shm, (uint32_t)p->backend, &v);
    return (int32_t)(v.breaker_cmd_done - p->seq) >= 0 &&
           v.h->breaker == (enum breaker_state)p->want;
}

int admin_exec(const char *line, const struct conf *conf, struct shm *shm,
               const struct admin_proc *procs, int n_procs, struct admin_pending *pending,
               char **out, size_t *out_len)
{
    struct abuf b = {0};
    char w[WORDS_MAX][WORD_MAX];
    int rc = 0, set;
    int n = split_words(line, w, &set);

    if (pending)
        *pending = (struct admin_pending){.backend = -1};
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
    } else if (n >= 3 && n <= 4 && !strcmp(w[0], "breaker") &&
               (!strcmp(w[1], "reset") || !strcmp(w[1], "open")) && (n == 3 || is_json(w[3]))) {
        rc = breaker_command(&b, conf, shm, w[1], w[2], n == 4, pending);
    } else if (n >= 4 && n <= 5 && !strcmp(w[0], "set") && !strcmp(w[1], "backend") &&
               (n == 4 || is_json(w[4]))) {
        rc = set_backend_command(&b, conf, shm, w[2], w[3], n == 5);
    } else {
        /* Echo at most a short, printable prefix of what was sent. */
        char echo[64];
        size_t k = 0;
        for (const char *p = line; *p && *p != '\n' && *p != '\r' && k < sizeof(echo) - 1; p++)
            echo[k++] = (*p >= 0x20 && *p < 0x7f) ? *p : '?';
        echo[k] = '\0';
        if (set >= 1 && !strcmp(w[0], "breaker"))
            abuf_printf(&b, "error: usage: breaker reset|open BACKEND\n");
        else if (set >= 1 && !strcmp(w[0], "set"))
            abuf_printf(&b, "error: usage: set backend BACKEND ready|drain|maint\n");
        else
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
