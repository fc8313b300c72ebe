/* Forwarding a request and its tries: pick a backend (balancer/, trial and in-flight slots in
 * shm), send it (core/upstream.c), retries with back-off and budget, stream the answer back
 * (upstream_ops), record what each try counts as in shm, end a failed stream properly. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/answer.h"
#include "core/cool.h"
#include "core/log.h"
#include "core/out.h"
#include "core/proxy.h"
#include "core/retry.h"
#include "core/util.h"
#include "core/worker_priv.h"

#define AUTH_LOG_NS 10000000000ULL /* one "api_key is bad" warning per backend per 10 s */

static void client_try(struct client *c);
static const struct upstream_ops client_ops;

/* ---- the upstream request ---- */

static int op_build_head(void *ctx, const struct conf_backend *be, char *buf, size_t cap)
{
    struct client *c = ctx;
    struct proxy_req r;
    const char *m = llhttp_method_name((llhttp_method_t)client_creq(c)->parser.method);
    r.method = m;
    r.method_len = strlen(m);
    r.path = client_creq(c)->url;
    r.path_len = client_creq(c)->url_len;
    r.hdrs = client_creq(c)->hdrs;
    r.n_hdrs = client_creq(c)->n_hdrs;
    r.client_ip = c->ip;
    r.request_id = client_creq(c)->rid;
    r.request_id_len = client_creq(c)->rid_len;
    r.has_body = client_creq(c)->has_body;
    r.strip_auth = client_creq(c)->key >= 0;
    r.body_len = client_creq(c)->rq.body_len; /* the rewritten body's, when it is */
    return proxy_build_request(buf, cap, &r, be);
}

/* Backend of the current (or last) try. */
static uint32_t client_backend(const struct client *c)
{
    const struct tries *t = client_tries(c);
    return t->tried[t->n - 1];
}

/* x-aigw-backend for a response after tries: NULL when the pool hides it or nothing was tried. */
static const char *client_via(const struct client *c)
{
    if (!c->tries_on || client_tries(c)->n == 0 || !client_pool(c)->expose_headers)
        return NULL;
    return c->w->conf->backends[client_backend(c)].name;
}

static int client_attempts(const struct client *c)
{
    return client_creq(c)->fb_attempts + (c->tries_on ? client_tries(c)->n : 0);
}

/* ---- usage ---- */

/* Whether the answer's usage is read, and whether stream_options.include_usage is added: a
 * POST to an AI endpoint has its usage read; a stream of chat or completions whose client did
 * not ask for usage gets it asked for upstream, and the extra chunk taken out of what the
 * client receives (the client's bytes stay what they would have been). */
static void forward_usage_plan(struct client *c)
{
    struct creq *r = client_creq(c);
    /* the endpoint as the route stage found it (core/route.c) */
    int chat = r->ep == EP_CHAT || r->ep == EP_COMPLETIONS;

    r->urd = NULL;
    r->usage_read =
        r->parser.method == HTTP_POST && r->body_len && route_ep_by_model((enum route_ep)r->ep);
    r->usage_inject = r->usage_read && chat && (r->info.flags & JSON_REQ_STREAM) &&
                      !(r->info.flags & JSON_REQ_INCLUDE_USAGE);
}

/* The model name backend b gets for the request, when it differs from the client's: the model
 * it is served as (alias_of, a fallback), then b's model_map. NULL when the client's goes as
 * it is. */
static const char *forward_backend_model(const struct client *c, uint32_t b, size_t *len)
{
    const struct creq *r = client_creq(c);
    const struct conf_backend *be = &c->w->conf->backends[b];
    const char *name = r->rename_model ? r->model_name : r->info.model;
    size_t n = r->rename_model ? r->model_name_len : r->info.model_len;

    *len = 0;
    if (!(r->info.flags & JSON_REQ_MODEL) || n > JSON_MODEL_MAX)
        return NULL;
    for (int i = 0; i < be->n_model_map; i++) {
        if (strlen(be->model_map[i].from) == n && memcmp(be->model_map[i].from, name, n) == 0) {
            *len = strlen(be->model_map[i].to);
            return be->model_map[i].to;
        }
    }
    *len = n;
    return r->rename_model ? name : NULL;
}

/* The body of the try to backend b: the client's, or its rewrite (renamed model, added
 * include_usage) as pieces. A body that cannot be rewritten goes as it is, without injection. */
