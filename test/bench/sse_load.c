/* sse-load: holds many concurrent SSE streams (POST /v1/chat/completions, "stream": true) to one
 * loopback address and measures each chunk's latency: the receive time minus the send time the
 * mock stamped into the chunk ("mock_sent_ns", CLOCK_MONOTONIC, aigw-mock --stamp). One thread,
 * epoll; connections are spread over several loopback source addresses so ephemeral ports never
 * run out; runs a bounded time. Prints one machine-readable line:
 *   SSELOAD streams=N open=N failed=N chunks=N p50_us= p90_us= p99_us= p999_us= max_us= ...
 * and "sse-load: measuring" on stderr when every stream has answered and settled.
 *
 * usage: sse-load --port PORT [--streams 10000] [--sources 8] [--rate 2000] [--settle 3]
 *                 [--duration 20] [--host 127.0.0.1] [--path /v1/chat/completions]
 *   rate: new connections per second while opening; settle: seconds after the last stream
 *   answered before measuring; duration: measured seconds. Streams must outlast the run (the
 *   mock's --chunks); one that ends or fails early counts as failed. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TAG     "\"mock_sent_ns\":"
#define TAG_LEN (sizeof(TAG) - 1)
#define CARRY   48 /* bytes kept from the end of a read: a stamp cut by a read boundary */

/* Latency histogram: 1 us buckets below 100 ms, 1 ms buckets up to 100 s. */
#define FINE   100000
#define COARSE 100000

enum st { ST_CONNECTING = 0, ST_HEAD, ST_BODY, ST_DONE };

struct stream {
    int fd;
    enum st st;
    uint32_t carry_len;
    char carry[CARRY];
};

static uint64_t hist_fine[FINE], hist_coarse[COARSE], hist_over;
static uint64_t samples, max_ns, bytes_in;
static int measuring;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void record(uint64_t ns)
{
    uint64_t us = ns / 1000;

    if (!measuring)
        return;
    samples++;
    if (ns > max_ns)
        max_ns = ns;
    if (us < FINE)
        hist_fine[us]++;
    else if (us / 1000 < COARSE)
        hist_coarse[us / 1000]++;
    else
        hist_over++;
}

/* The latency (us) below which a fraction q of the samples lie. */
static double quantile(double q)
{
    uint64_t want = (uint64_t)((double)samples * q), seen = 0;

    if (samples == 0)
        return 0;
    for (uint64_t i = 0; i < FINE; i++) {
        seen += hist_fine[i];
        if (seen > want)
            return (double)i;
    }
    for (uint64_t i = 0; i < COARSE; i++) {
        seen += hist_coarse[i];
        if (seen > want)
            return (double)i * 1000;
    }
    return (double)max_ns / 1000;
}

/* Stamps in data (with what the previous read left in s->carry before it). */
static void scan(struct stream *s, const char *data, size_t n, uint64_t t)
{
    char buf[CARRY + 65536];
    size_t len = s->carry_len;
    const char *p, *end;

    memcpy(buf, s->carry, len);
    memcpy(buf + len, data, n);
    len += n;
    p = buf;
    end = buf + len;
    for (;;) {
        const char *hit = memmem(p, (size_t)(end - p), TAG, TAG_LEN);
        if (!hit)
            break;
        const char *q = hit + TAG_LEN;
        uint64_t v = 0;
        while (q < end && *q >= '0' && *q <= '9')
            v = v * 10 + (uint64_t)(*q++ - '0');
        if (q == end) {
            p = hit; /* the number may go on in the next read */
            break;
        }
        record(t > v ? t - v : 0);
        p = q;
    }
    if (p < end && (size_t)(end - p) > CARRY - 1)
        p = end - (CARRY - 1);
    s->carry_len = (uint32_t)(end - p);
    memcpy(s->carry, p, s->carry_len);
}

static volatile sig_atomic_t stop;

static void on_alarm(int sig)
{
    (void)sig;
    stop = 1;
}

