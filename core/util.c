/* Small helpers: clocks, strict parsers for config values (durations, sizes, bools, integers). */
#include "core/util.h"

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <strings.h>
#include <time.h>

uint64_t time_mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t time_mono_ms(void)
{
    return time_mono_ns() / 1000000ull;
}

uint64_t time_real_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000ull + (uint64_t)ts.tv_nsec / 1000000ull;
}

/* Reads the leading decimal digits of s into *out; returns the first non-digit or NULL when
 * there is no digit or the number overflows. No sign, no whitespace: config values are strict. */
static const char *parse_digits(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    const char *p = s;

    for (; *p >= '0' && *p <= '9'; p++) {
        unsigned d = (unsigned)(*p - '0');

        if (v > (UINT64_MAX - d) / 10)
            return NULL;
        v = v * 10 + d;
    }
    if (p == s)
        return NULL;
    *out = v;
    return p;
}

int util_parse_duration_ms(const char *s, uint64_t *out_ms)
{
    uint64_t v, mul;
    const char *p;

    if (!s || !(p = parse_digits(s, &v)))
        return -EINVAL;
    if (*p == '\0' || !strcasecmp(p, "s"))
        mul = 1000;
    else if (!strcasecmp(p, "ms"))
        mul = 1;
    else if (!strcasecmp(p, "m"))
        mul = 60 * 1000;
    else if (!strcasecmp(p, "h"))
        mul = 3600 * 1000;
    else if (!strcasecmp(p, "d"))
        mul = 86400 * 1000;
    else
        return -EINVAL;
    if (v > UINT64_MAX / mul)
        return -EINVAL;
    *out_ms = v * mul;
    return 0;
}

int util_parse_size(const char *s, uint64_t *out)
{
    uint64_t v, mul = 1;
    const char *p;

    if (!s || !(p = parse_digits(s, &v)))
        return -EINVAL;
    switch (*p) {
    case 'k':
    case 'K':
        mul = 1ull << 10;
        p++;
        break;
    case 'm':
    case 'M':
        mul = 1ull << 20;
        p++;
        break;
    case 'g':
    case 'G':
        mul = 1ull << 30;
        p++;
        break;
    }
    /* "16k", "16kb" and "512b" all read naturally; anything else after the number is garbage. */
    if (*p == 'b' || *p == 'B')
        p++;
    if (*p != '\0' || v > UINT64_MAX / mul)
        return -EINVAL;
    *out = v * mul;
    return 0;
}

int util_parse_bool(const char *s)
{
    static const char *const yes[] = {"yes", "on", "true", "1"};
    static const char *const no[] = {"no", "off", "false", "0"};

    if (!s)
        return -EINVAL;
    for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
        if (!strcasecmp(s, yes[i]))
            return 1;
        if (!strcasecmp(s, no[i]))
            return 0;
    }
    return -EINVAL;
}

int util_parse_int(const char *s, long min, long max, long *out)
{
    const char *p = s;
    int neg = 0;
    uint64_t v;
    long r;

    if (!s)
        return -EINVAL;
    if (*p == '-' || *p == '+')
        neg = *p++ == '-';
    p = parse_digits(p, &v);
    if (!p) {
        /* Digits that overflow are still a number: report them as out of range. */
        const char *q = s + (*s == '-' || *s == '+');

        if (*q >= '0' && *q <= '9' && q[strspn(q, "0123456789")] == '\0')
            return -ERANGE;
        return -EINVAL;
    }
    if (*p != '\0')
        return -EINVAL;
    if (neg) {
        if (v > (uint64_t)LONG_MAX + 1)
            return -ERANGE;
        r = v == (uint64_t)LONG_MAX + 1 ? LONG_MIN : -(long)v;
    } else {
        if (v > (uint64_t)LONG_MAX)
            return -ERANGE;
        r = (long)v;
    }
    if (r < min || r > max)
        return -ERANGE;
    *out = r;
    return 0;
}

int util_span_ieq(const char *p, size_t len, const char *s)
{
    size_t n = strlen(s);

    return n == len && strncasecmp(p, s, len) == 0;
}
