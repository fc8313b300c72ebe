/* The shared-memory segment: backend state written by the health checker and the master,
 * per-worker counters written by each worker, read by everyone. Only shm/ knows the layout;
 * other modules go through the accessors below. No pointers inside the segment, no locks:
 * C11 atomics, one writer per field. */
#ifndef AIGW_SHM_SHM_H
#define AIGW_SHM_SHM_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "shm/acct.h"
#include "shm/limit.h"

#define SHM_MAGIC          0x31304d5357474941ULL /* "AIGWSM01" little-endian */
#define SHM_LAYOUT_VERSION 10
#define SHM_CACHELINE      64

/* Health state, written only by the health checker. */
enum backend_state {
    BACKEND_UP = 0,
    BACKEND_DOWN = 1,
    BACKEND_DEGRADED = 2, /* serving, at a reduced effective weight */
};

/* Operator state, written only by the master. */
enum backend_admin {
    BACKEND_READY = 0,
    BACKEND_DRAIN = 1, /* no new requests, in-flight ones finish */
    BACKEND_MAINT = 2, /* out of service, checks paused */
};

/* Why the state last changed. */
enum backend_reason {
    REASON_NONE = 0,     /* initial state */
    REASON_CHECK_OK,     /* active check passed rise times */
    REASON_CHECK_STATUS, /* unexpected HTTP status */
    REASON_CHECK_TIMEOUT,
    REASON_CHECK_CONNECT, /* connect refused / unreachable / DNS */
    REASON_CHECK_TLS,     /* handshake or certificate failure */
    REASON_CHECK_PROTO,   /* malformed HTTP response */
    REASON_PASSIVE,       /* max_fails live-traffic failures within fail_timeout */
    REASON_AUTH,          /* the upstream answered 401/403: its key is bad */
    REASON_CHECK_SLOW,    /* checks pass but slower than degraded_latency */
    REASON_ERROR_RATIO,   /* live error ratio above degraded_error_ratio */
    REASON_LIVE_OK,       /* a live request succeeded after a passive DOWN (checks off) */
    REASON_COUNT
};

/* Circuit breaker, written only by the health checker. */
enum breaker_state {
    BREAKER_CLOSED = 0,
    BREAKER_OPEN = 1,      /* no requests until breaker_until_ns */
    BREAKER_HALF_OPEN = 2, /* a few trial requests in flight decide */
};

/* The result of a check run on the operator's demand (`aigwctl check`). */
enum shm_check_ok {
    SHM_CHECK_FAIL = 0,
    SHM_CHECK_PASS = 1,
    SHM_CHECK_NOT_RUN = 2, /* the checker could not run it (no checks, out of fds...) */
};
#define SHM_CHECK_DETAIL 192 /* bytes of its detail text, NUL included */

/* Operator commands on a breaker, written by the master, carried out by the health
 * checker (the only writer of breaker state). */
enum breaker_cmd {
    BREAKER_CMD_NONE = 0,
    BREAKER_CMD_RESET = 1, /* force closed */
    BREAKER_CMD_OPEN = 2,  /* force open */
};

#define SHM_FAIL_RING 32 /* failure times kept per (worker, backend) */
/* Latency histograms: SHM_HIST_BUCKETS - 1 upper bounds (shm_hist_bounds_us) and +Inf. */
#define SHM_HIST_BUCKETS 15
#define SHM_BUDGET_SECS  10 /* retry budget window: one-second buckets */

/* What a worker may send to a backend: the health checker's decision, published with the
 * backend's state (struct shm_admission), which workers apply as it is. ALL is 0 so that a
 * fresh segment admits everything, as it says UP. */
enum shm_admit {
    SHM_ADMIT_ALL = 0,
    SHM_ADMIT_TRIAL = 1, /* trial requests only, a few in flight at once */
    SHM_ADMIT_NONE = 2,
};

