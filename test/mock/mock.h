/* aigw-mock: state shared by the mock upstream's files (server, connection, request, TLS). */
#ifndef AIGW_MOCK_H
#define AIGW_MOCK_H

#include <stddef.h>
#include <stdint.h>

#include <llhttp.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/pk.h>
#include <mbedtls/ssl.h>
#include <mbedtls/ssl_cache.h>
#include <mbedtls/ssl_ticket.h>
#include <mbedtls/x509_crt.h>
#include <uv.h>

#define MOCK_IN_SIZE      16384 /* plaintext request bytes buffered per connection */
#define MOCK_ARENA_SIZE   8192  /* request target + header names and values of one request */
#define MOCK_MAX_HEADERS  64
#define MOCK_HEAD_SIZE    1024 /* response status line and headers */
#define MOCK_PFX_SIZE     512  /* common prefix of every chunk of one stream */
#define MOCK_MODEL_MAX    200
#define MOCK_BODY_MAX     (32u << 20)
#define MOCK_TLS_IN_SIZE  (20 * 1024) /* ciphertext: holds one full TLS record */
#define MOCK_TLS_OUT_SIZE (32 * 1024)

/* A growable byte buffer, kept for the life of its owner so steady state does not allocate. */
struct mock_buf {
    char *p;
    size_t len;
    size_t cap;
};

int mock_buf_reserve(struct mock_buf *b, size_t extra);
int mock_buf_append(struct mock_buf *b, const void *p, size_t n);
void mock_buf_free(struct mock_buf *b);

/* How a stream's body is delimited. */
enum mock_framing {
    MOCK_FRAMING_AUTO = 0, /* chunked for HTTP/1.1, close-delimited for HTTP/1.0 */
    MOCK_FRAMING_CLOSE,    /* close-delimited: the end of the body is the end of the connection */
    MOCK_FRAMING_LENGTH,   /* Content-Length: every event built at once, sent in one write */
};

/* Per-request behaviour: the command-line values, overridden by x-mock-* request headers. */
struct mock_fault {
    int status;        /* 0: normal answer */
    uint64_t delay_ms; /* before the response headers */
    unsigned chunks;   /* content deltas of a stream */
    uint64_t chunk_interval_ms;
    int64_t reset_after;        /* -1: off; else RST after that many body bytes */
    int64_t close_after;        /* -1: off; else close (FIN, and no TLS close_notify) after that
                                   many body bytes */
    int stall;                  /* never answer */
    int drop;                   /* read the request, then close the connection: no answer */
    int framing;                /* enum mock_framing of a stream */
    int retry_after;            /* -1: no Retry-After header */
    int retry_after_date;       /* 1: send Retry-After as an HTTP date, retry_after seconds ahead */
    int64_t ratelimit_reset_ms; /* -1: none; else x-ratelimit-reset-requests on a 429 (and
                                   an upstream's own x-ratelimit-* on a JSON chat answer) */
    int stamp;                  /* stream chunks carry "mock_sent_ns" (CLOCK_MONOTONIC) */
    size_t tls_record;          /* TLS: at most this many response bytes per record (0: 16 KB) */
};

struct mock_opts {
    const char *host;
    int port;
    const char *name;
    const char *tls_cert;
    const char *tls_key;
    struct mock_fault fault;
    size_t content_bytes;
    const char *api_key;
    int64_t created; /* -1: time(NULL) per response */
    int verbose;
};

/* One header of a request: offsets into the request's arena. Names are stored lower-case. */
struct mock_hdr {
    uint16_t name_off;
    uint16_t name_len;
    uint16_t val_off;
    uint16_t val_len;
};

/* The request being parsed or answered on a connection. The target is at arena offset 0. */
struct mock_req {
    char arena[MOCK_ARENA_SIZE];
    size_t arena_len;
    size_t url_len;
    struct mock_hdr hdrs[MOCK_MAX_HEADERS];
    unsigned nhdrs;
    int cur;       /* last header callback: 0 none, 1 name, 2 value */
    int too_large; /* 0, or 413 / 431 once a limit was hit */
    struct mock_buf body;
    uint8_t method;
    uint8_t http_minor; /* 0 for HTTP/1.0 */
    int keep_alive;
};

enum mock_resp_kind {
    MOCK_RESP_NONE = 0,
    MOCK_RESP_SIMPLE, /* one write, then done */
    MOCK_RESP_STREAM, /* one write per SSE event at the chunk interval */
    MOCK_RESP_STALL,  /* nothing is ever sent */
};

/* Progress of the response to the current request. */
struct mock_resp {
    enum mock_resp_kind kind;
    struct mock_fault f;
    int status;
    int keep_alive;
    int chunked; /* stream framed as HTTP chunks (HTTP/1.1) */
    int include_usage;
    int64_t body_sent; /* bytes written after the header block */
    int reset_now;     /* reset the connection once the current write is done */
    int close_now;     /* close it (no close_notify) once the current write is done */
    unsigned step;     /* next stream event to send */
    unsigned nsteps;
    unsigned prompt_tokens;
    char pfx[MOCK_PFX_SIZE]; /* `{"id":..,"model":..,"choices":[` of every chunk */
    size_t pfx_len;
};

