/* The access log: one JSON line per request (alog_format), kept in a per-worker ring and written
 * from the loop with writes that never wait (see alog_flush for what that means per target). */
#include "core/alog.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "core/meter.h"
#include "core/out.h"
#include "core/worker_priv.h"

/* Most output bytes one string field may take (a longer one is cut and ends in "..."), so a
 * line always fits ALOG_LINE_MAX: path 1024, request id 256, models 512 each, names 4 x 256,
 * address 64, the rest (names, numbers) well under 1000. */
#define ALOG_PATH_MAX  1024
#define ALOG_RID_MAX   256
#define ALOG_MODEL_MAX 512
#define ALOG_NAME_MAX  256

/* ---- the line ---- */

/* Length of the valid UTF-8 sequence at s (n bytes left), or 0 when it is not one. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    size_t len;
    uint32_t cp;

    if (s[0] < 0xc2 || s[0] > 0xf4)
        return 0;
    len = s[0] < 0xe0 ? 2 : s[0] < 0xf0 ? 3 : 4;
    if (n < len)
        return 0;
    cp = s[0] & (0x7f >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = cp << 6 | (s[i] & 0x3f);
    }
    if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
        (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
        return 0;
    return len;
}

/* s as a JSON string of at most max bytes between its quotes (cut at a character and marked
 * "..."), or null for NULL. Control characters are escaped, bytes that are not UTF-8 become
 * U+FFFD: the line is valid JSON whatever a client put in its path or model. */
static void js_str(struct out *o, const char *s, size_t n, size_t max)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    size_t used = 0;

    if (!s) {
        OUT_LIT(o, "null");
        return;
    }
    OUT_LIT(o, "\"");
    for (size_t i = 0; i < n;) {
        char e[8];
        const char *piece = e;
        size_t pl, adv = 1;

        if (p[i] == '"' || p[i] == '\\') {
            e[0] = '\\';
            e[1] = (char)p[i];
            pl = 2;
        } else if (p[i] == '\n' || p[i] == '\r' || p[i] == '\t') {
            e[0] = '\\';
            e[1] = p[i] == '\n' ? 'n' : p[i] == '\r' ? 'r' : 't';
            pl = 2;
        } else if (p[i] < 0x20 || p[i] == 0x7f) {
            memcpy(e, "\\u00", 4);
            e[4] = hex[p[i] >> 4];
            e[5] = hex[p[i] & 15];
            pl = 6;
        } else if (p[i] < 0x80) {
            piece = s + i;
            pl = 1;
        } else if ((adv = utf8_len(p + i, n - i)) != 0) {
            piece = s + i;
            pl = adv;
        } else {
            piece = "\\ufffd";
            pl = 6;
            adv = 1;
        }
        if (used + pl > max) {
            OUT_LIT(o, "...");
            break;
        }
        out_mem(o, piece, pl);
        used += pl;
        i += adv;
    }
    OUT_LIT(o, "\"");
}

static void js_cstr(struct out *o, const char *s, size_t max)
{
    js_str(o, s, s ? strlen(s) : 0, max);
}

/* A duration in microseconds as milliseconds with three decimals. */
static void js_ms(struct out *o, uint64_t us)
{
    char frac[3];
    uint64_t f = us % 1000;

    out_u64(o, us / 1000);
    frac[0] = (char)('0' + f / 100);
    frac[1] = (char)('0' + f / 10 % 10);
    frac[2] = (char)('0' + f % 10);
    OUT_LIT(o, ".");
    out_mem(o, frac, 3);
}

/* RFC 3339, UTC, milliseconds: 2026-01-02T03:04:05.678Z. */
static void js_time(struct out *o, int64_t ms)
{
    char b[32];
    struct tm tm;
    time_t sec = (time_t)(ms / 1000);
    int n;

    gmtime_r(&sec, &tm);
    n = snprintf(b, sizeof(b), "\"%04d-%02d-%02dT%02d:%02d:%02d.%03dZ\"", tm.tm_year + 1900,
                 tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ms % 1000));
    out_mem(o, b, n > 0 ? (size_t)n : 0);
}