/* Trips: a worker whose outcome brings a backend to a threshold the checker published sets one
 * of these in the backend's gate, for the admission epoch it applies. Every worker obeys the
 * gate at its next pick; the checker turns the trip into the state change on its next
 * evaluation and publishes a new epoch, which leaves the old gate behind. */
#define SHM_TRIP_PASSIVE 0x01u /* ALL: max_fails failures within the failure window */
#define SHM_TRIP_BREAKER 0x02u /* ALL: `consec` consecutive failures */
#define SHM_TRIP_AUTH    0x04u /* ALL: the upstream answered 401/403 */
#define SHM_TRIP_PASSED  0x08u /* TRIAL: `need` trial successes: admit everything */
#define SHM_TRIP_FAILED  0x10u /* TRIAL: a trial failed where that ends the trials (breaker) */
#define SHM_TRIP_STOP    (SHM_TRIP_PASSIVE | SHM_TRIP_BREAKER | SHM_TRIP_AUTH | SHM_TRIP_FAILED)

/* The checker's admission decision for a backend (see enum shm_admit). Zero-initialise it. */
struct shm_admission {
    enum shm_admit kind;
    uint32_t trials;     /* TRIAL: in flight at once over all workers */
    uint32_t need;       /* TRIAL: successes of this epoch's trials that trip PASSED */
    uint32_t fail_stops; /* TRIAL: a failed trial trips FAILED (breaker); else trials go on */
    uint64_t from_ns;    /* TRIAL: nothing is admitted before this time */
    /* ALL: the thresholds at which a worker trips the gate; 0 = off */
    uint32_t max_fails;      /* failures within fail_window_ns, after the last state change */
    uint32_t consec;         /* consecutive failures */
    uint64_t fail_window_ns; /* fail_timeout */
};

/* Everything the health checker publishes of a backend: written as one record, read as one
 * (shm_backend_publish, shm_backend_view), so a reader never sees a state with another
 * state's reason, time, weight or admission. */
struct shm_health {
    enum backend_state state;
    enum backend_reason reason; /* of the last state change */
    uint64_t since_ns;          /* monotonic time of the last state change (0 = none) */
    uint64_t transitions;       /* state changes so far */
    uint32_t weight_eff;        /* weight the balancer uses */
    enum breaker_state breaker;
    uint64_t breaker_until_ns; /* OPEN: when it turns half-open */
    uint64_t breaker_open_ns;  /* length of the current/last open period */
    int32_t check_status;      /* last check: HTTP status, or -errno (-ETIMEDOUT...) */
    uint32_t check_us;         /* last check duration, microseconds */
    uint64_t check_at_ns;      /* monotonic time of the last check, 0 = never */
    uint64_t ewma_check_us;    /* smoothed duration of passing checks */
    struct shm_admission adm;
    uint32_t epoch; /* admission epoch: trips and trial successes count within one */
    uint32_t pad_;
};

#define SHM_HEALTH_WORDS ((sizeof(struct shm_health) + 7) / 8)

/* One copy of the published record; seq is odd while it is being written. */
struct shm_health_rec {
    _Atomic uint32_t seq;
    uint32_t pad_;
    _Atomic uint64_t w[SHM_HEALTH_WORDS];
};

/* A backend's cumulative counters as earlier generations left them (reload, binary upgrade):
 * writer: the master (shm_carry_counters), which keeps them equal to the generation before's
 * totals while it drains; readers add them to the workers' own. */
struct shm_carried {
    _Atomic uint64_t requests, failures, ok, retries, auth_failures, bytes_in, bytes_out;
    _Atomic uint64_t status[5];
    _Atomic uint64_t lat_bkt[SHM_HIST_BUCKETS];
    _Atomic uint64_t lat_sum_us;
    _Atomic uint64_t ttft_bkt[SHM_HIST_BUCKETS];
    _Atomic uint64_t ttft_sum_us;
};

