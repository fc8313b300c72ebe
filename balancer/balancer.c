/* Algorithm registry and per-pool balancer state. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "balancer/balancer.h"

static const struct balancer_ops *const balancer_algos[] = {
    [BALANCE_ROUNDROBIN] = &balancer_roundrobin,
};

int balancer_init(struct balancer *b, enum balance_algo algo, uint32_t n)
{
    if ((unsigned)algo >= sizeof(balancer_algos) / sizeof(balancer_algos[0]) ||
        !balancer_algos[algo])
        return -EINVAL;
    b->ops = balancer_algos[algo];
    b->n = n;
    b->current = calloc(n ? n : 1, sizeof(*b->current));
    if (!b->current)
        return -ENOMEM;
    return 0;
}

void balancer_free(struct balancer *b)
{
    free(b->current);
    b->current = NULL;
    b->n = 0;
}

const struct balancer_ops *balancer_ops_find(const char *name)
{
    size_t i;

    for (i = 0; i < sizeof(balancer_algos) / sizeof(balancer_algos[0]); i++)
        if (balancer_algos[i] && strcmp(balancer_algos[i]->name, name) == 0)
            return balancer_algos[i];
    return NULL;
}
