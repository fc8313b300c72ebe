/* /metrics and /status.json from shm: backend state and counters summed over the workers, the
 * limiters' and usage totals of keys, models and backends, the master's processes. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/metrics.h"
#include "core/util.h"

void mbuf_printf(struct mbuf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (b->failed)
        return;
    for (;;) {
        size_t room = b->cap - b->len;

        va_start(ap, fmt);
        n = vsnprintf(b->p ? b->p + b->len : NULL, room, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->failed = 1;
            return;
        }
        if ((size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap * 2 : 8192;
        while (cap - b->len <= (size_t)n)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->failed = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
}

void mbuf_free(struct mbuf *b)
{
    free(b->p);
    memset(b, 0, sizeof(*b));
}

/* Section names are [A-Za-z0-9_.-] and model names add / : @, so nothing needs escaping in a
 * label value or a JSON string today; this keeps both well-formed should that change. */
static const char *esc(const char *s, char *buf, size_t size)
{
    size_t o = 0;

    for (; *s && o + 3 < size; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') {
            buf[o++] = '\\';
            buf[o++] = (char)ch;
        } else if (ch >= 0x20 && ch < 0x7f) {
            buf[o++] = (char)ch;
        } else {
            buf[o++] = '_';
        }
    }
    buf[o] = '\0';
    return buf;
}

#define E(s, buf) esc((s), (buf), sizeof(buf))

static void help(struct mbuf *b, const char *name, const char *type, const char *text)
{
    mbuf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, text, name, type);
}

/* A nano-USD amount in dollars, exactly. */
static void usd(struct mbuf *b, uint64_t nano)
{
    mbuf_printf(b, "%llu.%09llu", (unsigned long long)(nano / 1000000000ull),
                (unsigned long long)(nano % 1000000000ull));
}

/* enum limit_dim - 1. fleet: cluster_fallback = closed refused it while Redis is away; fleet_wait:
 * this host's share of the fleet's budget was being topped up */
static const char *const limit_names[LIMIT_DIMS] = {"rpm",    "tpm",   "max_parallel",
                                                    "budget", "fleet", "fleet_wait"};
static const char *const scope_names[3] = {"key", "model", "pool"};
static const char *const tok_kinds[4] = {"prompt", "completion", "cached", "reasoning"};

static uint64_t tok_of(const struct acct_usage *u, int k)
{
    return k == 0 ? u->prompt : k == 1 ? u->completion : k == 2 ? u->cached : u->reasoning;
}

/* One backend's labels: pool="P",backend="B". */
static const char *be_labels(const struct conf *conf, int b, char *buf, size_t size)
{
    char e1[2 * CONF_NAME_MAX + 8], e2[2 * CONF_NAME_MAX + 8];

    snprintf(buf, size, "pool=\"%s\",backend=\"%s\"",
             E(conf->pools[conf->backends[b].pool].name, e1), E(conf->backends[b].name, e2));
    return buf;
}

static void histogram(struct mbuf *b, const char *name, const char *lab, const uint64_t *bkt,
                      uint64_t sum_us)
{
    uint64_t cum = 0;

    for (int i = 0; i < SHM_HIST_BUCKETS; i++) {
        cum += bkt[i];
        if (i < SHM_HIST_BUCKETS - 1) {
            uint64_t us = shm_hist_bounds_us[i];
            mbuf_printf(b, "%s_bucket{%s,le=\"%llu.%06llu\"} %llu\n", name, lab,
                        (unsigned long long)(us / 1000000), (unsigned long long)(us % 1000000),
                        (unsigned long long)cum);
        } else {
            mbuf_printf(b, "%s_bucket{%s,le=\"+Inf\"} %llu\n", name, lab, (unsigned long long)cum);
        }
    }
    mbuf_printf(b, "%s_sum{%s} %llu.%06llu\n%s_count{%s} %llu\n", name, lab,
                (unsigned long long)(sum_us / 1000000), (unsigned long long)(sum_us % 1000000),
                name, lab, (unsigned long long)cum);
}

