/* Admin commands answered by the master over its unix socket (one command line per
 * connection, the answer, then close). */
#ifndef AIGW_CORE_ADMIN_H
#define AIGW_CORE_ADMIN_H

#include <stddef.h>

#include "core/conf.h"
#include "shm/shm.h"

/* A process as `show proc` lists it. */
struct admin_proc {
    const char *role;    /* "master", "worker", "health" */
    int slot;            /* worker slot, -1 otherwise */
    int pid;             /* 0 while being restarted */
    uint64_t started_ms; /* wall clock, ms since the epoch */
    unsigned restarts;
};

/* Runs one command line ("show backends", "show backends json", "show proc", "show proc
 * json", "help") and writes the answer into a malloc'd *out (length *out_len). Returns 0, or
 * -EINVAL for an unknown command (the answer then says so, starting with "error: "). */
int admin_exec(const char *line, const struct conf *conf, const struct shm *shm,
               const struct admin_proc *procs, int n_procs, char **out, size_t *out_len);

#endif
