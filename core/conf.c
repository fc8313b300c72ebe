/* Configuration: reads the INI file with inih into struct conf; every error names file, line and
 * key. */
#include "core/conf.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ctype.h>
#include <fnmatch.h>
#include <grp.h>
#include <ini.h>
#include <mbedtls/sha256.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pwd.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/url.h"
#include "core/util.h"

#define CONF_WORKERS_MAX 64
#define CONF_MAXCONN_MAX 100000000  /* far beyond any fd limit: the master checks the real one */
#define CONF_FILE_MAX    (8u << 20) /* a config file larger than this is refused */
#define CONF_SECRET_MAX  4096
#define CONF_DAY_MS      (86400ull * 1000)
#define CONF_KEYS_MAX    64 /* keys of the largest section table */
#define CONF_FAIL_RING   32 /* the per-worker failure ring bounds max_fails and breaker_failures */

#define CONF_FAIL_ON_DEFAULT (COND_CONNECT | COND_TLS | COND_TIMEOUT | COND_RESET | COND_5XX)
#define CONF_RETRY_ON_DEFAULT                                                                      \
    (COND_CONNECT | COND_TLS | COND_STALE | COND_TIMEOUT | COND_RESET | COND_5XX | COND_429)

enum conf_kind {
    CONF_KIND_NONE = 0,
    CONF_KIND_GLOBAL,
    CONF_KIND_LISTEN,
    CONF_KIND_POOL,
    CONF_KIND_BACKEND,
    CONF_KIND_KEY,
    CONF_KIND_MODEL,
    CONF_KIND_STATS,
    CONF_KIND_CLUSTER,
};

static const char *const conf_kind_names[] = {
    [CONF_KIND_NONE] = "",       [CONF_KIND_GLOBAL] = "global",   [CONF_KIND_LISTEN] = "listen",
    [CONF_KIND_POOL] = "pool",   [CONF_KIND_BACKEND] = "backend", [CONF_KIND_KEY] = "key",
    [CONF_KIND_MODEL] = "model", [CONF_KIND_STATS] = "stats",     [CONF_KIND_CLUSTER] = "cluster",
};

/* A pool reference by name, resolved once every pool is known (a backend may precede its pool). */
struct conf_ref {
    char pool[CONF_NAME_MAX]; /* "" when the key was not given */
    int line;
    int bind_line; /* listen: where bind was set, for the duplicate check */
    /* backend: which per-backend overrides were set; the others take the pool's values once the
     * pool is known (it may come later in the file). */
    int set_slowstart, set_max_fails, set_fail_timeout;
};

/* State of one conf_load: the reader and the handler share it through inih's user pointer. */
struct conf_parse {
    const char *path;
    unsigned flags; /* CONF_LOAD_* */
    char *dir;      /* the config file's directory, for relative file: and ca_file paths */
    FILE *f;
    uint64_t bytes; /* read so far: a file that grows while read stops at CONF_FILE_MAX too */
    char *buf;      /* the current raw line (getline) */
    size_t cap;
    int line; /* number of the line inih is handling */
    struct conf *conf;
    struct conf_ref *listen_refs, *backend_refs;
    int cap_listens, cap_pools, cap_backends, cap_keys, cap_models;
    int global_line;
    int stats_bind_line; /* [stats] bind, for the conflict check */

    /* The section being read. */
    enum conf_kind kind;
    int idx;                       /* index in the conf array of its kind */
    char sect[CONF_NAME_MAX + 16]; /* "backend a", for messages */
    int sect_line;
    int key_line[CONF_KEYS_MAX]; /* line where each key of the table was set; 0 = not yet */

    char *err;
    int err_line;
};

static void conf_verr(struct conf_parse *p, int line, const char *key, const char *fmt, va_list ap)
{
    char msg[1024], where[CONF_NAME_MAX + 128] = "";
    int n;

    if (p->err)
        return;
    vsnprintf(msg, sizeof(msg), fmt, ap);
    if (p->sect[0] && key)
        snprintf(where, sizeof(where), " [%s] key '%s':", p->sect, key);
    else if (p->sect[0])
        snprintf(where, sizeof(where), " [%s]:", p->sect);
    else if (key)
        snprintf(where, sizeof(where), " key '%s':", key);
    if (line > 0)
        n = asprintf(&p->err, "%s:%d:%s %s", p->path, line, where, msg);
    else
        n = asprintf(&p->err, "%s:%s %s", p->path, where, msg);
    if (n < 0)
        p->err = NULL;
    p->err_line = line > 0 ? line : 1;
    if (!p->err) /* out of memory: err_line still marks the load as failed */
        p->err = strdup("out of memory");
}

/* Records the first error: "FILE:LINE: [kind NAME] key 'KEY': message". */
__attribute__((format(printf, 4, 5))) static void conf_err(struct conf_parse *p, int line,
                                                           const char *key, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    conf_verr(p, line, key, fmt, ap);
    va_end(ap);
}

/* ---- key tables ---- */

enum conf_type {
    CONF_T_DURATION = 0, /* uint64_t ms */
    CONF_T_SIZE32,       /* uint32_t bytes */
    CONF_T_SIZE64,       /* uint64_t bytes */
    CONF_T_INT,          /* int */
    CONF_T_UINT32,       /* uint32_t count */
    CONF_T_BOOL,         /* int 0/1 */
    CONF_T_PERCENT,      /* uint32_t percent: "25%", "25" or "0.25" */
    CONF_T_CUSTOM,       /* handled by the section's own function */
};

struct conf_key {
    const char *name;
    enum conf_type type;
    size_t off;
    uint64_t min, max;
};

#define KEY(s, field, t, lo, hi)                                                                   \
    {                                                                                              \
#field, t, offsetof(struct s, field), lo, hi                                               \
    }
#define KEY_DUR(s, field, lo, hi)                                                                  \
    {                                                                                              \
#field, CONF_T_DURATION, offsetof(struct s, field##_ms), lo, hi                            \
    }
/* A key whose name differs from its field's. */
#define KEY_AS(name, s, field, t, lo, hi)                                                          \
    {                                                                                              \
        name, t, offsetof(struct s, field), lo, hi                                                 \
    }
#define KEY_CUSTOM(name)                                                                           \
    {                                                                                              \
        name, CONF_T_CUSTOM, 0, 0, 0                                                               \
    }
/* rpm, tpm, max_parallel of a section with a struct conf_limits lim. */
#define KEY_LIMITS(s)                                                                              \
    KEY_AS("rpm", s, lim.rpm, CONF_T_UINT32, 0, 1000000000),                                       \
        KEY_AS("tpm", s, lim.tpm, CONF_T_UINT32, 0, 4000000000u),                                  \
        KEY_AS("max_parallel", s, lim.max_parallel, CONF_T_UINT32, 0, 1000000)

static const struct conf_key conf_global_keys[] = {
    KEY_CUSTOM("workers"),
    KEY_CUSTOM("admin_socket"),
    KEY_CUSTOM("log_level"),
    KEY_DUR(conf_global, hard_stop_after, 0, 7 * CONF_DAY_MS),
    KEY(conf_global, maxconn, CONF_T_UINT32, 0, CONF_MAXCONN_MAX),
    KEY_CUSTOM("state_file"),
    KEY_DUR(conf_global, state_interval, 100, CONF_DAY_MS),
    KEY(conf_global, default_max_tokens, CONF_T_UINT32, 1, 100000000),
    KEY_CUSTOM("user"),
    KEY_CUSTOM("group"),
    KEY_CUSTOM("pidfile"),
    KEY_CUSTOM("admin_group"),
    KEY_CUSTOM("access_log"),
    KEY(conf_global, access_log_buffer, CONF_T_SIZE32, 4096, 64u << 20),
    {NULL, 0, 0, 0, 0},
};

static const struct conf_key conf_listen_keys[] = {
    KEY_CUSTOM("bind"),
    KEY_CUSTOM("pool"),
    KEY(conf_listen, backlog, CONF_T_INT, 1, 65535),
    KEY(conf_listen, max_header_size, CONF_T_SIZE32, 256, 1u << 20),
    KEY(conf_listen, max_headers, CONF_T_UINT32, 1, 1000),
    KEY(conf_listen, max_body_size, CONF_T_SIZE64, 0, 1ull << 40),
    KEY_DUR(conf_listen, client_header_timeout, 1, 7 * CONF_DAY_MS),
    KEY_DUR(conf_listen, client_body_timeout, 1, 7 * CONF_DAY_MS),
    KEY_DUR(conf_listen, client_body_total_timeout, 1, 7 * CONF_DAY_MS),
    KEY_DUR(conf_listen, keepalive_timeout, 1, 7 * CONF_DAY_MS),
    KEY(conf_listen, maxconn, CONF_T_UINT32, 0, CONF_MAXCONN_MAX),
    KEY(conf_listen, auth, CONF_T_BOOL, 0, 1),
    {NULL, 0, 0, 0, 0},
};

static const struct conf_key conf_pool_keys[] = {
    KEY_CUSTOM("balance"),
    KEY(conf_pool, check, CONF_T_BOOL, 0, 1),
    KEY_CUSTOM("check_method"),
    KEY_CUSTOM("check_path"),
    KEY_CUSTOM("check_expect"),
    KEY_DUR(conf_pool, check_interval, 10, 7 * CONF_DAY_MS),
    KEY_DUR(conf_pool, check_timeout, 1, 7 * CONF_DAY_MS),
    KEY(conf_pool, rise, CONF_T_INT, 1, 1000),
    KEY(conf_pool, fall, CONF_T_INT, 1, 1000),
    KEY_DUR(conf_pool, connect_timeout, 1, 7 * CONF_DAY_MS),
    KEY_DUR(conf_pool, first_byte_timeout, 1, 7 * CONF_DAY_MS),
    KEY_AS("stream_idle_timeout", conf_pool, idle_timeout_ms, CONF_T_DURATION, 1, 7 * CONF_DAY_MS),
    KEY_DUR(conf_pool, pool_idle_timeout, 1, 7 * CONF_DAY_MS),
    /* balancing */
    KEY_CUSTOM("hash_key"),
    KEY_AS("hash_balance_factor", conf_pool, hash_load_pct, CONF_T_PERCENT, 101, 1000),
    /* check cadence and DEGRADED */
    KEY_DUR(conf_pool, check_fastinter, 10, 7 * CONF_DAY_MS),
    KEY_DUR(conf_pool, check_downinter, 10, 7 * CONF_DAY_MS),
    KEY_AS("check_jitter", conf_pool, check_jitter_pct, CONF_T_PERCENT, 0, 50),
    KEY_DUR(conf_pool, degraded_latency, 0, 7 * CONF_DAY_MS),
    KEY_AS("degraded_error_ratio", conf_pool, degraded_error_pct, CONF_T_PERCENT, 0, 100),
    KEY(conf_pool, degraded_weight_pct, CONF_T_PERCENT, 1, 100),
    KEY_DUR(conf_pool, slowstart, 0, 7 * CONF_DAY_MS),
    /* passive detection */
    KEY(conf_pool, max_fails, CONF_T_UINT32, 0, CONF_FAIL_RING),
    KEY_DUR(conf_pool, fail_timeout, 1, 7 * CONF_DAY_MS),
    KEY_CUSTOM("fail_on"),
    /* circuit breaker */
    KEY(conf_pool, breaker_failures, CONF_T_UINT32, 0, CONF_FAIL_RING),
    KEY_DUR(conf_pool, breaker_open_for, 1, 7 * CONF_DAY_MS),
    KEY_DUR(conf_pool, breaker_open_max, 1, 7 * CONF_DAY_MS),
    KEY(conf_pool, breaker_half_open_calls, CONF_T_UINT32, 1, 1000),
    KEY(conf_pool, breaker_successes, CONF_T_UINT32, 1, 1000),
    /* retries */
    KEY(conf_pool, retries, CONF_T_UINT32, 0, 10),
    KEY_CUSTOM("retry_on"),
    KEY_CUSTOM("retry_backoff"),
    KEY_AS("retry_budget", conf_pool, retry_budget_pct, CONF_T_PERCENT, 0, 100),
    KEY(conf_pool, retry_budget_min, CONF_T_UINT32, 0, 10000),
    KEY_DUR(conf_pool, try_timeout, 0, 7 * CONF_DAY_MS),
    KEY_DUR(conf_pool, request_timeout, 0, 7 * CONF_DAY_MS),
    KEY(conf_pool, expose_headers, CONF_T_BOOL, 0, 1),
    /* routing and limits */
    KEY_CUSTOM("models"),
    KEY_CUSTOM("paths"),
    KEY_LIMITS(conf_pool),
    {NULL, 0, 0, 0, 0},
};

