/* The health checker's pure decisions: breaker, passive detection, DEGRADED, slow start,
 * check cadence (see state.h). */
#include "health/state.h"

void health_breaker_init(struct health_breaker *br, const struct health_breaker_cfg *cfg)
{
    br->st = BREAKER_CLOSED;
    br->until_ns = 0;
    br->open_ns = cfg->open_ns;
    br->closed_ns = 0;
    br->ok_base = br->fail_base = 0;
}

uint64_t health_breaker_since(const struct health_breaker *br, uint64_t last_ok_ns)
{
    return last_ok_ns > br->closed_ns ? last_ok_ns : br->closed_ns;
}

static void breaker_open(struct health_breaker *br, uint64_t now_ns, uint64_t open_ns)
{
    br->st = BREAKER_OPEN;
    br->open_ns = open_ns;
    br->until_ns = now_ns + open_ns;
}

static void breaker_close(struct health_breaker *br, const struct health_breaker_cfg *cfg,
                          uint64_t now_ns)
{
    br->st = BREAKER_CLOSED;
    br->open_ns = cfg->open_ns;
    br->until_ns = 0;
    br->closed_ns = now_ns;
}

int health_breaker_eval(struct health_breaker *br, const struct health_breaker_cfg *cfg,
                        uint64_t now_ns, uint32_t consecutive, uint64_t ok, uint64_t failed)
{
    switch (br->st) {
    case BREAKER_CLOSED:
        if (cfg->failures == 0 || consecutive < cfg->failures)
            return 0;
        breaker_open(br, now_ns, cfg->open_ns);
        return 1;
    case BREAKER_OPEN:
        if (now_ns < br->until_ns)
            return 0;
        br->st = BREAKER_HALF_OPEN;
        br->ok_base = ok;
        br->fail_base = failed;
        return 1;
    case BREAKER_HALF_OPEN:
        if (failed > br->fail_base) {
            uint64_t next = br->open_ns * 2;

            breaker_open(br, now_ns, next > cfg->open_max_ns ? cfg->open_max_ns : next);
            return 1;
        }
        if (ok - br->ok_base >= (cfg->successes ? cfg->successes : 1)) {
            breaker_close(br, cfg, now_ns);
            return 1;
        }
        return 0;
    }
    return 0;
}

int health_breaker_command(struct health_breaker *br, const struct health_breaker_cfg *cfg,
                           enum breaker_cmd cmd, uint64_t now_ns, uint64_t ok, uint64_t failed)
{
    enum breaker_state was = br->st;

    if (cmd == BREAKER_CMD_RESET)
        breaker_close(br, cfg, now_ns);
    else if (cmd == BREAKER_CMD_OPEN)
        breaker_open(br, now_ns, cfg->open_ns);
    else
        return 0;
    br->ok_base = ok;
    br->fail_base = failed;
    return br->st != was || cmd == BREAKER_CMD_OPEN;
}

int health_live_eval(const struct health_live_cfg *cfg, const struct health_live_in *in,
                     uint64_t now_ns, enum backend_state *st, enum backend_reason *why)
{
    /* 401/403: the backend's key is bad, whatever else is going on. */
    if (in->auth_failures > in->auth_seen &&
        !(in->st == BACKEND_DOWN && in->reason == REASON_AUTH)) {
        *st = BACKEND_DOWN;
        *why = REASON_AUTH;
        return 1;
    }
    if (in->st == BACKEND_DOWN) {
        /* With checks on, only they bring it back (rise). With checks off, a passive or
         * auth DOWN ends with a live success after it went DOWN (a worker's trial). */
        if (!cfg->checks && (in->reason == REASON_PASSIVE || in->reason == REASON_AUTH) &&
            in->last_ok_ns > in->since_ns) {
            *st = BACKEND_UP;
            *why = REASON_LIVE_OK;
            return 1;
        }
        return 0;
    }
    if (cfg->max_fails && in->recent_failures >= cfg->max_fails) {
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

int health_live_trial_allowed(const struct health_live_cfg *cfg, enum backend_state st,
                              enum backend_reason why, uint64_t since_ns, uint64_t now_ns)
{
    return !cfg->checks && st == BACKEND_DOWN && (why == REASON_PASSIVE || why == REASON_AUTH) &&
           now_ns >= since_ns + cfg->fail_timeout_ns;
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
