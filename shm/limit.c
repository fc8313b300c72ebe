/* Exact shared rate limits and budgets: sliding-window logs, parallel slots, budget periods. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "shm/limit.h"

#define LIMIT_MAGIC 0x314d494c57474941ULL /* "AIGWLIM1" little-endian */
#define LIMIT_ALIGN 64u

/* Admissions at one time (or merged ones: the latest time of those merged, so they leave the
 * window no earlier than the real ones would). Admissions are numbered in order in each
 * limiter; an entry holds numbers seq_hi - count + 1 .. seq_hi. */
struct limit_entry {
    uint64_t t_ms;
    uint64_t tokens;
    uint64_t seq_hi;
    uint32_t count;
    uint32_t pad_;
};

/* What one owner (worker slot) holds of a limiter: the truth its share is given back from. */
struct limit_owner {
    uint32_t parallel;
    uint32_t pad_;
    uint64_t reserved_nano;
};

/* One limiter. Every field below mu is read and written under it only. The sums are derived
 * from the log and the owners' shares, so a holder that died halfway through a change leaves
 * nothing that cell_repair cannot set right. */
struct limit_cell {
    pthread_mutex_t mu;
    struct limit_spec spec;
    uint32_t cap;     /* log entries; 0 when there is no rpm or tpm */
    uint64_t off_log; /* from the region start */
    uint64_t head;    /* log positions: entries head..tail-1, oldest first */
    uint64_t tail;
    uint64_t next_seq;
    uint64_t sum_req; /* counts and tokens of the entries in the log */
    uint64_t sum_tok;
    uint64_t parallel;
    uint64_t reserved_nano;
    uint64_t spent_nano;
    int64_t period_start;
    int64_t period_end; /* INT64_MAX for total */
    /* [cluster] (spec.leased): this host's lease, see struct limit_lease */
    int64_t lease_req, lease_tok;
    uint32_t lease_par;
    uint32_t lease_fb; /* enum limit_fallback */
    uint64_t lease_until_ms;
    int64_t used_req, used_tok;
    int64_t low_req, low_tok;   /* an admission leaving less raises hungry */
    uint32_t cap_req, cap_tok;  /* LIMIT_FALLBACK_SHARE: this host's share of the limits */
    uint32_t cap_par, need_tok; /* need_tok: largest request refused by the lease's tokens */
    _Atomic uint32_t hungry;    /* set by workers, cleared by the sync process */
    int64_t fleet_req, fleet_tok, out_req, out_tok, fleet_par; /* for show cluster */
    /* budget_usd lease: what may still be reserved, spent since the last take, the largest
     * cost refused, valid until, the share cap (fallback), the fleet's spent */
    int64_t lease_nano, used_nano;
    uint64_t need_nano, nano_until_ms, cap_nano;
    int64_t fleet_spent;
} __attribute__((aligned(LIMIT_ALIGN)));

struct limit_region {
    uint64_t magic;
    uint32_t n;
    uint32_t n_owners;
    uint64_t size;
    uint64_t off_cells;
    uint64_t off_owners; /* n * n_owners limit_owner, limiter-major */
    struct limit_fleet fleet __attribute__((aligned(LIMIT_ALIGN)));
};

static size_t align_up(size_t n)
{
    return (n + LIMIT_ALIGN - 1) & ~(size_t)(LIMIT_ALIGN - 1);
}

static uint32_t log_cap(const struct limit_spec *s)
{
    /* With an rpm, at most rpm admissions are ever in the window: rpm entries never merge. */
    if (s->rpm)
        return s->rpm < LIMIT_LOG_MAX ? s->rpm : LIMIT_LOG_MAX;
    return s->tpm ? LIMIT_LOG_DEFAULT : 0;
}

static struct limit_cell *cell(const struct limit_region *r, uint32_t id)
{
    return (struct limit_cell *)((char *)r + r->off_cells) + id;
}

static struct limit_entry *cell_log(const struct limit_region *r, const struct limit_cell *c)
{
    return (struct limit_entry *)((char *)r + c->off_log);
}

static struct limit_owner *owner_of(const struct limit_region *r, uint32_t id, uint32_t o)
{
    return (struct limit_owner *)((char *)r + r->off_owners) + (size_t)id * r->n_owners + o;
}

size_t limit_region_size(uint32_t n, const struct limit_spec *specs, uint32_t n_owners)
{
    size_t size = align_up(sizeof(struct limit_region));

    size += align_up(sizeof(struct limit_cell) * n);
    size += align_up(sizeof(struct limit_owner) * n * n_owners);
    for (uint32_t i = 0; i < n; i++)
        size += align_up(sizeof(struct limit_entry) * log_cap(&specs[i]));
    return size;
}

/* ---- budget periods (UTC calendar) ----------------------------------------------------------- */

int64_t limit_period_start(enum limit_period p, int64_t wall_s)
{
    struct tm tm;
    time_t t = (time_t)wall_s;

    switch (p) {
    case LIMIT_PERIOD_DAY:
        return wall_s - ((wall_s % 86400) + 86400) % 86400;
    case LIMIT_PERIOD_MONTH:
        if (!gmtime_r(&t, &tm))
            return wall_s;
        tm.tm_mday = 1;
        tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
        return (int64_t)timegm(&tm);
    case LIMIT_PERIOD_TOTAL:
        break;
    }
    return 0;
}

int64_t limit_period_next(enum limit_period p, int64_t start)
{
    struct tm tm;
    time_t t = (time_t)start;

    switch (p) {
    case LIMIT_PERIOD_DAY:
        return start + 86400;
    case LIMIT_PERIOD_MONTH:
        if (!gmtime_r(&t, &tm))
            return INT64_MAX;
        tm.tm_mon += 1; /* timegm normalises December + 1 */
        tm.tm_mday = 1;
        tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
        return (int64_t)timegm(&tm);
    case LIMIT_PERIOD_TOTAL:
        break;
    }
    return INT64_MAX;
}

