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
#include <string.h>

#include "core/json.h"
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

/* Who the client is: every request may pass until client keys exist (issue 7). */
static int stage_auth(struct client *c)
{
    return 0;
}

/* Which pool the request goes to: the listener's (issue 7 routes by model). */
static int stage_route(struct client *c)
{
    client_creq(c)->pool = c->ln->pool;
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
