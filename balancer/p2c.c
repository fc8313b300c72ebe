/* Power of two choices: draw two different backends (weighted random), keep the one with the
 * lower cost = peak-EWMA latency x (in-flight + 1) / weight. A backend never measured costs
 * nothing, so it is tried and measured soon. */
#include "balancer/balancer.h"

static unsigned __int128 p2c_cost(const struct balancer_cand *c)
{
    /* Scaled by the other's weight instead of dividing by our own (see below). */
    return (unsigned __int128)c->ewma_ns * (uint64_t)((int64_t)c->active + 1);
}

static int p2c_pick(struct balancer *b, const struct balancer_cand *c, uint32_t n,
                    const struct balancer_req *req, int backup)
{
    int a, z;

    a = balancer_weighted_random(b, c, n, backup, -1);
    if (a < 0)
        return -1;
    z = balancer_weighted_random(b, c, n, backup, a);
    if (z < 0)
        return a;
    /* cost_a / w_a <= cost_z / w_z  <=>  cost_a * w_z <= cost_z * w_a */
    return p2c_cost(&c[a]) * (uint64_t)c[z].weight <= p2c_cost(&c[z]) * (uint64_t)c[a].weight ? a
                                                                                              : z;
}

const struct balancer_ops balancer_p2c = {
    .name = "p2c",
    .pick = p2c_pick,
};