int alog_format(char *buf, size_t cap, const struct alog_line *l)
{
    struct out o = {buf, 0, cap, 0};

    OUT_LIT(&o, "{\"time\":");
    js_time(&o, l->start_ms);
    OUT_LIT(&o, ",\"request_id\":");
    js_str(&o, l->rid, l->rid_len, ALOG_RID_MAX);
    OUT_LIT(&o, ",\"client\":");
    js_cstr(&o, l->client, 64);
    OUT_LIT(&o, ",\"key\":");
    js_cstr(&o, l->key, ALOG_NAME_MAX);
    OUT_LIT(&o, ",\"method\":");
    js_cstr(&o, l->method, 32);
    OUT_LIT(&o, ",\"path\":");
    js_str(&o, l->path, l->path_len, ALOG_PATH_MAX);
    OUT_LIT(&o, ",\"model\":");
    js_str(&o, l->model, l->model_len, ALOG_MODEL_MAX);
    OUT_LIT(&o, ",\"model_served\":");
    js_str(&o, l->served, l->served_len, ALOG_MODEL_MAX);
    OUT_LIT(&o, ",\"pool\":");
    js_cstr(&o, l->pool, ALOG_NAME_MAX);
    OUT_LIT(&o, ",\"backend\":");
    js_cstr(&o, l->backend, ALOG_NAME_MAX);
    OUT_LIT(&o, ",\"attempts\":");
    out_u64(&o, l->attempts);
    OUT_LIT(&o, ",\"status\":");
    out_u64(&o, l->status);
    OUT_LIT(&o, ",\"bytes_in\":");
    out_u64(&o, l->bytes_in);
    OUT_LIT(&o, ",\"bytes_out\":");
    out_u64(&o, l->bytes_out);
    OUT_LIT(&o, ",\"tokens_in\":");
    out_u64(&o, l->tokens_in);
    OUT_LIT(&o, ",\"tokens_out\":");
    out_u64(&o, l->tokens_out);
    OUT_LIT(&o, ",\"tokens_cached\":");
    out_u64(&o, l->tokens_cached);
    OUT_LIT(&o, ",\"cost\":");
    meter_usd(&o, l->cost_nano);
    OUT_LIT(&o, ",\"partial\":");
    if (l->partial)
        OUT_LIT(&o, "true");
    else
        OUT_LIT(&o, "false");
    OUT_LIT(&o, ",\"ttfb_ms\":");
    if (l->ttfb_us < 0)
        OUT_LIT(&o, "null");
    else
        js_ms(&o, (uint64_t)l->ttfb_us);
    OUT_LIT(&o, ",\"duration_ms\":");
    js_ms(&o, l->duration_us);
    OUT_LIT(&o, ",\"error\":");
    js_cstr(&o, l->err, 64);
    OUT_LIT(&o, "}\n");
    return out_done(&o);
}

/* ---- the request ---- */

