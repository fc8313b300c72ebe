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

/* A breaker command written to shm that the health checker has still to carry out. The
 * master holds its answer back until admin_pending_done() says so (or a short deadline). */
struct admin_pending {
    int backend;             /* index into conf.backends; -1 = nothing to wait for */
    uint32_t seq;            /* breaker_cmd_seq the command was written with */
    enum breaker_state want; /* the state the command leads to */
};

/* Runs one command line and writes the answer into a malloc'd *out (length *out_len):
 *   show backends [json], show proc [json], help,
 *   show keys [json] (limits, window use, budget and totals of each [key], never the key),
 *   show usage [--by key|model|backend] [json] (usage and cost totals, with a total),
 *   breaker reset|open BACKEND (BACKEND = NAME or POOL/NAME; writes the request into shm for
 *   the health checker, so shm is written to).
 * `pending` (may be NULL) is set to the command to wait for, backend -1 when there is none.
 * Returns 0, -EINVAL for an unknown command, -ENOENT for an unknown backend (the answer then
 * says so, starting with "error: "), or -ENOMEM (no answer). */
int admin_exec(const char *line, const struct conf *conf, struct shm *shm,
               const struct admin_proc *procs, int n_procs, struct admin_pending *pending,
               char **out, size_t *out_len);

/* 1 when the line is `reload`: the master answers it itself, once the new generation serves
 * ("reloaded: generation N (W workers)") or failed ("error: ..."). */
int admin_is_reload(const char *line);
/* 1 when the line is `upgrade`: answered by the master once the new master serves ("upgraded:
 * master pid N (aigw VERSION), generation G") or failed ("error: ..."). */
int admin_is_upgrade(const char *line);

/* 1 when the health checker has carried out the pending breaker command (its seq is done and
 * the breaker is in the state the command leads to), else 0. */
int admin_pending_done(const struct shm *shm, const struct admin_pending *p);

#endif