/* The same for the per-worker counters, summed (writer: the master). */
struct shm_carried_proc {
    _Atomic uint64_t requests;
    _Atomic uint64_t answered[5];
    _Atomic uint64_t limited[3][LIMIT_DIMS];
    _Atomic uint64_t lease_limited[3][LIMIT_DIMS];
    _Atomic uint64_t alog_drops;
    _Atomic uint64_t health_restarts; /* of the health checker: written by the master */
};

/* One per backend, indexed like conf.backends. */
struct shm_backend {
    /* writer: health. It writes the copy not in use, then points `cur` at it: a checker
     * that dies mid-write leaves readers the last whole record, never a stuck counter. */
    _Atomic uint32_t cur;
    _Atomic uint32_t breaker_cmd_done; /* last breaker_cmd_seq carried out */
    struct shm_health_rec rec[2];
    /* writer: master */
    _Atomic uint32_t admin;           /* enum backend_admin */
    _Atomic uint32_t weight_cfg;      /* configured weight */
    _Atomic uint32_t max_conns;       /* in-flight limit over all workers, 0 = none (at start) */
    _Atomic uint32_t breaker_cmd;     /* enum breaker_cmd */
    _Atomic uint32_t breaker_cmd_seq; /* bumped with each command */
    _Atomic uint32_t check_cmd_seq;   /* `aigwctl check`: bumped to ask for a check now */
    /* writer: health: the result of the check run for check_cmd_seq (seq is stored last) */
    struct {
        _Atomic uint32_t seq;
        _Atomic int32_t status; /* HTTP status, or -errno */
        _Atomic uint32_t dur_us;
        _Atomic uint32_t ok; /* enum shm_check_ok */
        _Atomic uint64_t detail[SHM_CHECK_DETAIL / 8];
    } check_ans;
    /* Claims: every worker changes these by atomic read-modify-write, each on its own line.
     * The epoch-tagged words hold (epoch << 32 | value) and count only within the epoch of
     * their tag: a newer epoch starts them afresh, so nobody ever has to reset them. */
    struct {
        _Atomic uint64_t gate;     /* SHM_TRIP_* bits */
        _Atomic uint64_t consec;   /* consecutive failures */
        _Atomic uint64_t trial_ok; /* successes of the epoch's trials */
    } __attribute__((aligned(SHM_CACHELINE))) claim;
    /* In-flight claims over all workers: one compare-and-swap under the limit admits exactly
     * as many as fit. Each worker also counts its own share in its shm_wb (the truth a dead
     * worker's claims are given back from: see shm_claims_repair). */
    struct {
        _Atomic int32_t active; /* only kept for a backend with max_conns */
        _Atomic int32_t trials;
    } __attribute__((aligned(SHM_CACHELINE))) inflight;
    struct shm_carried carried __attribute__((aligned(SHM_CACHELINE)));
} __attribute__((aligned(SHM_CACHELINE)));

