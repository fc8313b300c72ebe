/* Consistent hashing with bounded load (Mirrokni et al.): each backend owns HASH_POINTS
 * points on a 64-bit ring placed by hashing its identity, so adding a backend moves only the
 * keys that now land on its points. A key goes to the owner of the first point at or after
 * its hash, unless that backend already has more than hash_load_pct % of its weighted share
 * of the in-flight requests: then it overflows clockwise to the next backend that has room,
 * so one hot conversation cannot swamp a backend. A request without a key is placed by
 * weighted random. */
#include <stdlib.h>

#include "balancer/balancer.h"

#define HASH_POINTS 160

static int hash_point_cmp(const void *a, const void *b)
{
    const struct balancer_point *x = a, *y = b;

    if (x->hash != y->hash)
        return x->hash < y->hash ? -1 : 1;
    return x->cand < y->cand ? -1 : x->cand > y->cand;
}

/* The ring depends only on the candidates' identities, which are fixed for a generation. */
static int hash_build(struct balancer *b, const struct balancer_cand *c, uint32_t n)
{
    uint32_t i, k, m = 0;

    b->ring = malloc(sizeof(*b->ring) * HASH_POINTS * (n ? n : 1));
    if (!b->ring)
        return -1;
    for (i = 0; i < n; i++) {
        uint64_t id = c[i].id ? c[i].id : balancer_hash(&i, sizeof(i));

        for (k = 0; k < HASH_POINTS; k++) {
            uint64_t v[2] = {id, k};

            b->ring[m].hash = balancer_hash(v, sizeof(v));
            b->ring[m].cand = i;
            m++;
        }
    }
    qsort(b->ring, m, sizeof(*b->ring), hash_point_cmp);
    b->n_ring = m;
    return 0;
}

/* First ring position whose hash is >= key (wrapping to 0). */
static uint32_t hash_find(const struct balancer *b, uint64_t key)
{
    uint32_t lo = 0, hi = b->n_ring;

    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;

        if (b->ring[mid].hash < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo == b->n_ring ? 0 : lo;
}

static int hash_pick(struct balancer *b, const struct balancer_cand *c, uint32_t n,
                     const struct balancer_req *req, int backup)
{
    int64_t load = 1, weights = 0;
    int fallback = -1;
    uint32_t i, pos;

    if (!req->has_key)
        return balancer_weighted_random(b, c, n, backup, -1);
    if (!b->ring && hash_build(b, c, n) < 0)
        return balancer_weighted_random(b, c, n, backup, -1);
    for (i = 0; i < n; i++) {
        if (!balancer_usable(&c[i], backup))
            continue;
        load += c[i].active;
        weights += c[i].weight;
    }
    if (weights == 0)
        return -1;

    pos = hash_find(b, req->key);
    for (i = 0; i < b->n_ring; i++) {
        const struct balancer_point *pt = &b->ring[(pos + i) % b->n_ring];
        const struct balancer_cand *cd;
        int64_t cap;

        if (pt->cand >= n)
            continue;
        cd = &c[pt->cand];
        if (!balancer_usable(cd, backup))
            continue;
        if (fallback < 0)
            fallback = (int)pt->cand;
        /* capacity = ceil(pct/100 * load * w / W), load counting this request */
        cap = ((int64_t)b->hash_load_pct * load * cd->weight + 100 * weights - 1) / (100 * weights);
        if (cd->active < cap)
            return (int)pt->cand;
    }
    return fallback;
}

const struct balancer_ops balancer_hash_ops = {
    .name = "hash",
    .pick = hash_pick,
};
