/* The access log: one JSON line per request, formatted into a per-worker ring buffer and written
 * from the worker's loop with non-blocking writes; a full buffer drops lines and counts them. */
#ifndef AIGW_CORE_ALOG_H
#define AIGW_CORE_ALOG_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <uv.h>

#include "core/log.h"
#include "core/util.h"

#define ALOG_LINE_MAX 4096  /* a line never exceeds PIPE_BUF: a pipe takes it whole or not */
#define ALOG_BUF_DEF  65536 /* access_log_buffer default */
#define ALOG_FLUSH_MS 100   /* pending lines wait at most this long for a write */
#define ALOG_RETRY_MS 1000  /* a target that failed to open is tried again this often */

enum alog_mode {
    ALOG_OFF = 0,
    ALOG_FILE,   /* access_log = PATH: opened by each worker, O_APPEND, reopened on SIGUSR1 */
    ALOG_STDERR, /* access_log = stderr */
};

/* How a target takes a write without blocking the loop. */
enum alog_how {
    ALOG_HOW_WRITE = 0, /* a regular file (never EAGAIN), or an fd of our own with O_NONBLOCK */
    ALOG_HOW_SEND,      /* a socket shared with others (journald's stderr): send(MSG_DONTWAIT) */
};

/* What the access log needs of a request that the request does not keep otherwise; in struct
 * creq. first_ns 0 = nothing sent yet; t0_ns 0 = not to be logged (off, or logged already). */
struct alog_req {
    uint64_t t0_ns;     /* monotonic: the request's first byte was parsed */
    uint64_t first_ns;  /* monotonic: the first byte of the answer went to the socket */
    uint64_t bytes_out; /* answer bytes handed to the socket */
    const char *err;    /* the gateway's error code (a static string) when aigw answered one */
    uint16_t status;    /* status line of the answer, 0 = none sent (set with the log off too) */
};

/* One request as the formatter sees it: plain values, so it is unit-testable. Strings are
 * spans (NULL = the JSON null); numbers of a request that has none are 0. */
struct alog_line {
    int64_t start_ms; /* wall clock (ms since the epoch) the request started */
    const char *rid, *client, *key, *method, *path, *model, *served, *pool, *backend, *err;
    size_t rid_len, path_len, model_len, served_len;
    uint32_t attempts, status;
    uint64_t bytes_in, bytes_out;
    uint64_t tokens_in, tokens_out, tokens_cached;
    uint64_t cost_nano;
    int partial;
    int64_t ttfb_us; /* -1 = no byte was sent */
    uint64_t duration_us;
};

/* Formats one line (with its newline) into buf; the length, or -ENOSPC when cap is too small
 * (cap >= ALOG_LINE_MAX always fits: long fields are cut). The path is given without its query
 * string by the caller. */
int alog_format(char *buf, size_t cap, const struct alog_line *l);

/* A worker's access log. */
struct alog {
    enum alog_mode mode;
    enum alog_how how;
    int fd;           /* -1 = none (off, or the file could not be opened) */
    int own_fd;       /* fd is ours to close */
    int pipe;         /* writes go out in whole lines of at most PIPE_BUF bytes */
    const char *path; /* ALOG_FILE: the configured path */
    char *ring;       /* pending lines */
    size_t cap;       /* ring size */
    uint64_t head;    /* bytes ever appended (the ring index is mod cap) */
    uint64_t tail;    /* bytes ever written or dropped */
    char *line;       /* one line being formatted (ALOG_LINE_MAX) */
    uv_timer_t timer; /* flushes pending lines (ALOG_FLUSH_MS), retries a failed open */
    uv_signal_t usr1; /* SIGUSR1 from the master: reopen (ALOG_FILE) */
    int handles;      /* timer and signal initialised: alog_stop closes them */
    int stopped;
    uint64_t drops;              /* lines dropped by this worker */
    _Atomic uint64_t *shm_drops; /* the same count in the worker's shm slot */
    struct log_rate drop_rate;   /* the "lines dropped" warning */
    struct log_rate err_rate;    /* write or open failures */
    uint64_t next_open_ms;       /* a failed open is not tried again before this */
};

/* Sets up a worker's access log from [global] access_log (nothing when off); buf_size is the
 * ring's size. A file that cannot be opened is logged and tried again later: the worker serves
 * meanwhile. 0, or -ENOMEM / a libuv error. */
int alog_open(struct alog *a, uv_loop_t *loop, enum alog_mode mode, const char *path,
              size_t buf_size, _Atomic uint64_t *shm_drops);
/* Whether requests are logged. */
static inline int alog_on(const struct alog *a)
{
    return a->mode != ALOG_OFF;
}
/* Appends one formatted line (n <= ALOG_LINE_MAX), or drops it when the ring is full. */
void alog_append(struct alog *a, const char *line, size_t n);
/* Writes what the target takes now without blocking (called from the loop). */
void alog_flush(struct alog *a);
/* SIGUSR1: pending lines go to the old file where it takes them, then the path is opened
 * anew (logrotate's create mode: the old file was renamed). */
void alog_reopen(struct alog *a);
/* The worker stops: a last non-blocking flush, handles closed (close_cb is called for each). */
void alog_stop(struct alog *a, uv_close_cb close_cb);
/* After the loop ended: a last flush, fd closed, memory freed. */
void alog_free(struct alog *a);

/* ---- the request's side (struct alog_req in struct creq) ---- */

static inline void alog_req_begin(struct alog_req *q, int on)
{
    q->t0_ns = on ? time_mono_ns() : 0;
    q->first_ns = 0;
    q->bytes_out = 0;
    q->err = NULL;
    q->status = 0;
}

/* n bytes of the answer, starting with head (hl bytes), go to the socket. The first write of
 * an answer starts with its status line: the status is read from there, so it is what the
 * client got whoever built the head. */
static inline void alog_req_sent(struct alog_req *q, const char *head, size_t hl, size_t n)
{
    /* the status with the access log off too: /metrics counts answers by status class */
    if (!q->status && hl >= 12 && !memcmp(head, "HTTP/1.", 7) && head[8] == ' ')
        q->status = (uint16_t)((head[9] - '0') * 100 + (head[10] - '0') * 10 + head[11] - '0');
    if (!q->t0_ns)
        return;
    if (!q->first_ns)
        q->first_ns = time_mono_ns();
    q->bytes_out += n;
}

struct client;
/* The request of c ends (before stages_settle, after forward_usage_end: its usage is known):
 * its line goes to the access log, once. cut: the connection closed before the answer was
 * whole (the client left, a write failed, the stream was cut). */
void alog_request(struct client *c, int cut);

#endif
