/* The health checker process: active checks with rise/fall, and every 25 ms an evaluation of
 * what the workers recorded (breaker, passive detection, DEGRADED, effective weight). The only
 * writer of backend health and breaker state in shm. One libuv loop; nothing here blocks it. */
#include "health/health.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>

#include "core/log.h"
#include "core/sig.h"
#include "core/tls.h"
#include "core/upstream.h"
#include "core/util.h"
#include "health/check.h"
#include "health/state.h"
#include "health/stats.h"

#define HEALTH_REQ_MAX 4096
/* Buffers of the checker's upstream client: a response head must fit (as in a worker, where
 * one that does not is a bad response). */
#define HEALTH_BUF_DATA (32 * 1024)
#define HEALTH_BUF_HDRS 256
#define HEALTH_BUF_FREE 8 /* kept for reuse: about the checks that run at once */
#define HEALTH_EVAL_MS  25
#define MS_NS           1000000ULL

/* Defaults for settings a config may leave at 0 where 0 would make no sense. */
#define HEALTH_FAIL_TIMEOUT_MS       10000
#define HEALTH_BREAKER_OPEN_MS       5000
#define HEALTH_BREAKER_OPEN_MAX_MS   60000
#define HEALTH_DEGRADED_WEIGHT_PCT   50
#define HEALTH_DEGRADED_MIN_REQUESTS 10 /* the error ratio of fewer requests says little */

struct health;

/* One backend: its active checks (when the pool has them) and its evaluated state. */
struct hc_backend {
    struct health *h;
    uint32_t idx; /* index in conf.backends and shm */
    const struct conf_backend *cb;
    const struct conf_pool *pool;

    /* active checks */
    int checked; /* checks run for this backend */
    struct check ck;
    struct check_spec spec;
    char *request;
    uv_timer_t tick;     /* next check */
    int handles;         /* ck and tick are initialised (to be closed) */
    uint64_t started_ms; /* start of the last check, to keep the period independent of its length */
    uint64_t started_ns; /* the same, monotonic: against since_ns */
    struct health_rf rf;
    int one_pass_up;  /* DOWN from live traffic: the next passing check brings it back */
    uint64_t ewma_us; /* smoothed duration of passing checks, 0 = none since it came up */

    /* decisions: configuration resolved once, state mirrored from what we wrote to shm */
    struct health_breaker_cfg brc;
    struct health_live_cfg lc;
    struct health_cadence_cfg cad;
    uint32_t degraded_weight_pct;
    uint64_t slowstart_ns;
    struct health_breaker br;
    struct health_window win;
    enum backend_state st;
    enum backend_reason why;
    uint64_t since_ns;    /* last state change */
    uint64_t transitions; /* state changes so far */
    uint64_t up_since_ns; /* last DOWN -> UP, for slow start (0 = none) */
    uint64_t auth_seen;   /* 401/403 answers already acted on */
    uint32_t weight_cfg;  /* the operator's weight, as the last evaluation read it */
    uint32_t weight_eff;
    int32_t check_status; /* last check: as struct shm_health has them */
    uint32_t check_us;
    uint64_t check_at_ns;
    /* `aigwctl check`: the request being carried out (0 = none), and whether the running
     * check was started for it (one begun before the request does not answer it) */
    uint32_t cmd_seq;
    int cmd_check;
    struct shm_health pub; /* the record last published, epoch included */
    /* Failure total at the last evaluation. Failure counts over a window that only moves
     * forward cannot grow without new failures, so the rings are scanned only when it moved. */
    uint64_t failed_seen;
};

struct health {
    uv_loop_t loop;
    struct conf *conf;
    struct shm *shm;
    uv_signal_t sigterm, sigint, sigquit;
    uv_timer_t eval;
    struct log_rate local_log; /* "check not run" lines */
    /* The checks' HTTP client: the workers' code (resolver, address order, TLS, parser) in
     * this process, with no worker slot to count in and no pooling. */
    struct upstream up;
    struct bufpool bufs;
    int up_ok; /* up is initialised */
    int eval_open;
    struct hc_backend *b;
    int n;
    int stopping;
    int signals_ok; /* the signal handles are initialised */
    uint64_t rng;   /* splitmix64 state, seeded per process */
};

