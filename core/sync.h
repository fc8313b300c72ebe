/* The sync process ([cluster]): the only process that talks to Redis. It leases shares of the
 * fleet limits for this host and puts them in shm, where the workers admit against them. */
#ifndef AIGW_CORE_SYNC_H
#define AIGW_CORE_SYNC_H

#include <stdint.h>

#include "core/conf.h"
#include "shm/shm.h"

/* Runs until SIGTERM/SIGINT/SIGQUIT (giving back what it holds when it can); the exit code. */
int sync_main(struct conf *conf, struct shm *shm);

/* What a lease wants, pure: the chunk a host asks for. limit: the fleet limit; nodes: hosts
 * alive; recent: used in the last two sync intervals; held: what the host still holds; need: the
 * largest single request refused (tokens), hungry: the lease ran low. */
int64_t sync_want(uint32_t limit, uint32_t nodes, int64_t recent, int64_t held, int64_t need,
                  int hungry);

#endif