static void usage(void)
{
    fprintf(stderr, "usage: sse-load --port PORT [--streams N] [--sources K] [--rate R] "
                    "[--settle S] [--duration S] [--host IP] [--path PATH]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"port", required_argument, NULL, 'p'},
        {"streams", required_argument, NULL, 'n'},
        {"sources", required_argument, NULL, 's'},
        {"rate", required_argument, NULL, 'r'},
        {"settle", required_argument, NULL, 'S'},
        {"duration", required_argument, NULL, 'd'},
        {"host", required_argument, NULL, 'H'},
        {"path", required_argument, NULL, 'P'},
        {NULL, 0, NULL, 0},
    };
    const char *host = "127.0.0.1", *path = "/v1/chat/completions";
    const char *body = "{\"model\":\"demo\",\"stream\":true,\"messages\":[{\"role\":\"user\","
                       "\"content\":\"hi\"}]}";
    int port = 0, n = 10000, sources = 8, rate = 2000, settle = 3, duration = 20, opt;
    char req[1024];
    struct sockaddr_in dst = {.sin_family = AF_INET};

    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'p':
            port = atoi(optarg);
            break;
        case 'n':
            n = atoi(optarg);
            break;
        case 's':
            sources = atoi(optarg);
            break;
        case 'r':
            rate = atoi(optarg);
            break;
        case 'S':
            settle = atoi(optarg);
            break;
        case 'd':
            duration = atoi(optarg);
            break;
        case 'H':
            host = optarg;
            break;
        case 'P':
            path = optarg;
            break;
        default:
            usage();
        }
    }
    if (port <= 0 || port > 65535 || n <= 0 || n > 1000000 || sources < 1 || sources > 250 ||
        rate <= 0 || settle < 0 || duration <= 0 || inet_pton(AF_INET, host, &dst.sin_addr) != 1)
        usage();
    dst.sin_port = htons((uint16_t)port);
    int reqlen = snprintf(req, sizeof(req),
                          "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                          "Content-Length: %zu\r\n\r\n%s",
                          path, host, port, strlen(body), body);

    /* Every stream is one fd; a little room for the rest. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)n + 64) {
        rl.rlim_cur = (rlim_t)n + 64;
        if (rl.rlim_max < rl.rlim_cur)
            rl.rlim_max = rl.rlim_cur; /* allowed as root */
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
            perror("sse-load: setrlimit(RLIMIT_NOFILE)");
            return 1;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGALRM, on_alarm);
    /* The whole run is bounded: opening at the given rate, settling, measuring, slack. */
    alarm((unsigned)(n / rate + settle + duration + 60));

    struct stream *ss = calloc((size_t)n, sizeof(*ss));
    int ep = epoll_create1(0);
    if (!ss || ep < 0) {
        perror("sse-load");
        return 1;
    }
    uint64_t t_start = now_ns(), t_measure = 0, t_end = 0, last_answer = 0;
    uint64_t interval = 1000000000ull / (uint64_t)rate;
    /* resolved: streams answered with a 200 head or failed before it */
    int opened = 0, resolved = 0, failed = 0, connect_err = 0, non200 = 0, ended = 0;
    struct epoll_event evs[1024];

    while (!stop) {
        uint64_t t = now_ns();
        /* open the streams due by now */
        while (opened < n && t - t_start >= (uint64_t)opened * interval) {
            struct stream *s = &ss[opened];
            struct sockaddr_in src = {.sin_family = AF_INET};
            int one = 1;
            s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (s->fd < 0) {
                perror("sse-load: socket");
                return 1;
            }
            src.sin_addr.s_addr = htonl(0x7f000001u + (uint32_t)(opened % sources));
            setsockopt(s->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
            setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            if (bind(s->fd, (struct sockaddr *)&src, sizeof(src)) != 0 ||
                (connect(s->fd, (struct sockaddr *)&dst, sizeof(dst)) != 0 &&
                 errno != EINPROGRESS)) {
                connect_err++;
                failed++;
                resolved++;
                close(s->fd);
                s->fd = -1;
                s->st = ST_DONE;
            } else {
                struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN,
                                         .data.u32 = (uint32_t)opened};
                epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
            }
            opened++;
        }
        if (opened == n && !t_measure && resolved == n) {
            if (!last_answer)
                last_answer = t;
            if (t - last_answer >= (uint64_t)settle * 1000000000ull) {
                t_measure = t;
                t_end = t + (uint64_t)duration * 1000000000ull;
                measuring = 1;
                fprintf(stderr, "sse-load: measuring (%d streams open)\n", n - failed);
            }
        }
        if (t_end && t >= t_end)
            break;
        int timeout = opened < n ? 1 : 50;
        int k = epoll_wait(ep, evs, 1024, timeout);
        if (k < 0 && errno != EINTR)
            break;
        for (int i = 0; i < k; i++) {
            struct stream *s = &ss[evs[i].data.u32];
            if (s->st == ST_CONNECTING) {
                int err = 0;
                socklen_t el = sizeof(err);
                getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err || send(s->fd, req, (size_t)reqlen, MSG_NOSIGNAL) != reqlen) {
                    connect_err++;
                    goto fail;
                }
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = evs[i].data.u32};
                epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
                s->st = ST_HEAD;
                continue;
            }
            if (s->st == ST_DONE)
                continue;
            char buf[65536];
            ssize_t r = recv(s->fd, buf, sizeof(buf), 0);
            uint64_t rt = now_ns();
            if (r < 0 && (errno == EAGAIN || errno == EINTR))
                continue;
            if (r <= 0) {
                ended++;
                goto fail;
            }
            bytes_in += (uint64_t)r;
            if (s->st == ST_HEAD) {
                /* "HTTP/1.1 200 " is all that matters of the head; its rest is scanned
                 * with the body (it has no stamp) */
                if (r < 13 || memcmp(buf + 9, "200", 3) != 0) {
                    non200++;
                    goto fail;
                }
                s->st = ST_BODY;
                resolved++;
                last_answer = 0;
            }
            scan(s, buf, (size_t)r, rt);
            if (memmem(buf, (size_t)r, "data: [DONE]", 12)) {
                ended++;
                goto fail;
            }
            continue;
        fail:
            failed++;
            if (s->st != ST_BODY)
                resolved++;
            s->st = ST_DONE;
            epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
            close(s->fd);
            s->fd = -1;
        }
    }
    int open_now = 0;
    for (int i = 0; i < n; i++) {
        if (ss[i].fd > 0 && ss[i].st == ST_BODY)
            open_now++;
    }
    double secs = t_measure ? (double)(now_ns() - t_measure) / 1e9 : 0;
    printf("SSELOAD streams=%d open=%d failed=%d connect_err=%d non200=%d ended=%d "
           "measured_s=%.1f chunks=%llu chunks_per_s=%.0f p50_us=%.0f p90_us=%.0f p99_us=%.0f "
           "p999_us=%.0f max_us=%.0f mb_in=%.1f%s\n",
           n, open_now, failed, connect_err, non200, ended, secs, (unsigned long long)samples,
           secs > 0 ? (double)samples / secs : 0, quantile(0.5), quantile(0.9), quantile(0.99),
           quantile(0.999), (double)max_ns / 1000, (double)bytes_in / 1e6,
           stop ? " timed_out=1" : "");
    fflush(stdout);
    return !t_measure || failed > 0;
}
