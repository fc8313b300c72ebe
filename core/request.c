/* The validate stage of a client request: request-target forms, tokens, Host values, extension
 * methods and versions, as RFC 9112/9110 define them. Pure functions, no I/O. */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>

#include "core/request.h"

/* Byte classes: tchar (RFC 9110 5.6.2) and the bytes of a reg-name (RFC 3986 3.2.2: unreserved,
 * pct-encoded, sub-delims). */
enum { C_TOKEN = 1, C_HOST = 2 };

static const uint8_t cls[256] = {
    ['0' ... '9'] = C_TOKEN | C_HOST,
    ['A' ... 'Z'] = C_TOKEN | C_HOST,
    ['a' ... 'z'] = C_TOKEN | C_HOST,
    ['-'] = C_TOKEN | C_HOST,
    ['.'] = C_TOKEN | C_HOST,
    ['_'] = C_TOKEN | C_HOST,
    ['~'] = C_TOKEN | C_HOST,
    ['!'] = C_TOKEN | C_HOST,
    ['$'] = C_TOKEN | C_HOST,
    ['%'] = C_TOKEN | C_HOST,
    ['&'] = C_TOKEN | C_HOST,
    ['\''] = C_TOKEN | C_HOST,
    ['*'] = C_TOKEN | C_HOST,
    ['+'] = C_TOKEN | C_HOST,
    ['#'] = C_TOKEN,
    ['^'] = C_TOKEN,
    ['`'] = C_TOKEN,
    ['|'] = C_TOKEN,
    ['('] = C_HOST,
    [')'] = C_HOST,
    [','] = C_HOST,
    [';'] = C_HOST,
    ['='] = C_HOST,
};

int request_token(const char *p, size_t len)
{
    if (len == 0)
        return 0;
    for (size_t i = 0; i < len; i++)
        if (!(cls[(unsigned char)p[i]] & C_TOKEN))
            return 0;
    return 1;
}

static int is_hex(char c)
{
    return (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'f');
}

int request_host_ok(const char *v, size_t len)
{
    size_t i = 0;

    if (len == 0)
        return 1;
    if (v[0] == '[') {
        /* IP-literal: an IPv6 address (hex digits, ':' and a dotted IPv4 tail) */
        for (i = 1; i < len && v[i] != ']'; i++)
            if (!is_hex(v[i]) && v[i] != ':' && v[i] != '.')
                return 0;
        if (i == len || i == 1)
            return 0;
        i++;
    } else {
        for (; i < len && v[i] != ':'; i++)
            if (!(cls[(unsigned char)v[i]] & C_HOST))
                return 0;
        if (i == 0)
            return 0;
    }
    if (i == len)
        return 1;
    if (v[i++] != ':')
        return 0;
    for (; i < len; i++)
        if (v[i] < '0' || v[i] > '9')
            return 0;
    return 1;
}

int request_target(const char *t, size_t len, const char **path, size_t *path_len)
{
    size_t s, e;

    if (len == 0)
        return -EINVAL;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)t[i];
        if (ch <= 0x20 || ch >= 0x7f || ch == '#')
            return -EINVAL;
    }
    if (t[0] == '/') {
        *path = t;
        *path_len = len;
        return REQUEST_TARGET_ORIGIN;
    }
    if (len == 1 && t[0] == '*')
        return REQUEST_TARGET_ASTERISK;
    if (len > 7 && strncasecmp(t, "http://", 7) == 0)
        s = 7;
    else if (len > 8 && strncasecmp(t, "https://", 8) == 0)
        s = 8;
    else
        return -EINVAL; /* authority form ("host:443") or no form at all */
    for (e = s; e < len && t[e] != '/' && t[e] != '?'; e++)
        ;
    /* a userinfo ('@') is no host byte, so request_host_ok refuses it too */
    if (e == s || !request_host_ok(t + s, e - s))
        return -EINVAL;
    *path = t + e;
    *path_len = len - e;
    return REQUEST_TARGET_ABSOLUTE;
}

int request_ext_method(const char *p, size_t len)
{
    size_t i = 0, n;

    while (i < len && (p[i] == '\r' || p[i] == '\n'))
        i++;
    for (n = 0; i < len && (cls[(unsigned char)p[i]] & C_TOKEN); i++)
        n++;
    if (n > 64)
        return 0; /* no method is that long: not a request line worth waiting for */
    if (i == len)
        return -EAGAIN;
    return n > 0 && p[i] == ' ';
}

int request_version_form(const char *begin, const char *end)
{
    const char *v = end - 8;

    return end - begin >= 8 && memcmp(v, "HTTP/", 5) == 0 && v[5] >= '0' && v[5] <= '9' &&
           v[6] == '.' && v[7] >= '0' && v[7] <= '9';
}
