/* The AI layer's lookups (see core/route.h): pure functions over the config. */
#include "core/route.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

#include <fnmatch.h>
#include <mbedtls/sha256.h>

#include "core/json.h"

#include "core/out.h"
#include "core/util.h"

static const struct conf *sort_conf; /* qsort has no context argument */

static int by_digest(const void *a, const void *b)
{
    return memcmp(sort_conf->keys[*(const int *)a].sha256, sort_conf->keys[*(const int *)b].sha256,
                  32);
}

int route_keys_init(struct route_keys *t, const struct conf *conf)
{
    t->conf = conf;
    t->n = conf->n_keys;
    t->order = NULL;
    t->cache = NULL;
    if (!t->n)
        return 0;
    if (getrandom(&t->seed, sizeof(t->seed), 0) != (ssize_t)sizeof(t->seed))
        t->seed = (uint64_t)(uintptr_t)t ^ 0x9e3779b97f4a7c15ull;
    t->cache = calloc(ROUTE_KCACHE, sizeof(*t->cache));
    if (!t->cache)
        return -ENOMEM;
    t->order = malloc((size_t)t->n * sizeof(*t->order));
    if (!t->order)
        return -ENOMEM;
    for (int i = 0; i < t->n; i++)
        t->order[i] = i;
    sort_conf = conf;
    qsort(t->order, (size_t)t->n, sizeof(*t->order), by_digest);
    return 0;
}

void route_keys_free(struct route_keys *t)
{
    if (t->cache)
        memset(t->cache, 0, ROUTE_KCACHE * sizeof(*t->cache));
    free(t->cache);
    t->cache = NULL;
    free(t->order);
    t->order = NULL;
    t->n = 0;
}

/* The cache slot of a token: its 8-byte words (the last one zero-padded) mixed in turn
 * (splitmix64's finaliser) from a per-worker random seed (the slot is a hint; the whole token is
 * compared). */
static struct route_kcache *kcache_slot(const struct route_keys *t, const char *token, size_t len)
{
    uint64_t h = t->seed ^ 0xcbf29ce484222325ull ^ len, w;
    size_t i = 0;

    for (; len - i >= 8; i += 8) {
        memcpy(&w, token + i, 8);
        h = util_mix64(h ^ w);
    }
    if (i < len) {
        w = 0;
        memcpy(&w, token + i, len - i);
        h = util_mix64(h ^ w);
    }
    return &t->cache[h % ROUTE_KCACHE];
}

/* Whether the slot holds token: every byte compared (8 at a time), whatever matches first. */
static int kcache_has(const struct route_kcache *e, const char *token, size_t len)
{
    uint64_t d = 0, a, b;
    size_t i = 0;

    if (e->len != len)
        return 0;
    for (; len - i >= 8; i += 8) {
        memcpy(&a, e->tok + i, 8);
        memcpy(&b, token + i, 8);
        d |= a ^ b;
    }
    for (; i < len; i++)
        d |= (unsigned char)(e->tok[i] ^ (unsigned char)token[i]);
    return d == 0;
}

int route_key_find(struct route_keys *t, const char *token, size_t len)
{
    unsigned char sha[32];
    int lo = 0, hi = t->n - 1;
    struct route_kcache *e = NULL;

    if (!t->n || len == 0)
        return -1;
    if (t->cache && len <= ROUTE_KCACHE_TOK) {
        e = kcache_slot(t, token, len);
        if (kcache_has(e, token, len))
            return e->key;
    }
    /* Only digests are compared: the time a compare takes says nothing about a key's bytes. */
    mbedtls_sha256_ret((const unsigned char *)token, len, sha, 0);
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2, k = t->order[mid];
        int d = memcmp(sha, t->conf->keys[k].sha256, 32);

        if (d == 0) {
            if (e) {
                e->len = (uint32_t)len;
                e->key = k;
                memcpy(e->tok, token, len);
            }
            return k;
        }
        if (d < 0)
            hi = mid - 1;
        else
            lo = mid + 1;
    }
    return -1;
}