static void forward_try_body(struct client *c, uint32_t b)
{
    struct creq *r = client_creq(c);
    size_t ml = 0;
    const char *model = forward_backend_model(c, b, &ml);

    r->rq.body = r->body;
    r->rq.body_len = r->body_len;
    r->rq.body_iov = NULL;
    r->rq.body_n = 0;
    if (!model && !r->usage_inject)
        return;
    int rc = rewrite_body(&r->rw, r->body, r->body_len, &r->info, model, ml, r->usage_inject);
    if (rc < 0 && r->usage_inject) {
        log_warn("request %.*s: the body cannot be rewritten for backend %s", (int)r->rid_len,
                 r->rid, c->w->conf->backends[b].name);
        r->usage_inject = 0;
    }
    if (rc == 1) {
        r->rq.body_iov = r->rw.iov;
        r->rq.body_n = r->rw.n;
        r->rq.body_len = r->rw.len;
    }
}

/* The answer's head came and goes to the client: its usage is read from here on (a 2xx only:
 * errors carry none). The usage-only chunk can be taken out only where the framing is aigw's
 * (its own chunks, or the close). */
static void forward_usage_begin(struct client *c, const struct upstream_resp *ur)
{
    struct creq *r = client_creq(c);

    if (!r->usage_read || r->urd || ur->status < 200 || ur->status > 299)
        return;
    if (!(r->urd = usage_get(&c->w->usage)))
        return; /* out of memory: not read (billed from the reservation) */
    r->usage_sse = (uint8_t)(ur->sse != 0);
    usage_begin(r->urd, ur->sse ? USAGE_SSE : USAGE_JSON,
                r->usage_inject && ur->sse && (ur->rechunk || ur->until_close));
}

/* Body bytes on their way to the client: read, and (filter) rewritten in place. Returns how
 * many of p's bytes go on; *pre / *pre_len: held bytes that go before them (in the scratch). */
static size_t forward_usage_feed(struct client *c, const char *p, size_t n, int complete, char *pre,
                                 size_t *pre_len)
{
    struct creq *r = client_creq(c);

    *pre_len = 0;
    if (!r->urd)
        return n;
    if (!r->usage_sse) {
        usage_json_feed(r->urd, p, n);
        return n;
    }
    /* the bytes are in the upstream connection's buffer, which is ours until the write of
     * them ends: the filter compacts them in place */
    return usage_sse_feed(r->urd, (char *)p, n, complete, pre, pre_len);
}

void forward_usage_end(struct client *c, int partial)
{
    struct creq *r = client_creq(c);
    struct usage u;

    if (!r->urd)
        return;
    usage_end(r->urd, &u);
    usage_put(&c->w->usage, r->urd);
    r->urd = NULL;
    client_on_usage(c, &u, partial);
}

/* ---- start ---- */

/* The pick stage's inputs for a new request (deadline, hash key), then its first try. */
void forward_start(struct client *c)
{
    struct worker *w = c->w;
    const struct conf_pool *pool = client_pool(c);
    struct tries *t = client_tries(c);

    memset(t, 0, sizeof(*t));
    t->trial = -1;
    t->again = -1;
    if (pool->request_timeout_ms)
        t->deadline = uv_now(&w->loop) + pool->request_timeout_ms;
    if (pool->hash_src == HASH_HEADER) {
        const struct proxy_hdr *h = client_hdr(c, pool->hash_name);
        if (h && h->value_len) {
            t->key = balancer_hash(h->value, h->value_len);
            t->has_key = 1;
        }
    } else if (pool->hash_src == HASH_JSON && (client_creq(c)->info.flags & JSON_REQ_KEY)) {
        t->key = client_creq(c)->info.key_hash;
        t->has_key = 1;
    }
    c->tries_on = 1;
    forward_usage_plan(c);
    client_try(c);
}

/* ---- pick ---- */

/* The outcome of the current try, when it holds a trial slot, for the breaker (which judges a
 * half-open backend by its trials alone): ok is a success as shm_wb_record_ok counts one; a
 * failure, a 429 and a 401/403 are failed trials. Once per try. */
static void client_trial_outcome(struct client *c, int ok)
{
    struct tries *t = client_tries(c);
    if (t->trial < 0 || t->trial_done)
        return;
    t->trial_done = 1;
    shm_trial_outcome(c->w->shm, (uint32_t)t->trial, t->trial_epoch, ok);
}

/* The current try is over: give back its trial slot. */
void client_try_end(struct client *c)
{
    struct tries *t = client_tries(c);
    if (t->trial >= 0)
        shm_trial_release(c->w->shm, (uint32_t)c->w->slot, (uint32_t)t->trial);
    t->trial = -1;
}

static int was_tried(const struct tries *t, uint32_t b)
{
    for (unsigned i = 0; i < t->n; i++)
        if (t->tried[i] == b)
            return 1;
    return 0;
}

/* Fills w->cands / w->cand_limit / w->cand_epoch for the client's pool from each backend's shm
 * view at `now`: the health checker's admission (all, trials only, none) with the workers' trips
 * applied and the operator's state (shm_admit), then 429 cool-downs. *cool_min: the earliest end
 * of a cool-down among backends held back only by one (0 = none). */
