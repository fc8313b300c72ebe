/* The shared-memory segment: creation, layout and the accessors that are not inline. */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "shm/shm.h"

/* This process's copy of a backend's record, and which version of it that is. */
struct shm_health_cache {
    uint64_t stamp; /* (copy index << 32 | its sequence) + 1; 0 = none yet */
    struct shm_health h;
};

static size_t shm_align(size_t n)
{
    return (n + SHM_CACHELINE - 1) & ~(size_t)(SHM_CACHELINE - 1);
}

int shm_create(struct shm *shm, uint32_t n_backends, uint32_t n_workers, uint32_t generation)
{
    return shm_create_ai(shm, n_backends, n_workers, generation, NULL);
}

int shm_create_ai(struct shm *shm, uint32_t n_backends, uint32_t n_workers, uint32_t generation,
                  const struct shm_ai *ai)
{
    size_t off_backends, off_workers, off_wb, off_limits = 0, off_acct = 0, size;
    uint32_t n_limits = ai ? ai->n_keys + ai->n_models + ai->n_pools : 0;
    struct shm_header *hdr;
    void *base;
    int fd;

    if (n_workers == 0 || n_backends > 65536 || n_workers > 1024)
        return -EINVAL;
    off_backends = shm_align(sizeof(struct shm_header));
    off_workers = off_backends + shm_align(sizeof(struct shm_backend) * n_backends);
    off_wb = off_workers + shm_align(sizeof(struct shm_worker) * n_workers);
    size = off_wb + shm_align(sizeof(struct shm_wb) * n_backends * n_workers);
    if (ai) {
        if (n_limits && !ai->limits)
            return -EINVAL;
        off_limits = size;
        size += shm_align(limit_region_size(n_limits, ai->limits, n_workers + 1));
        off_acct = size;
        size += shm_align(acct_region_size(ai->n_keys, ai->n_models, n_backends, n_workers));
    }

    /* Forked children inherit the mapping; a binary upgrade clears CLOEXEC on the one segment it
     * hands to the new master, so no other generation's segment lives on in it. */
    fd = memfd_create("aigw-shm", MFD_CLOEXEC);
    if (fd == -1)
        return -errno;
    if (ftruncate(fd, (off_t)size) == -1) {
        int e = -errno;
        close(fd);
        return e;
    }
    base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        int e = -errno;
        close(fd);
        return e;
    }
    shm->cache = calloc(n_backends ? n_backends : 1, sizeof(*shm->cache));
    if (!shm->cache) {
        munmap(base, size);
        close(fd);
        return -ENOMEM;
    }
    /* ftruncate gives zeroed pages: every state starts at 0 (UP, READY, REASON_NONE). */
    hdr = base;
    hdr->magic = SHM_MAGIC;
    hdr->version = SHM_LAYOUT_VERSION;
    hdr->generation = generation;
    hdr->n_backends = n_backends;
    hdr->n_workers = n_workers;
    hdr->size = size;
    hdr->off_backends = off_backends;
    hdr->off_workers = off_workers;
    hdr->off_wb = off_wb;
    if (ai) {
        int rc = limit_region_init((char *)base + off_limits, off_acct - off_limits, n_limits,
                                   ai->limits, n_workers + 1, ai->wall_s);

        if (rc == 0)
            rc = acct_region_init((char *)base + off_acct, size - off_acct, ai->n_keys,
                                  ai->n_models, n_backends, n_workers);
        if (rc) {
            free(shm->cache);
            munmap(base, size);
            close(fd);
            return rc;
        }
        hdr->off_limits = off_limits;
        hdr->off_acct = off_acct;
    }
    {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        hdr->created_ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    }

    shm->base = base;
    shm->size = size;
    shm->fd = fd;
    shm->hdr = hdr;
    return 0;
}

int shm_attach(struct shm *shm, int fd)
{
    struct shm_header h;
    struct stat st;
    void *base;

    if (fstat(fd, &st) == -1)
        return -errno;
    if ((size_t)st.st_size < sizeof(h) || pread(fd, &h, sizeof(h), 0) != (ssize_t)sizeof(h))
        return -EINVAL;
    /* another layout (a binary of another version): its state cannot be read here */
    if (h.magic != SHM_MAGIC || h.version != SHM_LAYOUT_VERSION)
        return -EPROTO;
    if (h.size != (uint64_t)st.st_size || h.n_workers == 0 || h.n_workers > 1024 ||
        h.n_backends > 65536 || h.off_wb > h.size || h.off_limits > h.size || h.off_acct > h.size)
        return -EINVAL;
    base = mmap(NULL, (size_t)h.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED)
        return -errno;
    shm->cache = calloc(h.n_backends ? h.n_backends : 1, sizeof(*shm->cache));
    if (!shm->cache) {
        munmap(base, (size_t)h.size);
        return -ENOMEM;
    }
    shm->base = base;
    shm->size = (size_t)h.size;
    shm->fd = fd;
    shm->hdr = base;
    return 0;
}

void shm_destroy(struct shm *shm)
{
    if (shm->base)
        munmap(shm->base, shm->size);
    if (shm->fd >= 0)
        close(shm->fd);
    free(shm->cache);
    memset(shm, 0, sizeof(*shm));
    shm->fd = -1;
}

/* ---- the published record ------------------------------------------------------------------ */

static int epoch_before(uint32_t a, uint32_t b)
{
    return (int32_t)(a - b) < 0;
}

/* The record of b in use, whole, from this process's copy, which is refreshed when the record
 * changed: a copy whose sequence counter moved while it was read (the checker rewrote it after
 * switching away from it) is read again from the one now in use. */
static const struct shm_health *health_get(const struct shm *shm, uint32_t b)
{
    const struct shm_backend *be = shm_backend(shm, b);
    struct shm_health_cache *c = &shm->cache[b];
    uint64_t w[SHM_HEALTH_WORDS];

    for (uint32_t tries = 0;; tries++) {
        uint32_t i = atomic_load_explicit(&be->cur, memory_order_acquire) & 1;
        const struct shm_health_rec *r = &be->rec[i];
        uint32_t s = atomic_load_explicit(&r->seq, memory_order_acquire);
        uint64_t stamp = ((uint64_t)i << 32 | s) + 1;

        /* The copy in use is never written; should it stay odd all the same (a segment
         * scribbled on), the last whole copy read is better than a frozen process. */
        if (tries >= (1u << 20) && c->stamp)
            return &c->h;
        if (s & 1)
            continue;
        if (stamp == c->stamp)
            return &c->h;
        for (size_t k = 0; k < SHM_HEALTH_WORDS; k++)
            w[k] = atomic_load_explicit(&r->w[k], memory_order_relaxed);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&r->seq, memory_order_relaxed) == s) {
            memcpy(&c->h, w, sizeof(c->h));
            c->stamp = stamp;
            return &c->h;
        }
    }
}

