/* Private to the worker's files (core/worker.c the process, core/client.c the HTTP/1 server
 * side, core/stages.c the stages of a request, core/forward.c its tries): the worker, client
 * connection and request state, and the functions they call across files. */
#ifndef AIGW_CORE_WORKER_PRIV_H
#define AIGW_CORE_WORKER_PRIV_H

#include <arpa/inet.h>
#include <stdint.h>
#include <sys/uio.h>

#include <llhttp.h>
#include <uv.h>

#include "balancer/balancer.h"
#include "core/accept.h"
#include "core/alog.h"
#include "core/conf.h"
#include "core/json.h"
#include "core/meter.h"
#include "core/proxy.h"
#include "core/rewrite.h"
#include "core/route.h"
#include "core/tq.h"
#include "core/upstream.h"
#include "core/usage.h"
#include "shm/limit.h"
#include "shm/shm.h"

#define LINGER_MS 2000 /* how long a closing connection drains what the client still sends */
#define MAX_TRIES 11   /* the first try and at most 10 retries (conf bounds retries) */
#define WTAIL_MAX 16   /* room kept behind a head for the bytes after a body piece */

enum cstate {
    CS_IDLE = 0, /* between requests: no buffer unless pipelined bytes wait */
    CS_HEAD,     /* request head arriving */
    CS_BODY,     /* request body arriving */
    CS_WAIT,     /* request complete, being forwarded / answered */
    CS_LINGER,   /* response sent, write side shut, draining input before close */
    CS_CLOSED,
};

/* Parser events that pause llhttp. */
enum cev {
    CEV_NONE = 0,
    CEV_HEAD,
    CEV_DONE,
};

/* Kinds of client timeouts; each listener has one queue per kind. */
enum tkind {
    T_HEADER = 0,
    T_BODY,
    T_KEEPALIVE,
    T_SEND, /* a write to the client waits: the pool's stream_idle_timeout */
    T_KINDS,
};

/* One client connection. Only what an idle keep-alive connection needs lives here; the state
 * of a request (parser, spans, body, upstream request, tries) is a struct creq in the tail of
 * the pool buffer the connection holds while a request is active. */
struct client {
    uv_poll_t poll; /* the socket, read and written with recv/send(2) here (see client.c) */
    int fd;
    struct worker *w;
    const struct conf_listen *ln;
    struct tq_node tn;          /* in the timeout (or retry back-off) queue the client waits in */
    struct client *prev, *next; /* worker's list of open clients, or free list (next) */
    char *buf;  /* request bytes [0, len), parsed up to pos, then a struct creq; NULL while idle */
    char *wbuf; /* only while a write waits: a pool buffer holding its uv_write_t and head */
    uint32_t len, pos;
    uint16_t li;         /* listener index */
    uint8_t state;       /* enum cstate */
    uint8_t handles;     /* open libuv handles; recycled at 0 */
    uint8_t fresh;       /* no request yet on this connection */
    uint8_t eof;         /* the client shut its write side */
    uint8_t close_after; /* close once the current response is sent (graceful stop) */
    uint8_t reading, writing;
    uint8_t events;    /* what poll watches now (UV_READABLE, UV_WRITABLE) */
    uint8_t cont_left; /* bytes of a "100 Continue" the socket did not take yet */
    uint8_t tries_on;  /* a request is being forwarded: its struct tries is live */
    char ip[INET6_ADDRSTRLEN];
};

/* One request's tries. It lives in the tail of the client's buffer (held for the whole
 * request), so an idle connection does not carry it. */
struct tries {
    uint64_t try_ns;     /* monotonic time the current try started */
    uint64_t head_ns;    /* the current try's time to the response head */
    uint64_t deadline;   /* loop time (ms) at which request_timeout passes; 0 = none */
    uint64_t key;        /* hash balancer key */
    int32_t trial;       /* backend whose trial slot the current try holds, or -1 */
    int32_t again;       /* a tried backend the next pick may take again (its pooled connection
                            was stale: it never saw the request), or -1 */
    int32_t last_err;    /* enum upstream_err of the last failed try */
    int32_t last_status; /* status of the last answer consumed for a retry, or 0 */
    uint8_t n;           /* tries started */
    uint8_t has_key;
    uint8_t discard;           /* the current answer is consumed, not forwarded: a retry follows */
    uint8_t recorded;          /* the current try's outcome is in shm already */
    uint8_t trial_done;        /* the current trial's outcome is in shm already */
    uint8_t framed;            /* the answer's body is framed into chunks here */
    uint8_t sse;               /* the answer is an event stream (text/event-stream) */
    uint8_t sse_nl;            /* newlines at the end of what the client got of it */
    uint8_t sent;              /* body bytes reached the client */
    uint32_t tried[MAX_TRIES]; /* backends of the tries, in order */
    uint32_t trial_epoch;      /* the admission epoch the trial was admitted in */
};

