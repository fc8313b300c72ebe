/* Accepting client connections under maxconn. A worker's listening sockets are polled and
 * accepted here (accept4) rather than through uv_listen, so that at the connection limit, or
 * when the process runs out of a resource (EMFILE, ENFILE, ENOBUFS, ENOMEM), a listener simply
 * stops being polled and new connections wait in the kernel's backlog, instead of libuv's EMFILE
 * fallback accepting and resetting them with nothing logged. */
#ifndef AIGW_CORE_ACCEPT_H
#define AIGW_CORE_ACCEPT_H

#include <stdint.h>
#include <sys/socket.h>

#include <uv.h>

#include "core/log.h"

#define ACCEPT_BATCH     64 /* connections taken per wake-up of one listener: the rest next turn */
#define ACCEPT_SWEEP_MAX 4096 /* connections acceptor_sweep takes from one listener at most */
#define ACCEPT_RETRY_MS  100  /* after a local resource error: try accepting again after this */

/* A new connection on listener li: fd is non-blocking and close-on-exec. Returns 0 when the
 * callee took fd, or < 0 (the acceptor then closes fd and does not count it). */
typedef int (*accept_cb)(void *ctx, int li, int fd, const struct sockaddr *peer, socklen_t len);

struct acceptor;

struct accept_listener {
    uv_poll_t poll;
    struct acceptor *a;
    const char *name; /* for log lines */
    int fd, idx;
    uint32_t max;   /* this worker's share of the listen's maxconn; 0 = none of its own */
    uint32_t conns; /* open connections accepted here */
    uint8_t open;   /* poll handle initialised and not closed */
    uint8_t polling;
};

struct acceptor {
    uv_loop_t *loop;
    struct accept_listener *ls;
    int n;
    uint32_t max;     /* this worker's share of the global maxconn; 0 = no limit */
    uint32_t conns;   /* open connections over all listeners */
    uv_timer_t retry; /* armed after a local resource error; accepting resumes when it fires */
    uint8_t timer_open, err_paused, closed;
    uint8_t held; /* acceptor_hold: not accepting yet */
    accept_cb cb;
    void *ctx;
    struct log_rate full_log, err_log;
};

/* Sets up polling of fds[0..n) (listening, non-blocking) and starts accepting. max / l_max[i]:
 * the worker's share of the global / each listen's maxconn (0 = no limit); names[i] name the
 * listens in log lines. 0 or a negative libuv error (the acceptor must still be closed). */
int acceptor_init(struct acceptor *a, uv_loop_t *loop, const int *fds, const char *const *names,
                  int n, uint32_t max, const uint32_t *l_max, accept_cb cb, void *ctx);

/* A connection accepted on listener li has been closed (its fd released): below the limits
 * again, accepting resumes. */
void acceptor_closed(struct acceptor *a, int li);

/* on = 1: stop accepting for now (new connections wait in the backlog), 0: accept again. A
 * reloaded generation's worker is held until the old one has stopped accepting. */
void acceptor_hold(struct acceptor *a, int on);

/* Before a graceful acceptor_close: takes every connection already queued on the listening
 * sockets, over maxconn too (up to ACCEPT_SWEEP_MAX each). A socket a reload drops is closed by
 * everyone once its last worker closes it, and the kernel resets what is still queued there. */
void acceptor_sweep(struct acceptor *a);

/* Stops accepting for good and closes the listening sockets (graceful stop). */
void acceptor_close(struct acceptor *a);

/* Frees what acceptor_init allocated, once the loop has closed the handles. */
void acceptor_free(struct acceptor *a);

/* Is err (a positive errno) the process or the host running out of a resource rather than
 * anything a peer did? EMFILE, ENFILE, ENOBUFS, ENOMEM. */
int accept_errno_local(int err);

#endif
