/* Reservations, costs and rate-limit headers (see core/meter.h). */
#include <string.h>

#include "core/meter.h"

/* a * b, saturating */
static uint64_t mul_sat(uint64_t a, uint64_t b);

uint64_t meter_output_max(const int64_t nums[5], uint32_t def, int embeddings)
{
    int64_t most = -1, copies = 1;

    if (embeddings)
        return 0;
    /* the largest limit given: upstreams differ in which one they obey (vLLM takes
     * max_completion_tokens over max_tokens); a bad one (negative, not a number) counts as
     * none given, which the upstream refuses anyway */
    for (int i = 0; i < 3; i++)
        if (nums[i] >= 0 && nums[i] > most)
            most = nums[i];
    for (int i = 3; i < 5; i++)
        if (nums[i] > copies)
            copies = nums[i];
    return mul_sat(most >= 0 ? (uint64_t)most : def, (uint64_t)copies);
}

/* a * b, saturating: absurd token counts must not wrap a cost to nothing */
static uint64_t mul_sat(uint64_t a, uint64_t b)
{
    uint64_t r;

    return __builtin_mul_overflow(a, b, &r) ? UINT64_MAX : r;
}

static uint64_t add_sat(uint64_t a, uint64_t b)
{
    return a + b < a ? UINT64_MAX : a + b;
}

uint64_t meter_cost_nano(const struct conf_model *m, uint64_t prompt, uint64_t cached,
                         uint64_t completion, int list)
{
    uint64_t in, out, cin, pico;

    if (!m)
        return 0;
    in = m->price_input;
    out = m->price_output;
    cin = m->price_cached_input ? m->price_cached_input : in;
    if (list) {
        in = m->list_price_input ? m->list_price_input : in;
        out = m->list_price_output ? m->list_price_output : out;
        cin = in; /* a list price has no cache discount of the relay's */
    }
    if (cached > prompt)
        cached = prompt;
    pico = add_sat(add_sat(mul_sat(prompt - cached, in), mul_sat(cached, cin)),
                   mul_sat(completion, out));
    return pico / 1000 + (pico % 1000 != 0);
}

void meter_duration(struct out *o, uint64_t ms)
{
    if (ms < 1000) {
        out_u64(o, ms);
        OUT_LIT(o, "ms");
        return;
    }
    if (ms >= 3600000) {
        out_u64(o, ms / 3600000);
        OUT_LIT(o, "h");
        ms %= 3600000;
    }
    if (ms >= 60000) {
        out_u64(o, ms / 60000);
        OUT_LIT(o, "m");
        ms %= 60000;
    }
    out_u64(o, ms / 1000);
    ms %= 1000;
    if (ms) {
        char frac[4] = {(char)('0' + ms / 100), (char)('0' + ms / 10 % 10), (char)('0' + ms % 10)};
        size_t n = 3;

        while (frac[n - 1] == '0')
            n--;
        OUT_LIT(o, ".");
        out_mem(o, frac, n);
    }
    OUT_LIT(o, "s");
}

/* Room for a trio's lines before its reset duration: the names (what at most 8 bytes), two
 * numbers of at most 20 digits, their separators. */
#define TRIO_ROOM 160

/* What a number's line needs: its name, written without a check per piece. */
#define TRIO_PUT(p, lit) (memcpy(p, lit, sizeof(lit) - 1), (p) += sizeof(lit) - 1)

/* what: "requests" or "tokens", n its length; inlined at both calls, so its copies are of a
 * known size. With TRIO_ROOM bytes left the lines are written straight into the buffer. */