int health_rf_on_result(struct health_rf *rf, enum backend_state *st, int ok, int rise, int fall)
{
    if (rise < 1)
        rise = 1;
    if (fall < 1)
        fall = 1;
    /* DEGRADED still serves: its failures count toward DOWN like UP's. */
    if (*st != BACKEND_DOWN) {
        rf->ok_streak = 0;
        if (ok) {
            rf->fail_streak = 0;
            return 0;
        }
        if (++rf->fail_streak < fall)
            return 0;
        *st = BACKEND_DOWN;
    } else {
        rf->fail_streak = 0;
        if (!ok) {
            rf->ok_streak = 0;
            return 0;
        }
        if (++rf->ok_streak < rise)
            return 0;
        *st = BACKEND_UP;
    }
    rf->ok_streak = 0;
    rf->fail_streak = 0;
    return 1;
}

/* splitmix64: this only spreads timers, it need not be strong; per process so that checkers
 * of successive generations don't draw the same jitter. */
static uint64_t health_rand(struct health *h)
{
    return util_mix64(h->rng += 0x9e3779b97f4a7c15ULL);
}

static void health_on_tick(uv_timer_t *t);

/* uv_timer_start fails only on a closing handle: ticks close only when the checker stops, and
 * nothing arms them after that (h->stopping). */
static void health_arm(struct hc_backend *hb, uint64_t delay_ms)
{
    uv_timer_start(&hb->tick, health_on_tick, delay_ms, 0);
}

/* A streak toward the other state is under way: check at the fast interval. */
static int health_changing(const struct hc_backend *hb)
{
    return hb->st == BACKEND_DOWN ? hb->rf.ok_streak > 0 : hb->rf.fail_streak > 0;
}

/* Next start: the cadence's delay after the last start, so a slow check doesn't stretch the
 * period. */
static void health_arm_next(struct hc_backend *hb)
{
    uint64_t delay =
        health_next_check_ns(&hb->cad, hb->st, health_changing(hb), health_rand(hb->h)) / MS_NS;
    uint64_t next = hb->started_ms + delay;
    uint64_t now = uv_now(&hb->h->loop);

    health_arm(hb, next > now ? next - now : 0);
}

/* Records a state change here and in shm. Entering or leaving DOWN starts the rise/fall
 * streaks afresh (after a passive or auth DOWN, `rise` passing checks bring it back) and the
 * check duration is measured afresh once it is back. */
static void health_eval_weight(struct hc_backend *hb, uint64_t now);

static void health_set_state(struct hc_backend *hb, enum backend_state st, enum backend_reason why,
                             uint64_t now)
{
    int down_edge = (hb->st == BACKEND_DOWN) != (st == BACKEND_DOWN);

    if (hb->st == BACKEND_DOWN && st != BACKEND_DOWN)
        hb->up_since_ns = now;
    if (st == BACKEND_DOWN && hb->st != BACKEND_DOWN)
        hb->ewma_us = 0;
    hb->st = st;
    hb->why = why;
    hb->since_ns = now;
    hb->transitions++;
    /* Published with the state (health_publish): a worker that sees the backend back UP sees
     * its slow-start weight too, not the full weight it had before it went DOWN. */
    health_eval_weight(hb, now);
    if (down_edge) {
        hb->rf.ok_streak = hb->rf.fail_streak = 0;
        /* DOWN from live traffic lasts "until an active check passes": one pass, not `rise`,
         * at the DOWN cadence; a check that fails on the way starts the usual rise count. */
        hb->one_pass_up = st == BACKEND_DOWN && (why == REASON_PASSIVE || why == REASON_AUTH);
        /* The cadence changes (check_downinter): re-plan an idle check. */
        if (hb->checked && !hb->h->stopping && !check_running(&hb->ck))
            health_arm_next(hb);
    }
}

/* Publishes the backend's record when something in it changed: state, breaker, weight, check
 * and the admission they give (health_admission). A new admission, or trips acted on
 * (trips_taken), opens a new epoch: the workers' gate and claims start afresh. */
static void health_publish(struct hc_backend *hb, int trips_taken)
{
    struct shm_health h;
    int new_epoch;

    memset(&h, 0, sizeof(h));
    h.state = hb->st;
    h.reason = hb->why;
    h.since_ns = hb->since_ns;
    h.transitions = hb->transitions;
    h.weight_eff = hb->weight_eff;
    h.breaker = hb->br.st;
    h.breaker_until_ns = hb->br.until_ns;
    h.breaker_open_ns = hb->br.open_ns;
    h.check_status = hb->check_status;
    h.check_us = hb->check_us;
    h.check_at_ns = hb->check_at_ns;
    h.ewma_check_us = hb->ewma_us;
    health_admission(&hb->lc, &hb->brc, hb->st, hb->why, hb->since_ns, &hb->br, &h.adm);
    h.epoch = hb->pub.epoch;
    new_epoch = trips_taken || !health_admission_equal(&h.adm, &hb->pub.adm);
    if (!new_epoch && memcmp(&h, &hb->pub, sizeof(h)) == 0)
        return;
    shm_backend_publish(hb->h->shm, hb->idx, &h, new_epoch);
    hb->pub = h;
}