static uint32_t client_cands(struct client *c, uint64_t now, uint64_t *cool_min)
{
    struct worker *w = c->w;
    const struct conf_pool *pool = client_pool(c);
    const struct tries *t = client_tries(c);

    *cool_min = 0;
    for (int i = 0; i < pool->n_backends; i++) {
        uint32_t b = (uint32_t)(pool->first_backend + i);
        const struct conf_backend *cb = &w->conf->backends[b];
        struct balancer_cand *k = &w->cands[i];
        struct shm_backend_view v;
        uint32_t trials = 0;
        uint64_t cool;
        int32_t active;

        shm_backend_view(w->shm, b, &v);
        shm_backend_load(w->shm, b, &active, &cool);
        enum shm_admit adm = shm_admit(&v, now, &trials);
        int ok = adm != SHM_ADMIT_NONE;
        if (ok && cool > now) {
            ok = 0;
            if (!*cool_min || cool < *cool_min)
                *cool_min = cool;
        }
        k->weight = (int)v.h->weight_eff;
        k->active = active;
        k->eligible = (uint8_t)ok;
        k->tried = (uint8_t)(was_tried(t, b) && (int32_t)b != t->again);
        k->backup = (uint8_t)(cb->backup != 0);
        k->max_conns = cb->max_conns;
        k->ewma_ns = pool->balance == BALANCE_P2C ? shm_backend_ewma(w->shm, b, now) : 0;
        k->id = cb->name_hash;
        w->cand_limit[i] = adm == SHM_ADMIT_TRIAL ? (int32_t)trials : 0;
        w->cand_epoch[i] = v.h->epoch;
    }
    return (uint32_t)pool->n_backends;
}

/* Picks a backend of the client's pool not tried yet for this request, taking a trial slot
 * when it needs one and its in-flight slot (a refused one is skipped for this pick). -1 when
 * none is usable. */
static int client_pick(struct client *c, uint64_t now, uint64_t *cool_min)
{
    struct worker *w = c->w;
    const struct conf_pool *pool = client_pool(c);
    struct tries *t = client_tries(c);
    uint32_t n = client_cands(c, now, cool_min);
    struct balancer_req req = {t->key, t->has_key};

    for (uint32_t round = 0; round <= n; round++) {
        int i = balancer_pick_req(client_balancer(c), w->cands, n, &req);
        if (i < 0)
            return -1;
        uint32_t b = (uint32_t)(pool->first_backend + i);
        int trial = 0;

        if (w->cand_limit[i]) {
            trial = shm_trial_acquire(w->shm, (uint32_t)w->slot, b, w->cand_limit[i]);
            if (!trial) {
                w->cands[i].tried = 1;
                continue;
            }
        }
        /* The in-flight slot, exact across workers against max_conns; upstream_start (called
         * right after) counts the request, and its end gives the slot back. */
        if (!shm_active_acquire(w->shm, (uint32_t)w->slot, b)) {
            if (trial)
                shm_trial_release(w->shm, (uint32_t)w->slot, b);
            w->cands[i].tried = 1;
            continue;
        }
        t->trial = trial ? (int32_t)b : -1;
        t->trial_epoch = w->cand_epoch[i];
        return (int)b;
    }
    return -1;
}

/* Is a backend not tried yet usable for this request right now? */
static int client_has_candidate(struct client *c, uint64_t now)
{
    uint64_t cool;
    struct worker *w = c->w;
    uint32_t n = client_cands(c, now, &cool);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t b = (uint32_t)(client_pool(c)->first_backend + (int)i);
        /* one that admits trials only counts while a trial slot is free */
        if (balancer_usable(&w->cands[i], w->cands[i].backup) &&
            (!w->cand_limit[i] || shm_trials_in_flight(w->shm, b) < w->cand_limit[i]))
            return 1;
    }
    return 0;
}

/* ---- retries ---- */

/* May the request go to another backend after an outcome with cond / status? Nothing is
 * retried once bytes reached the client, beyond `retries`, past the request deadline, without
 * an untried usable backend, or over the pool's retry budget (shared by all workers). */
static int client_can_retry(struct client *c, uint32_t cond, int status, uint64_t now)
{
    struct worker *w = c->w;
    const struct conf_pool *pool = client_pool(c);
    const struct tries *t = client_tries(c);

    if (client_creq(c)->resp_started || t->n > pool->retries || t->n >= MAX_TRIES)
        return 0;
    if (!retry_is_retryable(pool, cond, status))
        return 0;
    if (t->deadline && uv_now(&w->loop) >= t->deadline)
        return 0;
    if (!client_has_candidate(c, now))
        return 0;
    uint64_t reqs, rets;
    shm_budget_window(w->shm, (uint32_t)pool->first_backend, (uint32_t)pool->n_backends, now, &reqs,
                      &rets);
    if (!retry_budget_allow(reqs, rets, pool->retry_budget_pct, pool->retry_budget_min)) {
        log_debug("request %.*s: no retry, the retry budget of pool %s is spent",
                  (int)client_creq(c)->rid_len, client_creq(c)->rid, pool->name);
        return 0;
    }
    return 1;
}

