/* aigw-mock: OpenAI-compatible mock upstream for tests, the demo and the benchmark (command
 * line, listener, signals; connections in mock_conn.c, HTTP in mock_http.c, TLS in mock_tls.c). */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mock.h"

int mock_buf_reserve(struct mock_buf *b, size_t extra)
{
    size_t cap;
    char *p;

    if (b->cap - b->len >= extra && b->p)
        return 0;
    cap = b->cap ? b->cap : 1024;
    while (cap - b->len < extra) {
        if (cap > SIZE_MAX / 2)
            return -ENOMEM;
        cap *= 2;
    }
    p = realloc(b->p, cap);
    if (!p)
        return -ENOMEM;
    b->p = p;
    b->cap = cap;
    return 0;
}

int mock_buf_append(struct mock_buf *b, const void *p, size_t n)
{
    if (mock_buf_reserve(b, n) != 0)
        return -ENOMEM;
    if (n)
        memcpy(b->p + b->len, p, n);
    b->len += n;
    return 0;
}

void mock_buf_free(struct mock_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = 0;
    b->cap = 0;
}

/* "250ms", "5s", "2m", "1h"; a bare number is seconds. */
int mock_parse_duration_ms(const char *s, uint64_t *out_ms)
{
    char *end;
    unsigned long long v;
    uint64_t mult;

    if (*s < '0' || *s > '9')
        return -EINVAL;
    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno)
        return -EINVAL;
    if (*end == '\0' || strcmp(end, "s") == 0)
        mult = 1000;
    else if (strcmp(end, "ms") == 0)
        mult = 1;
    else if (strcmp(end, "m") == 0)
        mult = 60000;
    else if (strcmp(end, "h") == 0)
        mult = 3600000;
    else
        return -EINVAL;
    if (v > UINT64_MAX / mult / 2)
        return -ERANGE;
    *out_ms = v * mult;
    return 0;
}

int mock_parse_framing(const char *s)
{
    if (!strcmp(s, "auto") || !strcmp(s, "chunked"))
        return MOCK_FRAMING_AUTO;
    if (!strcmp(s, "close"))
        return MOCK_FRAMING_CLOSE;
    if (!strcmp(s, "length"))
        return MOCK_FRAMING_LENGTH;
    return -1;
}

int mock_parse_long(const char *s, long min, long max, long *out)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || errno)
        return -EINVAL;
    if (v < min || v > max)
        return -ERANGE;
    *out = v;
    return 0;
}

static void usage(FILE *f)
{
    fprintf(
        f, "usage: aigw-mock --listen HOST:PORT [--name NAME] [--tls-cert FILE --tls-key FILE]\n"
           "         [--chunks N (5)] [--chunk-interval DUR (20ms)] [--delay DUR (0)]\n"
           "         [--status CODE] [--content-bytes N (64)] [--api-key KEY]\n"
           "         [--created EPOCH] [--reset-after N] [--close-after N] [--stall] [--drop]\n"
           "         [--framing auto|close|length] [--retry-after SECS] [--stamp]\n"
           "         [--tls-record-size N] [--verbose]\n"
           "--reset-after N: RST after N body bytes; --close-after N: close (FIN, no TLS\n"
           "close_notify) after N body bytes; --drop: close each request's connection unanswered;\n"
           "--framing: a stream's body chunked (auto), close-delimited or with Content-Length.\n"
           "Per request: x-mock-status, x-mock-delay, x-mock-chunks, x-mock-chunk-interval,\n"
           "x-mock-reset-after, x-mock-close-after, x-mock-stall, x-mock-drop, x-mock-framing,\n"
           "x-mock-retry-after headers; x-mock-retry-after-date: N\n"
           "(Retry-After as an HTTP date N s ahead), x-mock-ratelimit-reset: DUR (a 429 carries\n"
           "x-ratelimit-reset-requests: DUR, a JSON chat answer x-ratelimit-* of its own),\n"
           "x-mock-stamp: 1 (every stream chunk carries \"mock_sent_ns\", its CLOCK_MONOTONIC\n"
           "send time), x-mock-tls-record-size: N (TLS records of at most N response bytes).\n"
           "TRACE on any path echoes the request head. GET /mock/stats: counters, with in_flight\n"
           "and in_flight_max (requests being answered now, and the most at once).\n");
}

static int die_usage(const char *opt, const char *val)
{
    fprintf(stderr, "aigw-mock: invalid value for --%s: '%s'\n", opt, val);
    return 1;
}

