/* Usage totals per key, per model and per backend in shared memory: each worker adds to its own
 * slice (one writer per field, no locked instruction), readers sum the slices. */
#ifndef AIGW_SHM_ACCT_H
#define AIGW_SHM_ACCT_H

#include <stddef.h>
#include <stdint.h>

/* One request's figures, or a sum of them. Keep the fields uint64_t: they are stored as words. */
struct acct_usage {
    uint64_t requests;
    uint64_t prompt;         /* tokens */
    uint64_t completion;     /* tokens */
    uint64_t cached;         /* prompt tokens served from the provider's cache */
    uint64_t reasoning;      /* completion tokens spent reasoning */
    uint64_t partial;        /* requests billed from what was delivered (a cut stream) */
    uint64_t cost_nano;      /* at [model] price_* */
    uint64_t list_cost_nano; /* at list_price_* (price_* where none): list - cost = saved */
};

#define ACCT_WORDS (sizeof(struct acct_usage) / sizeof(uint64_t))

enum acct_kind {
    ACCT_KEY = 0,
    ACCT_MODEL = 1,
    ACCT_BACKEND = 2,
};

struct acct_region;

/* Bytes for these many entries and n_owners writer slices (a multiple of 64). */
size_t acct_region_size(uint32_t n_keys, uint32_t n_models, uint32_t n_backends, uint32_t n_owners);
/* Lays the region out in mem (64-byte aligned, zeroed by this call). 0 or -EINVAL. */
int acct_region_init(void *mem, size_t size, uint32_t n_keys, uint32_t n_models,
                     uint32_t n_backends, uint32_t n_owners);
uint32_t acct_count(const struct acct_region *a, enum acct_kind k);

/* Worker slot `owner` adds one request's usage to its key, model and backend (-1: none of that
 * kind, e.g. auth off or a model without a [model] section). No syscall, no lock. Every total
 * saturates at UINT64_MAX (so does acct_get's sum): a huge figure never wraps to a small one. */
void acct_add(struct acct_region *a, uint32_t owner, int32_t key, int32_t model, int32_t backend,
              const struct acct_usage *u);

/* The totals of one entry: each worker's slice read whole (a sequence counter), so the sum is
 * made of whole requests. For the master and tools: it may yield while a writer is preempted in
 * the middle of a write. -EINVAL for a bad index. */
int acct_get(const struct acct_region *a, enum acct_kind k, uint32_t i, struct acct_usage *out);

/* Master, before the workers run (start, reload): the totals carried over (state file, old
 * generation), to which the workers' slices add. */
int acct_base_set(struct acct_region *a, enum acct_kind k, uint32_t i, const struct acct_usage *u);

/* Master, when it reaps worker slot `owner`: a write it died in the middle of is closed, so
 * readers do not wait on it (its totals are kept; the next worker in the slot adds to them). */
void acct_release_owner(struct acct_region *a, uint32_t owner);

const char *acct_kind_str(enum acct_kind k);

/* ---- [cluster]: the sync process's slices (it is their only writer) ------------------------ */

/* Slices beside the workers' and the base: the fleet's totals as last read from Redis, what
 * Redis acknowledged of this generation's workers' counts, and the flush in flight (what was
 * sent, and what "acknowledged" becomes once it is). They live in shm so that a restarted sync
 * process resends the same flush under the same sequence number: Redis applies it once. */
enum acct_slice {
    ACCT_FLEET = 0,
    ACCT_ACKED = 1,
    ACCT_PEND_SENT = 2,
    ACCT_PEND_OWN = 3,
};
#define ACCT_SLICES 4

/* The sync process's flush state (one writer: the sync process; fleet_ms read by the master). */
struct acct_sync {
    uint64_t inc;              /* this generation's flushing identity (0: none yet) */
    uint64_t seq;              /* sequence number of the last flush built */
    uint32_t pending;          /* the flush seq is in flight (its slices hold it) */
    uint32_t full;             /* it carries whole totals (Redis lost its data), not deltas */
    char epoch[40];            /* Redis' usage epoch this generation flushes into ("" unknown) */
    _Atomic uint64_t fleet_ms; /* wall-clock ms of the last fleet read, 0: never */
};

struct acct_sync *acct_sync(struct acct_region *a);
/* Master, before a new generation's sync process starts (reload, upgrade): it goes on in the
 * usage epoch the old one knew (so that Redis losing its data in between is noticed) and shows
 * the fleet's totals last read, entry by entry as from[] maps them (-1: new). */
void acct_sync_inherit(struct acct_region *dst, const struct acct_region *src,
                       const int32_t *const from[3]);
/* What this generation's workers counted (their slices; the base left out). */
int acct_own_get(const struct acct_region *a, enum acct_kind k, uint32_t i, struct acct_usage *out);
int acct_slice_get(const struct acct_region *a, enum acct_slice s, enum acct_kind k, uint32_t i,
                   struct acct_usage *out);
int acct_slice_set(struct acct_region *a, enum acct_slice s, enum acct_kind k, uint32_t i,
                   const struct acct_usage *u);

#endif
