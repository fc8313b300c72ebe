/* The stages a request goes through, in order, one function each. This file runs the ones
 * between a whole request and forwarding it; the table says where every stage lives:
 *
 *   accept    client_accept        core/client.c   a connection from the acceptor (maxconn)
 *   parse     client_process       core/client.c   llhttp over what was read: head, then body
 *   validate  client_validate      core/client.c   at the head (RFC 9112/9110: core/request.c)
 *   local     stage_local          here            paths aigw refuses, OPTIONS: answered here
 *   auth      stage_auth           here            the client's key (core/route.c), 401
 *   body      stage_body           here            the JSON body read once (core/json.c)
 *   route     stage_route          here            the pool by model or path, /v1/models, 403/404
 *   limit     stage_limit          here            key/model/pool limits and budget (shm), 429
 *   pick      client_pick          core/forward.c  a backend of the pool (balancer/, shm slots)
 *   forward   client_try           core/forward.c  the upstream exchange (core/upstream.c)
 *   respond   op_on_head, ...      core/forward.c  the answer streamed back (core/proxy.c),
 *                                                  its usage read (core/usage.c)
 *   record    client_head_outcome  core/forward.c  what a try counts as (retry_record_*)
 *   settle    stages_settle        here            usage and cost into limits and totals
 *
 * Each stage here returns 0 to go on, or -1 when it answered the client itself (the answer is
 * on its way and ends the request); a new stage is a new function called in stages_run. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "core/json.h"
#include "core/log.h"
#include "core/out.h"
#include "core/route.h"
#include "core/util.h"
#include "core/worker_priv.h"

static int is_chat_completions(const struct client *c)
{
    static const char path[] = "/v1/chat/completions";
    size_t n = sizeof(path) - 1;
    return client_creq(c)->url_len >= n && memcmp(client_creq(c)->url, path, n) == 0 &&
           (client_creq(c)->url_len == n || client_creq(c)->url[n] == '?');
}

/* Requests aigw answers itself: a path it does not forward (decided at the head), OPTIONS. */
static int stage_local(struct client *c)
{
    if (client_creq(c)->err == 404 || client_creq(c)->err == 400) {
        client_path_error(c, 0);
        return -1;
    }
    if (client_creq(c)->local) {
        client_options(c);
        return -1;
    }
    return 0;
}

/* Reads the JSON body for "model", "stream" and the json:FIELD hash key of the listener's pool
 * (the body comes before the route: with routing by model, the field of every pool the request
 * may go to is wanted). A chat completion must be a JSON object (400). The body is whole by now
 * (it is kept for retries anyway): read in one piece, no token spans two reads, so yajl never
 * copies one aside. */
static int stage_body(struct client *c)
{
    struct creq *r = client_creq(c);
    const struct conf_pool *pool = &c->w->conf->pools[c->ln->pool];
    const char *field = pool->hash_src == HASH_JSON ? pool->hash_name : NULL;
    int json_ok = 0;

    if (r->body_len)
        json_ok = json_req_parse(&c->w->json, &r->info, field, r->body, r->body_len) == 0;
    else
        json_req_reset(&r->info);
    if (!json_ok && r->parser.method == HTTP_POST && is_chat_completions(c)) {
        client_error(c, 400, "invalid_request_error", "invalid_json",
                     "the request body is not a JSON object", 0, 0);
        return -1;
    }
    return 0;
}

/* Who the client is: with auth on (the listener's default), a configured key in
 * "Authorization: Bearer KEY", not expired. The key is only ever hashed and compared. */