static void period_set(struct limit_cell *c, int64_t start)
{
    c->period_start = start;
    c->period_end = limit_period_next(c->spec.period, start);
}

/* A new period starts afresh: nothing spent yet (what is in flight stays reserved). */
static void period_roll(struct limit_cell *c, int64_t wall_s)
{
    if (wall_s >= c->period_end) {
        period_set(c, limit_period_start(c->spec.period, wall_s));
        c->spent_nano = 0;
        /* [cluster]: a new period's budget is leased afresh; what the old one spent is done */
        c->lease_nano = 0;
        c->used_nano = 0;
    }
}

/* ---- region ---------------------------------------------------------------------------------- */

int limit_region_init(void *mem, size_t size, uint32_t n, const struct limit_spec *specs,
                      uint32_t n_owners, int64_t wall_s)
{
    struct limit_region *r = mem;
    pthread_mutexattr_t attr;
    size_t off;
    int rc;

    if (!mem || ((uintptr_t)mem % LIMIT_ALIGN) || n_owners == 0 || n_owners > LIMIT_MAX_OWNERS ||
        (n && !specs) || size < limit_region_size(n, specs, n_owners))
        return -EINVAL;
    for (uint32_t i = 0; i < n; i++)
        if ((unsigned)specs[i].period > LIMIT_PERIOD_TOTAL)
            return -EINVAL;
    memset(mem, 0, limit_region_size(n, specs, n_owners));
    r->magic = LIMIT_MAGIC;
    r->n = n;
    r->n_owners = n_owners;
    r->size = limit_region_size(n, specs, n_owners);
    r->off_cells = align_up(sizeof(*r));
    r->off_owners = r->off_cells + align_up(sizeof(struct limit_cell) * n);
    off = r->off_owners + align_up(sizeof(struct limit_owner) * n * n_owners);

    if ((rc = pthread_mutexattr_init(&attr)) != 0)
        return -rc;
    /* Robust: a process that dies holding the lock hands the next taker EOWNERDEAD instead of
     * freezing everyone (cell_lock repairs the limiter then). Uncontended, it is a CAS. */
    if ((rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED)) != 0 ||
        (rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST)) != 0)
        goto out;
    for (uint32_t i = 0; i < n; i++) {
        struct limit_cell *c = cell(r, i);

        if ((rc = pthread_mutex_init(&c->mu, &attr)) != 0)
            goto out;
        c->spec = specs[i];
        c->cap = log_cap(&specs[i]);
        c->off_log = off;
        c->next_seq = 1;
        off += align_up(sizeof(struct limit_entry) * c->cap);
        period_set(c, limit_period_start(c->spec.period, wall_s));
        if (c->spec.leased) {
            c->lease_fb = specs[i].lease_start <= LIMIT_FALLBACK_CLOSED ? specs[i].lease_start
                                                                        : LIMIT_FALLBACK_NONE;
            c->cap_req = specs[i].rpm;
            c->cap_tok = specs[i].tpm;
            c->cap_par = specs[i].max_parallel;
            c->cap_nano = specs[i].budget_nano;
        }
    }
out:
    pthread_mutexattr_destroy(&attr);
    if (rc) {
        r->magic = 0;
        return -rc;
    }
    r->magic = LIMIT_MAGIC;
    return 0;
}

uint32_t limit_region_count(const struct limit_region *r)
{
    return r->n;
}

/* ---- one limiter, under its lock --------------------------------------------------------------
 */

/* The previous holder died in the middle of a change: rebuild what is derived. */
static void cell_repair(struct limit_region *r, uint32_t id)
{
    struct limit_cell *c = cell(r, id);
    struct limit_entry *log = cell_log(r, c);

    if (c->tail < c->head || c->tail - c->head > c->cap)
        c->head = c->tail;
    c->sum_req = c->sum_tok = 0;
    for (uint64_t p = c->head; p < c->tail; p++) {
        c->sum_req += log[p % c->cap].count;
        c->sum_tok += log[p % c->cap].tokens;
    }
    c->parallel = c->reserved_nano = 0;
    for (uint32_t o = 0; o < r->n_owners; o++) {
        c->parallel += owner_of(r, id, o)->parallel;
        c->reserved_nano += owner_of(r, id, o)->reserved_nano;
    }
}

static void cell_lock(struct limit_region *r, uint32_t id)
{
    struct limit_cell *c = cell(r, id);

    if (pthread_mutex_lock(&c->mu) == EOWNERDEAD) {
        cell_repair(r, id);
        pthread_mutex_consistent(&c->mu);
    }
}

/* The master's lock: a worker stopped (SIGSTOP, a debugger) while it holds the lock must not
 * freeze the master's event loop, so the master waits LIMIT_MASTER_WAIT_MS at most, on the
 * monotonic clock (a wall-clock step cannot stretch it). 0 or -EBUSY. */
static int cell_lock_master(struct limit_region *r, uint32_t id)
{
    struct limit_cell *c = cell(r, id);
    struct timespec ts;
    int rc;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_nsec += (long)LIMIT_MASTER_WAIT_MS * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
    }
    rc = pthread_mutex_clocklock(&c->mu, CLOCK_MONOTONIC, &ts);
    if (rc == EOWNERDEAD) {
        cell_repair(r, id);
        pthread_mutex_consistent(&c->mu);
        return 0;
    }
    return rc == 0 ? 0 : -EBUSY;
}

static void cell_unlock(struct limit_region *r, uint32_t id)
{
    pthread_mutex_unlock(&cell(r, id)->mu);
}