/* HOST:PORT, [V6]:PORT; "localhost" means 127.0.0.1. */
static int parse_listen(const char *s, struct sockaddr_storage *ss, char *host, size_t hostcap,
                        int *port)
{
    const char *colon = strrchr(s, ':');
    const char *h = s;
    size_t hl;
    long p;

    if (!colon || mock_parse_long(colon + 1, 0, 65535, &p) != 0)
        return -EINVAL;
    hl = (size_t)(colon - s);
    if (hl >= 2 && s[0] == '[' && s[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    if (hl == 0 || hl >= hostcap)
        return -EINVAL;
    memcpy(host, h, hl);
    host[hl] = '\0';
    if (strcmp(host, "localhost") == 0)
        strcpy(host, "127.0.0.1");
    *port = (int)p;
    if (uv_ip4_addr(host, (int)p, (struct sockaddr_in *)ss) == 0)
        return 0;
    if (uv_ip6_addr(host, (int)p, (struct sockaddr_in6 *)ss) == 0)
        return 0;
    return -EINVAL;
}

static void on_signal(uv_signal_t *sig, int signum)
{
    struct mock_server *srv = sig->data;

    conn_close_all(srv);
    uv_close((uv_handle_t *)&srv->listener, NULL);
    uv_close((uv_handle_t *)&srv->sigterm, NULL);
    uv_close((uv_handle_t *)&srv->sigint, NULL);
}

static int name_ok(const char *s)
{
    if (!*s || strlen(s) > 64)
        return 0;
    for (; *s; s++) {
        if ((unsigned char)*s < 0x20 || (unsigned char)*s >= 0x7f)
            return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"listen", required_argument, NULL, 'l'},
        {"name", required_argument, NULL, 'n'},
        {"tls-cert", required_argument, NULL, 'C'},
        {"tls-key", required_argument, NULL, 'K'},
        {"chunks", required_argument, NULL, 'k'},
        {"chunk-interval", required_argument, NULL, 'i'},
        {"delay", required_argument, NULL, 'd'},
        {"status", required_argument, NULL, 's'},
        {"content-bytes", required_argument, NULL, 'b'},
        {"api-key", required_argument, NULL, 'a'},
        {"created", required_argument, NULL, 't'},
        {"reset-after", required_argument, NULL, 'r'},
        {"stall", no_argument, NULL, 'S'},
        {"close-after", required_argument, NULL, 'c'},
        {"drop", no_argument, NULL, 'D'},
        {"framing", required_argument, NULL, 'f'},
        {"retry-after", required_argument, NULL, 'R'},
        {"stamp", no_argument, NULL, 'T'},
        {"tls-record-size", required_argument, NULL, 'z'},
        {"verbose", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    static struct mock_server srv;
    struct mock_opts *o = &srv.opts;
    struct sockaddr_storage ss;
    char host[256];
    const char *listen_arg = NULL;
    char err[256];
    int opt, r, rc = 1;
    long l;

    o->name = "mock";
    o->fault.chunks = 5;
    o->fault.chunk_interval_ms = 20;
    o->fault.reset_after = -1;
    o->fault.close_after = -1;
    o->fault.retry_after = -1;
    o->fault.ratelimit_reset_ms = -1;
    o->content_bytes = 64;
    o->created = -1;

    while ((opt = getopt_long(argc, argv, "l:n:vh", longopts, NULL)) != -1) {
        const char *lo = NULL;
        for (const struct option *p = longopts; p->name; p++) {
            if (p->val == opt)
                lo = p->name;
        }
        switch (opt) {
        case 'l':
            listen_arg = optarg;
            break;
        case 'n':
            o->name = optarg;
            break;
        case 'C':
            o->tls_cert = optarg;
            break;
        case 'K':
            o->tls_key = optarg;
            break;
        case 'k':
            if (mock_parse_long(optarg, 0, 100000, &l) != 0)
                return die_usage(lo, optarg);
            o->fault.chunks = (unsigned)l;
            break;
        case 'i':
            if (mock_parse_duration_ms(optarg, &o->fault.chunk_interval_ms) != 0)
                return die_usage(lo, optarg);
            break;
        case 'd':
            if (mock_parse_duration_ms(optarg, &o->fault.delay_ms) != 0)
                return die_usage(lo, optarg);
            break;
        case 's':
            if (mock_parse_long(optarg, 0, 599, &l) != 0 || (l != 0 && l < 200))
                return die_usage(lo, optarg);
            o->fault.status = (int)l;
            break;
        case 'b':
            if (mock_parse_long(optarg, 0, 16L << 20, &l) != 0)
                return die_usage(lo, optarg);
            o->content_bytes = (size_t)l;
            break;
        case 'a':
            o->api_key = optarg;
            break;
        case 't':
            if (mock_parse_long(optarg, 0, 1L << 40, &l) != 0)
                return die_usage(lo, optarg);
            o->created = l;
            break;
        case 'r':
            if (mock_parse_long(optarg, 0, MOCK_BODY_MAX, &l) != 0)
                return die_usage(lo, optarg);
            o->fault.reset_after = l;
            break;
        case 'S':
            o->fault.stall = 1;
            break;
        case 'c':
            if (mock_parse_long(optarg, 0, MOCK_BODY_MAX, &l) != 0)
                return die_usage(lo, optarg);
            o->fault.close_after = l;
            break;
        case 'D':
            o->fault.drop = 1;
            break;
        case 'f':
            if ((o->fault.framing = mock_parse_framing(optarg)) < 0)
                return die_usage(lo, optarg);
            break;
        case 'R':
            if (mock_parse_long(optarg, 0, 86400L * 365, &l) != 0)
                return die_usage(lo, optarg);
            o->fault.retry_after = (int)l;
            break;
        case 'T':
            o->fault.stamp = 1;
            break;
        case 'z':
            if (mock_parse_long(optarg, 1, 16384, &l) != 0)
                return die_usage(lo, optarg);
            o->fault.tls_record = (size_t)l;
            break;
        case 'v':
            o->verbose = 1;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "aigw-mock: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 1;
    }
    if (!listen_arg) {
        fprintf(stderr, "aigw-mock: --listen HOST:PORT is required\n");
        usage(stderr);
        return 1;
    }
    if (parse_listen(listen_arg, &ss, host, sizeof(host), &o->port) != 0)
        return die_usage("listen", listen_arg);
    if (!name_ok(o->name))
        return die_usage("name", o->name);
    if (!o->tls_cert != !o->tls_key) {
        fprintf(stderr, "aigw-mock: --tls-cert and --tls-key go together\n");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);

    if (http_content_init(&srv) != 0) {
        fprintf(stderr, "aigw-mock: out of memory\n");
        goto out;
    }
    if (o->tls_cert) {
        srv.tls = calloc(1, sizeof(*srv.tls));
        if (!srv.tls || tls_srv_init(srv.tls, o->tls_cert, o->tls_key, err, sizeof(err)) != 0) {
            fprintf(stderr, "aigw-mock: TLS: %s\n", srv.tls ? err : "out of memory");
            goto out;
        }
    }
    srv.loop = uv_default_loop();
    http_settings_init(&srv.settings);
    uv_tcp_init(srv.loop, &srv.listener);
    srv.listener.data = &srv;
    r = uv_tcp_bind(&srv.listener, (const struct sockaddr *)&ss, 0);
    if (r == 0)
        r = uv_listen((uv_stream_t *)&srv.listener, 1024, conn_on_connection);
    if (r != 0) {
        fprintf(stderr, "aigw-mock: cannot listen on %s: %s\n", listen_arg, uv_strerror(r));
        uv_close((uv_handle_t *)&srv.listener, NULL);
        uv_run(srv.loop, UV_RUN_DEFAULT);
        goto out;
    }
    {
        /* With port 0 the kernel picks one: print the real one. */
        struct sockaddr_storage bound;
        int blen = sizeof(bound);
        if (uv_tcp_getsockname(&srv.listener, (struct sockaddr *)&bound, &blen) == 0)
            o->port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    }
    uv_signal_init(srv.loop, &srv.sigterm);
    uv_signal_init(srv.loop, &srv.sigint);
    srv.sigterm.data = &srv;
    srv.sigint.data = &srv;
    uv_signal_start(&srv.sigterm, on_signal, SIGTERM);
    uv_signal_start(&srv.sigint, on_signal, SIGINT);
    fprintf(stderr, "aigw-mock %s listening on %s%s%s:%d (%s)\n", o->name,
            strchr(host, ':') ? "[" : "", host, strchr(host, ':') ? "]" : "", o->port,
            o->tls_cert ? "https" : "http");
    uv_run(srv.loop, UV_RUN_DEFAULT);
    rc = 0;
out:
    uv_loop_close(uv_default_loop());
    http_server_free(&srv);
    if (srv.tls) {
        tls_srv_free(srv.tls);
        free(srv.tls);
    }
    return rc;
}
