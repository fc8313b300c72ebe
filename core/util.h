/* Small helpers: monotonic time, duration/size parsing, string utilities. */
#ifndef AIGW_CORE_UTIL_H
#define AIGW_CORE_UTIL_H

#include <stddef.h>
#include <stdint.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* CLOCK_MONOTONIC in nanoseconds / milliseconds (shared by all processes on the host). */
uint64_t time_mono_ns(void);
uint64_t time_mono_ms(void);
/* CLOCK_REALTIME in milliseconds since the epoch, for display. */
uint64_t time_real_ms(void);

/* "250ms", "5s", "2m", "1h", "1d"; a bare number is seconds. 0 or -EINVAL. */
int util_parse_duration_ms(const char *s, uint64_t *out_ms);
/* "512", "16k", "8m", "1g" (powers of 1024). 0 or -EINVAL. */
int util_parse_size(const char *s, uint64_t *out);
/* "yes/no/on/off/true/false/1/0" -> 1/0, else -EINVAL. */
int util_parse_bool(const char *s);
/* Decimal integer within [min, max]. 0 or -EINVAL / -ERANGE. */
int util_parse_int(const char *s, long min, long max, long *out);

/* Case-insensitive compare of a (ptr, len) span with a NUL-terminated string. */
int util_span_ieq(const char *p, size_t len, const char *s);

#endif
