/* Configuration: the INI file parsed into plain structs (see etc/demo.ini for every key). */
#ifndef AIGW_CORE_CONF_H
#define AIGW_CORE_CONF_H

#include <stdint.h>
#include <sys/socket.h>

#include "balancer/algo.h"

#define CONF_NAME_MAX   64
#define CONF_HOST_MAX   256
#define CONF_PATH_MAX   256
#define CONF_EXPECT_MAX 8
#define CONF_STATUS_MAX 16
#define CONF_LIST_MAX   64 /* items of a models, paths or model_map list */

/* What counts as a failure (fail_on) or may be retried (retry_on): a bit set. The first three
 * happen before the upstream can have seen the request (COND_NOT_SENT: always safe to retry);
 * the others after it may have, so a retry may make it generate the answer twice. */
enum conf_cond {
    COND_CONNECT = 1 << 0, /* connect-failure: refused, unreachable, connect timeout */
    COND_TLS = 1 << 1,     /* tls: handshake or certificate failure */
    COND_TIMEOUT = 1 << 2, /* timeout: no response head in time (first_byte/try timeout) */
    COND_RESET = 1 << 3,   /* reset: closed, reset or garbled after the request was written */
    COND_5XX = 1 << 4,     /* 5xx: any 500..599 answer */
    COND_429 = 1 << 5,     /* 429: rate limited (for retry_on; never a breaker failure) */
    COND_STALE = 1 << 6,   /* stale-conn: a pooled connection found closed before any request
                              byte was written (the upstream closed it while idle) */
};

#define COND_NOT_SENT (COND_CONNECT | COND_TLS | COND_STALE)

/* Where the hash balancer finds a request's key. */
enum conf_hash_src {
    HASH_NONE = 0,
    HASH_HEADER, /* header:NAME */
    HASH_JSON,   /* json:FIELD, a top-level string field of the body (prompt_cache_key, user) */
};

enum log_level {
    LOG_LVL_ERR = 0,
    LOG_LVL_WARN,
    LOG_LVL_INFO,
    LOG_LVL_DEBUG,
};

/* A parsed http:// or https:// URL: host, port and an optional path prefix ("/v1"). */
struct url {
    int tls;                    /* 1 for https */
    char host[CONF_HOST_MAX];   /* without brackets for IPv6 literals */
    uint16_t port;              /* explicit or 80/443 */
    char prefix[CONF_PATH_MAX]; /* "" or "/v1": never ends with '/' */
};

/* Limits of a key, a model or a pool; 0 = none. */
struct conf_limits {
    uint32_t rpm;          /* requests in any 60 s */
    uint32_t tpm;          /* tokens (reserved at admission, corrected at the end) in any 60 s */
    uint32_t max_parallel; /* requests in flight over all workers */
};

/* A list of names or globs from a comma-separated value (models, paths). */
struct conf_list {
    char **items;
    int n;
};

enum conf_budget_period {
    BUDGET_MONTH = 0, /* UTC calendar month (the default) */
    BUDGET_DAY,       /* UTC day */
    BUDGET_TOTAL,     /* never resets */
};

/* [key NAME]: a client key. Only its SHA-256 is kept. */
struct conf_apikey {
    char name[CONF_NAME_MAX];
    unsigned char sha256[32];
    struct conf_list models; /* globs of the models it may use; none = every model */
    int64_t expires;         /* refused from this second (UTC epoch); 0 = never */
    struct conf_limits lim;
    uint64_t budget_nusd; /* budget_usd in nano-USD; 0 = none */
    enum conf_budget_period budget_period;
    int file_line;
};

/* [model NAME]: a model name clients send. Prices are pico-USD per token (USD per 1M tokens
 * x 10^6). */
struct conf_model {
    char name[CONF_NAME_MAX];
    char alias_of[CONF_NAME_MAX]; /* served as this model ("" = itself) */
    char fallback[CONF_NAME_MAX]; /* tried when this one's pool failed before a byte ("") */
    uint64_t price_input, price_output, price_cached_input;
    uint64_t list_price_input, list_price_output; /* the provider's own; 0 = not given */
    struct conf_limits lim;
    int alias_line, fallback_line; /* where alias_of and fallback were set, for messages */
    int file_line;
};

/* One public=upstream pair of a backend's model_map. */
struct conf_map {
    char *from, *to;
};

struct conf_global {
    int workers;            /* "auto" resolves to the number of CPUs */
    char admin_socket[108]; /* unix socket path; relative to the working directory */
    enum log_level log_level;
    uint64_t hard_stop_after_ms; /* graceful stop gives up after this */
    uint32_t maxconn;            /* client connections over all workers; 0 = from RLIMIT_NOFILE */
    char state_file[CONF_PATH_MAX]; /* usage and budgets saved here; "" = nowhere */
    uint64_t state_interval_ms;     /* how often the master saves it */
    uint32_t default_max_tokens;    /* reserved for a request that names no max_*tokens */
    /* deployment: resolved when the file is read, so a bad name is a FILE:LINE error */
    char user[CONF_NAME_MAX];        /* "" = keep the starting user */
    char group[CONF_NAME_MAX];       /* "" = user's primary group */
    int64_t uid, gid;                /* -1 = unchanged */
    char pidfile[CONF_PATH_MAX];     /* "" = none */
    char admin_group[CONF_NAME_MAX]; /* "" = admin socket 0600 */
    int64_t admin_gid;               /* -1 = none */
    int access_log; /* enum alog_mode: 0 off, 1 a file (access_log_path), 2 stderr */
    char access_log_path[CONF_PATH_MAX];
    uint32_t access_log_buffer; /* bytes of each worker's access log ring */
};

