/* Gateway answers, free of I/O: the responses aigw makes itself, as whole byte strings to
 * write (OpenAI-shaped JSON errors, the answer to OPTIONS, the error end of an SSE stream). */
#ifndef AIGW_CORE_ANSWER_H
#define AIGW_CORE_ANSWER_H

#include <stddef.h>

/* Builds a complete gateway error response with an OpenAI-shaped JSON body. retry_after > 0
 * adds Retry-After; request_id may be NULL. Returns the length or -ENOSPC. */
int answer_error(char *buf, size_t cap, int status, const char *type, const char *code,
                 const char *message, int close, int retry_after, const char *request_id,
                 size_t request_id_len);

/* answer_error after tries upstream: backend (NULL = none) and attempts go out as
 * x-aigw-backend and x-aigw-attempts. head_only (the answer to a HEAD request): the head alone,
 * with the Content-Length the body would have had. */
int answer_error_via(char *buf, size_t cap, int status, const char *type, const char *code,
                     const char *message, int close, int retry_after, const char *request_id,
                     size_t request_id_len, const char *backend, int attempts, int head_only);

/* answer_error_via with more header lines: extra (each line ending "\r\n", e.g.
 * "Allow: GET\r\n"; NULL = none) goes out after Content-Length and Retry-After. */
int answer_error_hdrs(char *buf, size_t cap, int status, const char *type, const char *code,
                      const char *message, int close, int retry_after, const char *request_id,
                      size_t request_id_len, const char *backend, int attempts, int head_only,
                      const char *extra);

/* The answer aigw gives to OPTIONS itself: 204 with "Allow: <allow>", X-Request-Id (when
 * request_id is set) and Connection. Returns the length or -ENOSPC. */
int answer_options(char *buf, size_t cap, const char *allow, int close, const char *request_id,
                   size_t request_id_len);

/* The end of an SSE stream whose upstream failed after the first byte reached the client, in
 * chunked framing: one chunk holding `prefix` (newlines that end a partly sent event) and an
 * `event: error` whose data is an OpenAI-shaped error with type "upstream_error" and `code`,
 * then the last chunk. Returns the length or -ENOSPC. */
int answer_sse_error(char *buf, size_t cap, const char *prefix, const char *message,
                     const char *code);

/* The head of a JSON answer aigw gives itself (GET /v1/models): status, Content-Type,
 * Content-Length body_len, X-Request-Id, Connection. Returns the length or -ENOSPC. */
int answer_json_head(char *buf, size_t cap, int status, size_t body_len, int close,
                     const char *request_id, size_t request_id_len);

/* Reason phrase for the statuses aigw makes itself ("Bad Gateway"); "Unknown" otherwise. */
const char *answer_status_reason(int status);

#endif
