/* Unit tests of core/meter.c: output reservations, costs at prices and list prices, OpenAI's
 * duration format and the x-ratelimit-* lines. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "core/json.h"
#include "core/meter.h"

static void test_output_max(void **state)
{
    int64_t none[5] = {-1, -1, -1, -1, -1}, some[5] = {500, 200, -1, -1, -1},
            zero[5] = {-1, -1, 0, -1, -1}, bad[5] = {JSON_NUM_BAD, -1, -1, -1, -1},
            many[5] = {1, 1000, -1, 4, 6}, huge[5] = {INT64_MAX, -1, -1, 128, -1};

    (void)state;
    assert_int_equal(meter_output_max(none, 4096, 0), 4096);
    /* the largest limit counts: the upstream may obey any one of them */
    assert_int_equal(meter_output_max(some, 4096, 0), 500);
    assert_int_equal(meter_output_max(zero, 4096, 0), 0);
    assert_int_equal(meter_output_max(some, 4096, 1), 0);
    assert_int_equal(meter_output_max(bad, 4096, 0), 4096);
    /* n and best_of make that many answers */
    assert_int_equal(meter_output_max(many, 4096, 0), 6000);
    assert_int_equal(meter_output_max(huge, 4096, 0), UINT64_MAX);
    assert_int_equal(meter_prompt_estimate("", 0), 0);
    assert_int_equal(meter_prompt_estimate("x", 1), 1);
    assert_int_equal(meter_prompt_estimate(NULL, 300), 100);
    assert_int_equal(meter_prompt_estimate(NULL, 301), 101);
}

/* Inline base64 media count as images and audio do, not as text of that many bytes. */
static void test_prompt_media(void **state)
{
    static char body[600000];
    const char *head = "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\","
                       "\"image_url\":{\"url\":\"data:image/png;base64,";
    const char *tail = "\"}}]}]}";
    size_t h = strlen(head), t = strlen(tail), n;

    (void)state;
    /* 300,000 bytes of base64 (with JSON-escaped slashes): 300000 / 256 = 1171 tokens, and the
     * text around it at a token per 3 bytes */
    memcpy(body, head, h);
    for (size_t i = 0; i < 300000; i++)
        body[h + i] = i % 50 == 7 ? '\\' : i % 50 == 8 ? '/' : "AbZz09+="[i % 8];
    memcpy(body + h + 300000, tail, t);
    n = h + 300000 + t;
    assert_int_equal(meter_prompt_estimate(body, n), 1171 + (h + t + 2) / 3);
    /* a small image: the floor of 765 tokens */
    memcpy(body + h + 2000, tail, t);
    n = h + 2000 + t;
    assert_int_equal(meter_prompt_estimate(body, n), 765 + (h + t + 2) / 3);
    /* text: words and spaces, no long run, as many bytes: a token per 3 */
    for (size_t i = 0; i < 3000; i++)
        body[i] = "hello world "[i % 12];
    assert_int_equal(meter_prompt_estimate(body, 3000), 1000);
    /* a data URL's run just under the floor's length is text */
    n = h + 1023 + t;
    memset(body + h, 'A', 1023);
    memcpy(body + h + 1023, tail, t);
    memset(body + n, ' ', 2000);
    assert_int_equal(meter_prompt_estimate(body, n + 2000), (n + 2000 + 2) / 3);
    /* a long run of letters in a prompt is text too: only data URLs and "data" are media */
    const char *text = "{\"messages\":[{\"role\":\"user\",\"content\":\"";
    h = strlen(text);
    memcpy(body, text, h);
    memset(body + h, 'x', 3000);
    memcpy(body + h + 3000, "\"}]}", 4);
    n = h + 3004;
    assert_int_equal(meter_prompt_estimate(body, n), (n + 2) / 3);
    /* input_audio's "data" (white space around the ':' allowed) is media */
    const char *audio = "{\"input_audio\":{\"format\":\"wav\",\"data\" : \"";
    h = strlen(audio);
    memcpy(body, audio, h);
    memset(body + h, 'Q', 512000);
    memcpy(body + h + 512000, "\"}}", 3);
    n = h + 512003;
    assert_int_equal(meter_prompt_estimate(body, n), 2000 + (h + 3 + 2) / 3);
}

