/* Token usage of an AI answer, read as the body passes through: the `usage` object of a JSON
 * response, or of an event stream's last chunk (and the completion text the stream delivered),
 * with libyajl in memory that does not grow with the body; the SSE filter that drops the
 * usage-only chunk aigw asked for on the client's behalf. */
#ifndef AIGW_CORE_USAGE_H
#define AIGW_CORE_USAGE_H

#include <stddef.h>
#include <stdint.h>

#include <yajl/yajl_parse.h>

#include "core/json.h"

/* struct usage.flags */
#define USAGE_HAVE                                                                                 \
    0x01 /* the upstream's usage object was read: prompt .. total are its figures                  \
          */

/* Most tokens one count of one answer is taken for (prompt, completion, cached, reasoning, total
 * each): a larger figure is an upstream's error, and taken as is it would saturate the cost and
 * lock a key's budget for its period (or wrap a total). A billion tokens is far beyond any
 * model's context and output today, yet small enough that sums of many answers stay exact. */
#define USAGE_MAX_TOKENS 1000000000ull

/* What an answer cost in tokens. Chat and completions report prompt_tokens /
 * completion_tokens (+ prompt_tokens_details.cached_tokens,
 * completion_tokens_details.reasoning_tokens); the Responses API input_tokens / output_tokens
 * (+ input_tokens_details.cached_tokens, output_tokens_details.reasoning_tokens); embeddings
 * prompt_tokens and total_tokens only. They land in the same fields, each capped at
 * USAGE_MAX_TOKENS. A usage object without a prompt count, or whose prompt or completion count is
 * anything but a non-negative integer (negative, a fraction, a string, null), is taken as absent
 * (no USAGE_HAVE): the request is then billed from aigw's own estimate, not as free. */
struct usage {
    uint32_t flags;      /* USAGE_* */
    uint64_t prompt;     /* prompt_tokens | input_tokens */
    uint64_t completion; /* completion_tokens | output_tokens */
    uint64_t cached;     /* of prompt (never more): *_tokens_details.cached_tokens */
    uint64_t reasoning;  /* of completion (never more): *_tokens_details.reasoning_tokens */
    uint64_t total;      /* total_tokens (0 when the upstream gave none) */
    /* Streams: bytes of completion text (UTF-8, unescaped) in the events delivered whole, and
     * the tokens that makes, estimated as ceil(bytes / 4) (OpenAI's rule of thumb for
     * English; a cut stream is billed from it when no usage object came). */
    uint64_t text_bytes;
    uint64_t text_tokens;
};

/* What the body is. */
enum usage_kind {
    USAGE_JSON = 0, /* one JSON object (application/json): its top-level "usage" */
    USAGE_SSE = 1,  /* text/event-stream: see usage_sse_feed */
};

/* Bytes of one event the SSE filter may hold back while it cannot tell yet whether it is the
 * usage-only chunk to remove; a longer event is passed on (its first bytes then too). */
#define USAGE_HOLD 2048

/* Per container level of the event's JSON: what it is (enum in usage.c). Deeper levels are
 * not looked at. */
#define USAGE_DEPTH 6

/* The reader of one answer. Take it from a usage_pool, usage_begin, feed the body, usage_end.
 * The yajl handle and its memory region are kept from one answer (and one event) to the next,
 * so at steady state neither an answer nor an event allocates. */
