/* The cool-down a rate-limited (429) backend gets, from the answer's headers. Pure functions:
 * the caller brings the time. */
#ifndef AIGW_CORE_COOL_H
#define AIGW_CORE_COOL_H

#include <stddef.h>
#include <stdint.h>

#include "core/proxy.h"

#define COOL_DEFAULT_MS 1000    /* a 429 that says nothing about when to come back */
#define COOL_MAX_MS     3600000 /* a longer wait asked for is taken as this */

/* The longest duration the two parsers below return: a larger value (any number of digits)
 * saturates to this, about 584 years, rather than wrapping or overflowing. */
#define COOL_DURATION_MAX_MS ((int64_t)(UINT64_MAX / 1000000 + 1))

/* A Retry-After value: delay-seconds, or an HTTP date (IMF-fixdate, RFC 850 or asctime form)
 * taken against now_s (real time, seconds since the epoch; a past date is 0). Milliseconds,
 * or -1 when the value is neither. */
int64_t cool_retry_after_ms(const char *v, size_t len, int64_t now_s);

/* An OpenAI x-ratelimit-reset-* duration: "1s", "6m0s", "20ms", "1.5s", "1h2m3.5s", units h, m,
 * s, ms, us, ns (a bare number is seconds). Milliseconds rounded up, or -1 when malformed;
 * at most COOL_DURATION_MAX_MS. */
int64_t cool_duration_ms(const char *v, size_t len);

/* The cool-down a 429 answer asks for, from its headers: retry-after-ms, else Retry-After,
 * else the larger of x-ratelimit-reset-requests and x-ratelimit-reset-tokens. -1 when none
 * of them says (the caller uses its default). */
int64_t cool_ms(const struct proxy_hdr *hdrs, size_t n, int64_t now_s);

/* The cool-down of a backend that answered 429 with these headers: cool_ms, COOL_DEFAULT_MS
 * when they do not say, at most COOL_MAX_MS. Milliseconds. */
int64_t cool_429_ms(const struct proxy_hdr *hdrs, size_t n, int64_t now_s);

#endif
