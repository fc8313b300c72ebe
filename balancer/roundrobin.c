/* Smooth weighted round robin (nginx's algorithm): each pick adds every usable backend's
 * weight to its current weight, takes the largest, and subtracts the total from it. Over a
 * cycle each backend is picked in proportion to its weight, interleaved rather than in bursts
 * (weights 5,1,1 give a a b a c a a, not a a a a a b c). */
#include "balancer/balancer.h"

static int rr_pick(struct balancer *b, const struct balancer_cand *c, uint32_t n,
                   const struct balancer_req *req, int backup)
{
    int64_t total = 0;
    int best = -1;
    uint32_t i;

    for (i = 0; i < n; i++) {
        if (!balancer_usable(&c[i], backup))
            continue;
        b->current[i] += c[i].weight;
        total += c[i].weight;
        if (best < 0 || b->current[i] > b->current[best])
            best = (int)i;
    }
    if (best >= 0)
        b->current[best] -= total;
    return best;
}

const struct balancer_ops balancer_roundrobin = {
    .name = "roundrobin",
    .pick = rr_pick,
};