static void health_on_tick(uv_timer_t *t)
{
    struct hc_backend *hb = t->data;
    struct shm_backend_view v;
    int ret;

    hb->started_ms = uv_now(&hb->h->loop);
    shm_backend_view(hb->h->shm, hb->idx, &v);
    /* Maintenance pauses checks; the state is kept as it was. */
    if (v.admin == BACKEND_MAINT) {
        health_arm_next(hb);
        return;
    }
    hb->started_ns = time_mono_ns();
    ret = check_start(&hb->ck);
    if (ret < 0) {
        log_warn("backend %s/%s: cannot start check: %s", hb->pool->name, hb->cb->name,
                 strerror(-ret));
        health_arm_next(hb);
    }
}

/* Starts a check now for the operator's request (from the evaluation, or right after the
 * check that was running when it came); answers at once when none can start. */
static void health_cmd_start(struct hc_backend *hb)
{
    int ret;

    uv_timer_stop(&hb->tick);
    hb->started_ms = uv_now(&hb->h->loop);
    hb->started_ns = time_mono_ns();
    hb->cmd_check = 1;
    ret = check_start(&hb->ck);
    if (ret < 0) {
        struct shm_check_answer a = {.ok = SHM_CHECK_NOT_RUN, .status = ret};
        snprintf(a.detail, sizeof(a.detail), "cannot start the check: %s", strerror(-ret));
        shm_backend_check_answer(hb->h->shm, hb->idx, hb->cmd_seq, &a);
        hb->cmd_seq = 0;
        hb->cmd_check = 0;
        health_arm_next(hb);
    }
}

/* A check has reported: it answers the operator's request it was started for, or a request
 * that came while it ran starts another at once; else the next one is planned. */
static void health_check_done(struct hc_backend *hb, const struct check_result *res)
{
    if (hb->h->stopping)
        return;
    if (hb->cmd_seq && hb->cmd_check) {
        struct shm_check_answer a = {.ok = res->local ? SHM_CHECK_NOT_RUN
                                           : res->ok  ? SHM_CHECK_PASS
                                                      : SHM_CHECK_FAIL,
                                     .status = res->status,
                                     .dur_us = res->dur_us};
        snprintf(a.detail, sizeof(a.detail), "%s", res->detail);
        shm_backend_check_answer(hb->h->shm, hb->idx, hb->cmd_seq, &a);
        hb->cmd_seq = 0;
        hb->cmd_check = 0;
    } else if (hb->cmd_seq) {
        health_cmd_start(hb);
        return;
    }
    health_arm_next(hb);
}

/* The evaluation's look at operator check requests: a new one starts a check now (even in
 * MAINT: the operator asked), or after the one running. */
static void health_eval_check_cmd(struct hc_backend *hb)
{
    uint32_t seq = shm_backend_check_cmd_seq(hb->h->shm, hb->idx);

    if (seq == 0 || seq == hb->cmd_seq || seq == shm_backend_check_answered(hb->h->shm, hb->idx))
        return;
    if (!hb->checked) {
        struct shm_check_answer a = {.ok = SHM_CHECK_NOT_RUN, .status = -ENOTSUP};
        snprintf(a.detail, sizeof(a.detail), "pool %s has no active checks (check = off)",
                 hb->pool->name);
        shm_backend_check_answer(hb->h->shm, hb->idx, seq, &a);
        return;
    }
    if (hb->cmd_seq && hb->cmd_check) {
        hb->cmd_seq = seq; /* a newer request while the check for an older one runs */
        return;
    }
    hb->cmd_seq = seq;
    if (!check_running(&hb->ck))
        health_cmd_start(hb);
}

