/* Admin commands: renders backend state, the process list, client keys and usage totals as
 * text tables or JSON. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "core/admin.h"
#include "core/log.h"
#include "core/meter.h"
#include "core/out.h"
#include "core/util.h"
#include "balancer/algo.h"

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

static void show_backends(struct abuf *b, const struct conf *conf, const struct shm *shm, int pool)
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
        if (pool >= 0 && conf->backends[i].pool != pool)
            continue;
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
        if (pool >= 0 && conf->backends[i].pool != pool)
            continue;
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

static void show_backends_json(struct abuf *b, const struct conf *conf, const struct shm *shm,
                               int pool)
{
    int n = conf->n_backends;
    if ((uint32_t)n > shm_n_backends(shm))
        n = (int)shm_n_backends(shm);
    uint64_t now = time_mono_ns();

    int shown = 0;

    abuf_printf(b, "[");
    for (int i = 0; i < n; i++) {
        struct backend_row r;
        if (pool >= 0 && conf->backends[i].pool != pool)
            continue;
        backend_row_read(conf, shm, i, now, &r);
        abuf_printf(b, "%s\n  {\"pool\":", shown++ ? "," : "");
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
    abuf_printf(b, "%s]\n", shown ? "\n" : "");
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
    "commands (json or --json after a command that shows something answers in JSON):\n"
    "  show info [json]         version, pid, uptime, generation, workers, connections,\n"
    "                           requests/s, access log drops, config file\n"
    "  show proc [json]         master, health checker and workers\n"
    "  show pools [json]        algorithm, backends up/total, in-flight, requests, models and\n"
    "                           paths served and limits of each pool\n"
    "  show backends [POOL] [json]\n"
    "                           state, breaker, weights, latency and counters of each backend\n"
    "                           (of POOL only)\n"
    "  show keys [json]         client keys: limits, current window use, budget, totals\n"
    "  show cluster [json]      [cluster]: node, Redis, state, hosts alive and the lease of\n"
    "                           each fleet limit with the fleet's counts and the lease bound\n"
    "  show usage [--by key|model|backend] [--fleet] [json]\n"
    "                           tokens, requests and cost per key (default), model or\n"
    "                           backend, with a total; --fleet: the fleet's ([cluster])\n"
    "  set weight BACKEND N|N%  the backend's weight: 0..256, or a percentage of the\n"
    "                           configured one; a reload keeps it\n"
    "  set backend BACKEND ready|drain|maint\n"
    "                           operator state: drain takes no new requests (in-flight ones\n"
    "                           finish), maint also pauses its checks, ready serves again\n"
    "  check BACKEND            run a health check of BACKEND now and print its result\n"
    "  breaker reset BACKEND    force the circuit breaker of BACKEND (NAME or POOL/NAME) closed\n"
    "  breaker open BACKEND     force it open for the pool's breaker_open_for\n"
    "  reload [json]            check the config file and start a new generation on it; the\n"
    "                           old one drains once the new workers are ready\n"
    "  upgrade [json]           start the binary on disk as a new master on the same sockets,\n"
    "                           carrying the state; the old one drains once it is ready\n"
    "  stop                     graceful stop (as SIGTERM): in-flight requests finish\n"
    "  help                     this list\n";

/* ---- show cluster ---- */

/* The kind and name of limiter id (ids: keys, models, pools, as the master made them). */
static void limiter_name(const struct conf *conf, uint32_t id, const char **kind, const char **name)
{
    uint32_t nk = (uint32_t)conf->n_keys, nm = (uint32_t)conf->n_models;

    if (id < nk) {
        *kind = "key";
        *name = conf->keys[id].name;
    } else if (id < nk + nm) {
        *kind = "model";
        *name = conf->models[id - nk].name;
    } else {
        *kind = "pool";
        *name = conf->pools[id - nk - nm].name;
    }
}

static const char *const fleet_states[] = {"connecting", "connected", "fallback"};
static const char *const lease_modes[] = {"lease", "local_share", "open", "closed"};

/* [cluster]: this node, Redis, the state, and each leased limiter's lease (read from shm: the
 * sync process writes it). */
static void show_cluster(struct abuf *b, const struct conf *conf, struct shm *shm, int json)
{
    const struct conf_cluster *cl = &conf->cluster;
    struct limit_region *lr = shm_limits(shm);
    struct limit_fleet *f = lr ? limit_fleet(lr) : NULL;
    uint64_t now = time_mono_ms();
    uint32_t st, n = lr ? limit_region_count(lr) : 0;
    int first = 1;

    if (!cl->enabled || !f) {
        if (json)
            abuf_printf(b, "{\"enabled\":false}\n");
        else
            abuf_printf(b, "cluster: off (no [cluster] section): every limit is this host's\n");
        return;
    }
    st = atomic_load_explicit(&f->state, memory_order_relaxed);
    if (st > LIMIT_FLEET_FALLBACK)
        st = LIMIT_FLEET_CONNECTING;
    if (json) {
        abuf_printf(b, "{\"enabled\":true,\"node\":");
        abuf_json_str(b, cl->node_name);
        abuf_printf(b, ",\"redis\":");
        abuf_json_str(b, cl->redis);
        abuf_printf(b,
                    ",\"state\":\"%s\",\"fallback_policy\":\"%s\",\"since_ms\":%llu,"
                    "\"nodes_alive\":%u,\"node_clash\":%s,\"renewals\":%llu,\"errors\":%llu,"
                    "\"rtt_us\":%llu,\"sync_interval_ms\":%llu,\"lease_ttl_ms\":%llu,"
                    "\"limiters\":[",
                    fleet_states[st], conf_cluster_fallback_str(cl->fallback),
                    (unsigned long long)atomic_load(&f->since_ms), atomic_load(&f->nodes_alive),
                    atomic_load(&f->node_clash) ? "true" : "false",
                    (unsigned long long)atomic_load(&f->renewals),
                    (unsigned long long)atomic_load(&f->errors),
                    (unsigned long long)atomic_load(&f->rtt_us),
                    (unsigned long long)cl->sync_interval_ms, (unsigned long long)cl->lease_ttl_ms);
    } else {
        abuf_printf(b,
                    "node %s  redis %s  state %s  fallback policy %s  nodes alive %u\n"
                    "renewals %llu  errors %llu  last rtt %llu us  sync_interval %llu ms  "
                    "lease_ttl %llu ms\n",
                    cl->node_name, cl->redis, fleet_states[st],
                    conf_cluster_fallback_str(cl->fallback), atomic_load(&f->nodes_alive),
                    (unsigned long long)atomic_load(&f->renewals),
                    (unsigned long long)atomic_load(&f->errors),
                    (unsigned long long)atomic_load(&f->rtt_us),
                    (unsigned long long)cl->sync_interval_ms, (unsigned long long)cl->lease_ttl_ms);
        if (atomic_load(&f->node_clash))
            abuf_printf(b,
                        "WARNING: another aigw instance uses node_name %s: give each host its "
                        "own (leases, slots and budget reports of the two get mixed up)\n",
                        cl->node_name);
        abuf_printf(b, "%-24s  %-11s  %9s  %9s  %6s  %9s  %21s  %21s  %s\n", "LIMITER", "MODE",
                    "RPM", "TPM", "PAR", "LEFT_MS", "LEASE_REQ/TOK/PAR", "FLEET_REQ/TOK/PAR",
                    "BOUND_REQ/TOK");
    }
    for (uint32_t id = 0; id < n; id++) {
        const char *kind, *name;
        struct limit_lease le;
        struct limit_info li;
        char who[CONF_NAME_MAX + 8], lease[64], fleet[48], bound[48];
        int busy;
        uint64_t left;

        if (!limit_leased(lr, id))
            continue;
        limiter_name(conf, id, &kind, &name);
        busy = limit_lease_get(lr, id, &le) < 0;
        limit_info(lr, id, now, (int64_t)(time_real_ms() / 1000), &li);
        left = le.until_ms > now ? le.until_ms - now : 0;
        if (le.fallback > LIMIT_FALLBACK_CLOSED)
            le.fallback = LIMIT_FALLBACK_NONE;
        if (json) {
            abuf_printf(b, "%s\n  {\"kind\":\"%s\",\"name\":", first ? "" : ",", kind);
            abuf_json_str(b, name);
            abuf_printf(
                b,
                ",\"mode\":\"%s\",\"busy\":%s,\"rpm\":%u,\"tpm\":%u,\"max_parallel\":%u,"
                "\"lease\":{\"requests\":%lld,\"tokens\":%lld,\"parallel\":%u,"
                "\"left_ms\":%llu},\"used_since_renewal\":{\"requests\":%lld,"
                "\"tokens\":%lld},\"window\":{\"requests\":%u,\"tokens\":%llu},"
                "\"in_flight\":%u,\"fleet\":{\"requests\":%lld,\"tokens\":%lld,\"parallel\":%lld},"
                "\"bound\":{\"requests\":%lld,\"tokens\":%lld},\"budget\":{\"lease_nano\":%lld,"
                "\"used_nano\":%lld,\"reserved_nano\":%llu,\"fleet_spent_nano\":%lld}}",
                lease_modes[le.fallback], busy ? "true" : "false", li.spec.rpm, li.spec.tpm,
                li.spec.max_parallel, (long long)le.req, (long long)le.tok, le.par,
                (unsigned long long)left, (long long)le.used_req, (long long)le.used_tok,
                li.requests, (unsigned long long)li.tokens, le.parallel, (long long)le.fleet_req,
                (long long)le.fleet_tok, (long long)le.fleet_par, (long long)le.out_req,
                (long long)le.out_tok, (long long)le.nano, (long long)le.used_nano,
                (unsigned long long)le.reserved_nano, (long long)le.fleet_spent);
        } else {
            snprintf(who, sizeof(who), "%s %s", kind, name);
            snprintf(lease, sizeof(lease), "%lld/%lld/%u", (long long)le.req, (long long)le.tok,
                     le.par);
            snprintf(fleet, sizeof(fleet), "%lld/%lld/%lld", (long long)le.fleet_req,
                     (long long)le.fleet_tok, (long long)le.fleet_par);
            snprintf(bound, sizeof(bound), "%lld/%lld", (long long)le.out_req,
                     (long long)le.out_tok);
            abuf_printf(b, "%-24s  %-11s  %9u  %9u  %6u  %9llu  %21s  %21s  %s%s\n", who,
                        lease_modes[le.fallback], li.spec.rpm, li.spec.tpm, li.spec.max_parallel,
                        (unsigned long long)left, lease, fleet, bound, busy ? "  (busy)" : "");
        }
        first = 0;
    }
    if (json)
        abuf_printf(b, "%s]}\n", first ? "" : "\n");
    else
        abuf_printf(b, "FLEET: what Redis counts in the window (used and leased); BOUND: leases "
                       "granted within lease_ttl, the most the fleet may admit below a limit\n");
}

