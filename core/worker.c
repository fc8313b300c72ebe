/* A worker process: one libuv loop that accepts clients (core/client.c) and forwards their
 * requests (core/stages.c, core/forward.c); setup, signals, graceful and hard stop, teardown. */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include <uv.h>

#include "core/log.h"
#include "core/sig.h"
#include "core/tls.h"
#include "core/util.h"
#include "core/worker.h"
#include "core/worker_priv.h"

#define BUF_MIN       16384 /* smallest request/response buffer */
#define MAX_FREE_BUFS 1024  /* buffers kept for reuse beyond those in use */

/* ---- stopping ---- */

static void on_handle_closed_noop(uv_handle_t *h)
{
}

static void worker_close_listeners(struct worker *w)
{
    acceptor_close(&w->acc);
}

void worker_check_exit(struct worker *w)
{
    if (!(w->draining || w->stopping) || w->n_clients > 0)
        return;
    if (w->handles_ok && !uv_is_closing((uv_handle_t *)&w->sigterm)) {
        /* blocked first: between libuv putting the default action back (at the close) and
         * the SIG_IGN below, a second stop signal would kill the worker mid-exit */
        sig_block_all_handled();
        uv_close((uv_handle_t *)&w->sigterm, on_handle_closed_noop);
        uv_close((uv_handle_t *)&w->sigint, on_handle_closed_noop);
        uv_close((uv_handle_t *)&w->sigquit, on_handle_closed_noop);
        uv_close((uv_handle_t *)&w->sigusr2, on_handle_closed_noop);
        /* libuv put the default action back: a Ctrl-C reaches a worker twice (terminal and
         * master), and the second must not kill it in the middle of its exit */
        signal(SIGTERM, SIG_IGN);
        signal(SIGINT, SIG_IGN);
        signal(SIGQUIT, SIG_IGN);
        uv_close((uv_handle_t *)&w->hard_stop, on_handle_closed_noop);
        tq_close(&w->retry_q, on_handle_closed_noop);
        tq_close(&w->lease_q, on_handle_closed_noop);
        for (int i = 0; i < w->n_tqs; i++)
            tq_close(&w->tqs[i], on_handle_closed_noop);
        for (int i = 0; w->bdqs && i < w->conf->n_listens; i++)
            tq_close(&w->bdqs[i], on_handle_closed_noop);
        alog_stop(&w->alog, on_handle_closed_noop); /* the last lines go out */
    }
}

static void worker_stop_now(struct worker *w)
{
    w->stopping = 1;
    worker_close_listeners(w);
    upstream_drain(&w->up);
    while (w->clients)
        client_close(w->clients);
    worker_check_exit(w);
}

/* hard_stop_after passed: like worker_stop_now, but streams under way are ended properly first,
 * and connections that linger after a whole response are left to close by themselves within
 * LINGER_MS, well before the master's SIGKILL (HARD_STOP_GRACE_MS). */
static void worker_hard_stop(struct worker *w)
{
    w->stopping = 1;
    worker_close_listeners(w);
    upstream_drain(&w->up);
    for (struct client *c = w->clients, *next; c; c = next) {
        next = c->next;
        if (c->state != CS_LINGER)
            client_hard_stop(c);
    }
    worker_check_exit(w);
}

static void on_hard_stop(uv_timer_t *t)
{
    struct worker *w = t->data;
    log_warn("graceful stop took longer than hard_stop_after: closing %d connections",
             w->n_clients);
    worker_hard_stop(w);
}