/* A retry will follow the current try, which failed on backend b: count it. */
static void client_retry_commit(struct client *c, uint64_t now)
{
    struct worker *w = c->w;
    uint32_t b = client_backend(c);
    shm_wb_budget_note(w->shm, (uint32_t)w->slot, b, now, 1);
    shm_counter_add(&shm_wb(w->shm, (uint32_t)w->slot, b)->retries, 1);
}

/* Waits out the back-off before the next try: full jitter, capped by the request deadline. */
static void client_retry_wait(struct client *c)
{
    struct worker *w = c->w;
    const struct conf_pool *pool = client_pool(c);
    struct tries *t = client_tries(c);
    struct tq *q = &w->retry_q;
    uint64_t now = uv_now(&w->loop);
    uint64_t d = retry_backoff_ms(pool, t->n, balancer_random(client_balancer(c), UINT64_MAX));

    if (t->deadline && now + d > t->deadline)
        d = t->deadline > now ? t->deadline - now : 0;
    if (d == 0) {
        client_try(c);
        return;
    }
    tq_add_at(q, &c->tn, d);
}

void forward_on_retry_due(struct tq_node *n)
{
    client_try(tq_entry(n, struct client, tn));
}

/* ---- record ---- */

/* A 429: backend b cools down for as long as the answer asks (1 s when it does not say). */
static void client_cool(struct client *c, uint32_t b, const struct upstream_resp *ur, uint64_t now)
{
    struct worker *w = c->w;
    int64_t ms = cool_429_ms(ur->hdrs, ur->n_hdrs, (int64_t)(time_real_ms() / 1000));
    _Atomic uint64_t *cu = &shm_wb(w->shm, (uint32_t)w->slot, b)->cool_until_ns;
    uint64_t until = now + (uint64_t)ms * 1000000ULL;
    if (until > atomic_load_explicit(cu, memory_order_relaxed))
        atomic_store_explicit(cu, until, memory_order_relaxed);
    log_debug("backend %s: 429, cooling for %lld ms", w->conf->backends[b].name, (long long)ms);
}

/* The record stage of the current try: puts what it counts as (rec, from retry_record_head or
 * retry_record_end) in shm, once per try: a success or a failure for passive health, the
 * breaker and the latency average, and the outcome of a trial (any verdict but a success is a
 * failed trial). */
static void client_record(struct client *c, uint32_t rec, uint64_t now)
{
    struct worker *w = c->w;
    struct tries *t = client_tries(c);
    uint32_t b = client_backend(c);

    if (t->recorded || !rec)
        return;
    t->recorded = 1;
    if (rec & RETRY_REC_OK)
        shm_wb_record_ok(w->shm, (uint32_t)w->slot, b, now, t->head_ns);
    if (rec & RETRY_REC_FAIL)
        shm_wb_record_fail(w->shm, (uint32_t)w->slot, b, now);
    client_trial_outcome(c, (rec & RETRY_REC_OK) != 0);
}

/* Records what the response head says about the backend: 429 cools it, 401/403 count against
 * its key, a failure status is a failure; anything else is recorded as a success once the
 * exchange completes (op_on_end). */
static void client_head_outcome(struct client *c, const struct upstream_resp *ur, uint64_t now)
{
    struct worker *w = c->w;
    uint32_t b = client_backend(c);
    uint32_t rec = retry_record_head(client_pool(c), ur->status);

    if (rec & RETRY_REC_COOL)
        client_cool(c, b, ur, now);
    if (rec & RETRY_REC_AUTH) {
        shm_wb_record_auth(w->shm, (uint32_t)w->slot, b);
        if (!w->auth_log_ns[b] || now - w->auth_log_ns[b] >= AUTH_LOG_NS) {
            w->auth_log_ns[b] = now;
            log_warn("backend %s answered %d: its api_key is bad", w->conf->backends[b].name,
                     ur->status);
        }
    }
    client_record(c, rec, now);
}

/* ---- forward ---- */

