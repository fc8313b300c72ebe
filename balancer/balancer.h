/* Load-balancing algorithms: pure functions over a snapshot of a pool's backends. No I/O, no
 * clocks: each algorithm is one file behind struct balancer_ops. */
#ifndef AIGW_BALANCER_BALANCER_H
#define AIGW_BALANCER_BALANCER_H

#include <stdint.h>

#include "core/conf.h"

/* What the balancer knows of one backend at pick time (built by the worker from shm). */
struct balancer_cand {
    int weight;       /* effective weight; 0 = never picked */
    int32_t active;   /* in-flight requests over all workers */
    uint8_t eligible; /* UP, READY, not excluded for any other reason */
    uint8_t tried;    /* already tried for this request: skip */
};

struct balancer;

struct balancer_ops {
    const char *name;
    /* Returns the index of the chosen candidate in [0, n) or -1 when none is eligible. */
    int (*pick)(struct balancer *b, const struct balancer_cand *c, uint32_t n);
};

/* Per-worker, per-pool algorithm state. */
struct balancer {
    const struct balancer_ops *ops;
    uint32_t n;
    int64_t *current; /* smooth WRR: current weight of each candidate */
};

int balancer_init(struct balancer *b, enum balance_algo algo, uint32_t n);
void balancer_free(struct balancer *b);

static inline int balancer_pick(struct balancer *b, const struct balancer_cand *c, uint32_t n)
{
    return b->ops->pick(b, c, n);
}

/* The algorithm called NAME ("roundrobin"), or NULL. */
const struct balancer_ops *balancer_ops_find(const char *name);

extern const struct balancer_ops balancer_roundrobin;

#endif
