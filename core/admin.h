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

/* What the master waits for before it answers. */
enum admin_wait {
    ADMIN_WAIT_BREAKER = 0, /* the health checker carried out a breaker command */
    ADMIN_WAIT_CHECK = 1,   /* the health checker ran a check on demand (`check BACKEND`) */
};

/* A command written to shm that the health checker has still to carry out. The master holds
 * its answer back until admin_pending_done() says so (or wait_ms passed). A `check` answer is
 * rendered then, by admin_check_answer(). */
struct admin_pending {
    int backend;             /* index into conf.backends; -1 = nothing to wait for */
    uint32_t seq;            /* breaker_cmd_seq / check_cmd_seq the command was written with */
    enum breaker_state want; /* BREAKER: the state the command leads to */
    enum admin_wait kind;
    int json;         /* CHECK: answer as JSON */
    uint64_t wait_ms; /* longest wait; 0 = the master's default */
    int stop;         /* `stop`: once the answer is written, the master stops gracefully */
};

/* What `show info` reports of the master, filled in by it. */
struct admin_info {
    const char *version;
    int pid;
    uint64_t started_ms; /* wall clock, ms since the epoch */
    uint64_t now_ms;     /* wall clock, for the uptime */
    uint32_t generation;
    int workers;
    int draining;        /* old generations still draining */
    uint64_t conns;      /* open client connections, every generation */
    uint64_t requests;   /* client requests answered since the master started */
    uint64_t rate_x10;   /* requests per second x 10, over rate_secs */
    unsigned rate_secs;  /* 0 = not measured yet */
    uint64_t alog_drops; /* access log lines dropped, every generation */
    const char *config;  /* the configuration file */
};

/* Requests per second from a cumulative count sampled once a second (the master's timer). */
#define ADMIN_RATE_SECS 10
struct admin_rate {
    uint64_t total[ADMIN_RATE_SECS + 1];
    unsigned n, pos; /* samples held, next slot */
};
void admin_rate_push(struct admin_rate *r, uint64_t total);
/* Requests per second x 10 (rounded) over the samples held; *secs = the span (0: fewer than
 * two samples, the rate is 0). */
uint64_t admin_rate_x10(const struct admin_rate *r, unsigned *secs);

/* Runs one command line and writes the answer into a malloc'd *out (length *out_len):
 *   help, show info [json] (needs info), show proc [json], show pools [json],
 *   show backends [POOL] [json], show keys [json] (limits, window use, budget and totals of each
 *   [key], never the key), show usage [--by key|model|backend] [json],
 *   breaker reset|open BACKEND (BACKEND = NAME or POOL/NAME; writes the request into shm for
 *   the health checker), set backend BACKEND ready|drain|maint, set weight BACKEND N|N%,
 *   check BACKEND (asks the health checker for a check now: the master answers once it is done,
 *   through admin_check_answer), stop (the answer, then the master stops: pending->stop).
 * `pending` (may be NULL) is set to what to wait for, backend -1 when there is nothing.
 * Returns 0; -EINVAL for an unknown command or a usage error (the answer starts with
 * ADMIN_ERR_USAGE or ADMIN_ERR_UNKNOWN: aigwctl exits 2); -ENOENT or -ERANGE for a refused one
 * (unknown backend or pool, bad value: it starts with "error: ", aigwctl exits 1); -ENOMEM (no
 * answer). */
#define ADMIN_ERR_UNKNOWN "error: unknown command"
#define ADMIN_ERR_USAGE   "error: usage:"
int admin_exec(const char *line, const struct conf *conf, struct shm *shm,
               const struct admin_proc *procs, int n_procs, const struct admin_info *info,
               struct admin_pending *pending, char **out, size_t *out_len);

/* The answer to `check BACKEND` once admin_pending_done() says the check ran, or after the wait
 * (timed_out): its result as text or JSON. 0 when the check ran (passed or failed), -ETIMEDOUT
 * or -EIO when it was not run (the answer is an "error: "), -ENOMEM. */
int admin_check_answer(const struct conf *conf, const struct shm *shm,
                       const struct admin_pending *p, char **out, size_t *out_len);

/* 1 when the line is `reload` (*json: followed by json or --json): the master answers it
 * itself, once the new generation serves ("reloaded: generation N (W workers)", or
 * {"ok":true,"generation":N,"workers":W}) or failed ("error: ..."). */
int admin_is_reload(const char *line, int *json);
/* 1 when the line is `upgrade` (*json as for reload): answered by the master once the new master
 * serves ("upgraded: master pid N (aigw VERSION), generation G", or
 * {"ok":true,"pid":N,"version":"V","generation":G}) or failed ("error: ..."). */
int admin_is_upgrade(const char *line, int *json);

/* 1 when the health checker has carried out the pending command (BREAKER: its seq is done and
 * the breaker is in the state the command leads to; CHECK: the check ran), else 0. */
int admin_pending_done(const struct shm *shm, const struct admin_pending *p);

#endif