static void client_gateway_error(struct client *c, enum upstream_err e)
{
    const char *via = client_via(c);
    int n = client_attempts(c);
    switch (e) {
    case UPSTREAM_ETIMEOUT:
        client_error_via(c, 504, "upstream_error", "upstream_timeout", "the upstream timed out", 0,
                         0, via, n);
        break;
    case UPSTREAM_ETLS:
        client_error_via(c, 502, "upstream_error", "upstream_tls_failed",
                         "TLS handshake with the upstream failed", 0, 0, via, n);
        break;
    case UPSTREAM_ECONNECT: {
        /* a host name that does not resolve says so */
        const char *why =
            c->tries_on && n ? upstream_resolve_error(&c->w->up, (int)client_backend(c)) : NULL;
        client_error_via(c, 502, "upstream_error", "upstream_connect_failed",
                         why ? why : "could not connect to the upstream", 0, 0, via, n);
        break;
    }
    case UPSTREAM_ERESET:
    case UPSTREAM_ESTALE:
        client_error_via(c, 502, "upstream_error", "upstream_reset",
                         "the upstream closed the connection", 0, 0, via, n);
        break;
    case UPSTREAM_ELOCAL:
    case UPSTREAM_ENOMEM:
        /* the gateway's own shortage (logged by upstream.c): no backend is to blame */
        client_error_via(c, 503, "server_error", "gateway_overloaded",
                         "the gateway is out of resources; try again later", 0, 1, via, n);
        break;
    default:
        client_error_via(c, 502, "upstream_error", "upstream_bad_response",
                         "invalid response from the upstream", 0, 0, via, n);
        break;
    }
}

/* Every backend of the request's pool failed before a byte reached the client: when its model
 * has a fallback not tried yet, the request starts again as that model, through its pool
 * (attempts go on counting). 1 when it did. */
static int client_fallback(struct client *c)
{
    struct creq *r = client_creq(c);
    const struct conf *conf = c->w->conf;
    struct route_model m;
    int from = r->model;

    if (r->fb_used || from < 0 || !conf->models[from].fallback[0])
        return 0;
    const char *fb = conf->models[from].fallback;
    if (r->key >= 0 && !route_key_allows(&conf->keys[r->key], fb, strlen(fb)))
        return 0; /* not a model this key may use */
    if (route_model(conf, fb, strlen(fb), &m) < 0)
        return 0;
    if (stages_admit_fallback(c, m.model, m.served, m.pool >= 0 ? m.pool : r->pool) < 0) {
        log_info("request %.*s: every backend of pool %s failed for model %s; fallback %s is "
                 "over its limits",
                 (int)r->rid_len, r->rid, conf->pools[r->pool].name, conf->models[from].name, fb);
        return 0;
    }
    log_info("request %.*s: every backend of pool %s failed for model %s; falling back to %s",
             (int)r->rid_len, r->rid, conf->pools[r->pool].name, conf->models[from].name, fb);
    client_try_end(c);
    r->fb_used = 1;
    r->fb_attempts = (uint8_t)client_attempts(c);
    r->model = m.model;
    r->served = m.served;
    r->model_name = m.name;
    r->model_name_len = (uint32_t)m.len;
    r->rename_model = 1;
    if (m.pool >= 0)
        r->pool = m.pool;
    forward_start(c);
    return 1;
}

/* No (further) try is possible: the client gets what the last one came to. */
static void client_fail(struct client *c)
{
    struct tries *t = client_tries(c);
    if (t->deadline && uv_now(&c->w->loop) >= t->deadline) {
        client_error_via(c, 504, "upstream_error", "request_timeout",
                         "the request timed out (request_timeout)", 0, 0, client_via(c),
                         client_attempts(c));
        return;
    }
    if (client_fallback(c))
        return;
    if (t->last_err == UPSTREAM_OK && t->last_status) {
        /* an answer was consumed for a retry that then found no backend */
        client_error_via(c, 502, "upstream_error", "upstream_error_status",
                         "the upstream failed and no other backend could take the request", 0, 0,
                         client_via(c), client_attempts(c));
        return;
    }
    client_gateway_error(c, (enum upstream_err)t->last_err);
}

/* The current try failed before any response byte reached the client. */
static void client_try_failed(struct client *c, enum upstream_err err)
{
    struct worker *w = c->w;
    const struct conf_pool *pool = client_pool(c);
    struct tries *t = client_tries(c);
    uint32_t b = client_backend(c);
    uint64_t now = time_mono_ns();
    uint32_t cond = retry_cond(err, 0);

    client_record(c, retry_record_end(pool, err, 0), now);
    client_try_end(c);
    t->last_err = err;
    t->last_status = 0;
    /* a stale pooled connection says nothing against its backend: it may be picked again */
    t->again = err == UPSTREAM_ESTALE ? (int32_t)b : -1;
    if (client_can_retry(c, cond, 0, now)) {
        log_info("request %.*s: backend %s: %s; sending it again (attempt %u)%s",
                 (int)client_creq(c)->rid_len, client_creq(c)->rid, w->conf->backends[b].name,
                 upstream_strerror(err), t->n + 1,
                 cond & COND_NOT_SENT ? "" : ", the backend may have received it");
        client_retry_commit(c, now);
        if (err == UPSTREAM_ESTALE)
            client_try(c); /* no back-off: nothing failed but an idle connection */
        else
            client_retry_wait(c);
        return;
    }
    client_fail(c);
}

