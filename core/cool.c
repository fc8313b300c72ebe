/* The cool-down a rate-limited (429) backend gets, from the answer's headers: Retry-After
 * (seconds or an HTTP date), retry-after-ms and OpenAI's x-ratelimit-reset-* durations, parsed
 * without overflow. Pure functions, no I/O. */
#include <stdint.h>
#include <string.h>

#include "core/cool.h"
#include "core/util.h"

static int span_digits(const char *p, size_t n, int64_t *out)
{
    int64_t v = 0;
    if (n == 0 || n > 15)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        v = v * 10 + (p[i] - '0');
    }
    *out = v;
    return 0;
}

/* Days from 1970-01-01 to y-m-d (proleptic Gregorian; Howard Hinnant's civil algorithm). */
static int64_t days_from_civil(int64_t y, int64_t m, int64_t d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static int month_index(const char *p, size_t n)
{
    static const char *const mon[] = {"jan", "feb", "mar", "apr", "may", "jun",
                                      "jul", "aug", "sep", "oct", "nov", "dec"};
    if (n != 3)
        return -1;
    for (int i = 0; i < 12; i++)
        if (util_span_ieq(p, 3, mon[i]))
            return i + 1;
    return -1;
}

/* Splits v into at most max words at blanks, commas and dashes (date separators). */
static size_t date_words(const char *v, size_t len, const char **w, size_t *wl, size_t max)
{
    size_t n = 0, i = 0;
    while (i < len && n < max) {
        while (i < len && (v[i] == ' ' || v[i] == ',' || v[i] == '-'))
            i++;
        if (i == len)
            break;
        size_t s = i;
        while (i < len && v[i] != ' ' && v[i] != ',' && v[i] != '-')
            i++;
        w[n] = v + s;
        wl[n++] = i - s;
    }
    while (i < len && (v[i] == ' ' || v[i] == ','))
        i++;
    return i < len ? max + 1 : n;
}

/* "HH:MM:SS" -> seconds of the day, -1 when malformed. */
static int64_t clock_secs(const char *p, size_t n)
{
    int64_t h, m, s;
    if (n != 8 || p[2] != ':' || p[5] != ':' || span_digits(p, 2, &h) ||
        span_digits(p + 3, 2, &m) || span_digits(p + 6, 2, &s) || h > 23 || m > 59 || s > 60)
        return -1;
    return h * 3600 + m * 60 + s;
}

/* An HTTP date as seconds since the epoch, or -1. */
static int64_t http_date(const char *v, size_t len)
{
    const char *w[6];
    size_t wl[6];
    int64_t day, year, secs;
    int mon;

    /* IMF-fixdate "Sun, 06 Nov 1994 08:49:37 GMT", RFC 850 "Sunday, 06-Nov-94 08:49:37 GMT",
     * asctime "Sun Nov  6 08:49:37 1994": a weekday, then day/month/year/clock in some order */
    if (date_words(v, len, w, wl, 6) != 6) {
        if (date_words(v, len, w, wl, 5) != 5)
            return -1;
        /* asctime: weekday month day clock year */
        if ((mon = month_index(w[1], wl[1])) < 0 || span_digits(w[2], wl[2], &day) ||
            (secs = clock_secs(w[3], wl[3])) < 0 || span_digits(w[4], wl[4], &year) || wl[4] != 4)
            return -1;
    } else {
        if (!util_span_ieq(w[5], wl[5], "GMT") || span_digits(w[1], wl[1], &day) ||
            (mon = month_index(w[2], wl[2])) < 0 || span_digits(w[3], wl[3], &year) ||
            (secs = clock_secs(w[4], wl[4])) < 0)
            return -1;
        if (wl[3] == 2) /* RFC 850 two-digit year: the closest century */
            year += year < 70 ? 2000 : 1900;
        else if (wl[3] != 4)
            return -1;
    }
    if (day < 1 || day > 31 || year < 1970)
        return -1;
    return days_from_civil(year, mon, day) * 86400 + secs;
}

/* a * b + c, saturating at UINT64_MAX: an upstream's huge value must not wrap into a small
 * one (and the arithmetic stays defined whatever digits arrive) */
static uint64_t sat_muladd(uint64_t a, uint64_t b, uint64_t c)
{
    uint64_t r;
    if (__builtin_mul_overflow(a, b, &r) || __builtin_add_overflow(r, c, &r))
        return UINT64_MAX;
    return r;
}

int64_t cool_retry_after_ms(const char *v, size_t len, int64_t now_s)
{
    int64_t s;
    while (len && (*v == ' ' || *v == '\t')) {
        v++;
        len--;
    }
    while (len && (v[len - 1] == ' ' || v[len - 1] == '\t'))
        len--;
    size_t nd = 0;
    uint64_t secs = 0;
    while (nd < len && v[nd] >= '0' && v[nd] <= '9')
        secs = sat_muladd(secs, 10, (uint64_t)(v[nd++] - '0'));
    if (len && nd == len) /* delay-seconds, any number of digits: a huge one saturates */
        return secs > COOL_DURATION_MAX_MS / 1000 ? COOL_DURATION_MAX_MS : (int64_t)secs * 1000;
    if ((s = http_date(v, len)) < 0)
        return -1;
    return s > now_s ? (s - now_s) * 1000 : 0;
}

int64_t cool_duration_ms(const char *v, size_t len)
{
    static const struct {
        const char *unit;
        uint64_t ns;
    } units[] = {
        {"h", 3600000000000ULL}, {"ms", 1000000ULL}, {"m", 60000000000ULL},
        {"s", 1000000000ULL},    {"us", 1000ULL},    {"ns", 1ULL},
    };
    uint64_t total = 0;
    size_t i = 0;

    while (len && (*v == ' ' || *v == '\t')) {
        v++;
        len--;
    }
    while (len && (v[len - 1] == ' ' || v[len - 1] == '\t'))
        len--;
    if (len == 0)
        return -1;
    while (i < len) {
        uint64_t ip = 0, frac = 0, scale = 1;
        size_t s = i;
        while (i < len && v[i] >= '0' && v[i] <= '9')
            ip = sat_muladd(ip, 10, (uint64_t)(v[i++] - '0'));
        int digits = i > s;
        if (i < len && v[i] == '.') {
            i++;
            size_t f = i;
            while (i < len && v[i] >= '0' && v[i] <= '9') {
                if (i - f < 9) { /* ns precision is all a duration needs */
                    frac = frac * 10 + (uint64_t)(v[i] - '0');
                    scale *= 10;
                }
                i++;
            }
            digits |= i > f;
        }
        if (!digits)
            return -1;
        size_t u = i;
        while (i < len && ((v[i] >= 'a' && v[i] <= 'z') || (v[i] >= 'A' && v[i] <= 'Z')))
            i++;
        uint64_t ns = 0;
        if (u == i) {
            if (s != 0 || i != len)
                return -1; /* a bare number only on its own: seconds */
            ns = 1000000000ULL;
        } else {
            for (size_t k = 0; k < ARRAY_SIZE(units); k++)
                if (util_span_ieq(v + u, i - u, units[k].unit)) {
                    ns = units[k].ns;
                    break;
                }
            if (!ns)
                return -1;
        }
        /* frac / scale of a unit, without frac x ns overflowing (frac < scale <= 1e9) */
        uint64_t part = ns / scale * frac + ns % scale * frac / scale;
        total = sat_muladd(1, total, sat_muladd(ip, ns, part));
    }
    return (int64_t)(total / 1000000 + (total % 1000000 != 0)); /* <= COOL_DURATION_MAX_MS */
}

int64_t cool_ms(const struct proxy_hdr *hdrs, size_t n, int64_t now_s)
{
    int64_t ra = -1, ms = -1, reset = -1;
    for (size_t i = 0; i < n; i++) {
        const struct proxy_hdr *h = &hdrs[i];
        int64_t v;
        if (util_span_ieq(h->name, h->name_len, "retry-after-ms")) {
            /* OpenAI's finer form: a number of milliseconds, maybe with a fraction; read as
             * seconds, that is the ms figure x 1000 */
            v = cool_duration_ms(h->value, h->value_len);
            if (v >= 0)
                ms = (v + 999) / 1000;
        } else if (util_span_ieq(h->name, h->name_len, "retry-after")) {
            ra = cool_retry_after_ms(h->value, h->value_len, now_s);
        } else if (util_span_ieq(h->name, h->name_len, "x-ratelimit-reset-requests") ||
                   util_span_ieq(h->name, h->name_len, "x-ratelimit-reset-tokens")) {
            v = cool_duration_ms(h->value, h->value_len);
            if (v > reset)
                reset = v;
        }
    }
    if (ms >= 0)
        return ms;
    return ra >= 0 ? ra : reset;
}

int64_t cool_429_ms(const struct proxy_hdr *hdrs, size_t n, int64_t now_s)
{
    int64_t ms = cool_ms(hdrs, n, now_s);
    if (ms < 0)
        return COOL_DEFAULT_MS;
    return ms > COOL_MAX_MS ? COOL_MAX_MS : ms;
}
