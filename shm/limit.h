/* Exact rate limits and budgets shared by processes: a table of limiters (per key, model, pool)
 * in a MAP_SHARED region, each with a sliding-window log of admissions, parallel slots and a
 * money budget, behind a per-limiter robust process-shared mutex. */
#ifndef AIGW_SHM_LIMIT_H
#define AIGW_SHM_LIMIT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define LIMIT_WINDOW_MS      60000u /* rpm and tpm count what was admitted in the last minute */
#define LIMIT_MAX_IDS        5 /* limiters one request holds: key, model, pool, fallback's two */
#define LIMIT_LOG_MAX        8192u /* most log entries a limiter keeps; older ones are merged */
#define LIMIT_LOG_DEFAULT    1024u /* log entries of a limiter with a tpm and no rpm */
#define LIMIT_PARALLEL_MS    1000u /* Retry-After hint when max_parallel refused */
#define LIMIT_RETRY_NEVER    (-1)  /* retry_ms: waiting will not help */
#define LIMIT_MAX_OWNERS     1024u /* worker slots (and one more for the master, say) */
#define LIMIT_MASTER_WAIT_MS 50u   /* most the master's readers wait for a limiter's lock */

enum limit_period {
    LIMIT_PERIOD_MONTH = 0, /* the default of budget_period */
    LIMIT_PERIOD_DAY = 1,
    LIMIT_PERIOD_TOTAL = 2,
};

/* What one limiter enforces; 0 = no limit in that dimension. */
struct limit_spec {
    uint32_t rpm;
    uint32_t tpm; /* reserved tokens at admission, corrected at settle */
    uint32_t max_parallel;
    uint64_t budget_nano; /* nano-USD per period */
    enum limit_period period;
    /* [cluster]: rpm, tpm and max_parallel are fleet limits: admissions also draw on the lease
     * the sync process holds for this host (struct limit_lease); 0 without [cluster] */
    uint32_t leased;
    uint32_t lease_retry_ms; /* Retry-After of a refusal by the lease: a top-up may come soon */
    /* enum limit_fallback the lease starts in, until the sync process's first grant or fallback:
     * as if Redis were away with no other host seen (SHARE: this host's window holds the whole
     * limits). The master holds the workers until then (a few ms); this applies when that wait
     * ran out (the sync process did not come up) */
    uint32_t lease_start;
};

/* Which dimension refused an admission. */
enum limit_dim {
    LIMIT_OK = 0,
    LIMIT_REQUESTS = 1,
    LIMIT_TOKENS = 2,
    LIMIT_PARALLEL = 3,
    LIMIT_BUDGET = 4,
    LIMIT_FLEET = 5,      /* [cluster] with cluster_fallback = closed while Redis is away */
    LIMIT_FLEET_WAIT = 6, /* [cluster]: this host's budget share is spent, the fleet's is not:
                           * a top-up is on its way */
};
#define LIMIT_DIMS 6 /* the refusing dims, LIMIT_REQUESTS..LIMIT_FLEET_WAIT */

/* One OpenAI x-ratelimit-* trio. set = 0: no limiter of the request has this limit. */
struct limit_trio {
    int set;
    uint64_t limit;     /* x-ratelimit-limit-{requests,tokens} */
    uint64_t remaining; /* x-ratelimit-remaining-...: after this request when admitted */
    uint64_t reset_ms;  /* x-ratelimit-reset-...: until the window holds nothing of today */
};

/* The outcome of limit_admit, admitted or not. */
struct limit_verdict {
    enum limit_dim dim; /* LIMIT_OK when admitted */
    int32_t limiter;    /* the limiter id that refused (-1 when admitted) */
    int64_t retry_ms;   /* refused: ms until this request would be admitted (as far as the
                         * refusing limiters go, with no other traffic), or LIMIT_RETRY_NEVER */
    int lease;          /* refused by this host's lease of a fleet limit or the fallback's share
                         * ([cluster]), not by its own window: 1; 2 when the fleet had room at
                         * the last renewal (a top-up is due: the request may wait for it) */
    /* The headers, from the most constraining limiter of each kind: the one with the fewest
     * remaining (ties: the smaller limit). Requests and tokens may come from different ones. */
    struct limit_trio req, tok;
};