static inline __attribute__((always_inline)) void trio(struct out *o, const struct meter_trio *t,
                                                       const char *what, size_t n)
{
    if (!t->set)
        return;
    if (o->over || o->cap - o->len < TRIO_ROOM) {
        OUT_LIT(o, "x-ratelimit-limit-");
        out_mem(o, what, n);
        OUT_LIT(o, ": ");
        out_u64(o, t->limit);
        OUT_LIT(o, "\r\nx-ratelimit-remaining-");
        out_mem(o, what, n);
        OUT_LIT(o, ": ");
        out_u64(o, t->remaining);
        OUT_LIT(o, "\r\nx-ratelimit-reset-");
        out_mem(o, what, n);
        OUT_LIT(o, ": ");
    } else {
        char *p = o->p + o->len;
        size_t d;
        TRIO_PUT(p, "x-ratelimit-limit-");
        memcpy(p, what, n);
        p += n;
        TRIO_PUT(p, ": ");
        d = out_u64_len(t->limit);
        out_u64_put(p, t->limit, d);
        p += d;
        TRIO_PUT(p, "\r\nx-ratelimit-remaining-");
        memcpy(p, what, n);
        p += n;
        TRIO_PUT(p, ": ");
        d = out_u64_len(t->remaining);
        out_u64_put(p, t->remaining, d);
        p += d;
        TRIO_PUT(p, "\r\nx-ratelimit-reset-");
        memcpy(p, what, n);
        p += n;
        TRIO_PUT(p, ": ");
        o->len = (size_t)(p - o->p);
    }
    meter_duration(o, t->reset_ms);
    OUT_LIT(o, "\r\n");
}

void meter_ratelimit_headers(struct out *o, const struct meter_trio *req,
                             const struct meter_trio *tok)
{
    trio(o, req, "requests", 8);
    trio(o, tok, "tokens", 6);
}

void meter_usd(struct out *o, uint64_t nano)
{
    char frac[9];
    uint64_t f = nano % 1000000000ull;
    size_t n = 9;

    out_u64(o, nano / 1000000000ull);
    if (!f)
        return;
    for (int i = 8; i >= 0; i--, f /= 10)
        frac[i] = (char)('0' + f % 10);
    while (frac[n - 1] == '0')
        n--;
    OUT_LIT(o, ".");
    out_mem(o, frac, n);
}

/* The characters of a base64 run as it appears in a JSON string ('\\' for an escaped '/',
 * and for "\n" line breaks of MIME base64). */
static const uint8_t meter_b64[256] = {
    ['+'] = 1, ['/'] = 1, ['='] = 1, ['\\'] = 1, ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1,
    ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1,  ['8'] = 1, ['9'] = 1, ['A'] = 1, ['B'] = 1,
    ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1,  ['G'] = 1, ['H'] = 1, ['I'] = 1, ['J'] = 1,
    ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1,  ['O'] = 1, ['P'] = 1, ['Q'] = 1, ['R'] = 1,
    ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1,  ['W'] = 1, ['X'] = 1, ['Y'] = 1, ['Z'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1,  ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1,
    ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1,  ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1,
    ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1,  ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1,
    ['y'] = 1, ['z'] = 1,
};

static uint64_t media_tokens(uint64_t run)
{
    uint64_t t = run / METER_MEDIA_BYTES_PER_TOKEN;
    return t > METER_MEDIA_TOKENS ? t : METER_MEDIA_TOKENS;
}

static int is_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Whether the run of base64 starting at s[st] is inline media: a data URL's payload
 * ("data:image/png;base64,...", images and files) or an input_audio's "data" string. A long
 * run of letters in a prompt is not. */
static int media_start(const unsigned char *s, uint64_t st)
{
    uint64_t j;

    if (st >= 8 && !memcmp(s + st - 8, ";base64,", 8))
        return 1;
    if (st < 7 || s[st - 1] != '"')
        return 0;
    j = st - 1; /* the string's quote: before it, `"data"` and ':' with any white space */
    while (j > 0 && is_space(s[j - 1]))
        j--;
    if (j == 0 || s[j - 1] != ':')
        return 0;
    j--;
    while (j > 0 && is_space(s[j - 1]))
        j--;
    return j >= 6 && !memcmp(s + j - 6, "\"data\"", 6);
}

uint64_t meter_prompt_estimate_scan(const char *body, uint64_t len)
{
    const unsigned char *s = (const unsigned char *)body;
    uint64_t run = 0, media = 0, tokens = 0;

    for (uint64_t i = 0; i <= len; i++) {
        if (i < len && meter_b64[s[i]]) {
            run++;
            continue;
        }
        if (run >= METER_MEDIA_RUN_MIN && media_start(s, i - run)) {
            media += run;
            tokens += media_tokens(run);
        }
        run = 0;
    }
    return tokens + (len - media + 2) / 3;
}