struct conf_listen {
    char name[CONF_NAME_MAX];
    struct sockaddr_storage addr; /* from bind = HOST:PORT */
    socklen_t addr_len;
    char bind[CONF_HOST_MAX + 8]; /* as written, for logs */
    int pool;                     /* index into conf.pools: where requests go */
    int backlog;
    uint32_t max_header_size;          /* bytes of request line + headers, else 431 */
    uint32_t max_headers;              /* header count, else 431 */
    uint64_t max_body_size;            /* else 413 */
    uint64_t client_header_timeout_ms; /* whole request head must arrive in this */
    uint64_t client_body_timeout_ms;   /* gap between body reads */
    /* the whole request body must arrive in this (from the end of the head) */
    uint64_t client_body_total_timeout_ms;
    uint64_t keepalive_timeout_ms; /* idle client connection between requests */
    uint32_t maxconn;              /* client connections over all workers; 0 = no own limit */
    int auth;                      /* a client key is required (default on) */
    int file_line;                 /* where the section starts, for messages */
};

struct conf_pool {
    char name[CONF_NAME_MAX];
    enum balance_algo balance;
    int check;                         /* active checks on (1) or off (0) */
    int check_method_head;             /* 1 = HEAD, 0 = GET */
    char check_path[CONF_PATH_MAX];    /* "" = backend prefix + "/models" */
    int check_expect[CONF_EXPECT_MAX]; /* accepted statuses */
    int n_check_expect;
    uint64_t check_interval_ms;
    uint64_t check_timeout_ms;
    int rise, fall;
    uint64_t connect_timeout_ms;    /* TCP + TLS handshake to a backend */
    uint64_t first_byte_timeout_ms; /* request sent -> response head */
    uint64_t idle_timeout_ms;       /* gap between two upstream reads once streaming */
    uint64_t pool_idle_timeout_ms;  /* an idle pooled upstream connection is closed after this */

    /* balancing */
    enum conf_hash_src hash_src;   /* hash_key = header:NAME | json:FIELD */
    char hash_name[CONF_NAME_MAX]; /* the header or field name */
    uint32_t hash_load_pct;        /* hash_balance_factor: bounded load, % of average (125) */

    /* check cadence and DEGRADED */
    uint64_t check_fastinter_ms;  /* while a rise/fall streak is under way (= interval) */
    uint64_t check_downinter_ms;  /* while DOWN (= interval) */
    uint32_t check_jitter_pct;    /* +- jitter on every interval (10) */
    uint64_t degraded_latency_ms; /* checks slower than this: DEGRADED (0 = off) */
    uint32_t degraded_error_pct;  /* live error ratio above this %: DEGRADED (0 = off) */
    uint32_t degraded_weight_pct; /* a DEGRADED backend's share of its weight (50) */
    uint64_t slowstart_ms;        /* ramp a recovered backend's weight over this (0 = off) */

    /* passive detection */
    uint32_t max_fails; /* failures within fail_timeout that mark DOWN (0 = off) */
    uint64_t fail_timeout_ms;
    uint32_t fail_on;                    /* enum conf_cond bits counted as failures */
    int fail_on_status[CONF_STATUS_MAX]; /* extra statuses counted as failures */
    int n_fail_on_status;

    /* circuit breaker */
    uint32_t breaker_failures; /* consecutive failures that open it (0 = off) */
    uint64_t breaker_open_for_ms;
    uint64_t breaker_open_max_ms;
    uint32_t breaker_half_open_calls; /* trial requests in flight over all workers */
    uint32_t breaker_successes;       /* trial successes that close it */

    /* retries */
    uint32_t retries;  /* extra tries after the first (another backend each) */
    uint32_t retry_on; /* enum conf_cond bits retried (COND_NOT_SENT ones always are) */
    int retry_on_status[CONF_STATUS_MAX];
    int n_retry_on_status;
    uint64_t retry_backoff_base_ms; /* retry_backoff = BASE..MAX xMULT, full jitter */
    uint64_t retry_backoff_max_ms;
    uint32_t retry_backoff_mult_x100; /* multiplier x 100 (x2 = 200) */
    uint32_t retry_budget_pct;        /* retries as a % of requests over 10 s (20) */
    uint32_t retry_budget_min;        /* retries per second always allowed (10) */
    uint64_t try_timeout_ms;          /* one try, send to response head (0 = first_byte) */
    uint64_t request_timeout_ms;      /* all tries together, to the response head (0 = off) */

    int expose_headers; /* x-aigw-backend / x-aigw-attempts (yes) */