void alog_request(struct client *c, int cut)
{
    struct worker *w = c->w;
    const struct conf *conf = w->conf;
    struct creq *r;
    struct alog_line l;
    struct acct_usage u;
    uint64_t now;
    int n;

    if (!c->buf || c->state != CS_WAIT)
        return; /* no request was whole or answered: a client gone mid-head logs nothing */
    r = client_creq(c);
    if (!r->alog.t0_ns)
        return;
    now = time_mono_ns();
    memset(&l, 0, sizeof(l));
    stages_usage(c, &u);
    l.start_ms = (int64_t)time_real_ms() - (int64_t)((now - r->alog.t0_ns) / 1000000);
    l.client = c->ip;
    if (r->rid) { /* the head was whole: method and target are known */
        const char *q = memchr(r->url, '?', r->url_len);

        l.rid = r->rid;
        l.rid_len = r->rid_len;
        l.method = llhttp_method_name((llhttp_method_t)r->parser.method);
        l.path = r->url;
        l.path_len = q ? (size_t)(q - r->url) : r->url_len; /* a query may carry secrets */
    }
    if (r->key >= 0)
        l.key = conf->keys[r->key].name;
    if (r->info.flags & JSON_REQ_MODEL) {
        l.model = r->info.model;
        l.model_len = r->info.model_len < JSON_MODEL_MAX ? r->info.model_len : JSON_MODEL_MAX;
        if (r->model_name && (r->model_name_len != r->info.model_len ||
                              memcmp(r->model_name, r->info.model, r->model_name_len) != 0)) {
            l.served = r->model_name;
            l.served_len = r->model_name_len;
        }
    }
    if (r->pool >= 0)
        l.pool = conf->pools[r->pool].name;
    l.attempts = r->fb_attempts;
    if (c->tries_on && client_tries(c)->n) {
        l.backend = conf->backends[client_tries(c)->tried[client_tries(c)->n - 1]].name;
        l.attempts += client_tries(c)->n;
    }
    /* nothing was sent to a client that left: 499, as nginx logs it */
    l.status = r->alog.status ? r->alog.status : cut ? 499 : 0;
    l.err = r->alog.err;
    l.bytes_in = (r->rid ? r->head_end : c->pos) + r->body_len + r->dropped;
    l.bytes_out = r->alog.bytes_out;
    l.tokens_in = u.prompt;
    l.tokens_out = u.completion;
    l.tokens_cached = u.cached;
    l.cost_nano = u.cost_nano;
    l.partial = cut || u.partial || (r->usage_got && r->usage_partial);
    l.ttfb_us = r->alog.first_ns ? (int64_t)((r->alog.first_ns - r->alog.t0_ns) / 1000) : -1;
    l.duration_us = (now - r->alog.t0_ns) / 1000;
    r->alog.t0_ns = 0; /* once */
    n = alog_format(w->alog.line, ALOG_LINE_MAX, &l);
    if (n > 0)
        alog_append(&w->alog, w->alog.line, (size_t)n);
}

/* ---- the ring and its writes ---- */

static uint64_t ring_lines(const struct alog *a, uint64_t from, uint64_t to)
{
    uint64_t lines = 0;

    for (uint64_t i = from; i < to; i++)
        lines += a->ring[i % a->cap] == '\n';
    return lines;
}

static void alog_dropped(struct alog *a, uint64_t lines, const char *why)
{
    uint64_t skipped;
    char note[LOG_RATE_NOTE];

    a->drops += lines;
    if (a->shm_drops)
        shm_counter_add(a->shm_drops, lines);
    if (log_rate_ok(&a->drop_rate, time_mono_ms(), &skipped))
        log_warn("access log: %s: %llu line(s) dropped, %llu in all by this worker%s", why,
                 (unsigned long long)lines, (unsigned long long)a->drops,
                 log_rate_note(skipped, note));
}

static void on_alog_timer(uv_timer_t *t);

static void alog_timer_arm(struct alog *a, uint64_t ms)
{
    if (a->handles && !a->stopped && !uv_is_active((uv_handle_t *)&a->timer))
        uv_timer_start(&a->timer, on_alog_timer, ms, 0);
}

/* Opens the target. A file: O_APPEND (every worker writes whole lines at the end), O_NONBLOCK
 * (a FIFO then never blocks; a regular file ignores it). stderr: a regular file is written as
 * it is; a socket (journald) gets send(MSG_DONTWAIT); a pipe or terminal is opened anew through
 * /proc/self/fd/2 so that O_NONBLOCK is set on a file description of our own, never on the
 * one the error log and the other processes share. */
static int alog_target_open(struct alog *a)
{
    struct stat st;
    int fd;

    a->how = ALOG_HOW_WRITE;
    a->pipe = 0;
    if (a->mode == ALOG_STDERR) {
        if (fstat(STDERR_FILENO, &st) == -1)
            return -errno;
        if (S_ISREG(st.st_mode) || S_ISSOCK(st.st_mode)) {
            a->fd = STDERR_FILENO;
            a->own_fd = 0;
            a->how = S_ISSOCK(st.st_mode) ? ALOG_HOW_SEND : ALOG_HOW_WRITE;
            a->pipe = S_ISSOCK(st.st_mode);
            return 0;
        }
        fd = open("/proc/self/fd/2", O_WRONLY | O_APPEND | O_NONBLOCK | O_CLOEXEC);
    } else {
        fd = open(a->path, O_WRONLY | O_APPEND | O_CREAT | O_NONBLOCK | O_CLOEXEC, 0640);
    }
    if (fd == -1)
        return -errno;
    if (fstat(fd, &st) == 0)
        a->pipe = !S_ISREG(st.st_mode);
    a->fd = fd;
    a->own_fd = 1;
    return 0;
}