static const struct conf_key conf_backend_keys[] = {
    KEY_CUSTOM("pool"),
    KEY_CUSTOM("url"),
    KEY(conf_backend, weight, CONF_T_INT, 0, 256),
    KEY_CUSTOM("api_key"),
    KEY(conf_backend, tls_verify, CONF_T_BOOL, 0, 1),
    KEY_CUSTOM("ca_file"),
    KEY_CUSTOM("keepalive"),
    KEY(conf_backend, backup, CONF_T_BOOL, 0, 1),
    KEY(conf_backend, max_conns, CONF_T_UINT32, 0, 1000000),
    KEY_DUR(conf_backend, slowstart, 0, 7 * CONF_DAY_MS),
    KEY(conf_backend, max_fails, CONF_T_UINT32, 0, CONF_FAIL_RING),
    KEY_DUR(conf_backend, fail_timeout, 1, 7 * CONF_DAY_MS),
    KEY_CUSTOM("model_map"),
    {NULL, 0, 0, 0, 0},
};

static const struct conf_key conf_apikey_keys[] = {
    KEY_CUSTOM("key"),           KEY_CUSTOM("key_sha256"), KEY_CUSTOM("models"),
    KEY_CUSTOM("expires"),       KEY_LIMITS(conf_apikey),  KEY_CUSTOM("budget_usd"),
    KEY_CUSTOM("budget_period"), {NULL, 0, 0, 0, 0},
};

static const struct conf_key conf_model_keys[] = {
    KEY_CUSTOM("alias_of"),
    KEY_CUSTOM("fallback"),
    KEY_CUSTOM("price_input"),
    KEY_CUSTOM("price_output"),
    KEY_CUSTOM("price_cached_input"),
    KEY_CUSTOM("list_price_input"),
    KEY_CUSTOM("list_price_output"),
    KEY_LIMITS(conf_model),
    {NULL, 0, 0, 0, 0},
};

static const struct conf_key conf_stats_keys[] = {
    KEY_CUSTOM("bind"),
    {NULL, 0, 0, 0, 0},
};

static const struct conf_key conf_cluster_keys[] = {
    KEY_CUSTOM("redis"),
    KEY_CUSTOM("redis_password"),
    KEY_CUSTOM("node_name"),
    KEY_DUR(conf_cluster, sync_interval, 50, 60 * 1000),
    KEY_DUR(conf_cluster, lease_ttl, 1000, 3600 * 1000),
    KEY_CUSTOM("cluster_fallback"),
    KEY_CUSTOM("key_prefix"),
    {NULL, 0, 0, 0, 0},
};

/* key_line has a slot for every key of a table (the NULL terminator counts one too many). */
_Static_assert(ARRAY_SIZE(conf_pool_keys) <= CONF_KEYS_MAX + 1, "raise CONF_KEYS_MAX");
_Static_assert(ARRAY_SIZE(conf_backend_keys) <= CONF_KEYS_MAX + 1, "raise CONF_KEYS_MAX");
_Static_assert(ARRAY_SIZE(conf_listen_keys) <= CONF_KEYS_MAX + 1, "raise CONF_KEYS_MAX");

static const struct conf_key *const conf_kind_keys[] = {
    [CONF_KIND_NONE] = NULL,
    [CONF_KIND_GLOBAL] = conf_global_keys,
    [CONF_KIND_LISTEN] = conf_listen_keys,
    [CONF_KIND_POOL] = conf_pool_keys,
    [CONF_KIND_BACKEND] = conf_backend_keys,
    [CONF_KIND_KEY] = conf_apikey_keys,
    [CONF_KIND_MODEL] = conf_model_keys,
    [CONF_KIND_STATS] = conf_stats_keys,
    [CONF_KIND_CLUSTER] = conf_cluster_keys,
};

/* "1500" -> "1500ms", "60000" -> "1m": ranges in messages read like the values users write. */
static void conf_fmt_ms(char *buf, size_t len, uint64_t ms)
{
    if (ms && ms % (3600 * 1000) == 0)
        snprintf(buf, len, "%lluh", (unsigned long long)(ms / (3600 * 1000)));
    else if (ms && ms % (60 * 1000) == 0)
        snprintf(buf, len, "%llum", (unsigned long long)(ms / (60 * 1000)));
    else if (ms && ms % 1000 == 0)
        snprintf(buf, len, "%llus", (unsigned long long)(ms / 1000));
    else
        snprintf(buf, len, "%llums", (unsigned long long)ms);
}

static void conf_fmt_size(char *buf, size_t len, uint64_t v)
{
    if (v && v % (1ull << 30) == 0)
        snprintf(buf, len, "%llug", (unsigned long long)(v >> 30));
    else if (v && v % (1ull << 20) == 0)
        snprintf(buf, len, "%llum", (unsigned long long)(v >> 20));
    else if (v && v % (1ull << 10) == 0)
        snprintf(buf, len, "%lluk", (unsigned long long)(v >> 10));
    else
        snprintf(buf, len, "%llu", (unsigned long long)v);
}

/* Sets a plain (non-custom) key into obj. */
static void conf_set_typed(struct conf_parse *p, const struct conf_key *k, void *obj,
                           const char *val)
{
    char *field = (char *)obj + k->off;
    char lo[32], hi[32];
    uint64_t v;
    long l;
    int r;

    switch (k->type) {
    case CONF_T_DURATION:
        if (util_parse_duration_ms(val, &v) < 0) {
            conf_err(p, p->line, k->name,
                     "'%s' is not a duration (expected a whole number with a unit ms, s, m, h or "
                     "d, e.g. 250ms or 5s; a bare number is seconds)",
                     val);
            return;
        }
        if (v < k->min || v > k->max) {
            conf_fmt_ms(lo, sizeof(lo), k->min);
            conf_fmt_ms(hi, sizeof(hi), k->max);
            conf_err(p, p->line, k->name, "'%s' is out of range %s..%s", val, lo, hi);
            return;
        }
        *(uint64_t *)field = v;
        return;
    case CONF_T_SIZE32:
    case CONF_T_SIZE64:
        if (util_parse_size(val, &v) < 0) {
            conf_err(p, p->line, k->name,
                     "'%s' is not a size (expected bytes with an optional k, m or g suffix, e.g. "
                     "16k or 8m)",
                     val);
            return;
        }
        if (v < k->min || v > k->max) {
            conf_fmt_size(lo, sizeof(lo), k->min);
            conf_fmt_size(hi, sizeof(hi), k->max);
            conf_err(p, p->line, k->name, "'%s' is out of range %s..%s", val, lo, hi);
            return;
        }
        if (k->type == CONF_T_SIZE32)
            *(uint32_t *)field = (uint32_t)v;
        else
            *(uint64_t *)field = v;
        return;
    case CONF_T_INT:
    case CONF_T_UINT32:
        r = util_parse_int(val, (long)k->min, (long)k->max, &l);
        if (r == -ERANGE) {
            conf_err(p, p->line, k->name, "'%s' is out of range %llu..%llu", val,
                     (unsigned long long)k->min, (unsigned long long)k->max);
            return;
        }
        if (r < 0) {
            conf_err(p, p->line, k->name, "'%s' is not a number (expected an integer %llu..%llu)",
                     val, (unsigned long long)k->min, (unsigned long long)k->max);
            return;
        }
        if (k->type == CONF_T_INT)
            *(int *)field = (int)l;
        else
            *(uint32_t *)field = (uint32_t)l;
        return;
    case CONF_T_BOOL:
        r = util_parse_bool(val);
        if (r < 0) {
            conf_err(p, p->line, k->name,
                     "'%s' is not a boolean (expected yes, no, on, off, true, false, 1 or 0)", val);
            return;
        }
        *(int *)field = r;
        return;
    case CONF_T_PERCENT: {
        uint32_t pct;

        r = util_parse_percent(val, &pct);
        if (r == -EINVAL) {
            conf_err(p, p->line, k->name,
                     "'%s' is not a percentage (expected a whole percent like 25%% or 25, or a "
                     "ratio like 0.25)",
                     val);
            return;
        }
        if (r < 0 || pct < k->min || pct > k->max) {
            conf_err(p, p->line, k->name, "'%s' is out of range %llu%%..%llu%%", val,
                     (unsigned long long)k->min, (unsigned long long)k->max);
            return;
        }
        *(uint32_t *)field = pct;
        return;
    }
    case CONF_T_CUSTOM:
        return;
    }
}

/* ---- custom values ---- */

/* Makes a path relative to the config file's directory, as users expect of paths in a config. */
static char *conf_path_resolve(struct conf_parse *p, const char *path)
{
    char *out;

    if (path[0] == '/' || !p->dir)
        return strdup(path);
    if (asprintf(&out, "%s/%s", p->dir, path) < 0)
        return NULL;
    return out;
}

/* An API key goes into an HTTP header: refuse bytes that would break or split it. */
static int conf_secret_ok(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s <= ' ' || *s == 0x7f)
            return 0;
    return 1;
}

static int conf_copy_str(struct conf_parse *p, const char *key, char *dst, size_t len,
                         const char *val, const char *expect);

/* What the secret of `key` is, for messages: "the API key", "the Redis password"... */
static const char *conf_secret_what(const char *key)
{
    if (!strcmp(key, "redis_password"))
        return "the Redis password";
    if (!strcmp(key, "key"))
        return "the client key";
    return "the API key";
}

/* Resolves KEY = env:VAR | file:PATH | literal (when `literal`) into a malloc'd secret, NULL
 * after an error. The secret never appears in a message. */
static char *conf_secret(struct conf_parse *p, const char *key, const char *val, int literal)
{
    char *secret = NULL, *path = NULL, *ret = NULL;
    const char *what = conf_secret_what(key);
    int fd = -1;

    if (!strncmp(val, "env:", 4)) {
        const char *var = val + 4, *env;

        if (!var[0]) {
            conf_err(p, p->line, key, "'env:' names no variable (expected env:VAR)");
            goto out;
        }
        env = getenv(var);
        if (!env || !env[0]) {
            conf_err(p, p->line, key, "environment variable %s is %s (expected %s in it)", var,
                     env ? "empty" : "not set", what);
            goto out;
        }
        secret = strdup(env);
    } else if (!strncmp(val, "file:", 5)) {
        char buf[CONF_SECRET_MAX + 1];
        size_t len = 0;
        ssize_t n;

        if (!val[5]) {
            conf_err(p, p->line, key, "'file:' names no file (expected file:PATH)");
            goto out;
        }
        path = conf_path_resolve(p, val + 5);
        if (!path) {
            conf_err(p, p->line, key, "out of memory");
            goto out;
        }
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd == -1) {
            conf_err(p, p->line, key, "cannot read %s: %s", path, strerror(errno));
            goto out;
        }
        while (len < sizeof(buf) - 1) {
            n = read(fd, buf + len, sizeof(buf) - 1 - len);
            if (n == -1 && errno == EINTR)
                continue;
            if (n == -1) {
                conf_err(p, p->line, key, "cannot read %s: %s", path, strerror(errno));
                goto out;
            }
            if (n == 0)
                break;
            len += (size_t)n;
        }
        if (len == sizeof(buf) - 1) {
            conf_err(p, p->line, key, "%s is larger than %d bytes (expected just %s)", path,
                     CONF_SECRET_MAX - 1, what);
            goto out;
        }
        /* Editors add a final newline; keys never end in whitespace. */
        while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r' || buf[len - 1] == ' ' ||
                           buf[len - 1] == '\t'))
            len--;
        buf[len] = '\0';
        if (len == 0 || memchr(buf, '\0', len)) {
            conf_err(p, p->line, key, "%s %s (expected %s on one line)", path,
                     len ? "contains a NUL byte" : "is empty", what);
            goto out;
        }
        secret = strdup(buf);
        memset(buf, 0, sizeof(buf));
    } else if (literal) {
        if (!val[0]) {
            conf_err(p, p->line, key, "empty value (expected env:VAR, file:PATH or the key)");
            goto out;
        }
        secret = strdup(val);
    } else {
        conf_err(p, p->line, key,
                 "a key is not written in the file (expected env:VAR or file:PATH, or "
                 "key_sha256 = the digest `aigwctl key hash` prints)");
        goto out;
    }
    if (!secret) {
        conf_err(p, p->line, key, "out of memory");
        goto out;
    }
    if (!conf_secret_ok(secret)) {
        conf_err(p, p->line, key,
                 "%s contains a space or control character (expected a single "
                 "token)",
                 what);
        goto out;
    }
    ret = secret;
    secret = NULL;