/* The state of the request a client connection is on, in the tail of its buffer: set up
 * when the buffer is taken, gone with it when the connection goes idle. */
struct creq {
    llhttp_t parser;
    struct upstream_req rq;
    struct json_req info; /* what the JSON body says (the body stage) */
    const char *url;
    size_t url_len;
    struct proxy_hdr *hdrs; /* at the tail of the data part of buf */
    const char *rid;        /* X-Request-Id: the client's or generated */
    size_t rid_len;
    char *body; /* in buf at head_end, or malloc'd (body_heap) */
    uint64_t body_len, body_cap;
    uint64_t body_want; /* the declared Content-Length, or max_body_size for a chunked body */
    uint32_t n_hdrs;
    uint32_t head_end; /* offset just after the request head */
    int err;           /* status decided while parsing the request (404, 413, 431) */
    uint8_t hstate, ev;
    uint8_t keepalive, http10, head_method, resp_started, resp_close;
    uint8_t body_heap, has_body;
    uint8_t local;          /* OPTIONS: aigw answers it itself */
    uint8_t asterisk;       /* the request-target is "*" (OPTIONS only) */
    uint8_t method_pending; /* llhttp refused the method: is it a token (501) or junk (400)? */
    uint32_t tail4;         /* the last 4 raw bytes of a chunked body parsed so far */
    uint64_t dropped;       /* body bytes of a request already refused, read and dropped */
    struct tq_node bn;      /* in the listener's body deadline queue while the body arrives */
    int32_t pool;           /* the pool the request goes to (the route stage) */
    int32_t key;            /* the client's [key] (the auth stage), -1 = none (auth off) */
    int32_t model;          /* [model] section of the name the client sent, -1 = none */
    int32_t served;         /* [model] section of the model it is served as, -1 = none */
    const char *model_name; /* the model it is served as (in conf or the body); NULL = the
                               request is not routed by model */
    uint32_t model_name_len;
    uint8_t ep;                 /* enum route_ep of the path */
    uint8_t rename_model;       /* served under another name than the client's (alias_of) */
    uint8_t metered;            /* admitted by the limit stage: settled when the request ends */
    uint8_t fb_used;            /* the model's fallback took over */
    uint8_t fb_attempts;        /* sends made before the fallback (they count in x-aigw-attempts) */
    struct limit_ticket ticket; /* what the limit stage holds for it (limit_settle) */
    struct meter_trio rl_req, rl_tok; /* the x-ratelimit-* of its answer */
    uint64_t res_prompt, res_tokens;  /* tokens reserved: the prompt's estimate, in all */
    uint64_t lease_wait_from;         /* loop time it began waiting for a lease top-up, or 0 */
    struct tries tries;
    /* usage (core/forward.c): the answer of an AI endpoint is read for its token usage */
    struct usage_rd *urd;  /* reading the current answer, or NULL */
    uint8_t usage_read;    /* read the answer's usage (forward_start decides) */
    uint8_t usage_inject;  /* stream_options.include_usage added upstream: its chunk is removed */
    uint8_t usage_sse;     /* urd reads an event stream */
    struct usage usage;    /* what the answer said it used (client_on_usage) */
    uint8_t usage_got;     /* usage holds the answer's figures */
    uint8_t upstream_saw;  /* a try's whole request reached an upstream (see rq.written) */
    uint8_t usage_partial; /* the answer was cut: billed from what was delivered */
    struct alog_req alog;  /* what its access log line needs (core/alog.c) */
    /* not zeroed when a buffer is taken (client_take_buf): rewrite_body sets all it reads */
    struct rewrite rw; /* the upstream body of the current try when it differs */
};

