/* JSON through libyajl's streaming parser: the fields of a request body aigw looks at (model,
 * stream, stream_options.include_usage, the max_*tokens limits, the pool's json:FIELD hash key),
 * read in pieces as they come, with their byte offsets, in memory that does not grow with the
 * body. */
#ifndef AIGW_CORE_JSON_H
#define AIGW_CORE_JSON_H

#include <stddef.h>
#include <stdint.h>

#include <yajl/yajl_parse.h>

/* Containers nested deeper than this are refused (yajl's own state stack has no bound). */
#define JSON_MAX_DEPTH 1024
/* Bytes of the model name kept (model names are short; a longer one is only a prefix). */
#define JSON_MODEL_MAX 256

/* The fields of a request body whose values are read, and whose value spans are recorded. */
enum json_req_field {
    JSON_F_NONE = 0,
    JSON_F_MODEL = 1,          /* "model" */
    JSON_F_STREAM = 2,         /* "stream" */
    JSON_F_STREAM_OPTIONS = 3, /* "stream_options" */
    JSON_F_INCLUDE_USAGE = 4,  /* "stream_options": {"include_usage"} */
    JSON_F_MAX_TOKENS = 5,     /* "max_tokens" (chat, completions) */
    JSON_F_MAX_COMPLETION = 6, /* "max_completion_tokens" (chat) */
    JSON_F_MAX_OUTPUT = 7,     /* "max_output_tokens" (responses) */
    JSON_F_N = 8,              /* "n": choices generated (chat, completions) */
    JSON_F_BEST_OF = 9,        /* "best_of": completions generated to pick from */
    JSON_F_COUNT = 10
};

/* json_req.flags */
#define JSON_REQ_MODEL         0x01 /* "model" is a string: model / model_len */
#define JSON_REQ_STREAM        0x02 /* "stream": true */
#define JSON_REQ_STREAM_OPTS   0x04 /* "stream_options" is an object */
#define JSON_REQ_INCLUDE_USAGE 0x08 /* "stream_options": {"include_usage": true} */
#define JSON_REQ_KEY           0x10 /* the json:FIELD hash key is a string: key_hash */
#define JSON_REQ_BAD_STREAM    0x20 /* "stream" is neither a boolean nor null */
#define JSON_REQ_BAD_USAGE     0x40 /* "stream_options": {"include_usage"} is neither */

#define JSON_NUM_BAD (-2)

/* Bytes [off, end) of a value in the body, as sent (a string's quotes and escapes included). */
struct json_span {
    uint64_t off, end; /* 0, 0: the field is not in the body */
};

/* What a request body says. Only top-level fields count (and include_usage inside a top-level
 * stream_options): the same names nested deeper are ignored. A field given twice counts with
 * its last value, as the upstreams' parsers take it; `dup` says which came twice. */
struct json_req {
    uint32_t flags;             /* JSON_REQ_* */
    uint32_t model_len;         /* unescaped length, may exceed JSON_MODEL_MAX */
    char model[JSON_MODEL_MAX]; /* unescaped model name (its first JSON_MODEL_MAX bytes) */
    uint64_t key_hash;          /* balancer_hash() of the unescaped hash key */
    /* max_tokens, max_completion_tokens, max_output_tokens, n, best_of, as numbers or numeric
     * strings (upstreams coerce "9" and 9.0): rounded up, saturated at INT64_MAX; -1 = not
     * given, JSON_NUM_BAD = given but negative or not a number */
    int64_t max_tokens[5];
    struct json_span span[JSON_F_COUNT]; /* where each field's value is, by enum json_req_field */
    uint16_t dup;                        /* bit (1 << field): the field came more than once */
};

/* yajl's memory: a bump region reused parse after parse. A parse that needs more than the
 * region takes the rest from the heap, and json_mem_reset then grows the region to fit (up to
 * 64 KB), so at steady state a parse does no malloc. A zeroed struct json_mem is an empty one. */
struct json_mem {
    char *mem;            /* region the parse allocates from */
    size_t cap, used;     /* its size, bytes in use */
    size_t over;          /* bytes this parse allocated past cap (then on the heap) */
    uint64_t heap_allocs; /* allocations that did not fit the region, ever (tests, bench) */
};

