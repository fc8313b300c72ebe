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

/* Reads "D[.F]" (F: 1 or 2 digits) as D x 100 + F scaled to hundredths; returns the first
 * character after it or NULL. Used for ratios and multipliers, which are exact in hundredths. */
static const char *parse_hundredths(const char *s, uint64_t *out)
{
    uint64_t v, frac = 0;
    const char *p = parse_digits(s, &v);

    if (!p || v > UINT64_MAX / 100 - 100)
        return NULL;
    if (*p == '.') {
        const char *q = p + 1;

        if (!(q[0] >= '0' && q[0] <= '9'))
            return NULL;
        frac = (uint64_t)(q[0] - '0') * 10;
        q++;
        if (*q >= '0' && *q <= '9')
            frac += (uint64_t)(*q++ - '0');
        if (*q >= '0' && *q <= '9')
            return NULL; /* a third decimal would be silently dropped */
        p = q;
    }
    *out = v * 100 + frac;
    return p;
}

int util_parse_percent(const char *s, uint32_t *out_pct)
{
    uint64_t v;
    const char *p;

    if (!s || !(p = parse_digits(s, &v)))
        return -EINVAL;
    if (*p == '.') {
        /* A ratio: its hundredths are the percentage. */
        p = parse_hundredths(s, &v);
        if (!p || *p != '\0')
            return -EINVAL;
    } else if (*p == '%') {
        if (p[1] != '\0')
            return -EINVAL;
    } else if (*p != '\0') {
        return -EINVAL;
    }
    if (v > UINT32_MAX)
        return -ERANGE;
    *out_pct = (uint32_t)v;
    return 0;
}

int util_parse_backoff(const char *s, uint64_t *base_ms, uint64_t *max_ms, uint32_t *mult_x100)
{
    char part[32];
    const char *dots, *p, *end;
    uint64_t base, max, mult;
    size_t n;

    if (!s || !(dots = strstr(s, "..")))
        return -EINVAL;
    /* BASE: everything before "..", trailing blanks dropped. */
    n = (size_t)(dots - s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t'))
        n--;
    if (n == 0 || n >= sizeof(part))
        return -EINVAL;
    memcpy(part, s, n);
    part[n] = '\0';
    if (util_parse_duration_ms(part, &base) < 0)
        return -EINVAL;
    /* MAX: after ".." and blanks, up to the blanks or the 'x' before MULT. */
    p = dots + 2 + strspn(dots + 2, " \t");
    end = p + strcspn(p, " \txX");
    n = (size_t)(end - p);
    if (n == 0 || n >= sizeof(part))
        return -EINVAL;
    memcpy(part, p, n);
    part[n] = '\0';
    if (util_parse_duration_ms(part, &max) < 0)
        return -EINVAL;
    p = end + strspn(end, " \t");
    if (*p != 'x' && *p != 'X')
        return -EINVAL;
    p = parse_hundredths(p + 1, &mult);
    if (!p || *p != '\0')
        return -EINVAL;
    if (base > max || mult < 100 || mult > 100 * 100)
        return -ERANGE;
    *base_ms = base;
    *max_ms = max;
    *mult_x100 = (uint32_t)mult;
    return 0;
}

int util_parse_decimal(const char *s, unsigned digits, uint64_t *out)
{
    uint64_t v = 0;
    unsigned frac = 0;
    int seen = 0, dot = 0;

    for (; *s; s++) {
        if (*s == '.' && !dot) {
            dot = 1;
            continue;
        }
        if (*s < '0' || *s > '9')
            return -EINVAL;
        if (dot && ++frac > digits)
            return -EINVAL;
        if (v > (UINT64_MAX / 10 - 9) / 10)
            return -ERANGE;
        v = v * 10 + (uint64_t)(*s - '0');
        seen = 1;
    }
    if (!seen || (dot && frac == 0))
        return -EINVAL;
    for (; frac < digits; frac++) {
        if (v > UINT64_MAX / 100)
            return -ERANGE;
        v *= 10;
    }
    *out = v;
    return 0;
}

int util_parse_utc_end(const char *s, int64_t *out)
{
    struct tm tm;
    const char *end;
    int date_only, mday, mon;
    time_t t;

    memset(&tm, 0, sizeof(tm));
    if (strlen(s) < 10 || s[4] != '-' || s[7] != '-')
        return -EINVAL;
    end = strptime(s, "%Y-%m-%d", &tm);
    if (!end)
        return -EINVAL;
    date_only = *end == '\0';
    if (!date_only) {
        end = strptime(end, "T%H:%M:%SZ", &tm);
        if (!end || *end != '\0')
            return -EINVAL;
    }
    mday = tm.tm_mday;
    mon = tm.tm_mon;
    t = timegm(&tm); /* normalises 2027-02-30 into March: such a date is refused */
    if (t == (time_t)-1 || tm.tm_mday != mday || tm.tm_mon != mon)
        return -EINVAL;
    /* a date alone: the whole day counts, it ends where the next begins */
    *out = (int64_t)t + (date_only ? 86400 : 0);
    return 0;
}

int util_split_list(char *s, char **items, int max, int *n)
{
    int count = 0;

    for (;;) {
        char *comma = strchr(s, ',');
        char *b = s + strspn(s, " \t"), *e = comma ? comma : s + strlen(s);

        while (e > b && (e[-1] == ' ' || e[-1] == '\t'))
            e--;
        if (e == b)
            return -EINVAL;
        if (count == max)
            return -E2BIG;
        *e = '\0';
        items[count++] = b;
        if (!comma)
            break;
        s = comma + 1;
    }
    *n = count;
    return 0;
}