struct mock_tls_conn {
    mbedtls_ssl_context ssl;
    int handshake_done;
    int close_when_flushed;
    char in[MOCK_TLS_IN_SIZE];
    size_t in_off;
    size_t in_len;
    char out[MOCK_TLS_OUT_SIZE];
    size_t out_len;
    size_t inflight;       /* out bytes handed to uv_write, not yet completed */
    struct mock_buf plain; /* response bytes still to encrypt */
    size_t plain_off;
    int plain_pending; /* a conn_write() awaits completion */
};

struct mock_server;

struct mock_conn {
    uv_tcp_t tcp;
    uv_timer_t timer; /* response delay and stream interval */
    uv_write_t wreq;
    llhttp_t parser;
    struct mock_server *srv;
    struct mock_conn *prev;
    struct mock_conn *next;
    int open_handles;
    int closing;
    int busy; /* a request is being answered; parsing is paused */
    int held; /* counted in the server's in_flight until its answer ends or its peer leaves */
    int eof;  /* the peer closed its side */
    int reading;
    int in_pump; /* conn_pump() is on the stack */
    char in[MOCK_IN_SIZE];
    size_t in_off;
    size_t in_len;
    struct mock_req req;
    struct mock_resp resp;
    char head[MOCK_HEAD_SIZE];
    char tail[MOCK_HEAD_SIZE];
    struct mock_buf dyn; /* bodies whose size varies: stream events, /mock/last */
    struct mock_tls_conn *tls;
};

/* Copy of the last non-/mock request, for /mock/last. */
struct mock_last {
    int valid;
    uint8_t method;
    struct mock_buf arena;
    size_t url_len;
    struct mock_hdr hdrs[MOCK_MAX_HEADERS];
    unsigned nhdrs;
    struct mock_buf body;
    int has_user;
    size_t user_off; /* last user message content, raw JSON string, inside body */
    size_t user_len;
};

struct mock_tls_srv {
    mbedtls_ssl_config conf;
    mbedtls_x509_crt crt;
    mbedtls_pk_context key;
    mbedtls_entropy_context entropy;
    mbedtls_ctr_drbg_context drbg;
    mbedtls_ssl_cache_context cache;
    mbedtls_ssl_ticket_context ticket;
    uint64_t handshakes; /* completed TLS handshakes */
    uint64_t resumed;    /* of which resumed a session (by id or by ticket) */
};

struct mock_server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    uv_signal_t sigterm;
    uv_signal_t sigint;
    struct mock_opts opts;
    llhttp_settings_t settings;
    struct mock_conn *conns;
    uint64_t connections; /* accepted so far */
    uint64_t active;
    uint64_t requests; /* non-/mock requests */
    uint64_t aborted;  /* requests whose peer closed before their answer was complete */
    uint64_t chat;
    uint64_t models;
    uint64_t in_flight;          /* requests being answered, their peer there (not
                                  * /mock/ ones, not checks) */
    uint64_t in_flight_max;      /* the most at once since the start (or /mock/reset) */
    struct mock_last last;       /* the last request but the mock endpoints and checks */
    struct mock_last last_check; /* the last health check (User-Agent: aigw-health...) */
    /* The assistant message, JSON-escaped, and where each of its words starts. */
    char *content;
    size_t content_len;
    size_t *word_off;
    unsigned words;
    char *models_body;
    size_t models_len;
    char *name_json; /* name, JSON-escaped */
    void *tokens;    /* jsmntok_t array reused by every request */
    unsigned ntokens;
    struct mock_tls_srv *tls;
};

/* mock_conn.c */
void conn_on_connection(uv_stream_t *listener, int status);
/* Sends bufs (header bytes and/or body; bufs may be modified). http_on_sent() runs once all are
 * written, possibly before conn_write() returns: callers do nothing after calling it. */
void conn_write(struct mock_conn *c, uv_buf_t *bufs, unsigned n);
/* Sends bufs without completion notice (100-continue). */
void conn_write_nowait(struct mock_conn *c, const char *p, size_t n);
/* The response to the current request is complete: next request, or close. */
void conn_response_done(struct mock_conn *c);
void conn_release(struct mock_conn *c);
void conn_close(struct mock_conn *c);
void conn_reset(struct mock_conn *c);
void conn_close_all(struct mock_server *srv);

/* mock_http.c */
void http_settings_init(llhttp_settings_t *s);
/* The parser paused on a complete request: answer it. */
void http_on_request(struct mock_conn *c);
/* The last conn_write() of the response completed. */
void http_on_sent(struct mock_conn *c);
/* A request could not be parsed: 400 and close. */
void http_bad_request(struct mock_conn *c, int status);
int http_content_init(struct mock_server *srv);
void http_server_free(struct mock_server *srv);

/* mock_tls.c */
int tls_srv_init(struct mock_tls_srv *t, const char *cert, const char *key, char *err,
                 size_t errlen);
void tls_srv_free(struct mock_tls_srv *t);
int tls_conn_init(struct mock_conn *c);
void tls_conn_free(struct mock_conn *c);

/* mock.c */
int mock_parse_duration_ms(const char *s, uint64_t *out_ms);
int mock_parse_long(const char *s, long min, long max, long *out);
/* "close", "length" or "auto"/"chunked": enum mock_framing, or -1. */
int mock_parse_framing(const char *s);

#endif
