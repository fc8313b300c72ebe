/* Load-balancing algorithms: pure functions over a snapshot of a pool's backends. No I/O, no
 * clocks, randomness from a seeded per-balancer generator: each algorithm is one file behind
 * struct balancer_ops, and a test drives it with fixed inputs. */
#ifndef AIGW_BALANCER_BALANCER_H
#define AIGW_BALANCER_BALANCER_H

#include <stddef.h>
#include <stdint.h>

#include "balancer/algo.h"

/* What the balancer knows of one backend at pick time (built by the worker from shm).
 * Zero-initialise it: every field's zero is the neutral value. */
struct balancer_cand {
    int weight;         /* effective weight; 0 = never picked */
    int32_t active;     /* in-flight requests over all workers */
    uint8_t eligible;   /* UP, READY, breaker allows, not cooling */
    uint8_t tried;      /* already tried for this request: skip */
    uint8_t backup;     /* only used when no primary is usable */
    uint32_t max_conns; /* 0 = unlimited; at the limit the backend is skipped */
    uint64_t ewma_ns;   /* peak-EWMA response latency; 0 = not measured yet */
    uint64_t id;        /* stable identity (hash of the backend name) for the hash ring */
};

/* What the balancer knows of the request. */
struct balancer_req {
    uint64_t key; /* balancer_hash() of the hash key */
    int has_key;  /* 0: no key in this request (hash falls back to weighted random) */
};

struct balancer;

struct balancer_ops {
    const char *name;
    /* Index of the chosen candidate among those with backup == `backup`, or -1. */
    int (*pick)(struct balancer *b, const struct balancer_cand *c, uint32_t n,
                const struct balancer_req *req, int backup);
};

/* A point of the consistent-hash ring. */
struct balancer_point {
    uint64_t hash;
    uint32_t cand;
};

/* Per-worker, per-pool algorithm state. */
struct balancer {
    const struct balancer_ops *ops;
    uint32_t n;
    int64_t *current;            /* roundrobin: current weight of each candidate */
    uint64_t rng;                /* random, p2c, hash fallback: xorshift64* state, never 0 */
    uint32_t rotor;              /* least_conn: where ties start, so equal backends take turns */
    struct balancer_point *ring; /* hash: sorted points, built on the first pick */
    uint32_t n_ring;
    uint32_t hash_load_pct; /* hash: a backend takes at most this % of the average load */
};

int balancer_init(struct balancer *b, enum balance_algo algo, uint32_t n);
void balancer_free(struct balancer *b);
/* Fixes the random sequence (tests; workers seed from their slot and pid). */
void balancer_seed(struct balancer *b, uint64_t seed);

/* Index of the chosen candidate in [0, n), or -1 when none is usable. Primaries first;
 * backups only when no primary is usable. req may be NULL. */
int balancer_pick_req(struct balancer *b, const struct balancer_cand *c, uint32_t n,
                      const struct balancer_req *req);

static inline int balancer_pick(struct balancer *b, const struct balancer_cand *c, uint32_t n)
{
    return balancer_pick_req(b, c, n, NULL);
}

/* Can c take this request in this phase (primary: backup = 0)? */
static inline int balancer_usable(const struct balancer_cand *c, int backup)
{
    return c->eligible && !c->tried && c->weight > 0 && c->backup == backup &&
           (c->max_conns == 0 || c->active < (int32_t)c->max_conns);
}

/* Uniform random number in [0, bound), bound > 0. */
uint64_t balancer_random(struct balancer *b, uint64_t bound);
/* Weighted random among the usable candidates of a phase, skipping `skip` (-1: none). */
int balancer_weighted_random(struct balancer *b, const struct balancer_cand *c, uint32_t n,
                             int backup, int skip);

extern const struct balancer_ops balancer_roundrobin;
extern const struct balancer_ops balancer_least_conn;
extern const struct balancer_ops balancer_p2c;
extern const struct balancer_ops balancer_random_ops;
extern const struct balancer_ops balancer_hash_ops;
extern const struct balancer_ops balancer_first;

#endif
