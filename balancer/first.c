/* Ordered failover: the first usable backend in configuration order takes everything (up to
 * its max_conns), the next one only when it can't. */
#include "balancer/balancer.h"

static int first_pick(struct balancer *b, const struct balancer_cand *c, uint32_t n,
                      const struct balancer_req *req, int backup)
{
    uint32_t i;

    for (i = 0; i < n; i++)
        if (balancer_usable(&c[i], backup))
            return (int)i;
    return -1;
}

const struct balancer_ops balancer_first = {
    .name = "first",
    .pick = first_pick,
};