static int stage_auth(struct client *c)
{
    struct creq *r = client_creq(c);
    const struct proxy_hdr *h;
    const char *tok;
    size_t tok_len;
    int k;

    r->key = -1;
    if (!c->ln->auth)
        return 0;
    h = client_hdr(c, "authorization");
    for (uint32_t i = 0; h && i < r->n_hdrs; i++) {
        if (&r->hdrs[i] != h &&
            util_span_ieq(r->hdrs[i].name, r->hdrs[i].name_len, "authorization")) {
            /* which one counts would depend on who reads it: none does */
            client_error_extra(c, 400, "invalid_request_error", "invalid_api_key",
                               "More than one Authorization header.", 0, NULL);
            return -1;
        }
    }
    if (!h || route_bearer(h->value, h->value_len, &tok, &tok_len) < 0) {
        client_error_extra(c, 401, "invalid_request_error", "invalid_api_key",
                           "You didn't provide an API key. You need to provide your API key in an "
                           "Authorization header using Bearer auth (i.e. Authorization: Bearer "
                           "YOUR_KEY).",
                           0, "WWW-Authenticate: Bearer\r\n");
        return -1;
    }
    k = route_key_find(&c->w->keys, tok, tok_len);
    if (k < 0) {
        client_error_extra(c, 401, "invalid_request_error", "invalid_api_key",
                           "Incorrect API key provided.", 0, "WWW-Authenticate: Bearer\r\n");
        return -1;
    }
    if (c->w->conf->keys[k].expires &&
        (int64_t)(time_real_ms() / 1000) >= c->w->conf->keys[k].expires) {
        client_error_extra(c, 401, "invalid_request_error", "invalid_api_key",
                           "The API key provided has expired.", 0, "WWW-Authenticate: Bearer\r\n");
        return -1;
    }
    r->key = k;
    return 0;
}

/* GET /v1/models and /v1/models/{id}, answered from the config (filtered by the key). */
static void answer_models(struct client *c, const char *id, size_t id_len)
{
    struct worker *w = c->w;
    struct creq *r = client_creq(c);
    const struct conf_apikey *key = r->key >= 0 ? &w->conf->keys[r->key] : NULL;
    int n = route_models_body(w->scratch + CLIENT_JSON_OFF, client_json_cap(w), w->conf, key, id,
                              id_len, w->started);
    char msg[CONF_NAME_MAX * 4 + 80];

    if (n == -ENOENT) {
        snprintf(msg, sizeof(msg), "The model '%.*s' does not exist",
                 (int)(id_len > CONF_NAME_MAX * 4 ? CONF_NAME_MAX * 4 : id_len), id);
        client_error_extra(c, 404, "invalid_request_error", "model_not_found", msg, 0, NULL);
        return;
    }
    client_json(c, 200, n);
}

/* Which pool the request goes to: for the model endpoints, the pool serving the body's model
 * (after alias_of); the model must be one the key may use. Other /v1/ paths: the first pool
 * whose paths match. Otherwise, or without routing by model, the listener's pool. */
