/* The master process: binds listeners, creates shm, forks and supervises children, answers
 * the admin socket. It never proxies traffic. */
#ifndef AIGW_CORE_MASTER_H
#define AIGW_CORE_MASTER_H

#include "core/conf.h"

/* Runs until stopped (SIGTERM graceful, SIGINT fast); returns the exit code. Takes `conf`. */
int master_run(struct conf *conf);

/* Called in a freshly forked child before it builds its own loop: releases the master's
 * libuv loop (handles, signal pipe) inherited across fork and restores default signals. */
void master_child_after_fork(void);

#endif