/* Drops the admissions that left the window: an admission at t counts while now < t + W. */
static void cell_expire(struct limit_region *r, struct limit_cell *c, uint64_t now_ms)
{
    struct limit_entry *log = cell_log(r, c);

    while (c->head < c->tail) {
        struct limit_entry *e = &log[c->head % c->cap];

        if (e->t_ms + LIMIT_WINDOW_MS > now_ms)
            break;
        c->sum_req -= e->count;
        c->sum_tok -= e->tokens < c->sum_tok ? e->tokens : c->sum_tok;
        c->head++;
    }
}

/* ms until enough of the oldest admissions leave the window to free `need` requests (by_tokens
 * = 0) or tokens (by_tokens = 1). */
static int64_t cell_wait(struct limit_region *r, const struct limit_cell *c, uint64_t now_ms,
                         uint64_t need, int by_tokens)
{
    const struct limit_entry *log = cell_log(r, c);
    uint64_t freed = 0;

    for (uint64_t p = c->head; p < c->tail; p++) {
        const struct limit_entry *e = &log[p % c->cap];

        freed += by_tokens ? e->tokens : e->count;
        if (freed >= need)
            return e->t_ms + LIMIT_WINDOW_MS > now_ms
                       ? (int64_t)(e->t_ms + LIMIT_WINDOW_MS - now_ms)
                       : 0;
    }
    return LIMIT_RETRY_NEVER; /* cannot happen while the sums match the log */
}

/* Longer waits first, never the longest of all. */
static int wait_longer(int64_t a, int64_t b)
{
    if (a == LIMIT_RETRY_NEVER)
        return b != LIMIT_RETRY_NEVER;
    return b != LIMIT_RETRY_NEVER && a > b;
}

/* Whether this host's lease of the fleet limits admits the request (its cell is leased). */
static enum limit_dim lease_check(struct limit_cell *c, uint64_t now_ms, uint64_t tokens)
{
    const struct limit_spec *s = &c->spec;

    if (!s->rpm && !s->tpm && !s->max_parallel)
        return LIMIT_OK; /* leased for its budget only (budget_check) */
    switch ((enum limit_fallback)c->lease_fb) {
    case LIMIT_FALLBACK_OPEN:
        return LIMIT_OK;
    case LIMIT_FALLBACK_CLOSED:
        return LIMIT_FLEET;
    case LIMIT_FALLBACK_SHARE:
        if (s->rpm && c->sum_req + 1 > c->cap_req)
            return LIMIT_REQUESTS;
        if (s->tpm && c->sum_tok + tokens > c->cap_tok)
            return LIMIT_TOKENS;
        if (s->max_parallel && c->parallel + 1 > c->cap_par)
            return LIMIT_PARALLEL;
        return LIMIT_OK;
    case LIMIT_FALLBACK_NONE:
        break;
    }
    if (now_ms >= c->lease_until_ms)
        return s->rpm ? LIMIT_REQUESTS : s->tpm ? LIMIT_TOKENS : LIMIT_PARALLEL;
    if (s->rpm && c->lease_req < 1)
        return LIMIT_REQUESTS;
    if (s->tpm && c->lease_tok < (int64_t)tokens) {
        if (tokens > c->need_tok)
            c->need_tok = tokens > UINT32_MAX ? UINT32_MAX : (uint32_t)tokens;
        return LIMIT_TOKENS;
    }
    if (s->max_parallel && c->parallel + 1 > c->lease_par)
        return LIMIT_PARALLEL;
    return LIMIT_OK;
}

/* Whether this host's budget lease admits a request reserving `cost` (the local budget
 * admitted it already: spent_nano is this host's own). */
static enum limit_dim lease_check_budget(struct limit_cell *c, uint64_t now_ms, uint64_t cost)
{
    switch ((enum limit_fallback)c->lease_fb) {
    case LIMIT_FALLBACK_OPEN:
        return LIMIT_OK;
    case LIMIT_FALLBACK_CLOSED:
        return LIMIT_FLEET;
    case LIMIT_FALLBACK_SHARE:
        return c->spent_nano + c->reserved_nano + cost > c->cap_nano ? LIMIT_BUDGET : LIMIT_OK;
    case LIMIT_FALLBACK_NONE:
        break;
    }
    if (now_ms >= c->nano_until_ms || c->lease_nano < (int64_t)cost) {
        if (cost > c->need_nano)
            c->need_nano = cost;
        /* the fleet's budget spent as of the last renewal: the quota is gone; else this host
         * waits for its share to be topped up */
        return c->fleet_spent + (int64_t)cost > (int64_t)c->spec.budget_nano ? LIMIT_BUDGET
                                                                             : LIMIT_FLEET_WAIT;
    }
    return LIMIT_OK;
}

/* A refusal by the lease (dimension d) while the fleet, as Redis counted it at the last
 * renewal, had room for the request: the host is waiting for a top-up, not at the limit. */
static int lease_room(const struct limit_cell *c, enum limit_dim d, uint64_t tokens)
{
    const struct limit_spec *s = &c->spec;

    if (c->lease_fb != LIMIT_FALLBACK_NONE)
        return 0;
    switch (d) {
    case LIMIT_REQUESTS:
        return c->fleet_req + 1 <= (int64_t)s->rpm;
    case LIMIT_TOKENS:
        return c->fleet_tok + (int64_t)tokens <= (int64_t)s->tpm;
    case LIMIT_PARALLEL:
        return c->fleet_par + 1 <= (int64_t)s->max_parallel;
    default:
        return 0;
    }
}