static void health_on_check(struct check *ck, const struct check_result *res)
{
    struct hc_backend *hb = ck->data;
    struct health *h = hb->h;
    uint64_t now = time_mono_ns();
    enum backend_state st = hb->st;

    if (res->local) {
        /* the checker could not run the check (out of fds or memory): nothing is known of the
         * backend, so its state, streaks and last check stay as they were */
        uint64_t skipped;
        char note[LOG_RATE_NOTE];
        if (log_rate_ok(&h->local_log, uv_now(&h->loop), &skipped))
            log_warn("backend %s/%s: check not run: %s; state left as it is%s", hb->pool->name,
                     hb->cb->name, res->detail, log_rate_note(skipped, note));
        health_check_done(hb, res);
        return;
    }
    hb->check_status = res->status;
    hb->check_us = res->dur_us;
    hb->check_at_ns = now;
    /* A check begun before the backend went DOWN from live traffic says nothing of it since:
     * it is shown, but only one begun after brings the backend back. */
    if (hb->one_pass_up && hb->started_ns < hb->since_ns) {
        health_publish(hb, 0);
        health_check_done(hb, res);
        return;
    }
    /* Only passing checks measure the backend's speed; a failing one says nothing of it (a
     * timeout would only repeat check_timeout). Slowness is judged by the evaluation. */
    if (res->ok)
        hb->ewma_us = health_ewma_add(hb->ewma_us, res->dur_us);
    if (hb->one_pass_up && st == BACKEND_DOWN && res->ok) {
        health_set_state(hb, BACKEND_UP, REASON_CHECK_OK, now);
        log_info("backend %s/%s is UP: check passed (%d in %u ms)", hb->pool->name, hb->cb->name,
                 res->status, res->dur_us / 1000);
    } else if (hb->one_pass_up && !res->ok) {
        hb->one_pass_up = 0; /* still failing: back to the rise count */
        health_rf_on_result(&hb->rf, &st, 0, hb->pool->rise, hb->pool->fall);
    } else if (health_rf_on_result(&hb->rf, &st, res->ok, hb->pool->rise, hb->pool->fall)) {
        health_set_state(hb, st, res->ok ? REASON_CHECK_OK : res->why, now);
        if (st == BACKEND_UP)
            log_info("backend %s/%s is UP: check passed %d times (%d in %u ms)", hb->pool->name,
                     hb->cb->name, hb->pool->rise < 1 ? 1 : hb->pool->rise, res->status,
                     res->dur_us / 1000);
        else
            log_warn("backend %s/%s is DOWN: check failed %d times: %s", hb->pool->name,
                     hb->cb->name, hb->pool->fall < 1 ? 1 : hb->pool->fall, res->detail);
    } else if (res->ok) {
        log_debug("backend %s/%s: check passed: %s in %u us", hb->pool->name, hb->cb->name,
                  res->detail, res->dur_us);
    } else {
        log_debug("backend %s/%s: check failed: %s", hb->pool->name, hb->cb->name, res->detail);
    }
    health_publish(hb, 0);
    health_check_done(hb, res);
}

/* Operator commands first, then the breaker's own transitions from what the workers reported
 * in the current epoch (v, trips). */
static void health_eval_breaker(struct hc_backend *hb, uint64_t now,
                                const struct shm_backend_view *v, uint32_t trips)
{
    const char *pool = hb->pool->name, *name = hb->cb->name;
    enum breaker_cmd cmd = shm_backend_breaker_cmd_take(hb->h->shm, hb->idx);
    enum breaker_state was = hb->br.st;
    struct health_breaker_in in = {v->consec, trips};

    if (cmd != BREAKER_CMD_NONE) {
        if (!health_breaker_command(&hb->br, &hb->brc, cmd, now))
            return;
        if (hb->br.st == BREAKER_OPEN)
            log_warn("backend %s/%s breaker open for %llu ms: opened by the operator", pool, name,
                     (unsigned long long)(hb->br.open_ns / MS_NS));
        else
            log_info("backend %s/%s breaker closed: reset by the operator", pool, name);
        return;
    }
    if (!health_breaker_eval(&hb->br, &hb->brc, now, &in))
        return;
    switch (hb->br.st) {
    case BREAKER_OPEN:
        if (was != BREAKER_CLOSED)
            log_warn("backend %s/%s breaker open for %llu ms: trial request failed", pool, name,
                     (unsigned long long)(hb->br.open_ns / MS_NS));
        else
            log_warn("backend %s/%s breaker open for %llu ms: %u consecutive failures", pool, name,
                     (unsigned long long)(hb->br.open_ns / MS_NS), v->consec);
        break;
    case BREAKER_HALF_OPEN:
        log_info("backend %s/%s breaker half-open: trying %u request%s", pool, name, hb->brc.trials,
                 hb->brc.trials == 1 ? "" : "s");
        break;
    case BREAKER_CLOSED:
        log_info("backend %s/%s breaker closed: %u trial request%s succeeded", pool, name,
                 v->trial_ok, v->trial_ok == 1 ? "" : "s");
        break;
    }
}