out:
    if (fd != -1)
        close(fd);
    free(secret);
    free(path);
    return ret;
}

static void conf_set_api_key(struct conf_parse *p, struct conf_backend *b, const char *val)
{
    char *secret;

    if (p->flags & CONF_LOAD_NO_SECRETS)
        return;
    secret = conf_secret(p, "api_key", val, 1);
    if (secret) {
        free(b->api_key);
        b->api_key = secret;
    }
}

/* models = a, b*, ... into l (each item a name or fnmatch glob of printable characters). */
static void conf_set_list(struct conf_parse *p, const char *key, const char *val,
                          struct conf_list *l, int path)
{
    char *copy = strdup(val), *items[CONF_LIST_MAX];
    int n, r;

    if (!copy) {
        conf_err(p, p->line, key, "out of memory");
        return;
    }
    r = util_split_list(copy, items, CONF_LIST_MAX, &n);
    if (r < 0) {
        conf_err(p, p->line, key,
                 r == -E2BIG ? "more than %d items" : "an empty item (expected NAME, NAME, ...)",
                 CONF_LIST_MAX);
        free(copy);
        return;
    }
    l->items = calloc((size_t)n, sizeof(*l->items));
    for (int i = 0; l->items && i < n; i++) {
        for (const char *c = items[i]; *c; c++) {
            if ((unsigned char)*c <= ' ' || *c == 0x7f || *c == '"' || *c == '\\') {
                conf_err(p, p->line, key, "'%s' has a blank, quote or control character", items[i]);
                l->n = i;
                free(copy);
                return;
            }
        }
        if (path && (items[i][0] != '/' || strncmp(items[i], "/v1/", 4) != 0)) {
            conf_err(p, p->line, key, "'%s' is not a /v1/ path (expected e.g. /v1/audio/*)",
                     items[i]);
            l->n = i;
            free(copy);
            return;
        }
        if (!(l->items[i] = strdup(items[i]))) {
            l->n = i;
            break;
        }
        l->n = i + 1;
    }
    if (!l->items || l->n < n)
        conf_err(p, p->line, key, "out of memory");
    free(copy);
}

static void conf_list_free(struct conf_list *l)
{
    for (int i = 0; i < l->n; i++)
        free(l->items[i]);
    free(l->items);
    l->items = NULL;
    l->n = 0;
}

/* model_map = public=upstream, ... */
static void conf_set_model_map(struct conf_parse *p, struct conf_backend *b, const char *val)
{
    const char *key = "model_map";
    struct conf_list l = {0};

    conf_set_list(p, key, val, &l, 0);
    if (p->err)
        goto out;
    b->model_map = calloc((size_t)l.n, sizeof(*b->model_map));
    if (!b->model_map) {
        conf_err(p, p->line, key, "out of memory");
        goto out;
    }
    for (int i = 0; i < l.n; i++) {
        char *eq = strchr(l.items[i], '=');

        if (!eq || eq == l.items[i] || !eq[1] || strchr(eq + 1, '=')) {
            conf_err(p, p->line, key, "'%s' is not public=upstream", l.items[i]);
            goto out;
        }
        for (int j = 0; j < i; j++) {
            if ((size_t)(eq - l.items[i]) == strlen(b->model_map[j].from) &&
                !strncmp(b->model_map[j].from, l.items[i], (size_t)(eq - l.items[i]))) {
                conf_err(p, p->line, key, "'%.*s' is mapped twice", (int)(eq - l.items[i]),
                         l.items[i]);
                goto out;
            }
        }
        b->model_map[i].from = strndup(l.items[i], (size_t)(eq - l.items[i]));
        b->model_map[i].to = strdup(eq + 1);
        b->n_model_map = i + 1;
        if (!b->model_map[i].from || !b->model_map[i].to) {
            conf_err(p, p->line, key, "out of memory");
            goto out;
        }
    }
out:
    conf_list_free(&l);
}

/* A price in USD per million tokens, kept as pico-USD per token. */
static void conf_set_price(struct conf_parse *p, const char *key, const char *val, uint64_t *out)
{
    int r = util_parse_decimal(val, 6, out);

    if (r < 0)
        conf_err(p, p->line, key,
                 "'%s' is %s (expected USD per million tokens, e.g. 2.50, up to 6 decimals)", val,
                 r == -ERANGE ? "too large" : "not a price");
}

static void conf_apikey_custom(struct conf_parse *p, const char *key, const char *val)
{
    struct conf_apikey *k = &p->conf->keys[p->idx];

    if (!strcmp(key, "key")) {
        char *secret;

        if (p->flags & CONF_LOAD_NO_SECRETS)
            return;
        secret = conf_secret(p, key, val, 0);
        if (!secret)
            return;
        mbedtls_sha256_ret((const unsigned char *)secret, strlen(secret), k->sha256, 0);
        memset(secret, 0, strlen(secret));
        free(secret);
    } else if (!strcmp(key, "key_sha256")) {
        size_t n = strlen(val);

        for (size_t i = 0; n == 64 && i < 64; i += 2) {
            char hex[3] = {val[i], val[i + 1], 0}, *end;
            unsigned long v = strtoul(hex, &end, 16);

            if (*end || !isxdigit((unsigned char)hex[0]))
                n = 0;
            k->sha256[i / 2] = (unsigned char)v;
        }
        if (n != 64)
            conf_err(p, p->line, key,
                     "not a SHA-256 digest (expected 64 hex digits, as `aigwctl key hash` "
                     "prints)");
    } else if (!strcmp(key, "models")) {
        conf_set_list(p, key, val, &k->models, 0);
    } else if (!strcmp(key, "expires")) {
        if (util_parse_utc_end(val, &k->expires) < 0)
            conf_err(p, p->line, key,
                     "'%s' is not a date (expected YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ, UTC)", val);
    } else if (!strcmp(key, "budget_usd")) {
        int r = util_parse_decimal(val, 9, &k->budget_nusd);

        if (r < 0 || k->budget_nusd == 0)
            conf_err(p, p->line, key, "'%s' is %s (expected USD, e.g. 25 or 12.50)", val,
                     r == -ERANGE ? "too large" : "not an amount above 0");
    } else if (!strcmp(key, "budget_period")) {
        if (!strcmp(val, "month"))
            k->budget_period = BUDGET_MONTH;
        else if (!strcmp(val, "day"))
            k->budget_period = BUDGET_DAY;
        else if (!strcmp(val, "total"))
            k->budget_period = BUDGET_TOTAL;
        else
            conf_err(p, p->line, key, "unknown period '%s' (expected day, month or total)", val);
    }
}

static void conf_model_custom(struct conf_parse *p, const char *key, const char *val)
{
    struct conf_model *m = &p->conf->models[p->idx];

    if (!strcmp(key, "alias_of")) {
        conf_copy_str(p, key, m->alias_of, sizeof(m->alias_of), val, "a model name");
        m->alias_line = p->line;
    } else if (!strcmp(key, "fallback")) {
        conf_copy_str(p, key, m->fallback, sizeof(m->fallback), val, "a model name");
        m->fallback_line = p->line;
    } else if (!strcmp(key, "price_input"))
        conf_set_price(p, key, val, &m->price_input);
    else if (!strcmp(key, "price_output"))
        conf_set_price(p, key, val, &m->price_output);
    else if (!strcmp(key, "price_cached_input"))
        conf_set_price(p, key, val, &m->price_cached_input);
    else if (!strcmp(key, "list_price_input"))
        conf_set_price(p, key, val, &m->list_price_input);
    else if (!strcmp(key, "list_price_output"))
        conf_set_price(p, key, val, &m->list_price_output);
}

/* bind = HOST:PORT | [V6]:PORT | *:PORT, numeric only: no DNS lookups at config time. */
static void conf_set_bind(struct conf_parse *p, struct conf_listen *l, const char *val)
{
    const char *key = "bind", *colon, *host = val;
    char hostbuf[INET6_ADDRSTRLEN + 1];
    struct addrinfo hints, *ai = NULL;
    size_t hlen;
    long port;
    int r;

    if (val[0] == '[') {
        const char *end = strchr(val, ']');

        if (!end || end[1] != ':') {
            conf_err(p, p->line, key, "'%s' is not an address (expected HOST:PORT or [IPv6]:PORT)",
                     val);
            return;
        }
        host = val + 1;
        hlen = (size_t)(end - host);
        colon = end + 1;
    } else {
        colon = strrchr(val, ':');
        if (!colon || memchr(val, ':', (size_t)(colon - val))) {
            conf_err(p, p->line, key,
                     "'%s' is not an address (expected HOST:PORT, *:PORT or [IPv6]:PORT)", val);
            return;
        }
        hlen = (size_t)(colon - val);
    }
    r = util_parse_int(colon + 1, 1, 65535, &port);
    if (r < 0) {
        conf_err(p, p->line, key, "'%s' has %s port '%s' (expected 1..65535)", val,
                 r == -ERANGE ? "an out of range" : "an invalid", colon + 1);
        return;
    }
    if (hlen == 0 || hlen >= sizeof(hostbuf)) {
        conf_err(p, p->line, key, "'%s' has no valid host (expected an IP address or *)", val);
        return;
    }
    memcpy(hostbuf, host, hlen);
    hostbuf[hlen] = '\0';
    if (!strcmp(hostbuf, "*"))
        strcpy(hostbuf, "0.0.0.0");

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = val[0] == '[' ? AF_INET6 : AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE;
    r = getaddrinfo(hostbuf, colon + 1, &hints, &ai);
    if (r != 0 || !ai || ai->ai_addrlen > sizeof(l->addr)) {
        conf_err(p, p->line, key,
                 "'%s' is not a numeric %s address (expected e.g. 127.0.0.1:8080, *:8080 or "
                 "[::1]:8080; host names are not resolved)",
                 val, val[0] == '[' ? "IPv6" : "IPv4");
        goto out;
    }
    memcpy(&l->addr, ai->ai_addr, ai->ai_addrlen);
    l->addr_len = ai->ai_addrlen;
    snprintf(l->bind, sizeof(l->bind), "%s", val);
out:
    if (ai)
        freeaddrinfo(ai);
}

/* [stats] bind: parsed as a [listen] bind is. */
static void conf_stats_custom(struct conf_parse *p, const char *key, const char *val)
{
    struct conf_stats *st = &p->conf->stats;
    struct conf_listen tmp;

    if (strcmp(key, "bind"))
        return;
    memset(&tmp, 0, sizeof(tmp));
    conf_set_bind(p, &tmp, val);
    if (p->err)
        return;
    p->stats_bind_line = p->line;
    st->addr = tmp.addr;
    st->addr_len = tmp.addr_len;
    snprintf(st->bind, sizeof(st->bind), "%s", tmp.bind);
}

static void conf_set_expect(struct conf_parse *p, struct conf_pool *pl, const char *val)
{
    char buf[256], *tok, *save = NULL;
    int n = 0;
    long code;

    if (strlen(val) >= sizeof(buf)) {
        conf_err(p, p->line, "check_expect", "value too long (expected up to %d status codes)",
                 CONF_EXPECT_MAX);
        return;
    }
    strcpy(buf, val);
    for (tok = strtok_r(buf, ", \t", &save); tok; tok = strtok_r(NULL, ", \t", &save)) {
        int r = util_parse_int(tok, 100, 599, &code);

        if (r < 0) {
            conf_err(p, p->line, "check_expect",
                     "'%s' %s (expected HTTP statuses 100..599, e.g. "
                     "200 or 200,204)",
                     tok, r == -ERANGE ? "is out of range 100..599" : "is not a status code");
            return;
        }
        if (n == CONF_EXPECT_MAX) {
            conf_err(p, p->line, "check_expect", "'%s' lists more than %d statuses", val,
                     CONF_EXPECT_MAX);
            return;
        }
        pl->check_expect[n++] = (int)code;
    }
    if (n == 0) {
        conf_err(p, p->line, "check_expect", "empty value (expected HTTP statuses, e.g. 200,204)");
        return;
    }
    pl->n_check_expect = n;
}