/* Per-(worker, backend) counters; writer: that worker only. */
struct shm_wb {
    _Atomic int32_t active;         /* requests in flight to this backend */
    _Atomic uint64_t requests;      /* requests sent */
    _Atomic uint64_t failures;      /* connect/TLS/timeout/reset/5xx */
    _Atomic uint64_t bytes_in;      /* response bytes from the backend */
    _Atomic uint64_t bytes_out;     /* request bytes to the backend */
    _Atomic uint64_t ok;            /* responses that were not failures */
    _Atomic uint64_t retries;       /* requests re-sent to another backend after this one failed */
    _Atomic uint64_t auth_failures; /* 401/403 answers: the backend's key is bad */
    _Atomic uint64_t last_ok_ns;    /* time of the last success */
    _Atomic uint64_t cool_until_ns; /* 429: no requests before this time */
    _Atomic uint64_t ewma_ns;       /* peak-EWMA of response-head latency */
    _Atomic int32_t trials;         /* trial requests in flight to this backend */
    _Atomic uint32_t fail_pos;      /* next slot of fail_ring */
    _Atomic uint64_t fail_ring[SHM_FAIL_RING]; /* times of the latest failures */
    /* retry budget: requests and retries of this worker to this backend per second */
    _Atomic uint64_t bkt_sec[SHM_BUDGET_SECS]; /* the second (+1) a bucket counts; 0 = unused */
    _Atomic uint32_t bkt_req[SHM_BUDGET_SECS];
    _Atomic uint32_t bkt_retry[SHM_BUDGET_SECS];
    _Atomic uint64_t ewma_at_ns; /* when ewma_ns was last updated */
    /* Odd while this worker changes the backend's shared in-flight claims together with its
     * own `active` / `trials`: a snapshot taken while every one is even and unchanged is
     * settled (shm_claims_repair). */
    _Atomic uint32_t claim_seq;
    /* for /metrics: response heads by status class (1xx..5xx), and histograms (one bucket
     * each, not cumulative) with their sums in microseconds */
    _Atomic uint64_t status[5];
    _Atomic uint64_t lat_bkt[SHM_HIST_BUCKETS]; /* try start -> whole response forwarded */
    _Atomic uint64_t lat_sum_us;
    _Atomic uint64_t ttft_bkt[SHM_HIST_BUCKETS]; /* try start -> first body byte forwarded */
    _Atomic uint64_t ttft_sum_us;
} __attribute__((aligned(SHM_CACHELINE)));

/* Per-worker slot header; writer: that worker (pid etc. by the master before fork). */
struct shm_worker {
    _Atomic int32_t pid;
    _Atomic uint32_t conns;       /* open client connections */
    _Atomic uint64_t requests;    /* client requests answered */
    _Atomic uint64_t answered[5]; /* the same by the status class of the answer, 1xx..5xx */
    /* reload: the worker sets ready once set up; while hold (set by the master before the fork)
     * it does not accept, until the master clears it and sends SIGUSR2 (the old generation has
     * stopped accepting by then, and its rate-limit windows are in this segment) */
    _Atomic uint32_t ready;
    _Atomic uint32_t hold;
    /* requests a limiter refused (429): [key, model, pool][enum limit_dim - 1]; lease_limited:
     * those of them refused by the host's lease or the fallback ([cluster], verdict.lease) */
    _Atomic uint64_t limited[3][LIMIT_DIMS];
    _Atomic uint64_t lease_limited[3][LIMIT_DIMS];
    _Atomic uint64_t alog_drops; /* access log lines dropped (buffer full, write failed) */
    _Atomic uint32_t restarts;   /* writer: the master: times the slot's worker was restarted */
} __attribute__((aligned(SHM_CACHELINE)));

struct shm_header {
    uint64_t magic;
    uint32_t version;
    uint32_t generation;
    uint32_t n_backends;
    uint32_t n_workers;
    uint64_t size;
    uint64_t off_backends; /* byte offsets from the segment start */
    uint64_t off_workers;
    uint64_t off_wb;                 /* n_workers * n_backends shm_wb, worker-major */
    uint64_t created_ns;             /* monotonic time of creation: every counter was 0 then */
    uint64_t off_limits;             /* shm/limit.h region, 0 = none */
    uint64_t off_acct;               /* shm/acct.h region, 0 = none */
    struct shm_carried_proc carried; /* writer: the master */
};

struct shm_health_cache;

/* Process-local handle to a mapped segment. */
struct shm {
    void *base;
    size_t size;
    int fd;
    struct shm_header *hdr;
    /* this process's copies of the backends' records (forked children get their own), so a
     * reader copies a record only when it changed */
    struct shm_health_cache *cache;
};

/* Creates and maps a zeroed segment (memfd + MAP_SHARED) that forked children inherit.
 * Returns 0 or -errno. */
