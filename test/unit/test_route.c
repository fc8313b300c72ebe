/* Unit tests of core/route.c: key lookup by digest, Bearer parsing, endpoints, model
 * resolution (alias_of, pool globs), key model globs, paths =, and the /v1/models body. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/conf.h"
#include "core/route.h"

static struct conf *load(const char *text)
{
    char path[] = "/tmp/aigw-test-route-XXXXXX";
    int fd = mkstemp(path);
    struct conf *c = NULL;
    char *err = NULL;

    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    if (conf_load(path, &c, &err) != 0)
        fail_msg("config: %s", err);
    unlink(path);
    return c;
}

static const char *conf_text = "[listen main]\nbind = 127.0.0.1:8080\n"
                               "[pool gpt]\nmodels = gpt-4o*, gpt-4.1\npaths = /v1/audio/*\n"
                               "[pool local]\nmodels = llama-*, mistral\npaths = /v1/files*\n"
                               "[backend a]\npool = gpt\nurl = http://127.0.0.1:9101/v1\n"
                               "[backend b]\npool = local\nurl = http://127.0.0.1:9102/v1\n"
                               "[key one]\nkey = env:AIGW_ROUTE_K1\nmodels = gpt-*, fast\n"
                               "[key two]\nkey = env:AIGW_ROUTE_K2\n"
                               "[key three]\nkey = env:AIGW_ROUTE_K3\n"
                               "[model fast]\nalias_of = llama-3\n"
                               "[model gpt-4o]\nprice_input = 2.5\n"
                               "[model gpt-4o-*]\nprice_input = 5\n"
                               "[model mis*]\nprice_input = 1\n";

static void test_keys(void **state)
{
    struct route_keys t;
    struct conf *c;

    (void)state;
    setenv("AIGW_ROUTE_K1", "k1", 1);
    setenv("AIGW_ROUTE_K2", "k2", 1);
    setenv("AIGW_ROUTE_K3", "k3", 1);
    c = load(conf_text);
    assert_int_equal(route_keys_init(&t, c), 0);
    assert_int_equal(route_key_find(&t, "k1", 2), 0);
    assert_int_equal(route_key_find(&t, "k2", 2), 1);
    assert_int_equal(route_key_find(&t, "k3", 2), 2);
    assert_int_equal(route_key_find(&t, "k4", 2), -1);
    assert_int_equal(route_key_find(&t, "k", 1), -1);
    assert_int_equal(route_key_find(&t, "", 0), -1);
    /* again, from the cache: the same answers; a wrong key is never remembered */
    for (int i = 0; i < 3; i++) {
        assert_int_equal(route_key_find(&t, "k1", 2), 0);
        assert_int_equal(route_key_find(&t, "k2", 2), 1);
        assert_int_equal(route_key_find(&t, "k3", 2), 2);
        assert_int_equal(route_key_find(&t, "k4", 2), -1);
        assert_int_equal(route_key_find(&t, "k1x", 3), -1);
    }
    /* every slot holding k1 (of the same length as k2, k3): the whole token is compared, so
     * k2 and k3 are not taken for k1, and k4 still is no key */
    struct route_kcache k1e = {0};
    /* the slot is hashed from a random seed: k2 or k3 may have taken k1's last (1 run in ~30) */
    assert_int_equal(route_key_find(&t, "k1", 2), 0);
    for (int i = 0; i < ROUTE_KCACHE; i++)
        if (t.cache[i].len == 2 && t.cache[i].key == 0)
            k1e = t.cache[i];
    assert_int_equal(k1e.len, 2);
    for (int i = 0; i < ROUTE_KCACHE; i++)
        t.cache[i] = k1e;
    assert_int_equal(route_key_find(&t, "k4", 2), -1);
    assert_int_equal(route_key_find(&t, "k2", 2), 1);
    for (int i = 0; i < ROUTE_KCACHE; i++)
        t.cache[i] = k1e;
    assert_int_equal(route_key_find(&t, "k3", 2), 2);
    assert_int_equal(route_key_find(&t, "k1", 2), 0);
    route_keys_free(&t);
    conf_free(c);
}

static void test_bearer(void **state)
{
    const char *tok;
    size_t n;

    (void)state;
    assert_int_equal(route_bearer("Bearer sk-1", 11, &tok, &n), 0);
    assert_int_equal(n, 4);
    assert_memory_equal(tok, "sk-1", 4);
    assert_int_equal(route_bearer("bearer \t sk-2 ", 14, &tok, &n), 0);
    assert_int_equal(n, 4);
    assert_memory_equal(tok, "sk-2", 4);
    assert_int_equal(route_bearer("Basic abc", 9, &tok, &n), -1);
    assert_int_equal(route_bearer("Bearer", 6, &tok, &n), -1);
    assert_int_equal(route_bearer("Bearer  ", 8, &tok, &n), -1);
    assert_int_equal(route_bearer("Bearerx sk", 10, &tok, &n), -1);
    assert_int_equal(route_bearer("Bearer a b", 10, &tok, &n), -1);
}