static void on_signal(uv_signal_t *s, int signum)
{
    struct worker *w = s->data;
    if (signum == SIGINT) {
        worker_stop_now(w);
        return;
    }
    if (signum == SIGUSR2) { /* reload: the old generation stopped accepting, take over */
        if (!atomic_load_explicit(&shm_worker(w->shm, (uint32_t)w->slot)->hold,
                                  memory_order_acquire))
            acceptor_hold(&w->acc, 0);
        return;
    }
    if (w->draining)
        return;
    /* what is queued is this worker's to serve (a reload may drop the socket: closing it would
     * reset them); taken before draining starts, which refuses new connections */
    acceptor_sweep(&w->acc);
    w->draining = 1;
    worker_close_listeners(w);
    upstream_drain(&w->up);
    /* No connection is closed here, idle keep-alive ones included (as HAProxy's
     * idle-close-on-response): a client may be sending its next request on one right now, and
     * a POST that meets a close is not retried. Each gets its next answer with
     * "Connection: close" and closes after it; one that stays idle closes when its
     * keepalive_timeout (or, still fresh, its client_header_timeout) passes, and
     * hard_stop_after bounds the whole. */
    for (struct client *c = w->clients; c; c = c->next)
        c->close_after = 1;
    if (w->conf->global.hard_stop_after_ms)
        uv_timer_start(&w->hard_stop, on_hard_stop, w->conf->global.hard_stop_after_ms, 0);
    worker_check_exit(w);
}

/* ---- setup ---- */

/* Seeds a pool's balancer for this worker and moves it `slot` picks ahead over the configured
 * backends, so that with light traffic the workers do not all start on the same backend. */
static void balancer_start(struct balancer *bal, const struct conf *conf, int pool, int slot,
                           uint64_t seed)
{
    const struct conf_pool *p = &conf->pools[pool];
    struct balancer_cand cands[64];
    uint32_t n = p->n_backends < 64 ? (uint32_t)p->n_backends : 64;

    balancer_seed(bal, (seed ^ ((uint64_t)getpid() << 32) ^
                        ((uint64_t)slot * 0x9e3779b97f4a7c15ULL) ^ (uint64_t)pool) |
                           1);
    if ((uint32_t)p->n_backends != n)
        return;
    memset(cands, 0, sizeof(cands));
    for (uint32_t i = 0; i < n; i++) {
        const struct conf_backend *cb = &conf->backends[p->first_backend + (int)i];
        cands[i].weight = cb->weight;
        cands[i].eligible = 1;
        cands[i].backup = (uint8_t)(cb->backup != 0);
        cands[i].id = cb->name_hash;
    }
    for (int k = 0; k < slot; k++)
        balancer_pick(bal, cands, n);
}

