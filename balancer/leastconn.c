/* Least connections, weighted: the backend with the fewest in-flight requests (over all
 * workers) per unit of weight. Equal backends take turns, starting from a rotating index, so
 * an idle pool is still spread evenly. */
#include "balancer/balancer.h"

static int lc_pick(struct balancer *b, const struct balancer_cand *c, uint32_t n,
                   const struct balancer_req *req, int backup)
{
    int best = -1;
    uint32_t k;

    if (n == 0)
        return -1;
    for (k = 0; k < n; k++) {
        uint32_t i = (b->rotor + k) % n;

        if (!balancer_usable(&c[i], backup))
            continue;
        /* (active_i + 1) / w_i < (active_best + 1) / w_best, without division. The +1 counts
         * the request being placed, so a heavier backend wins ties at zero load. */
        if (best < 0 || ((int64_t)c[i].active + 1) * c[best].weight <
                            ((int64_t)c[best].active + 1) * c[i].weight)
            best = (int)i;
    }
    if (best >= 0)
        b->rotor = (uint32_t)best + 1;
    return best;
}

const struct balancer_ops balancer_least_conn = {
    .name = "least_conn",
    .pick = lc_pick,
};