#define WORD_MAX (2 * CONF_NAME_MAX + 2) /* room for POOL/NAME */

#define WORDS_MAX 6 /* show usage --by KIND --fleet json */

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

/* ---- the AI layer: keys, their limits and budgets, usage totals ---- */

/* USD from nano-USD as the tables and JSON show it ("0.0075", "12"): exact, no float. */
static void usd_format(uint64_t nano, char *out, size_t size)
{
    struct out o = {out, 0, size - 1, 0};
    meter_usd(&o, nano);
    if (o.over)
        o.len = (size_t)snprintf(out, size, "?");
    out[o.len] = '\0';
}

/* UTC seconds as "2027-01-31T00:00:00Z", or "-" for 0 (never). */
static void utc_format(int64_t s, char *out, size_t size)
{
    time_t t = (time_t)s;
    struct tm tm;
    if (s == 0 || !gmtime_r(&t, &tm) || !strftime(out, size, "%Y-%m-%dT%H:%M:%SZ", &tm))
        snprintf(out, size, "-");
}

/* The models a key may use as one cell: its globs joined by ",", "*" when every model. */
static void models_format(const struct conf_list *l, struct abuf *b)
{
    if (l->n == 0) {
        abuf_printf(b, "*");
        return;
    }
    for (int i = 0; i < l->n; i++)
        abuf_printf(b, "%s%s", i ? "," : "", l->items[i]);
}