/* Per-backend gauges and counters, one metric family after another. */
static void prom_backends(const struct metrics_ctx *m, struct mbuf *b, uint64_t now_ns)
{
    const struct conf *conf = m->conf;
    int nb = conf->n_backends;
    char lab[4 * CONF_NAME_MAX + 64];
    struct shm_backend_stats *st = calloc((size_t)(nb ? nb : 1), sizeof(*st));
    struct shm_backend_totals *tot = calloc((size_t)(nb ? nb : 1), sizeof(*tot));
    static const char *const classes[5] = {"1xx", "2xx", "3xx", "4xx", "5xx"};

    if (!st || !tot) {
        b->failed = 1;
        goto out;
    }
    for (int i = 0; i < nb; i++) {
        shm_backend_stats(m->shm, (uint32_t)i, &st[i]);
        shm_backend_totals(m->shm, (uint32_t)i, &tot[i]);
    }

    help(b, "aigw_requests_total", "counter",
         "Responses of backends by status class (each try counts, retried ones too).");
    for (int i = 0; i < nb; i++)
        for (int k = 0; k < 5; k++)
            mbuf_printf(b, "aigw_requests_total{%s,code_class=\"%s\"} %llu\n",
                        be_labels(conf, i, lab, sizeof(lab)), classes[k],
                        (unsigned long long)st[i].status[k]);
    help(b, "aigw_backend_attempts_total", "counter", "Requests sent to a backend (tries).");
    for (int i = 0; i < nb; i++)
        mbuf_printf(b, "aigw_backend_attempts_total{%s} %llu\n",
                    be_labels(conf, i, lab, sizeof(lab)), (unsigned long long)tot[i].requests);
    help(b, "aigw_errors_total", "counter",
         "Failed tries of a backend: connect, TLS, timeout, reset, 5xx (as passive health "
         "counts them).");
    for (int i = 0; i < nb; i++)
        mbuf_printf(b, "aigw_errors_total{%s} %llu\n", be_labels(conf, i, lab, sizeof(lab)),
                    (unsigned long long)tot[i].failures);
    help(b, "aigw_retries_total", "counter",
         "Requests sent again to another backend after this one failed.");
    for (int i = 0; i < nb; i++)
        mbuf_printf(b, "aigw_retries_total{%s} %llu\n", be_labels(conf, i, lab, sizeof(lab)),
                    (unsigned long long)tot[i].retries);
    help(b, "aigw_backend_auth_failures_total", "counter",
         "401/403 answers of a backend (its api_key is bad).");
    for (int i = 0; i < nb; i++)
        mbuf_printf(b, "aigw_backend_auth_failures_total{%s} %llu\n",
                    be_labels(conf, i, lab, sizeof(lab)),
                    (unsigned long long)shm_backend_auth_failures(m->shm, (uint32_t)i));
    help(b, "aigw_backend_received_bytes_total", "counter", "Response bytes from a backend.");
    for (int i = 0; i < nb; i++)
        mbuf_printf(b, "aigw_backend_received_bytes_total{%s} %llu\n",
                    be_labels(conf, i, lab, sizeof(lab)), (unsigned long long)tot[i].bytes_in);
    help(b, "aigw_backend_sent_bytes_total", "counter", "Request bytes to a backend.");
    for (int i = 0; i < nb; i++)
        mbuf_printf(b, "aigw_backend_sent_bytes_total{%s} %llu\n",
                    be_labels(conf, i, lab, sizeof(lab)), (unsigned long long)tot[i].bytes_out);

    help(b, "aigw_request_duration_seconds", "histogram",
         "From sending a request to a backend to the end of its response, of the responses "
         "forwarded whole.");
    for (int i = 0; i < nb; i++)
        histogram(b, "aigw_request_duration_seconds", be_labels(conf, i, lab, sizeof(lab)),
                  st[i].lat_bkt, st[i].lat_sum_us);
    help(b, "aigw_time_to_first_token_seconds", "histogram",
         "From sending a request to a backend to the first body bytes forwarded to the client "
         "(a stream's first event, a JSON answer whole).");
    for (int i = 0; i < nb; i++)
        histogram(b, "aigw_time_to_first_token_seconds", be_labels(conf, i, lab, sizeof(lab)),
                  st[i].ttft_bkt, st[i].ttft_sum_us);

    /* state gauges */
    help(b, "aigw_backend_up", "gauge",
         "1 when the health checker has the backend UP or "
         "DEGRADED, 0 when DOWN.");
    for (int i = 0; i < nb; i++) {
        struct shm_backend_view v;
        shm_backend_view(m->shm, (uint32_t)i, &v);
        mbuf_printf(b, "aigw_backend_up{%s} %d\n", be_labels(conf, i, lab, sizeof(lab)),
                    v.h->state != BACKEND_DOWN);
    }
    help(b, "aigw_backend_state", "gauge", "Health state, one series per state (1 = current).");
    for (int i = 0; i < nb; i++) {
        struct shm_backend_view v;
        shm_backend_view(m->shm, (uint32_t)i, &v);
        for (int s = BACKEND_UP; s <= BACKEND_DEGRADED; s++)
            mbuf_printf(b, "aigw_backend_state{%s,state=\"%s\"} %d\n",
                        be_labels(conf, i, lab, sizeof(lab)), shm_state_str((enum backend_state)s),
                        (int)v.h->state == s);
    }
    help(b, "aigw_backend_admin_state", "gauge",
         "Operator state, one series per state (1 = current).");
    for (int i = 0; i < nb; i++) {
        struct shm_backend_view v;
        shm_backend_view(m->shm, (uint32_t)i, &v);
        for (int s = BACKEND_READY; s <= BACKEND_MAINT; s++)
            mbuf_printf(b, "aigw_backend_admin_state{%s,state=\"%s\"} %d\n",
                        be_labels(conf, i, lab, sizeof(lab)), shm_admin_str((enum backend_admin)s),
                        (int)v.admin == s);
    }
    help(b, "aigw_backend_breaker_state", "gauge",
         "Circuit breaker: 0 closed, 1 open, 2 half-open.");
    for (int i = 0; i < nb; i++) {
        struct shm_backend_view v;
        shm_backend_view(m->shm, (uint32_t)i, &v);
        mbuf_printf(b, "aigw_backend_breaker_state{%s} %d\n", be_labels(conf, i, lab, sizeof(lab)),
                    (int)v.h->breaker);
    }
    help(b, "aigw_backend_in_flight", "gauge", "Requests in flight to the backend.");
    for (int i = 0; i < nb; i++)
        mbuf_printf(b, "aigw_backend_in_flight{%s} %lld\n", be_labels(conf, i, lab, sizeof(lab)),
                    (long long)tot[i].active);
    help(b, "aigw_backend_cooling", "gauge", "1 while the backend cools down after a 429, else 0.");
    for (int i = 0; i < nb; i++)
        mbuf_printf(b, "aigw_backend_cooling{%s} %d\n", be_labels(conf, i, lab, sizeof(lab)),
                    shm_backend_cool_until(m->shm, (uint32_t)i) > now_ns);
    help(b, "aigw_backend_weight", "gauge", "Effective weight the balancer uses.");
    for (int i = 0; i < nb; i++) {
        struct shm_backend_view v;
        shm_backend_view(m->shm, (uint32_t)i, &v);
        mbuf_printf(b, "aigw_backend_weight{%s} %u\n", be_labels(conf, i, lab, sizeof(lab)),
                    v.h->weight_eff);
    }
    help(b, "aigw_backend_weight_configured", "gauge", "Configured (or operator-set) weight.");
    for (int i = 0; i < nb; i++) {
        struct shm_backend_view v;
        shm_backend_view(m->shm, (uint32_t)i, &v);
        mbuf_printf(b, "aigw_backend_weight_configured{%s} %u\n",
                    be_labels(conf, i, lab, sizeof(lab)), v.weight_cfg);
    }
    help(b, "aigw_backend_latency_ewma_seconds", "gauge",
         "Peak-EWMA of the backend's response-head latency (0 = no sample yet).");
    for (int i = 0; i < nb; i++) {
        uint64_t e = shm_backend_ewma(m->shm, (uint32_t)i, now_ns) / 1000;
        mbuf_printf(b, "aigw_backend_latency_ewma_seconds{%s} %llu.%06llu\n",
                    be_labels(conf, i, lab, sizeof(lab)), (unsigned long long)(e / 1000000),
                    (unsigned long long)(e % 1000000));
    }
out:
    free(st);
    free(tot);
}