/* One worker process: its loop, listeners, clients, buffers and the balancers of its pools. */
struct worker {
    uv_loop_t loop;
    struct conf *conf;
    struct shm *shm;
    int slot;
    struct acceptor acc; /* the listeners, paused at maxconn */
    uv_signal_t sigterm, sigint, sigquit;
    uv_signal_t sigusr2; /* reload: the master lets a held worker accept */
    uv_timer_t hard_stop;
    struct tq *tqs; /* T_KINDS per listener, then the linger queue */
    int n_tqs;
    struct tq *bdqs; /* per listener: bodies by the time they must have arrived by
                        (client_body_total_timeout) */
    int draining, stopping;
    int handles_ok; /* signal handles and timers initialised: worker_check_exit closes them */
    struct bufpool bufs;
    size_t data_size; /* bytes of a buffer for data */
    uint32_t max_hdrs;
    struct upstream up;
    struct balancer *bal; /* per pool */
    struct balancer_cand *cands;
    int32_t *cand_limit;   /* per candidate of a pick: trial limit, 0 = no trial needed */
    uint32_t *cand_epoch;  /* per candidate: the admission epoch its trial counts in */
    uint64_t *auth_log_ns; /* per backend: the last "api_key is bad" warning */
    struct tq retry_q;     /* clients waiting out a retry back-off, by due time */
    struct tq lease_q;     /* [cluster]: clients waiting for their host's lease to be topped up */
    /* A pool buffer: struct creq, a generated request id, header spans, then data (c->buf and
     * u->buf point at the data). What a request touches is together at the start, so a
     * request dirties a page or two of its buffer rather than both ends of it. */
    size_t rid_off, hdrs_off, data_off;
    struct client *clients, *free_clients;
    int n_clients;
    char *body_cache; /* one body buffer kept from an earlier request, or NULL */
    uint64_t body_cache_cap;
    uint64_t rid_seed1, rid_seed2, rid_counter;
    char *scratch;           /* one buffer for heads built and written at once */
    struct json_parser json; /* reads request bodies, one at a time */
    struct route_keys keys;  /* client keys by digest */
    int64_t started;         /* wall-clock start (the "created" of /v1/models) */
    struct usage_pool usage; /* readers of answers' usage, one per answer being read */
    struct alog alog;        /* the access log */
};

/* ---- inline helpers of the request path ---- */

/* The request state of a client that holds a buffer. */
static inline struct creq *client_creq(const struct client *c)
{
    return (struct creq *)(c->buf - c->w->data_off);
}

static inline struct tries *client_tries(const struct client *c)
{
    return &client_creq(c)->tries;
}

/* The pool of the request (chosen by the route stage). */
static inline const struct conf_pool *client_pool(const struct client *c)
{
    return &c->w->conf->pools[client_creq(c)->pool];
}

/* The balancer of the request's pool. */
static inline struct balancer *client_balancer(const struct client *c)
{
    return &c->w->bal[client_creq(c)->pool];
}

static inline void client_timer_stop(struct client *c)
{
    tq_remove(&c->tn);
}

static inline void client_timer(struct client *c, enum tkind k)
{
    tq_add(&c->w->tqs[c->li * T_KINDS + k], &c->tn);
}

static inline void client_body_deadline_stop(struct client *c)
{
    if (c->buf)
        tq_remove(&client_creq(c)->bn);
}

/* A write that must wait: what is left of it, in the pool buffer that also holds its unsent
 * head and tail bytes, so that an idle connection carries neither. */
struct cwrite {
    struct iovec iov[3];
    unsigned n, i; /* pieces, and the first one not sent in full */
};
#define WHEAD_OFF ((sizeof(struct cwrite) + 15) & ~(size_t)15)

/* Room for a head built in the scratch buffer: it must fit behind a pending write's request,
 * with a chunk-size line after it and the few bytes that may follow a body piece. */
static inline size_t head_cap(const struct worker *w)
{
    return w->bufs.size - WHEAD_OFF - 20 - WTAIL_MAX;
}

/* ---- core/client.c: the HTTP/1 server side ---- */

/* The accept stage: the acceptor (core/accept.c) hands over a new connection on listener li. */
int client_accept(void *ctx, int li, int fd, const struct sockaddr *peer, socklen_t len);
/* Sets up the llhttp callbacks of request parsing (once per process). */
void client_parser_init(void);
/* Fire callbacks of the client timeout queues and of the body deadline queues. */
void client_on_timeout(struct tq_node *n);
void client_on_body_deadline(struct tq_node *n);
/* Closes the connection at once (its upstream exchange cancelled). */
void client_close(struct client *c);
/* Writes head and tail (copied if they must wait; tail at most WTAIL_MAX bytes) around data
 * (kept by the caller until the write ends), in one system call where the socket takes it.
 * 0 = all written, 1 = pending (the upstream is resumed, or the request done, when it ends),
 * -1 = the client is gone. */