/* Sends the request to the next backend, or answers when there is none. */
static void client_try(struct client *c)
{
    struct worker *w = c->w;
    const struct conf_pool *pool = client_pool(c);
    struct tries *t = client_tries(c);
    uint64_t now = time_mono_ns(), lnow = uv_now(&w->loop), cool_min;

    if (t->deadline && lnow >= t->deadline) {
        client_fail(c);
        return;
    }
    int b = client_pick(c, now, &cool_min);
    if (b < 0) {
        if (client_fallback(c))
            return;
        if (cool_min) {
            uint64_t left = cool_min > now ? cool_min - now : 0;
            int secs = (int)((left + 999999999ULL) / 1000000000ULL);
            client_error_via(c, 429, "requests", "rate_limit_exceeded",
                             "every backend is rate limited: retry after the given time", 0,
                             secs < 1 ? 1 : secs, client_via(c), client_attempts(c));
        } else if (t->n) {
            client_fail(c);
        } else {
            client_error(c, 503, "upstream_error", "no_backend_available",
                         "no backend is available", 0, 1);
        }
        return;
    }
    t->tried[t->n++] = (uint32_t)b;
    if (client_creq(c)->rq.written) /* an earlier try's request reached its upstream */
        client_creq(c)->upstream_saw = 1;
    client_creq(c)->rq.written = 0;
    /* the backend whose pooled connection was stale gets a new one */
    client_creq(c)->rq.no_reuse = b == t->again;
    t->again = -1;
    if (t->n == 1) /* the pool-wide retry budget counts client requests once, retries apart */
        shm_wb_budget_note(w->shm, (uint32_t)w->slot, (uint32_t)b, now, 0);
    t->discard = t->recorded = t->trial_done = t->framed = t->sse = t->sent = 0;
    t->sse_nl = 2;
    t->try_ns = now;
    client_creq(c)->rq.ops = &client_ops;
    client_creq(c)->rq.ctx = c;
    forward_try_body(c, (uint32_t)b);
    /* a body read for usage must come bare (not in the upstream's chunk framing) */
    client_creq(c)->rq.bare = client_creq(c)->usage_read;
    client_creq(c)->rq.head_only = client_creq(c)->head_method;
    client_creq(c)->rq.dechunk = client_creq(c)->http10;
    client_creq(c)->rq.backend = b;
    client_creq(c)->rq.connect_timeout_ms = pool->connect_timeout_ms;
    client_creq(c)->rq.head_timeout_ms =
        pool->try_timeout_ms ? pool->try_timeout_ms : pool->first_byte_timeout_ms;
    if (t->deadline) {
        uint64_t left = t->deadline - lnow;
        if (client_creq(c)->rq.connect_timeout_ms > left)
            client_creq(c)->rq.connect_timeout_ms = left;
        if (client_creq(c)->rq.head_timeout_ms > left)
            client_creq(c)->rq.head_timeout_ms = left;
    }
    int r = upstream_start(&w->up, &client_creq(c)->rq);
    if (r < 0)
        client_try_failed(c, (enum upstream_err) - r);
}

/* ---- respond ---- */

/* Body bytes of the current try go to the client: the first ones are its time to first token
 * (for a stream, the first event; for a whole JSON answer, the answer). */
static void client_first_byte(struct client *c)
{
    struct tries *t = client_tries(c);

    if (t->sent)
        return;
    t->sent = 1;
    shm_wb_observe(c->w->shm, (uint32_t)c->w->slot, client_backend(c), 1,
                   time_mono_ns() - t->try_ns);
}