static void test_cost(void **state)
{
    struct conf_model m;

    (void)state;
    memset(&m, 0, sizeof(m));
    m.price_input = 2500000;   /* 2.50 USD / 1M */
    m.price_output = 10000000; /* 10 USD / 1M */
    /* 1000 in, 500 out: 0.0025 + 0.005 USD = 7,500,000 nano */
    assert_int_equal(meter_cost_nano(&m, 1000, 0, 500, 0), 7500000);
    /* cached at price_input when no cached price is set */
    assert_int_equal(meter_cost_nano(&m, 1000, 400, 500, 0), 7500000);
    m.price_cached_input = 1250000;
    assert_int_equal(meter_cost_nano(&m, 1000, 400, 500, 0), 7000000);
    /* list prices: 5 / 20, no cache discount */
    m.list_price_input = 5000000;
    m.list_price_output = 20000000;
    assert_int_equal(meter_cost_nano(&m, 1000, 400, 500, 1), 15000000);
    /* rounded up to the nano-USD */
    m.price_input = 1;
    assert_int_equal(meter_cost_nano(&m, 1, 0, 0, 0), 1);
    assert_int_equal(meter_cost_nano(NULL, 1000, 0, 1000, 0), 0);
    m.price_output = UINT64_MAX / 2;
    assert_int_equal(meter_cost_nano(&m, 0, 0, 1000, 0), UINT64_MAX / 1000 + 1);
}

static void check_dur(uint64_t ms, const char *want)
{
    char buf[64];
    struct out o = {buf, 0, sizeof(buf) - 1, 0};

    meter_duration(&o, ms);
    buf[o.len] = '\0';
    assert_string_equal(buf, want);
}

static void test_duration(void **state)
{
    (void)state;
    check_dur(0, "0ms");
    check_dur(250, "250ms");
    check_dur(1000, "1s");
    check_dur(1500, "1.5s");
    check_dur(1234, "1.234s");
    check_dur(60000, "1m0s");
    check_dur(90000, "1m30s");
    check_dur(3723004, "1h2m3.004s");
}

static void test_headers(void **state)
{
    char buf[512];
    struct out o = {buf, 0, sizeof(buf) - 1, 0};
    struct meter_trio req = {1, 100, 99, 600}, tok = {0, 0, 0, 0};

    (void)state;
    meter_ratelimit_headers(&o, &req, &tok);
    buf[o.len] = '\0';
    assert_string_equal(buf, "x-ratelimit-limit-requests: 100\r\n"
                             "x-ratelimit-remaining-requests: 99\r\n"
                             "x-ratelimit-reset-requests: 600ms\r\n");
}

/* Numbers are written two digits a division: every length, and the edges of each pair. */
static void test_numbers(void **state)
{
    static const uint64_t v[] = {0,      1,      9,          10,         11,        99,   100,
                                 101,    109,    110,        999,        1000,      1009, 12345,
                                 100000, 999999, 1000000000, 4000000000, UINT64_MAX};
    char buf[64], want[64];

    (void)state;
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        uint64_t lo = v[i] > 2 ? v[i] - 2 : 0, hi = v[i] < UINT64_MAX - 2 ? v[i] + 2 : UINT64_MAX;
        for (uint64_t x = lo;; x++) {
            struct out o = {buf, 0, sizeof(buf) - 1, 0};
            out_u64(&o, x);
            buf[o.len] = '\0';
            snprintf(want, sizeof(want), "%llu", (unsigned long long)x);
            assert_string_equal(buf, want);
            if (x == hi)
                break;
        }
    }
    /* both sides of every power of ten (the digit count) */
    for (uint64_t p = 10;; p *= 10) {
        for (uint64_t x = p - 1; x <= p + 1; x++) {
            struct out o = {buf, 0, sizeof(buf) - 1, 0};
            out_u64(&o, x);
            buf[o.len] = '\0';
            snprintf(want, sizeof(want), "%llu", (unsigned long long)x);
            assert_string_equal(buf, want);
        }
        if (p > UINT64_MAX / 10)
            break;
    }
    /* a line that does not fit sets the flag, writes nothing past the end */
    struct out small = {buf, 0, 3, 0};
    volatile uint64_t four = 1234; /* not a constant: gcc would check a path never taken */
    out_u64(&small, four);
    assert_int_equal(small.over, 1);
    assert_int_equal(small.len, 0);
}

static void check_usd(uint64_t nano, const char *want)
{
    char buf[64];
    struct out o = {buf, 0, sizeof(buf) - 1, 0};

    meter_usd(&o, nano);
    buf[o.len] = '\0';
    assert_string_equal(buf, want);
}

static void test_usd(void **state)
{
    (void)state;
    check_usd(0, "0");
    check_usd(7500000, "0.0075");
    check_usd(1, "0.000000001");
    check_usd(12000000000ull, "12");
    check_usd(12500000000ull, "12.5");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_output_max), cmocka_unit_test(test_prompt_media),
        cmocka_unit_test(test_cost),       cmocka_unit_test(test_duration),
        cmocka_unit_test(test_headers),    cmocka_unit_test(test_usd),
        cmocka_unit_test(test_numbers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