/* Live traffic: passive DOWN, auth DOWN, DEGRADED and back. */
static void health_eval_live(struct hc_backend *hb, uint64_t now, uint64_t ok, uint64_t failed,
                             uint64_t last_ok, uint32_t trips)
{
    struct shm *shm = hb->h->shm;
    const char *pool = hb->pool->name, *name = hb->cb->name;
    struct health_live_in in;
    enum backend_state st;
    enum backend_reason why;
    uint64_t from = now > hb->lc.fail_timeout_ns ? now - hb->lc.fail_timeout_ns : 0;

    if (from < hb->since_ns)
        from = hb->since_ns;
    memset(&in, 0, sizeof(in));
    in.st = hb->st;
    in.reason = hb->why;
    in.since_ns = hb->since_ns;
    if (hb->lc.max_fails && failed != hb->failed_seen)
        in.recent_failures = shm_backend_failures_since(shm, hb->idx, from);
    in.last_ok_ns = last_ok;
    in.auth_failures = shm_backend_auth_failures(shm, hb->idx);
    in.trips = trips;
    in.auth_seen = hb->auth_seen;
    in.check_us = hb->ewma_us;
    health_window_update(&hb->win, now, ok, failed);
    health_window_delta(&hb->win, now, ok, failed, &in.window_ok, &in.window_failed);

    if (health_live_eval(&hb->lc, &in, now, &st, &why)) {
        uint64_t total = in.window_ok + in.window_failed;

        health_set_state(hb, st, why, now);
        switch (why) {
        case REASON_PASSIVE:
            log_warn("backend %s/%s is DOWN: passive: %u failures within %llu ms", pool, name,
                     in.recent_failures, (unsigned long long)(hb->lc.fail_timeout_ns / MS_NS));
            break;
        case REASON_AUTH:
            log_warn("backend %s/%s is DOWN: auth: the upstream answered 401/403 — its api_key "
                     "is bad",
                     pool, name);
            break;
        case REASON_CHECK_SLOW:
            log_warn("backend %s/%s is DEGRADED: check slow (%llu ms > %llu ms)", pool, name,
                     (unsigned long long)(in.check_us / 1000),
                     (unsigned long long)(hb->lc.degraded_latency_us / 1000));
            break;
        case REASON_ERROR_RATIO:
            log_warn("backend %s/%s is DEGRADED: error ratio: %llu of %llu requests failed in "
                     "the last %d s (%llu%% > %u%%)",
                     pool, name, (unsigned long long)in.window_failed, (unsigned long long)total,
                     HEALTH_WINDOW_SECS, (unsigned long long)(in.window_failed * 100 / total),
                     hb->lc.degraded_error_pct);
            break;
        case REASON_LIVE_OK:
            log_info("backend %s/%s is UP: a live request succeeded", pool, name);
            break;
        default:
            log_info("backend %s/%s is %s: no longer degraded (check %llu ms, %llu of %llu "
                     "requests failed in the last %d s)",
                     pool, name, shm_state_str(st), (unsigned long long)(in.check_us / 1000),
                     (unsigned long long)in.window_failed, (unsigned long long)total,
                     HEALTH_WINDOW_SECS);
            break;
        }
    }
    /* While it is DOWN for its key, further 401/403 (failed trials) are the same news; that
     * includes those seen by the evaluation that brings it back. */
    if ((in.st == BACKEND_DOWN && in.reason == REASON_AUTH) ||
        (hb->st == BACKEND_DOWN && hb->why == REASON_AUTH))
        hb->auth_seen = in.auth_failures;
}

static void health_eval_weight(struct hc_backend *hb, uint64_t now)
{
    hb->weight_eff =
        health_effective_weight(hb->weight_cfg, hb->st, hb->degraded_weight_pct, hb->up_since_ns,
                                hb->up_since_ns ? hb->slowstart_ns : 0, now);
}

/* Every HEALTH_EVAL_MS: the workers' trips and counts of the current epoch turned into state
 * (the workers obey the trips already), then the record published. */
static void health_on_eval(uv_timer_t *t)
{
    struct health *h = t->data;
    uint64_t now = time_mono_ns();

    for (int i = 0; i < h->n; i++) {
        struct hc_backend *hb = &h->b[i];
        struct shm_backend_view v;
        uint64_t ok, failed, last_ok;
        uint32_t trips;

        shm_backend_view(h->shm, hb->idx, &v);
        trips = v.h->epoch == hb->pub.epoch ? v.trips : 0;
        hb->weight_cfg = v.weight_cfg;
        shm_backend_outcomes(h->shm, hb->idx, &ok, &failed);
        last_ok = shm_backend_last_ok(h->shm, hb->idx);
        health_eval_breaker(hb, now, &v, trips);
        health_eval_live(hb, now, ok, failed, last_ok, trips);
        hb->failed_seen = failed;
        health_eval_weight(hb, now);
        health_publish(hb, trips != 0);
        shm_claims_repair(h->shm, hb->idx);
        health_eval_check_cmd(hb);
    }
}