/* An admission drew on the lease. */
static void lease_draw(struct limit_cell *c, uint64_t tokens, uint64_t cost)
{
    if (c->spec.budget_nano && c->lease_fb == LIMIT_FALLBACK_NONE)
        c->lease_nano -= (int64_t)cost;
    c->used_req += 1;
    c->used_tok += (int64_t)tokens;
    if (c->lease_fb != LIMIT_FALLBACK_NONE)
        return;
    c->lease_req -= 1;
    c->lease_tok -= (int64_t)tokens;
    if ((c->spec.rpm && c->lease_req < c->low_req) || (c->spec.tpm && c->lease_tok < c->low_tok))
        atomic_store_explicit(&c->hungry, 1, memory_order_relaxed);
}

/* Would this limiter admit the request? LIMIT_OK, or the dimension with the longest wait and
 * that wait in *retry. */
static enum limit_dim cell_check(struct limit_region *r, struct limit_cell *c, uint64_t now_ms,
                                 int64_t wall_s, uint64_t tokens, uint64_t cost, int64_t *retry,
                                 int *lease)
{
    const struct limit_spec *s = &c->spec;
    enum limit_dim dim = LIMIT_OK;
    int64_t w;

    if (c->cap)
        cell_expire(r, c, now_ms);
    if (s->rpm && c->sum_req + 1 > s->rpm) {
        w = cell_wait(r, c, now_ms, c->sum_req + 1 - s->rpm, 0);
        if (dim == LIMIT_OK || wait_longer(w, *retry))
            dim = LIMIT_REQUESTS, *retry = w;
    }
    if (s->tpm && c->sum_tok + tokens > s->tpm) {
        w = tokens > s->tpm ? LIMIT_RETRY_NEVER
                            : cell_wait(r, c, now_ms, c->sum_tok + tokens - s->tpm, 1);
        if (dim == LIMIT_OK || wait_longer(w, *retry))
            dim = LIMIT_TOKENS, *retry = w;
    }
    if (s->max_parallel && c->parallel + 1 > s->max_parallel) {
        w = LIMIT_PARALLEL_MS;
        if (dim == LIMIT_OK || wait_longer(w, *retry))
            dim = LIMIT_PARALLEL, *retry = w;
    }
    if (s->leased && dim == LIMIT_OK) {
        enum limit_dim d = lease_check(c, now_ms, tokens);

        if (d != LIMIT_OK) {
            /* a top-up may come within a round trip to Redis: ask for one */
            atomic_store_explicit(&c->hungry, 1, memory_order_relaxed);
            dim = d;
            *retry = (int64_t)s->lease_retry_ms;
            *lease = lease_room(c, d, tokens) ? 2 : 1;
        }
    }
    if (s->budget_nano) {
        period_roll(c, wall_s);
        if (c->spent_nano + c->reserved_nano + cost > s->budget_nano) {
            /* A request dearer than the whole budget never fits; otherwise the next period. */
            if (cost > s->budget_nano || c->period_end == INT64_MAX)
                w = LIMIT_RETRY_NEVER;
            else
                w = (c->period_end - wall_s) * 1000;
            if (dim == LIMIT_OK || wait_longer(w, *retry))
                dim = LIMIT_BUDGET, *retry = w, *lease = 0;
        }
    }
    if (s->leased && s->budget_nano && dim == LIMIT_OK) {
        enum limit_dim d = lease_check_budget(c, now_ms, cost);

        if (d != LIMIT_OK) {
            atomic_store_explicit(&c->hungry, 1, memory_order_relaxed);
            dim = d;
            *retry = (int64_t)s->lease_retry_ms;
            /* not worth a wait: the rest of a budget mostly sits in another host's open share,
             * which it gives back only after two quiet renewals */
            *lease = 1;
        }
    }
    return dim;
}

/* Makes room for one more entry: the two neighbours closest in time become one, at the later
 * time, so the pair leaves the window no earlier than its last admission would have. */
static void cell_merge(struct limit_region *r, struct limit_cell *c)
{
    struct limit_entry *log = cell_log(r, c);
    uint64_t best = c->head, gap = UINT64_MAX;

    for (uint64_t p = c->head; p + 1 < c->tail; p++) {
        uint64_t g = log[(p + 1) % c->cap].t_ms - log[p % c->cap].t_ms;

        if (g < gap)
            gap = g, best = p;
    }
    {
        struct limit_entry *a = &log[best % c->cap], *b = &log[(best + 1) % c->cap];

        b->count += a->count;
        b->tokens += a->tokens;
    }
    /* The older entries move up by one; a holder dying here leaves one counted twice (too
     * strict for a minute at most, never too loose). */
    for (uint64_t p = best; p > c->head; p--)
        log[p % c->cap] = log[(p - 1) % c->cap];
    c->head++;
}

static uint64_t cell_append(struct limit_region *r, struct limit_cell *c, uint64_t now_ms,
                            uint64_t tokens)
{
    struct limit_entry *log = cell_log(r, c);
    uint64_t seq = c->next_seq++;
    struct limit_entry *e;

    if (!c->cap)
        return seq;
    /* A log that may fill (more admissions in a window than it has entries: an rpm above
     * LIMIT_LOG_MAX, or only a tpm) keeps, once nearly full, one entry per slice of
     * LIMIT_WINDOW_MS / cap ms, timed at the slice's end: an admission in the slice of the last
     * entry joins it in O(1) rather than costing a merge scan, and leaves the window at most
     * one slice late (the strict side). */
    if ((c->spec.rpm == 0 || c->spec.rpm > c->cap) && c->tail - c->head >= c->cap - c->cap / 8 &&
        c->tail > c->head) {
        struct limit_entry *last = &log[(c->tail - 1) % c->cap];
        uint64_t slice = LIMIT_WINDOW_MS / c->cap + 1, end = (now_ms / slice + 1) * slice - 1;

        if (last->t_ms == end) {
            last->seq_hi = seq;
            last->count++;
            last->tokens += tokens;
            c->sum_req += 1;
            c->sum_tok += tokens;
            return seq;
        }
        now_ms = end; /* the new entry starts a slice: it is timed at the slice's end */
    }
    if (c->tail - c->head == c->cap)
        cell_merge(r, c);
    /* Times from several processes may arrive a little out of order: an entry is never older
     * than the one before it (keeps the log sorted; errs on the strict side). */
    if (c->tail > c->head && log[(c->tail - 1) % c->cap].t_ms > now_ms)
        now_ms = log[(c->tail - 1) % c->cap].t_ms;
    e = &log[c->tail % c->cap];
    e->t_ms = now_ms;
    e->tokens = tokens;
    e->seq_hi = seq;
    e->count = 1;
    c->tail++;
    c->sum_req += 1;
    c->sum_tok += tokens;
    return seq;
}