int route_bearer(const char *v, size_t len, const char **tok, size_t *tok_len)
{
    size_t i = 0, e = len;

    while (i < len && (v[i] == ' ' || v[i] == '\t'))
        i++;
    if (len - i < 7 || strncasecmp(v + i, "bearer", 6) != 0 ||
        (v[i + 6] != ' ' && v[i + 6] != '\t'))
        return -1;
    i += 7;
    while (i < len && (v[i] == ' ' || v[i] == '\t'))
        i++;
    while (e > i && (v[e - 1] == ' ' || v[e - 1] == '\t'))
        e--;
    if (e == i)
        return -1;
    for (size_t j = i; j < e; j++)
        if (v[j] == ' ' || v[j] == '\t')
            return -1;
    *tok = v + i;
    *tok_len = e - i;
    return 0;
}

/* The length of path without its query. */
static size_t path_len(const char *path, size_t len)
{
    const char *q = memchr(path, '?', len);

    return q ? (size_t)(q - path) : len;
}

static int path_is(const char *p, size_t len, const char *s)
{
    size_t n = strlen(s);

    return len == n && memcmp(p, s, n) == 0;
}

static int hexval(char c)
{
    return c >= '0' && c <= '9'                     ? c - '0'
           : (c | 0x20) >= 'a' && (c | 0x20) <= 'f' ? (c | 0x20) - 'a' + 10
                                                    : -1;
}

/* Whether path is one of the endpoints the way a lenient router reads it: %-escapes decoded,
 * case folded, runs of '/' as one, ';' parameters and a final '/' dropped. */
static int lookalike(const char *path, size_t len)
{
    static const char *const eps[] = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                      "/v1/responses", "/v1/models"};
    char norm[64];
    size_t n = 0;

    for (size_t i = 0; i < len; i++) {
        char ch = path[i];

        if (ch == '%' && i + 2 < len && hexval(path[i + 1]) >= 0 && hexval(path[i + 2]) >= 0) {
            ch = (char)(hexval(path[i + 1]) * 16 + hexval(path[i + 2]));
            i += 2;
        }
        if (ch == ';') { /* a parameter runs to the next '/' */
            while (i + 1 < len && path[i + 1] != '/')
                i++;
            continue;
        }
        if (ch == '/' && n && norm[n - 1] == '/')
            continue;
        if (n == sizeof(norm))
            return 0;
        norm[n++] = (char)(ch >= 'A' && ch <= 'Z' ? ch | 0x20 : ch);
    }
    while (n > 1 && norm[n - 1] == '/')
        n--;
    for (size_t i = 0; i < sizeof(eps) / sizeof(eps[0]); i++)
        if (strlen(eps[i]) == n && memcmp(eps[i], norm, n) == 0)
            return 1;
    /* /v1/models/{id} spelt otherwise */
    return n > 11 && memcmp(norm, "/v1/models/", 11) == 0;
}

enum route_ep route_endpoint(const char *path, size_t len, const char **id, size_t *id_len)
{
    len = path_len(path, len);
    if (path_is(path, len, "/v1/chat/completions"))
        return EP_CHAT;
    if (path_is(path, len, "/v1/completions"))
        return EP_COMPLETIONS;
    if (path_is(path, len, "/v1/embeddings"))
        return EP_EMBEDDINGS;
    if (path_is(path, len, "/v1/responses"))
        return EP_RESPONSES;
    if (path_is(path, len, "/v1/models"))
        return EP_MODELS;
    if (len > 11 && memcmp(path, "/v1/models/", 11) == 0) {
        *id = path + 11;
        *id_len = len - 11;
        return EP_MODEL_ID;
    }
    return lookalike(path, len) ? EP_LOOKALIKE : EP_OTHER;
}

int route_missing_v1(const char *path, size_t len)
{
    static const char *const api[] = {"/chat/completions", "/completions", "/embeddings",
                                      "/responses",        "/models",      "/images/",
                                      "/audio/",           "/files",       "/batches",
                                      "/moderations",      "/assistants",  "/threads"};

    len = path_len(path, len);
    for (size_t i = 0; i < sizeof(api) / sizeof(api[0]); i++) {
        size_t n = strlen(api[i]);

        if (len >= n && memcmp(path, api[i], n) == 0 &&
            (len == n || api[i][n - 1] == '/' || path[n] == '/'))
            return 1;
    }
    return 0;
}

/* The [model] of a name: the one named so, else the first whose name is a glob matching it
 * ([model gpt-4o*] prices every dated gpt-4o). */
static int is_glob(const char *s);