static int worker_setup(struct worker *w, struct conf *conf, struct shm *shm, int slot,
                        const int *listen_fds)
{
    size_t data = BUF_MIN;
    uint32_t max_hdrs = 128;
    int max_pool = 1;

    w->conf = conf;
    w->shm = shm;
    w->slot = slot;
    w->started = (int64_t)(time_real_ms() / 1000);
    if (route_keys_init(&w->keys, conf) < 0) {
        log_err("out of memory");
        return -ENOMEM;
    }
    /* uv_signal_init fails only when the loop's signal pipe cannot be made (no fd left), on the
     * first call: then nothing is set up yet and the worker exits; uv_timer_init cannot fail */
    int r = uv_signal_init(&w->loop, &w->sigterm);
    if (r < 0) {
        log_err("cannot set up signal handling: %s", uv_strerror(r));
        return r;
    }
    uv_signal_init(&w->loop, &w->sigint);
    uv_signal_init(&w->loop, &w->sigquit);
    uv_signal_init(&w->loop, &w->sigusr2);
    uv_timer_init(&w->loop, &w->hard_stop);
    tq_init(&w->retry_q, &w->loop, 0, forward_on_retry_due);
    tq_init(&w->lease_q, &w->loop, STAGES_LEASE_POLL_MS, stages_on_lease_due);
    w->handles_ok = 1;
    w->sigterm.data = w->sigint.data = w->sigquit.data = w->sigusr2.data = w->hard_stop.data = w;
    /* SIGQUIT is a graceful stop, as SIGTERM (and as nginx's QUIT) */
    if ((r = uv_signal_start(&w->sigterm, on_signal, SIGTERM)) < 0 ||
        (r = uv_signal_start(&w->sigint, on_signal, SIGINT)) < 0 ||
        (r = uv_signal_start(&w->sigquit, on_signal, SIGQUIT)) < 0 ||
        (r = uv_signal_start(&w->sigusr2, on_signal, SIGUSR2)) < 0) {
        log_err("cannot set up signal handling: %s", uv_strerror(r));
        return r;
    }
    sig_child_ready(); /* stop signals that came during the start are handled now */
    r = alog_open(&w->alog, &w->loop, (enum alog_mode)conf->global.access_log,
                  conf->global.access_log_path, conf->global.access_log_buffer,
                  &shm_worker(shm, (uint32_t)slot)->alog_drops);
    if (r < 0) {
        log_err("access log: cannot set it up: %s", uv_strerror(r));
        return r;
    }
    int n_tqs = conf->n_listens * T_KINDS + 1;
    if (!(w->tqs = calloc((size_t)n_tqs, sizeof(*w->tqs))))
        return -ENOMEM;
    for (int i = 0; i < n_tqs; i++) {
        const struct conf_listen *ln = &conf->listens[i / T_KINDS];
        uint64_t ms;
        if (i == n_tqs - 1)
            ms = LINGER_MS;
        else if (i % T_KINDS == T_HEADER)
            ms = ln->client_header_timeout_ms;
        else if (i % T_KINDS == T_BODY)
            ms = ln->client_body_timeout_ms;
        else if (i % T_KINDS == T_SEND)
            ms = conf->pools[ln->pool].idle_timeout_ms;
        else
            ms = ln->keepalive_timeout_ms;
        tq_init(&w->tqs[i], &w->loop, ms, client_on_timeout);
    }
    w->n_tqs = n_tqs;
    if (!(w->bdqs = calloc((size_t)(conf->n_listens ? conf->n_listens : 1), sizeof(*w->bdqs))))
        return -ENOMEM;
    for (int i = 0; i < conf->n_listens; i++) {
        tq_init(&w->bdqs[i], &w->loop, conf->listens[i].client_body_total_timeout_ms,
                client_on_body_deadline);
    }
    for (int i = 0; i < conf->n_listens; i++) {
        if (conf->listens[i].max_header_size + 1024 > data)
            data = conf->listens[i].max_header_size + 1024;
        if (conf->listens[i].max_headers > max_hdrs)
            max_hdrs = conf->listens[i].max_headers;
    }
    w->data_size = data;
    w->max_hdrs = max_hdrs;
    w->rid_off = (sizeof(struct creq) + 15) & ~(size_t)15;
    w->hdrs_off = w->rid_off + 32;
    w->data_off = (w->hdrs_off + max_hdrs * sizeof(struct proxy_hdr) + 63) & ~(size_t)63;
    bufpool_init(&w->bufs, w->data_off + data, MAX_FREE_BUFS);
    w->usage.max_free = MAX_FREE_BUFS;
    if (!(w->scratch = malloc(w->bufs.size)))
        return -ENOMEM;
    if (getrandom(&w->rid_seed1, sizeof(w->rid_seed1), 0) != sizeof(w->rid_seed1) ||
        getrandom(&w->rid_seed2, sizeof(w->rid_seed2), 0) != sizeof(w->rid_seed2)) {
        w->rid_seed1 = time_real_ms() ^ ((uint64_t)getpid() << 32);
        w->rid_seed2 = time_mono_ns();
    }
    client_parser_init();
    r = upstream_init(&w->up, &w->loop, conf, shm, slot, &w->bufs, w->data_off, data, w->hdrs_off,
                      max_hdrs);
    if (r < 0)
        return r;

    w->bal = calloc((size_t)(conf->n_pools ? conf->n_pools : 1), sizeof(*w->bal));
    if (!w->bal)
        return -ENOMEM;
    for (int i = 0; i < conf->n_pools; i++) {
        if (conf->pools[i].n_backends > max_pool)
            max_pool = conf->pools[i].n_backends;
        r = balancer_init(&w->bal[i], conf->pools[i].balance, (uint32_t)conf->pools[i].n_backends);
        if (r < 0)
            return r;
        w->bal[i].hash_load_pct = conf->pools[i].hash_load_pct; /* hash_balance_factor */
    }
    w->cands = calloc((size_t)max_pool, sizeof(*w->cands));
    w->cand_limit = calloc((size_t)max_pool, sizeof(*w->cand_limit));
    w->cand_epoch = calloc((size_t)max_pool, sizeof(*w->cand_epoch));
    w->auth_log_ns =
        calloc((size_t)(conf->n_backends ? conf->n_backends : 1), sizeof(*w->auth_log_ns));
    if (!w->cands || !w->cand_limit || !w->cand_epoch || !w->auth_log_ns)
        return -ENOMEM;
    for (int i = 0; i < conf->n_pools; i++)
        balancer_start(&w->bal[i], conf, i, slot, w->rid_seed1);

    /* this worker's share of maxconn (the master resolved 0 = auto from RLIMIT_NOFILE) */
    uint32_t nw = conf->global.workers > 0 ? (uint32_t)conf->global.workers : 1;
    uint32_t *l_max = calloc((size_t)(conf->n_listens ? conf->n_listens : 1), sizeof(*l_max));
    const char **names = calloc((size_t)(conf->n_listens ? conf->n_listens : 1), sizeof(*names));
    if (!l_max || !names) {
        free(l_max);
        free(names);
        return -ENOMEM;
    }
    for (int i = 0; i < conf->n_listens; i++) {
        l_max[i] = (uint32_t)(((uint64_t)conf->listens[i].maxconn + nw - 1) / nw);
        names[i] = conf->listens[i].name;
    }
    r = acceptor_init(&w->acc, &w->loop, listen_fds, names, conf->n_listens,
                      (uint32_t)(((uint64_t)conf->global.maxconn + nw - 1) / nw), l_max,
                      client_accept, w);
    free(l_max);
    free(names);
    if (r < 0)
        return r;
    /* Nothing was accepted yet (that happens in the loop): a held worker waits for SIGUSR2. */
    if (atomic_load_explicit(&shm_worker(shm, (uint32_t)slot)->hold, memory_order_acquire)) {
        acceptor_hold(&w->acc, 1);
        atomic_store_explicit(&shm_worker(shm, (uint32_t)slot)->ready, 1, memory_order_seq_cst);
        /* the master may have cleared hold before it saw ready (a [cluster] start's hold ends
         * on a timer): then no SIGUSR2 comes, and the worker lets itself go */
        if (!atomic_load_explicit(&shm_worker(shm, (uint32_t)slot)->hold, memory_order_seq_cst))
            acceptor_hold(&w->acc, 0);
        return 0;
    }
    atomic_store_explicit(&shm_worker(shm, (uint32_t)slot)->ready, 1, memory_order_release);
    return 0;
}