/* An HTTP header name: one or more RFC 9110 token characters. */
static int conf_header_name_ok(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              strchr("!#$%&'*+-.^_`|~", *s)))
            return 0;
    return 1;
}

/* hash_key = header:NAME | json:FIELD. Whether balance = hash is checked at the section's end:
 * balance may come after it. */
static void conf_set_hash_key(struct conf_parse *p, struct conf_pool *pl, const char *val)
{
    const char *key = "hash_key", *name;
    enum conf_hash_src src;

    if (!strncmp(val, "header:", 7)) {
        src = HASH_HEADER;
        name = val + 7;
        if (!conf_header_name_ok(name)) {
            conf_err(p, p->line, key,
                     "'%s' has an invalid header name (expected header:NAME, NAME a header "
                     "token such as x-session-id)",
                     val);
            return;
        }
    } else if (!strncmp(val, "json:", 5)) {
        src = HASH_JSON;
        name = val + 5;
        if (!name[0] || name[strspn(name, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                          "0123456789_.-")]) {
            conf_err(p, p->line, key,
                     "'%s' has an invalid field name (expected json:FIELD, FIELD of A-Z a-z 0-9 "
                     "_ . - such as prompt_cache_key)",
                     val);
            return;
        }
    } else {
        conf_err(p, p->line, key,
                 "'%s' is not a hash key (expected header:NAME or json:FIELD, e.g. "
                 "header:x-session-id or json:prompt_cache_key)",
                 val);
        return;
    }
    if (strlen(name) >= sizeof(pl->hash_name)) {
        conf_err(p, p->line, key, "name too long (expected 1..%zu characters after '%.*s')",
                 sizeof(pl->hash_name) - 1, (int)(name - val), val);
        return;
    }
    pl->hash_src = src;
    memcpy(pl->hash_name, name, strlen(name) + 1);
}

/* fail_on / retry_on: condition names and statuses 400..599, comma or blank separated. A 429 is
 * a retry condition only: rate limiting says nothing about a backend's health. */
static void conf_set_conds(struct conf_parse *p, const char *key, const char *val, int allow_429,
                           uint32_t *bits, int *statuses, int *n_statuses)
{
    static const struct {
        const char *name;
        uint32_t bit;
    } names[] = {
        {"connect-failure", COND_CONNECT}, {"tls", COND_TLS},     {"stale-conn", COND_STALE},
        {"timeout", COND_TIMEOUT},         {"reset", COND_RESET}, {"5xx", COND_5XX},
    };
    const char *expect = allow_429 ? "connect-failure, tls, stale-conn, timeout, reset, 5xx, 429 "
                                     "or a status 400..599"
                                   : "connect-failure, tls, stale-conn, timeout, reset, 5xx or a "
                                     "status 400..599 other than 429";
    char buf[256], *tok, *save = NULL;
    int st[CONF_STATUS_MAX], n = 0, any = 0;
    uint32_t b = 0;

    if (strlen(val) >= sizeof(buf)) {
        conf_err(p, p->line, key, "value too long (expected up to %zu characters)",
                 sizeof(buf) - 1);
        return;
    }
    strcpy(buf, val);
    for (tok = strtok_r(buf, ", \t", &save); tok; tok = strtok_r(NULL, ", \t", &save)) {
        size_t i;
        long code;
        int r;

        any = 1;
        for (i = 0; i < ARRAY_SIZE(names); i++)
            if (!strcasecmp(tok, names[i].name))
                break;
        if (i < ARRAY_SIZE(names)) {
            b |= names[i].bit;
            continue;
        }
        r = util_parse_int(tok, 400, 599, &code);
        if (r == -EINVAL) {
            conf_err(p, p->line, key, "unknown condition '%s' (expected %s)", tok, expect);
            return;
        }
        if (r < 0) {
            conf_err(p, p->line, key, "status '%s' is out of range 400..599 (expected %s)", tok,
                     expect);
            return;
        }
        if (code == 429) {
            if (!allow_429) {
                conf_err(p, p->line, key,
                         "429 may not be listed: a 429 is never a failure (the backend is "
                         "rate limiting, not failing; retry it with retry_on)");
                return;
            }
            b |= COND_429;
            continue;
        }
        for (i = 0; i < (size_t)n; i++)
            if (st[i] == (int)code)
                break;
        if (i < (size_t)n)
            continue;
        if (n == CONF_STATUS_MAX) {
            conf_err(p, p->line, key, "'%s' lists more than %d statuses", val, CONF_STATUS_MAX);
            return;
        }
        st[n++] = (int)code;
    }
    if (!any) {
        conf_err(p, p->line, key, "empty value (expected a list of %s)", expect);
        return;
    }
    *bits = b;
    memcpy(statuses, st, (size_t)n * sizeof(*st));
    *n_statuses = n;
}

static void conf_set_backoff(struct conf_parse *p, struct conf_pool *pl, const char *val)
{
    int r = util_parse_backoff(val, &pl->retry_backoff_base_ms, &pl->retry_backoff_max_ms,
                               &pl->retry_backoff_mult_x100);

    if (r == -ERANGE)
        conf_err(p, p->line, "retry_backoff",
                 "'%s' is out of range (expected BASE <= MAX and a multiplier x1..x100, e.g. "
                 "25ms..1s x2)",
                 val);
    else if (r < 0)
        conf_err(p, p->line, "retry_backoff",
                 "'%s' is not a back-off (expected BASE..MAX xMULT, two durations and a "
                 "multiplier with up to 2 decimals, e.g. 25ms..1s x2 or 100ms..5s x1.5)",
                 val);
}

static int conf_copy_str(struct conf_parse *p, const char *key, char *dst, size_t len,
                         const char *val, const char *expect)
{
    if (!val[0] || strlen(val) >= len) {
        conf_err(p, p->line, key, "%s value (expected %s of 1..%zu characters)",
                 val[0] ? "too long a" : "empty", expect, len - 1);
        return -EINVAL;
    }
    memcpy(dst, val, strlen(val) + 1);
    return 0;
}

/* user, group, pidfile, admin_group: names are looked up now, so that a name the host does not
 * know is an error with its line (and `aigw -t` finds it), not a failed start. */
static void conf_global_deploy(struct conf_parse *p, const char *key, const char *val)
{
    struct conf_global *g = &p->conf->global;

    if (!strcmp(key, "user")) {
        struct passwd *pw;

        if (conf_copy_str(p, key, g->user, sizeof(g->user), val, "a user name") < 0)
            return;
        errno = 0;
        pw = getpwnam(val);
        if (!pw) {
            conf_err(p, p->line, key, "unknown user '%s'%s%s", val, errno ? ": " : "",
                     errno ? strerror(errno) : "");
            return;
        }
        g->uid = pw->pw_uid;
        if (!g->group[0]) /* a group = line, before or after, takes precedence */
            g->gid = pw->pw_gid;
    } else if (!strcmp(key, "group") || !strcmp(key, "admin_group")) {
        int admin = key[0] == 'a';
        char *dst = admin ? g->admin_group : g->group;
        struct group *gr;

        if (conf_copy_str(p, key, dst, CONF_NAME_MAX, val, "a group name") < 0)
            return;
        errno = 0;
        gr = getgrnam(val);
        if (!gr) {
            conf_err(p, p->line, key, "unknown group '%s'%s%s", val, errno ? ": " : "",
                     errno ? strerror(errno) : "");
            return;
        }
        if (admin)
            g->admin_gid = gr->gr_gid;
        else
            g->gid = gr->gr_gid;
    } else if (!strcmp(key, "pidfile")) {
        char *path = conf_path_resolve(p, val);

        if (!path)
            conf_err(p, p->line, key, "out of memory");
        else
            conf_copy_str(p, key, g->pidfile, sizeof(g->pidfile), path, "a file path");
        free(path);
    }
}

static void conf_global_custom(struct conf_parse *p, const char *key, const char *val)
{
    struct conf_global *g = &p->conf->global;

    if (!strcmp(key, "workers")) {
        long n;
        int r;

        if (!strcmp(val, "auto")) {
            long cpus = sysconf(_SC_NPROCESSORS_ONLN);

            g->workers = cpus < 1 ? 1 : cpus > CONF_WORKERS_MAX ? CONF_WORKERS_MAX : (int)cpus;
            return;
        }
        r = util_parse_int(val, 1, CONF_WORKERS_MAX, &n);
        if (r < 0) {
            conf_err(p, p->line, key, "'%s' %s 1..%d (expected auto or 1..%d)", val,
                     r == -ERANGE ? "is out of range" : "is not a number in", CONF_WORKERS_MAX,
                     CONF_WORKERS_MAX);
            return;
        }
        g->workers = (int)n;
    } else if (!strcmp(key, "admin_socket")) {
        conf_copy_str(p, key, g->admin_socket, sizeof(g->admin_socket), val, "a unix socket path");
    } else if (!strcmp(key, "log_level")) {
        static const char *const names[] = {"err", "warn", "info", "debug"};

        for (size_t i = 0; i < ARRAY_SIZE(names); i++) {
            if (!strcmp(val, names[i])) {
                g->log_level = (enum log_level)i;
                return;
            }
        }
        conf_err(p, p->line, key, "unknown level '%s' (expected err, warn, info or debug)", val);
    } else if (!strcmp(key, "state_file")) {
        char *path = conf_path_resolve(p, val);

        if (!path)
            conf_err(p, p->line, key, "out of memory");
        else
            conf_copy_str(p, key, g->state_file, sizeof(g->state_file), path, "a file path");
        free(path);
    } else if (!strcmp(key, "access_log")) {
        char *path;

        g->access_log_path[0] = '\0';
        if (!strcmp(val, "off")) {
            g->access_log = 0;
        } else if (!strcmp(val, "stderr")) {
            g->access_log = 2;
        } else if (!*val) {
            conf_err(p, p->line, key, "empty (expected a file path, stderr or off)");
        } else if (!(path = conf_path_resolve(p, val))) {
            conf_err(p, p->line, key, "out of memory");
        } else {
            g->access_log = 1;
            conf_copy_str(p, key, g->access_log_path, sizeof(g->access_log_path), path,
                          "a file path");
            free(path);
        }
    } else {
        conf_global_deploy(p, key, val);
    }
}

static void conf_listen_custom(struct conf_parse *p, const char *key, const char *val)
{
    struct conf_listen *l = &p->conf->listens[p->idx];

    if (!strcmp(key, "bind")) {
        conf_set_bind(p, l, val);
        p->listen_refs[p->idx].bind_line = p->line;
    } else if (!strcmp(key, "pool")) {
        struct conf_ref *ref = &p->listen_refs[p->idx];

        if (conf_copy_str(p, key, ref->pool, sizeof(ref->pool), val, "a pool name") == 0)
            ref->line = p->line;
    }
}

static void conf_pool_custom(struct conf_parse *p, const char *key, const char *val)
{
    struct conf_pool *pl = &p->conf->pools[p->idx];

    if (!strcmp(key, "balance")) {
        int algo = balancer_algo_find(val);

        if (algo >= 0) {
            pl->balance = (enum balance_algo)algo;
            return;
        }
        conf_err(p, p->line, key, "unknown algorithm '%s' (expected one of %s)", val,
                 balancer_algo_list());
    } else if (!strcmp(key, "check_method")) {
        if (!strcmp(val, "GET") || !strcmp(val, "HEAD")) {
            pl->check_method_head = val[0] == 'H';
            return;
        }
        conf_err(p, p->line, key, "unknown method '%s' (expected GET or HEAD)", val);
    } else if (!strcmp(key, "check_path")) {
        if (val[0] != '/' || strpbrk(val, " \t\r\n")) {
            conf_err(p, p->line, key, "'%s' is not a path (expected a path starting with '/')",
                     val);
            return;
        }
        conf_copy_str(p, key, pl->check_path, sizeof(pl->check_path), val, "a path");
    } else if (!strcmp(key, "check_expect")) {
        conf_set_expect(p, pl, val);
    } else if (!strcmp(key, "hash_key")) {
        conf_set_hash_key(p, pl, val);
    } else if (!strcmp(key, "fail_on")) {
        conf_set_conds(p, key, val, 0, &pl->fail_on, pl->fail_on_status, &pl->n_fail_on_status);
    } else if (!strcmp(key, "retry_on")) {
        conf_set_conds(p, key, val, 1, &pl->retry_on, pl->retry_on_status, &pl->n_retry_on_status);
    } else if (!strcmp(key, "retry_backoff")) {
        conf_set_backoff(p, pl, val);
    } else if (!strcmp(key, "models")) {
        conf_set_list(p, key, val, &pl->models, 0);
    } else if (!strcmp(key, "paths")) {
        conf_set_list(p, key, val, &pl->paths, 1);
    }
}

