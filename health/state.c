/* The health checker's pure decisions: breaker, passive detection, DEGRADED, slow start,
 * check cadence (see state.h). */
#include "health/state.h"

#include <string.h>

void health_breaker_init(struct health_breaker *br, const struct health_breaker_cfg *cfg)
{
    br->st = BREAKER_CLOSED;
    br->until_ns = 0;
    br->open_ns = cfg->open_ns;
}

static void breaker_open(struct health_breaker *br, uint64_t now_ns, uint64_t open_ns)
{
    br->st = BREAKER_OPEN;
    br->open_ns = open_ns;
    br->until_ns = now_ns + open_ns;
}

static void breaker_close(struct health_breaker *br, const struct health_breaker_cfg *cfg)
{
    br->st = BREAKER_CLOSED;
    br->open_ns = cfg->open_ns;
    br->until_ns = 0;
}

int health_breaker_eval(struct health_breaker *br, const struct health_breaker_cfg *cfg,
                        uint64_t now_ns, const struct health_breaker_in *in)
{
    if (br->st == BREAKER_CLOSED) {
        if (cfg->failures == 0 ||
            (!(in->trips & SHM_TRIP_BREAKER) && in->consecutive < cfg->failures))
            return 0;
        breaker_open(br, now_ns, cfg->open_ns);
        return 1;
    }
    /* OPEN past until_ns admits trials already: their verdict may come before HALF_OPEN. */
    if (in->trips & SHM_TRIP_FAILED) {
        uint64_t next = br->open_ns * 2;

        breaker_open(br, now_ns, next > cfg->open_max_ns ? cfg->open_max_ns : next);
        return 1;
    }
    if (in->trips & SHM_TRIP_PASSED) {
        breaker_close(br, cfg);
        return 1;
    }
    if (br->st == BREAKER_OPEN && now_ns >= br->until_ns) {
        br->st = BREAKER_HALF_OPEN;
        return 1;
    }
    return 0;
}

int health_breaker_command(struct health_breaker *br, const struct health_breaker_cfg *cfg,
                           enum breaker_cmd cmd, uint64_t now_ns)
{
    enum breaker_state was = br->st;

    if (cmd == BREAKER_CMD_RESET)
        breaker_close(br, cfg);
    else if (cmd == BREAKER_CMD_OPEN)
        breaker_open(br, now_ns, cfg->open_ns);
    else
        return 0;
    return br->st != was || cmd == BREAKER_CMD_OPEN;
}

int health_live_eval(const struct health_live_cfg *cfg, const struct health_live_in *in,
                     uint64_t now_ns, enum backend_state *st, enum backend_reason *why)
{
    /* 401/403: the backend's key is bad, whatever else is going on. */
    if ((in->auth_failures > in->auth_seen || (in->trips & SHM_TRIP_AUTH)) &&
        !(in->st == BACKEND_DOWN && in->reason == REASON_AUTH)) {
        *st = BACKEND_DOWN;
        *why = REASON_AUTH;
        return 1;
    }
    if (in->st == BACKEND_DOWN) {
        /* With checks on, only they bring it back (rise). With checks off, a passive or
         * auth DOWN ends with a live success after it went DOWN (a worker's trial). */
        if (!cfg->checks && (in->reason == REASON_PASSIVE || in->reason == REASON_AUTH) &&
            (in->last_ok_ns > in->since_ns || (in->trips & SHM_TRIP_PASSED))) {
            *st = BACKEND_UP;
            *why = REASON_LIVE_OK;
            return 1;
        }
        return 0;
    }
    if (cfg->max_fails &&
        (in->recent_failures >= cfg->max_fails || (in->trips & SHM_TRIP_PASSIVE))) {
        *st = BACKEND_DOWN;
        *why = REASON_PASSIVE;
        return 1;
    }

    /* UP <-> DEGRADED, with some hysteresis so a backend near the line doesn't flap. */
    {
        uint64_t total = in->window_ok + in->window_failed;
        int slow = cfg->degraded_latency_us && in->check_us > cfg->degraded_latency_us;
        int fast = !cfg->degraded_latency_us || in->check_us * 10 < cfg->degraded_latency_us * 8;
        int erring = cfg->degraded_error_pct && total >= cfg->degraded_min_requests &&
                     in->window_failed * 100 > total * cfg->degraded_error_pct;
        int clean = !cfg->degraded_error_pct || total < cfg->degraded_min_requests ||
                    in->window_failed * 100 * 10 <= total * cfg->degraded_error_pct * 8;

        if (in->st == BACKEND_UP && (slow || erring)) {
            *st = BACKEND_DEGRADED;
            *why = slow ? REASON_CHECK_SLOW : REASON_ERROR_RATIO;
            return 1;
        }
        if (in->st == BACKEND_DEGRADED && fast && clean) {
            *st = BACKEND_UP;
            *why = REASON_CHECK_OK;
            return 1;
        }
    }
    return 0;
}

