/* The AI layer's lookups, free of I/O: a client key by its SHA-256, the endpoint a path names,
 * the model a request names (alias, pool) and whether a key may use it, the pool of another
 * /v1/ path, and the /v1/models answer aigw gives from the config. */
#ifndef AIGW_CORE_ROUTE_H
#define AIGW_CORE_ROUTE_H

#include <stddef.h>
#include <stdint.h>

#include "core/conf.h"

#define ROUTE_KCACHE     64 /* keys a worker remembers having verified */
#define ROUTE_KCACHE_TOK 96 /* longest key remembered (longer ones are hashed every time) */

/* A key this worker verified by its digest: the next request with it skips the SHA-256. */
struct route_kcache {
    uint32_t len; /* 0 = empty */
    int32_t key;
    unsigned char tok[ROUTE_KCACHE_TOK];
};

/* A worker's lookup table of client keys, sorted by digest (built once per config), and the
 * keys it verified last. */
struct route_keys {
    const struct conf *conf;
    int *order; /* key indexes by sha256 */
    int n;
    uint64_t seed; /* of the cache's slot hash: random per worker */
    struct route_kcache *cache;
};

/* Builds t for conf's keys. 0 or -ENOMEM. */
int route_keys_init(struct route_keys *t, const struct conf *conf);
void route_keys_free(struct route_keys *t);
/* The key whose SHA-256 is that of token[0, len), or -1. A token this worker verified lately
 * is found in its cache (compared whole, in constant time) without hashing it again: SHA-256
 * is the largest cost of a request with keys on. Only verified keys are remembered, in the
 * worker's memory, which holds the key in its request buffers anyway. */
int route_key_find(struct route_keys *t, const char *token, size_t len);
/* The token of an "Authorization: Bearer TOKEN" value (scheme in any case, blanks around the
 * token dropped): 0 and *tok, *tok_len, or -1 when the value is not of that form. */
int route_bearer(const char *v, size_t len, const char **tok, size_t *tok_len);

/* What a request path (query and all) names. */
enum route_ep {
    EP_OTHER = 0,   /* another /v1/ path: routed by a pool's paths = */
    EP_CHAT,        /* /v1/chat/completions */
    EP_COMPLETIONS, /* /v1/completions */
    EP_EMBEDDINGS,  /* /v1/embeddings */
    EP_RESPONSES,   /* /v1/responses */
    EP_MODELS,      /* /v1/models */
    EP_MODEL_ID,    /* /v1/models/{id}: *id, *id_len */
    EP_LOOKALIKE,   /* another spelling of one of the above (case, //, a final /, ;params,
                       %-escapes) that an upstream may route the same: refused (404) */
};
enum route_ep route_endpoint(const char *path, size_t len, const char **id, size_t *id_len);
/* Whether the endpoint is routed by the body's model. */
static inline int route_ep_by_model(enum route_ep ep)
{
    return ep >= EP_CHAT && ep <= EP_RESPONSES;
}
/* Whether a path (no /v1) is one the OpenAI API has under /v1: a client whose base URL lacks
 * /v1 gets a 404 that says so. */
int route_missing_v1(const char *path, size_t len);

/* Where a model name leads. */
struct route_model {
    int model;        /* [model] section of the name sent, or -1 */
    int served;       /* [model] section of the model it is served as, or -1 */
    const char *name; /* the name it is served as (the alias target, or the name sent) */
    size_t len;
    int pool; /* the pool whose models match the served name, or -1 */
};

/* Resolves name[0, len). 0, or -ENOENT when the config knows no such model (no [model] and no
 * pool's models match). */
int route_model(const struct conf *conf, const char *name, size_t len, struct route_model *out);
/* Whether key may use model name (its models globs; none = every model). */
int route_key_allows(const struct conf_apikey *key, const char *name, size_t len);
/* The first pool whose paths = match the path (its query dropped), or -1. */
int route_path_pool(const struct conf *conf, const char *path, size_t len);
/* Whether aigw answers GET /v1/models itself: the config names models. */
static inline int route_models_local(const struct conf *conf)
{
    return conf->n_models > 0 || conf->route_by_model;
}

/* The body of GET /v1/models (id NULL) or /v1/models/{id} from the config: every [model] and
 * every literal (not a glob) name in a pool's models, that key (NULL = any) may use; created
 * is the time given. Returns the length, -ENOENT when id is not such a model, -ENOSPC. */
int route_models_body(char *buf, size_t cap, const struct conf *conf, const struct conf_apikey *key,
                      const char *id, size_t id_len, int64_t created);

#endif
