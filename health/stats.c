/* The health checker's running figures: smoothed check duration, per-second outcome window
 * (see stats.h). */
#include "health/stats.h"

#define NS_PER_SEC 1000000000ULL

uint64_t health_ewma_add(uint64_t avg, uint64_t sample)
{
    if (sample == 0)
        sample = 1; /* 0 means "none" to the readers */
    if (avg == 0)
        return sample;
    if (sample >= avg)
        return avg + ((sample - avg) >> HEALTH_EWMA_SHIFT);
    return avg - ((avg - sample) >> HEALTH_EWMA_SHIFT);
}

void health_window_update(struct health_window *w, uint64_t now_ns, uint64_t ok, uint64_t failed)
{
    uint64_t sec = now_ns / NS_PER_SEC;
    unsigned i = (unsigned)(sec % (HEALTH_WINDOW_SECS + 1));

    if (w->slot[i].used && w->slot[i].sec == sec)
        return;
    w->slot[i].sec = sec;
    w->slot[i].ok = ok;
    w->slot[i].failed = failed;
    w->slot[i].used = 1;
}

void health_window_delta(const struct health_window *w, uint64_t now_ns, uint64_t ok,
                         uint64_t failed, uint64_t *win_ok, uint64_t *win_failed)
{
    uint64_t sec = now_ns / NS_PER_SEC;
    int base = -1;

    /* The oldest snapshot still inside the window; the slots can be in any order after a
     * stall of the loop, so look at all of them. */
    for (int i = 0; i < HEALTH_WINDOW_SECS + 1; i++) {
        if (!w->slot[i].used || w->slot[i].sec > sec || w->slot[i].sec + HEALTH_WINDOW_SECS < sec)
            continue;
        if (base < 0 || w->slot[i].sec < w->slot[base].sec)
            base = i;
    }
    *win_ok = *win_failed = 0;
    if (base < 0)
        return;
    /* Totals only grow; a smaller one (a counter reset) counts as no traffic. */
    if (ok > w->slot[base].ok)
        *win_ok = ok - w->slot[base].ok;
    if (failed > w->slot[base].failed)
        *win_failed = failed - w->slot[base].failed;
}