int shm_create(struct shm *shm, uint32_t n_backends, uint32_t n_workers, uint32_t generation);
/* The AI layer's part of the segment: a limiter per key, [model] and [pool] (ids: key i -> i,
 * model j -> n_keys + j, pool p -> n_keys + n_models + p; specs in that order) and usage totals
 * per key, model and backend. The worker slots are the limiters' and the totals' owners. */
struct shm_ai {
    uint32_t n_keys, n_models, n_pools;
    const struct limit_spec *limits; /* n_keys + n_models + n_pools */
    int64_t wall_s;                  /* now, UTC seconds: the budgets' first period */
};
/* shm_create with the AI regions as well (ai = NULL: none, as shm_create). */
int shm_create_ai(struct shm *shm, uint32_t n_backends, uint32_t n_workers, uint32_t generation,
                  const struct shm_ai *ai);
void shm_destroy(struct shm *shm);
/* Maps the segment another process created, by its memfd (binary upgrade: the old master's), and
 * takes `fd`. -EPROTO when it has another layout version, -EINVAL when it is no segment. */
int shm_attach(struct shm *shm, int fd);

/* The regions of shm_create_ai (NULL without them). */
static inline struct limit_region *shm_limits(const struct shm *shm)
{
    return shm->hdr->off_limits ? (struct limit_region *)((char *)shm->base + shm->hdr->off_limits)
                                : NULL;
}

static inline struct acct_region *shm_acct(const struct shm *shm)
{
    return shm->hdr->off_acct ? (struct acct_region *)((char *)shm->base + shm->hdr->off_acct)
                              : NULL;
}

static inline uint32_t shm_n_backends(const struct shm *shm)
{
    return shm->hdr->n_backends;
}

static inline uint32_t shm_n_workers(const struct shm *shm)
{
    return shm->hdr->n_workers;
}

static inline struct shm_backend *shm_backend(const struct shm *shm, uint32_t b)
{
    return (struct shm_backend *)((char *)shm->base + shm->hdr->off_backends) + b;
}

static inline struct shm_worker *shm_worker(const struct shm *shm, uint32_t w)
{
    return (struct shm_worker *)((char *)shm->base + shm->hdr->off_workers) + w;
}

static inline struct shm_wb *shm_wb(const struct shm *shm, uint32_t w, uint32_t b)
{
    return (struct shm_wb *)((char *)shm->base + shm->hdr->off_wb) +
           (size_t)w * shm->hdr->n_backends + b;
}

/* Single-writer counter bump: a relaxed load + store, no locked instruction. */
static inline void shm_counter_add(_Atomic uint64_t *c, uint64_t v)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + v,
                          memory_order_relaxed);
}

static inline void shm_gauge_add(_Atomic int32_t *g, int32_t v)
{
    atomic_store_explicit(g, atomic_load_explicit(g, memory_order_relaxed) + v,
                          memory_order_relaxed);
}

/* ---- one backend's published record: everyone reads it through this ---------------------- */

/* A consistent view of backend b: the checker's record as one whole, the operator's state, and
 * the gate and claims of the record's epoch. h points at this process's copy of the record,
 * which stays as it is until the next view of b in this process. */
struct shm_backend_view {
    const struct shm_health *h;
    enum backend_admin admin;
    uint32_t weight_cfg;
    uint32_t trips;            /* SHM_TRIP_* set by workers in this epoch */
    uint32_t consec;           /* consecutive failures counted in this epoch */
    uint32_t trial_ok;         /* trial successes counted in this epoch */
    uint32_t breaker_cmd_done; /* the last operator breaker command the checker took */
};
void shm_backend_view(const struct shm *shm, uint32_t b, struct shm_backend_view *v);

/* What a worker may send to the backend at now_ns, from its view: the published admission
 * with the trips of its epoch applied, and the operator's state. SHM_ADMIT_TRIAL sets
 * *trials (the in-flight limit). Weight and max_conns are the balancer's to check. */
enum shm_admit shm_admit(const struct shm_backend_view *v, uint64_t now_ns, uint32_t *trials);