/* An admission in flight, held by the worker until limit_settle. Plain process-local data. */
struct limit_ticket {
    uint32_t n; /* 0: nothing held (settled, or never admitted) */
    uint32_t owner;
    uint32_t ids[LIMIT_MAX_IDS];
    uint64_t seq[LIMIT_MAX_IDS]; /* the admission's number in each limiter's log */
    uint64_t tokens;             /* reserved */
    uint64_t cost_nano;          /* reserved */
};

/* A budget's state, for the state file and reload. */
struct limit_budget {
    enum limit_period period;
    int64_t period_start; /* UTC seconds: the start of the current period (0 for total) */
    uint64_t spent_nano;
    uint64_t reserved_nano; /* in flight (read only: limit_budget_set ignores it) */
};

/* What `show keys` shows of a limiter at a time. */
struct limit_info {
    struct limit_spec spec;
    uint32_t requests; /* admitted in the window */
    uint64_t tokens;   /* counted in the window */
    uint32_t parallel; /* in flight */
    struct limit_budget budget;
};

struct limit_region;

/* A host's lease of a fleet limiter ([cluster]), read and written by the sync process, drawn on
 * by admissions. A limiter is leased when its spec says so. */
struct limit_lease {
    int64_t req;       /* requests this host may still admit */
    int64_t tok;       /* tokens it may still reserve; below 0: a debt (settle corrected up) */
    uint32_t par;      /* parallel slots this host may hold */
    uint32_t fallback; /* enum limit_fallback: how the lease is made while Redis is away */
    uint64_t until_ms; /* CLOCK_MONOTONIC: the lease is not used from then on */
    int64_t used_req;  /* admitted since the last limit_lease_take */
    int64_t used_tok;  /* tokens since the last take (settle corrections included) */
    uint32_t parallel; /* in flight on this host now (read only) */
    /* the fleet at the last renewal: what Redis counts in the window (used and leased), and the
     * leases granted within lease_ttl (what hosts may still admit unseen: the bound of how many
     * fewer than the limit the fleet may admit) */
    int64_t fleet_req, fleet_tok, out_req, out_tok;
    int64_t fleet_par;         /* parallel slots held by the fleet's hosts */
    uint64_t win_req, win_tok; /* this host's window (limit_lease_take only) */
    uint32_t need_tok;         /* largest request the lease's tokens refused since the last take */
    /* budget_usd: nano-USD this host may still reserve, spent since the last take (settled),
     * reserved by requests in flight, the largest cost the lease refused, the period's start,
     * and the fleet's spent at the last renewal */
    int64_t nano, used_nano;
    uint64_t reserved_nano, need_nano;
    int64_t period_start, fleet_spent;
};

/* While the fleet cannot be asked (Redis away): what a leased limiter admits against. */
enum limit_fallback {
    LIMIT_FALLBACK_NONE = 0,  /* the lease pool (req, tok, par) applies */
    LIMIT_FALLBACK_SHARE = 1, /* this host's window holds at most the caps (limit / hosts) */
    LIMIT_FALLBACK_OPEN = 2,  /* only the local limits apply */
    LIMIT_FALLBACK_CLOSED = 3 /* every request is refused (dim LIMIT_FLEET) */
};

/* The fleet as the sync process last saw it, for show cluster and /metrics (atomics: one
 * writer, the sync process). */
struct limit_fleet {
    _Atomic uint32_t state;       /* enum limit_fleet_state */
    _Atomic uint32_t nodes_alive; /* hosts whose heartbeat is recent, this one included */
    _Atomic uint64_t since_ms;    /* wall clock of the last state change */
    _Atomic uint64_t renewals;    /* leases renewed */
    _Atomic uint64_t errors;      /* Redis calls failed or timed out */
    _Atomic uint64_t rtt_us;      /* the last renewal's round trip */
    _Atomic uint32_t primed;      /* every leased limiter had its first answer, or the fallback
                                   * applies: a new generation may serve (reload) */
    _Atomic uint32_t node_clash;  /* another aigw instance heartbeats under this node_name (the
                                   * fleet's leases and counts of the two get mixed up) */
};

enum limit_fleet_state {
    LIMIT_FLEET_CONNECTING = 0, /* no answer from Redis yet since start */
    LIMIT_FLEET_CONNECTED = 1,
    LIMIT_FLEET_FALLBACK = 2, /* Redis unreachable or slow: the fallback policy applies */
};

/* Bytes a region of n limiters with these specs and n_owners owner slots needs (a multiple of
 * 64). Owners are the worker slots that admit (limit_admit's owner, < n_owners). */
