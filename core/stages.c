/* The stages a request goes through, in order, one function each. This file runs the ones
 * between a whole request and forwarding it; the table says where every stage lives:
 *
 *   accept    client_accept        core/client.c   a connection from the acceptor (maxconn)
 *   parse     client_process       core/client.c   llhttp over what was read: head, then body
 *   validate  client_validate      core/client.c   at the head (RFC 9112/9110: core/request.c)
 *   local     stage_local          here            paths aigw refuses, OPTIONS: answered here
 *   body      stage_body           here            the JSON body read once (core/json.c)
 *   auth      stage_auth           here            (issue 7: the client's key)
 *   route     stage_route          here            the pool (issue 7: by model)
 *   limit     stage_limit          here            (issue 7: rate limits, budgets)
 *   pick      client_pick          core/forward.c  a backend of the pool (balancer/, shm slots)
 *   forward   client_try           core/forward.c  the upstream exchange (core/upstream.c)
 *   respond   op_on_head, ...      core/forward.c  the answer streamed back (core/proxy.c)
 *   record    client_head_outcome  core/forward.c  what a try counts as (retry_record_*)
 *
 * Each stage here returns 0 to go on, or -1 when it answered the client itself (the answer is
 * on its way and ends the request); a new stage is a new function called in stages_run. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "core/json.h"
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
    if (!route_ep_by_model(ep)) {
        int p = route_path_pool(conf, r->url, r->url_len);

        if (p >= 0)
            r->pool = p;
        return 0;
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

/* Whether the client may send it now: no limits until issue 7. */
static int stage_limit(struct client *c)
{
    return 0;
}

void stages_run(struct client *c)
{
    if (stage_local(c) < 0 || stage_body(c) < 0 || stage_auth(c) < 0 || stage_route(c) < 0 ||
        stage_limit(c) < 0)
        return;
    forward_start(c); /* pick, forward, respond, record */
}