static void test_endpoints(void **state)
{
    const char *id = NULL;
    size_t n = 0;

    (void)state;
    assert_int_equal(route_endpoint("/v1/chat/completions?x=1", 24, &id, &n), EP_CHAT);
    assert_int_equal(route_endpoint("/v1/completions", 15, &id, &n), EP_COMPLETIONS);
    assert_int_equal(route_endpoint("/v1/embeddings", 14, &id, &n), EP_EMBEDDINGS);
    assert_int_equal(route_endpoint("/v1/responses", 13, &id, &n), EP_RESPONSES);
    assert_int_equal(route_endpoint("/v1/models", 10, &id, &n), EP_MODELS);
    assert_int_equal(route_endpoint("/v1/models/a/b", 14, &id, &n), EP_MODEL_ID);
    assert_int_equal(n, 3);
    assert_memory_equal(id, "a/b", 3);
    assert_int_equal(route_endpoint("/v1/chat/completions/x", 22, &id, &n), EP_OTHER);
    assert_int_equal(route_endpoint("/v1/audio/speech", 16, &id, &n), EP_OTHER);
    assert_true(route_missing_v1("/chat/completions", 17));
    assert_true(route_missing_v1("/models/gpt-4o", 14));
    assert_true(route_missing_v1("/embeddings?a", 13));
    assert_false(route_missing_v1("/chat/completionsx", 18));
    assert_false(route_missing_v1("/", 1));
}

static void test_models(void **state)
{
    struct route_model m;
    struct conf *c;
    char buf[1024];
    int n;

    (void)state;
    c = load(conf_text);
    assert_int_equal(route_model(c, "gpt-4.1", 7, &m), 0);
    assert_int_equal(m.pool, 0);
    assert_int_equal(m.model, -1);
    assert_int_equal(route_model(c, "gpt-4o-mini", 11, &m), 0);
    assert_int_equal(m.pool, 0);
    assert_int_equal(m.model, 2); /* [model gpt-4o-*] */
    assert_int_equal(route_model(c, "gpt-4o", 6, &m), 0);
    assert_int_equal(m.model, 1);
    assert_int_equal(m.served, 1);
    assert_int_equal(route_model(c, "fast", 4, &m), 0);
    assert_int_equal(m.model, 0);
    assert_int_equal(m.served, -1);
    assert_int_equal(m.len, 7);
    assert_memory_equal(m.name, "llama-3", 7);
    assert_int_equal(m.pool, 1);
    assert_int_equal(route_model(c, "claude", 6, &m), -ENOENT);
    /* a [model] glob prices what a pool serves */
    assert_int_equal(route_model(c, "gpt-4o-2024-08-06", 17, &m), 0);
    assert_int_equal(m.model, 2);
    assert_int_equal(m.pool, 0);
    assert_int_equal(route_model(c, "mistral", 7, &m), 0);
    assert_int_equal(m.model, 3);
    /* and does not make a name no pool serves known */
    assert_int_equal(route_model(c, "misc", 4, &m), -ENOENT);
    assert_true(route_key_allows(&c->keys[0], "gpt-4.1", 7));
    assert_true(route_key_allows(&c->keys[0], "fast", 4));
    assert_false(route_key_allows(&c->keys[0], "llama-3", 7));
    assert_true(route_key_allows(&c->keys[1], "anything", 8));
    assert_int_equal(route_path_pool(c, "/v1/audio/speech?x", 18), 0);
    assert_int_equal(route_path_pool(c, "/v1/files/abc", 13), 1);
    assert_int_equal(route_path_pool(c, "/v1/batches", 11), -1);

    n = route_models_body(buf, sizeof(buf), c, NULL, NULL, 0, 1700000000);
    assert_true(n > 0);
    buf[n] = '\0';
    assert_string_equal(
        buf,
        "{\"object\":\"list\",\"data\":["
        "{\"id\":\"fast\",\"object\":\"model\",\"created\":1700000000,\"owned_by\":\"aigw\"},"
        "{\"id\":\"gpt-4o\",\"object\":\"model\",\"created\":1700000000,\"owned_by\":\"aigw\"},"
        "{\"id\":\"gpt-4.1\",\"object\":\"model\",\"created\":1700000000,\"owned_by\":\"aigw\"},"
        "{\"id\":\"mistral\",\"object\":\"model\",\"created\":1700000000,\"owned_by\":\"aigw\"}"
        "]}");
    n = route_models_body(buf, sizeof(buf), c, &c->keys[0], NULL, 0, 1);
    buf[n] = '\0';
    assert_non_null(strstr(buf, "\"fast\""));
    assert_null(strstr(buf, "mistral"));
    n = route_models_body(buf, sizeof(buf), c, &c->keys[0], "mistral", 7, 1);
    assert_int_equal(n, -ENOENT);
    n = route_models_body(buf, sizeof(buf), c, NULL, "mistral", 7, 1);
    assert_true(n > 0);
    assert_int_equal(route_models_body(buf, 20, c, NULL, NULL, 0, 1), -ENOSPC);
    conf_free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keys),
        cmocka_unit_test(test_bearer),
        cmocka_unit_test(test_endpoints),
        cmocka_unit_test(test_models),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
