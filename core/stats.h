/* The [stats] listener: a small HTTP/1.1 server on the master's loop serving /metrics,
 * /healthz, /status.json and the status page at /. */
#ifndef AIGW_CORE_STATS_H
#define AIGW_CORE_STATS_H

#include <uv.h>

#include "core/admin.h"
#include "core/conf.h"
#include "shm/shm.h"

/* Binds conf->stats (when enabled) on loop; logs and returns -errno when it cannot. procs fills
 * in the master's process list (as show proc has it, master first, at most max) and returns
 * its length; refresh (NULL = none) brings the segment's carried counters up to date before
 * an answer is built from it. */
int stats_start(uv_loop_t *loop, const struct conf *conf, struct shm *shm,
                int (*procs)(struct admin_proc *procs, int max), void (*refresh)(void),
                int max_procs, uint64_t started_ms);
/* A reload made a new generation current: figures come from its config and segment (the
 * [stats] listener itself stays where it was bound at start). */
void stats_set_gen(const struct conf *conf, struct shm *shm, int max_procs);
/* The master is stopping: /healthz answers 503 from now on (a load balancer in front takes the
 * host out while it drains). */
void stats_set_stopping(void);
/* [cluster] start: /healthz answers 503 while the workers wait for the first leases (on = 1). */
void stats_set_starting(int on);
/* Closes the listener and every open stats connection (the loop then finishes the closes). */
void stats_stop(void);

/* Binary upgrade: stats_start takes this listening socket (the old master's, on the same
 * address) instead of binding. */
void stats_inherit_fd(int fd);
/* The listening socket, -1 = none: what an upgrade hands over. */
int stats_listen_fd(void);

#endif