static void alog_target_close(struct alog *a)
{
    if (a->fd >= 0 && a->own_fd)
        close(a->fd);
    a->fd = -1;
    a->own_fd = 0;
}

static void alog_open_failed(struct alog *a, int err)
{
    uint64_t skipped;
    char note[LOG_RATE_NOTE];

    if (log_rate_ok(&a->err_rate, time_mono_ms(), &skipped))
        log_err("access log: cannot open %s: %s (tried again on SIGUSR1 and every %d s)%s",
                a->mode == ALOG_STDERR ? "stderr without blocking" : a->path, strerror(-err),
                ALOG_RETRY_MS / 1000, log_rate_note(skipped, note));
}

/* What the next write takes: all that is pending, or for a pipe or socket whole lines of at
 * most PIPE_BUF bytes, which a pipe writes atomically (lines of other writers never cut into
 * ours). Fills iov (1 or 2 pieces around the ring's end); returns the byte count. */
static size_t alog_next(const struct alog *a, struct iovec iov[2], int *n_iov)
{
    uint64_t pending = a->head - a->tail, len = pending;
    size_t idx = (size_t)(a->tail % a->cap);

    if (a->pipe && len > PIPE_BUF) {
        len = PIPE_BUF;
        while (len > 0 && a->ring[(a->tail + len - 1) % a->cap] != '\n')
            len--;
        if (!len) /* cannot be: a line is at most ALOG_LINE_MAX <= PIPE_BUF */
            len = PIPE_BUF;
    }
    iov[0].iov_base = a->ring + idx;
    iov[0].iov_len = len < a->cap - idx ? len : a->cap - idx;
    iov[1].iov_base = a->ring;
    iov[1].iov_len = len - iov[0].iov_len;
    *n_iov = iov[1].iov_len ? 2 : 1;
    return (size_t)len;
}

/* Writes pending lines as far as the target takes them now. Never waits: a pipe, FIFO, socket
 * or terminal is written with O_NONBLOCK / MSG_DONTWAIT, and what it does not take waits in the
 * ring for the timer (a full ring drops new lines). A regular file never answers EAGAIN: write
 * copies into the page cache, which waits only when the kernel throttles a writer whose dirty
 * pages a disk cannot keep up with (as nginx's buffered access_log does); flushes are batched
 * (half the ring, or every ALOG_FLUSH_MS) so that costs one write per batch, not per request. */
void alog_flush(struct alog *a)
{
    while (a->head != a->tail && a->fd >= 0) {
        struct iovec iov[2];
        int n_iov;
        ssize_t r;

        alog_next(a, iov, &n_iov);

        if (a->how == ALOG_HOW_SEND) {
            struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n_iov};
            r = sendmsg(a->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
        } else {
            r = writev(a->fd, iov, n_iov);
        }
        if (r == -1 && errno == EINTR)
            continue;
        if (r == -1 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            alog_timer_arm(a, ALOG_FLUSH_MS);
            return;
        }
        if (r == -1 || r == 0) {
            /* ENOSPC, EIO, EPIPE...: what is pending is lost; new lines try again */
            int e = r == -1 ? errno : EIO;
            uint64_t skipped;
            char note[LOG_RATE_NOTE];

            if (log_rate_ok(&a->err_rate, time_mono_ms(), &skipped))
                log_err("access log: write failed: %s%s", strerror(e),
                        log_rate_note(skipped, note));
            uint64_t lines = ring_lines(a, a->tail, a->head);
            a->tail = a->head;
            alog_dropped(a, lines, "write failed");
            return;
        }
        a->tail += (uint64_t)r;
    }
}