size_t limit_region_size(uint32_t n, const struct limit_spec *specs, uint32_t n_owners);
/* Lays the region out in mem (64-byte aligned, `size` from limit_region_size, zeroed or not)
 * and initialises every limiter's lock: do it once, before the processes that share it fork.
 * wall_s: now (UTC seconds), the start of every budget's first period. 0 or -errno. */
int limit_region_init(void *mem, size_t size, uint32_t n, const struct limit_spec *specs,
                      uint32_t n_owners, int64_t wall_s);
uint32_t limit_region_count(const struct limit_region *r);

/* Admits a request against limiters ids[0..n) (n <= LIMIT_MAX_IDS; duplicates count once),
 * all or nothing: returns 0 and fills *t when every limiter admits it, after counting one request
 * and `tokens` in each window, taking a parallel slot and reserving cost_nano of each budget;
 * returns -EAGAIN with nothing changed when one refuses (*v says which, and when to retry);
 * -EINVAL for bad arguments. now_ms: CLOCK_MONOTONIC ms (windows); wall_s: UTC seconds (budget
 * periods). owner: the caller's worker slot (see limit_release_owner). *v is filled either way. */
int limit_admit(struct limit_region *r, const uint32_t *ids, uint32_t n, uint64_t now_ms,
                int64_t wall_s, uint64_t tokens, uint64_t cost_nano, uint32_t owner,
                struct limit_ticket *t, struct limit_verdict *v);

/* The request of *t ended: its tokens in each window become real_tokens (up or down, while
 * the admission is still in the window), its parallel slots are given back, its reservations
 * released and real_cost_nano spent. *t is emptied; settling it again does nothing. */
void limit_settle(struct limit_region *r, struct limit_ticket *t, uint64_t now_ms, int64_t wall_s,
                  uint64_t real_tokens, uint64_t real_cost_nano);

/* Master, when it reaps worker slot `owner`: gives back every parallel slot and budget
 * reservation still held by it (its admissions stay counted in the windows). Like every master
 * call it waits LIMIT_MASTER_WAIT_MS at most for a limiter's lock: -EBUSY when one could not be
 * had (a live process stopped while holding it); what that limiter holds for the owner stays,
 * for a later call (the slot must not run a new worker before). 0 when all was given back. */
int limit_release_owner(struct limit_region *r, uint32_t owner);

/* A limiter's state for `show keys`. -EINVAL for a bad id; -EBUSY when its lock was not had
 * within LIMIT_MASTER_WAIT_MS (a worker stopped while holding it): then only out->spec is set,
 * the counts are 0. For the master: it never blocks longer than that. */
int limit_info(struct limit_region *r, uint32_t id, uint64_t now_ms, int64_t wall_s,
               struct limit_info *out);

/* The budget of limiter id, for the state file (the master: -EBUSY as limit_info). */
int limit_budget_get(struct limit_region *r, uint32_t id, struct limit_budget *out);

/* What limit_budget_set did with the saved `spent` when budget_period changed. */
enum limit_budget_fate {
    LIMIT_BUDGET_SAME = 0,    /* the same kind of period: spent kept as it was */
    LIMIT_BUDGET_CARRIED = 1, /* another kind, whose period holds the saved one: spent kept */
    LIMIT_BUDGET_DROPPED = 2, /* another kind, that cannot hold it (month -> day, total ->
                               * month, ...): the period starts at zero */
};

/* Puts a saved budget back (at start, before the workers run; it waits for the lock): `spent`
 * is kept when the limiter counts the same kind of period, or one that contains the saved
 * period whole (day -> month, anything -> total: the period is then the new kind's that holds
 * the saved one); otherwise the current period starts at zero. A past period rolls over at the
 * next admission. *fate (may be NULL) says which. 0 or -EINVAL. */
int limit_budget_set(struct limit_region *r, uint32_t id, const struct limit_budget *b,
                     enum limit_budget_fate *fate);

/* Reload: limiter `from` of the old generation's region carried into limiter `to` of the new
 * one. Zero-initialise it (with from, to) before the first limit_carry_sync. */
struct limit_carry {
    uint32_t from, to;
    uint64_t seq;         /* the last admission of `from` already copied */
    uint64_t spent_nano;  /* `from`'s spent at the last sync */
    int64_t period_start; /* `from`'s period at the last sync */
};

