/* Usage totals: per-worker slices of per-entry counters under a sequence counter each. */
#include <errno.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "shm/acct.h"

#define ACCT_MAGIC 0x3154434157474941ULL /* "AIGWACT1" little-endian */
#define ACCT_ALIGN 64u
/* A writer may be preempted in the middle of a write: the reader spins a little, then yields.
 * A write open this long (many time slices) belongs to a writer that died: read as it is. */
#define ACCT_READ_SPINS    64
#define ACCT_READ_STUCK_NS (200 * 1000000ULL)

/* One entry in one slice; written by one process only. seq is odd while it is written. */
struct acct_cell {
    _Atomic uint32_t seq;
    uint32_t pad_;
    _Atomic uint64_t w[ACCT_WORDS];
};

/* Slices: n_owners worker slices, the master's base slice, then the sync process's
 * ACCT_SLICES, each n_entries cells (keys, then models, then backends). */
struct acct_region {
    uint64_t magic;
    uint32_t n[3];
    uint32_t n_owners;
    uint32_t n_entries;
    uint32_t pad_;
    uint64_t size;
    uint64_t off_cells;
    struct acct_sync sync;
};

/* Totals saturate at UINT64_MAX instead of wrapping to a small number. */
static uint64_t add_sat(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

static size_t align_up(size_t n)
{
    return (n + ACCT_ALIGN - 1) & ~(size_t)(ACCT_ALIGN - 1);
}

size_t acct_region_size(uint32_t n_keys, uint32_t n_models, uint32_t n_backends, uint32_t n_owners)
{
    size_t entries = (size_t)n_keys + n_models + n_backends;

    return align_up(sizeof(struct acct_region)) +
           align_up(sizeof(struct acct_cell) * entries * (n_owners + 1 + ACCT_SLICES));
}

int acct_region_init(void *mem, size_t size, uint32_t n_keys, uint32_t n_models,
                     uint32_t n_backends, uint32_t n_owners)
{
    struct acct_region *a = mem;
    size_t need = acct_region_size(n_keys, n_models, n_backends, n_owners);

    if (!mem || ((uintptr_t)mem % ACCT_ALIGN) || n_owners == 0 || n_owners > 1024 || size < need)
        return -EINVAL;
    memset(mem, 0, need);
    a->magic = ACCT_MAGIC;
    a->n[ACCT_KEY] = n_keys;
    a->n[ACCT_MODEL] = n_models;
    a->n[ACCT_BACKEND] = n_backends;
    a->n_owners = n_owners;
    a->n_entries = n_keys + n_models + n_backends;
    a->size = need;
    a->off_cells = align_up(sizeof(*a));
    return 0;
}

uint32_t acct_count(const struct acct_region *a, enum acct_kind k)
{
    return (unsigned)k <= ACCT_BACKEND ? a->n[k] : 0;
}

static uint32_t entry_of(const struct acct_region *a, enum acct_kind k, uint32_t i)
{
    uint32_t e = i;

    if (k >= ACCT_MODEL)
        e += a->n[ACCT_KEY];
    if (k >= ACCT_BACKEND)
        e += a->n[ACCT_MODEL];
    return e;
}

static struct acct_cell *cell_at(const struct acct_region *a, uint32_t slice, uint32_t e)
{
    return (struct acct_cell *)((char *)a + a->off_cells) + (size_t)slice * a->n_entries + e;
}

/* The only writer of c adds u (set = 1: stores u instead). */
static void cell_write(struct acct_cell *c, const struct acct_usage *u, int set)
{
    uint64_t v[ACCT_WORDS];
    uint32_t s = atomic_load_explicit(&c->seq, memory_order_relaxed);

    memcpy(v, u, sizeof(v));
    s += s & 1; /* a writer that died here before leaves it odd */
    atomic_store_explicit(&c->seq, s + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    for (size_t k = 0; k < ACCT_WORDS; k++) {
        uint64_t old = set ? 0 : atomic_load_explicit(&c->w[k], memory_order_relaxed);

        atomic_store_explicit(&c->w[k], add_sat(old, v[k]), memory_order_relaxed);
    }
    atomic_store_explicit(&c->seq, s + 2, memory_order_release);
}

static uint64_t mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void cell_read(const struct acct_cell *c, uint64_t *v)
{
    uint32_t odd = 0;   /* the open write waited on */
    uint64_t since = 0; /* when it was first seen */

    for (uint32_t tries = 0;; tries++) {
        uint32_t s = atomic_load_explicit(&c->seq, memory_order_acquire);
        int stuck = 0;

        if (tries >= ACCT_READ_SPINS) {
            uint64_t now = mono_ns();

            if (!(s & 1) || s != odd)
                odd = s, since = now;
            else
                stuck = now - since >= ACCT_READ_STUCK_NS;
            sched_yield();
        }
        if ((s & 1) && !stuck)
            continue;
        for (size_t k = 0; k < ACCT_WORDS; k++)
            v[k] = atomic_load_explicit(&c->w[k], memory_order_relaxed);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&c->seq, memory_order_relaxed) == s || stuck)
            return;
    }
}

