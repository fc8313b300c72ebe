/* Fuzz target: the small value parsers (URLs, durations, sizes, percentages, back-off,
 * Retry-After and OpenAI reset durations, request paths). The first byte picks the parser. */
#include <stdlib.h>
#include <string.h>

#include "core/cool.h"
#include "core/proxy.h"
#include "core/url.h"
#include "core/util.h"
#include "test/fuzz/fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char s[1024];
    uint64_t u64, u64b;
    uint32_t u32;
    long l;
    struct url url;
    const char *why;

    if (size < 1 || size > sizeof(s))
        return 0;
    memcpy(s, data + 1, size - 1);
    s[size - 1] = '\0';
    switch (data[0] % 9) {
    case 0:
        if (url_parse(s, &url, &why) == 0 &&
            (url.host[0] == '\0' || url.port == 0 ||
             (url.prefix[0] && url.prefix[strlen(url.prefix) - 1] == '/')))
            abort();
        break;
    case 1:
        util_parse_duration_ms(s, &u64);
        break;
    case 2:
        util_parse_size(s, &u64);
        break;
    case 3:
        util_parse_percent(s, &u32); /* the caller checks the range */
        break;
    case 4:
        if (util_parse_backoff(s, &u64, &u64b, &u32) == 0 && (u64 > u64b || u32 < 100))
            abort();
        break;
    case 5:
        cool_retry_after_ms(s, size - 1, 1795670000);
        break;
    case 6:
        cool_duration_ms(s, size - 1);
        break;
    case 7:
        proxy_path_ok(s, size - 1);
        break;
    default:
        util_parse_int(s, -1000, 1000, &l);
        util_parse_bool(s);
        break;
    }
    return 0;
}