/* Health checker (the only writer of the record): publishes *h as b's record. new_epoch: a
 * new admission epoch (the decision changed, or the checker acted on the trips): h->epoch is
 * set to it. Otherwise h->epoch is kept as published. */
void shm_backend_publish(struct shm *shm, uint32_t b, struct shm_health *h, int new_epoch);

/* Master, before forking: b's configured weight (also its effective weight until the checker
 * says otherwise) and in-flight limit (max_conns, 0 = none); READY. */
void shm_backend_init(struct shm *shm, uint32_t b, uint32_t weight, uint32_t max_conns);
/* Master: the operator's weight of b (`set weight`; the checker derives the effective weight
 * from it, a reload keeps it); returns the one it replaces. */
uint32_t shm_backend_set_weight_cfg(struct shm *shm, uint32_t b, uint32_t weight);
/* Master: the operator state of b; returns the one it replaces. */
enum backend_admin shm_backend_set_admin(struct shm *shm, uint32_t b, enum backend_admin a);

/* One field of the record changed, the rest as published (the checker publishes whole
 * records; these serve tools and tests). */
void shm_backend_set_state(struct shm *shm, uint32_t b, enum backend_state st,
                           enum backend_reason why, uint64_t now_ns);
void shm_backend_set_breaker(struct shm *shm, uint32_t b, enum breaker_state st, uint64_t until_ns,
                             uint64_t open_ns);
void shm_backend_set_check(struct shm *shm, uint32_t b, int32_t status, uint32_t dur_us,
                           uint64_t now_ns);
void shm_backend_set_weight(struct shm *shm, uint32_t b, uint32_t weight_eff);

/* ---- outcomes, from the workers ------------------------------------------------------------ */

/* Worker w records the outcome of one request to b (at most one of these per request). A
 * failure that brings b to a threshold of an ALL admission trips its gate (max_fails within
 * the window, consecutive failures); a success ends the consecutive count. */
void shm_wb_record_ok(struct shm *shm, uint32_t w, uint32_t b, uint64_t now_ns,
                      uint64_t latency_ns);
void shm_wb_record_fail(struct shm *shm, uint32_t w, uint32_t b, uint64_t now_ns);
/* Worker w got a 401/403 from b: counted, and under an ALL admission b's gate trips AUTH. */
void shm_wb_record_auth(struct shm *shm, uint32_t w, uint32_t b);
/* A worker records the outcome of a trial request it was admitted to (shm_trial_acquire) under
 * the admission epoch `epoch`, in addition to shm_wb_record_ok/fail: the success that makes
 * `need` trips PASSED, a failure trips FAILED where the admission says so. An outcome of an
 * older epoch counts for nothing. */
void shm_trial_outcome(struct shm *shm, uint32_t b, uint32_t epoch, int ok);

/* Failures of b recorded by all workers after `since_ns` (at most SHM_FAIL_RING per worker). */
uint32_t shm_backend_failures_since(const struct shm *shm, uint32_t b, uint64_t since_ns);
/* Latest success of b over all workers (0 = none). */
uint64_t shm_backend_last_ok(const struct shm *shm, uint32_t b);
/* b is cooling (429) until this time (0 = not cooling). */
uint64_t shm_backend_cool_until(const struct shm *shm, uint32_t b);
/* What a pick needs of the workers' shares of b, in one pass: requests in flight over all
 * workers, and the latest end of a cool-down (0 = none). */
void shm_backend_load(const struct shm *shm, uint32_t b, int32_t *active, uint64_t *cool_until);
/* Peak-EWMA latency of b at now_ns: the mean of the workers' figures, each halved for every
 * SHM_EWMA_HALF_LIFE_NS without a new sample, so a backend once slow (and since avoided) is
 * tried again (0 = none yet). A failure counts as a sample of at least SHM_EWMA_FAIL_NS. */
