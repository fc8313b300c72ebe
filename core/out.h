/* A bounded output buffer for building heads and bodies in place (core/proxy.c, core/answer.c):
 * appends past the end only set a flag, so a builder checks once at the end. */
#ifndef AIGW_CORE_OUT_H
#define AIGW_CORE_OUT_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

struct out {
    char *p;
    size_t len, cap;
    int over;
};

static inline void out_mem(struct out *o, const char *s, size_t n)
{
    if (o->over || n > o->cap - o->len) {
        o->over = 1;
        return;
    }
    memcpy(o->p + o->len, s, n);
    o->len += n;
}

static inline void out_str(struct out *o, const char *s)
{
    out_mem(o, s, strlen(s));
}

/* A string literal: its length is known at compile time. */
#define OUT_LIT(o, lit) out_mem(o, lit, sizeof(lit) - 1)

/* "00" .. "99": two digits per division when numbers are written */
static const char out_digit_pairs[201] = "00010203040506070809101112131415161718192021222324"
                                         "25262728293031323334353637383940414243444546474849"
                                         "50515253545556575859606162636465666768697071727374"
                                         "75767778798081828384858687888990919293949596979899";

/* Digits of v in decimal. */
static inline size_t out_u64_len(uint64_t v)
{
    static const uint64_t pow10[20] = {
        1ull,
        10ull,
        100ull,
        1000ull,
        10000ull,
        100000ull,
        1000000ull,
        10000000ull,
        100000000ull,
        1000000000ull,
        10000000000ull,
        100000000000ull,
        1000000000000ull,
        10000000000000ull,
        100000000000000ull,
        1000000000000000ull,
        10000000000000000ull,
        100000000000000000ull,
        1000000000000000000ull,
        10000000000000000000ull,
    };
    if (v < 10)
        return 1;
    /* bits of v * log10(2) (1233 / 4096) is the digit count or one less */
    size_t n = (size_t)((64 - __builtin_clzll(v)) * 1233) >> 12;
    return n + (n < 20 && v >= pow10[n]);
}

/* Writes the n = out_u64_len(v) digits of v at dst. */
static inline void out_u64_put(char *dst, uint64_t v, size_t n)
{
    char *p = dst + n;
    while (v >= 100) {
        const char *d = out_digit_pairs + 2 * (v % 100);
        v /= 100;
        *--p = d[1];
        *--p = d[0];
    }
    if (v >= 10) {
        *--p = out_digit_pairs[2 * v + 1];
        *--p = out_digit_pairs[2 * v];
    } else {
        *--p = (char)('0' + v);
    }
}

static inline void out_u64(struct out *o, uint64_t v)
{
    size_t n = out_u64_len(v);
    if (o->over || n > o->cap - o->len) {
        o->over = 1;
        return;
    }
    out_u64_put(o->p + o->len, v, n);
    o->len += n;
}

static inline void out_hdr(struct out *o, const char *name, const char *v, size_t vlen)
{
    out_str(o, name);
    out_mem(o, ": ", 2);
    out_mem(o, v, vlen);
    out_mem(o, "\r\n", 2);
}

static inline int out_done(const struct out *o)
{
    return o->over ? -ENOSPC : (int)o->len;
}

/* x-aigw-backend / x-aigw-attempts; nothing when backend is NULL. */
static inline void out_via(struct out *o, const char *backend, int attempts)
{
    if (!backend)
        return;
    OUT_LIT(o, "x-aigw-backend: ");
    out_str(o, backend);
    OUT_LIT(o, "\r\nx-aigw-attempts: ");
    out_u64(o, attempts > 0 ? (uint64_t)attempts : 0);
    OUT_LIT(o, "\r\n");
}

#endif