static int op_on_head(void *ctx, const struct upstream_resp *ur, const char *body, size_t n,
                      int complete)
{
    struct client *c = ctx;
    struct worker *w = c->w;
    struct tries *t = client_tries(c);
    struct proxy_resp r;
    uint64_t now = time_mono_ns();
    uint32_t cond = retry_cond(UPSTREAM_OK, ur->status);

    t->head_ns = now - t->try_ns;
    shm_wb_note_status(w->shm, (uint32_t)w->slot, client_backend(c), ur->status);
    client_head_outcome(c, ur, now);
    if (ur->status >= 400 && client_can_retry(c, cond, ur->status, now)) {
        /* consumed, not forwarded: the next backend answers instead */
        log_info("request %.*s: backend %s answered %d; sending it again (attempt %u)",
                 (int)client_creq(c)->rid_len, client_creq(c)->rid,
                 w->conf->backends[client_backend(c)].name, ur->status, t->n + 1);
        t->discard = 1;
        t->last_err = UPSTREAM_OK;
        t->last_status = ur->status;
        client_retry_commit(c, now);
        return 0;
    }

    /* a body delimited by the close goes out in chunks framed here (rechunk): the connection
     * to the client may stay open */
    client_creq(c)->resp_close = !client_creq(c)->keepalive || (ur->until_close && !ur->rechunk) ||
                                 w->draining || c->close_after;
    r.status = ur->status;
    r.reason = ur->reason;
    r.reason_len = ur->reason_len;
    r.hdrs = ur->hdrs;
    r.n_hdrs = ur->n_hdrs;
    r.keep_chunked = ur->chunked;
    r.chunk_self = ur->rechunk && !ur->chunked;
    r.close = client_creq(c)->resp_close;
    r.http10_keepalive = client_creq(c)->http10 && !client_creq(c)->resp_close;
    r.request_id = client_creq(c)->rid;
    r.request_id_len = client_creq(c)->rid_len;
    r.backend = client_via(c);
    r.attempts = client_attempts(c);
    /* a JSON answer that came whole with its head: its usage (and cost) is known before the
     * head goes out */
    forward_usage_begin(c, ur);
    struct creq *cr = client_creq(c);
    if (cr->urd && !cr->usage_sse) {
        size_t pl;
        n = forward_usage_feed(c, body, n, complete, NULL, &pl);
        if (complete)
            forward_usage_end(c, 0);
    }
    char extra[CONF_NAME_MAX * 4 + 400];
    struct out x = {extra, 0, sizeof(extra), 0};
    if (r.backend && cr->model_name) {
        OUT_LIT(&x, "x-aigw-model: ");
        out_mem(&x, cr->model_name, cr->model_name_len);
        OUT_LIT(&x, "\r\n");
    }
    if (r.backend && cr->usage_got && cr->metered) {
        struct acct_usage a;
        stages_usage(c, &a);
        OUT_LIT(&x, "x-aigw-cost: ");
        meter_usd(&x, a.cost_nano);
        OUT_LIT(&x, "\r\n");
    }
    meter_ratelimit_headers(&x, &cr->rl_req, &cr->rl_tok);
    r.extra = x.over ? NULL : extra;
    r.extra_len = x.over ? 0 : x.len;
    r.own_ratelimit = cr->rl_req.set || cr->rl_tok.set;
    int hl = proxy_build_response_head(w->scratch, head_cap(w), &r);
    if (hl < 0) {
        /* nothing went out yet: a failure of the backend's (502, and it counts), not a client
         * that left */
        log_warn("backend %s: response head too large to forward",
                 w->conf->backends[client_backend(c)].name);
        if (cr->urd) { /* this answer is not the client's: its reader goes back unread */
            struct usage u;
            usage_end(cr->urd, &u);
            usage_put(&w->usage, cr->urd);
            cr->urd = NULL;
        }
        cr->usage_got = 0;
        return UPSTREAM_HAND_BAD;
    }
    client_creq(c)->resp_started = 1;
    if (client_creq(c)->urd && client_creq(c)->usage_sse) {
        /* nothing is held before the first bytes: pre stays empty */
        size_t pl;
        n = forward_usage_feed(c, body, n, complete, w->scratch + hl, &pl);
    }
    if (n)
        client_first_byte(c);
    if (!ur->rechunk)
        return client_write(c, w->scratch, (size_t)hl, body, n);
    /* each piece goes out as one chunk of ours */
    t->framed = 1;
    t->sse = (uint8_t)ur->sse;
    t->sse_nl = (uint8_t)proxy_sse_newlines(t->sse_nl, body, n);
    if (n)
        hl += (int)proxy_chunk_line(w->scratch + hl, n);
    const char *tail = n ? (complete ? "\r\n0\r\n\r\n" : "\r\n") : (complete ? "0\r\n\r\n" : "");
    return client_write3(c, w->scratch, (size_t)hl, body, n, tail, strlen(tail));
}

static int op_on_body(void *ctx, const char *p, size_t n, int complete)
{
    struct client *c = ctx;
    struct tries *t = client_tries(c);
    if (t->discard)
        return 0;
    /* held bytes that now go on (usage filter) are copied behind room for a chunk line */
    char *pre = c->w->scratch + 20;
    size_t pl = 0;
    if (client_creq(c)->urd)
        n = forward_usage_feed(c, p, n, complete, pre, &pl);
    if (n + pl)
        client_first_byte(c);
    if (!t->framed)
        return client_write(c, pre, pl, p, n);
    if (!n && !pl && !complete)
        return 0; /* all held back or removed: an empty chunk would end the body */
    char *line = pre;
    if (n + pl) {
        char l[20];
        size_t ll = proxy_chunk_line(l, n + pl);
        line -= ll;
        memcpy(line, l, ll);
    }
    const char *tail =
        n + pl ? (complete ? "\r\n0\r\n\r\n" : "\r\n") : (complete ? "0\r\n\r\n" : "");
    t->sse_nl = (uint8_t)proxy_sse_newlines(proxy_sse_newlines(t->sse_nl, pre, pl), p, n);
    return client_write3(c, line, (size_t)(pre + pl - line), p, n, tail, strlen(tail));
}