    struct conf_list models; /* globs of the models it serves (routing by model) */
    struct conf_list paths;  /* globs of other /v1/ paths it serves */
    struct conf_limits lim;

    int first_backend, n_backends; /* backends of a pool are contiguous in conf.backends */
    int file_line;
};

struct conf_backend {
    char name[CONF_NAME_MAX];
    int pool; /* index into conf.pools */
    struct url url;
    int weight;               /* 0..256; 0 takes no traffic */
    char *api_key;            /* resolved secret or NULL; sent as "Authorization: Bearer KEY" */
    int tls_verify;           /* verify the backend's certificate (default yes) */
    char *ca_file;            /* CA bundle; NULL = the system bundle */
    int keepalive;            /* idle upstream connections kept per worker; 0 = close after each */
    int backup;               /* only used when no primary backend of the pool is usable */
    uint32_t max_conns;       /* in-flight requests over all workers; 0 = unlimited */
    uint64_t slowstart_ms;    /* per-backend override of the pool's (defaults to it) */
    uint32_t max_fails;       /* per-backend override of the pool's (defaults to it) */
    uint64_t fail_timeout_ms; /* per-backend override of the pool's (defaults to it) */
    uint64_t name_hash;       /* balancer_hash of the name: its identity on the hash ring */
    struct conf_map *model_map; /* the model renamed for this upstream */
    int n_model_map;
    int file_line;
};

/* [stats]: the master's HTTP listener for /metrics, /healthz and the status page. */
struct conf_stats {
    int enabled; /* a [stats] section with bind was given */
    struct sockaddr_storage addr;
    socklen_t addr_len;
    char bind[CONF_HOST_MAX + 8]; /* as written, for logs */
    int file_line;
};

enum conf_cluster_fallback {
    CLUSTER_FALLBACK_LOCAL_SHARE = 0, /* the fleet limit / hosts last seen alive (the default) */
    CLUSTER_FALLBACK_OPEN,            /* only this host's own limiter applies */
    CLUSTER_FALLBACK_CLOSED,          /* leased limits refuse every request */
};

/* [cluster]: several hosts share keys' limits through Redis (the sync process talks to it). */
struct conf_cluster {
    int enabled;                    /* a [cluster] section was given */
    char redis[CONF_PATH_MAX + 32]; /* as written, for logs and show cluster */
    int redis_unix;                 /* unix:PATH rather than redis://HOST:PORT */
    char redis_host[CONF_HOST_MAX]; /* or the socket path when redis_unix */
    uint16_t redis_port;
    uint32_t redis_db;
    char *redis_password; /* NULL = no AUTH; never logged */
    char node_name[CONF_NAME_MAX];
    uint64_t sync_interval_ms;
    uint64_t lease_ttl_ms; /* a lease is used at most this long after its grant */
    enum conf_cluster_fallback fallback;
    char key_prefix[CONF_NAME_MAX]; /* of every Redis key: several fleets may share a Redis */
    int file_line;
};

struct conf {
    char *path; /* the file it was read from */
    struct conf_global global;
    struct conf_listen *listens;
    int n_listens;
    struct conf_pool *pools;
    int n_pools;
    struct conf_backend *backends; /* sorted by pool */
    int n_backends;
    struct conf_apikey *keys;
    int n_keys;
    struct conf_model *models;
    int n_models;
    int route_by_model; /* some pool has models =: the body's model picks the pool */
    struct conf_stats stats;
    struct conf_cluster cluster;
};

/* Reads and checks a config file. On error returns -EINVAL (or -errno for I/O) and sets *err
 * to a malloc'd "FILE:LINE: key 'K': what is wrong" message for the caller to print and free. */
int conf_load(const char *path, struct conf **out, char **err);

/* conf_load with options. CONF_LOAD_NO_SECRETS leaves every api_key NULL without reading
 * env:/file: sources: for tools (aigwctl -c) that need only the layout and the admin socket,
 * run from a shell that may lack the gateway's environment or file permissions. */
#define CONF_LOAD_NO_SECRETS 0x1u
int conf_load_flags(const char *path, unsigned flags, struct conf **out, char **err);
void conf_free(struct conf *conf);

/* Lookups by section name; -1 when absent. */
int conf_backend_find(const struct conf *conf, const char *name);
int conf_pool_find(const struct conf *conf, const char *name);
int conf_key_find(const struct conf *conf, const char *name);
int conf_model_find(const struct conf *conf, const char *name);

/* Whether name (len bytes, need not be NUL-terminated) matches one of the list's globs
 * (fnmatch: *, ?, [...]). */
int conf_list_match(const struct conf_list *l, const char *name, size_t len);
/* The pool serving model name: the first pool in file order whose models match; -1 if none. */
int conf_model_pool(const struct conf *conf, const char *name, size_t len);

/* "local_share" / "open" / "closed". */
const char *conf_cluster_fallback_str(enum conf_cluster_fallback f);

/* Calls fn with each warning about a config that loads but is likely not what was meant
 * (a listener with auth on and no [key]); aigw -t prints them, the master logs them. */
void conf_warnings(const struct conf *conf, void (*fn)(void *arg, const char *msg), void *arg);

#endif