/* The entry holding admission seq, or NULL when it has left the window. */
static struct limit_entry *cell_find(struct limit_region *r, struct limit_cell *c, uint64_t seq)
{
    struct limit_entry *log = cell_log(r, c);
    uint64_t lo = c->head, hi = c->tail;

    /* the first entry whose seq_hi reaches seq holds it. A request is mostly settled soon
     * after its admission, its entry among the last few: they are looked at from the tail
     * first, the rest of the log searched by halves */
    while (hi > lo && c->tail - hi < 8 && log[(hi - 1) % c->cap].seq_hi >= seq)
        hi--;
    if (hi > lo && c->tail - hi < 8)
        lo = hi; /* log[hi - 1] is before seq: hi is the entry */
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;

        if (log[mid % c->cap].seq_hi < seq)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == c->tail)
        return NULL;
    {
        struct limit_entry *e = &log[lo % c->cap];

        return seq + e->count > e->seq_hi ? e : NULL;
    }
}

static void trio_offer(struct limit_trio *t, uint64_t limit, uint64_t used, uint64_t reset_ms)
{
    uint64_t rem = used < limit ? limit - used : 0;

    if (!t->set || rem < t->remaining || (rem == t->remaining && limit < t->limit)) {
        t->set = 1;
        t->limit = limit;
        t->remaining = rem;
        t->reset_ms = reset_ms;
    }
}

/* Offers the limiter's figures for the x-ratelimit headers. reset: until the window is empty
 * (its newest admission leaves), OpenAI's "resets to its initial state". */
static void cell_headers(struct limit_region *r, const struct limit_cell *c, uint64_t now_ms,
                         struct limit_verdict *v)
{
    uint64_t reset = 0;

    if (!c->cap)
        return;
    if (c->tail > c->head) {
        uint64_t t = cell_log(r, c)[(c->tail - 1) % c->cap].t_ms + LIMIT_WINDOW_MS;

        reset = t > now_ms ? t - now_ms : 0;
    }
    if (c->spec.rpm)
        trio_offer(&v->req, c->spec.rpm, c->sum_req, reset);
    if (c->spec.tpm)
        trio_offer(&v->tok, c->spec.tpm, c->sum_tok, reset);
}

/* ---- admission --------------------------------------------------------------------------------
 */

/* ids sorted and without duplicates, into u: the lock order of every process. */
static uint32_t unique_ids(const uint32_t *ids, uint32_t n, uint32_t *u)
{
    uint32_t m = 0;

    for (uint32_t i = 0; i < n; i++) {
        uint32_t k = m;

        while (k > 0 && u[k - 1] > ids[i])
            k--;
        if (k > 0 && u[k - 1] == ids[i])
            continue;
        memmove(&u[k + 1], &u[k], (m - k) * sizeof(*u));
        u[k] = ids[i];
        m++;
    }
    return m;
}

int limit_admit(struct limit_region *r, const uint32_t *ids, uint32_t n, uint64_t now_ms,
                int64_t wall_s, uint64_t tokens, uint64_t cost_nano, uint32_t owner,
                struct limit_ticket *t, struct limit_verdict *v)
{
    uint32_t u[LIMIT_MAX_IDS], m;
    int64_t retry = 0;

    memset(v, 0, sizeof(*v));
    v->limiter = -1;
    memset(t, 0, sizeof(*t));
    if (n > LIMIT_MAX_IDS || owner >= r->n_owners)
        return -EINVAL;
    for (uint32_t i = 0; i < n; i++)
        if (ids[i] >= r->n)
            return -EINVAL;
    m = unique_ids(ids, n, u);
    for (uint32_t i = 0; i < m; i++)
        cell_lock(r, u[i]);
    for (uint32_t i = 0; i < m; i++) {
        int64_t w = 0;
        int lease = 0;
        enum limit_dim d =
            cell_check(r, cell(r, u[i]), now_ms, wall_s, tokens, cost_nano, &w, &lease);

        if (d != LIMIT_OK && (v->dim == LIMIT_OK || wait_longer(w, retry))) {
            v->dim = d;
            v->limiter = (int32_t)u[i];
            v->lease = lease;
            retry = w;
        }
    }
    if (v->dim == LIMIT_OK) {
        t->n = m;
        t->owner = owner;
        t->tokens = tokens;
        t->cost_nano = cost_nano;
        for (uint32_t i = 0; i < m; i++) {
            struct limit_cell *c = cell(r, u[i]);
            struct limit_owner *o = owner_of(r, u[i], owner);

            t->ids[i] = u[i];
            t->seq[i] = cell_append(r, c, now_ms, tokens);
            if (c->spec.leased)
                lease_draw(c, tokens, cost_nano);
            o->parallel++;
            o->reserved_nano += cost_nano;
            c->parallel++;
            c->reserved_nano += cost_nano;
        }
    }
    v->retry_ms = v->dim == LIMIT_OK ? 0 : retry;
    for (uint32_t i = 0; i < m; i++) {
        cell_headers(r, cell(r, u[i]), now_ms, v);
        cell_unlock(r, u[i]);
    }
    return v->dim == LIMIT_OK ? 0 : -EAGAIN;
}