/* Points af at allocation hooks over m, for yajl_alloc. */
void json_mem_funcs(struct json_mem *m, yajl_alloc_funcs *af);
/* After a parse (nothing allocated from m is used any more): the region is empty again, and
 * grown to what the parse needed. */
void json_mem_reset(struct json_mem *m);
/* Frees the region (every yajl handle over it must be freed first). */
void json_mem_free(struct json_mem *m);

/* One incremental parse at a time over a yajl handle. yajl 2 has no reset: the handle is set to
 * read a sequence of JSON texts and kept from one body to the next as long as each leaves it
 * clean (a body that is not one object drops it). Its memory (handle, state stack, lexer, the
 * buffer strings are decoded into) comes from a region of this parser, grown (up to 64 KB) to
 * what a parse needed, so at steady state a parse does no malloc. The parser
 * has yajl decode only the strings it keeps (model, hash key): nested values are only checked
 * and skipped, so yajl needs no more memory for a large body than for a small one. */
struct json_parser {
    yajl_handle h;       /* NULL, or between two texts (or mid-body while active) */
    yajl_callbacks cb;   /* the table yajl calls through, narrowed where nothing is read */
    yajl_alloc_funcs af; /* yajl's allocation hooks, over m */
    struct json_mem m;   /* the region the parse allocates from */
    /* the parse in progress */
    struct json_req *out;
    const char *key; /* json:FIELD name or NULL */
    size_t key_len;
    const unsigned char *chunk; /* the piece yajl is parsing, for value offsets */
    size_t chunk_len;
    uint64_t fed;    /* body bytes before chunk */
    uint32_t depth;  /* containers open */
    uint8_t top;     /* enum json_req_field of the top-level value being read */
    uint8_t sub;     /* the same for a field of stream_options */
    uint8_t is_key;  /* the top-level value being read is the hash key's */
    uint8_t so_obj;  /* depth 2 is the object value of stream_options */
    uint8_t pending; /* a field whose value starts in a later piece (after white space, ':') */
    uint8_t narrow;  /* which callbacks cb holds (req_narrow) */
    uint8_t active;  /* between json_req_begin and json_req_end */
    uint8_t closed;  /* the top-level object has ended, at `end` */
    uint8_t failed;  /* the body is not one JSON object */
    uint64_t end;
    uint64_t fast; /* bodies json_req_parse read without yajl, ever (tests) */
};

/* A JSON number (or a numeric string's contents) as a count of tokens or choices: rounded up
 * ("1.5" -> 2, "1e3" -> 1000), saturated at INT64_MAX; JSON_NUM_BAD when negative or not a
 * number. */
int64_t json_count(const char *s, size_t n);

/* Frees what the parser holds (a zeroed struct json_parser is a valid, empty one). */
void json_parser_free(struct json_parser *p);

/* Empties *out: no field found. */
void json_req_reset(struct json_req *out);

/* Starts reading a request body into *out; key_field (NUL-terminated, NULL = none) names the
 * top-level string field whose hash is the balancer's key. Both must stay until json_req_end.
 * Ends a parse left unfinished. 0 or -ENOMEM. */
int json_req_begin(struct json_parser *p, struct json_req *out, const char *key_field);

/* Reads the next piece of the body (the bytes need not stay after the call). 0, or -EINVAL
 * once the bytes so far cannot be the start of one JSON object (later pieces are then refused
 * too, and json_req_end says -EINVAL). */
int json_req_feed(struct json_parser *p, const char *buf, size_t len);

/* The body is complete: 0 when it was one JSON object (white space around it allowed, nesting
 * up to JSON_MAX_DEPTH), -EINVAL otherwise. *out holds what was found either way. */
int json_req_end(struct json_parser *p);

/* The whole body at once: what json_req_begin, one json_req_feed and json_req_end give, the
 * same answer and the same *out. A scan of plain JSON reads it first, without yajl; a body it
 * does not take (valid or not) goes through yajl. p->fast counts the bodies the scan took. */
int json_req_parse(struct json_parser *p, struct json_req *out, const char *key_field,
                   const char *body, size_t len);

#endif
