/* Timer queues: many deadlines behind one libuv timer (client timeouts, retry back-offs, body
 * deadlines), so a connection needs no uv_timer_t of its own. */
#include "core/tq.h"

/* The uv_timer_start calls here cannot fail: that takes a closing handle (a queue's timer
 * closes only when the worker exits, with nothing waiting) or a NULL callback. */

/* Fires the nodes whose deadline passed (fire may queue them again, here or elsewhere), then
 * arms the timer for the new head unless that was done. */
static void on_tq(uv_timer_t *t)
{
    struct tq *q = t->data;
    uint64_t now = uv_now(t->loop);
    struct tq_node *n;

    q->armed_at = 0;
    while ((n = q->head) && n->deadline <= now) {
        tq_remove(n);
        q->fire(n);
    }
    if (q->head && !q->armed_at) {
        q->armed_at = q->head->deadline;
        uv_timer_start(&q->timer, on_tq, q->head->deadline - now, 0);
    }
}

void tq_init(struct tq *q, uv_loop_t *loop, uint64_t ms, void (*fire)(struct tq_node *))
{
    uv_timer_init(loop, &q->timer); /* cannot fail */
    q->timer.data = q;
    q->head = q->tail = NULL;
    q->ms = ms;
    q->armed_at = 0;
    q->fire = fire;
}

void tq_close(struct tq *q, uv_close_cb cb)
{
    uv_close((uv_handle_t *)&q->timer, cb);
}

void tq_arm(struct tq *q, uint64_t deadline, uint64_t delay)
{
    /* a timer left armed for an earlier deadline fires first and re-arms for this one */
    if (q->armed_at && q->armed_at <= deadline)
        return;
    q->armed_at = deadline;
    uv_timer_start(&q->timer, on_tq, delay, 0);
}

void tq_add_at(struct tq *q, struct tq_node *n, uint64_t delay)
{
    tq_remove(n);
    n->deadline = uv_now(q->timer.loop) + delay;
    n->q = q;
    /* from the tail: back-offs are short, most go near the end */
    struct tq_node *after = q->tail;
    while (after && after->deadline > n->deadline)
        after = after->prev;
    n->prev = after;
    n->next = after ? after->next : q->head;
    if (n->next)
        n->next->prev = n;
    else
        q->tail = n;
    if (after) {
        after->next = n;
    } else {
        q->head = n;
        tq_arm(q, n->deadline, delay);
    }
}