/* Usage totals of one kind: requests, tokens by kind, cost. */
static void prom_usage(const struct metrics_ctx *m, struct mbuf *b, enum acct_kind k)
{
    const struct conf *conf = m->conf;
    struct acct_region *ar = shm_acct(m->shm);
    const char *what = k == ACCT_KEY ? "key" : k == ACCT_MODEL ? "model" : "backend";
    int n = k == ACCT_KEY ? conf->n_keys : k == ACCT_MODEL ? conf->n_models : conf->n_backends;
    char name[64], text[160], lab[4 * CONF_NAME_MAX + 64], e[2 * CONF_NAME_MAX + 8];
    struct acct_usage *u;

    if (!ar || !n)
        return;
    u = calloc((size_t)n, sizeof(*u));
    if (!u) {
        b->failed = 1;
        return;
    }
    for (int i = 0; i < n; i++)
        acct_get(ar, k, (uint32_t)i, &u[i]);
#define LAB(i)                                                                                     \
    (k == ACCT_KEY ? (snprintf(lab, sizeof(lab), "key=\"%s\"", E(conf->keys[i].name, e)), lab)     \
     : k == ACCT_MODEL                                                                             \
         ? (snprintf(lab, sizeof(lab), "model=\"%s\"", E(conf->models[i].name, e)), lab)           \
         : be_labels(conf, i, lab, sizeof(lab)))
    snprintf(name, sizeof(name), "aigw_%s_requests_total", what);
    snprintf(text, sizeof(text), "Requests accounted per %s (usage totals).", what);
    help(b, name, "counter", text);
    for (int i = 0; i < n; i++)
        mbuf_printf(b, "%s{%s} %llu\n", name, LAB(i), (unsigned long long)u[i].requests);
    snprintf(name, sizeof(name), "aigw_%s_tokens_total", what);
    snprintf(text, sizeof(text),
             "Tokens per %s by kind (cached is part of prompt, reasoning part of completion).",
             what);
    help(b, name, "counter", text);
    for (int i = 0; i < n; i++)
        for (int t = 0; t < 4; t++)
            mbuf_printf(b, "%s{%s,kind=\"%s\"} %llu\n", name, LAB(i), tok_kinds[t],
                        (unsigned long long)tok_of(&u[i], t));
    snprintf(name, sizeof(name), "aigw_%s_cost_usd_total", what);
    snprintf(text, sizeof(text), "Cost per %s at the [model] prices, USD.", what);
    help(b, name, "counter", text);
    for (int i = 0; i < n; i++) {
        mbuf_printf(b, "%s{%s} ", name, LAB(i));
        usd(b, u[i].cost_nano);
        mbuf_printf(b, "\n");
    }
    snprintf(name, sizeof(name), "aigw_%s_partial_requests_total", what);
    snprintf(text, sizeof(text), "Requests per %s billed from what was delivered (cut streams).",
             what);
    help(b, name, "counter", text);
    for (int i = 0; i < n; i++)
        mbuf_printf(b, "%s{%s} %llu\n", name, LAB(i), (unsigned long long)u[i].partial);
#undef LAB
    free(u);
}

