/* The state file: budgets and usage totals saved by the master (temp file, fsync, rename) and
 * loaded at start, matched by section name. */
#ifndef AIGW_CORE_STATE_H
#define AIGW_CORE_STATE_H

#include <stdint.h>

#include "shm/acct.h"
#include "shm/limit.h"

#define STATE_VERSION 1

/* The section names, indexed as the limiters and totals are: key i is limiter i (its budget)
 * and acct key i; model j is acct model j; backend b is acct backend b. */
struct state_names {
    const char *const *keys;
    uint32_t n_keys;
    const char *const *models;
    uint32_t n_models;
    const char *const *backends;
    uint32_t n_backends;
};

struct conf;

/* The names of conf's keys, models and backends in *out, pointing into conf; *ptrs (free it)
 * holds them. 0 or -ENOMEM. */
int state_names_build(const struct conf *conf, const char ***ptrs, struct state_names *out);

/* Writes every key's budget (from limits, may be NULL) and every key's, model's and backend's
 * totals (from acct, may be NULL) to path: a temp file in the same directory, fsync, rename,
 * fsync of the directory, so the file is always the old one or the new one whole.
 * 0, or -errno with *err set (malloc'd text naming the file). -EBUSY when a key's limiter could
 * not be read in time (a worker stopped while holding its lock): the previous file is kept
 * whole (a file without that key's budget would reset it at the next start); the caller tries
 * again at its next save. */
int state_save(const char *path, const struct state_names *names, struct limit_region *limits,
               const struct acct_region *acct, int64_t wall_s, char **err);

/* Reads path and puts back the budgets (limit_budget_set) and totals (acct_base_set, the base
 * the workers add to) of the names it knows; names it does not know are skipped (a section that
 * was removed). -ENOENT when there is no file (a first start: *err is not set); -EINVAL with
 * *err = "FILE:LINE: why" for a file that is not a state file of a known version or is damaged,
 * or that has two lines for one budget or one usage KIND NAME (then nothing of it is taken; the
 * caller decides whether to start anyway). A key whose budget_period changed since the save is
 * logged (a warning naming the key): its spent is carried over when the new period holds the
 * saved one (day -> month, anything -> total), else dropped (see limit_budget_set). */
int state_load(const char *path, const struct state_names *names, struct limit_region *limits,
               struct acct_region *acct, char **err);

#endif
