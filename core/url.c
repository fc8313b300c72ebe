/* Backend URL parsing: http[s]://host[:port][/prefix] into struct url, strictly. */
#include "core/url.h"

#include <arpa/inet.h>
#include <errno.h>
#include <string.h>
#include <strings.h>

static int url_host_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '.' || c == '_';
}

/* Path characters allowed in a prefix: RFC 3986 pchar plus '/', without '?' and '#'. */
static int url_path_char(char c)
{
    return url_host_char(c) || c == '/' || c == '~' || c == '%' || c == '!' || c == '$' ||
           c == '&' || c == '\'' || c == '(' || c == ')' || c == '*' || c == '+' || c == ',' ||
           c == ';' || c == '=' || c == ':' || c == '@';
}

int url_parse(const char *s, struct url *u, const char **why)
{
    const char *p, *host, *host_end, *path;
    size_t n;

    memset(u, 0, sizeof(*u));
    if (!strncasecmp(s, "http://", 7)) {
        p = s + 7;
    } else if (!strncasecmp(s, "https://", 8)) {
        u->tls = 1;
        p = s + 8;
    } else {
        *why = "scheme must be http:// or https://";
        return -EINVAL;
    }
    for (const char *q = s; *q; q++) {
        if ((unsigned char)*q <= ' ' || *q == 0x7f) {
            *why = "contains a space or control character";
            return -EINVAL;
        }
    }
    if (strchr(p, '?')) {
        *why = "a query string (?...) is not allowed";
        return -EINVAL;
    }
    if (strchr(p, '#')) {
        *why = "a fragment (#...) is not allowed";
        return -EINVAL;
    }
    path = p + strcspn(p, "/");
    if (memchr(p, '@', (size_t)(path - p))) {
        *why = "user information (user@) is not allowed; use api_key for credentials";
        return -EINVAL;
    }

    if (*p == '[') {
        char buf[INET6_ADDRSTRLEN];
        struct in6_addr a6;

        host = p + 1;
        host_end = memchr(host, ']', (size_t)(path - host));
        if (!host_end) {
            *why = "IPv6 address without closing ']'";
            return -EINVAL;
        }
        n = (size_t)(host_end - host);
        if (n == 0 || n >= sizeof(buf)) {
            *why = "invalid IPv6 address";
            return -EINVAL;
        }
        memcpy(buf, host, n);
        buf[n] = '\0';
        if (inet_pton(AF_INET6, buf, &a6) != 1) {
            *why = "invalid IPv6 address";
            return -EINVAL;
        }
        p = host_end + 1;
    } else {
        host = p;
        while (p < path && *p != ':') {
            if (!url_host_char(*p)) {
                *why = "invalid character in host name";
                return -EINVAL;
            }
            p++;
        }
        host_end = p;
        n = (size_t)(host_end - host);
    }
    if (n == 0) {
        *why = "empty host";
        return -EINVAL;
    }
    if (n >= sizeof(u->host)) {
        *why = "host name too long";
        return -EINVAL;
    }
    memcpy(u->host, host, n);
    u->host[n] = '\0';

    u->port = u->tls ? 443 : 80;
    if (p < path && *p == ':') {
        unsigned long port = 0;
        const char *d = ++p;

        for (; p < path && *p >= '0' && *p <= '9'; p++) {
            port = port * 10 + (unsigned long)(*p - '0');
            if (port > 65535)
                break;
        }
        if (p == d || p != path) {
            *why = port > 65535 ? "port out of range 1..65535" : "invalid port";
            return -EINVAL;
        }
        if (port == 0) {
            *why = "port out of range 1..65535";
            return -EINVAL;
        }
        u->port = (uint16_t)port;
    } else if (p != path) {
        *why = "unexpected character after host";
        return -EINVAL;
    }

    /* The prefix is joined with "/REST" of each request, so a trailing '/' would double it. */
    n = strlen(path);
    while (n > 0 && path[n - 1] == '/')
        n--;
    for (size_t i = 0; i < n; i++) {
        if (!url_path_char(path[i])) {
            *why = "invalid character in path";
            return -EINVAL;
        }
    }
    if (n >= sizeof(u->prefix)) {
        *why = "path too long";
        return -EINVAL;
    }
    memcpy(u->prefix, path, n);
    u->prefix[n] = '\0';
    return 0;
}