/* Resolves the settings of every backend (per-backend overrides are already folded into
 * struct conf_backend) and takes over the state a previous checker left in shm. */
static void health_backend_setup(struct health *h, struct hc_backend *hb, uint32_t idx)
{
    const struct conf_backend *cb = &h->conf->backends[idx];
    const struct conf_pool *pool = &h->conf->pools[cb->pool];
    struct shm_backend_view v;

    hb->h = h;
    hb->idx = idx;
    hb->cb = cb;
    hb->pool = pool;

    hb->brc.failures = pool->breaker_failures;
    hb->brc.open_ns =
        (pool->breaker_open_for_ms ? pool->breaker_open_for_ms : HEALTH_BREAKER_OPEN_MS) * MS_NS;
    hb->brc.open_max_ns =
        (pool->breaker_open_max_ms ? pool->breaker_open_max_ms : HEALTH_BREAKER_OPEN_MAX_MS) *
        MS_NS;
    if (hb->brc.open_max_ns < hb->brc.open_ns)
        hb->brc.open_max_ns = hb->brc.open_ns;
    hb->brc.successes = pool->breaker_successes ? pool->breaker_successes : 1;
    hb->brc.trials = pool->breaker_half_open_calls ? pool->breaker_half_open_calls : 1;

    hb->lc.max_fails = cb->max_fails;
    hb->lc.fail_timeout_ns =
        (cb->fail_timeout_ms ? cb->fail_timeout_ms : HEALTH_FAIL_TIMEOUT_MS) * MS_NS;
    hb->lc.checks = pool->check;
    hb->lc.degraded_latency_us = pool->degraded_latency_ms * 1000;
    hb->lc.degraded_error_pct = pool->degraded_error_pct;
    hb->lc.degraded_min_requests = HEALTH_DEGRADED_MIN_REQUESTS;
    hb->degraded_weight_pct =
        pool->degraded_weight_pct ? pool->degraded_weight_pct : HEALTH_DEGRADED_WEIGHT_PCT;
    hb->slowstart_ns = cb->slowstart_ms * MS_NS;

    hb->cad.inter_ns = pool->check_interval_ms * MS_NS;
    hb->cad.fastinter_ns = pool->check_fastinter_ms * MS_NS;
    hb->cad.downinter_ns = pool->check_downinter_ms * MS_NS;
    hb->cad.jitter_pct = pool->check_jitter_pct;

    /* A restarted checker goes on from what shm says, not from a fresh UP. */
    shm_backend_view(h->shm, idx, &v);
    hb->pub = *v.h;
    hb->st = v.h->state;
    hb->why = v.h->reason;
    hb->since_ns = v.h->since_ns;
    hb->transitions = v.h->transitions;
    hb->ewma_us = v.h->ewma_check_us;
    hb->check_status = v.h->check_status;
    hb->check_us = v.h->check_us;
    hb->check_at_ns = v.h->check_at_ns;
    hb->weight_cfg = v.weight_cfg;
    hb->weight_eff = v.h->weight_eff;
    health_breaker_init(&hb->br, &hb->brc);
    hb->br.st = v.h->breaker;
    if (hb->br.st != BREAKER_CLOSED) {
        hb->br.until_ns = v.h->breaker_until_ns;
        if (v.h->breaker_open_ns)
            hb->br.open_ns = v.h->breaker_open_ns;
    }
    /* Old 401/403 answers were acted on by whoever was here before. */
    hb->auth_seen = shm_backend_auth_failures(h->shm, idx);
    hb->failed_seen = UINT64_MAX; /* the first evaluation looks at the rings */
}