#define SHM_EWMA_HALF_LIFE_NS (10 * 1000000000ULL)
#define SHM_EWMA_FAIL_NS      (1000000000ULL)
uint64_t shm_backend_ewma(const struct shm *shm, uint32_t b, uint64_t now_ns);

/* Worker w counts one request (retry = 0) or one retry (retry = 1) to b in the budget window. */
void shm_wb_budget_note(struct shm *shm, uint32_t w, uint32_t b, uint64_t now_ns, int retry);
/* Requests and retries of backends [b, b + n) over all workers in the last SHM_BUDGET_SECS. */
void shm_budget_window(const struct shm *shm, uint32_t b, uint32_t n, uint64_t now_ns,
                       uint64_t *requests, uint64_t *retries);

/* Sum of the workers' cumulative ok / failure / 401-403 counters of b. */
void shm_backend_outcomes(const struct shm *shm, uint32_t b, uint64_t *ok, uint64_t *failed);
uint64_t shm_backend_auth_failures(const struct shm *shm, uint32_t b);

/* ---- in-flight claims ---------------------------------------------------------------------- */

/* Worker w asks for one of at most `limit` trial requests in flight to b over all workers:
 * one compare-and-swap on the shared count, so of two workers racing for the last place
 * exactly one gets it. Returns 1 when admitted (give it back with shm_trial_release). */
int shm_trial_acquire(struct shm *shm, uint32_t w, uint32_t b, int32_t limit);
void shm_trial_release(struct shm *shm, uint32_t w, uint32_t b);
int32_t shm_trials_in_flight(const struct shm *shm, uint32_t b);

/* Worker w takes an in-flight slot of b: within b's max_conns (shm_backend_init) over all
 * workers, by the same claim as trials; without one it only counts. Returns 0 when b is full.
 * shm_active_release gives it back when the request ends. */
int shm_active_acquire(struct shm *shm, uint32_t w, uint32_t b);
void shm_active_release(struct shm *shm, uint32_t w, uint32_t b);

/* Sets b's shared in-flight counts to the sum of the workers' own shares when a snapshot
 * finds them apart with no claim under way: what a worker that died in the middle of a claim
 * (or whose shares the master reset) left behind. Anyone may call it at any time; the health
 * checker does on every evaluation. Returns 1 when it changed something. */
int shm_claims_repair(struct shm *shm, uint32_t b);

/* ---- breaker commands ---------------------------------------------------------------------- */

/* Master: ask the health checker to reset/open a breaker. Returns the command's sequence number
 * (done once the view's breaker_cmd_done reaches it). */
uint32_t shm_backend_breaker_cmd(struct shm *shm, uint32_t b, enum breaker_cmd cmd);
/* Health checker: the pending command of b (BREAKER_CMD_NONE when none), marked done. */
enum breaker_cmd shm_backend_breaker_cmd_take(struct shm *shm, uint32_t b);

/* ---- checks on demand --------------------------------------------------------------------- */

struct shm_check_answer {
    enum shm_check_ok ok;
    int32_t status;
    uint32_t dur_us;
    char detail[SHM_CHECK_DETAIL];
};
/* Master: ask the health checker to check b now. Returns the request's sequence number. */
uint32_t shm_backend_check_cmd(struct shm *shm, uint32_t b);
/* Health checker: the last check requested for b, and the last one answered. */
uint32_t shm_backend_check_cmd_seq(const struct shm *shm, uint32_t b);
uint32_t shm_backend_check_answered(const struct shm *shm, uint32_t b);
/* Health checker: the result of the check run for request seq of b. */
void shm_backend_check_answer(struct shm *shm, uint32_t b, uint32_t seq,
                              const struct shm_check_answer *a);
/* Master: 1 and *a when request seq of b (or a later one) has been answered, else 0. */
int shm_backend_check_result(const struct shm *shm, uint32_t b, uint32_t seq,
                             struct shm_check_answer *a);

/* ---- reload ------------------------------------------------------------------------------ */