/* Ends a response whose body went out only in part: an SSE stream framed here gets an
 * `event: error` (message, code) and the last chunk, so it is never a silently truncated 200;
 * any other body is cut off, and a chunked one then lacks its last chunk, which tells the client
 * it is incomplete (as does a short Content-Length). */
static void client_body_cut(struct client *c, const char *message, const char *code)
{
    struct worker *w = c->w;
    struct tries *t = client_tries(c);

    if (!t->framed || !t->sse || c->writing) {
        client_close(c);
        return;
    }
    /* end an event the client got part of, so ours is not glued to it */
    const char *prefix = t->sse_nl >= 2 ? "" : t->sse_nl == 1 ? "\n" : "\n\n";
    client_creq(c)->alog.err = code;
    client_send_last(c, answer_sse_error(w->scratch, head_cap(w), prefix, message, code));
}

/* The upstream failed after the response head went out. */
static void client_stream_failed(struct client *c, enum upstream_err err)
{
    struct worker *w = c->w;
    int stalled = err == UPSTREAM_ETIMEOUT;

    log_info("request %.*s: backend %s %s mid-stream", (int)client_creq(c)->rid_len,
             client_creq(c)->rid, w->conf->backends[client_backend(c)].name,
             stalled ? "stalled" : "failed");
    client_body_cut(c,
                    stalled ? "upstream stream stalled: no data within stream_idle_timeout"
                            : "upstream connection lost mid-stream",
                    stalled ? "upstream_stream_timeout" : "upstream_stream_interrupted");
}

static void op_on_end(void *ctx, enum upstream_err err)
{
    struct client *c = ctx;
    struct tries *t = client_tries(c);
    uint64_t now = time_mono_ns();

    if (t->discard) {
        /* the consumed answer is drained (or broke: the retry was decided anyway) */
        client_try_end(c);
        client_retry_wait(c);
        return;
    }
    if (err == UPSTREAM_OK || (err == UPSTREAM_ECLIENT && client_creq(c)->resp_started)) {
        client_record(c, retry_record_end(client_pool(c), err, 1), now);
        if (err == UPSTREAM_OK)
            shm_wb_observe(c->w->shm, (uint32_t)c->w->slot, client_backend(c), 0, now - t->try_ns);
        client_try_end(c);
        forward_usage_end(c, err != UPSTREAM_OK);
        if (err == UPSTREAM_OK)
            client_request_done(c);
        else
            client_close(c);
        return;
    }
    if (err == UPSTREAM_ECLIENT) {
        client_try_end(c);
        client_close(c);
        return;
    }
    if (client_creq(c)->resp_started) {
        client_record(c, retry_record_end(client_pool(c), err, 1), now);
        client_try_end(c);
        forward_usage_end(c, 1);
        client_stream_failed(c, err);
        return;
    }
    client_try_failed(c, err);
}

static const struct upstream_ops client_ops = {
    .build_head = op_build_head,
    .on_head = op_on_head,
    .on_body = op_on_body,
    .on_end = op_on_end,
};

/* ---- hard stop ---- */

/* The hard stop of one client: a stream under way is cut (its upstream request cancelled) but
 * ended properly, with an `event: error` and the last chunk, where the client's socket takes it;
 * then the connection lingers a moment (LINGER_MS) and closes. Any other client is closed. */
void client_hard_stop(struct client *c)
{
    if (c->state != CS_WAIT || !c->tries_on || !client_creq(c)->resp_started ||
        !client_tries(c)->framed || !client_tries(c)->sse || c->writing ||
        !client_creq(c)->rq.conn) {
        client_close(c);
        return;
    }
    log_info("request %.*s: stream cut by the stop", (int)client_creq(c)->rid_len,
             client_creq(c)->rid);
    upstream_abort(&client_creq(c)->rq);
    client_try_end(c);
    forward_usage_end(c, 1);
    c->close_after = 1;
    client_body_cut(c, "the gateway is shutting down", "gateway_shutdown");
    if (c->state == CS_WAIT && c->writing)
        tq_add(&c->w->tqs[c->w->n_tqs - 1], &c->tn); /* the rest of it: LINGER_MS at most */
}