/* Key budgets: spent and limit of the current period. */
static void prom_budgets(const struct metrics_ctx *m, struct mbuf *b)
{
    const struct conf *conf = m->conf;
    struct limit_region *lr = shm_limits(m->shm);
    char e[2 * CONF_NAME_MAX + 8];
    int any = 0;

    if (!lr)
        return;
    for (int i = 0; i < conf->n_keys; i++)
        any |= conf->keys[i].budget_nusd != 0;
    if (!any)
        return;
    help(b, "aigw_key_budget_usd", "gauge", "Budget of a key for its period, USD.");
    for (int i = 0; i < conf->n_keys; i++) {
        if (!conf->keys[i].budget_nusd)
            continue;
        mbuf_printf(b, "aigw_key_budget_usd{key=\"%s\"} ", E(conf->keys[i].name, e));
        usd(b, conf->keys[i].budget_nusd);
        mbuf_printf(b, "\n");
    }
    help(b, "aigw_key_budget_spent_usd", "gauge", "Spent of a key's budget in this period, USD.");
    for (int i = 0; i < conf->n_keys; i++) {
        struct limit_budget bu;
        if (!conf->keys[i].budget_nusd || limit_budget_get(lr, (uint32_t)i, &bu) < 0)
            continue;
        mbuf_printf(b, "aigw_key_budget_spent_usd{key=\"%s\"} ", E(conf->keys[i].name, e));
        usd(b, bu.spent_nano);
        mbuf_printf(b, "\n");
    }
}