static void conf_backend_custom(struct conf_parse *p, const char *key, const char *val)
{
    struct conf_backend *b = &p->conf->backends[p->idx];

    if (!strcmp(key, "pool")) {
        struct conf_ref *ref = &p->backend_refs[p->idx];

        if (conf_copy_str(p, key, ref->pool, sizeof(ref->pool), val, "a pool name") == 0)
            ref->line = p->line;
    } else if (!strcmp(key, "url")) {
        const char *why;

        if (url_parse(val, &b->url, &why) < 0) {
            /* user@... may carry a password: don't echo it. */
            if (strchr(val, '@'))
                conf_err(p, p->line, key,
                         "invalid URL: %s (expected http[s]://host[:port][/prefix])", why);
            else
                conf_err(p, p->line, key,
                         "'%s' is not a valid URL: %s (expected http[s]://host[:port][/prefix])",
                         val, why);
        }
    } else if (!strcmp(key, "api_key")) {
        conf_set_api_key(p, b, val);
    } else if (!strcmp(key, "ca_file")) {
        char *path;

        if (!val[0]) {
            conf_err(p, p->line, key, "empty value (expected the path of a CA bundle)");
            return;
        }
        path = conf_path_resolve(p, val);
        if (!path) {
            conf_err(p, p->line, key, "out of memory");
            return;
        }
        if (access(path, R_OK) == -1) {
            conf_err(p, p->line, key, "cannot read %s: %s", path, strerror(errno));
            free(path);
            return;
        }
        free(b->ca_file);
        b->ca_file = path;
    } else if (!strcmp(key, "keepalive")) {
        long n;
        int r = util_parse_bool(val);

        /* "yes" means the default number of connections, "no" none at all. */
        if (r >= 0 && strcmp(val, "1") != 0) {
            b->keepalive = r ? 32 : 0;
            return;
        }
        r = util_parse_int(val, 0, 4096, &n);
        if (r < 0) {
            conf_err(p, p->line, key, "'%s' %s (expected yes, no or a count 0..4096)", val,
                     r == -ERANGE ? "is out of range 0..4096" : "is not a number");
            return;
        }
        b->keepalive = (int)n;
    } else if (!strcmp(key, "model_map")) {
        conf_set_model_map(p, b, val);
    }
}

/* ---- sections ---- */

/* Section names: A-Z a-z 0-9 _ . -, and for models also / : @ (org/model:tag@version). */
static int conf_name_ok(const char *s, int model)
{
    size_t n = 0;

    for (; s[n]; n++) {
        char c = s[n];

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == '-' ||
              (model && (c == '/' || c == ':' || c == '@' || c == '*' || c == '?'))))
            return 0;
    }
    return n > 0 && n < CONF_NAME_MAX;
}

/* Makes room for element n in *a (and in the parallel array *b when given); zeroes it. */
/* ---- [cluster] ---- */

const char *conf_cluster_fallback_str(enum conf_cluster_fallback f)
{
    switch (f) {
    case CLUSTER_FALLBACK_LOCAL_SHARE:
        return "local_share";
    case CLUSTER_FALLBACK_OPEN:
        return "open";
    case CLUSTER_FALLBACK_CLOSED:
        return "closed";
    }
    return "?";
}

/* redis = redis://HOST[:PORT][/DB] | unix:PATH[?db=N]. A password in the URL is refused: it would
 * be shown wherever the address is (logs, show cluster); redis_password reads it from elsewhere. */
static void conf_set_redis(struct conf_parse *p, struct conf_cluster *cl, const char *val)
{
    const char *expect = "expected redis://HOST:PORT[/DB] or unix:PATH[?db=N]";
    long n;

    if (strlen(val) >= sizeof(cl->redis)) {
        conf_err(p, p->line, "redis", "too long (at most %zu characters)", sizeof(cl->redis) - 1);
        return;
    }
    if (strchr(val, '@')) {
        conf_err(p, p->line, "redis",
                 "a password in the address is not accepted (it would show in logs; "
                 "expected redis_password = env:VAR or file:PATH)");
        return;
    }
    snprintf(cl->redis, sizeof(cl->redis), "%s", val);
    cl->redis_port = 6379;
    cl->redis_db = 0;
    if (!strncmp(val, "unix:", 5)) {
        const char *path = val + 5, *q = strchr(path, '?');
        size_t len = q ? (size_t)(q - path) : strlen(path);
        char *abs;

        cl->redis_unix = 1;
        if (!len) {
            conf_err(p, p->line, "redis", "'unix:' names no socket (%s)", expect);
            return;
        }
        if (q) {
            if (strncmp(q, "?db=", 4) || util_parse_int(q + 4, 0, 1000000, &n) < 0) {
                conf_err(p, p->line, "redis", "'%s' after the path is not ?db=N (%s)", q, expect);
                return;
            }
            cl->redis_db = (uint32_t)n;
        }
        {
            char rel[CONF_HOST_MAX];

            if (len >= sizeof(rel)) {
                conf_err(p, p->line, "redis", "socket path is too long");
                return;
            }
            memcpy(rel, path, len);
            rel[len] = '\0';
            abs = conf_path_resolve(p, rel);
        }
        if (!abs) {
            conf_err(p, p->line, "redis", "out of memory");
            return;
        }
        conf_copy_str(p, "redis", cl->redis_host, sizeof(cl->redis_host), abs, "a socket path");
        free(abs);
        return;
    }
    if (strncmp(val, "redis://", 8)) {
        conf_err(p, p->line, "redis", "'%s' is not a Redis address (%s)", val, expect);
        return;
    }
    {
        const char *h = val + 8, *hend, *rest;
        size_t hlen;

        cl->redis_unix = 0;
        if (*h == '[') {
            hend = strchr(h, ']');
            if (!hend) {
                conf_err(p, p->line, "redis", "'[' without ']' (%s)", expect);
                return;
            }
            h++;
            rest = hend + 1;
        } else {
            hend = h + strcspn(h, ":/");
            rest = hend;
        }
        hlen = (size_t)(hend - h);
        if (!hlen || hlen >= sizeof(cl->redis_host)) {
            conf_err(p, p->line, "redis", "'%s' has %s host (%s)", val, hlen ? "too long a" : "no",
                     expect);
            return;
        }
        memcpy(cl->redis_host, h, hlen);
        cl->redis_host[hlen] = '\0';
        if (*rest == ':') {
            char port[8];
            size_t plen = strcspn(rest + 1, "/");

            if (!plen || plen >= sizeof(port)) {
                conf_err(p, p->line, "redis", "'%s' has a bad port (%s)", val, expect);
                return;
            }
            memcpy(port, rest + 1, plen);
            port[plen] = '\0';
            if (util_parse_int(port, 1, 65535, &n) < 0) {
                conf_err(p, p->line, "redis", "port '%s' is not 1..65535", port);
                return;
            }
            cl->redis_port = (uint16_t)n;
            rest += 1 + plen;
        }
        if (*rest == '/' && rest[1]) {
            if (util_parse_int(rest + 1, 0, 1000000, &n) < 0) {
                conf_err(p, p->line, "redis", "database '%s' is not a number (%s)", rest + 1,
                         expect);
                return;
            }
            cl->redis_db = (uint32_t)n;
        } else if (*rest && strcmp(rest, "/")) {
            conf_err(p, p->line, "redis", "unexpected '%s' (%s)", rest, expect);
        }
    }
}

static void conf_cluster_custom(struct conf_parse *p, const char *key, const char *val)
{
    struct conf_cluster *cl = &p->conf->cluster;

    if (!strcmp(key, "redis")) {
        conf_set_redis(p, cl, val);
    } else if (!strcmp(key, "redis_password")) {
        if (p->flags & CONF_LOAD_NO_SECRETS)
            return;
        if (strncmp(val, "env:", 4) && strncmp(val, "file:", 5)) {
            conf_err(p, p->line, key,
                     "a password is not written in the file (expected env:VAR or file:PATH)");
            return;
        }
        free(cl->redis_password);
        cl->redis_password = conf_secret(p, key, val, 0);
    } else if (!strcmp(key, "node_name")) {
        if (!conf_name_ok(val, 0))
            conf_err(p, p->line, key,
                     "invalid name '%s' (expected 1..%d characters of A-Z a-z 0-9 _ . -)", val,
                     CONF_NAME_MAX - 1);
        else
            snprintf(cl->node_name, sizeof(cl->node_name), "%s", val);
    } else if (!strcmp(key, "cluster_fallback")) {
        for (int f = CLUSTER_FALLBACK_LOCAL_SHARE; f <= CLUSTER_FALLBACK_CLOSED; f++) {
            if (!strcmp(val, conf_cluster_fallback_str((enum conf_cluster_fallback)f))) {
                cl->fallback = (enum conf_cluster_fallback)f;
                return;
            }
        }
        conf_err(p, p->line, key, "unknown policy '%s' (expected local_share, open or closed)",
                 val);
    } else if (!strcmp(key, "key_prefix")) {
        if (!*val || !conf_secret_ok(val))
            conf_err(p, p->line, key, "'%s' is empty or has a space or control character", val);
        else
            conf_copy_str(p, key, cl->key_prefix, sizeof(cl->key_prefix), val, "a short prefix");
    }
}