struct usage_rd {
    struct usage_rd *next; /* in the pool's free list */
    yajl_handle h;         /* NULL, or between two JSON texts */
    yajl_callbacks cb;
    yajl_alloc_funcs af;
    struct json_mem m;
    struct usage u; /* committed: what usage_end hands over */
    /* the JSON text being read (a whole body, or one event's data) */
    struct usage ev;           /* the text's usage object, while it is read */
    uint64_t ev_text;          /* completion text bytes in it (choices[].delta.content, .text) */
    uint64_t ev_delta;         /* the top-level "delta" string's bytes (Responses text delta) */
    uint32_t depth;            /* containers open */
    uint8_t kind[USAGE_DEPTH]; /* what the container at each depth is */
    uint8_t key;               /* what the key just read names, in the current container */
    uint8_t type;              /* Responses event "type" */
    uint8_t ev_usage;          /* 1: top-level usage object, 2: response.usage object */
    uint8_t choices;           /* 0 none, 1 "choices": [], 2 a non-empty choices array */
    uint8_t closed;            /* the text's top-level object has ended */
    uint8_t broken;            /* not one JSON object: the handle is dropped at the end */
    uint8_t mode;              /* enum usage_kind */
    uint8_t filter;            /* SSE: remove the usage-only chunk */
    /* JSON bodies: a structural pass (strings, nesting, top-level keys) that hands yajl only
     * the value of a top-level "usage" key, wrapped as {"usage":VALUE} */
    uint8_t js;      /* scan state (usage.c) */
    uint8_t jkey;    /* in a top-level key: bytes of "usage" it matched so far; 0xff: not it */
    uint8_t jesc;    /* in a string: the last piece ended in an odd run of backslashes */
    uint8_t jkeypos; /* at depth 1, the next string is a key: 1 after '{', 2 after ',' */
    uint8_t jcap;    /* in the usage value: 1 its bytes are kept in hold, 2 they go to yajl */
    uint32_t jdepth; /* containers open */
    uint64_t jarr;   /* bit d - 1: the container at depth d (<= 64) is an array */
    /* SSE lines and events */
    uint8_t line;      /* line state (usage.c) */
    uint8_t fmatch;    /* bytes of "data" matched in the field name; 0xff: another field */
    uint8_t ev_json;   /* 0: no data byte yet, 1: the data is JSON being read, 2: it is not */
    uint8_t ev_data;   /* the event has had a data line (the next one is joined by "\n") */
    uint8_t ev_keep;   /* filter: the current event is passed on, whatever it turns out to be */
    uint8_t ev_open;   /* the current event has bytes (the ones before its end) */
    uint16_t hold_len; /* bytes of the current event held back, in hold */
    char hold[USAGE_HOLD];
};

/* Readers kept for reuse by one worker. */
struct usage_pool {
    struct usage_rd *free;
    uint32_t n_free, max_free;
};

/* A reader from the pool (malloc'd when it is empty), or NULL when out of memory. */
struct usage_rd *usage_get(struct usage_pool *pool);
/* Gives rd back (freed beyond max_free readers kept). */
void usage_put(struct usage_pool *pool, struct usage_rd *rd);
/* Frees every reader kept. */
void usage_pool_free(struct usage_pool *pool);

/* Starts reading an answer of the given kind; filter (SSE only): remove the chunk whose
 * top-level "choices" is [] and that carries a "usage" object, the one aigw asked for with
 * stream_options.include_usage on behalf of a client that did not. */
void usage_begin(struct usage_rd *rd, enum usage_kind kind, int filter);

/* A JSON body's next piece (the bytes need not stay after the call). */
void usage_json_feed(struct usage_rd *rd, const char *p, size_t n);

/* An event stream's next piece, the body as sent (without HTTP chunk framing), in place.
 * Events are split on blank lines (LF, CRLF or CR line ends); the data lines' JSON is read for
 * the usage object (a chat / completions chunk's top-level "usage"; the "response"."usage" of
 * a Responses API response.completed, .incomplete or .failed event) and the completion text
 * (choices[].delta.content, choices[].text, a response.output_text.delta's "delta").
 * Pass-through (filter off): the bytes are left as they are and the result is n.
 * Filter on: the usage-only chunk is taken out, everything else kept byte for byte. An event
 * that cannot be told yet at the end of the piece is held back (at most USAGE_HOLD bytes;
 * longer, it goes on). What goes to the client is then: first *pre_len bytes copied to pre
 * (room for USAGE_HOLD; held bytes of an event now passed on), then p's first `result` bytes
 * (p compacted in place). last: the body ends with this piece (what is held goes on). */
size_t usage_sse_feed(struct usage_rd *rd, char *p, size_t n, int last, char *pre, size_t *pre_len);

/* The answer is over (complete or cut): *out gets what was read. The reader may then be put
 * back or begun again. */
void usage_end(struct usage_rd *rd, struct usage *out);

/* ceil(bytes / 4): the token estimate of a text. */
static inline uint64_t usage_tokens_of_bytes(uint64_t bytes)
{
    return bytes / 4 + (bytes % 4 != 0);
}

#endif