void limit_settle(struct limit_region *r, struct limit_ticket *t, uint64_t now_ms, int64_t wall_s,
                  uint64_t real_tokens, uint64_t real_cost_nano)
{
    for (uint32_t i = 0; i < t->n && i < LIMIT_MAX_IDS; i++) {
        uint32_t id = t->ids[i];
        struct limit_cell *c;
        struct limit_owner *o;

        if (id >= r->n || t->owner >= r->n_owners)
            continue;
        c = cell(r, id);
        o = owner_of(r, id, t->owner);
        cell_lock(r, id);
        if (c->cap) {
            struct limit_entry *e;

            cell_expire(r, c, now_ms);
            e = cell_find(r, c, t->seq[i]);
            if (e && real_tokens >= t->tokens) {
                e->tokens += real_tokens - t->tokens;
                c->sum_tok += real_tokens - t->tokens;
            } else if (e) {
                uint64_t d = t->tokens - real_tokens;

                d = d < e->tokens ? d : e->tokens;
                e->tokens -= d;
                c->sum_tok -= d < c->sum_tok ? d : c->sum_tok;
            }
        }
        if (c->spec.leased) { /* the lease pays the correction too (a debt when it grew) */
            int64_t d = (int64_t)real_tokens - (int64_t)t->tokens;

            c->used_tok += d;
            if (c->lease_fb == LIMIT_FALLBACK_NONE)
                c->lease_tok -= d;
            if (c->spec.budget_nano) { /* spent is reported; the reservation's rest is back */
                c->used_nano += (int64_t)real_cost_nano;
                if (c->lease_fb == LIMIT_FALLBACK_NONE)
                    c->lease_nano += (int64_t)t->cost_nano - (int64_t)real_cost_nano;
            }
        }
        /* The owner's share first: it is what a repair counts from. A share already given
         * back (limit_release_owner) is not given back twice. */
        if (o->parallel) {
            o->parallel--;
            c->parallel -= c->parallel ? 1 : 0;
        }
        {
            uint64_t d = t->cost_nano < o->reserved_nano ? t->cost_nano : o->reserved_nano;

            o->reserved_nano -= d;
            c->reserved_nano -= d < c->reserved_nano ? d : c->reserved_nano;
        }
        if (c->spec.budget_nano)
            period_roll(c, wall_s);
        c->spent_nano += real_cost_nano;
        cell_unlock(r, id);
    }
    t->n = 0;
}

int limit_release_owner(struct limit_region *r, uint32_t owner)
{
    int rc = 0;

    if (owner >= r->n_owners)
        return 0;
    for (uint32_t id = 0; id < r->n; id++) {
        struct limit_cell *c = cell(r, id);
        struct limit_owner *o = owner_of(r, id, owner);

        if (!o->parallel && !o->reserved_nano)
            continue; /* nothing held: no lock needed (only the owner adds to its share) */
        if (cell_lock_master(r, id) < 0) {
            rc = -EBUSY; /* kept for the next call */
            continue;
        }
        c->parallel -= o->parallel < c->parallel ? o->parallel : c->parallel;
        c->reserved_nano -=
            o->reserved_nano < c->reserved_nano ? o->reserved_nano : c->reserved_nano;
        o->parallel = 0;
        o->reserved_nano = 0;
        cell_unlock(r, id);
    }
    return rc;
}

int limit_info(struct limit_region *r, uint32_t id, uint64_t now_ms, int64_t wall_s,
               struct limit_info *out)
{
    struct limit_cell *c;

    if (id >= r->n)
        return -EINVAL;
    c = cell(r, id);
    memset(out, 0, sizeof(*out));
    out->spec = c->spec; /* set at init, read-only since */
    out->budget.period = c->spec.period;
    if (cell_lock_master(r, id) < 0)
        return -EBUSY;
    if (c->cap)
        cell_expire(r, c, now_ms);
    if (c->spec.budget_nano)
        period_roll(c, wall_s);
    out->spec = c->spec;
    out->requests = (uint32_t)c->sum_req;
    out->tokens = c->sum_tok;
    out->parallel = (uint32_t)c->parallel;
    out->budget.period = c->spec.period;
    out->budget.period_start = c->period_start;
    out->budget.spent_nano = c->spent_nano;
    out->budget.reserved_nano = c->reserved_nano;
    cell_unlock(r, id);
    return 0;
}

int limit_budget_get(struct limit_region *r, uint32_t id, struct limit_budget *out)
{
    struct limit_cell *c;

    if (id >= r->n)
        return -EINVAL;
    c = cell(r, id);
    if (cell_lock_master(r, id) < 0)
        return -EBUSY;
    out->period = c->spec.period;
    out->period_start = c->period_start;
    out->spent_nano = c->spent_nano;
    out->reserved_nano = c->reserved_nano;
    cell_unlock(r, id);
    return 0;
}

int limit_budget_set(struct limit_region *r, uint32_t id, const struct limit_budget *b,
                     enum limit_budget_fate *fate)
{
    enum limit_budget_fate f = LIMIT_BUDGET_SAME;
    struct limit_cell *c;
    int64_t ps, pe, ns, ne;