static void conf_cluster_defaults(struct conf_cluster *cl)
{
    char host[256];

    memset(cl, 0, sizeof(*cl));
    cl->sync_interval_ms = 1000;
    cl->lease_ttl_ms = 10 * 1000;
    cl->fallback = CLUSTER_FALLBACK_LOCAL_SHARE;
    snprintf(cl->key_prefix, sizeof(cl->key_prefix), "aigw:");
    /* node_name defaults to the host name, cut at the first character a name may not hold */
    if (gethostname(host, sizeof(host)) == -1)
        host[0] = '\0';
    host[sizeof(host) - 1] = '\0';
    host[strspn(host, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")] = '\0';
    snprintf(cl->node_name, sizeof(cl->node_name), "%.*s", CONF_NAME_MAX - 1,
             host[0] ? host : "aigw");
}

static int conf_grow(void **a, size_t ea, void **b, size_t eb, int *cap, int n)
{
    if (n == *cap) {
        int ncap = *cap ? *cap * 2 : 4;
        void *na = realloc(*a, (size_t)ncap * ea), *nb;

        if (!na)
            return -ENOMEM;
        *a = na;
        if (b) {
            nb = realloc(*b, (size_t)ncap * eb);
            if (!nb)
                return -ENOMEM;
            *b = nb;
        }
        *cap = ncap;
    }
    memset((char *)*a + (size_t)n * ea, 0, ea);
    if (b)
        memset((char *)*b + (size_t)n * eb, 0, eb);
    return 0;
}

static int conf_key_index(const struct conf_key *keys, const char *name)
{
    for (int i = 0; keys[i].name; i++)
        if (!strcmp(keys[i].name, name))
            return i;
    return -1;
}

/* Line where key NAME of the current section was set, 0 if it was not. */
static int conf_key_line(const struct conf_parse *p, const struct conf_key *keys, const char *name)
{
    return p->key_line[conf_key_index(keys, name)];
}

/* A pool's keys that depend on each other, once all of them are read (any order in the file). */
static void conf_pool_end(struct conf_parse *p)
{
    struct conf_pool *pl = &p->conf->pools[p->idx];
    const struct conf_key *keys = conf_pool_keys;
    char a[32], b[32];
    int line;

    if (!conf_key_line(p, keys, "check_fastinter"))
        pl->check_fastinter_ms = pl->check_interval_ms;
    if (!conf_key_line(p, keys, "check_downinter"))
        pl->check_downinter_ms = pl->check_interval_ms;
    line = conf_key_line(p, keys, "hash_key");
    if (line && pl->balance != BALANCE_HASH) {
        conf_err(p, line, "hash_key", "hash_key needs balance = hash (balance is %s)",
                 balancer_algo_name(pl->balance));
        return;
    }
    if (pl->breaker_open_max_ms < pl->breaker_open_for_ms) {
        conf_fmt_ms(a, sizeof(a), pl->breaker_open_for_ms);
        conf_fmt_ms(b, sizeof(b), pl->breaker_open_max_ms);
        line = conf_key_line(p, keys, "breaker_open_max");
        if (line)
            conf_err(p, line, "breaker_open_max",
                     "%s is less than breaker_open_for = %s (expected breaker_open_max >= "
                     "breaker_open_for)",
                     b, a);
        else
            conf_err(p, conf_key_line(p, keys, "breaker_open_for"), "breaker_open_for",
                     "%s is more than breaker_open_max = %s, its default (expected "
                     "breaker_open_for <= breaker_open_max; raise breaker_open_max too)",
                     a, b);
    }
}

/* At the end of a section: report a missing required key at the section's line, check keys that
 * depend on each other, note which backend overrides were given. */
static void conf_section_end(struct conf_parse *p)
{
    struct conf_ref *ref;

    switch (p->kind) {
    case CONF_KIND_LISTEN:
        if (!conf_key_line(p, conf_listen_keys, "bind"))
            conf_err(p, p->sect_line, "bind", "missing (required, e.g. bind = 127.0.0.1:8080)");
        break;
    case CONF_KIND_POOL:
        conf_pool_end(p);
        break;
    case CONF_KIND_BACKEND:
        if (!conf_key_line(p, conf_backend_keys, "url")) {
            conf_err(p, p->sect_line, "url",
                     "missing (required, e.g. url = http://127.0.0.1:9101/v1)");
            break;
        }
        ref = &p->backend_refs[p->idx];
        ref->set_slowstart = conf_key_line(p, conf_backend_keys, "slowstart") > 0;
        ref->set_max_fails = conf_key_line(p, conf_backend_keys, "max_fails") > 0;
        ref->set_fail_timeout = conf_key_line(p, conf_backend_keys, "fail_timeout") > 0;
        break;
    case CONF_KIND_KEY: {
        int a = conf_key_line(p, conf_apikey_keys, "key");
        int b = conf_key_line(p, conf_apikey_keys, "key_sha256");

        if (!a && !b)
            conf_err(p, p->sect_line, "key",
                     "missing (required: key = env:VAR or file:PATH, or key_sha256 = HEX)");
        else if (a && b)
            conf_err(p, a > b ? a : b, a > b ? "key" : "key_sha256",
                     "key and key_sha256 both given (expected one of them)");
        else if (conf_key_line(p, conf_apikey_keys, "budget_period") &&
                 !conf_key_line(p, conf_apikey_keys, "budget_usd"))
            conf_err(p, conf_key_line(p, conf_apikey_keys, "budget_period"), "budget_period",
                     "given without budget_usd");
        break;
    }
    case CONF_KIND_CLUSTER: {
        struct conf_cluster *cl = &p->conf->cluster;

        if (!conf_key_line(p, conf_cluster_keys, "redis"))
            conf_err(p, p->sect_line, "redis",
                     "missing (required, e.g. redis = redis://127.0.0.1:6379/0)");
        else if (cl->lease_ttl_ms < 2 * cl->sync_interval_ms)
            conf_err(
                p,
                conf_key_line(p, conf_cluster_keys, "lease_ttl")
                    ? conf_key_line(p, conf_cluster_keys, "lease_ttl")
                    : conf_key_line(p, conf_cluster_keys, "sync_interval"),
                conf_key_line(p, conf_cluster_keys, "lease_ttl") ? "lease_ttl" : "sync_interval",
                "lease_ttl (%llu ms) must be at least twice sync_interval (%llu ms): a lease "
                "is renewed every sync_interval",
                (unsigned long long)cl->lease_ttl_ms, (unsigned long long)cl->sync_interval_ms);
        else
            cl->enabled = 1;
        break;
    }
    case CONF_KIND_STATS:
        if (!conf_key_line(p, conf_stats_keys, "bind"))
            conf_err(p, p->sect_line, "bind", "missing (required, e.g. bind = 127.0.0.1:8404)");
        else
            p->conf->stats.enabled = 1;
        break;
    default:
        break;
    }
}

static void conf_defaults_listen(struct conf_listen *l)
{
    l->backlog = 511;
    l->max_header_size = 16 * 1024;
    l->max_headers = 100;
    l->max_body_size = 8ull << 20;
    l->client_header_timeout_ms = 10 * 1000;
    l->client_body_timeout_ms = 30 * 1000;
    l->client_body_total_timeout_ms = 60 * 1000;
    l->keepalive_timeout_ms = 75 * 1000;
    l->pool = -1;
    l->auth = 1;
}

static void conf_defaults_pool(struct conf_pool *pl)
{
    pl->balance = BALANCE_ROUNDROBIN;
    pl->check = 1;
    pl->check_method_head = 0;
    pl->check_expect[0] = 200;
    pl->n_check_expect = 1;
    pl->check_interval_ms = 5 * 1000;
    pl->check_timeout_ms = 2 * 1000;
    pl->rise = 2;
    pl->fall = 3;
    pl->connect_timeout_ms = 5 * 1000;
    pl->first_byte_timeout_ms = 120 * 1000;
    pl->idle_timeout_ms = 120 * 1000;
    pl->pool_idle_timeout_ms = 60 * 1000;

    pl->hash_src = HASH_NONE;
    pl->hash_load_pct = 125;
    /* check_fastinter and check_downinter follow check_interval: set at the section's end. */
    pl->check_jitter_pct = 10;
    pl->degraded_latency_ms = 0;
    pl->degraded_error_pct = 0;
    pl->degraded_weight_pct = 50;
    pl->slowstart_ms = 0;

    pl->max_fails = 3;
    pl->fail_timeout_ms = 10 * 1000;
    pl->fail_on = CONF_FAIL_ON_DEFAULT;
    pl->n_fail_on_status = 0;

    pl->breaker_failures = 5;
    pl->breaker_open_for_ms = 5 * 1000;
    pl->breaker_open_max_ms = 60 * 1000;
    pl->breaker_half_open_calls = 1;
    pl->breaker_successes = 2;

    pl->retries = 1;
    pl->retry_on = CONF_RETRY_ON_DEFAULT;
    pl->n_retry_on_status = 0;
    pl->retry_backoff_base_ms = 25;
    pl->retry_backoff_max_ms = 1000;
    pl->retry_backoff_mult_x100 = 200;
    pl->retry_budget_pct = 20;
    pl->retry_budget_min = 10;
    pl->try_timeout_ms = 0;
    pl->request_timeout_ms = 0;

    pl->expose_headers = 1;
}

static void conf_defaults_backend(struct conf_backend *b)
{
    b->pool = -1;
    b->weight = 1;
    b->tls_verify = 1;
    b->keepalive = 32;
    b->backup = 0;
    b->max_conns = 0;
    /* slowstart, max_fails and fail_timeout come from the pool in conf_finish unless set. */
}

/* Handles a "[kind NAME]" line seen by the reader (inih truncates long section names, and with
 * this build never calls the handler for an empty section, so sections are tracked here). */
static void conf_section_begin(struct conf_parse *p, char *s)
{
    struct conf *c = p->conf;
    char *end = strchr(s, ']'), *kind, *name, *rest;
    enum conf_kind k = CONF_KIND_NONE;
    int dup = -1, r = 0;

    conf_section_end(p);
    if (p->err)
        return;
    p->kind = CONF_KIND_NONE;
    p->sect[0] = '\0';
    p->sect_line = p->line;
    memset(p->key_line, 0, sizeof(p->key_line));

    if (!end) {
        conf_err(p, p->line, NULL, "section header without ']' (expected [kind NAME])");
        return;
    }
    rest = end + 1 + strspn(end + 1, " \t\r\n");
    if (*rest && *rest != ';' && *rest != '#') {
        conf_err(p, p->line, NULL, "unexpected text after ']' (expected a comment or nothing)");
        return;
    }
    *end = '\0';
    kind = s + 1 + strspn(s + 1, " \t");
    name = kind + strcspn(kind, " \t");
    if (*name) {
        *name++ = '\0';
        name += strspn(name, " \t");
        for (char *t = name + strlen(name); t > name && (t[-1] == ' ' || t[-1] == '\t');)
            *--t = '\0';
    }
    for (int i = CONF_KIND_GLOBAL; i <= CONF_KIND_CLUSTER; i++)
        if (!strcmp(kind, conf_kind_names[i]))
            k = (enum conf_kind)i;
    if (k == CONF_KIND_NONE) {
        conf_err(p, p->line, NULL,
                 "unknown section [%s%s%s] (expected [global], [listen NAME], [pool NAME], "
                 "[backend NAME], [key NAME], [model NAME], [stats] or [cluster])",
                 kind, *name ? " " : "", name);
        return;
    }
    if (k == CONF_KIND_CLUSTER) {
        snprintf(p->sect, sizeof(p->sect), "cluster");
        if (*name) {
            conf_err(p, p->line, NULL, "takes no name (expected [cluster])");
            return;
        }
        if (p->conf->cluster.file_line) {
            conf_err(p, p->line, NULL, "appears twice (first at line %d)",
                     p->conf->cluster.file_line);
            return;
        }
        conf_cluster_defaults(&p->conf->cluster);
        p->conf->cluster.file_line = p->line;
        p->kind = k;
        return;
    }
    if (k == CONF_KIND_STATS) {
        snprintf(p->sect, sizeof(p->sect), "stats");
        if (*name) {
            conf_err(p, p->line, NULL, "takes no name (expected [stats])");
            return;
        }
        if (p->conf->stats.file_line) {
            conf_err(p, p->line, NULL, "appears twice (first at line %d)",
                     p->conf->stats.file_line);
            return;
        }
        p->conf->stats.file_line = p->line;
        p->kind = k;
        return;
    }
    if (k == CONF_KIND_GLOBAL) {
        snprintf(p->sect, sizeof(p->sect), "global");
        if (*name) {
            conf_err(p, p->line, NULL, "takes no name (expected [global])");
            return;
        }
        if (p->global_line) {
            conf_err(p, p->line, NULL, "appears twice (first at line %d)", p->global_line);
            return;
        }
        p->global_line = p->line;
        p->kind = k;
        return;
    }
    snprintf(p->sect, sizeof(p->sect), "%s %.*s", kind, CONF_NAME_MAX, name);
    if (!conf_name_ok(name, k == CONF_KIND_MODEL)) {
        conf_err(p, p->line, NULL,
                 "invalid name '%.*s' (expected 1..%d characters of A-Z a-z 0-9 _ . -%s)",
                 CONF_NAME_MAX, name, CONF_NAME_MAX - 1,
                 k == CONF_KIND_MODEL ? " / : @, and * ? as a glob" : "");
        return;
    }
    switch (k) {
    case CONF_KIND_LISTEN:
        for (int i = 0; i < c->n_listens; i++)
            if (!strcmp(c->listens[i].name, name))
                dup = c->listens[i].file_line;
        break;
    case CONF_KIND_POOL:
        for (int i = 0; i < c->n_pools; i++)
            if (!strcmp(c->pools[i].name, name))
                dup = c->pools[i].file_line;
        break;
    case CONF_KIND_KEY:
        for (int i = 0; i < c->n_keys; i++)
            if (!strcmp(c->keys[i].name, name))
                dup = c->keys[i].file_line;
        break;
    case CONF_KIND_MODEL:
        for (int i = 0; i < c->n_models; i++)
            if (!strcmp(c->models[i].name, name))
                dup = c->models[i].file_line;
        break;
    default:
        for (int i = 0; i < c->n_backends; i++)
            if (!strcmp(c->backends[i].name, name))
                dup = c->backends[i].file_line;
        break;
    }
    if (dup >= 0) {
        conf_err(p, p->line, NULL, "duplicate %s name (first defined at line %d)", kind, dup);
        return;
    }
    switch (k) {
    case CONF_KIND_LISTEN:
        r = conf_grow((void **)&c->listens, sizeof(*c->listens), (void **)&p->listen_refs,
                      sizeof(*p->listen_refs), &p->cap_listens, c->n_listens);
        if (r < 0)
            break;
        p->idx = c->n_listens++;
        conf_defaults_listen(&c->listens[p->idx]);
        snprintf(c->listens[p->idx].name, CONF_NAME_MAX, "%s", name);
        c->listens[p->idx].file_line = p->line;
        break;
    case CONF_KIND_POOL:
        r = conf_grow((void **)&c->pools, sizeof(*c->pools), NULL, 0, &p->cap_pools, c->n_pools);
        if (r < 0)
            break;
        p->idx = c->n_pools++;
        conf_defaults_pool(&c->pools[p->idx]);
        snprintf(c->pools[p->idx].name, CONF_NAME_MAX, "%s", name);
        c->pools[p->idx].file_line = p->line;
        break;
    case CONF_KIND_KEY:
        r = conf_grow((void **)&c->keys, sizeof(*c->keys), NULL, 0, &p->cap_keys, c->n_keys);
        if (r < 0)
            break;
        p->idx = c->n_keys++;
        snprintf(c->keys[p->idx].name, CONF_NAME_MAX, "%s", name);
        c->keys[p->idx].file_line = p->line;
        break;
    case CONF_KIND_MODEL:
        r = conf_grow((void **)&c->models, sizeof(*c->models), NULL, 0, &p->cap_models,
                      c->n_models);
        if (r < 0)
            break;
        p->idx = c->n_models++;
        snprintf(c->models[p->idx].name, CONF_NAME_MAX, "%s", name);
        c->models[p->idx].file_line = p->line;
        break;
    default:
        r = conf_grow((void **)&c->backends, sizeof(*c->backends), (void **)&p->backend_refs,
                      sizeof(*p->backend_refs), &p->cap_backends, c->n_backends);
        if (r < 0)
            break;
        p->idx = c->n_backends++;
        conf_defaults_backend(&c->backends[p->idx]);
        snprintf(c->backends[p->idx].name, CONF_NAME_MAX, "%s", name);
        c->backends[p->idx].file_line = p->line;
        break;
    }
    if (r < 0) {
        conf_err(p, p->line, NULL, "out of memory");
        return;
    }
    p->kind = k;
}

/* inih handler: one "key = value" of the current section (sections are tracked by the reader). */
static int conf_handler(void *user, const char *section, const char *key, const char *val)
{
    struct conf_parse *p = user;
    const struct conf_key *keys = conf_kind_keys[p->kind];
    const struct conf_key *k;
    char known[1024];
    size_t len = 0;
    void *obj = NULL;
    int ki;

    (void)section;
    if (p->err)
        return 0;
    if (!p->sect[0]) {
        conf_err(p, p->line, key,
                 "outside any section (expected [global], [listen NAME], [pool NAME], "
                 "[backend NAME], [key NAME], [model NAME], [stats] or [cluster] before it)");
        return 0;
    }
    if (!keys) /* the section itself was bad: already reported */
        return 0;
    for (ki = 0, k = keys; k->name; k++, ki++)
        if (!strcmp(k->name, key))
            break;
    if (!k->name) {
        if (p->kind == CONF_KIND_POOL && !strcmp(key, "idle_timeout")) {
            conf_err(p, p->line, key, "unknown key (renamed to stream_idle_timeout)");
            return 0;
        }
        known[0] = '\0';
        for (k = keys; k->name; k++)
            len += (size_t)snprintf(known + len, len < sizeof(known) ? sizeof(known) - len : 0,
                                    "%s%s", k == keys ? "" : ", ", k->name);
        conf_err(p, p->line, key, "unknown key (expected one of %s)", known);
        return 0;
    }
    if (p->key_line[ki]) {
        conf_err(p, p->line, key, "set twice (first at line %d)", p->key_line[ki]);
        return 0;
    }
    p->key_line[ki] = p->line;

    switch (p->kind) {
    case CONF_KIND_GLOBAL:
        obj = &p->conf->global;
        if (k->type == CONF_T_CUSTOM)
            conf_global_custom(p, key, val);
        break;
    case CONF_KIND_LISTEN:
        obj = &p->conf->listens[p->idx];
        if (k->type == CONF_T_CUSTOM)
            conf_listen_custom(p, key, val);
        break;
    case CONF_KIND_POOL:
        obj = &p->conf->pools[p->idx];
        if (k->type == CONF_T_CUSTOM)
            conf_pool_custom(p, key, val);
        break;
    case CONF_KIND_BACKEND:
        obj = &p->conf->backends[p->idx];
        if (k->type == CONF_T_CUSTOM)
            conf_backend_custom(p, key, val);
        break;
    case CONF_KIND_KEY:
        obj = &p->conf->keys[p->idx];
        if (k->type == CONF_T_CUSTOM)
            conf_apikey_custom(p, key, val);
        break;
    case CONF_KIND_MODEL:
        obj = &p->conf->models[p->idx];
        if (k->type == CONF_T_CUSTOM)
            conf_model_custom(p, key, val);
        break;
    case CONF_KIND_STATS:
        conf_stats_custom(p, key, val);
        break;
    case CONF_KIND_CLUSTER:
        obj = &p->conf->cluster;
        if (k->type == CONF_T_CUSTOM)
            conf_cluster_custom(p, key, val);
        break;
    default:
        break;
    }
    if (k->type != CONF_T_CUSTOM && obj)
        conf_set_typed(p, k, obj, val);
    return p->err ? 0 : 1;
}

/* inih reader: hands inih one line at a time so the handler knows the line number, strips
 * leading blanks (this inih build would take an indented line for a continuation of the previous
 * value) and handles section headers itself. Returning NULL stops the parse after an error. */
static char *conf_reader(char *str, int num, void *stream)
{
    struct conf_parse *p = stream;
    ssize_t n;
    char *s;
    size_t len;

    if (p->err)
        return NULL;
    n = getline(&p->buf, &p->cap, p->f);
    if (n == -1)
        return NULL;
    p->line++;
    p->bytes += (uint64_t)n;
    if (p->bytes > CONF_FILE_MAX) {
        conf_err(p, p->line, NULL, "file is larger than %u MB", CONF_FILE_MAX >> 20);
        return NULL;
    }
    s = p->buf;
    if ((size_t)n != strlen(s)) {
        conf_err(p, p->line, NULL, "line contains a NUL byte");
        return NULL;
    }
    if (p->line == 1 && !strncmp(s, "\xEF\xBB\xBF", 3))
        s += 3; /* UTF-8 byte order mark */
    s += strspn(s, " \t");
    if (*s == '[') {
        conf_section_begin(p, s);
        if (p->err)
            return NULL;
        /* inih only needs to see a section line; the name it keeps is never used. */
        s = "[s]\n";
    }
    len = strlen(s);
    if (len >= (size_t)num) {
        conf_err(p, p->line, NULL, "line is longer than %d characters", num - 2);
        return NULL;
    }
    memcpy(str, s, len + 1);
    return str;
}

/* Two binds collide when they share family and port and an address (a wildcard covers all). */
static int conf_addr_overlap(const struct conf_listen *a, const struct conf_listen *b)
{
    if (a->addr.ss_family != b->addr.ss_family)
        return 0;
    if (a->addr.ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)&a->addr, *y = (const void *)&b->addr;

        return x->sin_port == y->sin_port &&
               (x->sin_addr.s_addr == y->sin_addr.s_addr || x->sin_addr.s_addr == INADDR_ANY ||
                y->sin_addr.s_addr == INADDR_ANY);
    }
    if (a->addr.ss_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const void *)&a->addr, *y = (const void *)&b->addr;

        return x->sin6_port == y->sin6_port &&
               (IN6_ARE_ADDR_EQUAL(&x->sin6_addr, &y->sin6_addr) ||
                IN6_IS_ADDR_UNSPECIFIED(&x->sin6_addr) || IN6_IS_ADDR_UNSPECIFIED(&y->sin6_addr));
    }
    return 0;
}