static void prom_process(const struct metrics_ctx *m, struct mbuf *b)
{
    struct shm_proc_totals t;
    int workers = 0;

    shm_proc_totals(m->shm, &t); /* earlier generations' counts included */
    help(b, "aigw_ratelimit_rejections_total", "counter",
         "Requests a limiter refused with 429, by the limiter's scope and the limit hit "
         "(fleet: [cluster] closed fallback; fleet_wait: this host's budget share was being "
         "topped up).");
    for (int s = 0; s < 3; s++)
        for (int d = 0; d < LIMIT_DIMS; d++)
            mbuf_printf(b, "aigw_ratelimit_rejections_total{scope=\"%s\",limit=\"%s\"} %llu\n",
                        scope_names[s], limit_names[d], (unsigned long long)t.limited[s][d]);
    if (m->conf->cluster.enabled) {
        help(b, "aigw_cluster_lease_rejections_total", "counter",
             "Of aigw_ratelimit_rejections_total, those refused by this host's lease of a fleet "
             "limit (the fleet's quota leased out, or a top-up on its way) or by the fallback, "
             "not by this host's own window.");
        for (int s = 0; s < 3; s++)
            for (int d = 0; d < LIMIT_DIMS; d++)
                mbuf_printf(b,
                            "aigw_cluster_lease_rejections_total{scope=\"%s\",limit=\"%s\"} "
                            "%llu\n",
                            scope_names[s], limit_names[d],
                            (unsigned long long)t.lease_limited[s][d]);
    }
    help(b, "aigw_client_requests_total", "counter",
         "Client requests answered (the gateway's own answers too).");
    mbuf_printf(b, "aigw_client_requests_total %llu\n", (unsigned long long)t.requests);
    help(b, "aigw_client_responses_total", "counter",
         "Answers to clients by status class: the backends' relayed and the gateway's own "
         "(401, 429, 503...).");
    for (int k = 0; k < 5; k++)
        mbuf_printf(b, "aigw_client_responses_total{code_class=\"%dxx\"} %llu\n", k + 1,
                    (unsigned long long)t.answered[k]);
    help(b, "aigw_client_connections", "gauge", "Open client connections.");
    mbuf_printf(b, "aigw_client_connections %llu\n", (unsigned long long)t.conns);
    help(b, "aigw_access_log_dropped_total", "counter",
         "Access log lines dropped (buffer full or write failed) rather than block a worker.");
    mbuf_printf(b, "aigw_access_log_dropped_total %llu\n", (unsigned long long)t.alog_drops);

    help(b, "aigw_process_restarts_total", "counter",
         "Times the master restarted a child after it died.");
    for (int i = 0; i < m->n_procs; i++) {
        const struct admin_proc *p = &m->procs[i];
        if (!strcmp(p->role, "master"))
            continue;
        if (p->slot >= 0)
            mbuf_printf(b, "aigw_process_restarts_total{role=\"%s\",slot=\"%d\"} %u\n", p->role,
                        p->slot, p->restarts);
        else
            mbuf_printf(b, "aigw_process_restarts_total{role=\"%s\",slot=\"\"} %u\n", p->role,
                        p->restarts);
    }
    help(b, "aigw_process_up", "gauge", "1 while the child runs, 0 while it is being restarted.");
    for (int i = 0; i < m->n_procs; i++) {
        const struct admin_proc *p = &m->procs[i];
        if (!strcmp(p->role, "master"))
            continue;
        workers += p->slot >= 0 && p->pid > 0;
        if (p->slot >= 0)
            mbuf_printf(b, "aigw_process_up{role=\"%s\",slot=\"%d\"} %d\n", p->role, p->slot,
                        p->pid > 0);
        else
            mbuf_printf(b, "aigw_process_up{role=\"%s\",slot=\"\"} %d\n", p->role, p->pid > 0);
    }
    help(b, "aigw_workers_running", "gauge", "Workers running.");
    mbuf_printf(b, "aigw_workers_running %d\n", workers);
    help(b, "aigw_start_time_seconds", "gauge", "Start of the master, seconds since the epoch.");
    mbuf_printf(b, "aigw_start_time_seconds %llu\n", (unsigned long long)(m->started_ms / 1000));
}