    if (id >= r->n || (unsigned)b->period > LIMIT_PERIOD_TOTAL)
        return -EINVAL;
    c = cell(r, id);
    /* the saved period, and the limiter's period that holds its start */
    ps = limit_period_start(b->period, b->period_start);
    pe = limit_period_next(b->period, ps);
    ns = limit_period_start(c->spec.period, ps);
    ne = limit_period_next(c->spec.period, ns);
    if (b->period != c->spec.period)
        f = ps >= ns && pe <= ne ? LIMIT_BUDGET_CARRIED : LIMIT_BUDGET_DROPPED;
    cell_lock(r, id);
    if (f != LIMIT_BUDGET_DROPPED) {
        period_set(c, ns);
        c->spent_nano = b->spent_nano;
    } else {
        c->spent_nano = 0; /* what was spent cannot be told apart by the new period */
    }
    cell_unlock(r, id);
    if (fate)
        *fate = f;
    return 0;
}

/* ---- reload ---------------------------------------------------------------------------------- */

int limit_carry_sync(struct limit_region *dst, struct limit_region *src, uint32_t owner,
                     struct limit_carry *c, uint64_t now_ms)
{
    struct limit_cell *f, *t;
    struct limit_owner *share;
    struct limit_entry *log;

    if (c->from >= src->n || c->to >= dst->n || owner >= dst->n_owners)
        return -EINVAL;
    f = cell(src, c->from);
    t = cell(dst, c->to);
    share = owner_of(dst, c->to, owner);
    /* Two regions: nobody else ever holds a lock of each at once, so no order to respect. */
    if (cell_lock_master(src, c->from) < 0)
        return -EBUSY;
    if (cell_lock_master(dst, c->to) < 0) {
        cell_unlock(src, c->from);
        return -EBUSY;
    }
    log = cell_log(src, f);
    if (t->cap)
        cell_expire(dst, t, now_ms);
    for (uint64_t p = f->head; f->cap && p < f->tail; p++) {
        const struct limit_entry *e = &log[p % f->cap];
        uint64_t n = e->count, tok = e->tokens;

        if (e->seq_hi <= c->seq || e->t_ms + LIMIT_WINDOW_MS <= now_ms)
            continue;
        if (e->seq_hi - c->seq < n) { /* a merged entry partly copied already */
            tok = tok * (e->seq_hi - c->seq) / n;
            n = e->seq_hi - c->seq;
        }
        if (!t->cap) {
            t->next_seq += n;
            continue;
        }
        cell_append(dst, t, e->t_ms, tok);
        if (n > 1) { /* one entry for the n, as in the old log */
            struct limit_entry *last = &cell_log(dst, t)[(t->tail - 1) % t->cap];

            last->count += (uint32_t)(n - 1);
            t->next_seq += n - 1;
            last->seq_hi = t->next_seq - 1;
            t->sum_req += n - 1;
        }
    }
    c->seq = f->next_seq - 1;
    if (c->period_start != f->period_start) { /* first sync, or the old one rolled over */
        c->period_start = f->period_start;
        c->spent_nano = 0;
    }
    if (t->spec.period == f->spec.period && t->period_start == f->period_start)
        t->spent_nano += f->spent_nano - c->spent_nano;
    c->spent_nano = f->spent_nano;
    t->parallel = t->parallel - share->parallel + f->parallel;
    share->parallel = (uint32_t)f->parallel;
    t->reserved_nano = t->reserved_nano - share->reserved_nano + f->reserved_nano;
    share->reserved_nano = f->reserved_nano;
    cell_unlock(dst, c->to);
    cell_unlock(src, c->from);
    return 0;
}

int limit_carry_end(struct limit_region *dst, uint32_t owner, const struct limit_carry *c)
{
    struct limit_cell *t;
    struct limit_owner *share;

    if (c->to >= dst->n || owner >= dst->n_owners)
        return -EINVAL;
    t = cell(dst, c->to);
    share = owner_of(dst, c->to, owner);
    if (cell_lock_master(dst, c->to) < 0)
        return -EBUSY;
    t->parallel -= share->parallel;
    t->reserved_nano -= share->reserved_nano;
    share->parallel = 0;
    share->reserved_nano = 0;
    cell_unlock(dst, c->to);
    return 0;
}

/* ---- [cluster] leases ------------------------------------------------------------------------ */

struct limit_fleet *limit_fleet(struct limit_region *r)
{
    return &r->fleet;
}

int limit_leased(const struct limit_region *r, uint32_t id)
{
    return id < r->n && cell(r, id)->spec.leased;
}

static void lease_copy(const struct limit_cell *c, struct limit_lease *out)
{
    out->req = c->lease_req;
    out->tok = c->lease_tok;
    out->par = c->lease_par;
    out->fallback = c->lease_fb;
    out->until_ms = c->lease_until_ms;
    out->used_req = c->used_req;
    out->used_tok = c->used_tok;
    out->parallel = (uint32_t)c->parallel;
    out->need_tok = c->need_tok;
    out->fleet_req = c->fleet_req;
    out->fleet_tok = c->fleet_tok;
    out->out_req = c->out_req;
    out->out_tok = c->out_tok;
    out->fleet_par = c->fleet_par;
    out->nano = c->lease_nano;
    out->used_nano = c->used_nano;
    out->reserved_nano = c->reserved_nano;
    out->need_nano = c->need_nano;
    out->period_start = c->period_start;
    out->fleet_spent = c->fleet_spent;
}

/* The way into limiter id's lease for the sync process and the master: the cell, locked within
 * LIMIT_MASTER_WAIT_MS; NULL with *rc -EINVAL (no such leased limiter, or it has no budget when
 * `budget`) or -EBUSY (the lock was not had). */
static struct limit_cell *lease_lock(struct limit_region *r, uint32_t id, int budget, int *rc)
{
    struct limit_cell *c;