static int stage_route(struct client *c)
{
    struct creq *r = client_creq(c);
    const struct conf *conf = c->w->conf;
    const char *id = NULL;
    size_t id_len = 0;
    enum route_ep ep = route_endpoint(r->url, r->url_len, &id, &id_len);
    char msg[JSON_MODEL_MAX + 120];

    r->ep = (uint8_t)ep;
    r->pool = c->ln->pool;
    r->model = r->served = -1;
    r->model_name = NULL;
    r->model_name_len = 0;
    r->rename_model = 0;
    r->fb_used = 0;
    r->fb_attempts = 0;
    if ((ep == EP_MODELS || ep == EP_MODEL_ID) && route_models_local(conf) &&
        (r->parser.method == HTTP_GET || r->parser.method == HTTP_HEAD)) {
        answer_models(c, id, id_len);
        return -1;
    }
    if (ep == EP_LOOKALIKE) {
        /* an upstream may serve it as the endpoint it resembles, outside the model checks */
        snprintf(msg, sizeof(msg), "Invalid URL (%s %.*s): use the exact path of the endpoint",
                 llhttp_method_name((llhttp_method_t)r->parser.method),
                 (int)(r->url_len > 100 ? 100 : r->url_len), r->url);
        client_error_extra(c, 404, "invalid_request_error", "not_found", msg, 0, NULL);
        return -1;
    }
    if (!route_ep_by_model(ep)) {
        int p = route_path_pool(conf, r->url, r->url_len);

        /* a model named on another path (/v1/images/..., /v1/audio/...) is one the key must
         * be allowed */
        if (r->key >= 0 && (r->info.flags & JSON_REQ_MODEL) &&
            !route_key_allows(&conf->keys[r->key], r->info.model, r->info.model_len)) {
            snprintf(msg, sizeof(msg), "This key may not use the model '%.*s'",
                     (int)(r->info.model_len > 200 ? 200 : r->info.model_len), r->info.model);
            client_error_extra(c, 403, "invalid_request_error", "model_not_allowed", msg, 0, NULL);
            return -1;
        }

        if (p >= 0)
            r->pool = p;
        return 0;
    }
    if (r->info.flags & (JSON_REQ_BAD_STREAM | JSON_REQ_BAD_USAGE)) {
        /* as OpenAI answers it; forwarded, an upstream that coerces "true" or 1 would stream
         * an answer read, billed and filtered as a JSON one */
        client_error_extra(c, 400, "invalid_request_error", "invalid_type",
                           r->info.flags & JSON_REQ_BAD_STREAM
                               ? "Invalid type for 'stream': expected a boolean."
                               : "Invalid type for 'stream_options.include_usage': expected a "
                                 "boolean.",
                           0, NULL);
        return -1;
    }
    if (!(r->info.flags & JSON_REQ_MODEL)) {
        if (conf->route_by_model && r->parser.method == HTTP_POST) {
            client_error_extra(c, 400, "invalid_request_error", "missing_model",
                               "you must provide a model parameter", 0, NULL);
            return -1;
        }
        return 0;
    }
    int shown = (int)(r->info.model_len > 200 ? 200 : r->info.model_len);
    if (r->info.model_len > JSON_MODEL_MAX) {
        snprintf(msg, sizeof(msg), "The model '%.*s...' does not exist", shown, r->info.model);
        client_error_extra(c, 404, "invalid_request_error", "model_not_found", msg, 0, NULL);
        return -1;
    }
    struct route_model m;
    int known = route_model(conf, r->info.model, r->info.model_len, &m) == 0;
    if (!known && conf->route_by_model) {
        snprintf(msg, sizeof(msg), "The model '%.*s' does not exist", shown, r->info.model);
        client_error_extra(c, 404, "invalid_request_error", "model_not_found", msg, 0, NULL);
        return -1;
    }
    if (r->key >= 0 && !route_key_allows(&conf->keys[r->key], r->info.model, r->info.model_len)) {
        snprintf(msg, sizeof(msg), "This key may not use the model '%.*s'", shown, r->info.model);
        client_error_extra(c, 403, "invalid_request_error", "model_not_allowed", msg, 0, NULL);
        return -1;
    }
    if (!known) /* no routing by model: the listener's pool, the name as sent */
        return 0;
    r->model = m.model;
    r->served = m.served;
    r->model_name = m.name;
    r->model_name_len = (uint32_t)m.len;
    r->rename_model = m.name != r->info.model;
    if (m.pool >= 0)
        r->pool = m.pool;
    return 0;
}

static int has_limits(const struct conf_limits *l)
{
    return l->rpm || l->tpm || l->max_parallel;
}

/* The [model] whose prices and limits a request goes by: the one it is served as, else the
 * name it was sent with (an alias without a section of its target). */
static int meter_model(const struct creq *r)
{
    return r->served >= 0 ? r->served : r->model;
}

/* 429 for a request a limiter refused, as OpenAI words it, with Retry-After (and the exact
 * retry-after-ms the OpenAI SDKs read) and the x-ratelimit-* lines. */
