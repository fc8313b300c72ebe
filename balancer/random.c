/* Weighted random. */
#include "balancer/balancer.h"

static int random_pick(struct balancer *b, const struct balancer_cand *c, uint32_t n,
                       const struct balancer_req *req, int backup)
{
    return balancer_weighted_random(b, c, n, backup, -1);
}

const struct balancer_ops balancer_random_ops = {
    .name = "random",
    .pick = random_pick,
};