static int health_backend_init_checks(struct health *h, struct hc_backend *hb)
{
    const struct conf_backend *cb = hb->cb;
    const struct conf_pool *pool = hb->pool;
    char path[CONF_PATH_MAX + 16];
    char *req;
    int n, ret;

    ret = check_init(&hb->ck, &h->loop, &hb->spec, health_on_check, hb);
    if (ret < 0)
        return ret;
    ret = uv_timer_init(&h->loop, &hb->tick);
    if (ret < 0) {
        uv_close((uv_handle_t *)&hb->ck.timer, NULL);
        return ret;
    }
    hb->tick.data = hb;
    hb->handles = 1;
    if (pool->check_path[0])
        snprintf(path, sizeof(path), "%s", pool->check_path);
    else
        snprintf(path, sizeof(path), "%s/models", cb->url.prefix);

    req = malloc(HEALTH_REQ_MAX);
    if (!req)
        return -ENOMEM;
    n = check_build_request(req, HEALTH_REQ_MAX, pool->check_method_head, path, cb->url.host,
                            cb->url.port, cb->url.tls, cb->api_key);
    if (n < 0) {
        free(req);
        log_err("backend %s/%s: health check request too large", pool->name, cb->name);
        return n;
    }
    hb->request = req;

    /* TLS as the workers have it: the backend's tls_client in h->up (same CA, verification,
     * SNI; sessions resumed from one check to the next) */
    hb->spec.up = &h->up;
    hb->spec.backend = (int)hb->idx;
    hb->spec.head = pool->check_method_head;
    hb->spec.request = hb->request;
    hb->spec.request_len = (size_t)n;
    hb->spec.expect = pool->check_expect;
    hb->spec.n_expect = pool->n_check_expect;
    hb->spec.timeout_ms = pool->check_timeout_ms;
    hb->checked = 1;

    /* The first check comes soon, at a random point of the first tenth of the interval, so
     * that backends (and checkers of successive generations) don't check in lockstep. */
    health_arm(hb, health_rand(h) % (pool->check_interval_ms / 10 + 1));
    return 0;
}

/* Closes every handle; uv_run then returns once the last one (and any resolver request) is
 * done. */