static void answer_limited(struct client *c, const struct limit_verdict *v)
{
    const struct conf *conf = c->w->conf;
    struct creq *r = client_creq(c);
    uint32_t id = (uint32_t)v->limiter, nk = (uint32_t)conf->n_keys, nm = (uint32_t)conf->n_models;
    const char *kind = id < nk ? "key" : id < nk + nm ? "model" : "pool";
    shm_worker_note_limited(c->w->shm, (uint32_t)c->w->slot,
                            id < nk        ? 0
                            : id < nk + nm ? 1
                                           : 2,
                            (int)v->dim, v->lease);
    const char *name = id < nk        ? conf->keys[id].name
                       : id < nk + nm ? conf->models[id - nk].name
                                      : conf->pools[id - nk - nm].name;
    static const char *const dims[] = {"", "requests per min (RPM)", "tokens per min (TPM)",
                                       "requests in flight (max_parallel)", "budget"};
    char msg[300], extra[400];
    struct out x = {extra, 0, sizeof(extra) - 1, 0};
    int secs = v->retry_ms < 0 ? 0 : (int)((v->retry_ms + 999) / 1000);

    if (v->retry_ms >= 0) {
        OUT_LIT(&x, "retry-after-ms: ");
        out_u64(&x, (uint64_t)v->retry_ms);
        OUT_LIT(&x, "\r\n");
    }
    meter_ratelimit_headers(&x, &r->rl_req, &r->rl_tok);
    extra[x.over ? 0 : x.len] = '\0';
    if (v->dim == LIMIT_BUDGET) {
        snprintf(msg, sizeof(msg),
                 "You exceeded your current quota: the budget of %s %s is spent (counting what "
                 "is in flight)",
                 kind, name);
        client_error_extra(c, 429, "insufficient_quota", "insufficient_quota", msg, secs, extra);
        return;
    }
    if (v->dim == LIMIT_FLEET || v->dim == LIMIT_FLEET_WAIT) { /* [cluster] */
        if (v->dim == LIMIT_FLEET) /* cluster_fallback = closed, Redis away */
            snprintf(msg, sizeof(msg),
                     "The fleet limits of %s %s cannot be checked now (the gateways cannot reach "
                     "their shared store). Please try again in %d.%03ds.",
                     kind, name, (int)(v->retry_ms / 1000), (int)(v->retry_ms % 1000));
        else /* this gateway's share of the budget is being topped up */
            snprintf(msg, sizeof(msg),
                     "Rate limit reached for %s %s on this gateway's share of its budget. Please "
                     "try again in %d.%03ds.",
                     kind, name, (int)(v->retry_ms / 1000), (int)(v->retry_ms % 1000));
        client_error_extra(c, 429, "requests", "rate_limit_exceeded", msg, secs < 1 ? 1 : secs,
                           extra);
        return;
    }
    if (v->retry_ms >= 0 && v->lease) /* [cluster]: this host's lease, not the fleet's limit */
        snprintf(msg, sizeof(msg),
                 "Rate limit reached for %s %s on this gateway's share of its %s (the limit is "
                 "shared by a fleet of gateways). Please try again in %d.%03ds.",
                 kind, name, dims[v->dim], (int)(v->retry_ms / 1000), (int)(v->retry_ms % 1000));
    else if (v->retry_ms >= 0)
        snprintf(msg, sizeof(msg),
                 "Rate limit reached for %s %s on %s. Please try again in %d.%03ds.", kind, name,
                 dims[v->dim], (int)(v->retry_ms / 1000), (int)(v->retry_ms % 1000));
    else
        snprintf(msg, sizeof(msg),
                 "Request too large for %s %s on %s: it can never be admitted; lower max_tokens "
                 "or the prompt.",
                 kind, name, dims[v->dim]);
    client_error_extra(c, 429, v->dim == LIMIT_TOKENS ? "tokens" : "requests",
                       "rate_limit_exceeded", msg, v->retry_ms >= 0 && secs < 1 ? 1 : secs, extra);
}

/* Whether the client may send it now: the key's, the model's and the pool's limits (rpm, tpm,
 * max_parallel over every worker, in shm) and the key's budget, all at once. Its tokens (the
 * prompt's estimate and its max_tokens) and its highest cost are reserved here and corrected
 * to the real usage when it ends (stages_settle). */