void alog_append(struct alog *a, const char *line, size_t n)
{
    uint64_t used = a->head - a->tail;
    size_t idx, first;

    if (a->mode == ALOG_OFF || !a->ring)
        return;
    if (n > a->cap - used) {
        alog_dropped(a, 1, "buffer full (the target does not keep up)");
        alog_timer_arm(a, ALOG_FLUSH_MS);
        return;
    }
    idx = (size_t)(a->head % a->cap);
    first = n < a->cap - idx ? n : a->cap - idx;
    memcpy(a->ring + idx, line, first);
    memcpy(a->ring, line + first, n - first);
    a->head += n;
    if (used + n >= a->cap / 2)
        alog_flush(a);
    else
        alog_timer_arm(a, ALOG_FLUSH_MS);
}

static void on_alog_timer(uv_timer_t *t)
{
    struct alog *a = t->data;

    if (a->fd < 0 && a->mode != ALOG_OFF && time_mono_ms() >= a->next_open_ms) {
        int rc = alog_target_open(a);

        a->next_open_ms = time_mono_ms() + ALOG_RETRY_MS;
        if (rc < 0)
            alog_open_failed(a, rc);
        else
            log_info("access log: %s open again", a->mode == ALOG_STDERR ? "stderr" : a->path);
    }
    alog_flush(a);
    if (a->head != a->tail)
        alog_timer_arm(a, a->fd < 0 ? ALOG_RETRY_MS : ALOG_FLUSH_MS);
}

void alog_reopen(struct alog *a)
{
    int rc;

    if (a->mode != ALOG_FILE)
        return;
    alog_flush(a); /* lines of before the rotation go to the old file where it takes them */
    alog_target_close(a);
    rc = alog_target_open(a);
    a->next_open_ms = time_mono_ms() + ALOG_RETRY_MS;
    if (rc < 0) {
        alog_open_failed(a, rc);
        if (a->head != a->tail)
            alog_timer_arm(a, ALOG_RETRY_MS);
        return;
    }
    log_debug("access log: %s reopened", a->path);
    alog_flush(a);
}

static void on_alog_usr1(uv_signal_t *s, int signum)
{
    alog_reopen(s->data);
}

int alog_open(struct alog *a, uv_loop_t *loop, enum alog_mode mode, const char *path,
              size_t buf_size, _Atomic uint64_t *shm_drops)
{
    int rc;

    memset(a, 0, sizeof(*a));
    a->fd = -1;
    a->mode = mode;
    a->path = path;
    a->shm_drops = shm_drops;
    if (mode == ALOG_OFF)
        return 0;
    a->cap = buf_size < ALOG_LINE_MAX ? ALOG_LINE_MAX : buf_size;
    if (!(a->ring = malloc(a->cap)) || !(a->line = malloc(ALOG_LINE_MAX))) {
        free(a->ring);
        a->ring = NULL;
        a->mode = ALOG_OFF;
        return -ENOMEM;
    }
    /* the signal first: when it fails nothing is left to close */
    if ((rc = uv_signal_init(loop, &a->usr1)) < 0)
        return rc;
    uv_timer_init(loop, &a->timer); /* cannot fail */
    a->timer.data = a->usr1.data = a;
    uv_unref((uv_handle_t *)&a->timer); /* never what keeps a stopping worker alive */
    a->handles = 1;
    if (mode == ALOG_FILE) {
        if ((rc = uv_signal_start(&a->usr1, on_alog_usr1, SIGUSR1)) < 0)
            return rc;
        uv_unref((uv_handle_t *)&a->usr1);
    }
    if ((rc = alog_target_open(a)) < 0) {
        alog_open_failed(a, rc);
        a->next_open_ms = time_mono_ms() + ALOG_RETRY_MS;
    }
    return 0;
}

void alog_stop(struct alog *a, uv_close_cb close_cb)
{
    if (!a->handles || a->stopped)
        return;
    a->stopped = 1;
    alog_flush(a);
    uv_close((uv_handle_t *)&a->timer, close_cb);
    uv_close((uv_handle_t *)&a->usr1, close_cb);
}

void alog_free(struct alog *a)
{
    if (a->mode == ALOG_OFF)
        return;
    alog_flush(a);
    if (a->head != a->tail)
        alog_dropped(a, ring_lines(a, a->tail, a->head), "the worker stopped");
    alog_target_close(a);
    free(a->ring);
    free(a->line);
    a->ring = a->line = NULL;
    a->mode = ALOG_OFF;
}