/* Sums of totals saturate as the totals do (shm/acct.c): never a wrapped, small number. */
static uint64_t add_sat(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

static int64_t fleet_age_ms(const struct shm *shm);

/* Everything one `show keys` row shows, read once from shm. */
struct key_row {
    const char *name;
    char models[512];
    char expires[32];
    int expired;
    struct limit_info li; /* zeroed when the segment has no limiter for it */
    int busy; /* its limiter's lock was not had in time (a worker stopped holding it): li's
               * counts and the budget's figures are unknown */
    uint64_t budget, spent, reserved, remaining; /* nano-USD; budget 0 = none */
    struct acct_usage u;
    /* [cluster]: the fleet's totals and (budget_known) its spent in the budget's period, as the
     * sync process last read them from Redis */
    int fleet, budget_known;
    uint64_t fleet_spent, fleet_remaining;
    struct acct_usage fu;
};

static void key_row_read(const struct conf *conf, const struct shm *shm, int i, uint64_t now_ms,
                         int64_t wall_s, struct key_row *r)
{
    const struct conf_apikey *k = &conf->keys[i];
    struct limit_region *lr = shm_limits(shm);
    struct acct_region *ar = shm_acct(shm);
    struct abuf m = {0};

    memset(r, 0, sizeof(*r));
    r->name = k->name;
    models_format(&k->models, &m);
    snprintf(r->models, sizeof(r->models), "%s", m.p && !m.failed ? m.p : "?");
    free(m.p);
    utc_format(k->expires, r->expires, sizeof(r->expires));
    r->expired = k->expires && wall_s >= k->expires;
    /* The limits as configured even when the segment has none (then nothing is counted). */
    r->li.spec = (struct limit_spec){.rpm = k->lim.rpm,
                                     .tpm = k->lim.tpm,
                                     .max_parallel = k->lim.max_parallel,
                                     .budget_nano = k->budget_nusd,
                                     .period = LIMIT_PERIOD_MONTH};
    if (lr && (uint32_t)i < limit_region_count(lr) &&
        limit_info(lr, (uint32_t)i, now_ms, wall_s, &r->li) == -EBUSY)
        r->busy = 1;
    r->budget = k->budget_nusd;
    if (r->budget && !r->busy) {
        r->spent = r->li.budget.spent_nano;
        r->reserved = r->li.budget.reserved_nano;
        uint64_t used = add_sat(r->spent, r->reserved);
        r->remaining = used < r->budget ? r->budget - used : 0;
    }
    if (ar && (uint32_t)i < acct_count(ar, ACCT_KEY))
        acct_get(ar, ACCT_KEY, (uint32_t)i, &r->u);
    r->fleet = conf->cluster.enabled && ar;
    if (r->fleet) {
        struct limit_lease le;

        acct_slice_get(ar, ACCT_FLEET, ACCT_KEY, (uint32_t)i, &r->fu);
        /* the fleet's spent as of the last renewal, and what this host spent since */
        if (r->budget && fleet_age_ms(shm) >= 0 && lr && limit_leased(lr, (uint32_t)i) &&
            limit_lease_get(lr, (uint32_t)i, &le) == 0) {
            int64_t sp = le.fleet_spent + (le.used_nano > 0 ? le.used_nano : 0);

            r->budget_known = 1;
            r->fleet_spent = sp > 0 ? (uint64_t)sp : 0;
            r->fleet_remaining = r->fleet_spent < r->budget ? r->budget - r->fleet_spent : 0;
        }
    }
}

static const char *budget_period_str(enum conf_budget_period p)
{
    return p == BUDGET_DAY ? "day" : p == BUDGET_TOTAL ? "total" : "month";
}

/* "used/limit" of a window or of the requests in flight; "-" for no limit. */
static void used_format(uint64_t used, uint32_t limit, char *out, size_t size)
{
    if (limit)
        snprintf(out, size, "%llu/%u", (unsigned long long)used, limit);
    else
        snprintf(out, size, "-");
}

struct key_cells {
    char rpm[32], tpm[48], parallel[32];
    char budget[32], spent[32], reserved[32], remaining[32], cost[32];
    char fspent[32], fremaining[32], fcost[32];
    const char *period;
};

static void key_cells_format(const struct conf *conf, int i, const struct key_row *r,
                             struct key_cells *c)
{
    used_format(r->li.requests, r->li.spec.rpm, c->rpm, sizeof(c->rpm));
    used_format(r->li.tokens, r->li.spec.tpm, c->tpm, sizeof(c->tpm));
    /* In flight is counted with or without a limit: show it either way. */
    if (r->li.spec.max_parallel)
        snprintf(c->parallel, sizeof(c->parallel), "%u/%u", r->li.parallel,
                 r->li.spec.max_parallel);
    else
        snprintf(c->parallel, sizeof(c->parallel), "%u/-", r->li.parallel);
    if (r->busy) {
        snprintf(c->rpm, sizeof(c->rpm), "busy");
        snprintf(c->tpm, sizeof(c->tpm), "busy");
        snprintf(c->parallel, sizeof(c->parallel), "busy");
    }
    if (r->budget) {
        usd_format(r->budget, c->budget, sizeof(c->budget));
        usd_format(r->spent, c->spent, sizeof(c->spent));
        usd_format(r->reserved, c->reserved, sizeof(c->reserved));
        usd_format(r->remaining, c->remaining, sizeof(c->remaining));
        if (r->busy) {
            snprintf(c->spent, sizeof(c->spent), "busy");
            snprintf(c->reserved, sizeof(c->reserved), "busy");
            snprintf(c->remaining, sizeof(c->remaining), "busy");
        }
        c->period = budget_period_str(conf->keys[i].budget_period);
    } else {
        snprintf(c->budget, sizeof(c->budget), "-");
        snprintf(c->spent, sizeof(c->spent), "-");
        snprintf(c->reserved, sizeof(c->reserved), "-");
        snprintf(c->remaining, sizeof(c->remaining), "-");
        c->period = "-";
    }
    usd_format(r->u.cost_nano, c->cost, sizeof(c->cost));
    snprintf(c->fspent, sizeof(c->fspent), "-");
    snprintf(c->fremaining, sizeof(c->fremaining), "-");
    if (r->budget_known) {
        usd_format(r->fleet_spent, c->fspent, sizeof(c->fspent));
        usd_format(r->fleet_remaining, c->fremaining, sizeof(c->fremaining));
    }
    usd_format(r->fu.cost_nano, c->fcost, sizeof(c->fcost));
}

static void show_keys(struct abuf *b, const struct conf *conf, const struct shm *shm)
{
    int n = conf->n_keys;
    uint64_t now_ms = time_mono_ms();
    int64_t wall_s = (int64_t)(time_real_ms() / 1000);
    struct key_row *rows = calloc(n ? (size_t)n : 1, sizeof(*rows));
    struct key_cells *cells = calloc(n ? (size_t)n : 1, sizeof(*cells));

    if (!rows || !cells) {
        b->failed = 1;
        goto out;
    }
    int wname = 4, wmodels = 6, wexp = 7, wrpm = 3, wtpm = 3, wpar = 8, wbud = 10, wper = 6;
    int wspent = 9, wres = 12, wrem = 13, wcost = 8, busy = 0;
    int wfspent = 15, wfrem = 19, wfcost = 14, fleet = conf->cluster.enabled && shm_acct(shm);
    for (int i = 0; i < n; i++) {
        struct key_row *r = &rows[i];
        struct key_cells *c = &cells[i];
        key_row_read(conf, shm, i, now_ms, wall_s, r);
        busy += r->busy;
        key_cells_format(conf, i, r, c);
        if (r->expired)
            snprintf(r->expires + strlen(r->expires), sizeof(r->expires) - strlen(r->expires),
                     " (expired)");
        wname = width(wname, r->name);
        wmodels = width(wmodels, r->models);
        wexp = width(wexp, r->expires);
        wrpm = width(wrpm, c->rpm);
        wtpm = width(wtpm, c->tpm);
        wpar = width(wpar, c->parallel);
        wbud = width(wbud, c->budget);
        wper = width(wper, c->period);
        wspent = width(wspent, c->spent);
        wres = width(wres, c->reserved);
        wrem = width(wrem, c->remaining);
        wcost = width(wcost, c->cost);
        wfspent = width(wfspent, c->fspent);
        wfrem = width(wfrem, c->fremaining);
        wfcost = width(wfcost, c->fcost);
    }
    abuf_printf(b, "%-*s  %*s  %*s  %*s  %*s  %-*s  %*s  %*s  %*s  %10s  %12s  %*s  %-*s  %s\n",
                wname, "NAME", wrpm, "RPM", wtpm, "TPM", wpar, "PARALLEL", wbud, "BUDGET_USD", wper,
                "PERIOD", wspent, "SPENT_USD", wres, "RESERVED_USD", wrem, "REMAINING_USD",
                "REQUESTS", "TOKENS", wcost, "COST_USD", wexp, "EXPIRES", "MODELS");
    for (int i = 0; i < n; i++) {
        const struct key_row *r = &rows[i];
        const struct key_cells *c = &cells[i];
        abuf_printf(b,
                    "%-*s  %*s  %*s  %*s  %*s  %-*s  %*s  %*s  %*s  %10llu  %12llu  %*s  %-*s  "
                    "%s\n",
                    wname, r->name, wrpm, c->rpm, wtpm, c->tpm, wpar, c->parallel, wbud, c->budget,
                    wper, c->period, wspent, c->spent, wres, c->reserved, wrem, c->remaining,
                    (unsigned long long)r->u.requests,
                    (unsigned long long)add_sat(r->u.prompt, r->u.completion), wcost, c->cost, wexp,
                    r->expires, r->models);
    }
    if (busy)
        abuf_printf(b,
                    "busy: %d key(s) not read, their limiter was locked for over %u ms (a worker "
                    "stopped while holding it?)\n",
                    busy, LIMIT_MASTER_WAIT_MS);
    if (fleet) { /* the fleet's figures apart, under their own heading: the ones above are
                  * this host's */
        int64_t age = fleet_age_ms(shm);

        if (age < 0)
            abuf_printf(b, "\nfleet (all hosts; the columns above are this host's): not read "
                           "from Redis yet\n");
        else
            abuf_printf(b,
                        "\nfleet (all hosts; the columns above are this host's), read from Redis "
                        "%lld ms ago\n",
                        (long long)age);
        abuf_printf(b, "%-*s  %*s  %*s  %14s  %14s  %*s\n", wname, "NAME", wfspent,
                    "FLEET_SPENT_USD", wfrem, "FLEET_REMAINING_USD", "FLEET_REQUESTS",
                    "FLEET_TOKENS", wfcost, "FLEET_COST_USD");
        for (int i = 0; i < n; i++) {
            const struct key_row *r = &rows[i];
            const struct key_cells *c = &cells[i];
            abuf_printf(b, "%-*s  %*s  %*s  %14llu  %14llu  %*s\n", wname, r->name, wfspent,
                        c->fspent, wfrem, c->fremaining, (unsigned long long)r->fu.requests,
                        (unsigned long long)add_sat(r->fu.prompt, r->fu.completion), wfcost,
                        c->fcost);
        }
    }
out:
    free(rows);
    free(cells);
}

/* What is used of a limit as JSON: the number, or null when it could not be read. */
static void json_used(struct abuf *b, const char *name, uint64_t v, int busy)
{
    if (busy)
        abuf_printf(b, ",\"%s\":null", name);
    else
        abuf_printf(b, ",\"%s\":%llu", name, (unsigned long long)v);
}

/* A limit as JSON: the number, or null for none. */
static void json_limit(struct abuf *b, const char *name, uint32_t v)
{
    if (v)
        abuf_printf(b, ",\"%s\":%u", name, v);
    else
        abuf_printf(b, ",\"%s\":null", name);
}

/* A key's usage in show keys --json: requests, tokens and cost (this host's or the fleet's). */
static void keys_usage_json(struct abuf *b, const struct acct_usage *u)
{
    char usd[32];

    usd_format(u->cost_nano, usd, sizeof(usd));
    abuf_printf(b,
                ",\"requests\":%llu,\"prompt_tokens\":%llu,\"completion_tokens\":%llu,"
                "\"tokens\":%llu,\"cost_usd\":%s",
                (unsigned long long)u->requests, (unsigned long long)u->prompt,
                (unsigned long long)u->completion,
                (unsigned long long)add_sat(u->prompt, u->completion), usd);
}

static void show_keys_json(struct abuf *b, const struct conf *conf, const struct shm *shm)
{
    uint64_t now_ms = time_mono_ms();
    int64_t wall_s = (int64_t)(time_real_ms() / 1000);

    abuf_printf(b, "[");
    for (int i = 0; i < conf->n_keys; i++) {
        const struct conf_apikey *k = &conf->keys[i];
        struct key_row r;
        char usd[32];

        key_row_read(conf, shm, i, now_ms, wall_s, &r);
        abuf_printf(b, "%s\n  {\"name\":", i ? "," : "");
        abuf_json_str(b, r.name);
        abuf_printf(b, ",\"models\":");
        if (k->models.n) {
            abuf_printf(b, "[");
            for (int m = 0; m < k->models.n; m++) {
                abuf_printf(b, "%s", m ? "," : "");
                abuf_json_str(b, k->models.items[m]);
            }
            abuf_printf(b, "]");
        } else {
            abuf_printf(b, "null");
        }
        if (k->expires)
            abuf_printf(b, ",\"expires\":\"%s\",\"expired\":%s", r.expires,
                        r.expired ? "true" : "false");
        else
            abuf_printf(b, ",\"expires\":null,\"expired\":false");
        /* busy: the limiter's figures are unknown (null), see show_keys */
        abuf_printf(b, ",\"busy\":%s", r.busy ? "true" : "false");
        json_limit(b, "rpm", r.li.spec.rpm);
        json_used(b, "rpm_used", r.li.requests, r.busy);
        json_limit(b, "tpm", r.li.spec.tpm);
        json_used(b, "tpm_used", r.li.tokens, r.busy);
        json_limit(b, "max_parallel", r.li.spec.max_parallel);
        json_used(b, "in_flight", r.li.parallel, r.busy);
        if (r.budget && r.busy) {
            usd_format(r.budget, usd, sizeof(usd));
            abuf_printf(b, ",\"budget_usd\":%s,\"budget_period\":\"%s\",\"period_start\":null", usd,
                        budget_period_str(k->budget_period));
            abuf_printf(b, ",\"spent_usd\":null,\"reserved_usd\":null,\"remaining_usd\":null");
        } else if (r.budget) {
            usd_format(r.budget, usd, sizeof(usd));
            abuf_printf(b, ",\"budget_usd\":%s,\"budget_period\":\"%s\"", usd,
                        budget_period_str(k->budget_period));
            utc_format(r.li.budget.period_start, usd, sizeof(usd));
            if (r.li.budget.period_start)
                abuf_printf(b, ",\"period_start\":\"%s\"", usd);
            else
                abuf_printf(b, ",\"period_start\":null");
            usd_format(r.spent, usd, sizeof(usd));
            abuf_printf(b, ",\"spent_usd\":%s", usd);
            usd_format(r.reserved, usd, sizeof(usd));
            abuf_printf(b, ",\"reserved_usd\":%s", usd);
            usd_format(r.remaining, usd, sizeof(usd));
            abuf_printf(b, ",\"remaining_usd\":%s", usd);
        } else {
            abuf_printf(b, ",\"budget_usd\":null,\"budget_period\":null,\"period_start\":null,"
                           "\"spent_usd\":null,\"reserved_usd\":null,\"remaining_usd\":null");
        }
        keys_usage_json(b, &r.u);
        /* the fleet's figures apart: the ones above are this host's */
        if (r.fleet) {
            int64_t age = fleet_age_ms(shm);

            abuf_printf(b, ",\"fleet\":{\"age_ms\":");
            if (age < 0)
                abuf_printf(b, "null");
            else
                abuf_printf(b, "%lld", (long long)age);
            if (r.budget_known) {
                usd_format(r.fleet_spent, usd, sizeof(usd));
                abuf_printf(b, ",\"spent_usd\":%s", usd);
                usd_format(r.fleet_remaining, usd, sizeof(usd));
                abuf_printf(b, ",\"remaining_usd\":%s", usd);
            } else {
                abuf_printf(b, ",\"spent_usd\":null,\"remaining_usd\":null");
            }
            keys_usage_json(b, &r.fu);
            abuf_printf(b, "}}");
        } else {
            abuf_printf(b, ",\"fleet\":null}");
        }
    }
    abuf_printf(b, "%s]\n", conf->n_keys ? "\n" : "");
}

/* The entries `show usage --by KIND` lists. */
static int usage_count(const struct conf *conf, enum acct_kind k)
{
    return k == ACCT_KEY ? conf->n_keys : k == ACCT_MODEL ? conf->n_models : conf->n_backends;
}

static const char *usage_name(const struct conf *conf, enum acct_kind k, int i)
{
    return k == ACCT_KEY     ? conf->keys[i].name
           : k == ACCT_MODEL ? conf->models[i].name
                             : conf->backends[i].name;
}

/* The totals of entry i (zero when the segment has no usage region or no such entry): this
 * host's, or (fleet) the fleet's as the sync process last read them from Redis. */
static void usage_read(const struct shm *shm, enum acct_kind k, int i, struct acct_usage *u,
                       int fleet)
{
    struct acct_region *ar = shm_acct(shm);

    memset(u, 0, sizeof(*u));
    if (ar && (uint32_t)i < acct_count(ar, k)) {
        if (fleet)
            acct_slice_get(ar, ACCT_FLEET, k, (uint32_t)i, u);
        else
            acct_get(ar, k, (uint32_t)i, u);
    }
}

/* How long ago the sync process last read the fleet's totals (ms), or -1: never. */
static int64_t fleet_age_ms(const struct shm *shm)
{
    struct acct_region *ar = shm_acct(shm);
    uint64_t at = ar ? atomic_load_explicit(&acct_sync(ar)->fleet_ms, memory_order_acquire) : 0;
    uint64_t now = time_real_ms();

    return !at ? -1 : now > at ? (int64_t)(now - at) : 0;
}

static void usage_sum(struct acct_usage *t, const struct acct_usage *u)
{
    uint64_t *tw = (uint64_t *)t;
    const uint64_t *uw = (const uint64_t *)u;
    for (size_t w = 0; w < ACCT_WORDS; w++)
        tw[w] = add_sat(tw[w], uw[w]);
}

/* What buying at these prices saved against the list prices (never below 0). */
static uint64_t usage_saved(const struct acct_usage *u)
{
    return u->list_cost_nano > u->cost_nano ? u->list_cost_nano - u->cost_nano : 0;
}

struct usage_cells {
    char cost[32], list[32], saved[32];
};

static void usage_cells_format(const struct acct_usage *u, struct usage_cells *c)
{
    usd_format(u->cost_nano, c->cost, sizeof(c->cost));
    usd_format(u->list_cost_nano, c->list, sizeof(c->list));
    usd_format(usage_saved(u), c->saved, sizeof(c->saved));
}

static void show_usage(struct abuf *b, const struct conf *conf, const struct shm *shm,
                       enum acct_kind k, int fleet)
{
    static const char *const heads[] = {
        [ACCT_KEY] = "KEY", [ACCT_MODEL] = "MODEL", [ACCT_BACKEND] = "BACKEND"};
    int n = usage_count(conf, k);
    struct acct_usage *rows = calloc((size_t)n + 1, sizeof(*rows));
    struct usage_cells *cells = calloc((size_t)n + 1, sizeof(*cells));

    if (!rows || !cells) {
        b->failed = 1;
        goto out;
    }
    /* Row n is the total. */
    int wname = width(5, heads[k]), wcost = 8, wlist = 8, wsaved = 9;
    for (int i = 0; i <= n; i++) {
        if (i < n) {
            usage_read(shm, k, i, &rows[i], fleet);
            usage_sum(&rows[n], &rows[i]);
            wname = width(wname, usage_name(conf, k, i));
        }
    }
    for (int i = 0; i <= n; i++) {
        usage_cells_format(&rows[i], &cells[i]);
        wcost = width(wcost, cells[i].cost);
        wlist = width(wlist, cells[i].list);
        wsaved = width(wsaved, cells[i].saved);
    }
    if (fleet) {
        int64_t age = fleet_age_ms(shm);

        if (age < 0)
            abuf_printf(b, "fleet totals (all hosts): not read from Redis yet\n");
        else
            abuf_printf(b, "fleet totals (all hosts), read from Redis %lld ms ago\n",
                        (long long)age);
    }
    abuf_printf(b, "%-*s  %10s  %12s  %12s  %12s  %12s  %8s  %*s  %*s  %*s\n", wname, heads[k],
                "REQUESTS", "PROMPT", "COMPLETION", "CACHED", "REASONING", "PARTIAL", wcost,
                "COST_USD", wlist, "LIST_USD", wsaved, "SAVED_USD");
    for (int i = 0; i <= n; i++) {
        const struct acct_usage *u = &rows[i];
        const struct usage_cells *c = &cells[i];
        abuf_printf(b, "%-*s  %10llu  %12llu  %12llu  %12llu  %12llu  %8llu  %*s  %*s  %*s\n",
                    wname, i < n ? usage_name(conf, k, i) : "TOTAL",
                    (unsigned long long)u->requests, (unsigned long long)u->prompt,
                    (unsigned long long)u->completion, (unsigned long long)u->cached,
                    (unsigned long long)u->reasoning, (unsigned long long)u->partial, wcost,
                    c->cost, wlist, c->list, wsaved, c->saved);
    }
out:
    free(rows);
    free(cells);
}

static void usage_json(struct abuf *b, const struct acct_usage *u)
{
    char usd[32];

    abuf_printf(b,
                "\"requests\":%llu,\"prompt_tokens\":%llu,\"completion_tokens\":%llu,"
                "\"cached_tokens\":%llu,\"reasoning_tokens\":%llu,\"partial\":%llu",
                (unsigned long long)u->requests, (unsigned long long)u->prompt,
                (unsigned long long)u->completion, (unsigned long long)u->cached,
                (unsigned long long)u->reasoning, (unsigned long long)u->partial);
    usd_format(u->cost_nano, usd, sizeof(usd));
    abuf_printf(b, ",\"cost_usd\":%s", usd);
    usd_format(u->list_cost_nano, usd, sizeof(usd));
    abuf_printf(b, ",\"list_cost_usd\":%s", usd);
    usd_format(usage_saved(u), usd, sizeof(usd));
    abuf_printf(b, ",\"saved_usd\":%s", usd);
}

static void show_usage_json(struct abuf *b, const struct conf *conf, const struct shm *shm,
                            enum acct_kind k, int fleet)
{
    int n = usage_count(conf, k);
    struct acct_usage total = {0};

    abuf_printf(b, "{\"by\":\"%s\",", acct_kind_str(k));
    if (fleet) {
        int64_t age = fleet_age_ms(shm);

        if (age < 0)
            abuf_printf(b, "\"scope\":\"fleet\",\"age_ms\":null,");
        else
            abuf_printf(b, "\"scope\":\"fleet\",\"age_ms\":%lld,", (long long)age);
    }
    abuf_printf(b, "\"entries\":[");
    for (int i = 0; i < n; i++) {
        struct acct_usage u;
        usage_read(shm, k, i, &u, fleet);
        usage_sum(&total, &u);
        abuf_printf(b, "%s\n  {\"name\":", i ? "," : "");
        abuf_json_str(b, usage_name(conf, k, i));
        if (k == ACCT_BACKEND) {
            int p = conf->backends[i].pool;
            abuf_printf(b, ",\"pool\":");
            abuf_json_str(b, p >= 0 && p < conf->n_pools ? conf->pools[p].name : "?");
        }
        abuf_printf(b, ",");
        usage_json(b, &u);
        abuf_printf(b, "}");
    }
    abuf_printf(b, "%s],\n \"total\":{", n ? "\n" : "");
    usage_json(b, &total);
    abuf_printf(b, "}}\n");
}

/* "show usage [--by key|model|backend] [--fleet] [json]" from word 2 on: 0 and *kind / *fleet /
 * *json, or -EINVAL. */
static int usage_args(char w[][WORD_MAX], int from, int n, enum acct_kind *kind, int *fleet,
                      int *json)
{
    int by_set = 0;

    *kind = ACCT_KEY;
    *json = 0;
    *fleet = 0;
    for (int i = from; i < n; i++) {
        if (is_json(w[i]) && !*json) {
            *json = 1;
        } else if (!strcmp(w[i], "--fleet") && !*fleet) {
            *fleet = 1;
        } else if (!strcmp(w[i], "--by") && i + 1 < n && !by_set) {
            i++;
            if (!strcmp(w[i], "key"))
                *kind = ACCT_KEY;
            else if (!strcmp(w[i], "model"))
                *kind = ACCT_MODEL;
            else if (!strcmp(w[i], "backend"))
                *kind = ACCT_BACKEND;
            else
                return -EINVAL;
            by_set = 1;
        } else {
            return -EINVAL;
        }
    }
    return 0;
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

static void no_such(struct abuf *b, const char *what, const char *arg);

/* "breaker reset|open BACKEND": the master asks, the health checker (the only writer of
 * breaker state) carries it out on its next evaluation. */
static int breaker_command(struct abuf *b, const struct conf *conf, struct shm *shm,
                           const char *verb, const char *arg, int json,
                           struct admin_pending *pending)
{
    enum breaker_cmd cmd = !strcmp(verb, "reset") ? BREAKER_CMD_RESET : BREAKER_CMD_OPEN;
    int i = backend_lookup(conf, shm, arg);
    if (i < 0) {
        no_such(b, "backend", arg);
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
        /* a bad value, not a bad command: refused (exit 1), not a usage error */
        abuf_printf(b, "error: bad state; usage: set backend BACKEND ready|drain|maint\n");
        return -ERANGE;
    }
    if (i < 0) {
        no_such(b, "backend", arg);
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

/* ---- show info, show pools, set weight, check, stop ---- */

void admin_rate_push(struct admin_rate *r, uint64_t total)
{
    r->total[r->pos] = total;
    r->pos = (r->pos + 1) % (ADMIN_RATE_SECS + 1);
    if (r->n < ADMIN_RATE_SECS + 1)
        r->n++;
}

uint64_t admin_rate_x10(const struct admin_rate *r, unsigned *secs)
{
    unsigned newest = (r->pos + ADMIN_RATE_SECS) % (ADMIN_RATE_SECS + 1);
    unsigned oldest = (r->pos + ADMIN_RATE_SECS + 1 - r->n) % (ADMIN_RATE_SECS + 1);
    uint64_t d;

    *secs = r->n >= 2 ? r->n - 1 : 0;
    if (!*secs || r->total[newest] < r->total[oldest])
        return 0;
    d = r->total[newest] - r->total[oldest];
    return (d * 10 + *secs / 2) / *secs;
}

static void show_info(struct abuf *b, const struct admin_info *in, int json)
{
    uint64_t up_s = in->now_ms > in->started_ms ? (in->now_ms - in->started_ms) / 1000 : 0;
    char started[32], uptime[24];

    utc_format((int64_t)(in->started_ms / 1000), started, sizeof(started));
    secs_format(up_s, uptime, sizeof(uptime));
    if (json) {
        abuf_printf(b, "{\"version\":");
        abuf_json_str(b, in->version ? in->version : "unknown");
        abuf_printf(b,
                    ",\"pid\":%d,\"started\":\"%s\",\"uptime_s\":%llu,\"generation\":%u,"
                    "\"workers\":%d,\"draining_generations\":%d,\"connections\":%llu,"
                    "\"requests\":%llu,\"requests_per_s\":%llu.%llu,\"rate_window_s\":%u,"
                    "\"access_log_dropped\":%llu,\"config\":",
                    in->pid, started, (unsigned long long)up_s, in->generation, in->workers,
                    in->draining, (unsigned long long)in->conns, (unsigned long long)in->requests,
                    (unsigned long long)(in->rate_x10 / 10),
                    (unsigned long long)(in->rate_x10 % 10), in->rate_secs,
                    (unsigned long long)in->alog_drops);
        abuf_json_str(b, in->config ? in->config : "");
        abuf_printf(b, "}\n");
        return;
    }
    abuf_printf(b, "version:             %s\n", in->version ? in->version : "unknown");
    abuf_printf(b, "pid:                 %d\n", in->pid);
    abuf_printf(b, "uptime:              %s (started %s)\n", uptime, started);
    abuf_printf(b, "generation:          %u%s\n", in->generation,
                in->draining ? " (older ones draining)" : "");
    abuf_printf(b, "workers:             %d\n", in->workers);
    abuf_printf(b, "connections:         %llu\n", (unsigned long long)in->conns);
    abuf_printf(b, "requests:            %llu\n", (unsigned long long)in->requests);
    abuf_printf(b, "requests/s:          %llu.%llu (last %u s)\n",
                (unsigned long long)(in->rate_x10 / 10), (unsigned long long)(in->rate_x10 % 10),
                in->rate_secs);
    abuf_printf(b, "access log dropped:  %llu\n", (unsigned long long)in->alog_drops);
    abuf_printf(b, "config:              %s\n", in->config ? in->config : "");
}

/* Everything one `show pools` row shows. */
struct pool_row {
    int up, total;     /* usable backends (health not DOWN, operator READY) of all */
    int64_t active;    /* requests in flight to its backends */
    uint64_t requests; /* sent to its backends */
    uint64_t failures;
    struct limit_info li;
    char models[256], paths[256];
};

static void list_cell(const struct conf_list *l, char *out, size_t size)
{
    struct abuf m = {0};

    if (l->n == 0)
        abuf_printf(&m, "-");
    for (int i = 0; i < l->n; i++)
        abuf_printf(&m, "%s%s", i ? "," : "", l->items[i]);
    snprintf(out, size, "%s", m.p && !m.failed ? m.p : "?");
    free(m.p);
}

static void pool_row_read(const struct conf *conf, const struct shm *shm, int p, uint64_t now_ms,
                          int64_t wall_s, struct pool_row *r)
{
    const struct conf_pool *cp = &conf->pools[p];
    struct limit_region *lr = shm_limits(shm);
    uint32_t id = (uint32_t)(conf->n_keys + conf->n_models + p);

    memset(r, 0, sizeof(*r));
    for (int i = cp->first_backend; i < cp->first_backend + cp->n_backends; i++) {
        struct shm_backend_view v;
        struct shm_backend_totals t;
        if (i < 0 || (uint32_t)i >= shm_n_backends(shm) || i >= conf->n_backends)
            continue;
        shm_backend_view(shm, (uint32_t)i, &v);
        shm_backend_totals(shm, (uint32_t)i, &t);
        r->total++;
        r->up += v.h->state != BACKEND_DOWN && v.admin == BACKEND_READY;
        r->active += t.active;
        r->requests += t.requests;
        r->failures += t.failures;
    }
    r->li.spec = (struct limit_spec){.rpm = cp->lim.rpm,
                                     .tpm = cp->lim.tpm,
                                     .max_parallel = cp->lim.max_parallel,
                                     .period = LIMIT_PERIOD_MONTH};
    if (lr && id < limit_region_count(lr))
        limit_info(lr, id, now_ms, wall_s, &r->li);
    list_cell(&cp->models, r->models, sizeof(r->models));
    list_cell(&cp->paths, r->paths, sizeof(r->paths));
}

static void show_pools(struct abuf *b, const struct conf *conf, const struct shm *shm, int json)
{
    uint64_t now_ms = time_mono_ms();
    int64_t wall_s = (int64_t)(time_real_ms() / 1000);
    struct pool_row *rows = calloc(conf->n_pools ? (size_t)conf->n_pools : 1, sizeof(*rows));
    int wname = 4, walgo = 4, wmodels = 6;

    if (!rows) {
        b->failed = 1;
        return;
    }
    for (int p = 0; p < conf->n_pools; p++) {
        pool_row_read(conf, shm, p, now_ms, wall_s, &rows[p]);
        wname = width(wname, conf->pools[p].name);
        walgo = width(walgo, balancer_algo_name(conf->pools[p].balance));
        wmodels = width(wmodels, rows[p].models);
    }
    if (json)
        abuf_printf(b, "[");
    else
        abuf_printf(b, "%-*s  %-*s  %7s  %6s  %10s  %10s  %12s  %16s  %9s  %-*s  %s\n", wname,
                    "POOL", walgo, "ALGO", "UP", "ACTIVE", "REQUESTS", "FAILURES", "RPM", "TPM",
                    "PARALLEL", wmodels, "MODELS", "PATHS");
    for (int p = 0; p < conf->n_pools; p++) {
        const struct conf_pool *cp = &conf->pools[p];
        const struct pool_row *r = &rows[p];
        if (json) {
            abuf_printf(b, "%s\n  {\"name\":", p ? "," : "");
            abuf_json_str(b, cp->name);
            abuf_printf(b,
                        ",\"algo\":\"%s\",\"backends_up\":%d,\"backends\":%d,\"active\":%lld,"
                        "\"requests\":%llu,\"failures\":%llu,\"models\":[",
                        balancer_algo_name(cp->balance), r->up, r->total, (long long)r->active,
                        (unsigned long long)r->requests, (unsigned long long)r->failures);
            for (int m = 0; m < cp->models.n; m++) {
                abuf_printf(b, "%s", m ? "," : "");
                abuf_json_str(b, cp->models.items[m]);
            }
            abuf_printf(b, "],\"paths\":[");
            for (int m = 0; m < cp->paths.n; m++) {
                abuf_printf(b, "%s", m ? "," : "");
                abuf_json_str(b, cp->paths.items[m]);
            }
            abuf_printf(b, "]");
            json_limit(b, "rpm", r->li.spec.rpm);
            abuf_printf(b, ",\"rpm_used\":%u", r->li.requests);
            json_limit(b, "tpm", r->li.spec.tpm);
            abuf_printf(b, ",\"tpm_used\":%llu", (unsigned long long)r->li.tokens);
            json_limit(b, "max_parallel", r->li.spec.max_parallel);
            abuf_printf(b, ",\"in_flight\":%u}", r->li.parallel);
        } else {
            char up[24], rpm[32], tpm[48], par[32];
            snprintf(up, sizeof(up), "%d/%d", r->up, r->total);
            used_format(r->li.requests, r->li.spec.rpm, rpm, sizeof(rpm));
            used_format(r->li.tokens, r->li.spec.tpm, tpm, sizeof(tpm));
            used_format(r->li.parallel, r->li.spec.max_parallel, par, sizeof(par));
            abuf_printf(b, "%-*s  %-*s  %7s  %6lld  %10llu  %10llu  %12s  %16s  %9s  %-*s  %s\n",
                        wname, cp->name, walgo, balancer_algo_name(cp->balance), up,
                        (long long)r->active, (unsigned long long)r->requests,
                        (unsigned long long)r->failures, rpm, tpm, par, wmodels, r->models,
                        r->paths);
        }
    }
    if (json)
        abuf_printf(b, "%s]\n", conf->n_pools ? "\n" : "");
    free(rows);
}

/* Pool index of NAME, or -1. */
static int pool_lookup(const struct conf *conf, const char *name)
{
    for (int p = 0; p < conf->n_pools; p++)
        if (!strcmp(conf->pools[p].name, name))
            return p;
    return -1;
}

/* Prints "error: no WHAT called 'ARG'" with ARG made printable. */
static void no_such(struct abuf *b, const char *what, const char *arg)
{
    char echo[WORD_MAX];
    size_t k = 0;

    for (const char *p = arg; *p && k < sizeof(echo) - 1; p++)
        echo[k++] = (*p >= 0x20 && *p < 0x7f) ? *p : '?';
    echo[k] = '\0';
    abuf_printf(b, "error: no %s called '%s'\n", what, echo);
}

static const char *backend_pool_name(const struct conf *conf, int i)
{
    int p = conf->backends[i].pool;
    return p >= 0 && p < conf->n_pools ? conf->pools[p].name : "?";
}

/* "N" (0..256) or "N%" of the configured weight: 0 and *w, or -ERANGE. */
static int weight_parse(const char *s, int cfg, uint32_t *w)
{
    char *end;
    unsigned long v;

    if (*s < '0' || *s > '9')
        return -ERANGE;
    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || v > 100000)
        return -ERANGE;
    if (*end == '%' && end[1] == '\0')
        v = (v * (unsigned long)(cfg > 0 ? cfg : 0) + 50) / 100;
    else if (*end)
        return -ERANGE;
    if (v > 256)
        return -ERANGE;
    *w = (uint32_t)v;
    return 0;
}

/* "set weight BACKEND N|N%": the operator's weight, which the health checker turns into the
 * effective weight (DEGRADED, slow start) and a reload keeps. */
static int set_weight_command(struct abuf *b, const struct conf *conf, struct shm *shm,
                              const char *arg, const char *val, int json)
{
    int i = backend_lookup(conf, shm, arg);
    uint32_t w, was;

    if (i < 0) {
        no_such(b, "backend", arg);
        return -ENOENT;
    }
    if (weight_parse(val, conf->backends[i].weight, &w) < 0) {
        abuf_printf(b,
                    "error: bad weight: set weight BACKEND N|N%% takes N from 0 to 256, or a "
                    "percentage of the configured weight (%d) that stays within 256\n",
                    conf->backends[i].weight);
        return -ERANGE;
    }
    was = shm_backend_set_weight_cfg(shm, (uint32_t)i, w);
    if (was != w)
        log_info("backend %s/%s weight set to %u by the operator (was %u, configured %d)",
                 backend_pool_name(conf, i), conf->backends[i].name, w, was,
                 conf->backends[i].weight);
    if (json) {
        abuf_printf(b, "{\"ok\":true,\"pool\":");
        abuf_json_str(b, backend_pool_name(conf, i));
        abuf_printf(b, ",\"name\":");
        abuf_json_str(b, conf->backends[i].name);
        abuf_printf(b, ",\"weight\":%u,\"was\":%u,\"configured\":%d}\n", w, was,
                    conf->backends[i].weight);
    } else {
        abuf_printf(b, "ok: %s/%s weight %u (was %u, configured %d)\n", backend_pool_name(conf, i),
                    conf->backends[i].name, w, was, conf->backends[i].weight);
    }
    return 0;
}

#define CHECK_WAIT_EXTRA_MS 1000  /* beyond check_timeout: the checker's evaluation tick, slack */
#define CHECK_WAIT_MAX_MS   25000 /* aigwctl gives up after 30 s */

/* "check BACKEND": the health checker (which runs the checks) is asked through shm; the master
 * answers once it wrote the result (admin_check_answer). */
static int check_command(struct abuf *b, const struct conf *conf, struct shm *shm, const char *arg,
                         int json, struct admin_pending *pending)
{
    int i = backend_lookup(conf, shm, arg);
    const struct conf_pool *cp;

    if (i < 0) {
        no_such(b, "backend", arg);
        return -ENOENT;
    }
    cp = &conf->pools[conf->backends[i].pool];
    if (!cp->check) {
        abuf_printf(b, "error: pool %s has no active checks (check = off): nothing to run\n",
                    cp->name);
        return -ENOENT;
    }
    abuf_printf(b, "checking %s/%s\n", cp->name, conf->backends[i].name);
    if (pending) {
        uint64_t wait = cp->check_timeout_ms + CHECK_WAIT_EXTRA_MS;
        pending->backend = i;
        pending->kind = ADMIN_WAIT_CHECK;
        pending->json = json;
        pending->wait_ms = wait < CHECK_WAIT_MAX_MS ? wait : CHECK_WAIT_MAX_MS;
        pending->seq = shm_backend_check_cmd(shm, (uint32_t)i);
    }
    return 0;
}

int admin_check_answer(const struct conf *conf, const struct shm *shm,
                       const struct admin_pending *p, char **out, size_t *out_len)
{
    struct abuf b = {0};
    struct shm_check_answer a;
    int rc = 0;
    const char *pool, *name;
    char status[32], ms[32];

    *out = NULL;
    *out_len = 0;
    if (p->backend < 0 || p->backend >= conf->n_backends)
        return -EINVAL;
    pool = backend_pool_name(conf, p->backend);
    name = conf->backends[p->backend].name;
    if (!shm_backend_check_result(shm, (uint32_t)p->backend, p->seq, &a)) {
        abuf_printf(&b, "error: %s/%s: the health checker did not run the check within %llu ms\n",
                    pool, name, (unsigned long long)p->wait_ms);
        rc = -ETIMEDOUT;
    } else if (a.ok == SHM_CHECK_NOT_RUN) {
        abuf_printf(&b, "error: %s/%s: check not run: %s\n", pool, name, a.detail);
        rc = -EIO;
    } else {
        check_format(1, a.status, status, sizeof(status));
        snprintf(ms, sizeof(ms), "%u.%u", a.dur_us / 1000, a.dur_us % 1000 / 100);
        if (p->json) {
            abuf_printf(&b, "{\"pool\":");
            abuf_json_str(&b, pool);
            abuf_printf(&b, ",\"name\":");
            abuf_json_str(&b, name);
            abuf_printf(&b,
                        ",\"result\":\"%s\",\"status\":", a.ok == SHM_CHECK_PASS ? "pass" : "fail");
            if (a.status >= 0)
                abuf_printf(&b, "%d,\"error\":null", a.status);
            else
                abuf_printf(&b, "null,\"error\":\"%s\"", status);
            abuf_printf(&b, ",\"latency_ms\":%s,\"detail\":", ms);
            abuf_json_str(&b, a.detail);
            abuf_printf(&b, "}\n");
        } else {
            abuf_printf(&b, "%s/%s: %s: %s in %s ms (%s)\n", pool, name,
                        a.ok == SHM_CHECK_PASS ? "pass" : "fail", status, ms, a.detail);
        }
    }
    if (b.failed || !b.p) {
        free(b.p);
        return -ENOMEM;
    }
    *out = b.p;
    *out_len = b.len;
    return rc;
}

int admin_pending_done(const struct shm *shm, const struct admin_pending *p)
{
    if (p->backend < 0 || (uint32_t)p->backend >= shm_n_backends(shm))
        return 1;
    struct shm_backend_view v;
    struct shm_check_answer a;

    if (p->kind == ADMIN_WAIT_CHECK)
        return shm_backend_check_result(shm, (uint32_t)p->backend, p->seq, &a);

    /* The checker marks the command done as it takes it and publishes the breaker just
     * after: the state is checked too, so the answer never beats the change. */
    shm_backend_view(shm, (uint32_t)p->backend, &v);
    return (int32_t)(v.breaker_cmd_done - p->seq) >= 0 &&
           v.h->breaker == (enum breaker_state)p->want;
}

/* The usage line of a known command given the wrong words, or NULL when the first words name
 * no command. */
static const char *usage_of(char w[][WORD_MAX], int set)
{
    static const struct {
        const char *w0, *w1, *usage;
    } u[] = {
        {"show", "info", "show info [json]"},
        {"show", "proc", "show proc [json]"},
        {"show", "pools", "show pools [json]"},
        {"show", "backends", "show backends [POOL] [json]"},
        {"show", "keys", "show keys [json]"},
        {"show", "cluster", "show cluster [json]"},
        {"show", "usage", "show usage [--by key|model|backend] [--fleet] [json]"},
        {"set", "weight", "set weight BACKEND N|N%"},
        {"set", "backend", "set backend BACKEND ready|drain|maint"},
        {"set", NULL, "set weight BACKEND N|N% | set backend BACKEND ready|drain|maint"},
        {"breaker", NULL, "breaker reset|open BACKEND"},
        {"check", NULL, "check BACKEND [json]"},
        {"stop", NULL, "stop"},
        {"help", NULL, "help"},
        {"reload", NULL, "reload [json]"},
        {"upgrade", NULL, "upgrade [json]"},
    };

    for (size_t i = 0; i < sizeof(u) / sizeof(u[0]); i++)
        if (set >= 1 && !strcmp(w[0], u[i].w0) &&
            (!u[i].w1 || (set >= 2 && !strcmp(w[1], u[i].w1))))
            return u[i].usage;
    return NULL;
}

int admin_exec(const char *line, const struct conf *conf, struct shm *shm,
               const struct admin_proc *procs, int n_procs, const struct admin_info *info,
               struct admin_pending *pending, char **out, size_t *out_len)
{
    struct abuf b = {0};
    char w[WORDS_MAX][WORD_MAX];
    int rc = 0, set, ujson, ufleet;
    enum acct_kind kind;
    int n = split_words(line, w, &set);
    int json = n >= 2 && n <= WORDS_MAX && is_json(w[n - 1]); /* the last word asks for JSON */
    int m = json ? n - 1 : n;                                 /* the words before it */

    if (pending)
        *pending = (struct admin_pending){.backend = -1};
    if (n == 1 && !strcmp(w[0], "help")) {
        abuf_printf(&b, "%s", admin_help);
    } else if (m == 2 && !strcmp(w[0], "show") && !strcmp(w[1], "info") && info) {
        show_info(&b, info, json);
    } else if (m == 2 && !strcmp(w[0], "show") && !strcmp(w[1], "proc")) {
        if (json)
            show_proc_json(&b, procs, n_procs);
        else
            show_proc(&b, procs, n_procs);
    } else if (m == 2 && !strcmp(w[0], "show") && !strcmp(w[1], "pools")) {
        show_pools(&b, conf, shm, json);
    } else if ((m == 2 || m == 3) && !strcmp(w[0], "show") && !strcmp(w[1], "backends")) {
        int pool = m == 3 ? pool_lookup(conf, w[2]) : -1;
        if (m == 3 && pool < 0) {
            no_such(&b, "pool", w[2]);
            rc = -ENOENT;
        } else if (json) {
            show_backends_json(&b, conf, shm, pool);
        } else {
            show_backends(&b, conf, shm, pool);
        }
    } else if (m == 2 && !strcmp(w[0], "show") && !strcmp(w[1], "keys")) {
        if (json)
            show_keys_json(&b, conf, shm);
        else
            show_keys(&b, conf, shm);
    } else if (m == 2 && !strcmp(w[0], "show") && !strcmp(w[1], "cluster")) {
        show_cluster(&b, conf, shm, json);
    } else if (n >= 2 && n <= WORDS_MAX && !strcmp(w[0], "show") && !strcmp(w[1], "usage") &&
               !usage_args(w, 2, n, &kind, &ufleet, &ujson)) {
        if (ufleet && !conf->cluster.enabled) {
            abuf_printf(&b, "error: no fleet totals: this host has no [cluster] section (show "
                            "usage without --fleet shows its own)\n");
            rc = -ENOENT;
        } else if (ujson) {
            show_usage_json(&b, conf, shm, kind, ufleet);
        } else {
            show_usage(&b, conf, shm, kind, ufleet);
        }
    } else if (m == 3 && !strcmp(w[0], "breaker") &&
               (!strcmp(w[1], "reset") || !strcmp(w[1], "open"))) {
        rc = breaker_command(&b, conf, shm, w[1], w[2], json, pending);
    } else if (m == 4 && !strcmp(w[0], "set") && !strcmp(w[1], "backend")) {
        rc = set_backend_command(&b, conf, shm, w[2], w[3], json);
    } else if (m == 4 && !strcmp(w[0], "set") && !strcmp(w[1], "weight")) {
        rc = set_weight_command(&b, conf, shm, w[2], w[3], json);
    } else if (m == 2 && !strcmp(w[0], "check")) {
        rc = check_command(&b, conf, shm, w[1], json, pending);
    } else if ((n == 1 || (n == 2 && json)) && !strcmp(w[0], "stop")) {
        if (json)
            abuf_printf(&b, "{\"ok\":true,\"stopping\":\"graceful\"}\n");
        else
            abuf_printf(&b, "ok: stopping gracefully (in-flight requests finish)\n");
        if (pending)
            pending->stop = 1;
    } else {
        /* Echo at most a short, printable prefix of what was sent, without the json word
         * aigwctl --json appends (the operator did not type it there). */
        char echo[64];
        size_t k = 0;
        const char *usage = usage_of(w, set);
        for (const char *p = line; *p && *p != '\n' && *p != '\r' && k < sizeof(echo) - 1; p++)
            echo[k++] = (*p >= 0x20 && *p < 0x7f) ? *p : '?';
        echo[k] = '\0';
        if (json && k < sizeof(echo) - 1) {
            char *last = strrchr(echo, ' ');
            if (last && is_json(last + 1))
                *last = '\0';
        }
        if (usage)
            abuf_printf(&b, ADMIN_ERR_USAGE " %s\n", usage);
        else
            abuf_printf(&b, ADMIN_ERR_UNKNOWN " '%s'; try 'help'\n", echo);
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

/* The line is the word `word`, alone or followed by json / --json (*json says which). */
static int admin_is_word(const char *line, const char *word, int *json)
{
    char w[WORDS_MAX][WORD_MAX];
    int set, n = split_words(line, w, &set);

    *json = 0;
    if (n < 1 || n > 2 || set != n || strcmp(w[0], word))
        return 0;
    if (n == 2 && !is_json(w[1]))
        return 0;
    *json = n == 2;
    return 1;
}

int admin_is_reload(const char *line, int *json)
{
    return admin_is_word(line, "reload", json);
}

int admin_is_upgrade(const char *line, int *json)
{
    return admin_is_word(line, "upgrade", json);
}
