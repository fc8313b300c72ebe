/* A worker process: one libuv loop that accepts clients and proxies their requests. */
#ifndef AIGW_CORE_WORKER_H
#define AIGW_CORE_WORKER_H

#include "core/conf.h"
#include "shm/shm.h"

/* Runs worker `slot` until it is told to stop; returns the process exit code.
 * listen_fds[i] is this slot's listening socket for conf->listens[i] (already bound and
 * listening, non-blocking). SIGTERM or SIGQUIT: stop accepting, finish in-flight requests and
 * streams, close idle connections, exit 0. SIGINT: close everything and exit 0 at once. */
int worker_main(struct conf *conf, struct shm *shm, int slot, const int *listen_fds);

#endif
