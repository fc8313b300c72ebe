/* Retry policy as pure functions of their inputs and `now`: the conditions an outcome carries,
 * whether it counts as a backend failure or may be retried, back-off delays with full jitter,
 * and the retry budget (retries as a share of requests over the last 10 s). */
#ifndef AIGW_CORE_RETRY_H
#define AIGW_CORE_RETRY_H

#include <stdint.h>

#include "core/conf.h"
#include "core/upstream.h"

#define RETRY_BUDGET_SECS 10 /* = SHM_BUDGET_SECS, the window the shm buckets keep */

/* The enum conf_cond bits of one try's outcome: err (UPSTREAM_OK when an answer came) and the
 * answer's status. 0 for an answer that is neither 5xx nor 429. */
uint32_t retry_cond(enum upstream_err err, int status);

/* Does the outcome count as a backend failure (pool fail_on, fail_on_status)? A 429 never
 * does. */
int retry_is_failure(const struct conf_pool *p, uint32_t cond, int status);

/* May the outcome be retried (pool retry_on, retry_on_status)? A failure before the upstream
 * can have seen the request (COND_NOT_SENT) always may: retrying it cannot duplicate anything.
 * The caller still bounds every retry by `retries`, the deadline and the retry budget. */
int retry_is_retryable(const struct conf_pool *p, uint32_t cond, int status);

/* Delay before retry number n (1 = the first retry): full jitter, uniform in
 * [0, min(max, base x mult^(n-1))] picked by rnd (any uniform 64-bit number). Milliseconds. */
uint64_t retry_backoff_ms(const struct conf_pool *p, uint32_t n, uint64_t rnd);

/* The retry budget decision, from the pool's requests and retries over the last
 * RETRY_BUDGET_SECS summed over all workers (shm_budget_window): a retry is allowed while the
 * retries stay below max(min_per_s x RETRY_BUDGET_SECS, pct % of the requests). */
int retry_budget_allow(uint64_t requests, uint64_t retries, uint32_t pct, uint32_t min_per_s);

#endif
