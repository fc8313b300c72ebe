/* Timer queues: many deadlines behind one libuv timer, over a node embedded in what waits. */
#ifndef AIGW_CORE_TQ_H
#define AIGW_CORE_TQ_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

struct tq;

/* The links of something that waits in a queue; q is NULL while it waits in none. */
struct tq_node {
    struct tq_node *prev, *next;
    struct tq *q;
    uint64_t deadline; /* loop time (ms) it expires at */
};

/* A queue sorted by deadline, with one timer for its head. A queue whose waits all have the
 * same duration `ms` stays sorted by appending (tq_add); tq_add_at inserts in order. */
struct tq {
    uv_timer_t timer;
    struct tq_node *head, *tail;
    uint64_t ms;
    uint64_t armed_at;                  /* loop time the timer fires at, 0 = not armed */
    void (*fire)(struct tq_node *node); /* called for each expired node, already unlinked */
};

/* The struct holding a node: tq_entry(node, struct client, tn). */
#define tq_entry(node, type, member) ((type *)((char *)(node)-offsetof(type, member)))

/* Sets up q on loop, for waits of ms (tq_add) with fire called on expiry. Cannot fail. */
void tq_init(struct tq *q, uv_loop_t *loop, uint64_t ms, void (*fire)(struct tq_node *));

/* Closes q's timer (at exit, with nothing waiting). */
void tq_close(struct tq *q, uv_close_cb cb);

/* Arms q's timer for deadline when it is not armed for one as early; delay from now. */
void tq_arm(struct tq *q, uint64_t deadline, uint64_t delay);

/* Takes n out of its queue, if any. The queue's timer stays armed: it fires for nothing, or for
 * a later head, and re-arms for that (so a node moving between queues does not touch the timer
 * heap). */
static inline void tq_remove(struct tq_node *n)
{
    struct tq *q = n->q;
    if (!q)
        return;
    if (n->prev)
        n->prev->next = n->next;
    else
        q->head = n->next;
    if (n->next)
        n->next->prev = n->prev;
    else
        q->tail = n->prev;
    n->q = NULL;
    n->prev = n->next = NULL;
}

/* Queues n (out of any queue it was in) to expire q->ms from now: appended, as every wait in q
 * has that duration. */
static inline void tq_add(struct tq *q, struct tq_node *n)
{
    tq_remove(n);
    n->deadline = uv_now(q->timer.loop) + q->ms;
    n->q = q;
    n->prev = q->tail;
    n->next = NULL;
    if (q->tail) {
        q->tail->next = n; /* the queue's timer runs for an earlier deadline already */
    } else {
        q->head = n;
        tq_arm(q, n->deadline, q->ms);
    }
    q->tail = n;
}

/* Queues n (out of any queue it was in) to expire `delay` ms from now, in deadline order: a
 * sorted insert from the tail, for queues whose waits differ (retry back-offs). */
void tq_add_at(struct tq *q, struct tq_node *n, uint64_t delay);

#endif
