/* Algorithm registry, per-pool balancer state, and helpers shared by the algorithms. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "balancer/balancer.h"
#include "core/util.h"

static const struct balancer_ops *const balancer_algos[BALANCE_COUNT] = {
    [BALANCE_ROUNDROBIN] = &balancer_roundrobin,
    [BALANCE_LEAST_CONN] = &balancer_least_conn,
    [BALANCE_P2C] = &balancer_p2c,
    [BALANCE_RANDOM] = &balancer_random_ops,
    [BALANCE_HASH] = &balancer_hash_ops,
    [BALANCE_FIRST] = &balancer_first,
};

int balancer_init(struct balancer *b, enum balance_algo algo, uint32_t n)
{
    memset(b, 0, sizeof(*b));
    if ((unsigned)algo >= BALANCE_COUNT)
        return -EINVAL;
    b->ops = balancer_algos[algo];
    b->n = n;
    b->current = calloc(n ? n : 1, sizeof(*b->current));
    if (!b->current)
        return -ENOMEM;
    b->hash_load_pct = 125;
    balancer_seed(b, 0x9e3779b97f4a7c15ULL);
    return 0;
}

void balancer_free(struct balancer *b)
{
    free(b->current);
    free(b->ring);
    memset(b, 0, sizeof(*b));
}

void balancer_seed(struct balancer *b, uint64_t seed)
{
    b->rng = seed ? seed : 0x2545f4914f6cdd1dULL;
}

int balancer_pick_req(struct balancer *b, const struct balancer_cand *c, uint32_t n,
                      const struct balancer_req *req)
{
    static const struct balancer_req no_key = {0, 0};
    int r;

    if (n > b->n)
        n = b->n;
    if (!req)
        req = &no_key;
    r = b->ops->pick(b, c, n, req, 0);
    if (r < 0)
        r = b->ops->pick(b, c, n, req, 1);
    return r;
}

uint64_t balancer_hash(const void *p, size_t len)
{
    const unsigned char *s = p;
    uint64_t h = 0xcbf29ce484222325ULL;
    size_t i;

    for (i = 0; i < len; i++) {
        h ^= s[i];
        h *= 0x100000001b3ULL;
    }
    /* splitmix64 finaliser: FNV alone leaves similar keys close together on the ring. */
    return util_mix64(h);
}

uint64_t balancer_random(struct balancer *b, uint64_t bound)
{
    /* xorshift64*: fast, good enough to spread load, deterministic once seeded. */
    uint64_t x = b->rng;

    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    b->rng = x;
    return (x * 0x2545f4914f6cdd1dULL) % bound;
}

int balancer_weighted_random(struct balancer *b, const struct balancer_cand *c, uint32_t n,
                             int backup, int skip)
{
    uint64_t total = 0, r;
    uint32_t i;

    for (i = 0; i < n; i++)
        if ((int)i != skip && balancer_usable(&c[i], backup))
            total += (uint64_t)c[i].weight;
    if (total == 0)
        return -1;
    r = balancer_random(b, total);
    for (i = 0; i < n; i++) {
        if ((int)i == skip || !balancer_usable(&c[i], backup))
            continue;
        if (r < (uint64_t)c[i].weight)
            return (int)i;
        r -= (uint64_t)c[i].weight;
    }
    return -1;
}

int balancer_algo_find(const char *name)
{
    int i;

    for (i = 0; i < BALANCE_COUNT; i++)
        if (strcmp(balancer_algos[i]->name, name) == 0)
            return i;
    return -1;
}

const char *balancer_algo_name(enum balance_algo algo)
{
    return (unsigned)algo < BALANCE_COUNT ? balancer_algos[algo]->name : "?";
}

const char *balancer_algo_list(void)
{
    return "roundrobin, least_conn, p2c, random, hash, first";
}