static void health_stop(struct health *h)
{
    h->stopping = 1;
    for (int i = 0; i < h->n; i++) {
        struct hc_backend *hb = &h->b[i];

        if (!hb->handles)
            continue;
        uv_close((uv_handle_t *)&hb->tick, NULL);
        check_close(&hb->ck);
    }
    /* after the checks: none waits for an address any more, so every handle can close */
    if (h->up_ok)
        upstream_drain(&h->up);
    if (h->eval_open)
        uv_close((uv_handle_t *)&h->eval, NULL);
    if (h->signals_ok) {
        /* blocked first: between libuv putting the default action back (at the close) and
         * the SIG_IGN below, a second stop signal would kill us mid-exit */
        sig_block_all_handled();
        uv_close((uv_handle_t *)&h->sigterm, NULL);
        uv_close((uv_handle_t *)&h->sigint, NULL);
        uv_close((uv_handle_t *)&h->sigquit, NULL);
    }
    /* Closing the last uv_signal handle puts the default action back; a Ctrl-C reaches us
     * twice (the terminal's, then the master's), and the second must not kill us mid-exit. */
    signal(SIGTERM, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    signal(SIGQUIT, SIG_IGN);
}

static void health_on_signal(uv_signal_t *s, int signum)
{
    struct health *h = s->data;

    if (h->stopping)
        return;
    log_info("health checker stopping on signal %d", signum);
    health_stop(h);
}

/* With checks off nothing would ever end a DOWN or a slow DEGRADED that came from checks (a
 * reload may have turned them off); passive and auth DOWN end with a live success. */
static void health_unchecked_state(struct hc_backend *hb, uint64_t now)
{
    int from_checks =
        (hb->st == BACKEND_DOWN && hb->why != REASON_PASSIVE && hb->why != REASON_AUTH) ||
        (hb->st == BACKEND_DEGRADED && hb->why == REASON_CHECK_SLOW);

    if (from_checks)
        health_set_state(hb, BACKEND_UP, REASON_NONE, now);
}

/* The checks' client, when a pool has checks: core/upstream.c as the workers run it, but with
 * no shm slot (a check is not traffic and must not write a worker's counters) and no pooling
 * (each check on a new connection, as HAProxy's). 0 or -errno. */
static int health_client_init(struct health *h)
{
    /* header spans first, the data after them on a cache line of its own */
    size_t data_off = ((size_t)HEALTH_BUF_HDRS * sizeof(struct proxy_hdr) + 63) & ~(size_t)63;
    int any = 0, ret;

    for (int i = 0; i < h->conf->n_backends; i++)
        any |= h->conf->pools[h->conf->backends[i].pool].check;
    if (!any)
        return 0;
    bufpool_init(&h->bufs, data_off + HEALTH_BUF_DATA, HEALTH_BUF_FREE);
    ret = upstream_init(&h->up, &h->loop, h->conf, NULL, -1, &h->bufs, data_off, HEALTH_BUF_DATA, 0,
                        HEALTH_BUF_HDRS);
    h->up_ok = 1; /* upstream_drain and upstream_free clean up after a failed init too */
    h->up.no_pool = 1;
    return ret;
}

int health_main(struct conf *conf, struct shm *shm)
{
    struct health h;
    int ret, rc = 1, checked = 0;

    memset(&h, 0, sizeof(h));
    h.conf = conf;
    h.shm = shm;
    h.rng = ((uint64_t)getpid() << 32) ^ time_mono_ns();
    ret = tls_global_init();
    if (ret < 0) {
        log_err("health checker: TLS init failed: %s", strerror(-ret));
        return 1;
    }
    ret = uv_loop_init(&h.loop);
    if (ret < 0) {
        log_err("health checker: loop init failed: %s", uv_strerror(ret));
        return 1;
    }
    /* uv_signal_init fails only on the first call, when the loop's signal pipe cannot be made;
     * uv_signal_start only for an invalid signal. SIGQUIT stops as SIGTERM does. */
    if ((ret = uv_signal_init(&h.loop, &h.sigterm)) < 0) {
        log_err("health checker: cannot set up signal handling: %s", uv_strerror(ret));
        uv_loop_close(&h.loop);
        return 1;
    }
    uv_signal_init(&h.loop, &h.sigint);
    uv_signal_init(&h.loop, &h.sigquit);
    h.signals_ok = 1;
    h.sigterm.data = h.sigint.data = h.sigquit.data = &h;
    if ((ret = uv_signal_start(&h.sigterm, health_on_signal, SIGTERM)) < 0 ||
        (ret = uv_signal_start(&h.sigint, health_on_signal, SIGINT)) < 0 ||
        (ret = uv_signal_start(&h.sigquit, health_on_signal, SIGQUIT)) < 0) {
        log_err("health checker: cannot set up signal handling: %s", uv_strerror(ret));
        health_stop(&h);
        uv_run(&h.loop, UV_RUN_DEFAULT);
        uv_loop_close(&h.loop);
        return 1;
    }
    sig_child_ready();               /* stop signals that came during the start are handled now */
    uv_timer_init(&h.loop, &h.eval); /* cannot fail */
    h.eval.data = &h;
    h.eval_open = 1;

    h.b = calloc(conf->n_backends ? (size_t)conf->n_backends : 1, sizeof(*h.b));
    if (!h.b) {
        log_err("health checker: out of memory");
        goto out;
    }
    h.n = conf->n_backends;
    ret = health_client_init(&h);
    if (ret < 0) {
        log_err("health checker: cannot set up the checks' client: %s", strerror(-ret));
        goto out;
    }
    for (int i = 0; i < conf->n_backends; i++) {
        struct hc_backend *hb = &h.b[i];

        health_backend_setup(&h, hb, (uint32_t)i);
        /* Every counter was 0 when the segment was made: a checker starting within the error
         * window of that (the first start, or a quick restart) counts from there, so failures
         * recorded before its first evaluation are not lost. */
        if (time_mono_ns() - shm->hdr->created_ns < (uint64_t)HEALTH_WINDOW_SECS * 1000000000ULL)
            health_window_update(&hb->win, shm->hdr->created_ns, 0, 0);
        if (!hb->pool->check)
            health_unchecked_state(hb, time_mono_ns());
        /* The admission of this configuration (with its thresholds) from the start. */
        health_publish(hb, 0);
        if (!hb->pool->check)
            continue;
        ret = health_backend_init_checks(&h, hb);
        if (ret < 0) {
            log_err("backend %s/%s: cannot set up health checks: %s", hb->pool->name, hb->cb->name,
                    strerror(-ret));
            goto out;
        }
        checked++;
    }
    uv_timer_start(&h.eval, health_on_eval, HEALTH_EVAL_MS, HEALTH_EVAL_MS);
    log_info("health checker started: %d of %d backends checked", checked, conf->n_backends);
    uv_run(&h.loop, UV_RUN_DEFAULT);
    rc = 0;
out:
    if (!h.stopping) {
        /* Setup failed: close what was opened so the loop can be released. */
        health_stop(&h);
        uv_run(&h.loop, UV_RUN_DEFAULT);
    }
    if (uv_loop_close(&h.loop) != 0)
        log_warn("health checker: loop closed with handles still open");
    for (int i = 0; i < h.n; i++)
        free(h.b[i].request);
    free(h.b);
    if (h.up_ok) {
        upstream_free(&h.up);
        bufpool_free(&h.bufs);
    }
    return rc;
}