int client_write3(struct client *c, const char *head, size_t hl, const char *data, size_t dl,
                  const char *tail, size_t tl);
/* A gateway error (core/answer.c) as the answer; close: Connection: close and close after it;
 * retry_after > 0 adds Retry-After. client_error_via adds x-aigw-backend (backend, NULL = none)
 * and x-aigw-attempts after tries upstream. */
void client_error(struct client *c, int status, const char *type, const char *code, const char *msg,
                  int close, int retry_after);
void client_error_via(struct client *c, int status, const char *type, const char *code,
                      const char *msg, int close, int retry_after, const char *backend,
                      int attempts);
/* A gateway error that keeps the connection (the request was read whole), with extra header
 * lines (each ending "\r\n"; NULL = none). */
void client_error_extra(struct client *c, int status, const char *type, const char *code,
                        const char *msg, int retry_after, const char *extra);
/* Where a JSON body aigw answers with itself is built in the scratch buffer (its head goes in
 * front of it), and the room it has. */
#define CLIENT_JSON_OFF 512
static inline size_t client_json_cap(const struct worker *w)
{
    return head_cap(w) - CLIENT_JSON_OFF;
}
/* Answers status with the JSON body of body_len bytes at scratch + CLIENT_JSON_OFF (< 0: it
 * did not fit: 500). */
void client_json(struct client *c, int status, int body_len);
/* The answer to a request whose path aigw does not forward (creq err 404 or 400). */
void client_path_error(struct client *c, int close);
/* The answer to OPTIONS, which aigw gives itself. */
void client_options(struct client *c);
/* The response went out: next pipelined request, or idle, or close. */
void client_request_done(struct client *c);
/* The first request header named `name` (ASCII case ignored), or NULL. */
const struct proxy_hdr *client_hdr(const struct client *c, const char *name);

/* Writes the n bytes built in the scratch buffer as the last of a response (n < 0: building it
 * failed, the connection closes); the request ends when they are written. */
void client_send_last(struct client *c, int n);
static inline int client_write(struct client *c, const char *head, size_t hl, const char *data,
                               size_t dl)
{
    return client_write3(c, head, hl, data, dl, NULL, 0);
}

/* ---- core/stages.c: a whole request goes through the stages ---- */

/* From a whole request (parsed and validated, its body in) to the answer: see core/stages.c. */
void stages_run(struct client *c);
/* The request ended (answered, failed or its client gone): its limiter reservations are
 * corrected to what it used and its usage and cost are added to the totals. Once per request;
 * after forward_usage_end. */
void stages_settle(struct client *c);
/* Before a model fallback: the fallback model's and pool's limits (0, or -EAGAIN: not now). */
int stages_admit_fallback(struct client *c, int model, int served, int pool);
/* What the request used and cost by now (usage as reported, or estimated when cut). */
void stages_usage(const struct client *c, struct acct_usage *out);

/* ---- core/forward.c: pick, forward, respond, record ---- */

/* Forwards the request to a backend of its pool, with retries, and streams the answer back. */
void forward_start(struct client *c);
/* The current try is over: its trial slot (if any) goes back. */
void client_try_end(struct client *c);
/* Fire callback of the retry back-off queue: the next try is due. */
void forward_on_retry_due(struct tq_node *n);
/* [cluster]: a request refused by its host's lease while the fleet had room waits for the
 * top-up in the worker's lease_q, its admission tried again every STAGES_LEASE_POLL_MS. */
#define STAGES_LEASE_POLL_MS 5
void stages_on_lease_due(struct tq_node *n);
/* The hard stop of one client: a stream under way ends with an `event: error`. */
void client_hard_stop(struct client *c);
/* The answer whose usage is being read is over: client_on_usage gets what was read, once
 * (partial: the answer was cut, by the upstream or the client). Nothing when none is read. */
void forward_usage_end(struct client *c, int partial);
/* The usage of an answer forwarded to the client (u->flags & USAGE_HAVE: the upstream's own
 * figures; else u->text_tokens estimates the completion from the text delivered). partial: the
 * answer was cut (upstream failure or stall, client gone, gateway stop) and u covers what the
 * client got. Called once per answer that reached the client, never for a discarded one. */
void client_on_usage(struct client *c, const struct usage *u, int partial);

/* ---- core/worker.c: the process ---- */

/* A client is gone: a stopping worker exits once the last one is. */
void worker_check_exit(struct worker *w);

#endif
