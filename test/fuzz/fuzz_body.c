/* Fuzz target: the request-body JSON scan (model, stream, the hash key field). */
#include <stdlib.h>
#include <string.h>

#include "core/proxy.h"
#include "test/fuzz/fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *body = (const char *)data;
    struct proxy_body_info info;

    memset(&info, 0, sizeof(info));
    if (proxy_parse_body_key(body, size, "prompt_cache_key", &info) == 0) {
        /* what it found lies inside the body */
        if (info.model && (info.model < body || info.model + info.model_len > body + size))
            abort();
        if (info.key && (info.key < body || info.key + info.key_len > body + size))
            abort();
    }
    return 0;
}
