/* Fuzz target: the request-body JSON scan (model, stream, the hash key field) with a token
 * array grown the way the worker grows it. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/proxy.h"
#include "test/fuzz/fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *body = (const char *)data;
    unsigned ntok = 8;
    void *tokens = malloc(proxy_token_size() * ntok);
    struct proxy_body_info info;
    int rc;

    for (;;) {
        memset(&info, 0, sizeof(info));
        rc = proxy_parse_body_key(body, size, tokens, ntok, "prompt_cache_key", &info);
        if (rc != -ENOMEM || ntok >= 1u << 20)
            break;
        ntok *= 4;
        tokens = realloc(tokens, proxy_token_size() * ntok);
    }
    if (rc == 0) {
        /* what it found lies inside the body */
        if (info.model && (info.model < body || info.model + info.model_len > body + size))
            abort();
        if (info.key && (info.key < body || info.key + info.key_len > body + size))
            abort();
    }
    free(tokens);
    return 0;
}