/* One writer (the health checker; the master before forking): writes the copy not in use and
 * then switches readers to it. A writer that dies mid-write leaves that copy odd and unused; the
 * next writer evens its counter out first. */
static void health_write(struct shm_backend *be, const struct shm_health *h)
{
    uint64_t w[SHM_HEALTH_WORDS] = {0};
    uint32_t i = (atomic_load_explicit(&be->cur, memory_order_relaxed) & 1) ^ 1;
    struct shm_health_rec *r = &be->rec[i];
    uint32_t s = atomic_load_explicit(&r->seq, memory_order_relaxed);

    s += s & 1;
    memcpy(w, h, sizeof(*h));
    atomic_store_explicit(&r->seq, s + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    for (size_t k = 0; k < SHM_HEALTH_WORDS; k++)
        atomic_store_explicit(&r->w[k], w[k], memory_order_relaxed);
    atomic_store_explicit(&r->seq, s + 2, memory_order_release);
    atomic_store_explicit(&be->cur, i, memory_order_release);
}

/* The value of an epoch-tagged claim word for epoch e (0 when its tag is another epoch's). */
static uint32_t epoch_value(uint64_t word, uint32_t e)
{
    return (uint32_t)(word >> 32) == e ? (uint32_t)word : 0;
}

void shm_backend_view(const struct shm *shm, uint32_t b, struct shm_backend_view *v)
{
    const struct shm_backend *be = shm_backend(shm, b);

    v->h = health_get(shm, b);
    v->admin = (enum backend_admin)atomic_load_explicit(&be->admin, memory_order_acquire);
    v->weight_cfg = atomic_load_explicit(&be->weight_cfg, memory_order_relaxed);
    v->breaker_cmd_done = atomic_load_explicit(&be->breaker_cmd_done, memory_order_acquire);
    v->trips =
        epoch_value(atomic_load_explicit(&be->claim.gate, memory_order_acquire), v->h->epoch);
    v->consec =
        epoch_value(atomic_load_explicit(&be->claim.consec, memory_order_relaxed), v->h->epoch);
    v->trial_ok =
        epoch_value(atomic_load_explicit(&be->claim.trial_ok, memory_order_relaxed), v->h->epoch);
}

enum shm_admit shm_admit(const struct shm_backend_view *v, uint64_t now_ns, uint32_t *trials)
{
    const struct shm_admission *a = &v->h->adm;

    if (v->admin != BACKEND_READY || (v->trips & SHM_TRIP_STOP))
        return SHM_ADMIT_NONE;
    switch (a->kind) {
    case SHM_ADMIT_ALL:
        return SHM_ADMIT_ALL;
    case SHM_ADMIT_TRIAL:
        if (v->trips & SHM_TRIP_PASSED)
            return SHM_ADMIT_ALL;
        if (now_ns < a->from_ns)
            return SHM_ADMIT_NONE;
        *trials = a->trials ? a->trials : 1;
        return SHM_ADMIT_TRIAL;
    case SHM_ADMIT_NONE:
        break;
    }
    return SHM_ADMIT_NONE;
}

void shm_backend_publish(struct shm *shm, uint32_t b, struct shm_health *h, int new_epoch)
{
    uint32_t epoch = health_get(shm, b)->epoch;

    /* The epoch lives in the record: a restarted checker goes on from the last one. */
    h->epoch = new_epoch ? epoch + 1 : epoch;
    health_write(shm_backend(shm, b), h);
}

void shm_backend_init(struct shm *shm, uint32_t b, uint32_t weight, uint32_t max_conns)
{
    struct shm_backend *be = shm_backend(shm, b);
    struct shm_health h;

    atomic_store_explicit(&be->weight_cfg, weight, memory_order_relaxed);
    atomic_store_explicit(&be->max_conns, max_conns, memory_order_relaxed);
    atomic_store_explicit(&be->admin, BACKEND_READY, memory_order_release);
    h = *health_get(shm, b);
    h.weight_eff = weight;
    shm_backend_publish(shm, b, &h, 0);
}

static uint64_t max_u64(uint64_t a, uint64_t b)
{
    return a > b ? a : b;
}

void shm_backend_carry(struct shm *dst, uint32_t b, const struct shm *src, uint32_t sb,
                       int64_t weight)
{
    struct shm_backend *be = shm_backend(dst, b);
    const struct shm_backend *sbe = shm_backend(src, sb);
    struct shm_wb *to = shm_wb(dst, 0, b);
    struct shm_health h = *health_get(src, sb);
    uint32_t pos = 0, n_ewma = 0;
    uint64_t ewma = 0;

    if (weight >= 0) {
        atomic_store_explicit(&be->weight_cfg, (uint32_t)weight, memory_order_relaxed);
        h.weight_eff = (uint32_t)weight;
    } else {
        h.weight_eff = atomic_load_explicit(&be->weight_cfg, memory_order_relaxed);
    }
    atomic_store_explicit(&be->admin, atomic_load_explicit(&sbe->admin, memory_order_acquire),
                          memory_order_release);
    health_write(be, &h);
    for (uint32_t w = 0; w < src->hdr->n_workers; w++) {
        const struct shm_wb *f = shm_wb(src, w, sb);
#define CARRY_MAX(x)                                                                               \
    atomic_store_explicit(&to->x,                                                                  \
                          max_u64(atomic_load_explicit(&to->x, memory_order_relaxed),              \
                                  atomic_load_explicit(&f->x, memory_order_relaxed)),              \
                          memory_order_relaxed)
        CARRY_MAX(last_ok_ns);
        CARRY_MAX(cool_until_ns);
        CARRY_MAX(ewma_at_ns);
#undef CARRY_MAX
        if (atomic_load_explicit(&f->ewma_ns, memory_order_relaxed)) {
            ewma += atomic_load_explicit(&f->ewma_ns, memory_order_relaxed);
            n_ewma++;
        }
        /* the latest failure times, for max_fails within fail_timeout */
        for (uint32_t k = 0; k < SHM_FAIL_RING && pos < SHM_FAIL_RING; k++) {
            uint64_t t = atomic_load_explicit(&f->fail_ring[k], memory_order_relaxed);
            if (t)
                atomic_store_explicit(&to->fail_ring[pos++], t, memory_order_relaxed);
        }
    }
    if (n_ewma)
        atomic_store_explicit(&to->ewma_ns, ewma / n_ewma, memory_order_relaxed);
    atomic_store_explicit(&to->fail_pos, pos % SHM_FAIL_RING, memory_order_relaxed);
}

void shm_carry_counters(struct shm *dst, uint32_t b, const struct shm *src, uint32_t sb)
{
    struct shm_carried *to = &shm_backend(dst, b)->carried;
    struct shm_backend_totals t;
    struct shm_backend_stats st;
    uint64_t ok, failed;

    shm_backend_totals(src, sb, &t);
    shm_backend_stats(src, sb, &st);
    shm_backend_outcomes(src, sb, &ok, &failed);
#define SET(f, v) atomic_store_explicit(&to->f, (v), memory_order_relaxed)
    SET(requests, t.requests);
    SET(failures, failed);
    SET(ok, ok);
    SET(retries, t.retries);
    SET(auth_failures, shm_backend_auth_failures(src, sb));
    SET(bytes_in, t.bytes_in);
    SET(bytes_out, t.bytes_out);
    for (int i = 0; i < 5; i++)
        SET(status[i], st.status[i]);
    for (int i = 0; i < SHM_HIST_BUCKETS; i++) {
        SET(lat_bkt[i], st.lat_bkt[i]);
        SET(ttft_bkt[i], st.ttft_bkt[i]);
    }
    SET(lat_sum_us, st.lat_sum_us);
    SET(ttft_sum_us, st.ttft_sum_us);
#undef SET
}

void shm_proc_totals(const struct shm *shm, struct shm_proc_totals *t)
{
    const struct shm_carried_proc *c = &shm->hdr->carried;

    memset(t, 0, sizeof(*t));
    t->requests = atomic_load_explicit(&c->requests, memory_order_relaxed);
    t->alog_drops = atomic_load_explicit(&c->alog_drops, memory_order_relaxed);
    for (int k = 0; k < 5; k++)
        t->answered[k] = atomic_load_explicit(&c->answered[k], memory_order_relaxed);
    for (int s = 0; s < 3; s++)
        for (int d = 0; d < LIMIT_DIMS; d++) {
            t->limited[s][d] = atomic_load_explicit(&c->limited[s][d], memory_order_relaxed);
            t->lease_limited[s][d] =
                atomic_load_explicit(&c->lease_limited[s][d], memory_order_relaxed);
        }
    for (uint32_t w = 0; w < shm->hdr->n_workers; w++) {
        const struct shm_worker *sw = shm_worker(shm, w);
        for (int s = 0; s < 3; s++)
            for (int d = 0; d < LIMIT_DIMS; d++) {
                t->limited[s][d] += atomic_load_explicit(&sw->limited[s][d], memory_order_relaxed);
                t->lease_limited[s][d] +=
                    atomic_load_explicit(&sw->lease_limited[s][d], memory_order_relaxed);
            }
        t->requests += atomic_load_explicit(&sw->requests, memory_order_relaxed);
        for (int k = 0; k < 5; k++)
            t->answered[k] += atomic_load_explicit(&sw->answered[k], memory_order_relaxed);
        t->conns += atomic_load_explicit(&sw->conns, memory_order_relaxed);
        t->alog_drops += atomic_load_explicit(&sw->alog_drops, memory_order_relaxed);
    }
}

void shm_carry_proc(struct shm *dst, const struct shm *src)
{
    struct shm_carried_proc *to = &dst->hdr->carried;
    struct shm_proc_totals t;

    shm_proc_totals(src, &t);
    atomic_store_explicit(&to->requests, t.requests, memory_order_relaxed);
    atomic_store_explicit(&to->alog_drops, t.alog_drops, memory_order_relaxed);
    for (int k = 0; k < 5; k++)
        atomic_store_explicit(&to->answered[k], t.answered[k], memory_order_relaxed);
    for (int s = 0; s < 3; s++)
        for (int d = 0; d < LIMIT_DIMS; d++) {
            atomic_store_explicit(&to->limited[s][d], t.limited[s][d], memory_order_relaxed);
            atomic_store_explicit(&to->lease_limited[s][d], t.lease_limited[s][d],
                                  memory_order_relaxed);
        }
}

uint32_t shm_backend_set_weight_cfg(struct shm *shm, uint32_t b, uint32_t weight)
{
    return atomic_exchange_explicit(&shm_backend(shm, b)->weight_cfg, weight, memory_order_acq_rel);
}

enum backend_admin shm_backend_set_admin(struct shm *shm, uint32_t b, enum backend_admin a)
{
    return (enum backend_admin)atomic_exchange_explicit(&shm_backend(shm, b)->admin, (uint32_t)a,
                                                        memory_order_acq_rel);
}

void shm_backend_set_state(struct shm *shm, uint32_t b, enum backend_state st,
                           enum backend_reason why, uint64_t now_ns)
{
    struct shm_health h = *health_get(shm, b);

    h.state = st;
    h.reason = why;
    h.since_ns = now_ns;
    h.transitions++;
    shm_backend_publish(shm, b, &h, 0);
}

void shm_backend_set_breaker(struct shm *shm, uint32_t b, enum breaker_state st, uint64_t until_ns,
                             uint64_t open_ns)
{
    struct shm_health h = *health_get(shm, b);

    h.breaker = st;
    h.breaker_until_ns = until_ns;
    h.breaker_open_ns = open_ns;
    shm_backend_publish(shm, b, &h, 0);
}

void shm_backend_set_check(struct shm *shm, uint32_t b, int32_t status, uint32_t dur_us,
                           uint64_t now_ns)
{
    struct shm_health h = *health_get(shm, b);

    h.check_status = status;
    h.check_us = dur_us;
    h.check_at_ns = now_ns;
    shm_backend_publish(shm, b, &h, 0);
}

void shm_backend_set_weight(struct shm *shm, uint32_t b, uint32_t weight_eff)
{
    struct shm_health h = *health_get(shm, b);

    h.weight_eff = weight_eff;
    shm_backend_publish(shm, b, &h, 0);
}

/* ---- gate and epoch-tagged counts ------------------------------------------------------------ */

/* One more in the epoch-tagged count *c for epoch e: a tag of an older epoch starts it from
 * zero; a newer one means e is over (0 is returned). Returns the count with this one. */
static uint32_t epoch_count_inc(_Atomic uint64_t *c, uint32_t e)
{
    uint64_t old = atomic_load_explicit(c, memory_order_relaxed), nv;

    do {
        uint32_t tag = (uint32_t)(old >> 32);

        if (tag == e)
            nv = (uint32_t)old == UINT32_MAX ? old : old + 1;
        else if (epoch_before(tag, e))
            nv = (uint64_t)e << 32 | 1;
        else
            return 0;
    } while (!atomic_compare_exchange_weak_explicit(c, &old, nv, memory_order_acq_rel,
                                                    memory_order_relaxed));
    return (uint32_t)nv;
}

/* Sets `bits` in the gate for epoch e. excl: not once PASSED or FAILED is set (the first of
 * them ends the trial period). Returns 1 when this call set something. */
static int gate_trip(_Atomic uint64_t *g, uint32_t e, uint32_t bits, int excl)
{
    uint64_t old = atomic_load_explicit(g, memory_order_relaxed), nv;

    do {
        uint32_t tag = (uint32_t)(old >> 32), cur = (uint32_t)old;

        if (tag == e) {
            if ((cur & bits) == bits || (excl && (cur & (SHM_TRIP_PASSED | SHM_TRIP_FAILED))))
                return 0;
            nv = old | bits;
        } else if (epoch_before(tag, e)) {
            nv = (uint64_t)e << 32 | bits;
        } else {
            return 0;
        }
    } while (!atomic_compare_exchange_weak_explicit(g, &old, nv, memory_order_acq_rel,
                                                    memory_order_relaxed));
    return 1;
}

/* A failure was just recorded: does it bring b to a threshold of its ALL admission? Each count
 * goes on once its trip is set (a backend stopped for max_fails still has its breaker's run of
 * failures); only the ring scan is skipped then. */
static void fail_trip(struct shm *shm, uint32_t b, uint64_t now_ns)
{
    struct shm_backend *be = shm_backend(shm, b);
    const struct shm_health *h = health_get(shm, b);
    const struct shm_admission *a = &h->adm;
    uint32_t bits = 0, set;

    if (a->kind != SHM_ADMIT_ALL)
        return;
    set = epoch_value(atomic_load_explicit(&be->claim.gate, memory_order_relaxed), h->epoch);
    if (a->consec && epoch_count_inc(&be->claim.consec, h->epoch) >= a->consec)
        bits |= SHM_TRIP_BREAKER;
    if (a->max_fails && !(set & SHM_TRIP_PASSIVE)) {
        uint64_t from = now_ns > a->fail_window_ns ? now_ns - a->fail_window_ns : 0;

        if (from < h->since_ns)
            from = h->since_ns;
        if (shm_backend_failures_since(shm, b, from) >= a->max_fails)
            bits |= SHM_TRIP_PASSIVE;
    }
    if (bits & ~set)
        gate_trip(&be->claim.gate, h->epoch, bits, 0);
}

void shm_wb_record_auth(struct shm *shm, uint32_t w, uint32_t b)
{
    const struct shm_health *h = health_get(shm, b);

    shm_counter_add(&shm_wb(shm, w, b)->auth_failures, 1);
    if (h->adm.kind == SHM_ADMIT_ALL)
        gate_trip(&shm_backend(shm, b)->claim.gate, h->epoch, SHM_TRIP_AUTH, 0);
}

void shm_trial_outcome(struct shm *shm, uint32_t b, uint32_t epoch, int ok)
{
    struct shm_backend *be = shm_backend(shm, b);
    const struct shm_health *h = health_get(shm, b);

    if (h->epoch != epoch || h->adm.kind != SHM_ADMIT_TRIAL)
        return;
    if (ok) {
        uint32_t n = epoch_count_inc(&be->claim.trial_ok, epoch);

        if (n && n >= (h->adm.need ? h->adm.need : 1))
            gate_trip(&be->claim.gate, epoch, SHM_TRIP_PASSED, 1);
    } else if (h->adm.fail_stops) {
        gate_trip(&be->claim.gate, epoch, SHM_TRIP_FAILED, 1);
    }
}

/* ---- counters ---------------------------------------------------------------------------- */

void shm_backend_totals(const struct shm *shm, uint32_t b, struct shm_backend_totals *t)
{
    uint32_t w;

    const struct shm_carried *c = &shm_backend(shm, b)->carried;

    memset(t, 0, sizeof(*t));
    t->requests = atomic_load_explicit(&c->requests, memory_order_relaxed);
    t->failures = atomic_load_explicit(&c->failures, memory_order_relaxed);
    t->bytes_in = atomic_load_explicit(&c->bytes_in, memory_order_relaxed);
    t->bytes_out = atomic_load_explicit(&c->bytes_out, memory_order_relaxed);
    t->retries = atomic_load_explicit(&c->retries, memory_order_relaxed);
    for (w = 0; w < shm->hdr->n_workers; w++) {
        const struct shm_wb *wb = shm_wb(shm, w, b);

        t->active += atomic_load_explicit(&wb->active, memory_order_relaxed);
        t->requests += atomic_load_explicit(&wb->requests, memory_order_relaxed);
        t->failures += atomic_load_explicit(&wb->failures, memory_order_relaxed);
        t->bytes_in += atomic_load_explicit(&wb->bytes_in, memory_order_relaxed);
        t->bytes_out += atomic_load_explicit(&wb->bytes_out, memory_order_relaxed);
        t->retries += atomic_load_explicit(&wb->retries, memory_order_relaxed);
    }
}

/* Prometheus' usual spread, from 5 ms to 2 minutes: LLM answers run from tens of ms to
 * minutes. */
const uint64_t shm_hist_bounds_us[SHM_HIST_BUCKETS - 1] = {
    5000,    10000,   25000,   50000,    100000,   250000,   500000,
    1000000, 2500000, 5000000, 10000000, 30000000, 60000000, 120000000,
};

void shm_wb_observe(struct shm *shm, uint32_t w, uint32_t b, int ttft, uint64_t ns)
{
    struct shm_wb *wb = shm_wb(shm, w, b);
    uint64_t us = ns / 1000;
    unsigned i = 0;

    while (i < SHM_HIST_BUCKETS - 1 && us > shm_hist_bounds_us[i])
        i++;
    shm_counter_add(ttft ? &wb->ttft_bkt[i] : &wb->lat_bkt[i], 1);
    shm_counter_add(ttft ? &wb->ttft_sum_us : &wb->lat_sum_us, us);
}

void shm_worker_note_limited(struct shm *shm, uint32_t w, int kind, int dim, int lease)
{
    if (kind < 0 || kind >= 3 || dim < 1 || dim > LIMIT_DIMS)
        return;
    shm_counter_add(&shm_worker(shm, w)->limited[kind][dim - 1], 1);
    if (lease)
        shm_counter_add(&shm_worker(shm, w)->lease_limited[kind][dim - 1], 1);
}

void shm_backend_stats(const struct shm *shm, uint32_t b, struct shm_backend_stats *s)
{
    const struct shm_carried *c = &shm_backend(shm, b)->carried;

    memset(s, 0, sizeof(*s));
    for (int i = 0; i < 5; i++)
        s->status[i] = atomic_load_explicit(&c->status[i], memory_order_relaxed);
    for (int i = 0; i < SHM_HIST_BUCKETS; i++) {
        s->lat_bkt[i] = atomic_load_explicit(&c->lat_bkt[i], memory_order_relaxed);
        s->ttft_bkt[i] = atomic_load_explicit(&c->ttft_bkt[i], memory_order_relaxed);
    }
    s->lat_sum_us = atomic_load_explicit(&c->lat_sum_us, memory_order_relaxed);
    s->ttft_sum_us = atomic_load_explicit(&c->ttft_sum_us, memory_order_relaxed);
    for (uint32_t w = 0; w < shm->hdr->n_workers; w++) {
        const struct shm_wb *wb = shm_wb(shm, w, b);

        for (int i = 0; i < 5; i++)
            s->status[i] += atomic_load_explicit(&wb->status[i], memory_order_relaxed);
        for (int i = 0; i < SHM_HIST_BUCKETS; i++) {
            s->lat_bkt[i] += atomic_load_explicit(&wb->lat_bkt[i], memory_order_relaxed);
            s->ttft_bkt[i] += atomic_load_explicit(&wb->ttft_bkt[i], memory_order_relaxed);
        }
        s->lat_sum_us += atomic_load_explicit(&wb->lat_sum_us, memory_order_relaxed);
        s->ttft_sum_us += atomic_load_explicit(&wb->ttft_sum_us, memory_order_relaxed);
    }
}

int shm_worker_reset(struct shm *shm, uint32_t w)
{
    struct shm_worker *sw = shm_worker(shm, w);
    uint32_t b;
    int rc = 0;

    /* The dead worker's in-flight requests are gone with it: its shares are zeroed (under its
     * claim counter, which it may have left odd), and the shared counts follow them. */
    for (b = 0; b < shm->hdr->n_backends; b++) {
        struct shm_wb *wb = shm_wb(shm, w, b);
        uint32_t q = atomic_load_explicit(&wb->claim_seq, memory_order_relaxed);

        q += q & 1;
        atomic_store_explicit(&wb->claim_seq, q + 1, memory_order_relaxed);
        atomic_thread_fence(memory_order_release);
        atomic_store_explicit(&wb->active, 0, memory_order_relaxed);
        atomic_store_explicit(&wb->trials, 0, memory_order_relaxed);
        atomic_store_explicit(&wb->claim_seq, q + 2, memory_order_release);
        shm_claims_repair(shm, b);
    }
    /* Its rate-limit slots and budget reservations too; its usage totals stay. */
    if (shm_limits(shm))
        rc = limit_release_owner(shm_limits(shm), w);
    if (shm_acct(shm))
        acct_release_owner(shm_acct(shm), w);
    atomic_store_explicit(&sw->conns, 0, memory_order_relaxed);
    atomic_store_explicit(&sw->pid, 0, memory_order_relaxed);
    return rc;
}

const char *shm_state_str(enum backend_state st)
{
    switch (st) {
    case BACKEND_UP:
        return "UP";
    case BACKEND_DOWN:
        return "DOWN";
    case BACKEND_DEGRADED:
        return "DEGRADED";
    }
    return "?";
}

const char *shm_admin_str(enum backend_admin a)
{
    switch (a) {
    case BACKEND_READY:
        return "READY";
    case BACKEND_DRAIN:
        return "DRAIN";
    case BACKEND_MAINT:
        return "MAINT";
    }
    return "?";
}

const char *shm_reason_str(enum backend_reason r)
{
    static const char *const names[REASON_COUNT] = {
        [REASON_NONE] = "none",
        [REASON_CHECK_OK] = "check passed",
        [REASON_CHECK_STATUS] = "check status",
        [REASON_CHECK_TIMEOUT] = "check timeout",
        [REASON_CHECK_CONNECT] = "check connect failed",
        [REASON_CHECK_TLS] = "check TLS failed",
        [REASON_CHECK_PROTO] = "check bad response",
        [REASON_PASSIVE] = "passive",
        [REASON_AUTH] = "auth",
        [REASON_CHECK_SLOW] = "check slow",
        [REASON_ERROR_RATIO] = "error ratio",
        [REASON_LIVE_OK] = "live request ok",
    };

    return (unsigned)r < REASON_COUNT ? names[r] : "?";
}

void shm_wb_record_ok(struct shm *shm, uint32_t w, uint32_t b, uint64_t now_ns, uint64_t latency_ns)
{
    struct shm_wb *wb = shm_wb(shm, w, b);
    uint64_t e = atomic_load_explicit(&wb->ewma_ns, memory_order_relaxed);

    /* Peak EWMA: a slower sample is taken at once, a faster one pulls it down by 1/8, so a
     * backend that slows down is avoided at once and trusted again gradually. */
    if (latency_ns) {
        e = (e == 0 || latency_ns > e) ? latency_ns : e - (e - latency_ns) / 8;
        atomic_store_explicit(&wb->ewma_ns, e, memory_order_relaxed);
        atomic_store_explicit(&wb->ewma_at_ns, now_ns, memory_order_relaxed);
    }
    shm_counter_add(&wb->ok, 1);
    atomic_store_explicit(&wb->last_ok_ns, now_ns, memory_order_release);
    /* The run of consecutive failures is over. Read first: a healthy backend's success costs no
     * write to the shared line. */
    {
        _Atomic uint64_t *c = &shm_backend(shm, b)->claim.consec;
        uint64_t v = atomic_load_explicit(c, memory_order_relaxed);

        while ((uint32_t)v &&
               !atomic_compare_exchange_weak_explicit(c, &v, v & ~(uint64_t)UINT32_MAX,
                                                      memory_order_acq_rel, memory_order_relaxed))
            ;
    }
}

void shm_wb_record_fail(struct shm *shm, uint32_t w, uint32_t b, uint64_t now_ns)
{
    struct shm_wb *wb = shm_wb(shm, w, b);
    uint32_t pos = atomic_load_explicit(&wb->fail_pos, memory_order_relaxed);

    uint64_t e = atomic_load_explicit(&wb->ewma_ns, memory_order_relaxed);

    atomic_store_explicit(&wb->fail_ring[pos % SHM_FAIL_RING], now_ns, memory_order_relaxed);
    atomic_store_explicit(&wb->fail_pos, pos + 1, memory_order_release);
    shm_counter_add(&wb->failures, 1);
    /* A fast failure must not look like a fast answer to p2c: it is a slow sample. */
    e = e * 2 > SHM_EWMA_FAIL_NS ? e * 2 : SHM_EWMA_FAIL_NS;
    atomic_store_explicit(&wb->ewma_ns, e < 60 * SHM_EWMA_FAIL_NS ? e : 60 * SHM_EWMA_FAIL_NS,
                          memory_order_relaxed);
    atomic_store_explicit(&wb->ewma_at_ns, now_ns, memory_order_relaxed);
    /* This failure is in the ring before the count: of two workers recording the last two
     * failures at once, at least one counts both. */
    atomic_thread_fence(memory_order_seq_cst);
    fail_trip(shm, b, now_ns);
}

uint32_t shm_backend_failures_since(const struct shm *shm, uint32_t b, uint64_t since_ns)
{
    uint32_t w, i, n = 0;

    for (w = 0; w < shm->hdr->n_workers; w++) {
        const struct shm_wb *wb = shm_wb(shm, w, b);

        for (i = 0; i < SHM_FAIL_RING; i++) {
            uint64_t t = atomic_load_explicit(&wb->fail_ring[i], memory_order_relaxed);

            if (t && t > since_ns)
                n++;
        }
    }
    return n;
}

uint64_t shm_backend_last_ok(const struct shm *shm, uint32_t b)
{
    uint64_t m = 0;
    uint32_t w;

    for (w = 0; w < shm->hdr->n_workers; w++) {
        uint64_t t = atomic_load_explicit(&shm_wb(shm, w, b)->last_ok_ns, memory_order_acquire);

        if (t > m)
            m = t;
    }
    return m;
}

uint64_t shm_backend_cool_until(const struct shm *shm, uint32_t b)
{
    uint64_t m = 0;
    uint32_t w;

    for (w = 0; w < shm->hdr->n_workers; w++) {
        uint64_t t = atomic_load_explicit(&shm_wb(shm, w, b)->cool_until_ns, memory_order_relaxed);

        if (t > m)
            m = t;
    }
    return m;
}

void shm_backend_load(const struct shm *shm, uint32_t b, int32_t *active, uint64_t *cool_until)
{
    int32_t a = 0;
    uint64_t m = 0;

    for (uint32_t w = 0; w < shm->hdr->n_workers; w++) {
        const struct shm_wb *wb = shm_wb(shm, w, b);
        uint64_t t = atomic_load_explicit(&wb->cool_until_ns, memory_order_relaxed);

        a += atomic_load_explicit(&wb->active, memory_order_relaxed);
        if (t > m)
            m = t;
    }
    *active = a;
    *cool_until = m;
}

uint64_t shm_backend_ewma(const struct shm *shm, uint32_t b, uint64_t now_ns)
{
    uint64_t sum = 0, n = 0;
    uint32_t w;

    for (w = 0; w < shm->hdr->n_workers; w++) {
        const struct shm_wb *wb = shm_wb(shm, w, b);
        uint64_t e = atomic_load_explicit(&wb->ewma_ns, memory_order_relaxed);
        uint64_t at = atomic_load_explicit(&wb->ewma_at_ns, memory_order_relaxed);

        if (!e)
            continue;
        if (now_ns > at) {
            uint64_t halvings = (now_ns - at) / SHM_EWMA_HALF_LIFE_NS;

            e = halvings >= 64 ? 0 : e >> halvings;
        }
        sum += e;
        n++;
    }
    return n ? sum / n : 0;
}

void shm_wb_budget_note(struct shm *shm, uint32_t w, uint32_t b, uint64_t now_ns, int retry)
{
    struct shm_wb *wb = shm_wb(shm, w, b);
    uint64_t sec = now_ns / 1000000000ULL + 1;
    unsigned i = (unsigned)(sec % SHM_BUDGET_SECS);
    _Atomic uint32_t *c = retry ? &wb->bkt_retry[i] : &wb->bkt_req[i];

    if (atomic_load_explicit(&wb->bkt_sec[i], memory_order_relaxed) != sec) {
        /* A new second takes the bucket over: counts first, so a reader that sees the new
         * second never sees the old second's counts. */
        atomic_store_explicit(&wb->bkt_sec[i], 0, memory_order_release);
        atomic_store_explicit(&wb->bkt_req[i], 0, memory_order_relaxed);
        atomic_store_explicit(&wb->bkt_retry[i], 0, memory_order_relaxed);
        atomic_store_explicit(&wb->bkt_sec[i], sec, memory_order_release);
    }
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

void shm_budget_window(const struct shm *shm, uint32_t b, uint32_t n, uint64_t now_ns,
                       uint64_t *requests, uint64_t *retries)
{
    uint64_t sec = now_ns / 1000000000ULL + 1;

    *requests = *retries = 0;
    for (uint32_t w = 0; w < shm->hdr->n_workers; w++) {
        for (uint32_t k = b; k < b + n && k < shm->hdr->n_backends; k++) {
            const struct shm_wb *wb = shm_wb(shm, w, k);

            for (unsigned i = 0; i < SHM_BUDGET_SECS; i++) {
                uint64_t s = atomic_load_explicit(&wb->bkt_sec[i], memory_order_acquire);

                if (s == 0 || s > sec || s + SHM_BUDGET_SECS <= sec)
                    continue;
                *requests += atomic_load_explicit(&wb->bkt_req[i], memory_order_relaxed);
                *retries += atomic_load_explicit(&wb->bkt_retry[i], memory_order_relaxed);
            }
        }
    }
}

void shm_backend_outcomes(const struct shm *shm, uint32_t b, uint64_t *ok, uint64_t *failed)
{
    uint32_t w;

    *ok = atomic_load_explicit(&shm_backend(shm, b)->carried.ok, memory_order_relaxed);
    *failed = atomic_load_explicit(&shm_backend(shm, b)->carried.failures, memory_order_relaxed);
    for (w = 0; w < shm->hdr->n_workers; w++) {
        *ok += atomic_load_explicit(&shm_wb(shm, w, b)->ok, memory_order_relaxed);
        *failed += atomic_load_explicit(&shm_wb(shm, w, b)->failures, memory_order_relaxed);
    }
}

uint64_t shm_backend_auth_failures(const struct shm *shm, uint32_t b)
{
    uint64_t n =
        atomic_load_explicit(&shm_backend(shm, b)->carried.auth_failures, memory_order_relaxed);

    for (uint32_t w = 0; w < shm->hdr->n_workers; w++)
        n += atomic_load_explicit(&shm_wb(shm, w, b)->auth_failures, memory_order_relaxed);
    return n;
}

/* ---- in-flight claims ---------------------------------------------------------------------- */

/* Takes one unit of the shared count under `limit` (< 0: none) by compare-and-swap, so that
 * racing workers are admitted in turn and exactly as many as fit get in, and counts it in the
 * worker's own share `mine`. The worker's claim counter is odd in between. */
static int claim_take(struct shm_wb *wb, _Atomic int32_t *mine, _Atomic int32_t *shared,
                      int32_t limit)
{
    uint32_t q = atomic_load_explicit(&wb->claim_seq, memory_order_relaxed);
    int32_t n = atomic_load_explicit(shared, memory_order_relaxed);

    if (limit >= 0 && n >= limit)
        return 0;
    atomic_store_explicit(&wb->claim_seq, q + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    do {
        if (limit >= 0 && n >= limit) {
            atomic_store_explicit(&wb->claim_seq, q + 2, memory_order_release);
            return 0;
        }
    } while (!atomic_compare_exchange_weak_explicit(shared, &n, n + 1, memory_order_acq_rel,
                                                    memory_order_relaxed));
    atomic_store_explicit(mine, atomic_load_explicit(mine, memory_order_relaxed) + 1,
                          memory_order_relaxed);
    atomic_store_explicit(&wb->claim_seq, q + 2, memory_order_release);
    return 1;
}

static void claim_give(struct shm_wb *wb, _Atomic int32_t *mine, _Atomic int32_t *shared)
{
    uint32_t q = atomic_load_explicit(&wb->claim_seq, memory_order_relaxed);
    int32_t cur = atomic_load_explicit(mine, memory_order_relaxed);

    if (cur <= 0)
        return;
    atomic_store_explicit(&wb->claim_seq, q + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    atomic_fetch_sub_explicit(shared, 1, memory_order_acq_rel);
    atomic_store_explicit(mine, cur - 1, memory_order_relaxed);
    atomic_store_explicit(&wb->claim_seq, q + 2, memory_order_release);
}

int32_t shm_trials_in_flight(const struct shm *shm, uint32_t b)
{
    return atomic_load_explicit(&shm_backend(shm, b)->inflight.trials, memory_order_relaxed);
}

int shm_trial_acquire(struct shm *shm, uint32_t w, uint32_t b, int32_t limit)
{
    struct shm_wb *wb = shm_wb(shm, w, b);

    return claim_take(wb, &wb->trials, &shm_backend(shm, b)->inflight.trials,
                      limit > 0 ? limit : 0);
}

void shm_trial_release(struct shm *shm, uint32_t w, uint32_t b)
{
    struct shm_wb *wb = shm_wb(shm, w, b);

    claim_give(wb, &wb->trials, &shm_backend(shm, b)->inflight.trials);
}

int shm_active_acquire(struct shm *shm, uint32_t w, uint32_t b)
{
    struct shm_backend *be = shm_backend(shm, b);
    struct shm_wb *wb = shm_wb(shm, w, b);
    uint32_t limit = atomic_load_explicit(&be->max_conns, memory_order_relaxed);

    if (limit == 0) {
        shm_gauge_add(&wb->active, 1);
        return 1;
    }
    return claim_take(wb, &wb->active, &be->inflight.active,
                      limit > INT32_MAX ? INT32_MAX : (int32_t)limit);
}

void shm_active_release(struct shm *shm, uint32_t w, uint32_t b)
{
    struct shm_backend *be = shm_backend(shm, b);
    struct shm_wb *wb = shm_wb(shm, w, b);

    if (atomic_load_explicit(&be->max_conns, memory_order_relaxed) == 0) {
        if (atomic_load_explicit(&wb->active, memory_order_relaxed) > 0)
            shm_gauge_add(&wb->active, -1);
        return;
    }
    claim_give(wb, &wb->active, &be->inflight.active);
}

/* A snapshot of the shared counts and the workers' shares, settled when every worker's claim
 * counter was even and the same before and after it (a seqlock read per worker). A settled
 * snapshot with the two apart is what a death left behind: the shared count is set to the sum
 * by compare-and-swap, so a claim made since (which changes the shared count) wins over it. */
int shm_claims_repair(struct shm *shm, uint32_t b)
{
    struct shm_backend *be = shm_backend(shm, b);
    uint32_t n = shm->hdr->n_workers;
    int64_t active = 0, trials = 0;
    uint64_t before = 0, after = 0;
    int32_t sa, st;
    int changed = 0;

    /* Claim counters only grow: the same sum after as before means none moved. */
    for (uint32_t w = 0; w < n; w++) {
        uint32_t q = atomic_load_explicit(&shm_wb(shm, w, b)->claim_seq, memory_order_acquire);

        if (q & 1)
            return 0;
        before += q;
    }
    sa = atomic_load_explicit(&be->inflight.active, memory_order_relaxed);
    st = atomic_load_explicit(&be->inflight.trials, memory_order_relaxed);
    for (uint32_t w = 0; w < n; w++) {
        const struct shm_wb *wb = shm_wb(shm, w, b);

        active += atomic_load_explicit(&wb->active, memory_order_relaxed);
        trials += atomic_load_explicit(&wb->trials, memory_order_relaxed);
    }
    atomic_thread_fence(memory_order_acquire);
    for (uint32_t w = 0; w < n; w++)
        after += atomic_load_explicit(&shm_wb(shm, w, b)->claim_seq, memory_order_relaxed);
    if (after != before)
        return 0;
    if (atomic_load_explicit(&be->max_conns, memory_order_relaxed) && sa != active)
        changed |= atomic_compare_exchange_strong_explicit(
            &be->inflight.active, &sa, (int32_t)active, memory_order_acq_rel, memory_order_relaxed);
    if (st != trials)
        changed |= atomic_compare_exchange_strong_explicit(
            &be->inflight.trials, &st, (int32_t)trials, memory_order_acq_rel, memory_order_relaxed);
    return changed;
}

uint32_t shm_backend_breaker_cmd(struct shm *shm, uint32_t b, enum breaker_cmd cmd)
{
    struct shm_backend *be = shm_backend(shm, b);
    uint32_t seq = atomic_load_explicit(&be->breaker_cmd_seq, memory_order_relaxed) + 1;

    atomic_store_explicit(&be->breaker_cmd, (uint32_t)cmd, memory_order_relaxed);
    atomic_store_explicit(&be->breaker_cmd_seq, seq, memory_order_release);
    return seq;
}

enum breaker_cmd shm_backend_breaker_cmd_take(struct shm *shm, uint32_t b)
{
    struct shm_backend *be = shm_backend(shm, b);
    uint32_t seq = atomic_load_explicit(&be->breaker_cmd_seq, memory_order_acquire);

    if (seq == atomic_load_explicit(&be->breaker_cmd_done, memory_order_relaxed))
        return BREAKER_CMD_NONE;
    atomic_store_explicit(&be->breaker_cmd_done, seq, memory_order_relaxed);
    return (enum breaker_cmd)atomic_load_explicit(&be->breaker_cmd, memory_order_relaxed);
}

uint32_t shm_backend_check_cmd(struct shm *shm, uint32_t b)
{
    struct shm_backend *be = shm_backend(shm, b);
    uint32_t seq = atomic_load_explicit(&be->check_cmd_seq, memory_order_relaxed) + 1;

    if (seq == 0) /* 0 is "never asked" */
        seq = 1;
    atomic_store_explicit(&be->check_cmd_seq, seq, memory_order_release);
    return seq;
}

uint32_t shm_backend_check_cmd_seq(const struct shm *shm, uint32_t b)
{
    return atomic_load_explicit(&shm_backend(shm, b)->check_cmd_seq, memory_order_acquire);
}

uint32_t shm_backend_check_answered(const struct shm *shm, uint32_t b)
{
    return atomic_load_explicit(&shm_backend(shm, b)->check_ans.seq, memory_order_acquire);
}

void shm_backend_check_answer(struct shm *shm, uint32_t b, uint32_t seq,
                              const struct shm_check_answer *a)
{
    struct shm_backend *be = shm_backend(shm, b);
    uint64_t w[SHM_CHECK_DETAIL / 8] = {0};

    memcpy(w, a->detail, sizeof(w));
    ((char *)w)[sizeof(w) - 1] = '\0';
    for (size_t k = 0; k < SHM_CHECK_DETAIL / 8; k++)
        atomic_store_explicit(&be->check_ans.detail[k], w[k], memory_order_relaxed);
    atomic_store_explicit(&be->check_ans.status, a->status, memory_order_relaxed);
    atomic_store_explicit(&be->check_ans.dur_us, a->dur_us, memory_order_relaxed);
    atomic_store_explicit(&be->check_ans.ok, (uint32_t)a->ok, memory_order_relaxed);
    atomic_store_explicit(&be->check_ans.seq, seq, memory_order_release);
}

int shm_backend_check_result(const struct shm *shm, uint32_t b, uint32_t seq,
                             struct shm_check_answer *a)
{
    const struct shm_backend *be = shm_backend(shm, b);
    uint32_t done = atomic_load_explicit(&be->check_ans.seq, memory_order_acquire);
    uint64_t w[SHM_CHECK_DETAIL / 8];

    if (done == 0 || (int32_t)(done - seq) < 0)
        return 0;
    for (size_t k = 0; k < SHM_CHECK_DETAIL / 8; k++)
        w[k] = atomic_load_explicit(&be->check_ans.detail[k], memory_order_relaxed);
    memcpy(a->detail, w, sizeof(a->detail));
    a->detail[sizeof(a->detail) - 1] = '\0';
    a->status = atomic_load_explicit(&be->check_ans.status, memory_order_relaxed);
    a->dur_us = atomic_load_explicit(&be->check_ans.dur_us, memory_order_relaxed);
    a->ok = (enum shm_check_ok)atomic_load_explicit(&be->check_ans.ok, memory_order_relaxed);
    return 1;
}

const char *shm_breaker_str(enum breaker_state st)
{
    switch (st) {
    case BREAKER_CLOSED:
        return "closed";
    case BREAKER_OPEN:
        return "open";
    case BREAKER_HALF_OPEN:
        return "half-open";
    }
    return "?";
}