    if (id >= r->n || !cell(r, id)->spec.leased || (budget && !cell(r, id)->spec.budget_nano)) {
        *rc = -EINVAL;
        return NULL;
    }
    c = cell(r, id);
    if (cell_lock_master(r, id) < 0) {
        *rc = -EBUSY;
        return NULL;
    }
    *rc = 0;
    return c;
}

int limit_lease_take(struct limit_region *r, uint32_t id, uint64_t now_ms, int64_t keep_req,
                     int64_t keep_tok, uint32_t keep_par, struct limit_lease *out)
{
    int rc;
    struct limit_cell *c = lease_lock(r, id, 0, &rc);

    if (!c)
        return rc;
    lease_copy(c, out);
    if (c->cap)
        cell_expire(r, c, now_ms);
    out->win_req = c->sum_req;
    out->win_tok = c->sum_tok;
    c->used_req = c->used_tok = 0;
    c->need_tok = 0;
    if (c->lease_req > keep_req)
        c->lease_req = keep_req;
    if (c->lease_tok > keep_tok)
        c->lease_tok = keep_tok;
    if (keep_par < c->parallel)
        keep_par = (uint32_t)c->parallel;
    if (c->lease_par > keep_par)
        c->lease_par = keep_par;
    cell_unlock(r, id);
    return 0;
}

int limit_lease_grant(struct limit_region *r, uint32_t id, const struct limit_grant *g)
{
    int rc;
    struct limit_cell *c = lease_lock(r, id, 0, &rc);

    if (!c)
        return rc;
    c->lease_req += g->add_req;
    c->lease_tok += g->add_tok;
    c->lease_par = g->par;
    c->lease_until_ms = g->until_ms;
    c->low_req = g->low_req;
    c->low_tok = g->low_tok;
    c->fleet_req = g->fleet_req;
    c->fleet_tok = g->fleet_tok;
    c->out_req = g->out_req;
    c->out_tok = g->out_tok;
    c->fleet_par = g->fleet_par;
    c->lease_fb = LIMIT_FALLBACK_NONE;
    cell_unlock(r, id);
    return 0;
}

int limit_lease_take_budget(struct limit_region *r, uint32_t id, int64_t wall_s, int64_t keep_nano,
                            struct limit_lease *out)
{
    int rc;
    struct limit_cell *c = lease_lock(r, id, 1, &rc);

    if (!c)
        return rc;
    period_roll(c, wall_s);
    lease_copy(c, out);
    c->used_nano = 0;
    c->need_nano = 0;
    if (c->lease_nano > keep_nano)
        c->lease_nano = keep_nano;
    cell_unlock(r, id);
    return 0;
}

int limit_lease_grant_budget(struct limit_region *r, uint32_t id, int64_t add_nano,
                             uint64_t until_ms, int64_t fleet_spent)
{
    int rc;
    struct limit_cell *c = lease_lock(r, id, 1, &rc);

    if (!c)
        return rc;
    c->lease_nano += add_nano;
    c->nano_until_ms = until_ms;
    c->fleet_spent = fleet_spent;
    c->lease_fb = LIMIT_FALLBACK_NONE;
    cell_unlock(r, id);
    return 0;
}

int limit_lease_fallback(struct limit_region *r, uint32_t id, enum limit_fallback f,
                         uint32_t cap_req, uint32_t cap_tok, uint32_t cap_par, uint64_t cap_nano)
{
    int rc;
    struct limit_cell *c;

    if ((unsigned)f > LIMIT_FALLBACK_CLOSED)
        return -EINVAL;
    if (!(c = lease_lock(r, id, 0, &rc)))
        return rc;
    c->lease_fb = (uint32_t)f;
    c->cap_req = cap_req;
    c->cap_tok = cap_tok;
    c->cap_par = cap_par;
    c->cap_nano = cap_nano;
    cell_unlock(r, id);
    return 0;
}

int limit_lease_hungry(struct limit_region *r, uint32_t id)
{
    if (id >= r->n)
        return 0;
    /* read first: polled every few ms, a flag that is not set costs no cache-line write */
    if (!atomic_load_explicit(&cell(r, id)->hungry, memory_order_relaxed))
        return 0;
    return (int)atomic_exchange_explicit(&cell(r, id)->hungry, 0, memory_order_relaxed);
}

int limit_lease_get(struct limit_region *r, uint32_t id, struct limit_lease *out)
{
    struct limit_cell *c;

    if (id >= r->n)
        return -EINVAL;
    c = cell(r, id);
    memset(out, 0, sizeof(*out));
    if (cell_lock_master(r, id) < 0)
        return -EBUSY;
    lease_copy(c, out);
    cell_unlock(r, id);
    return 0;
}

const char *limit_dim_str(enum limit_dim d)
{
    switch (d) {
    case LIMIT_OK:
        return "ok";
    case LIMIT_REQUESTS:
        return "requests";
    case LIMIT_TOKENS:
        return "tokens";
    case LIMIT_PARALLEL:
        return "parallel";
    case LIMIT_BUDGET:
        return "budget";
    case LIMIT_FLEET:
        return "fleet";
    case LIMIT_FLEET_WAIT:
        return "fleet_wait";
    }
    return "?";
}

const char *limit_period_str(enum limit_period p)
{
    switch (p) {
    case LIMIT_PERIOD_MONTH:
        return "month";
    case LIMIT_PERIOD_DAY:
        return "day";
    case LIMIT_PERIOD_TOTAL:
        return "total";
    }
    return "?";
}

int limit_period_parse(const char *s, enum limit_period *p)
{
    for (int i = LIMIT_PERIOD_MONTH; i <= LIMIT_PERIOD_TOTAL; i++) {
        if (strcmp(s, limit_period_str((enum limit_period)i)) == 0) {
            *p = (enum limit_period)i;
            return 0;
        }
    }
    return -EINVAL;
}