/* Whether model name is one the config knows: a [model] or a name some pool's models match. */
static int conf_model_known(const struct conf *c, const char *name)
{
    return conf_model_find(c, name) >= 0 || conf_model_pool(c, name, strlen(name)) >= 0;
}

static const struct conf *digest_conf; /* qsort has no context argument */

static int by_digest(const void *a, const void *b)
{
    const struct conf_apikey *x = &digest_conf->keys[*(const int *)a],
                             *y = &digest_conf->keys[*(const int *)b];
    int d = memcmp(x->sha256, y->sha256, 32);
    return d ? d : x->file_line - y->file_line;
}

/* Two [key]s with one digest: a client would get one of them, never the other's limits. */
static void conf_finish_keys(struct conf_parse *p)
{
    struct conf *c = p->conf;
    int *order;

    if (c->n_keys < 2 || (p->flags & CONF_LOAD_NO_SECRETS))
        return;
    order = malloc((size_t)c->n_keys * sizeof(*order));
    if (!order) {
        conf_err(p, 0, NULL, "out of memory");
        return;
    }
    for (int i = 0; i < c->n_keys; i++)
        order[i] = i;
    digest_conf = c;
    qsort(order, (size_t)c->n_keys, sizeof(*order), by_digest);
    for (int i = 1; i < c->n_keys; i++) {
        const struct conf_apikey *a = &c->keys[order[i - 1]], *b = &c->keys[order[i]];

        if (memcmp(a->sha256, b->sha256, 32) == 0) {
            snprintf(p->sect, sizeof(p->sect), "key %s", b->name);
            conf_err(p, b->file_line, NULL, "the same key as [key %s] (line %d)", a->name,
                     a->file_line);
            break;
        }
    }
    free(order);
}

/* [model] references (alias_of, fallback) and whether every model has a pool to go to. */
static void conf_finish_models(struct conf_parse *p)
{
    struct conf *c = p->conf;

    for (int i = 0; i < c->n_pools; i++)
        c->route_by_model |= c->pools[i].models.n > 0;
    for (int i = 0; i < c->n_models; i++) {
        const struct conf_model *m = &c->models[i];

        snprintf(p->sect, sizeof(p->sect), "model %s", m->name);
        if (m->alias_of[0]) {
            int t = conf_model_find(c, m->alias_of);

            if (!strcmp(m->alias_of, m->name)) {
                conf_err(p, m->alias_line, "alias_of", "names the model itself");
                return;
            }
            if (t >= 0 && c->models[t].alias_of[0]) {
                conf_err(p, m->alias_line, "alias_of",
                         "'%s' is itself an alias (of '%s'): name the model it serves", m->alias_of,
                         c->models[t].alias_of);
                return;
            }
            if (c->route_by_model && !conf_model_known(c, m->alias_of)) {
                conf_err(p, m->alias_line, "alias_of",
                         "'%s' is not a [model] and no pool's models match it", m->alias_of);
                return;
            }
        } else if (c->route_by_model && !strpbrk(m->name, "*?") &&
                   conf_model_pool(c, m->name, strlen(m->name)) < 0) {
            conf_err(p, m->file_line, NULL,
                     "no pool serves it (expected a [pool] whose models match '%s', or alias_of)",
                     m->name);
            return;
        }
        if (m->fallback[0]) {
            if (!strcmp(m->fallback, m->name)) {
                conf_err(p, m->fallback_line, "fallback", "names the model itself");
                return;
            }
            if (!conf_model_known(c, m->fallback)) {
                conf_err(p, m->fallback_line, "fallback",
                         "'%s' is not a [model] and no pool's models match it", m->fallback);
                return;
            }
        }
    }
    p->sect[0] = '\0';
}

