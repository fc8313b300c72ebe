/* Accepting client connections under maxconn: listeners polled, paused at the connection limit or
 * after a local resource error, resumed below it (see accept.h). */
#include "core/accept.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void accept_on_poll(uv_poll_t *p, int status, int events);

int accept_errno_local(int err)
{
    return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

/* May listener l take one more connection? */
static int accept_room(const struct acceptor *a, const struct accept_listener *l)
{
    return !a->closed && !a->err_paused && !a->held && (!a->max || a->conns < a->max) &&
           (!l->max || l->conns < l->max);
}

/* Polls each listener that has room and stops the others. uv_poll_start and uv_poll_stop cannot
 * fail on a handle of our own fd that is not closing (libuv 1.44: EEXIST only when another
 * handle of the same loop polls the fd). */
static void accept_update(struct acceptor *a)
{
    for (int i = 0; i < a->n; i++) {
        struct accept_listener *l = &a->ls[i];
        int want = l->open && accept_room(a, l);

        if (want == l->polling)
            continue;
        l->polling = (uint8_t)want;
        if (want)
            uv_poll_start(&l->poll, UV_READABLE, accept_on_poll);
        else
            uv_poll_stop(&l->poll);
    }
}

static void accept_on_retry(uv_timer_t *t)
{
    struct acceptor *a = t->data;

    a->err_paused = 0;
    accept_update(a);
}

/* The process (or host) is out of fds, socket buffers or memory: stop accepting for a moment
 * rather than spin on a listener that stays readable. */
static void accept_pause_err(struct acceptor *a, struct accept_listener *l, int err)
{
    uint64_t skipped;
    char note[LOG_RATE_NOTE];

    if (log_rate_ok(&a->err_log, uv_now(a->loop), &skipped))
        log_warn("listen %s: cannot accept: %s (the gateway is out of a local resource: check "
                 "maxconn and RLIMIT_NOFILE); new connections wait, next try in %d ms%s",
                 l->name, strerror(err), ACCEPT_RETRY_MS, log_rate_note(skipped, note));
    a->err_paused = 1;
    accept_update(a);
    if (a->timer_open)
        uv_timer_start(&a->retry, accept_on_retry, ACCEPT_RETRY_MS, 0);
}

/* Counts the accepted fd and hands it to the callback; one it refused is closed: -1. */
static int accept_hand(struct acceptor *a, struct accept_listener *l, int fd,
                       const struct sockaddr_storage *ss, socklen_t len)
{
    a->conns++;
    l->conns++;
    if (a->cb(a->ctx, l->idx, fd, (const struct sockaddr *)ss, len) < 0) {
        close(fd);
        a->conns--;
        l->conns--;
        return -1;
    }
    return 0;
}

static void accept_on_poll(uv_poll_t *p, int status, int events)
{
    struct accept_listener *l = p->data;
    struct acceptor *a = l->a;

    (void)status; /* an error on the listener shows in accept() below */
    (void)events;
    for (int k = 0; k < ACCEPT_BATCH; k++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);

        if (!l->polling)
            return; /* paused by a limit or stopped by the callback */
        int fd = accept4(l->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd == -1) {
            int err = errno;
            if (err == EAGAIN || err == EWOULDBLOCK)
                return;
            if (accept_errno_local(err)) {
                accept_pause_err(a, l, err);
                return;
            }
            /* ECONNABORTED, EINTR, EPERM (a firewall) and the network errors accept(2) passes
             * on for the next connection: that one is gone, try the next */
            continue;
        }
        if (accept_hand(a, l, fd, &ss, len) < 0)
            continue;
        if (!accept_room(a, l)) {
            uint64_t skipped;
            char note[LOG_RATE_NOTE];
            if (log_rate_ok(&a->full_log, uv_now(a->loop), &skipped))
                log_info("listen %s: maxconn reached (%u connections in this worker, %u on this "
                         "listen): new connections wait until one closes%s",
                         l->name, a->conns, l->conns, log_rate_note(skipped, note));
            accept_update(a);
        }
    }
}

int acceptor_init(struct acceptor *a, uv_loop_t *loop, const int *fds, const char *const *names,
                  int n, uint32_t max, const uint32_t *l_max, accept_cb cb, void *ctx)
{
    int rc;

    memset(a, 0, sizeof(*a));
    a->loop = loop;
    a->max = max;
    a->cb = cb;
    a->ctx = ctx;
    uv_timer_init(loop, &a->retry); /* cannot fail: it only initialises the handle */
    a->retry.data = a;
    a->timer_open = 1;
    a->ls = calloc((size_t)(n ? n : 1), sizeof(*a->ls));
    if (!a->ls)
        return UV_ENOMEM;
    for (int i = 0; i < n; i++) {
        struct accept_listener *l = &a->ls[i];
        l->a = a;
        l->idx = i;
        l->fd = fds[i];
        l->name = names[i];
        l->max = l_max[i];
        a->n++;
        rc = uv_poll_init_socket(loop, &l->poll, l->fd);
        if (rc < 0) {
            log_err("listen %s: cannot poll the listening socket: %s", l->name, uv_strerror(rc));
            return rc;
        }
        l->poll.data = l;
        l->open = 1;
    }
    accept_update(a);
    return 0;
}

void acceptor_closed(struct acceptor *a, int li)
{
    struct accept_listener *l = &a->ls[li];
    int was_full = !accept_room(a, l);

    a->conns--;
    l->conns--;
    if (was_full)
        accept_update(a);
}

void acceptor_hold(struct acceptor *a, int on)
{
    a->held = (uint8_t)(on != 0);
    accept_update(a);
}

void acceptor_sweep(struct acceptor *a)
{
    if (a->closed || a->held)
        return; /* a held worker never took these sockets: their queues are its successors' */
    for (int i = 0; i < a->n; i++) {
        struct accept_listener *l = &a->ls[i];

        for (int k = 0; l->fd >= 0 && k < ACCEPT_SWEEP_MAX; k++) {
            struct sockaddr_storage ss;
            socklen_t len = sizeof(ss);
            int fd = accept4(l->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);

            if (fd == -1) {
                if (errno == ECONNABORTED || errno == EINTR)
                    continue;
                break; /* EAGAIN: empty; a local resource error: what is left waits */
            }
            accept_hand(a, l, fd, &ss, len);
        }
    }
}

void acceptor_close(struct acceptor *a)
{
    if (a->closed)
        return;
    a->closed = 1;
    for (int i = 0; i < a->n; i++) {
        struct accept_listener *l = &a->ls[i];
        if (l->open)
            uv_close((uv_handle_t *)&l->poll, NULL); /* stops polling at once: fd can go */
        l->open = l->polling = 0;
        if (l->fd >= 0)
            close(l->fd);
        l->fd = -1;
    }
    if (a->timer_open)
        uv_close((uv_handle_t *)&a->retry, NULL);
    a->timer_open = 0;
}

void acceptor_free(struct acceptor *a)
{
    free(a->ls);
    a->ls = NULL;
    a->n = 0;
}
