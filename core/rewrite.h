/* The request body as it goes upstream when it must change (model renamed for a backend,
 * stream_options.include_usage added): a short list of pieces pointing into the client's body
 * and a few inserted bytes, never a copy of the body. */
#ifndef AIGW_CORE_REWRITE_H
#define AIGW_CORE_REWRITE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "core/json.h"

/* At most two edits (the model, stream_options), each cutting the body once more and adding
 * one piece of its own. */
#define REWRITE_PIECES 5
/* Room for the inserted bytes: the quoted, escaped model name and the stream_options text. */
#define REWRITE_BUF 640

struct rewrite {
    struct iovec iov[REWRITE_PIECES]; /* the upstream body, in order */
    int n;                            /* pieces used */
    uint64_t len;                     /* their total: the upstream Content-Length */
    char buf[REWRITE_BUF];            /* inserted bytes the pieces point at */
};

/* Describes the upstream body of `body` (len bytes, one JSON object as parsed into *jr):
 * model (model_len bytes, NULL = keep the client's) replaces the value of "model", and
 * include_usage makes stream_options.include_usage true: "stream_options" is added when absent,
 * set to {"include_usage":true} when it is not an object, include_usage added to the object
 * when it lacks it, and its value replaced by true when it is not true. 1 when the body
 * changes (rw describes it; jr's spans of the last "model" / "stream_options" are the ones
 * upstreams read), 0 when it goes as it is (rw is one piece: the body), -ENOSPC when the model
 * name does not fit REWRITE_BUF, -EINVAL when jr says the body has no such field to edit (a
 * model to rename without a string "model"). body must stay as long as rw is used. */
int rewrite_body(struct rewrite *rw, const char *body, size_t len, const struct json_req *jr,
                 const char *model, size_t model_len, int include_usage);

#endif
