/* Small helpers: monotonic time, duration/size parsing, string utilities. */
#ifndef AIGW_CORE_UTIL_H
#define AIGW_CORE_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>

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
/* A percentage as a whole number of percent. Accepted forms, nothing else (no sign, no blanks):
 *   "25%"  whole percent with a '%' sign       -> 25
 *   "25"   a bare whole number is percent too  -> 25
 *   "0.25" a number with a '.' is a ratio, 1 or 2 decimals ("0.5" -> 50, "1.25" -> 125)
 * So "1" is 1 % and "1.0" is 100 %; "25.5%", ".25", "5." and "0.255" are refused (-EINVAL).
 * A value above UINT32_MAX percent is -ERANGE. The caller checks its own range. */
int util_parse_percent(const char *s, uint32_t *out_pct);
/* A retry back-off "BASE..MAX xMULT", e.g. "25ms..1s x2" or "100ms .. 5s x1.5": BASE and MAX are
 * durations as util_parse_duration_ms reads them (a bare number is seconds), blanks
 * (space, tab) are allowed around ".." and before 'x' (or 'X'), MULT is a decimal with up to 2
 * decimals ("2", "1.5", "1.25"), returned x 100. 0, -EINVAL when the text is not of this form,
 * -ERANGE when BASE > MAX or MULT is outside 1..100. */
int util_parse_backoff(const char *s, uint64_t *base_ms, uint64_t *max_ms, uint32_t *mult_x100);

/* A non-negative decimal ("12", "0.5", "2.125") scaled by 10^digits, exactly (no floating
 * point): util_parse_decimal("2.5", 6, &v) gives 2500000. More than `digits` decimals, a sign,
 * blanks or an exponent are -EINVAL; a result above UINT64_MAX / 10 is -ERANGE. */
int util_parse_decimal(const char *s, unsigned digits, uint64_t *out);
/* A UTC date "2027-01-31" (the end of that day: the first second of the next) or date and time
 * "2027-01-31T12:00:00Z" (that second) as seconds since the epoch. 0 or -EINVAL. */
int util_parse_utc_end(const char *s, int64_t *out);
/* Splits a comma-separated list in place: blanks around items are dropped, empty items are
 * -EINVAL. Pointers to at most max items into s go to items; 0 and the count in *n, -E2BIG when
 * there are more. */
int util_split_list(char *s, char **items, int max, int *n);

/* Case-insensitive compare of a (ptr, len) span with a NUL-terminated string. Inline: the
 * request path compares header names with literals, whose length is then known at compile
 * time, and most names differ in length. */
static inline int util_span_ieq(const char *p, size_t len, const char *s)
{
    return __builtin_strlen(s) == len && strncasecmp(p, s, len) == 0;
}

/* splitmix64's finaliser: a bijection of 64-bit numbers that mixes every input bit into every
 * output bit (request ids, hash keys, jitter). */
static inline uint64_t util_mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

#endif