/* Master, before forking a new generation: backend b of `dst` takes the runtime state of backend
 * sb of `src` (the old generation's segment): the health and breaker record, the operator state
 * (and the weight, when weight >= 0: the operator's own), and the workers' cooling, latency and
 * failure times merged into dst's worker slot 0, which no worker of dst has written yet (the
 * counters are shm_carry_counters'). */
void shm_backend_carry(struct shm *dst, uint32_t b, const struct shm *src, uint32_t sb,
                       int64_t weight);

/* Master: backend b of dst carries sb of src (the generation before, still draining or just
 * exited): b's carried counters become src's totals of sb (its carried ones and its workers'),
 * and dst's process-wide carried counters src's. Called again and again while src drains, and
 * once more when it is gone: the figures only grow. */
void shm_carry_counters(struct shm *dst, uint32_t b, const struct shm *src, uint32_t sb);
/* Master: dst's process-wide carried counters (client requests, limiter refusals, access log
 * drops, restarts) become src's totals. */
void shm_carry_proc(struct shm *dst, const struct shm *src);

/* Process-wide totals over the workers, carried ones included. */
struct shm_proc_totals {
    uint64_t requests, conns, alog_drops;
    uint64_t answered[5]; /* client answers by status class, 1xx..5xx */
    uint64_t limited[3][LIMIT_DIMS];
    uint64_t lease_limited[3][LIMIT_DIMS];
};
void shm_proc_totals(const struct shm *shm, struct shm_proc_totals *t);

/* Sums of the per-worker counters of one backend (carried ones included). */
struct shm_backend_totals {
    int64_t active;
    uint64_t requests, failures, bytes_in, bytes_out, retries;
};
void shm_backend_totals(const struct shm *shm, uint32_t b, struct shm_backend_totals *t);

/* ---- figures for /metrics ------------------------------------------------------------------ */

/* Upper bounds of the histogram buckets, microseconds (the last bucket is +Inf). */
extern const uint64_t shm_hist_bounds_us[SHM_HIST_BUCKETS - 1];

/* Worker w: the response head of b had this status (counted by class). */
static inline void shm_wb_note_status(struct shm *shm, uint32_t w, uint32_t b, int status)
{
    if (status >= 100 && status <= 599)
        shm_counter_add(&shm_wb(shm, w, b)->status[status / 100 - 1], 1);
}
/* Worker w: one sample of b's response duration (lat) or time to the first body byte (ttft):
 * one bucket and the sum. */
void shm_wb_observe(struct shm *shm, uint32_t w, uint32_t b, int ttft, uint64_t ns);
/* Worker w: a limiter refused a request: kind 0 key, 1 model, 2 pool; dim enum limit_dim; lease:
 * the refusal was the host's lease's or the fallback's (limit_verdict.lease). */
void shm_worker_note_limited(struct shm *shm, uint32_t w, int kind, int dim, int lease);

/* Sums over the workers of what /metrics shows of one backend (carried ones included). */
struct shm_backend_stats {
    uint64_t status[5];
    uint64_t lat_bkt[SHM_HIST_BUCKETS], lat_sum_us;
    uint64_t ttft_bkt[SHM_HIST_BUCKETS], ttft_sum_us;
};
void shm_backend_stats(const struct shm *shm, uint32_t b, struct shm_backend_stats *s);

/* Master: zero a dead worker's slot and gauges, and give its in-flight claims back (its
 * backend claims, and its parallel slots and budget reservations in the limiters).
 * Cumulative counters (requests, failures, bytes, usage totals) are kept. -EBUSY when a
 * limiter's lock could not be had in time (see limit_release_owner): call it again before the
 * slot runs a new worker. Else 0. */
int shm_worker_reset(struct shm *shm, uint32_t w);

const char *shm_state_str(enum backend_state st);
const char *shm_admin_str(enum backend_admin a);
const char *shm_reason_str(enum backend_reason r);
const char *shm_breaker_str(enum breaker_state st);

#endif
