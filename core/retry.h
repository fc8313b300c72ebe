/* Retry policy as pure functions of their inputs and `now`: the conditions an outcome carries,
 * what it counts as for the backend (the record stage), whether it counts as a backend failure
 * or may be retried, back-off delays with full jitter, and the retry budget (retries as a share
 * of requests over the last 10 s). */
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

/* The record stage's verdict: what one try's outcome counts as for its backend (bits). */
#define RETRY_REC_OK   0x1u /* a success (passive health, latency average); a successful trial */
#define RETRY_REC_FAIL 0x2u /* a failure (passive health, breaker); a failed trial */
#define RETRY_REC_COOL 0x4u /* a 429: the backend cools down; a failed trial, not a failure */
#define RETRY_REC_AUTH 0x8u /* a 401/403: its api_key is bad; a failed trial */

/* The verdict of a response head with `status`: COOL for a 429, AUTH for 401/403, FAIL for a
 * status the pool counts as a failure (retry_is_failure); 0 when the end of the exchange
 * decides (retry_record_end). */
uint32_t retry_record_head(const struct conf_pool *p, int status);

/* The verdict at the end of a try the head did not decide: err is how the exchange ended,
 * resp_started whether the answer's head went to the client. A whole answer, or one the client
 * left in the middle of, is a success; a client gone before the answer says nothing; an answer
 * cut after its head is a failure; before it, what the pool counts as one (fail_on). */
uint32_t retry_record_end(const struct conf_pool *p, enum upstream_err err, int resp_started);

/* Delay before retry number n (1 = the first retry): full jitter, uniform in
 * [0, min(max, base x mult^(n-1))] picked by rnd (any uniform 64-bit number). Milliseconds. */
uint64_t retry_backoff_ms(const struct conf_pool *p, uint32_t n, uint64_t rnd);

/* The retry budget decision, from the pool's requests and retries over the last
 * RETRY_BUDGET_SECS summed over all workers (shm_budget_window): a retry is allowed while the
 * retries stay below max(min_per_s x RETRY_BUDGET_SECS, pct % of the requests). */
int retry_budget_allow(uint64_t requests, uint64_t retries, uint32_t pct, uint32_t min_per_s);

#endif
