/* The health checker's decisions as pure functions of their inputs and `now`: circuit breaker,
 * passive detection, DEGRADED, slow start and check cadence. The process (health.c) reads shm,
 * calls these, and writes back what changed. */
#ifndef AIGW_HEALTH_STATE_H
#define AIGW_HEALTH_STATE_H

#include <stdint.h>

#include "shm/shm.h"

/* ---- circuit breaker ---------------------------------------------------------------------- */

struct health_breaker_cfg {
    uint32_t failures;    /* consecutive failures that open it (0 = breaker off) */
    uint64_t open_ns;     /* first open period */
    uint64_t open_max_ns; /* the open period doubles on each failed trial, up to this */
    uint32_t successes;   /* trial successes that close it */
};

struct health_breaker {
    enum breaker_state st;
    uint64_t until_ns;  /* OPEN: end of the open period */
    uint64_t open_ns;   /* current open period */
    uint64_t closed_ns; /* when it last closed: failures before this no longer count */
    uint64_t ok_base;   /* HALF_OPEN: outcome totals when the trial period began */
    uint64_t fail_base;
};

void health_breaker_init(struct health_breaker *br, const struct health_breaker_cfg *cfg);

/* Failures count as consecutive from this time: the later of the last success and the
 * breaker's last closing. */
uint64_t health_breaker_since(const struct health_breaker *br, uint64_t last_ok_ns);

/* One evaluation. consecutive: failures since health_breaker_since(); ok/failed: cumulative
 * outcome totals of the backend. Returns 1 when the state changed. */
int health_breaker_eval(struct health_breaker *br, const struct health_breaker_cfg *cfg,
                        uint64_t now_ns, uint32_t consecutive, uint64_t ok, uint64_t failed);

/* Operator command (aigwctl breaker reset|open). Returns 1 when the state changed. */
int health_breaker_command(struct health_breaker *br, const struct health_breaker_cfg *cfg,
                           enum breaker_cmd cmd, uint64_t now_ns, uint64_t ok, uint64_t failed);

/* ---- passive detection, DEGRADED, slow start ---------------------------------------------- */

struct health_live_cfg {
    uint32_t max_fails; /* failures within fail_timeout that mark DOWN (0 = off) */
    uint64_t fail_timeout_ns;
    int checks;                     /* active checks on: they bring a passive DOWN back */
    uint64_t degraded_latency_us;   /* checks slower than this: DEGRADED (0 = off) */
    uint32_t degraded_error_pct;    /* live errors above this % of requests: DEGRADED (0 = off) */
    uint32_t degraded_min_requests; /* the error ratio needs at least this many requests */
};

/* What the checker knows of one backend at an evaluation. */
struct health_live_in {
    enum backend_state st;
    enum backend_reason reason;
    uint64_t since_ns;                 /* last state change */
    uint32_t recent_failures;          /* failures after max(now - fail_timeout, since_ns) */
    uint64_t last_ok_ns;               /* latest live success */
    uint64_t auth_failures;            /* cumulative 401/403 answers */
    uint64_t auth_seen;                /* auth_failures already acted on */
    uint64_t check_us;                 /* smoothed active-check duration (0 = none) */
    uint64_t window_ok, window_failed; /* live outcomes over the error-ratio window */
};

/* Decides the state after one evaluation of live traffic (the active checks' rise/fall is
 * separate). Returns 1 with *st and *why set when it changes. */
int health_live_eval(const struct health_live_cfg *cfg, const struct health_live_in *in,
                     uint64_t now_ns, enum backend_state *st, enum backend_reason *why);

/* May a worker send a trial request to a backend that is DOWN for a passive reason while
 * checks are off? (after fail_timeout; the trial's success brings it back). */
int health_live_trial_allowed(const struct health_live_cfg *cfg, enum backend_state st,
                              enum backend_reason why, uint64_t since_ns, uint64_t now_ns);

/* Effective weight: DEGRADED scales it to degraded_pct; within slowstart_ns of coming UP it
 * ramps from 1 to full. Never 0 for a configured weight > 0. */
uint32_t health_effective_weight(uint32_t weight, enum backend_state st, uint32_t degraded_pct,
                                 uint64_t up_since_ns, uint64_t slowstart_ns, uint64_t now_ns);

/* ---- check cadence ------------------------------------------------------------------------ */

struct health_cadence_cfg {
    uint64_t inter_ns;     /* check_interval */
    uint64_t fastinter_ns; /* while a rise/fall streak is under way */
    uint64_t downinter_ns; /* while DOWN */
    uint32_t jitter_pct;   /* +- this % of the interval */
};

/* Delay to the next check. changing: a streak toward the other state is under way.
 * rnd: a uniform random number (the caller's generator). */
uint64_t health_next_check_ns(const struct health_cadence_cfg *cfg, enum backend_state st,
                              int changing, uint64_t rnd);

#endif
