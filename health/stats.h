/* The health checker's running figures, pure: the smoothed check duration and a per-second
 * ring of outcome totals that gives live traffic over the last few seconds. */
#ifndef AIGW_HEALTH_STATS_H
#define AIGW_HEALTH_STATS_H

#include <stdint.h>

/* Weight of a new sample in the smoothed check duration: 1/2^HEALTH_EWMA_SHIFT. A quarter
 * lets one odd check move it a little and a lasting change show within a few checks. */
#define HEALTH_EWMA_SHIFT 2

/* New smoothed value after one sample; avg 0 means "no sample yet": the first sample is taken
 * as it is. Never returns 0 once a sample has been seen. */
uint64_t health_ewma_add(uint64_t avg, uint64_t sample);

/* Seconds of live traffic the error ratio looks at. */
#define HEALTH_WINDOW_SECS 10

/* Cumulative outcome totals as they were at the start of each of the last seconds. */
struct health_window {
    struct {
        uint64_t sec; /* now_ns / 1e9 when taken */
        uint64_t ok, failed;
        int used;
    } slot[HEALTH_WINDOW_SECS + 1];
};

/* Takes the snapshot of the current second if it has not been taken yet; call it at every
 * evaluation with the backend's cumulative totals. */
void health_window_update(struct health_window *w, uint64_t now_ns, uint64_t ok, uint64_t failed);

/* Outcomes since the oldest snapshot at most HEALTH_WINDOW_SECS seconds old (between 10 and
 * 11 s of traffic once the ring is full, less before). 0/0 without any snapshot. */
void health_window_delta(const struct health_window *w, uint64_t now_ns, uint64_t ok,
                         uint64_t failed, uint64_t *win_ok, uint64_t *win_failed);

#endif
