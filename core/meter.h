/* What a request may spend and did spend, free of I/O: the tokens and money reserved when it is
 * admitted, the cost of the usage it reported, and OpenAI's x-ratelimit-* headers. */
#ifndef AIGW_CORE_METER_H
#define AIGW_CORE_METER_H

#include <stddef.h>
#include <stdint.h>

#include "core/conf.h"
#include "core/out.h"

/* Bodies this long or longer are scanned for inline media (base64 images and audio). */
#define METER_MEDIA_SCAN_MIN 2048u
/* A run of this many base64 characters (JSON's \/ included) after ";base64," (a data URL) or
 * as a "data" string (input_audio) is taken for inline media... */
#define METER_MEDIA_RUN_MIN 1024u
/* ...and reserved as this many tokens, or one per METER_MEDIA_BYTES_PER_TOKEN of it if more. */
#define METER_MEDIA_TOKENS          765u
#define METER_MEDIA_BYTES_PER_TOKEN 256u

/* Tokens the prompt of a len-byte JSON body may hold, as reserved before the upstream counts
 * it (and corrected to the real count when the answer ends): text at one token per 3 bytes,
 * rounded up (English runs ~4 bytes a token, CJK text ~3; the JSON around it only adds bytes).
 * An image or audio clip sent inline as base64 is not text: a model counts it by its pixels
 * or seconds, not its bytes (an image is 85 to ~1,500 tokens on gpt-4o whatever its size), so a
 * body of METER_MEDIA_SCAN_MIN bytes or more is scanned, and each data URL's or "data" string's
 * base64 of METER_MEDIA_RUN_MIN bytes or more counts as max(METER_MEDIA_TOKENS, bytes / 256)
 * tokens instead. */
uint64_t meter_prompt_estimate_scan(const char *body, uint64_t len);
static inline uint64_t meter_prompt_estimate(const char *body, uint64_t len)
{
    if (len < METER_MEDIA_SCAN_MIN || !body)
        return (len + 2) / 3;
    return meter_prompt_estimate_scan(body, len);
}

/* Tokens an answer may hold at most: the largest of the request's max_tokens /
 * max_completion_tokens / max_output_tokens (nums[0..2]; < 0 = not given or bad), else def,
 * times the choices it makes (the larger of n and best_of, nums[3..4]). An embeddings request
 * answers with none. */
uint64_t meter_output_max(const int64_t nums[5], uint32_t def, int embeddings);

/* Cost in nano-USD of prompt tokens (cached of them from the provider's cache) and completion
 * tokens at m's prices (pico-USD per token), rounded up. list: at list_price_* (price_* where
 * none is given). m NULL: 0. */
uint64_t meter_cost_nano(const struct conf_model *m, uint64_t prompt, uint64_t cached,
                         uint64_t completion, int list);

/* A duration the way OpenAI's x-ratelimit-reset-* say it: "250ms", "7s", "1m30s", "1.5s". */
void meter_duration(struct out *o, uint64_t ms);

/* USD from nano-USD, as a decimal with no trailing zeros ("0.0075", "12", "0"). */
void meter_usd(struct out *o, uint64_t nano);

/* One x-ratelimit trio: limit, remaining, reset (ms). */
struct meter_trio {
    int set;
    uint64_t limit, remaining, reset_ms;
};

/* x-ratelimit-{limit,remaining,reset}-requests and -tokens lines for the trios that are set. */
void meter_ratelimit_headers(struct out *o, const struct meter_trio *req,
                             const struct meter_trio *tok);

#endif