static void worker_teardown(struct worker *w)
{
    for (int i = 0; i < w->conf->n_pools && w->bal; i++)
        if (w->bal[i].ops)
            balancer_free(&w->bal[i]);
    free(w->bal);
    free(w->cands);
    free(w->cand_limit);
    free(w->cand_epoch);
    free(w->auth_log_ns);
    acceptor_free(&w->acc);
    free(w->tqs);
    free(w->bdqs);
    upstream_free(&w->up);
    while (w->free_clients) {
        struct client *c = w->free_clients;
        w->free_clients = c->next;
        free(c);
    }
    bufpool_free(&w->bufs);
    free(w->scratch);
    free(w->body_cache);
    json_parser_free(&w->json);
    route_keys_free(&w->keys);
    usage_pool_free(&w->usage);
    alog_free(&w->alog);
}

int worker_main(struct conf *conf, struct shm *shm, int slot, const int *listen_fds)
{
    struct worker *w = calloc(1, sizeof(*w));
    int rc = 1;

    if (!w)
        return 1;
    signal(SIGPIPE, SIG_IGN);
    if (tls_global_init() != 0)
        log_warn("TLS random generator setup failed");
    if (uv_loop_init(&w->loop) != 0)
        goto out;
    if (worker_setup(w, conf, shm, slot, listen_fds) < 0) {
        worker_stop_now(w);
        uv_run(&w->loop, UV_RUN_DEFAULT);
        uv_loop_close(&w->loop);
        goto out;
    }
    log_debug("worker %d ready", slot);
    uv_run(&w->loop, UV_RUN_DEFAULT);
    log_debug("worker %d stopped (%llu client aborts)", slot, (unsigned long long)w->up.aborts);
    if (uv_loop_close(&w->loop) != 0)
        log_warn("worker %d: loop closed with handles open", slot);
    rc = 0;
out:
    worker_teardown(w);
    free(w);
    return rc;
}