/* [cluster]: whether Redis answers, and which fallback applies (only with [cluster]). */
static void prom_cluster(const struct metrics_ctx *m, struct mbuf *b)
{
    static const char *const modes[] = {"local_share", "open", "closed"};
    struct limit_region *lr = shm_limits(m->shm);
    struct limit_fleet *f;
    uint32_t st;

    if (!m->conf->cluster.enabled || !lr)
        return;
    f = limit_fleet(lr);
    st = atomic_load_explicit(&f->state, memory_order_relaxed);
    help(b, "aigw_cluster_redis_up", "gauge",
         "1 while the sync process is connected to Redis ([cluster]).");
    mbuf_printf(b, "aigw_cluster_redis_up %d\n", st == LIMIT_FLEET_CONNECTED);
    help(b, "aigw_cluster_fallback", "gauge",
         "1 for the cluster_fallback policy applying now (Redis away), 0 otherwise.");
    for (int i = 0; i < 3; i++)
        mbuf_printf(b, "aigw_cluster_fallback{mode=\"%s\"} %d\n", modes[i],
                    st == LIMIT_FLEET_FALLBACK && (int)m->conf->cluster.fallback == i);
    help(b, "aigw_cluster_nodes_alive", "gauge", "Hosts of the fleet seen alive by Redis.");
    mbuf_printf(b, "aigw_cluster_nodes_alive %u\n",
                atomic_load_explicit(&f->nodes_alive, memory_order_relaxed));
    help(b, "aigw_cluster_node_clash", "gauge",
         "1 while another aigw instance heartbeats under this host's node_name (a config error).");
    mbuf_printf(b, "aigw_cluster_node_clash %u\n",
                atomic_load_explicit(&f->node_clash, memory_order_relaxed));
    help(b, "aigw_cluster_renewals_total", "counter", "Leases renewed from Redis.");
    mbuf_printf(b, "aigw_cluster_renewals_total %llu\n",
                (unsigned long long)atomic_load_explicit(&f->renewals, memory_order_relaxed));
    help(b, "aigw_cluster_errors_total", "counter", "Redis calls failed or timed out.");
    mbuf_printf(b, "aigw_cluster_errors_total %llu\n",
                (unsigned long long)atomic_load_explicit(&f->errors, memory_order_relaxed));
}

int metrics_prometheus(const struct metrics_ctx *m, struct mbuf *out)
{
    prom_backends(m, out, time_mono_ns());
    prom_usage(m, out, ACCT_KEY);
    prom_usage(m, out, ACCT_MODEL);
    prom_usage(m, out, ACCT_BACKEND);
    prom_budgets(m, out);
    prom_cluster(m, out);
    prom_process(m, out);
    return out->failed ? -ENOMEM : 0;
}

/* ---- /status.json ---- */

static void json_backend(const struct metrics_ctx *m, struct mbuf *b, int i, uint64_t now_ns)
{
    const struct conf_backend *cb = &m->conf->backends[i];
    struct shm_backend_view v;
    struct shm_backend_totals t;
    struct shm_backend_stats st;
    char e[2 * CONF_NAME_MAX + 8];
    uint64_t ewma_us = shm_backend_ewma(m->shm, (uint32_t)i, now_ns) / 1000;
    uint64_t cool = shm_backend_cool_until(m->shm, (uint32_t)i);

    shm_backend_view(m->shm, (uint32_t)i, &v);
    shm_backend_totals(m->shm, (uint32_t)i, &t);
    shm_backend_stats(m->shm, (uint32_t)i, &st);
    uint64_t n = 0;
    for (int k = 0; k < SHM_HIST_BUCKETS; k++)
        n += st.lat_bkt[k];
    mbuf_printf(
        b,
        "{\"name\":\"%s\",\"state\":\"%s\",\"reason\":\"%s\",\"admin\":\"%s\","
        "\"breaker\":\"%s\",\"weight\":%u,\"weight_cfg\":%u,\"backup\":%s,"
        "\"in_flight\":%lld,\"cooling\":%s,\"ewma_ms\":%llu.%03llu,"
        "\"avg_ms\":%llu,\"check_status\":%d,\"check_ms\":%u,\"requests\":%llu,"
        "\"errors\":%llu,\"retries\":%llu,\"status\":[%llu,%llu,%llu,%llu,%llu]}",
        E(cb->name, e), shm_state_str(v.h->state), shm_reason_str(v.h->reason),
        shm_admin_str(v.admin), shm_breaker_str(v.h->breaker), v.h->weight_eff, v.weight_cfg,
        cb->backup ? "true" : "false", (long long)t.active, cool > now_ns ? "true" : "false",
        (unsigned long long)(ewma_us / 1000), (unsigned long long)(ewma_us % 1000),
        (unsigned long long)(n ? st.lat_sum_us / n / 1000 : 0), (int)v.h->check_status,
        v.h->check_us / 1000, (unsigned long long)t.requests, (unsigned long long)t.failures,
        (unsigned long long)t.retries, (unsigned long long)st.status[0],
        (unsigned long long)st.status[1], (unsigned long long)st.status[2],
        (unsigned long long)st.status[3], (unsigned long long)st.status[4]);
}