/* Resolves pool names, checks the cross-section rules and groups backends by pool. */
static void conf_finish(struct conf_parse *p)
{
    struct conf *c = p->conf;
    struct conf_backend *sorted;
    char pools[256];
    size_t len = 0;
    int n = 0;

    if (c->n_listens == 0) {
        conf_err(p, 0, NULL, "no [listen NAME] section (expected at least one)");
        return;
    }
    if (c->n_pools == 0) {
        conf_err(p, 0, NULL, "no [pool NAME] section (expected at least one)");
        return;
    }
    if (c->n_backends == 0) {
        conf_err(p, 0, NULL, "no [backend NAME] section (expected at least one)");
        return;
    }
    pools[0] = '\0';
    for (int i = 0; i < c->n_pools; i++)
        len += (size_t)snprintf(pools + len, len < sizeof(pools) ? sizeof(pools) - len : 0, "%s%s",
                                i ? ", " : "", c->pools[i].name);

    for (int i = 0; i < c->n_backends; i++) {
        struct conf_backend *b = &c->backends[i];
        struct conf_ref *ref = &p->backend_refs[i];

        snprintf(p->sect, sizeof(p->sect), "backend %s", b->name);
        if (!ref->pool[0]) {
            if (c->n_pools > 1) {
                conf_err(p, b->file_line, "pool",
                         "missing (required when there are several pools: %s)", pools);
                return;
            }
            b->pool = 0;
        } else if ((b->pool = conf_pool_find(c, ref->pool)) < 0) {
            conf_err(p, ref->line, "pool", "unknown pool '%s' (expected one of %s)", ref->pool,
                     pools);
            return;
        }
        /* Overrides not given take the pool's values. */
        if (!ref->set_slowstart)
            b->slowstart_ms = c->pools[b->pool].slowstart_ms;
        if (!ref->set_max_fails)
            b->max_fails = c->pools[b->pool].max_fails;
        if (!ref->set_fail_timeout)
            b->fail_timeout_ms = c->pools[b->pool].fail_timeout_ms;
        b->name_hash = balancer_hash(b->name, strlen(b->name));
    }
    for (int i = 0; i < c->n_listens; i++) {
        struct conf_listen *l = &c->listens[i];
        struct conf_ref *ref = &p->listen_refs[i];

        snprintf(p->sect, sizeof(p->sect), "listen %s", l->name);
        if (!ref->pool[0]) {
            l->pool = 0;
        } else if ((l->pool = conf_pool_find(c, ref->pool)) < 0) {
            conf_err(p, ref->line, "pool", "unknown pool '%s' (expected one of %s)", ref->pool,
                     pools);
            return;
        }
        for (int j = 0; j < i; j++) {
            if (conf_addr_overlap(&c->listens[j], l)) {
                conf_err(p, ref->bind_line, "bind",
                         "%s conflicts with [listen %s] bind = %s (line %d)", l->bind,
                         c->listens[j].name, c->listens[j].bind, c->listens[j].file_line);
                return;
            }
        }
    }
    if (c->stats.enabled) {
        struct conf_listen st;

        memset(&st, 0, sizeof(st));
        st.addr = c->stats.addr;
        snprintf(p->sect, sizeof(p->sect), "stats");
        for (int j = 0; j < c->n_listens; j++) {
            if (conf_addr_overlap(&c->listens[j], &st)) {
                conf_err(p, p->stats_bind_line, "bind",
                         "%s conflicts with [listen %s] bind = %s (line %d)", c->stats.bind,
                         c->listens[j].name, c->listens[j].bind, c->listens[j].file_line);
                return;
            }
        }
    }

    /* Stable grouping by pool: each pool's backends contiguous, in file order. */
    sorted = malloc((size_t)c->n_backends * sizeof(*sorted));
    if (!sorted) {
        conf_err(p, 0, NULL, "out of memory");
        return;
    }
    for (int i = 0; i < c->n_pools; i++) {
        struct conf_pool *pl = &c->pools[i];
        int primaries = 0;

        pl->first_backend = n;
        for (int j = 0; j < c->n_backends; j++)
            if (c->backends[j].pool == i)
                sorted[n++] = c->backends[j];
        pl->n_backends = n - pl->first_backend;
        if (pl->n_backends == 0) {
            free(sorted);
            p->sect[0] = '\0';
            snprintf(p->sect, sizeof(p->sect), "pool %s", pl->name);
            conf_err(p, pl->file_line, NULL,
                     "has no backend (expected at least one [backend NAME] with pool = %s)",
                     pl->name);
            return;
        }
        for (int j = pl->first_backend; j < n; j++)
            primaries += !sorted[j].backup;
        if (primaries == 0) {
            free(sorted);
            snprintf(p->sect, sizeof(p->sect), "pool %s", pl->name);
            conf_err(p, pl->file_line, NULL,
                     "has no primary backend (every backend of the pool has backup = yes; "
                     "expected at least one with backup = no)");
            return;
        }
    }
    free(c->backends);
    c->backends = sorted;
    conf_finish_models(p);
    if (!p->err)
        conf_finish_keys(p);
}

static void conf_global_defaults(struct conf_global *g)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);

    g->workers = cpus < 1 ? 1 : cpus > CONF_WORKERS_MAX ? CONF_WORKERS_MAX : (int)cpus;
    snprintf(g->admin_socket, sizeof(g->admin_socket), "aigw.sock");
    g->log_level = LOG_LVL_INFO;
    g->hard_stop_after_ms = 30 * 1000;
    g->state_interval_ms = 5 * 1000;
    g->default_max_tokens = 4096;
    g->uid = g->gid = g->admin_gid = -1;
    g->access_log_buffer = 64 * 1024;
}

/* Opens the config file for reading. Only a regular file of at most CONF_FILE_MAX bytes is
 * taken: /dev/zero, a FIFO nobody writes to or a huge file would otherwise hang the check or
 * eat memory (O_NONBLOCK: opening a FIFO does not wait for a writer). On failure sets *ret to
 * -errno and *err to "FILE: why". */
static FILE *conf_open(const char *path, int *ret, char **err)
{
    struct stat st;
    const char *why = NULL;
    FILE *f = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);

    if (fd == -1) {
        *ret = -errno;
        why = strerror(errno);
    } else if (fstat(fd, &st) == -1) {
        *ret = -errno;
        why = strerror(errno);
    } else if (!S_ISREG(st.st_mode)) {
        *ret = -EINVAL;
        why = S_ISDIR(st.st_mode) ? "is a directory" : "not a regular file";
    } else if ((uint64_t)st.st_size > CONF_FILE_MAX) {
        *ret = -EFBIG;
        if (asprintf(err, "%s: file is larger than %u MB", path, CONF_FILE_MAX >> 20) < 0)
            *err = NULL;
    } else if (!(f = fdopen(fd, "r"))) {
        *ret = -errno;
        why = strerror(errno);
    }
    if (f)
        return f;
    if (fd != -1)
        close(fd);
    if (why && asprintf(err, "%s: cannot open: %s", path, why) < 0)
        *err = NULL;
    return NULL;
}

int conf_load(const char *path, struct conf **out, char **err)
{
    return conf_load_flags(path, 0, out, err);
}

int conf_load_flags(const char *path, unsigned flags, struct conf **out, char **err)
{
    struct conf_parse p;
    struct conf *c;
    const char *slash;
    int ret = 0, r;

    *out = NULL;
    *err = NULL;
    memset(&p, 0, sizeof(p));
    p.path = path;
    p.flags = flags;
    c = calloc(1, sizeof(*c));
    if (!c || !(c->path = strdup(path))) {
        free(c);
        *err = strdup("out of memory");
        return -ENOMEM;
    }
    p.conf = c;
    conf_global_defaults(&c->global);

    slash = strrchr(path, '/');
    if (slash)
        p.dir = strndup(path, slash == path ? 1 : (size_t)(slash - path));

    p.f = conf_open(path, &ret, err);
    if (!p.f)
        goto out;
    r = ini_parse_stream(conf_reader, &p, conf_handler, &p);
    if (!p.err && ferror(p.f)) {
        ret = -EIO;
        if (asprintf(err, "%s:%d: read error", path, p.line + 1) < 0)
            *err = NULL;
        goto out;
    }
    /* inih's own syntax errors (a line without '=') come back as a line number. */
    if (r > 0 && (!p.err || r < p.err_line)) {
        free(p.err);
        p.err = NULL;
        p.sect[0] = '\0';
        conf_err(&p, r, NULL, "syntax error (expected 'key = value', '[kind NAME]' or a comment)");
    } else if (r < 0 && !p.err) {
        conf_err(&p, p.line, NULL, "out of memory");
    }
    if (!p.err)
        conf_section_end(&p);
    if (!p.err) {
        p.sect[0] = '\0';
        conf_finish(&p);
    }
    if (p.err || p.err_line) {
        ret = -EINVAL;
        *err = p.err;
        p.err = NULL;
        goto out;
    }
    *out = c;
    c = NULL;
out:
    if (p.f)
        fclose(p.f);
    free(p.buf);
    free(p.dir);
    free(p.listen_refs);
    free(p.backend_refs);
    conf_free(c);
    return ret;
}

void conf_free(struct conf *conf)
{
    if (!conf)
        return;
    for (int i = 0; i < conf->n_backends; i++) {
        for (int j = 0; j < conf->backends[i].n_model_map; j++) {
            free(conf->backends[i].model_map[j].from);
            free(conf->backends[i].model_map[j].to);
        }
        free(conf->backends[i].model_map);
        if (conf->backends[i].api_key) {
            memset(conf->backends[i].api_key, 0, strlen(conf->backends[i].api_key));
            free(conf->backends[i].api_key);
        }
        free(conf->backends[i].ca_file);
    }
    free(conf->backends);
    for (int i = 0; i < conf->n_pools; i++) {
        conf_list_free(&conf->pools[i].models);
        conf_list_free(&conf->pools[i].paths);
    }
    for (int i = 0; i < conf->n_keys; i++)
        conf_list_free(&conf->keys[i].models);
    free(conf->keys);
    free(conf->models);
    if (conf->cluster.redis_password) {
        memset(conf->cluster.redis_password, 0, strlen(conf->cluster.redis_password));
        free(conf->cluster.redis_password);
    }
    free(conf->pools);
    free(conf->listens);
    free(conf->path);
    free(conf);
}

int conf_backend_find(const struct conf *conf, const char *name)
{
    for (int i = 0; i < conf->n_backends; i++)
        if (!strcmp(conf->backends[i].name, name))
            return i;
    return -1;
}

int conf_pool_find(const struct conf *conf, const char *name)
{
    for (int i = 0; i < conf->n_pools; i++)
        if (!strcmp(conf->pools[i].name, name))
            return i;
    return -1;
}

int conf_key_find(const struct conf *conf, const char *name)
{
    for (int i = 0; i < conf->n_keys; i++)
        if (!strcmp(conf->keys[i].name, name))
            return i;
    return -1;
}

int conf_model_find(const struct conf *conf, const char *name)
{
    for (int i = 0; i < conf->n_models; i++)
        if (!strcmp(conf->models[i].name, name))
            return i;
    return -1;
}

int conf_list_match(const struct conf_list *l, const char *name, size_t len)
{
    char buf[CONF_NAME_MAX * 4];
    int nul = 0; /* buf holds the name, NUL-terminated */

    if (len >= sizeof(buf) || memchr(name, '\0', len))
        return 0;
    for (int i = 0; i < l->n; i++) {
        /* an item without fnmatch's special characters (flags 0: * ? [ and the escape \)
         * matches only itself: compared as bytes, without fnmatch (a request's model against
         * a pool's `models` on every request) */
        if (!strpbrk(l->items[i], "*?[\\")) {
            if (strlen(l->items[i]) == len && memcmp(l->items[i], name, len) == 0)
                return 1;
            continue;
        }
        if (!nul) {
            memcpy(buf, name, len);
            buf[len] = '\0';
            nul = 1;
        }
        if (fnmatch(l->items[i], buf, 0) == 0)
            return 1;
    }
    return 0;
}

int conf_model_pool(const struct conf *conf, const char *name, size_t len)
{
    for (int i = 0; i < conf->n_pools; i++)
        if (conf_list_match(&conf->pools[i].models, name, len))
            return i;
    return -1;
}

void conf_warnings(const struct conf *conf, void (*fn)(void *arg, const char *msg), void *arg)
{
    char msg[512];

    for (int i = 0; i < conf->n_listens; i++) {
        if (conf->listens[i].auth && conf->n_keys == 0) {
            snprintf(msg, sizeof(msg),
                     "%s:%d: [listen %s] auth is on and no [key] is configured: every request "
                     "will get 401 (add a [key NAME] or set auth = off for a trusted network)",
                     conf->path, conf->listens[i].file_line, conf->listens[i].name);
            fn(arg, msg);
        }
    }
}