static int stage_limit(struct client *c)
{
    struct worker *w = c->w;
    struct creq *r = client_creq(c);
    const struct conf *conf = w->conf;
    struct limit_region *lr = shm_limits(w->shm);
    struct limit_verdict v;
    uint32_t ids[LIMIT_MAX_IDS], n = 0;
    int m = meter_model(r);
    uint64_t out_max = 0, cost;

    r->metered = 0;
    r->ticket.n = 0;
    r->rl_req.set = r->rl_tok.set = 0;
    r->res_prompt = r->res_tokens = 0;
    r->usage_got = 0;
    r->upstream_saw = 0;
    r->rq.written = 0;
    if (route_ep_by_model((enum route_ep)r->ep)) {
        r->res_prompt = meter_prompt_estimate(r->body, r->body_len);
        out_max = meter_output_max(r->info.max_tokens, conf->global.default_max_tokens,
                                   r->ep == EP_EMBEDDINGS);
    }
    r->res_tokens = r->res_prompt + out_max;
    if (!lr)
        return 0;
    r->metered = 1;
    if (r->key >= 0 && (has_limits(&conf->keys[r->key].lim) || conf->keys[r->key].budget_nusd))
        ids[n++] = (uint32_t)r->key;
    if (m >= 0 && has_limits(&conf->models[m].lim))
        ids[n++] = (uint32_t)(conf->n_keys + m);
    if (has_limits(&conf->pools[r->pool].lim))
        ids[n++] = (uint32_t)(conf->n_keys + conf->n_models + r->pool);
    if (!n)
        return 0;
    cost = meter_cost_nano(m >= 0 ? &conf->models[m] : NULL, r->res_prompt, 0, out_max, 0);
    if (r->model >= 0 && conf->models[r->model].fallback[0]) {
        /* the fallback, when it serves the request, costs its own price: the budget holds the
         * dearer of the two (the key's budget limiter is not taken again at the fallback) */
        const char *fb = conf->models[r->model].fallback;
        struct route_model fm;
        if (route_model(conf, fb, strlen(fb), &fm) == 0) {
            int f = fm.served >= 0 ? fm.served : fm.model;
            uint64_t fc =
                meter_cost_nano(f >= 0 ? &conf->models[f] : NULL, r->res_prompt, 0, out_max, 0);
            if (fc > cost)
                cost = fc;
        }
    }
    int rc = limit_admit(lr, ids, n, time_mono_ms(), (int64_t)(time_real_ms() / 1000),
                         r->res_tokens, cost, (uint32_t)w->slot, &r->ticket, &v);
    r->rl_req = (struct meter_trio){v.req.set, v.req.limit, v.req.remaining, v.req.reset_ms};
    r->rl_tok = (struct meter_trio){v.tok.set, v.tok.limit, v.tok.remaining, v.tok.reset_ms};
    if (rc == -EAGAIN) {
        r->metered = 0;
        if (v.lease == 2) {
            /* [cluster]: this host's lease ran out while the fleet had room: the sync process
             * tops it up within a few ms of the worker raising the hungry flag. Waiting for
             * that, rather than refusing, keeps a burst through one host from getting 429s
             * below the fleet's limit; bounded, after which the 429 goes out as it would. */
            uint64_t now = uv_now(&w->loop), max = conf->cluster.sync_interval_ms;
            max = max < 100 ? 100 : max > 1000 ? 1000 : max;
            if (!r->lease_wait_from)
                r->lease_wait_from = now ? now : 1;
            if (now - r->lease_wait_from < max) {
                tq_add(&w->lease_q, &c->tn);
                return -1;
            }
        }
        r->lease_wait_from = 0;
        answer_limited(c, &v);
        return -1;
    }
    r->lease_wait_from = 0;
    return 0;
}

void stages_on_lease_due(struct tq_node *n)
{
    struct client *c = tq_entry(n, struct client, tn);

    if (stage_limit(c) < 0)
        return;
    forward_start(c);
}

/* A model fallback serves the request through another model and pool: their limits apply too,
 * as if it had been sent to them (the limiters it already holds are not taken twice). 0: it may
 * go there (what it took joins its ticket, settled with the rest); -EAGAIN: their limits
 * refuse it now. */
int stages_admit_fallback(struct client *c, int model, int served, int pool)
{
    struct worker *w = c->w;
    struct creq *r = client_creq(c);
    const struct conf *conf = w->conf;
    struct limit_region *lr = shm_limits(w->shm);
    struct limit_ticket t;
    struct limit_verdict v;
    uint32_t ids[2], n = 0, cand[2];
    int m = served >= 0 ? served : model;

    if (!lr || !r->metered)
        return 0;
    if (m >= 0 && has_limits(&conf->models[m].lim))
        cand[n++] = (uint32_t)(conf->n_keys + m);
    if (has_limits(&conf->pools[pool].lim))
        cand[n++] = (uint32_t)(conf->n_keys + conf->n_models + pool);
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        int held = 0;
        for (uint32_t j = 0; j < r->ticket.n; j++)
            held |= r->ticket.ids[j] == cand[i];
        if (!held)
            ids[k++] = cand[i];
    }
    if (!k)
        return 0;
    if (limit_admit(lr, ids, k, time_mono_ms(), (int64_t)(time_real_ms() / 1000), r->res_tokens,
                    r->ticket.n ? r->ticket.cost_nano : 0, (uint32_t)w->slot, &t, &v) < 0)
        return -EAGAIN;
    if (!r->ticket.n) {
        r->ticket = t;
    } else {
        for (uint32_t i = 0; i < t.n && r->ticket.n < LIMIT_MAX_IDS; i++) {
            r->ticket.ids[r->ticket.n] = t.ids[i];
            r->ticket.seq[r->ticket.n++] = t.seq[i];
        }
    }
    if (v.req.set && (!r->rl_req.set || v.req.remaining < r->rl_req.remaining))
        r->rl_req = (struct meter_trio){v.req.set, v.req.limit, v.req.remaining, v.req.reset_ms};
    if (v.tok.set && (!r->rl_tok.set || v.tok.remaining < r->rl_tok.remaining))
        r->rl_tok = (struct meter_trio){v.tok.set, v.tok.limit, v.tok.remaining, v.tok.reset_ms};
    return 0;
}

