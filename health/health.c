/* The health checker process: periodic active checks of every backend, rise/fall state, the
 * only writer of backend health in shm. One libuv loop; nothing here blocks it. */
#include "health/health.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>

#include "core/log.h"
#include "core/tls.h"
#include "core/util.h"
#include "health/check.h"

#define HEALTH_REQ_MAX 4096

struct health;

/* One checked backend. */
struct hc_backend {
    struct health *h;
    uint32_t idx; /* index in conf.backends and shm */
    const struct conf_backend *cb;
    const struct conf_pool *pool;
    struct check ck;
    struct check_spec spec;
    struct tls_client tls;
    int tls_ok;    /* tls is initialised */
    char *tls_err; /* why TLS setup failed; every check then fails with it */
    char *request;
    uv_timer_t tick;     /* next check */
    int handles;         /* ck and tick are initialised (to be closed) */
    uint64_t started_ms; /* start of the last check, to keep the period independent of its length */
    struct health_rf rf;
    enum backend_state st;
};

struct health {
    uv_loop_t loop;
    struct conf *conf;
    struct shm *shm;
    uv_signal_t sigterm, sigint;
    struct hc_backend *b;
    int n;
    int stopping;
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

/* Uniform in [0, n). random() is fine: this only spreads timers. */
static uint64_t health_rand(uint64_t n)
{
    if (n == 0)
        return 0;
    return (((uint64_t)random() << 31) ^ (uint64_t)random()) % n;
}

static void health_on_tick(uv_timer_t *t);

static void health_arm(struct hc_backend *hb, uint64_t delay_ms)
{
    uv_timer_start(&hb->tick, health_on_tick, delay_ms, 0);
}

/* Next start: one interval after the last start, moved by up to +-5% so that backends that
 * happened to align drift apart again. */
static void health_arm_next(struct hc_backend *hb)
{
    uint64_t iv = hb->pool->check_interval_ms;
    uint64_t spread = iv / 10;
    uint64_t next = hb->started_ms + iv - spread / 2 + health_rand(spread + 1);
    uint64_t now = uv_now(&hb->h->loop);

    health_arm(hb, next > now ? next - now : 0);
}

static void health_on_tick(uv_timer_t *t)
{
    struct hc_backend *hb = t->data;
    struct shm_backend *sb = shm_backend(hb->h->shm, hb->idx);
    int ret;

    hb->started_ms = uv_now(&hb->h->loop);
    /* Maintenance pauses checks; the state is kept as it was. */
    if (atomic_load_explicit(&sb->admin, memory_order_relaxed) == BACKEND_MAINT) {
        health_arm_next(hb);
        return;
    }
    ret = check_start(&hb->ck);
    if (ret < 0) {
        log_warn("backend %s/%s: cannot start check: %s", hb->pool->name, hb->cb->name,
                 strerror(-ret));
        health_arm_next(hb);
    }
}

static void health_on_check(struct check *ck, const struct check_result *res)
{
    struct hc_backend *hb = ck->data;
    struct health *h = hb->h;
    uint64_t now = time_mono_ns();
    int changed;

    shm_backend_set_check(h->shm, hb->idx, res->status, res->dur_us, now);
    changed = health_rf_on_result(&hb->rf, &hb->st, res->ok, hb->pool->rise, hb->pool->fall);
    if (changed) {
        shm_backend_set_state(h->shm, hb->idx, hb->st, res->ok ? REASON_CHECK_OK : res->why, now);
        if (hb->st == BACKEND_UP)
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
    if (!h->stopping)
        health_arm_next(hb);
}

static int health_backend_init(struct health *h, struct hc_backend *hb, uint32_t idx)
{
    const struct conf_backend *cb = &h->conf->backends[idx];
    const struct conf_pool *pool = &h->conf->pools[cb->pool];
    char path[CONF_PATH_MAX + 16];
    char *req;
    int n, ret;

    hb->h = h;
    hb->idx = idx;
    hb->cb = cb;
    hb->pool = pool;
    hb->st = shm_backend_state(h->shm, idx);
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

    if (cb->url.tls) {
        ret = tls_client_init(&hb->tls, cb->url.host, cb->ca_file, cb->tls_verify, &hb->tls_err);
        if (ret == 0) {
            hb->tls_ok = 1;
        } else {
            log_err("backend %s/%s: %s", pool->name, cb->name,
                    hb->tls_err ? hb->tls_err : "TLS setup failed");
            if (!hb->tls_err)
                hb->tls_err = strdup("TLS setup failed");
        }
    }
    hb->spec.host = cb->url.host;
    hb->spec.port = cb->url.port;
    hb->spec.tls = hb->tls_ok ? &hb->tls : NULL;
    hb->spec.tls_err = hb->tls_err;
    hb->spec.request = hb->request;
    hb->spec.request_len = (size_t)n;
    hb->spec.expect = pool->check_expect;
    hb->spec.n_expect = pool->n_check_expect;
    hb->spec.timeout_ms = pool->check_timeout_ms;

    /* The first check comes soon, at a random point of the first tenth of the interval, so
     * that backends (and checkers of successive generations) don't check in lockstep. */
    health_arm(hb, health_rand(pool->check_interval_ms / 10 + 1));
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
    uv_close((uv_handle_t *)&h->sigterm, NULL);
    uv_close((uv_handle_t *)&h->sigint, NULL);
}

static void health_on_signal(uv_signal_t *s, int signum)
{
    struct health *h = s->data;

    if (h->stopping)
        return;
    log_info("health checker stopping on signal %d", signum);
    health_stop(h);
}

int health_main(struct conf *conf, struct shm *shm)
{
    struct health h;
    int ret, rc = 1, checked = 0;

    memset(&h, 0, sizeof(h));
    h.conf = conf;
    h.shm = shm;
    srandom((unsigned)getpid() ^ (unsigned)time_mono_ns());
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
    uv_signal_init(&h.loop, &h.sigterm);
    uv_signal_init(&h.loop, &h.sigint);
    h.sigterm.data = h.sigint.data = &h;
    uv_signal_start(&h.sigterm, health_on_signal, SIGTERM);
    uv_signal_start(&h.sigint, health_on_signal, SIGINT);

    h.b = calloc(conf->n_backends ? (size_t)conf->n_backends : 1, sizeof(*h.b));
    if (!h.b) {
        log_err("health checker: out of memory");
        goto out;
    }
    h.n = conf->n_backends;
    for (int i = 0; i < conf->n_backends; i++) {
        const struct conf_backend *cb = &conf->backends[i];
        const struct conf_pool *pool = &conf->pools[cb->pool];

        if (!pool->check) {
            /* Unchecked backends are always UP (a reload may have turned checks off). */
            if (shm_backend_state(shm, (uint32_t)i) != BACKEND_UP)
                shm_backend_set_state(shm, (uint32_t)i, BACKEND_UP, REASON_NONE, time_mono_ns());
            continue;
        }
        ret = health_backend_init(&h, &h.b[i], (uint32_t)i);
        if (ret < 0) {
            log_err("backend %s/%s: cannot set up health checks: %s", pool->name, cb->name,
                    strerror(-ret));
            goto out;
        }
        checked++;
    }
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
    for (int i = 0; i < h.n; i++) {
        struct hc_backend *hb = &h.b[i];

        if (hb->tls_ok)
            tls_client_free(&hb->tls);
        free(hb->tls_err);
        free(hb->request);
    }
    free(h.b);
    return rc;
}
