/* One active health check: an HTTP/1.1 request sent through the gateway's own upstream client
 * (core/upstream.c: the workers' resolver, address order, TLS configuration and response parser),
 * judged by the status of the response head. */
#ifndef AIGW_HEALTH_CHECK_H
#define AIGW_HEALTH_CHECK_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "core/upstream.h"
#include "shm/shm.h"

/* What a check aims at; filled once per backend by the caller and kept for its lifetime. */
struct check_spec {
    struct upstream *up; /* the checker's client (no shm slot: a check is never traffic) */
    int backend;         /* index into conf.backends (and up's backends) */
    int head;            /* the request is a HEAD: its answer has no body */
    const char *request; /* full request text (check_build_request) */
    size_t request_len;
    const int *expect; /* accepted statuses */
    int n_expect;
    uint64_t timeout_ms; /* the whole check: DNS, connect, TLS, request, response head */
};

struct check_result {
    int ok;                  /* status is in the expect list */
    int32_t status;          /* HTTP status, or -errno */
    enum backend_reason why; /* REASON_CHECK_OK or the failure class */
    uint32_t dur_us;
    int local;        /* not run: the checker is out of fds, buffers or memory (says nothing of the
                         backend, so its rise/fall streaks are left alone) */
    char detail[192]; /* "connect refused (127.0.0.1:9101)", "status 503", ... */
};

struct check;
typedef void (*check_done_cb)(struct check *ck, const struct check_result *res);

/* Per backend, reused for every check of that backend. Must not move once initialised. */
struct check {
    const struct check_spec *spec;
    check_done_cb done;
    void *data;             /* for the caller */
    uv_timer_t timer;       /* the whole check's timeout; at 0 to report a check failed at once */
    struct upstream_req rq; /* the check's exchange */
    int busy;               /* started and not yet reported */
    int in_flight;          /* rq is started and has not ended */
    int judged;             /* res holds the verdict on the response head */
    int closing;            /* check_close was called */
    uint64_t start_ns;
    struct check_result res;
};

/* 0 or -errno. The done callback runs once per check_start, never from inside check_start. */
int check_init(struct check *ck, uv_loop_t *loop, const struct check_spec *spec, check_done_cb done,
               void *data);
/* Starts one check on a new connection; -EBUSY while the previous one has not reported yet. */
int check_start(struct check *ck);
int check_running(const struct check *ck);
/* Aborts a running check without reporting and closes the timer; the loop must run once more
 * to finish closing before ck's memory is released. */
void check_close(struct check *ck);

/* Pure helpers, unit tested. */

/* Writes "METHOD PATH HTTP/1.1" with Host (port omitted when it is the scheme's default, IPv6
 * in brackets), Authorization when api_key is set, User-Agent and Connection: close.
 * Returns the length, or -ENOSPC when buf is too small. */
int check_build_request(char *buf, size_t len, int head, const char *path, const char *host,
                        uint16_t port, int tls, const char *api_key);
/* 1 when status is one of expect[0..n). */
int check_status_expected(int status, const int *expect, int n);

#endif