static int model_find(const struct conf *conf, const char *name, size_t len)
{
    char buf[JSON_MODEL_MAX + 1];

    for (int i = 0; i < conf->n_models; i++)
        if (strlen(conf->models[i].name) == len && memcmp(conf->models[i].name, name, len) == 0)
            return i;
    if (len >= sizeof(buf) || memchr(name, '\0', len))
        return -1;
    memcpy(buf, name, len);
    buf[len] = '\0';
    for (int i = 0; i < conf->n_models; i++)
        if (strpbrk(conf->models[i].name, "*?") && fnmatch(conf->models[i].name, buf, 0) == 0)
            return i;
    return -1;
}

int route_model(const struct conf *conf, const char *name, size_t len, struct route_model *out)
{
    out->model = model_find(conf, name, len);
    out->served = out->model;
    out->name = name;
    out->len = len;
    if (out->model >= 0 && conf->models[out->model].alias_of[0]) {
        out->name = conf->models[out->model].alias_of;
        out->len = strlen(out->name);
        out->served = model_find(conf, out->name, out->len);
    }
    out->pool = conf_model_pool(conf, out->name, out->len);
    /* a [model] glob prices names a pool serves; it does not make a name known */
    if (out->pool < 0 && (out->model < 0 || (is_glob(conf->models[out->model].name) &&
                                             !conf->models[out->model].alias_of[0])))
        return -ENOENT;
    return 0;
}

int route_key_allows(const struct conf_apikey *key, const char *name, size_t len)
{
    return key->models.n == 0 || conf_list_match(&key->models, name, len);
}

int route_path_pool(const struct conf *conf, const char *path, size_t len)
{
    len = path_len(path, len);
    for (int i = 0; i < conf->n_pools; i++)
        if (conf_list_match(&conf->pools[i].paths, path, len))
            return i;
    return -1;
}

/* A glob, not a name: it has a fnmatch special character. */
static int is_glob(const char *s)
{
    return strpbrk(s, "*?[") != NULL;
}

static void model_obj(struct out *o, const char *id, int64_t created)
{
    OUT_LIT(o, "{\"id\":\"");
    out_str(o, id); /* config names: no quote, backslash or control character */
    OUT_LIT(o, "\",\"object\":\"model\",\"created\":");
    out_u64(o, (uint64_t)(created > 0 ? created : 0));
    OUT_LIT(o, ",\"owned_by\":\"aigw\"}");
}

/* Calls back for every model name the config lists, each once, in file order ([model]
 * sections first). Stops when fn returns non-zero and returns that. */
static int each_model(const struct conf *conf, int (*fn)(void *, const char *), void *arg)
{
    int r;

    for (int i = 0; i < conf->n_models; i++)
        if (!is_glob(conf->models[i].name) && (r = fn(arg, conf->models[i].name)))
            return r;
    for (int p = 0; p < conf->n_pools; p++) {
        const struct conf_list *l = &conf->pools[p].models;

        for (int i = 0; i < l->n; i++) {
            int seen = is_glob(l->items[i]) || conf_model_find(conf, l->items[i]) >= 0;

            for (int q = 0; !seen && q <= p; q++)
                for (int j = 0; j < (q == p ? i : conf->pools[q].models.n); j++)
                    seen |= !strcmp(conf->pools[q].models.items[j], l->items[i]);
            if (!seen && (r = fn(arg, l->items[i])))
                return r;
        }
    }
    return 0;
}

struct list_ctx {
    struct out *o;
    const struct conf_apikey *key;
    const char *id;
    size_t id_len;
    int64_t created;
    int n;
};

static int list_one(void *arg, const char *name)
{
    struct list_ctx *x = arg;

    if (x->key && !route_key_allows(x->key, name, strlen(name)))
        return 0;
    if (x->id) {
        if (strlen(name) != x->id_len || memcmp(name, x->id, x->id_len) != 0)
            return 0;
        model_obj(x->o, name, x->created);
        return 1;
    }
    if (x->n++)
        OUT_LIT(x->o, ",");
    model_obj(x->o, name, x->created);
    return 0;
}

int route_models_body(char *buf, size_t cap, const struct conf *conf, const struct conf_apikey *key,
                      const char *id, size_t id_len, int64_t created)
{
    struct out o = {buf, 0, cap, 0};
    struct list_ctx x = {&o, key, id, id_len, created, 0};

    if (id) {
        if (!each_model(conf, list_one, &x))
            return -ENOENT;
        return out_done(&o);
    }
    OUT_LIT(&o, "{\"object\":\"list\",\"data\":[");
    each_model(conf, list_one, &x);
    OUT_LIT(&o, "]}");
    return out_done(&o);
}
