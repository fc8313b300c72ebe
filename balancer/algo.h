/* What the rest of aigw names of the balancer: the algorithms a pool can use and the key hash.
 * The configuration includes this, never balancer.h (the algorithms' state and callbacks),
 * and the balancer includes nothing of the configuration. */
#ifndef AIGW_BALANCER_ALGO_H
#define AIGW_BALANCER_ALGO_H

#include <stddef.h>
#include <stdint.h>

enum balance_algo {
    BALANCE_ROUNDROBIN = 0, /* smooth weighted round robin (nginx) */
    BALANCE_LEAST_CONN,     /* fewest in-flight requests per unit of weight */
    BALANCE_P2C,            /* power of two choices on peak-EWMA latency x (in-flight + 1) */
    BALANCE_RANDOM,         /* weighted random */
    BALANCE_HASH,           /* consistent hashing with bounded load on a request key */
    BALANCE_FIRST,          /* first usable backend in configuration order */
    BALANCE_COUNT
};

/* The algorithm called NAME ("roundrobin", "least_conn", ...), or -1. */
int balancer_algo_find(const char *name);
const char *balancer_algo_name(enum balance_algo algo);
/* "roundrobin, least_conn, p2c, random, hash, first": for error messages. */
const char *balancer_algo_list(void);

/* 64-bit hash of bytes (FNV-1a, then a finaliser so nearby keys spread over the ring): request
 * keys, and backend names as their identity on the ring. */
uint64_t balancer_hash(const void *p, size_t len);

#endif