void stages_run(struct client *c)
{
    /* who the client is before anything of its body is read */
    if (stage_local(c) < 0 || stage_auth(c) < 0 || stage_body(c) < 0 || stage_route(c) < 0 ||
        stage_limit(c) < 0)
        return;
    forward_start(c); /* pick, forward, respond, record */
}

void client_on_usage(struct client *c, const struct usage *u, int partial)
{
    struct creq *r = client_creq(c);

    r->usage = *u;
    r->usage_got = 1;
    r->usage_partial = (uint8_t)(partial != 0);
    log_debug("request %.*s: usage prompt=%llu completion=%llu cached=%llu reasoning=%llu "
              "total=%llu have=%d text_tokens=%llu partial=%d",
              (int)r->rid_len, r->rid, (unsigned long long)u->prompt,
              (unsigned long long)u->completion, (unsigned long long)u->cached,
              (unsigned long long)u->reasoning, (unsigned long long)u->total,
              (u->flags & USAGE_HAVE) != 0, (unsigned long long)u->text_tokens, partial);
}

void stages_usage(const struct client *c, struct acct_usage *out)
{
    const struct creq *r = client_creq(c);
    const struct conf *conf = c->w->conf;
    int m = meter_model(r);
    const struct conf_model *cm = m >= 0 ? &conf->models[m] : NULL;
    struct acct_usage a;

    memset(&a, 0, sizeof(a));
    a.requests = 1;
    if (r->usage_got && (r->usage.flags & USAGE_HAVE)) {
        /* the upstream's own count (a stream cut after its usage chunk is whole) */
        a.prompt = r->usage.prompt;
        a.completion = r->usage.completion;
        a.cached = r->usage.cached;
        a.reasoning = r->usage.reasoning;
    } else if (r->usage_got) {
        /* no usage came (a cut stream, an upstream that reports none): the prompt as
         * reserved, the completion from the text delivered; never zero, never twice */
        a.prompt = r->res_prompt;
        a.completion = r->usage.text_tokens;
        a.partial = 1;
    } else if ((r->upstream_saw || r->rq.written) && !r->resp_started) {
        /* the request reached an upstream but no answer of one reached the client (it left,
         * the upstream failed after reading it): the provider bills the prompt at least (an
         * error the upstream answered is not billed) */
        a.prompt = r->res_prompt;
        a.partial = 1;
    }
    /* else nothing reached an upstream (refused, failed to connect): nothing was generated */
    a.cost_nano = meter_cost_nano(cm, a.prompt, a.cached, a.completion, 0);
    a.list_cost_nano = meter_cost_nano(cm, a.prompt, a.cached, a.completion, 1);
    *out = a;
}

void stages_settle(struct client *c)
{
    struct worker *w = c->w;
    struct creq *r = client_creq(c);
    struct acct_usage a;
    int m = meter_model(r);

    if (!r->metered)
        return;
    r->metered = 0;
    stages_usage(c, &a);
    if (r->ticket.n)
        limit_settle(shm_limits(w->shm), &r->ticket, time_mono_ms(),
                     (int64_t)(time_real_ms() / 1000), a.prompt + a.completion, a.cost_nano);
    int32_t be = c->tries_on && client_tries(c)->n
                     ? (int32_t)client_tries(c)->tried[client_tries(c)->n - 1]
                     : -1;
    if (shm_acct(w->shm))
        acct_add(shm_acct(w->shm), (uint32_t)w->slot, r->key, m, be, &a);
    r->usage_got = 0;
}
