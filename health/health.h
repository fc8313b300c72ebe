/* The health checker process: the only writer of backend health state in shm. */
#ifndef AIGW_HEALTH_HEALTH_H
#define AIGW_HEALTH_HEALTH_H

#include "core/conf.h"
#include "shm/shm.h"

/* Runs the active checks of every backend until SIGTERM/SIGINT; returns the exit code. */
int health_main(struct conf *conf, struct shm *shm);

/* Rise/fall state machine of one backend, pure: feed each check result with `ok`,
 * returns 1 when the state changes (new state in *st). */
struct health_rf {
    int ok_streak;   /* consecutive passes while DOWN */
    int fail_streak; /* consecutive failures while UP */
};
int health_rf_on_result(struct health_rf *rf, enum backend_state *st, int ok, int rise, int fall);

#endif