void acct_add(struct acct_region *a, uint32_t owner, int32_t key, int32_t model, int32_t backend,
              const struct acct_usage *u)
{
    if (owner >= a->n_owners)
        return;
    if (key >= 0 && (uint32_t)key < a->n[ACCT_KEY])
        cell_write(cell_at(a, owner, entry_of(a, ACCT_KEY, (uint32_t)key)), u, 0);
    if (model >= 0 && (uint32_t)model < a->n[ACCT_MODEL])
        cell_write(cell_at(a, owner, entry_of(a, ACCT_MODEL, (uint32_t)model)), u, 0);
    if (backend >= 0 && (uint32_t)backend < a->n[ACCT_BACKEND])
        cell_write(cell_at(a, owner, entry_of(a, ACCT_BACKEND, (uint32_t)backend)), u, 0);
}

/* The sum of entry i of kind k over slots [0, slots): the owners, and the carried base when
 * slots is n_owners + 1. */
static int acct_sum(const struct acct_region *a, enum acct_kind k, uint32_t i, uint32_t slots,
                    struct acct_usage *out)
{
    uint64_t sum[ACCT_WORDS] = {0}, v[ACCT_WORDS];
    uint32_t e;

    if ((unsigned)k > ACCT_BACKEND || i >= a->n[k])
        return -EINVAL;
    e = entry_of(a, k, i);
    for (uint32_t s = 0; s < slots; s++) {
        cell_read(cell_at(a, s, e), v);
        for (size_t w = 0; w < ACCT_WORDS; w++)
            sum[w] = add_sat(sum[w], v[w]);
    }
    memcpy(out, sum, sizeof(*out));
    return 0;
}

int acct_get(const struct acct_region *a, enum acct_kind k, uint32_t i, struct acct_usage *out)
{
    return acct_sum(a, k, i, a->n_owners + 1, out);
}

int acct_base_set(struct acct_region *a, enum acct_kind k, uint32_t i, const struct acct_usage *u)
{
    if ((unsigned)k > ACCT_BACKEND || i >= a->n[k])
        return -EINVAL;
    cell_write(cell_at(a, a->n_owners, entry_of(a, k, i)), u, 1);
    return 0;
}

void acct_release_owner(struct acct_region *a, uint32_t owner)
{
    if (owner >= a->n_owners)
        return;
    for (uint32_t e = 0; e < a->n_entries; e++) {
        struct acct_cell *c = cell_at(a, owner, e);
        uint32_t s = atomic_load_explicit(&c->seq, memory_order_relaxed);

        if (s & 1)
            atomic_store_explicit(&c->seq, s + 1, memory_order_release);
    }
}

struct acct_sync *acct_sync(struct acct_region *a)
{
    return &a->sync;
}

void acct_sync_inherit(struct acct_region *dst, const struct acct_region *src,
                       const int32_t *const from[3])
{
    if (dst->sync.seq || dst->sync.epoch[0]) /* its sync process flushed already */
        return;
    memcpy(dst->sync.epoch, src->sync.epoch, sizeof(dst->sync.epoch));
    for (int k = ACCT_KEY; k <= ACCT_BACKEND; k++)
        for (uint32_t i = 0; from[k] && i < dst->n[k]; i++) {
            struct acct_usage u;

            if (from[k][i] >= 0 &&
                acct_slice_get(src, ACCT_FLEET, (enum acct_kind)k, (uint32_t)from[k][i], &u) == 0)
                acct_slice_set(dst, ACCT_FLEET, (enum acct_kind)k, i, &u);
        }
    atomic_store_explicit(&dst->sync.fleet_ms,
                          atomic_load_explicit(&src->sync.fleet_ms, memory_order_acquire),
                          memory_order_release);
}

int acct_own_get(const struct acct_region *a, enum acct_kind k, uint32_t i, struct acct_usage *out)
{
    return acct_sum(a, k, i, a->n_owners, out);
}

int acct_slice_get(const struct acct_region *a, enum acct_slice s, enum acct_kind k, uint32_t i,
                   struct acct_usage *out)
{
    if ((unsigned)k > ACCT_BACKEND || i >= a->n[k] || (unsigned)s >= ACCT_SLICES)
        return -EINVAL;
    cell_read(cell_at(a, a->n_owners + 1 + s, entry_of(a, k, i)), (uint64_t *)out);
    return 0;
}

int acct_slice_set(struct acct_region *a, enum acct_slice s, enum acct_kind k, uint32_t i,
                   const struct acct_usage *u)
{
    if ((unsigned)k > ACCT_BACKEND || i >= a->n[k] || (unsigned)s >= ACCT_SLICES)
        return -EINVAL;
    cell_write(cell_at(a, a->n_owners + 1 + s, entry_of(a, k, i)), u, 1);
    return 0;
}

const char *acct_kind_str(enum acct_kind k)
{
    switch (k) {
    case ACCT_KEY:
        return "key";
    case ACCT_MODEL:
        return "model";
    case ACCT_BACKEND:
        return "backend";
    }
    return "?";
}