static void json_keys(const struct metrics_ctx *m, struct mbuf *b)
{
    const struct conf *conf = m->conf;
    struct limit_region *lr = shm_limits(m->shm);
    struct acct_region *ar = shm_acct(m->shm);
    uint64_t now_ms = time_mono_ms();
    int64_t wall_s = (int64_t)(time_real_ms() / 1000);
    char e[2 * CONF_NAME_MAX + 8];

    mbuf_printf(b, "\"keys\":[");
    for (int i = 0; i < conf->n_keys; i++) {
        const struct conf_apikey *k = &conf->keys[i];
        struct acct_usage u;
        struct limit_info li;

        memset(&u, 0, sizeof(u));
        memset(&li, 0, sizeof(li));
        if (ar)
            acct_get(ar, ACCT_KEY, (uint32_t)i, &u);
        if (lr)
            limit_info(lr, (uint32_t)i, now_ms, wall_s, &li);
        mbuf_printf(b,
                    "%s{\"name\":\"%s\",\"requests\":%llu,\"prompt\":%llu,\"completion\":%llu,"
                    "\"cached\":%llu,\"cost_usd\":",
                    i ? "," : "", E(k->name, e), (unsigned long long)u.requests,
                    (unsigned long long)u.prompt, (unsigned long long)u.completion,
                    (unsigned long long)u.cached);
        usd(b, u.cost_nano);
        mbuf_printf(b,
                    ",\"rpm\":%u,\"rpm_used\":%u,\"tpm\":%u,\"tpm_used\":%llu,"
                    "\"max_parallel\":%u,\"parallel\":%u,\"budget_usd\":",
                    k->lim.rpm, li.requests, k->lim.tpm, (unsigned long long)li.tokens,
                    k->lim.max_parallel, li.parallel);
        usd(b, k->budget_nusd);
        mbuf_printf(b, ",\"budget_spent_usd\":");
        usd(b, li.budget.spent_nano);
        mbuf_printf(b, ",\"budget_period\":\"%s\"}",
                    k->budget_nusd ? limit_period_str(li.budget.period) : "");
    }
    mbuf_printf(b, "]");
}

int metrics_status_json(const struct metrics_ctx *m, struct mbuf *out)
{
    const struct conf *conf = m->conf;
    uint64_t now_ns = time_mono_ns();
    char e[2 * CONF_NAME_MAX + 8];

    mbuf_printf(out, "{\"time_ms\":%llu,\"started_ms\":%llu,\"procs\":[",
                (unsigned long long)time_real_ms(), (unsigned long long)m->started_ms);
    for (int i = 0; i < m->n_procs; i++)
        mbuf_printf(out, "%s{\"role\":\"%s\",\"slot\":%d,\"pid\":%d,\"restarts\":%u}", i ? "," : "",
                    m->procs[i].role, m->procs[i].slot, m->procs[i].pid, m->procs[i].restarts);
    mbuf_printf(out, "],\"pools\":[");
    for (int p = 0; p < conf->n_pools; p++) {
        const struct conf_pool *pl = &conf->pools[p];
        mbuf_printf(out, "%s{\"name\":\"%s\",\"backends\":[", p ? "," : "", E(pl->name, e));
        for (int i = 0; i < pl->n_backends; i++) {
            if (i)
                mbuf_printf(out, ",");
            json_backend(m, out, pl->first_backend + i, now_ns);
        }
        mbuf_printf(out, "]}");
    }
    mbuf_printf(out, "],");
    json_keys(m, out);
    mbuf_printf(out, "}\n");
    return out->failed ? -ENOMEM : 0;
}