void health_admission(const struct health_live_cfg *lc, const struct health_breaker_cfg *brc,
                      enum backend_state st, enum backend_reason why, uint64_t since_ns,
                      const struct health_breaker *br, struct shm_admission *out)
{
    memset(out, 0, sizeof(*out));
    if (st == BACKEND_DOWN) {
        if (lc->checks || (why != REASON_PASSIVE && why != REASON_AUTH)) {
            out->kind = SHM_ADMIT_NONE;
            return;
        }
        /* checks off: a live request is what brings it back, one at a time */
        out->kind = SHM_ADMIT_TRIAL;
        out->trials = 1;
        out->need = 1;
        out->from_ns = since_ns + lc->fail_timeout_ns;
    }
    if (br->st != BREAKER_CLOSED) {
        uint32_t trials = brc->trials ? brc->trials : 1, need = brc->successes ? brc->successes : 1;

        if (out->kind != SHM_ADMIT_TRIAL || trials < out->trials)
            out->trials = trials;
        if (need > out->need)
            out->need = need;
        if (br->until_ns > out->from_ns)
            out->from_ns = br->until_ns;
        out->fail_stops = 1;
        out->kind = SHM_ADMIT_TRIAL;
    }
    if (out->kind == SHM_ADMIT_ALL) {
        out->max_fails = lc->max_fails;
        out->fail_window_ns = lc->max_fails ? lc->fail_timeout_ns : 0;
        out->consec = brc->failures;
    }
}

int health_admission_equal(const struct shm_admission *a, const struct shm_admission *b)
{
    return a->kind == b->kind && a->trials == b->trials && a->need == b->need &&
           a->fail_stops == b->fail_stops && a->from_ns == b->from_ns &&
           a->max_fails == b->max_fails && a->consec == b->consec &&
           a->fail_window_ns == b->fail_window_ns;
}

uint32_t health_effective_weight(uint32_t weight, enum backend_state st, uint32_t degraded_pct,
                                 uint64_t up_since_ns, uint64_t slowstart_ns, uint64_t now_ns)
{
    uint64_t w = weight;

    if (weight == 0)
        return 0;
    if (st == BACKEND_DEGRADED)
        w = w * degraded_pct / 100;
    if (slowstart_ns && now_ns >= up_since_ns && now_ns - up_since_ns < slowstart_ns)
        w = w * (now_ns - up_since_ns) / slowstart_ns;
    return w ? (uint32_t)w : 1;
}

uint64_t health_next_check_ns(const struct health_cadence_cfg *cfg, enum backend_state st,
                              int changing, uint64_t rnd)
{
    uint64_t base = cfg->inter_ns, span;

    if (changing && cfg->fastinter_ns)
        base = cfg->fastinter_ns;
    else if (st == BACKEND_DOWN && cfg->downinter_ns)
        base = cfg->downinter_ns;
    span = base * cfg->jitter_pct / 100;
    if (span == 0)
        return base;
    /* base - span .. base + span */
    return base - span + rnd % (2 * span + 1);
}
