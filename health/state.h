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
    uint32_t trials;      /* trial requests in flight at once while it is not closed */
};

struct health_breaker {
    enum breaker_state st;
    uint64_t until_ns; /* OPEN: end of the open period (trials are admitted from then on) */
    uint64_t open_ns;  /* current open period */
};

/* What the workers reported for the current admission epoch. */
struct health_breaker_in {
    uint32_t consecutive; /* consecutive failures they counted */
    uint32_t trips;       /* SHM_TRIP_* they set: BREAKER, and PASSED / FAILED of the trials */
};

void health_breaker_init(struct health_breaker *br, const struct health_breaker_cfg *cfg);

/* One evaluation: CLOSED opens on a BREAKER trip (or the count reaching `failures`); OPEN turns
 * HALF_OPEN at until_ns; trials that PASSED close it, one that FAILED opens it again for twice
 * as long. Returns 1 when the state changed. */
int health_breaker_eval(struct health_breaker *br, const struct health_breaker_cfg *cfg,
                        uint64_t now_ns, const struct health_breaker_in *in);

/* Operator command (aigwctl breaker reset|open). Returns 1 when the state changed. */
int health_breaker_command(struct health_breaker *br, const struct health_breaker_cfg *cfg,
                           enum breaker_cmd cmd, uint64_t now_ns);

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
    uint32_t trips;                    /* SHM_TRIP_* the workers set in the current epoch */
};

/* Decides the state after one evaluation of live traffic (the active checks' rise/fall is
 * separate). Returns 1 with *st and *why set when it changes. */
int health_live_eval(const struct health_live_cfg *cfg, const struct health_live_in *in,
                     uint64_t now_ns, enum backend_state *st, enum backend_reason *why);

/* What workers may send to a backend (published with its state; they apply it as it is):
 * UP/DEGRADED with a closed breaker take everything, with the thresholds at which a worker trips
 * the gate (max_fails within fail_timeout, the breaker's consecutive failures); a breaker not
 * closed takes `trials` trial requests from until_ns, `successes` of which close it and one
 * failed reopens it; DOWN for a passive or auth reason with checks off takes one trial at a time
 * from fail_timeout after it went DOWN, whose success brings it back; any other DOWN takes
 * nothing. The operator's state and 429 cool-downs are the workers' own to apply. */
void health_admission(const struct health_live_cfg *lc, const struct health_breaker_cfg *brc,
                      enum backend_state st, enum backend_reason why, uint64_t since_ns,
                      const struct health_breaker *br, struct shm_admission *out);
int health_admission_equal(const struct shm_admission *a, const struct shm_admission *b);

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