/* Master: copies into `to` what `from` admitted since the last sync (its window log entries, at
 * their times; an entry already out of the window is skipped), adds what `from` spent since (the
 * budget, when both count the same kind of period), and sets the share of owner slot `owner` of
 * `to` to what `from` holds in flight (parallel slots, reserved money): in-flight requests of the
 * old generation settle in the old region, and the new one sees them until they have. The first
 * sync copies the whole window and spent. 0, -EINVAL, or -EBUSY when a lock was not had within
 * LIMIT_MASTER_WAIT_MS (nothing changed: the next sync copies it). */
int limit_carry_sync(struct limit_region *dst, struct limit_region *src, uint32_t owner,
                     struct limit_carry *c, uint64_t now_ms);
/* The old generation is gone: owner `owner`'s share of `to` is given back. 0, -EINVAL, or
 * -EBUSY (the lock was not had within LIMIT_MASTER_WAIT_MS: call again later). */
int limit_carry_end(struct limit_region *dst, uint32_t owner, const struct limit_carry *c);

/* ---- [cluster] leases: the sync process's side --------------------------------------------- */

/* The fleet's status block of the region. */
struct limit_fleet *limit_fleet(struct limit_region *r);
/* Whether limiter id is leased (its spec). */
int limit_leased(const struct limit_region *r, uint32_t id);
/* Takes a limiter's lease under its lock (waiting LIMIT_MASTER_WAIT_MS at most: -EBUSY): *out
 * gets it, and the used counts restart from 0 (they are reported with the renewal). What remains
 * is cut to keep_req requests and keep_tok tokens (INT64_MAX: all kept; a debt stays), and the
 * parallel slots to max(keep_par, in flight): the caller returns the rest to the fleet (slots are
 * cut here first, so that none is used while Redis already lets another host have it). *out has
 * the lease before the cuts, the slots in flight when they were made, and this host's window
 * at now_ms (CLOCK_MONOTONIC). 0, -EINVAL, -EBUSY. */
int limit_lease_take(struct limit_region *r, uint32_t id, uint64_t now_ms, int64_t keep_req,
                     int64_t keep_tok, uint32_t keep_par, struct limit_lease *out);
/* The same for the budget lease: spent since the last take restarts from 0, what remains is cut
 * to keep_nano. */
int limit_lease_take_budget(struct limit_region *r, uint32_t id, int64_t wall_s, int64_t keep_nano,
                            struct limit_lease *out);

/* A renewal's answer, for limit_lease_grant. */
struct limit_grant {
    int64_t add_req, add_tok; /* granted: added to the lease */
    uint32_t par;             /* parallel slots the host may hold from now */
    uint64_t until_ms;        /* the lease is valid until then (CLOCK_MONOTONIC) */
    int64_t low_req, low_tok; /* an admission leaving less raises the hungry flag */
    int64_t fleet_req, fleet_tok, out_req, out_tok, fleet_par; /* see struct limit_lease */
};

/* A budget renewal's answer: nano-USD added to the lease (valid until until_ms), the fleet's
 * spent in the period. */
int limit_lease_grant_budget(struct limit_region *r, uint32_t id, int64_t add_nano,
                             uint64_t until_ms, int64_t fleet_spent);
/* Adds a grant to the lease and ends a fallback. 0, -EINVAL, -EBUSY. */
int limit_lease_grant(struct limit_region *r, uint32_t id, const struct limit_grant *g);
/* Sets the fallback mode (LIMIT_FALLBACK_SHARE: with the caps of this host's window). */
int limit_lease_fallback(struct limit_region *r, uint32_t id, enum limit_fallback f,
                         uint32_t cap_req, uint32_t cap_tok, uint32_t cap_par, uint64_t cap_nano);
/* Reads and clears the hungry flag (a worker found the lease low or spent). No lock. */
int limit_lease_hungry(struct limit_region *r, uint32_t id);
/* The lease as it is now, for show cluster (-EBUSY as limit_info). */
int limit_lease_get(struct limit_region *r, uint32_t id, struct limit_lease *out);

/* Start of the budget period containing wall_s, and of the next one (INT64_MAX for total). */
int64_t limit_period_start(enum limit_period p, int64_t wall_s);
int64_t limit_period_next(enum limit_period p, int64_t start);

const char *limit_dim_str(enum limit_dim d);
const char *limit_period_str(enum limit_period p);
/* "day" / "month" / "total" -> 0 and *p, else -EINVAL. */
int limit_period_parse(const char *s, enum limit_period *p);

#endif
