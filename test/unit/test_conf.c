/* Unit tests of conf_load on files written by the test: resolved values, defaults, backend
 * grouping, and the exact "FILE:LINE: [section] key 'K':" of each kind of error; and of the
 * percentage and back-off parsers behind the resilience keys. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <errno.h>
#include <fnmatch.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "balancer/balancer.h"
#include "core/conf.h"
#include "core/util.h"

static char dir[64];
static char ini_path[128];

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");

    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

static int setup(void **state)
{
    char key_path[128];

    snprintf(dir, sizeof(dir), "/tmp/aigw-test-conf-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    snprintf(ini_path, sizeof(ini_path), "%s/t.ini", dir);
    snprintf(key_path, sizeof(key_path), "%s/key.txt", dir);
    write_file(key_path, "sk-from-file\n");
    snprintf(key_path, sizeof(key_path), "%s/ca.pem", dir);
    write_file(key_path, "not really a CA, only read at config time\n");
    return 0;
}

static int teardown(void **state)
{
    char p[128];
    const char *files[] = {"t.ini", "key.txt", "ca.pem"};

    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        snprintf(p, sizeof(p), "%s/%s", dir, files[i]);
        unlink(p);
    }
    rmdir(dir);
    return 0;
}

static struct conf *load_ok(const char *text)
{
    struct conf *c = NULL;
    char *err = NULL;

    write_file(ini_path, text);
    if (conf_load(ini_path, &c, &err) != 0)
        fail_msg("unexpected error: %s", err);
    assert_null(err);
    assert_non_null(c);
    return c;
}

/* Loads text, which must fail, and checks the message starts "FILE:LINE:" (line > 0) or "FILE:"
 * and contains each of the NULL-terminated fragments. */
static void load_bad(const char *text, int line, ...)
{
    struct conf *c = (void *)1;
    char *err = NULL, want[256];
    const char *frag;
    va_list ap;

    write_file(ini_path, text);
    assert_int_equal(conf_load(ini_path, &c, &err), -EINVAL);
    assert_null(c);
    assert_non_null(err);
    if (line > 0)
        snprintf(want, sizeof(want), "%s:%d: ", ini_path, line);
    else
        snprintf(want, sizeof(want), "%s: ", ini_path);
    if (strncmp(err, want, strlen(want)) != 0)
        fail_msg("message '%s' does not start with '%s'", err, want);
    va_start(ap, line);
    while ((frag = va_arg(ap, const char *)))
        if (!strstr(err, frag))
            fail_msg("message '%s' lacks '%s'", err, frag);
    va_end(ap);
    free(err);
}

#define BASE                                                                                       \
    "[listen main]\n"                                                                              \
    "bind = 127.0.0.1:8080\n"                                                                      \
    "[pool p]\n"                                                                                   \
    "[backend a]\n"                                                                                \
    "url = http://127.0.0.1:9101/v1\n"
/* BASE takes lines 1..5: the first line a test appends is line 6. */

static void test_full_valid(void **state)
{
    struct conf *c;
    const struct sockaddr_in *sin;
    const struct sockaddr_in6 *sin6;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);

    setenv("AIGW_TEST_KEY", "sk-from-env", 1);
    c = load_ok("; a comment\n"
                "# another\n"
                "[global]\n"
                "workers = auto\n"
                "admin_socket = run/aigw.sock\n"
                "log_level = debug\n"
                "hard_stop_after = 1500ms\n"
                "\n"
                "[listen main]\n"
                "  bind = 127.0.0.1:8080   ; indented keys are fine\n"
                "\tpool = second\n"
                "backlog = 128\n"
                "max_header_size = 8k\n"
                "max_headers = 50\n"
                "max_body_size = 1m\n"
                "client_header_timeout = 3s\n"
                "client_body_timeout = 2m\n"
                "client_body_total_timeout = 90s\n"
                "keepalive_timeout = 1h\n"
                "[listen all]\n"
                "bind = *:8081\n"
                "[listen v6]\n"
                "bind = [::1]:8082\n"
                "[pool first]\n"
                "balance = roundrobin\n"
                "check = no\n"
                "check_method = HEAD\n"
                "check_path = /health\n"
                "check_expect = 200, 204 301\n"
                "check_interval = 250ms\n"
                "check_timeout = 100ms\n"
                "rise = 5\n"
                "fall = 7\n"
                "connect_timeout = 1s\n"
                "first_byte_timeout = 30s\n"
                "stream_idle_timeout = 45s\n"
                "pool_idle_timeout = 10s\n"
                "[backend b1]\n"
                "pool = second\n"
                "url = https://api.example.com/openai/v1/\n"
                "api_key = env:AIGW_TEST_KEY\n"
                "tls_verify = no\n"
                "ca_file = ca.pem\n"
                "[pool second]\n"
                "[backend b2]\n"
                "pool = first\n"
                "url = http://127.0.0.1:9101\n"
                "weight = 0\n"
                "api_key = file:key.txt\n"
                "keepalive = no\n"
                "[backend b3]\n"
                "pool = second\n"
                "url = http://[::1]:9103/v1\n"
                "weight = 256\n"
                "api_key = sk-literal\n"
                "keepalive = 5\n"
                "[backend b4]\n"
                "pool = first\n"
                "url = http://h4\n"
                "keepalive = yes\n");

    assert_string_equal(c->path, ini_path);
    assert_int_equal(c->global.workers, cpus > 64 ? 64 : cpus);
    assert_string_equal(c->global.admin_socket, "run/aigw.sock");
    assert_int_equal(c->global.log_level, LOG_LVL_DEBUG);
    assert_int_equal(c->global.hard_stop_after_ms, 1500);

    assert_int_equal(c->n_listens, 3);
    assert_string_equal(c->listens[0].name, "main");
    assert_string_equal(c->listens[0].bind, "127.0.0.1:8080");
    sin = (const void *)&c->listens[0].addr;
    assert_int_equal(sin->sin_family, AF_INET);
    assert_int_equal(ntohs(sin->sin_port), 8080);
    assert_int_equal(ntohl(sin->sin_addr.s_addr), INADDR_LOOPBACK);
    assert_int_equal(c->listens[0].addr_len, sizeof(struct sockaddr_in));
    assert_int_equal(c->listens[0].pool, 1);
    assert_int_equal(c->listens[0].backlog, 128);
    assert_int_equal(c->listens[0].max_header_size, 8192);
    assert_int_equal(c->listens[0].max_headers, 50);
    assert_int_equal(c->listens[0].max_body_size, 1 << 20);
    assert_int_equal(c->listens[0].client_header_timeout_ms, 3000);
    assert_int_equal(c->listens[0].client_body_timeout_ms, 120000);
    assert_int_equal(c->listens[0].client_body_total_timeout_ms, 90000);
    assert_int_equal(c->listens[0].keepalive_timeout_ms, 3600000);
    assert_int_equal(c->listens[0].file_line, 9);
    /* Defaults, and the first pool when pool is left out. */
    sin = (const void *)&c->listens[1].addr;
    assert_int_equal(sin->sin_addr.s_addr, htonl(INADDR_ANY));
    assert_int_equal(ntohs(sin->sin_port), 8081);
    assert_int_equal(c->listens[1].pool, 0);
    assert_int_equal(c->listens[1].backlog, 511);
    assert_int_equal(c->listens[1].max_header_size, 16384);
    assert_int_equal(c->listens[1].max_headers, 100);
    assert_int_equal(c->listens[1].max_body_size, 8 << 20);
    assert_int_equal(c->listens[1].client_header_timeout_ms, 10000);
    assert_int_equal(c->listens[1].client_body_timeout_ms, 30000);
    assert_int_equal(c->listens[1].client_body_total_timeout_ms, 60000);
    assert_int_equal(c->listens[1].keepalive_timeout_ms, 75000);
    sin6 = (const void *)&c->listens[2].addr;
    assert_int_equal(sin6->sin6_family, AF_INET6);
    assert_int_equal(ntohs(sin6->sin6_port), 8082);
    assert_true(IN6_IS_ADDR_LOOPBACK(&sin6->sin6_addr));

    assert_int_equal(c->n_pools, 2);
    assert_int_equal(conf_pool_find(c, "first"), 0);
    assert_int_equal(conf_pool_find(c, "second"), 1);
    assert_int_equal(conf_pool_find(c, "third"), -1);
    assert_int_equal(c->pools[0].balance, BALANCE_ROUNDROBIN);
    assert_int_equal(c->pools[0].check, 0);
    assert_int_equal(c->pools[0].check_method_head, 1);
    assert_string_equal(c->pools[0].check_path, "/health");
    assert_int_equal(c->pools[0].n_check_expect, 3);
    assert_int_equal(c->pools[0].check_expect[0], 200);
    assert_int_equal(c->pools[0].check_expect[1], 204);
    assert_int_equal(c->pools[0].check_expect[2], 301);
    assert_int_equal(c->pools[0].check_interval_ms, 250);
    assert_int_equal(c->pools[0].check_timeout_ms, 100);
    assert_int_equal(c->pools[0].rise, 5);
    assert_int_equal(c->pools[0].fall, 7);
    assert_int_equal(c->pools[0].connect_timeout_ms, 1000);
    assert_int_equal(c->pools[0].first_byte_timeout_ms, 30000);
    assert_int_equal(c->pools[0].idle_timeout_ms, 45000);
    assert_int_equal(c->pools[0].pool_idle_timeout_ms, 10000);
    /* Pool defaults. */
    assert_int_equal(c->pools[1].check, 1);
    assert_int_equal(c->pools[1].check_method_head, 0);
    assert_string_equal(c->pools[1].check_path, "");
    assert_int_equal(c->pools[1].n_check_expect, 1);
    assert_int_equal(c->pools[1].check_expect[0], 200);
    assert_int_equal(c->pools[1].check_interval_ms, 5000);
    assert_int_equal(c->pools[1].check_timeout_ms, 2000);
    assert_int_equal(c->pools[1].rise, 2);
    assert_int_equal(c->pools[1].fall, 3);
    assert_int_equal(c->pools[1].connect_timeout_ms, 5000);
    assert_int_equal(c->pools[1].first_byte_timeout_ms, 120000);
    assert_int_equal(c->pools[1].idle_timeout_ms, 120000);
    assert_int_equal(c->pools[1].pool_idle_timeout_ms, 60000);

    /* Backends grouped by pool, file order kept inside each pool: first = b2 b4, second = b1 b3. */
    assert_int_equal(c->n_backends, 4);
    assert_int_equal(c->pools[0].first_backend, 0);
    assert_int_equal(c->pools[0].n_backends, 2);
    assert_int_equal(c->pools[1].first_backend, 2);
    assert_int_equal(c->pools[1].n_backends, 2);
    assert_string_equal(c->backends[0].name, "b2");
    assert_string_equal(c->backends[1].name, "b4");
    assert_string_equal(c->backends[2].name, "b1");
    assert_string_equal(c->backends[3].name, "b3");
    assert_int_equal(conf_backend_find(c, "b1"), 2);
    assert_int_equal(conf_backend_find(c, "nope"), -1);
    for (int i = 0; i < 4; i++)
        assert_int_equal(c->backends[i].pool, i < 2 ? 0 : 1);

    /* b1: https, prefix without trailing '/', env key, relative ca_file. */
    assert_int_equal(c->backends[2].url.tls, 1);
    assert_string_equal(c->backends[2].url.host, "api.example.com");
    assert_int_equal(c->backends[2].url.port, 443);
    assert_string_equal(c->backends[2].url.prefix, "/openai/v1");
    assert_string_equal(c->backends[2].api_key, "sk-from-env");
    assert_int_equal(c->backends[2].tls_verify, 0);
    assert_non_null(c->backends[2].ca_file);
    assert_non_null(strstr(c->backends[2].ca_file, dir));
    assert_int_equal(c->backends[2].file_line, 38);
    assert_int_equal(c->backends[2].weight, 1);
    assert_int_equal(c->backends[2].keepalive, 32);
    /* b2: file key with its newline stripped, keepalive = no. */
    assert_string_equal(c->backends[0].api_key, "sk-from-file");
    assert_int_equal(c->backends[0].weight, 0);
    assert_int_equal(c->backends[0].keepalive, 0);
    assert_int_equal(c->backends[0].url.port, 9101);
    assert_string_equal(c->backends[0].url.prefix, "");
    assert_int_equal(c->backends[0].tls_verify, 1);
    assert_null(c->backends[0].ca_file);
    /* b3 and b4. */
    assert_string_equal(c->backends[3].api_key, "sk-literal");
    assert_int_equal(c->backends[3].weight, 256);
    assert_int_equal(c->backends[3].keepalive, 5);
    assert_string_equal(c->backends[3].url.host, "::1");
    assert_null(c->backends[1].api_key);
    assert_int_equal(c->backends[1].keepalive, 32);
    conf_free(c);
}

static void test_minimal_defaults(void **state)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    struct conf *c = load_ok(BASE);

    assert_int_equal(c->global.workers, cpus > 64 ? 64 : cpus);
    assert_string_equal(c->global.admin_socket, "aigw.sock");
    assert_int_equal(c->global.log_level, LOG_LVL_INFO);
    assert_int_equal(c->global.hard_stop_after_ms, 30000);
    assert_int_equal(c->listens[0].pool, 0);
    assert_int_equal(c->backends[0].pool, 0); /* the only pool */
    assert_int_equal(c->backends[0].weight, 1);
    assert_int_equal(c->pools[0].first_backend, 0);
    assert_int_equal(c->pools[0].n_backends, 1);
    conf_free(c);
}

/* [global] access_log: off by default; stderr; a path relative to the config's directory;
 * access_log_buffer bounds. */
static void test_access_log(void **state)
{
    struct conf *c;

    (void)state;
    c = load_ok(BASE);
    assert_int_equal(c->global.access_log, 0);
    assert_int_equal(c->global.access_log_buffer, 65536);
    conf_free(c);
    c = load_ok("[global]\naccess_log = stderr\naccess_log_buffer = 8k\n" BASE);
    assert_int_equal(c->global.access_log, 2);
    assert_int_equal(c->global.access_log_buffer, 8192);
    conf_free(c);
    c = load_ok("[global]\naccess_log = logs/access.log\n" BASE);
    assert_int_equal(c->global.access_log, 1);
    assert_true(c->global.access_log_path[0] == '/');
    assert_string_equal(c->global.access_log_path + strlen(c->global.access_log_path) - 16,
                        "/logs/access.log");
    conf_free(c);
    c = load_ok("[global]\naccess_log = off\n" BASE);
    assert_int_equal(c->global.access_log, 0);
    conf_free(c);
    load_bad("[global]\naccess_log =\n" BASE, 2, "access_log", NULL);
    load_bad("[global]\naccess_log_buffer = 100\n" BASE, 2, "access_log_buffer", NULL);
}

static void test_err_unknown_key(void **state)
{
    load_bad(BASE "wieght = 3\n", 6, "[backend a] key 'wieght': unknown key", "weight", NULL);
    load_bad("[global]\nworkers = 2\nthreads = 4\n" BASE, 3, "[global] key 'threads'", NULL);
}

static void test_err_unknown_section(void **state)
{
    load_bad(BASE "\n[frontend x]\n", 7, "unknown section [frontend x]", "[backend NAME]", NULL);
    load_bad(BASE "[global foo]\n", 6, "[global]", "no name", NULL);
    load_bad(BASE "[backend]\n", 6, "invalid name", NULL);
    load_bad(BASE "[backend a b]\n", 6, "invalid name 'a b'", NULL);
    load_bad(BASE "[backend x\n", 6, "']'", NULL);
}

static void test_err_bad_values(void **state)
{
    load_bad(BASE "[pool q]\ncheck_interval = 5x\n", 7, "[pool q] key 'check_interval': '5x'",
             "not a duration", NULL);
    load_bad(BASE "[pool q]\ncheck_timeout = -1s\n", 7, "key 'check_timeout': '-1s'", NULL);
    load_bad(BASE "weight = 300\n", 6, "[backend a] key 'weight': '300' is out of range 0..256",
             NULL);
    load_bad(BASE "weight = many\n", 6, "key 'weight': 'many' is not a number", NULL);
    load_bad(BASE "tls_verify = maybe\n", 6, "key 'tls_verify': 'maybe'", NULL);
    load_bad(BASE "url2 = x\n", 6, "key 'url2'", NULL);
    load_bad("[global]\nworkers = 65\n" BASE, 2, "key 'workers': '65' is out of range 1..64", NULL);
    load_bad("[global]\nworkers = 0\n" BASE, 2, "key 'workers'", NULL);
    load_bad("[listen l]\nbind = 127.0.0.1:1\nclient_body_total_timeout = 0\n" BASE, 3,
             "[listen l] key 'client_body_total_timeout': '0'", NULL);
    load_bad("[global]\nlog_level = loud\n" BASE, 2, "key 'log_level'", "debug", NULL);
    load_bad(BASE "[pool q]\nbalance = fastest\n", 7, "key 'balance': unknown algorithm 'fastest'",
             "roundrobin", NULL);
    load_bad(BASE "[pool q]\ncheck_method = POST\n", 7, "key 'check_method'", "GET or HEAD", NULL);
    load_bad(BASE "[pool q]\ncheck_expect = 200,99\n", 7, "key 'check_expect': '99'", NULL);
    load_bad(BASE "[pool q]\ncheck_expect = 200,201,202,203,204,205,206,207,208\n", 7,
             "key 'check_expect'", "more than 8", NULL);
    load_bad(BASE "[pool q]\ncheck_path = health\n", 7, "key 'check_path'", NULL);
    load_bad("[listen main]\nbind = localhost:8080\n[pool p]\n", 2, "key 'bind'", "numeric", NULL);
    load_bad("[listen main]\nbind = 127.0.0.1:0\n[pool p]\n", 2, "key 'bind'", "port", NULL);
    load_bad("[listen main]\nbind = 127.0.0.1\n[pool p]\n", 2, "key 'bind'", NULL);
    load_bad("[listen main]\nmax_header_size = 16q\n", 2, "key 'max_header_size': '16q'",
             "not a size", NULL);
    load_bad(BASE "url = ftp://x\n", 6, "key 'url'", NULL);
    load_bad(BASE "[backend b]\nurl = http://h/v1?x=1\n", 7, "[backend b] key 'url'", "query",
             NULL);
}

static void test_err_missing_url(void **state)
{
    /* Reported at the section's line, also for a section with no keys at all. */
    load_bad(BASE "[backend b]\nweight = 2\n[backend c]\nurl = http://h\n", 6,
             "[backend b] key 'url': missing", NULL);
    load_bad(BASE "[backend b]\n", 6, "[backend b] key 'url': missing", NULL);
    load_bad("[listen main]\npool = p\n[pool p]\n", 1, "[listen main] key 'bind': missing", NULL);
}

static void test_err_unknown_pool(void **state)
{
    load_bad(BASE "[backend b]\nurl = http://h\n\npool = nope\n", 9,
             "[backend b] key 'pool': unknown pool 'nope'", "p", NULL);
    load_bad("[listen main]\nbind = 127.0.0.1:8080\npool = zz\n[pool p]\n[backend a]\n"
             "url = http://h\n",
             3, "[listen main] key 'pool': unknown pool 'zz'", NULL);
    /* Several pools: a backend must say which. */
    load_bad(BASE "[pool q]\n[backend b]\npool = q\nurl = http://h\n", 4,
             "[backend a] key 'pool': missing", NULL);
    /* A pool nobody uses. */
    load_bad(BASE "pool = p\n[pool q]\n", 7, "[pool q]", "no backend", NULL);
}

static void test_err_env_unset(void **state)
{
    unsetenv("AIGW_TEST_UNSET_VAR");
    load_bad(BASE "api_key = env:AIGW_TEST_UNSET_VAR\n", 6,
             "[backend a] key 'api_key': environment variable AIGW_TEST_UNSET_VAR is not set",
             NULL);
    setenv("AIGW_TEST_EMPTY_VAR", "", 1);
    load_bad(BASE "api_key = env:AIGW_TEST_EMPTY_VAR\n", 6, "AIGW_TEST_EMPTY_VAR is empty", NULL);
}

static void test_err_file_missing(void **state)
{
    char want[256];

    snprintf(want, sizeof(want), "cannot read %s/no-such-key.txt: No such file or directory", dir);
    load_bad(BASE "api_key = file:no-such-key.txt\n", 6, "[backend a] key 'api_key'", want, NULL);
    load_bad(BASE "ca_file = /nonexistent/ca.pem\n", 6, "key 'ca_file'", "No such file", NULL);
}

static void test_err_secret_not_printed(void **state)
{
    struct conf *c = NULL;
    char *err = NULL;

    write_file(ini_path, BASE "api_key = sk-top secret\n");
    assert_int_equal(conf_load(ini_path, &c, &err), -EINVAL);
    assert_non_null(strstr(err, "key 'api_key'"));
    assert_null(strstr(err, "sk-top"));
    assert_null(strstr(err, "secret"));
    free(err);
    /* A URL with a password in it is not echoed either. */
    write_file(ini_path, BASE "[backend b]\nurl = http://u:hunter2@h/v1\n");
    assert_int_equal(conf_load(ini_path, &c, &err), -EINVAL);
    assert_non_null(strstr(err, ":7: [backend b] key 'url'"));
    assert_null(strstr(err, "hunter2"));
    free(err);
}

static void test_err_duplicates(void **state)
{
    load_bad(BASE "[backend a]\nurl = http://h\n", 6,
             "[backend a]: duplicate backend name (first defined at line 4)", NULL);
    load_bad(BASE "[pool p]\n", 6, "[pool p]: duplicate pool name", NULL);
    load_bad("[global]\n[global]\n" BASE, 2, "[global]", "twice", NULL);
    load_bad(BASE "url = http://h2\n", 6, "key 'url': set twice (first at line 5)", NULL);
    load_bad(BASE "[listen b]\n\nbind = *:8080\n", 8, "[listen b] key 'bind'", "[listen main]",
             NULL);
    load_bad(BASE "[listen b]\nbind = 127.0.0.1:8080\n", 7, "[listen b] key 'bind'", NULL);
}

/* [cluster]: defaults, both address forms, the password from env:, FILE:LINE errors. */
static void test_cluster_section(void **state)
{
    struct conf *c = load_ok(BASE);

    assert_int_equal(c->cluster.enabled, 0); /* no section: no cluster */
    conf_free(c);

    c = load_ok(BASE "[cluster]\nredis = redis://127.0.0.1:6390/3\n");
    assert_int_equal(c->cluster.enabled, 1);
    assert_int_equal(c->cluster.redis_unix, 0);
    assert_string_equal(c->cluster.redis_host, "127.0.0.1");
    assert_int_equal(c->cluster.redis_port, 6390);
    assert_int_equal(c->cluster.redis_db, 3);
    assert_null(c->cluster.redis_password);
    assert_int_equal(c->cluster.sync_interval_ms, 1000);
    assert_int_equal(c->cluster.lease_ttl_ms, 10000);
    assert_int_equal(c->cluster.fallback, CLUSTER_FALLBACK_LOCAL_SHARE);
    assert_string_equal(c->cluster.key_prefix, "aigw:");
    assert_true(c->cluster.node_name[0] != '\0'); /* the host name */
    conf_free(c);

    setenv("AIGW_TEST_REDIS_PW", "s3cret", 1);
    c = load_ok(BASE "[cluster]\nredis = redis://[::1]\nredis_password = env:AIGW_TEST_REDIS_PW\n"
                     "node_name = host-a\nsync_interval = 200ms\nlease_ttl = 5s\n"
                     "cluster_fallback = closed\nkey_prefix = fleet1:\n");
    assert_string_equal(c->cluster.redis_host, "::1");
    assert_int_equal(c->cluster.redis_port, 6379);
    assert_int_equal(c->cluster.redis_db, 0);
    assert_string_equal(c->cluster.redis_password, "s3cret");
    assert_string_equal(c->cluster.node_name, "host-a");
    assert_int_equal(c->cluster.sync_interval_ms, 200);
    assert_int_equal(c->cluster.lease_ttl_ms, 5000);
    assert_int_equal(c->cluster.fallback, CLUSTER_FALLBACK_CLOSED);
    assert_string_equal(c->cluster.key_prefix, "fleet1:");
    conf_free(c);

    c = load_ok(BASE "[cluster]\nredis = unix:/run/redis.sock?db=2\ncluster_fallback = open\n");
    assert_int_equal(c->cluster.redis_unix, 1);
    assert_string_equal(c->cluster.redis_host, "/run/redis.sock");
    assert_int_equal(c->cluster.redis_db, 2);
    assert_int_equal(c->cluster.fallback, CLUSTER_FALLBACK_OPEN);
    conf_free(c);

    load_bad(BASE "[cluster]\n", 6, "[cluster] key 'redis': missing", NULL);
    load_bad(BASE "[cluster c]\nredis = redis://h\n", 6, "[cluster]: takes no name", NULL);
    load_bad(BASE "[cluster]\nredis = redis://h\n[cluster]\n", 8, "appears twice (first at line 6)",
             NULL);
    load_bad(BASE "[cluster]\nredis = http://h:6379\n", 7, "[cluster] key 'redis'",
             "redis://HOST:PORT", NULL);
    load_bad(BASE "[cluster]\nredis = redis://h:70000\n", 7, "key 'redis'", "1..65535", NULL);
    load_bad(BASE "[cluster]\nredis = redis://h:6379/x\n", 7, "key 'redis'", "database 'x'", NULL);
    load_bad(BASE "[cluster]\nredis = unix:\n", 7, "key 'redis'", "names no socket", NULL);
    load_bad(BASE "[cluster]\nredis = unix:/s?dbx=1\n", 7, "key 'redis'", "?db=N", NULL);
    load_bad(BASE "[cluster]\nredis = redis://h\nsync_interval = 10ms\n", 8, "key 'sync_interval'",
             "out of range 50ms..1m", NULL);
    load_bad(BASE "[cluster]\nredis = redis://h\nsync_interval = 2s\nlease_ttl = 3s\n", 9,
             "key 'lease_ttl'", "at least twice sync_interval", NULL);
    load_bad(BASE "[cluster]\nredis = redis://h\ncluster_fallback = maybe\n", 8,
             "key 'cluster_fallback'", "local_share, open or closed", NULL);
    load_bad(BASE "[cluster]\nredis = redis://h\nnode_name = a b\n", 8, "key 'node_name'",
             "invalid name", NULL);
    load_bad(BASE "[cluster]\nredis = redis://h\nkey_prefix = \n", 8, "key 'key_prefix'", NULL);
    load_bad(BASE "[cluster]\nredis = redis://h\nttl = 1s\n", 8, "key 'ttl': unknown key",
             "lease_ttl", NULL);
    unsetenv("AIGW_TEST_UNSET_VAR");
    load_bad(BASE "[cluster]\nredis = redis://h\nredis_password = env:AIGW_TEST_UNSET_VAR\n", 8,
             "key 'redis_password'", "AIGW_TEST_UNSET_VAR is not set",
             "expected the Redis password in it", NULL);
}

/* conf_secret's messages name the secret they read: not "the API key" for a Redis password. */
static void test_secret_messages_name_the_secret(void **state)
{
    char path[300], text[600];

    snprintf(path, sizeof(path), "%s.pw", ini_path);
    write_file(path, "\n");
    snprintf(text, sizeof(text), BASE "[cluster]\nredis = redis://h\nredis_password = file:%s\n",
             path);
    load_bad(text, 8, "key 'redis_password'", "is empty (expected the Redis password on one line)",
             NULL);
    write_file(path, "two words\n");
    load_bad(text, 8, "the Redis password contains a space", NULL);
    setenv("AIGW_TEST_EMPTY_VAR", "", 1);
    load_bad(BASE "[cluster]\nredis = redis://h\nredis_password = env:AIGW_TEST_EMPTY_VAR\n", 8,
             "AIGW_TEST_EMPTY_VAR is empty (expected the Redis password in it)", NULL);
    unsetenv("AIGW_TEST_EMPTY_VAR");
    /* a backend's api_key: the API key */
    write_file(path, "\n");
    snprintf(text, sizeof(text),
             "[listen l]\nbind = 127.0.0.1:1\n[pool p]\n[backend b]\npool = p\n"
             "url = http://127.0.0.1:2\napi_key = file:%s\n",
             path);
    load_bad(text, 7, "key 'api_key'", "expected the API key on one line", NULL);
    unlink(path);
    (void)state;
}

/* A password is never taken from the file itself, nor echoed from the address. */
static void test_cluster_secret_not_printed(void **state)
{
    struct conf *c = NULL;
    char *err = NULL;

    load_bad(BASE "[cluster]\nredis = redis://h\nredis_password = hunter2\n", 8,
             "key 'redis_password'", "env:VAR or file:PATH", NULL);
    write_file(ini_path, BASE "[cluster]\nredis = redis://u:hunter2@h:6379\n");
    assert_int_equal(conf_load(ini_path, &c, &err), -EINVAL);
    assert_non_null(strstr(err, ":7: [cluster] key 'redis'"));
    assert_null(strstr(err, "hunter2"));
    free(err);
    /* aigwctl -c reads no secret */
    unsetenv("AIGW_TEST_UNSET_VAR");
    write_file(ini_path, BASE "[cluster]\nredis = redis://h\n"
                              "redis_password = env:AIGW_TEST_UNSET_VAR\n");
    assert_int_equal(conf_load_flags(ini_path, CONF_LOAD_NO_SECRETS, &c, &err), 0);
    assert_null(c->cluster.redis_password);
    conf_free(c);
}

/* [stats]: no name, at most once, bind required and numeric, not on a [listen]'s address. */
static void test_stats_section(void **state)
{
    struct conf *c = load_ok(BASE "[stats]\nbind = 127.0.0.1:8404\n");
    const struct sockaddr_in *sin = (const void *)&c->stats.addr;

    assert_int_equal(c->stats.enabled, 1);
    assert_int_equal(ntohs(sin->sin_port), 8404);
    assert_string_equal(c->stats.bind, "127.0.0.1:8404");
    conf_free(c);
    c = load_ok(BASE);
    assert_int_equal(c->stats.enabled, 0);
    conf_free(c);

    load_bad(BASE "[stats s]\nbind = 127.0.0.1:8404\n", 6, "[stats]: takes no name", NULL);
    load_bad(BASE "[stats]\nbind = 127.0.0.1:8404\n[stats]\n", 8, "[stats]: appears twice",
             "line 6", NULL);
    load_bad(BASE "[stats]\n", 6, "[stats] key 'bind': missing", NULL);
    load_bad(BASE "[stats]\nbind = localhost:8404\n", 7, "[stats] key 'bind'", "numeric", NULL);
    load_bad(BASE "[stats]\nport = 8404\n", 7, "[stats] key 'port': unknown key", NULL);
    load_bad(BASE "[stats]\nbind = *:8080\n", 7, "[stats] key 'bind'", "[listen main]", NULL);
}

static void test_err_structure(void **state)
{
    load_bad("x = 1\n" BASE, 1, "key 'x': outside any section", NULL);
    load_bad(BASE "this is not ini\n", 6, "syntax error", NULL);
    load_bad("[pool p]\n[backend a]\nurl = http://h\n", 0, "no [listen NAME]", NULL);
    load_bad("[listen main]\nbind = 127.0.0.1:1\n", 0, "no [pool NAME]", NULL);
    load_bad("[listen main]\nbind = 127.0.0.1:1\n[pool p]\n", 0, "no [backend NAME]", NULL);
}

/* This inih build treats an indented line as the continuation of the previous value, and its
 * line buffer is 200 bytes: the reader must neutralise the first and report the second. */
static void test_indent_and_long_lines(void **state)
{
    char text[1024];
    struct conf *c = load_ok(BASE "   weight = 7\n\t\tkeepalive = 3\n");

    assert_int_equal(c->backends[0].weight, 7);
    assert_int_equal(c->backends[0].keepalive, 3);
    assert_string_equal(c->backends[0].url.prefix, "/v1");
    conf_free(c);

    snprintf(text, sizeof(text), "%sapi_key = %0300d\n", BASE, 1);
    load_bad(text, 6, "longer than", NULL);
}

/* aigwctl -c reads the layout without the gateway's secrets. */
static void test_no_secrets_flag(void **state)
{
    struct conf *c = NULL;
    char *err = NULL;

    unsetenv("AIGW_TEST_UNSET_VAR");
    write_file(ini_path, BASE "api_key = env:AIGW_TEST_UNSET_VAR\n[backend b]\nurl = http://h\n"
                              "api_key = file:no-such-file\n");
    assert_int_equal(conf_load_flags(ini_path, CONF_LOAD_NO_SECRETS, &c, &err), 0);
    assert_null(err);
    assert_int_equal(c->n_backends, 2);
    assert_null(c->backends[0].api_key);
    assert_null(c->backends[1].api_key);
    conf_free(c);
    assert_int_equal(conf_load_flags(ini_path, 0, &c, &err), -EINVAL);
    assert_non_null(strstr(err, ":6: [backend a] key 'api_key'"));
    free(err);
}

/* A pool whose keys a test appends from line 4 on; BACKEND_A closes it. */
#define POOL_HEAD                                                                                  \
    "[listen main]\n"                                                                              \
    "bind = 127.0.0.1:8080\n"                                                                      \
    "[pool p]\n"
#define BACKEND_A                                                                                  \
    "[backend a]\n"                                                                                \
    "url = http://127.0.0.1:9101/v1\n"

static void test_resilience_defaults(void **state)
{
    struct conf *c = load_ok(BASE);
    const struct conf_pool *pl = &c->pools[0];
    const struct conf_backend *b = &c->backends[0];

    assert_int_equal(pl->hash_src, HASH_NONE);
    assert_string_equal(pl->hash_name, "");
    assert_int_equal(pl->hash_load_pct, 125);
    assert_int_equal(pl->check_fastinter_ms, 5000); /* = check_interval */
    assert_int_equal(pl->check_downinter_ms, 5000);
    assert_int_equal(pl->check_jitter_pct, 10);
    assert_int_equal(pl->degraded_latency_ms, 0);
    assert_int_equal(pl->degraded_error_pct, 0);
    assert_int_equal(pl->degraded_weight_pct, 50);
    assert_int_equal(pl->slowstart_ms, 0);
    assert_int_equal(pl->max_fails, 3);
    assert_int_equal(pl->fail_timeout_ms, 10000);
    assert_int_equal(pl->fail_on, COND_CONNECT | COND_TLS | COND_TIMEOUT | COND_RESET | COND_5XX);
    assert_int_equal(pl->n_fail_on_status, 0);
    assert_int_equal(pl->breaker_failures, 5);
    assert_int_equal(pl->breaker_open_for_ms, 5000);
    assert_int_equal(pl->breaker_open_max_ms, 60000);
    assert_int_equal(pl->breaker_half_open_calls, 1);
    assert_int_equal(pl->breaker_successes, 2);
    assert_int_equal(pl->retries, 1);
    assert_int_equal(pl->retry_on, COND_CONNECT | COND_TLS | COND_STALE | COND_TIMEOUT |
                                       COND_RESET | COND_5XX | COND_429);
    assert_int_equal(pl->n_retry_on_status, 0);
    assert_int_equal(pl->retry_backoff_base_ms, 25);
    assert_int_equal(pl->retry_backoff_max_ms, 1000);
    assert_int_equal(pl->retry_backoff_mult_x100, 200);
    assert_int_equal(pl->retry_budget_pct, 20);
    assert_int_equal(pl->retry_budget_min, 10);
    assert_int_equal(pl->try_timeout_ms, 0);
    assert_int_equal(pl->request_timeout_ms, 0);
    assert_int_equal(pl->idle_timeout_ms, 120000);
    assert_int_equal(pl->expose_headers, 1);

    assert_int_equal(b->backup, 0);
    assert_int_equal(b->max_conns, 0);
    assert_int_equal(b->slowstart_ms, 0);
    assert_int_equal(b->max_fails, 3);
    assert_int_equal(b->fail_timeout_ms, 10000);
    assert_true(b->name_hash == balancer_hash("a", 1));
    conf_free(c);
}

static void test_resilience_valid(void **state)
{
    struct conf *c = load_ok(POOL_HEAD "balance = hash\n"
                                       "hash_key = header:X-Session-Id\n"
                                       "hash_balance_factor = 1.5\n"
                                       "check_interval = 3s\n"
                                       "check_fastinter = 500ms\n"
                                       "check_jitter = 0%\n"
                                       "degraded_latency = 800ms\n"
                                       "degraded_error_ratio = 0.25\n"
                                       "degraded_weight_pct = 30%\n"
                                       "slowstart = 30s\n"
                                       "max_fails = 32\n"
                                       "fail_timeout = 1m\n"
                                       "fail_on = timeout, 5xx 404,404 418\n"
                                       "breaker_failures = 0\n"
                                       "breaker_open_for = 2s\n"
                                       "breaker_open_max = 2s\n"
                                       "breaker_half_open_calls = 1000\n"
                                       "breaker_successes = 7\n"
                                       "retries = 10\n"
                                       "retry_on = TLS,429 503\n"
                                       "retry_backoff = 10ms .. 2s x1.25\n"
                                       "retry_budget = 0\n"
                                       "retry_budget_min = 10000\n"
                                       "try_timeout = 15s\n"
                                       "request_timeout = 1m\n"
                                       "stream_idle_timeout = 5m\n"
                                       "expose_headers = no\n"
                                       "[pool q]\n"
                                       "balance = hash\n"
                                       "hash_key = json:prompt_cache_key\n"
                                       "hash_balance_factor = 101%\n"
                                       "check_downinter = 10s\n"
                                       "check_jitter = 50\n"
                                       "degraded_error_ratio = 100%\n"
                                       "degraded_weight_pct = 1\n"
                                       "retry_budget = 1.0\n"
                                       "retry_on = 5xx stale-conn\n"
                                       "retry_backoff = 0ms..0ms x1\n"
                                       "[pool r]\n"
                                       "balance = hash\n" BACKEND_A "pool = p\n"
                                       "[backend b]\n"
                                       "pool = q\n"
                                       "url = http://h\n"
                                       "backup = yes\n"
                                       "max_conns = 1000000\n"
                                       "[backend c]\n"
                                       "pool = q\n"
                                       "url = http://h\n"
                                       "[backend d]\n"
                                       "pool = r\n"
                                       "url = http://h\n");
    const struct conf_pool *p = &c->pools[0], *q = &c->pools[1], *r = &c->pools[2];

    assert_int_equal(p->hash_src, HASH_HEADER);
    assert_string_equal(p->hash_name, "X-Session-Id");
    assert_int_equal(p->hash_load_pct, 150);
    assert_int_equal(p->check_fastinter_ms, 500);
    assert_int_equal(p->check_downinter_ms, 3000); /* follows check_interval */
    assert_int_equal(p->check_jitter_pct, 0);
    assert_int_equal(p->degraded_latency_ms, 800);
    assert_int_equal(p->degraded_error_pct, 25);
    assert_int_equal(p->degraded_weight_pct, 30);
    assert_int_equal(p->slowstart_ms, 30000);
    assert_int_equal(p->max_fails, 32);
    assert_int_equal(p->fail_timeout_ms, 60000);
    /* A given list replaces the default; statuses once each. */
    assert_int_equal(p->fail_on, COND_TIMEOUT | COND_5XX);
    assert_int_equal(p->n_fail_on_status, 2);
    assert_int_equal(p->fail_on_status[0], 404);
    assert_int_equal(p->fail_on_status[1], 418);
    assert_int_equal(p->breaker_failures, 0);
    assert_int_equal(p->breaker_open_for_ms, 2000);
    assert_int_equal(p->breaker_open_max_ms, 2000);
    assert_int_equal(p->breaker_half_open_calls, 1000);
    assert_int_equal(p->breaker_successes, 7);
    assert_int_equal(p->retries, 10);
    /* 429 written as a status is the 429 condition, not a status. */
    assert_int_equal(p->retry_on, COND_TLS | COND_429);
    assert_int_equal(p->n_retry_on_status, 1);
    assert_int_equal(p->retry_on_status[0], 503);
    assert_int_equal(p->retry_backoff_base_ms, 10);
    assert_int_equal(p->retry_backoff_max_ms, 2000);
    assert_int_equal(p->retry_backoff_mult_x100, 125);
    assert_int_equal(p->retry_budget_pct, 0);
    assert_int_equal(p->retry_budget_min, 10000);
    assert_int_equal(p->try_timeout_ms, 15000);
    assert_int_equal(p->request_timeout_ms, 60000);
    assert_int_equal(p->idle_timeout_ms, 300000);
    assert_int_equal(p->expose_headers, 0);

    assert_int_equal(q->hash_src, HASH_JSON);
    assert_string_equal(q->hash_name, "prompt_cache_key");
    assert_int_equal(q->hash_load_pct, 101);
    assert_int_equal(q->check_fastinter_ms, 5000);
    assert_int_equal(q->check_downinter_ms, 10000);
    assert_int_equal(q->check_jitter_pct, 50);
    assert_int_equal(q->degraded_error_pct, 100);
    assert_int_equal(q->degraded_weight_pct, 1);
    assert_int_equal(q->retry_budget_pct, 100);
    assert_int_equal(q->retry_on, COND_5XX | COND_STALE);
    assert_int_equal(q->n_retry_on_status, 0);
    assert_int_equal(q->retry_backoff_base_ms, 0);
    assert_int_equal(q->retry_backoff_max_ms, 0);
    assert_int_equal(q->retry_backoff_mult_x100, 100);
    /* balance = hash without a hash_key is fine: keyless requests go by weighted random. */
    assert_int_equal(r->balance, BALANCE_HASH);
    assert_int_equal(r->hash_src, HASH_NONE);

    /* q = b (backup) c (primary). */
    assert_int_equal(q->n_backends, 2);
    assert_string_equal(c->backends[q->first_backend].name, "b");
    assert_int_equal(c->backends[q->first_backend].backup, 1);
    assert_int_equal(c->backends[q->first_backend].max_conns, 1000000);
    assert_int_equal(c->backends[q->first_backend + 1].backup, 0);
    /* Every backend's ring identity is the hash of its name, wherever it was sorted to. */
    for (int i = 0; i < c->n_backends; i++)
        assert_true(c->backends[i].name_hash ==
                    balancer_hash(c->backends[i].name, strlen(c->backends[i].name)));
    assert_true(c->backends[0].name_hash != c->backends[1].name_hash);
    conf_free(c);
}

/* Per-backend slowstart / max_fails / fail_timeout: a backend that doesn't set one takes its own
 * pool's value, whether the pool comes before or after it in the file. */
static void test_backend_overrides(void **state)
{
    struct conf *c = load_ok("[listen main]\n"
                             "bind = 127.0.0.1:8080\n"
                             "[backend early]\n" /* before its pool */
                             "pool = late\n"
                             "url = http://h\n"
                             "[backend early_own]\n"
                             "pool = late\n"
                             "url = http://h\n"
                             "slowstart = 1s\n"
                             "max_fails = 0\n"
                             "fail_timeout = 2s\n"
                             "[pool first]\n"
                             "slowstart = 5s\n"
                             "max_fails = 7\n"
                             "fail_timeout = 20s\n"
                             "[pool late]\n"
                             "slowstart = 9s\n"
                             "max_fails = 11\n"
                             "fail_timeout = 33s\n"
                             "[backend after]\n"
                             "pool = first\n"
                             "url = http://h\n"
                             "[backend after_part]\n"
                             "pool = first\n"
                             "url = http://h\n"
                             "max_fails = 1\n");
    const struct conf_backend *b;

    b = &c->backends[conf_backend_find(c, "early")];
    assert_int_equal(b->slowstart_ms, 9000);
    assert_int_equal(b->max_fails, 11);
    assert_int_equal(b->fail_timeout_ms, 33000);
    b = &c->backends[conf_backend_find(c, "early_own")];
    assert_int_equal(b->slowstart_ms, 1000);
    assert_int_equal(b->max_fails, 0);
    assert_int_equal(b->fail_timeout_ms, 2000);
    b = &c->backends[conf_backend_find(c, "after")];
    assert_int_equal(b->slowstart_ms, 5000);
    assert_int_equal(b->max_fails, 7);
    assert_int_equal(b->fail_timeout_ms, 20000);
    b = &c->backends[conf_backend_find(c, "after_part")];
    assert_int_equal(b->slowstart_ms, 5000);
    assert_int_equal(b->max_fails, 1);
    assert_int_equal(b->fail_timeout_ms, 20000);
    conf_free(c);
}

static void test_err_resilience_values(void **state)
{
    /* Percentages: form and range, with the key's range in the message. */
    load_bad(POOL_HEAD "check_jitter = 51%\n", 4,
             "[pool p] key 'check_jitter': '51%' is out of range 0%..50%", NULL);
    load_bad(POOL_HEAD "check_jitter = ten\n", 4,
             "[pool p] key 'check_jitter': 'ten' is not a percentage", NULL);
    load_bad(POOL_HEAD "check_jitter = 10 %\n", 4, "key 'check_jitter'", "not a percentage", NULL);
    load_bad(POOL_HEAD "degraded_error_ratio = 1.01\n", 4,
             "key 'degraded_error_ratio': '1.01' is out of range 0%..100%", NULL);
    load_bad(POOL_HEAD "degraded_error_ratio = 0.255\n", 4, "key 'degraded_error_ratio'",
             "not a percentage", NULL);
    load_bad(POOL_HEAD "degraded_weight_pct = 0\n", 4,
             "key 'degraded_weight_pct': '0' is out of range 1%..100%", NULL);
    load_bad(POOL_HEAD "hash_balance_factor = 100\n", 4,
             "key 'hash_balance_factor': '100' is out of range 101%..1000%", NULL);
    load_bad(POOL_HEAD "retry_budget = 101%\n", 4, "key 'retry_budget'", "0%..100%", NULL);
    load_bad(POOL_HEAD "retry_budget = -5%\n", 4, "key 'retry_budget'", "not a percentage", NULL);
    /* Counts and durations. */
    load_bad(POOL_HEAD "max_fails = 33\n", 4,
             "[pool p] key 'max_fails': '33' is out of range 0..32", NULL);
    load_bad(POOL_HEAD "breaker_failures = 33\n", 4, "key 'breaker_failures'", "0..32", NULL);
    load_bad(POOL_HEAD "breaker_half_open_calls = 0\n", 4, "key 'breaker_half_open_calls'",
             "1..1000", NULL);
    load_bad(POOL_HEAD "breaker_successes = 1001\n", 4, "key 'breaker_successes'", "1..1000", NULL);
    load_bad(POOL_HEAD "retries = 11\n", 4, "key 'retries': '11' is out of range 0..10", NULL);
    load_bad(POOL_HEAD "retry_budget_min = 10001\n", 4, "key 'retry_budget_min'", "0..10000", NULL);
    load_bad(POOL_HEAD "fail_timeout = 0\n", 4, "key 'fail_timeout': '0' is out of range", NULL);
    load_bad(POOL_HEAD "check_fastinter = 5ms\n", 4, "key 'check_fastinter'", "10ms..168h", NULL);
    load_bad(POOL_HEAD "check_downinter = soon\n", 4, "key 'check_downinter'", "not a duration",
             NULL);
    load_bad(POOL_HEAD "slowstart = 1w\n", 4, "key 'slowstart'", "not a duration", NULL);
    load_bad(POOL_HEAD "degraded_latency = 1x\n", 4, "key 'degraded_latency'", NULL);
    load_bad(POOL_HEAD "try_timeout = -1\n", 4, "key 'try_timeout'", NULL);
    load_bad(POOL_HEAD "request_timeout = 8d\n", 4, "key 'request_timeout'", "0ms..168h", NULL);
    load_bad(POOL_HEAD "expose_headers = maybe\n", 4, "key 'expose_headers'", "not a boolean",
             NULL);
    load_bad(POOL_HEAD "check = yes\ncheck = no\n", 5, "key 'check': set twice", NULL);
    /* Backend keys. */
    load_bad(BASE "backup = sometimes\n", 6, "[backend a] key 'backup'", "not a boolean", NULL);
    load_bad(BASE "max_conns = 1000001\n", 6, "[backend a] key 'max_conns'", "0..1000000", NULL);
    load_bad(BASE "max_fails = 40\n", 6, "[backend a] key 'max_fails'", "0..32", NULL);
    load_bad(BASE "slowstart = x\n", 6, "[backend a] key 'slowstart'", NULL);
    load_bad(BASE "fail_timeout = 0ms\n", 6, "[backend a] key 'fail_timeout'", NULL);
}

static void test_err_conditions(void **state)
{
    load_bad(POOL_HEAD "\nfail_on = 5xx, 429\n", 5,
             "[pool p] key 'fail_on': 429 may not be listed: a 429 is never a failure", NULL);
    load_bad(POOL_HEAD "fail_on = connect-failure reboot\n", 4,
             "key 'fail_on': unknown condition 'reboot'", "connect-failure, tls", NULL);
    load_bad(POOL_HEAD "fail_on = 399\n", 4, "key 'fail_on': status '399' is out of range 400..599",
             NULL);
    load_bad(POOL_HEAD "fail_on = 600\n", 4, "key 'fail_on'", "400..599", NULL);
    load_bad(POOL_HEAD "fail_on = ,\n", 4, "key 'fail_on': empty value", NULL);
    load_bad(POOL_HEAD "fail_on = 400 401 402 403 404 405 406 407 408 409 410 411 412 413 414 415 "
                       "416\n",
             4, "key 'fail_on'", "more than 16", NULL);
    load_bad(POOL_HEAD "retry_on = timeout 5xx 200\n", 4, "key 'retry_on': status '200'",
             "400..599", NULL);
    load_bad(POOL_HEAD "retry_on = 4xx\n", 4, "key 'retry_on': unknown condition '4xx'", "429",
             NULL);
    /* The 429 rule only concerns fail_on. */
    struct conf *c = load_ok(POOL_HEAD "retry_on = 429\n" BACKEND_A);

    assert_int_equal(c->pools[0].retry_on, COND_429);
    conf_free(c);
}

static void test_err_backoff(void **state)
{
    load_bad(POOL_HEAD "retry_backoff = 1s..25ms x2\n", 4,
             "[pool p] key 'retry_backoff': '1s..25ms x2' is out of range", "BASE <= MAX", NULL);
    load_bad(POOL_HEAD "retry_backoff = 25ms..1s x0.5\n", 4, "key 'retry_backoff'", "out of range",
             NULL);
    load_bad(POOL_HEAD "retry_backoff = 25ms..1s\n", 4,
             "key 'retry_backoff': '25ms..1s' is not a back-off", "BASE..MAX xMULT", NULL);
    load_bad(POOL_HEAD "retry_backoff = 25ms-1s x2\n", 4, "key 'retry_backoff'", "not a back-off",
             NULL);
    load_bad(POOL_HEAD "retry_backoff = 25ms..1s x1.125\n", 4, "key 'retry_backoff'",
             "not a back-off", NULL);
}

static void test_err_breaker_open(void **state)
{
    /* Reported at breaker_open_max's line when it is set, whatever the order. */
    load_bad(POOL_HEAD "breaker_open_max = 10s\n\nbreaker_open_for = 30s\n" BACKEND_A, 4,
             "[pool p] key 'breaker_open_max': 10s is less than breaker_open_for = 30s", NULL);
    load_bad(POOL_HEAD "breaker_open_for = 2s\nbreaker_open_max = 1500ms\n", 5,
             "key 'breaker_open_max': 1500ms is less than breaker_open_for = 2s", NULL);
    /* Else at breaker_open_for's, against the default 60s. */
    load_bad(POOL_HEAD "retries = 2\nbreaker_open_for = 2m\n" BACKEND_A, 5,
             "[pool p] key 'breaker_open_for': 2m is more than breaker_open_max = 1m", NULL);
}

static void test_err_hash_key(void **state)
{
    load_bad(POOL_HEAD "hash_key = header:x-user\n" BACKEND_A, 4,
             "[pool p] key 'hash_key': hash_key needs balance = hash (balance is roundrobin)",
             NULL);
    load_bad(POOL_HEAD "hash_key = json:user\nbalance = least_conn\n", 4,
             "key 'hash_key': hash_key needs balance = hash (balance is least_conn)", NULL);
    load_bad(POOL_HEAD "balance = hash\nhash_key = cookie:sid\n", 5,
             "key 'hash_key': 'cookie:sid' is not a hash key", "header:NAME or json:FIELD", NULL);
    load_bad(POOL_HEAD "balance = hash\nhash_key = header:\n", 5, "key 'hash_key'",
             "invalid header name", NULL);
    load_bad(POOL_HEAD "balance = hash\nhash_key = header:x(y)\n", 5, "key 'hash_key'",
             "invalid header name", NULL);
    load_bad(POOL_HEAD "balance = hash\nhash_key = json:a b\n", 5, "key 'hash_key'",
             "invalid field name", NULL);
    load_bad(POOL_HEAD "balance = hash\nhash_key = json:\n", 5, "key 'hash_key'",
             "invalid field name", NULL);
    load_bad(POOL_HEAD "balance = hash\nhash_key = json:"
                       "a123456789012345678901234567890123456789012345678901234567890123\n",
             5, "key 'hash_key': name too long", NULL);
    /* balance may follow hash_key. */
    struct conf *c = load_ok(POOL_HEAD "hash_key = json:user\nbalance = hash\n" BACKEND_A);

    assert_int_equal(c->pools[0].hash_src, HASH_JSON);
    assert_string_equal(c->pools[0].hash_name, "user");
    conf_free(c);
}

static void test_err_all_backup(void **state)
{
    load_bad(POOL_HEAD BACKEND_A "backup = yes\n[backend b]\nurl = http://h\nbackup = on\n", 3,
             "[pool p]: has no primary backend", "backup = yes", NULL);
    /* Only the pool without a primary is reported. */
    load_bad(BASE "pool = p\n[pool q]\n[backend b]\npool = q\nurl = http://h\nbackup = yes\n", 7,
             "[pool q]: has no primary backend", NULL);
    struct conf *c = load_ok(POOL_HEAD BACKEND_A "backup = yes\n[backend b]\nurl = http://h\n");

    assert_int_equal(c->backends[0].backup, 1);
    assert_int_equal(c->backends[1].backup, 0);
    conf_free(c);
}

static void test_renamed_idle_timeout(void **state)
{
    load_bad(POOL_HEAD "idle_timeout = 10s\n", 4,
             "[pool p] key 'idle_timeout': unknown key (renamed to stream_idle_timeout)", NULL);
    load_bad(POOL_HEAD "stream_idle_timeout = 0\n", 4, "key 'stream_idle_timeout'", "out of range",
             NULL);
    /* The unknown-key message lists every pool key, the last one included. */
    load_bad(POOL_HEAD "retry_budgets = 5\n", 4, "key 'retry_budgets': unknown key",
             "stream_idle_timeout", "retry_backoff", "expose_headers", NULL);
}

static void test_util_percent(void **state)
{
    static const struct {
        const char *s;
        uint32_t pct;
    } ok[] = {
        {"25%", 25},  {"25", 25},   {"0", 0},     {"0%", 0},     {"100%", 100},
        {"0.25", 25}, {"0.5", 50},  {"1.0", 100}, {"1.25", 125}, {"0.05", 5},
        {"1", 1},     {"125", 125}, {"2.5", 250}, {"007", 7},    {"4294967295", 4294967295u},
    };
    static const char *const bad[] = {"",   "%",     "25%%", "25 %", " 25", "25.5%", ".25",
                                      "5.", "0.255", "-1",   "+1",   "1e2", "25pct", "0.2x"};
    uint32_t v;

    for (size_t i = 0; i < ARRAY_SIZE(ok); i++) {
        v = 12345;
        if (util_parse_percent(ok[i].s, &v) != 0)
            fail_msg("'%s' refused", ok[i].s);
        if (v != ok[i].pct)
            fail_msg("'%s' -> %u, expected %u", ok[i].s, v, ok[i].pct);
    }
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        v = 12345;
        if (util_parse_percent(bad[i], &v) != -EINVAL)
            fail_msg("'%s' accepted", bad[i]);
        assert_int_equal(v, 12345);
    }
    assert_int_equal(util_parse_percent("4294967296", &v), -ERANGE);
    assert_int_equal(util_parse_percent("42949672.96", &v), -ERANGE);
    assert_int_equal(util_parse_percent(NULL, &v), -EINVAL);
}

static void test_util_backoff(void **state)
{
    static const struct {
        const char *s;
        uint64_t base, max;
        uint32_t mult;
    } ok[] = {
        {"25ms..1s x2", 25, 1000, 200},      {"100ms .. 5s x1.5", 100, 5000, 150},
        {"1..2 X1.25", 1000, 2000, 125},     {"0ms..0ms x1", 0, 0, 100},
        {"1s..1s\tx1.0", 1000, 1000, 100},   {"25ms..1mx2", 25, 60000, 200},
        {"5ms..1h x100", 5, 3600000, 10000}, {"25ms..1s x2.05", 25, 1000, 205},
    };
    static const char *const bad[] = {"",
                                      "25ms..1s",
                                      "25ms 1s x2",
                                      "..1s x2",
                                      "25ms.. x2",
                                      "25ms..1s x",
                                      "25ms..1s 2",
                                      "25ms..1s x2 ",
                                      "25ms..1s x1.125",
                                      "25ms..1s x-2",
                                      "25ms..1s x.5",
                                      "25ms..1s..2s x2",
                                      "25q..1s x2",
                                      "25ms..1s y2"};
    uint64_t base, max;
    uint32_t mult;

    for (size_t i = 0; i < ARRAY_SIZE(ok); i++) {
        base = max = mult = 7;
        if (util_parse_backoff(ok[i].s, &base, &max, &mult) != 0)
            fail_msg("'%s' refused", ok[i].s);
        if (base != ok[i].base || max != ok[i].max || mult != ok[i].mult)
            fail_msg("'%s' -> %llu..%llu x%u", ok[i].s, (unsigned long long)base,
                     (unsigned long long)max, mult);
    }
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        base = max = mult = 7;
        if (util_parse_backoff(bad[i], &base, &max, &mult) != -EINVAL)
            fail_msg("'%s' not refused as malformed", bad[i]);
        assert_true(base == 7 && max == 7 && mult == 7);
    }
    /* Well formed but impossible. */
    assert_int_equal(util_parse_backoff("2s..1s x2", &base, &max, &mult), -ERANGE);
    assert_int_equal(util_parse_backoff("1s..2s x0.99", &base, &max, &mult), -ERANGE);
    assert_int_equal(util_parse_backoff("1s..2s x100.01", &base, &max, &mult), -ERANGE);
    assert_int_equal(util_parse_backoff(NULL, &base, &max, &mult), -EINVAL);
}

static void test_missing_file(void **state)
{
    struct conf *c = (void *)1;
    char *err = NULL;

    assert_int_equal(conf_load("/nonexistent/aigw.ini", &c, &err), -ENOENT);
    assert_null(c);
    assert_non_null(strstr(err, "/nonexistent/aigw.ini"));
    assert_non_null(strstr(err, "No such file"));
    free(err);
}

/* conf_load(path) in a child bounded in time (and memory, outside ASan): a loader that reads
 * /dev/zero or waits on a FIFO fails the test instead of hanging it. Returns the error
 * message (malloc'd) or NULL when the load succeeded. */
static char *load_bounded(const char *path)
{
    char buf[512];
    int fds[2];
    ssize_t n;
    size_t len = 0;
    int status;

    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct conf *c = NULL;
        char *err = NULL;
        close(fds[0]);
        alarm(10);
#ifndef __SANITIZE_ADDRESS__
        struct rlimit as = {1ull << 30, 1ull << 30};
        setrlimit(RLIMIT_AS, &as);
#endif
        int rc = conf_load(path, &c, &err);
        if (rc == 0)
            _exit(3);
        if (err && write(fds[1], err, strlen(err)) < 0)
            _exit(4);
        _exit(0);
    }
    close(fds[1]);
    while ((n = read(fds[0], buf + len, sizeof(buf) - 1 - len)) > 0)
        len += (size_t)n;
    close(fds[0]);
    buf[len] = '\0';
    assert_int_equal(waitpid(pid, &status, 0), pid);
    if (WIFSIGNALED(status))
        fail_msg("conf_load(%s) was killed by signal %d (hung or ran out of memory)", path,
                 WTERMSIG(status));
    if (WEXITSTATUS(status) == 3)
        return NULL;
    assert_int_equal(WEXITSTATUS(status), 0);
    return strdup(buf);
}

static void expect_refused(const char *path, const char *why)
{
    char want[256];
    char *err = load_bounded(path);

    if (!err)
        fail_msg("conf_load(%s) succeeded", path);
    snprintf(want, sizeof(want), "%s: ", path);
    if (strncmp(err, want, strlen(want)) != 0 || !strstr(err, why))
        fail_msg("message '%s' is not '%s...%s'", err, want, why);
    free(err);
}

/* Only a regular file of bounded size is read: /dev/zero, a FIFO nobody writes to, a directory
 * or a huge file give a clear "FILE: ..." error at once. */
static void test_err_not_a_config_file(void **state)
{
    char fifo[160], big[160];

    expect_refused("/dev/zero", "not a regular file");
    expect_refused("/dev/null", "not a regular file");
    expect_refused(dir, "is a directory");
    snprintf(fifo, sizeof(fifo), "%s/fifo", dir);
    assert_int_equal(mkfifo(fifo, 0600), 0);
    expect_refused(fifo, "not a regular file");
    unlink(fifo);
    /* a sparse file over the limit: refused by its size, before a byte is read */
    snprintf(big, sizeof(big), "%s/big.ini", dir);
    int fd = open(big, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, (off_t)(64u << 20)), 0);
    close(fd);
    expect_refused(big, "larger than 8 MB");
    unlink(big);
}

/* maxconn in [global] and [listen]: 0 (the default) and counts, bounded. */
static void test_maxconn(void **state)
{
    struct conf *c = load_ok(BASE);
    assert_int_equal(c->global.maxconn, 0);
    assert_int_equal(c->listens[0].maxconn, 0);
    conf_free(c);
    c = load_ok("[global]\nmaxconn = 20000\n[listen main]\nbind = 127.0.0.1:8080\n"
                "maxconn = 500\n[pool p]\n[backend a]\nurl = http://127.0.0.1:9101/v1\n");
    assert_int_equal(c->global.maxconn, 20000);
    assert_int_equal(c->listens[0].maxconn, 500);
    conf_free(c);
    load_bad(BASE "[global]\nmaxconn = -1\n", 7, "[global] key 'maxconn'", NULL);
    load_bad(BASE "[global]\nmaxconn = lots\n", 7, "[global] key 'maxconn'", "not a number", NULL);
    load_bad("[listen main]\nbind = 127.0.0.1:8080\nmaxconn = 1000000000\n[pool p]\n"
             "[backend a]\nurl = http://127.0.0.1:9101/v1\n",
             3, "[listen main] key 'maxconn'", "out of range", NULL);
}

/* [key], [model], pool models/paths, backend model_map, listen auth and the [global] AI keys. */
static void test_ai_sections(void **state)
{
    struct conf *c;
    static const unsigned char abc_sha[32] = {0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41,
                                              0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23, 0xb0, 0x03,
                                              0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff,
                                              0x61, 0xf2, 0x00, 0x15, 0xad}; /* SHA-256("abc") */

    (void)state;
    setenv("AIGW_TEST_CLIENT_KEY", "abc", 1);
    c = load_ok("[global]\nstate_file = state.txt\nstate_interval = 2s\ndefault_max_tokens = 1000\n"
                "[listen main]\nbind = 127.0.0.1:8080\n"
                "[pool gpt]\nmodels = gpt-4o*, gpt-4.1\npaths = /v1/audio/*\nrpm = 600\n"
                "[pool local]\nmodels = llama-*\n"
                "[backend a]\npool = gpt\nurl = http://127.0.0.1:9101/v1\n"
                "model_map = gpt-4o=gpt-4o-2024-08-06, gpt-4.1=gpt-4.1-x\n"
                "[backend b]\npool = local\nurl = http://127.0.0.1:9102/v1\n"
                "[key team-a]\nkey = env:AIGW_TEST_CLIENT_KEY\nmodels = gpt-*\nrpm = 100\n"
                "tpm = 50000\nmax_parallel = 4\nbudget_usd = 12.50\nbudget_period = day\n"
                "expires = 2027-01-31\n"
                "[key team-b]\nkey_sha256 = "
                "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855\n"
                "[model gpt-4o]\nprice_input = 2.5\nprice_output = 10\nprice_cached_input = 1.25\n"
                "list_price_input = 5\nfallback = llama-3\ntpm = 9000\n"
                "[model fast]\nalias_of = gpt-4o\n"
                "[model meta-llama/llama-3:8b]\nalias_of = llama-3\n");
    assert_string_equal(c->global.state_file + strlen(c->global.state_file) - 10, "/state.txt");
    assert_int_equal(c->global.state_interval_ms, 2000);
    assert_int_equal(c->global.default_max_tokens, 1000);
    assert_int_equal(c->listens[0].auth, 1);
    assert_int_equal(c->route_by_model, 1);
    assert_int_equal(c->n_keys, 2);
    assert_memory_equal(c->keys[0].sha256, abc_sha, 32);
    assert_int_equal(c->keys[1].sha256[0], 0xe3); /* upper-case hex is read too */
    assert_int_equal(c->keys[1].sha256[31], 0x55);
    assert_int_equal(c->keys[0].models.n, 1);
    assert_int_equal(c->keys[0].lim.rpm, 100);
    assert_int_equal(c->keys[0].lim.tpm, 50000);
    assert_int_equal(c->keys[0].lim.max_parallel, 4);
    assert_int_equal(c->keys[0].budget_nusd, 12500000000ull);
    assert_int_equal(c->keys[0].budget_period, BUDGET_DAY);
    assert_int_equal(c->keys[0].expires, 1801440000); /* 2027-02-01T00:00:00Z */
    assert_int_equal(c->keys[1].budget_nusd, 0);
    assert_int_equal(c->keys[1].expires, 0);
    assert_int_equal(c->n_models, 3);
    assert_int_equal(conf_model_find(c, "fast"), 1);
    assert_int_equal(c->models[0].price_input, 2500000);
    assert_int_equal(c->models[0].price_output, 10000000);
    assert_int_equal(c->models[0].price_cached_input, 1250000);
    assert_int_equal(c->models[0].list_price_input, 5000000);
    assert_int_equal(c->models[0].lim.tpm, 9000);
    assert_string_equal(c->models[0].fallback, "llama-3");
    assert_string_equal(c->models[1].alias_of, "gpt-4o");
    assert_int_equal(conf_model_pool(c, "gpt-4o-mini", 11), 0);
    assert_int_equal(conf_model_pool(c, "gpt-4.1", 7), 0);
    assert_int_equal(conf_model_pool(c, "gpt-4.1-mini", 12), -1);
    assert_int_equal(conf_model_pool(c, "llama-3", 7), 1);
    assert_int_equal(conf_model_pool(c, "mistral", 7), -1);
    assert_int_equal(conf_list_match(&c->pools[0].paths, "/v1/audio/speech", 16), 1);
    assert_int_equal(c->pools[0].lim.rpm, 600);
    assert_int_equal(c->backends[0].n_model_map, 2);
    assert_string_equal(c->backends[0].model_map[1].from, "gpt-4.1");
    assert_string_equal(c->backends[0].model_map[1].to, "gpt-4.1-x");
    conf_free(c);

    c = load_ok(BASE "[key k]\nkey_sha256 = "
                     "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
                     "budget_usd = 1\nexpires = 2027-01-31T12:00:00Z\n");
    assert_int_equal(c->route_by_model, 0);
    assert_int_equal(c->keys[0].budget_period, BUDGET_MONTH);
    assert_int_equal(c->keys[0].expires, 1801396800);
    conf_free(c);
    unsetenv("AIGW_TEST_CLIENT_KEY");
}

static void test_err_ai_sections(void **state)
{
    (void)state;
    load_bad(BASE "[key k]\nrpm = 5\n", 6, "[key k] key 'key'", "missing", NULL);
    load_bad(BASE "[key k]\nkey = sk-plain-in-file\n", 7, "[key k] key 'key'", "env:VAR", NULL);
    load_bad(BASE "[key k]\nkey_sha256 = abc\n", 7, "[key k] key 'key_sha256'", "64 hex", NULL);
    load_bad(BASE "[key k]\nkey_sha256 = "
                  "zz7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n",
             7, "key 'key_sha256'", NULL);
    load_bad(BASE "[key k]\nkey = env:AIGW_TEST_NOT_SET_AT_ALL\n", 7, "[key k] key 'key'",
             "not set", NULL);
    load_bad(BASE "[key k]\nkey_sha256 = "
                  "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
                  "expires = 2027-02-30\n",
             8, "key 'expires'", "not a date", NULL);
    load_bad(BASE "[key k]\nkey_sha256 = "
                  "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
                  "budget_usd = -3\n",
             8, "key 'budget_usd'", NULL);
    load_bad(BASE "[key k]\nkey_sha256 = "
                  "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
                  "budget_period = week\n",
             8, "key 'budget_period'", "day, month or total", NULL);
    load_bad(BASE "[model m]\nprice_input = 1.2345678\n", 7, "[model m] key 'price_input'",
             "6 decimals", NULL);
    load_bad(BASE "[model m]\nalias_of = m\n", 7, "[model m] key 'alias_of'", "itself", NULL);
    load_bad(BASE "[pool q]\nmodels = a, , b\n", 7, "[pool q] key 'models'", "empty item", NULL);
    load_bad(BASE "[pool q]\npaths = /v2/x\n", 7, "[pool q] key 'paths'", "/v1/", NULL);
    load_bad(BASE "model_map = gpt-4o\n", 6, "[backend a] key 'model_map'", "public=upstream",
             NULL);
    load_bad(BASE "model_map = a=b, a=c\n", 6, "key 'model_map'", "twice", NULL);
    /* with routing by model, every name must lead to a pool */
    load_bad("[listen main]\nbind = 127.0.0.1:8080\n[pool p]\nmodels = gpt-*\n"
             "[backend a]\nurl = http://127.0.0.1:9101/v1\n[model claude]\nprice_input = 3\n",
             7, "[model claude]", "no pool serves it", NULL);
    load_bad("[listen main]\nbind = 127.0.0.1:8080\n[pool p]\nmodels = gpt-*\n"
             "[backend a]\nurl = http://127.0.0.1:9101/v1\n[model x]\nalias_of = gpt-4\n"
             "fallback = claude\n",
             9, "[model x] key 'fallback'", "'claude'", NULL);
    load_bad("[listen main]\nbind = 127.0.0.1:8080\n[pool p]\nmodels = gpt-*\n"
             "[backend a]\nurl = http://127.0.0.1:9101/v1\n[model x]\nalias_of = y\n"
             "[model y]\nalias_of = gpt-4\n",
             8, "[model x] key 'alias_of'", "itself an alias", NULL);
    load_bad(BASE "[model bad name]\n", 6, "invalid name", NULL);
    load_bad(BASE "[key a]\nkey_sha256 = "
                  "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
                  "[key b]\nkey_sha256 = "
                  "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD\n",
             8, "[key b]", "the same key as [key a] (line 6)", NULL);
    load_bad(BASE "[key a/b]\n", 6, "invalid name", NULL);
}

static void warn_count(void *arg, const char *msg)
{
    assert_non_null(strstr(msg, "auth is on and no [key]"));
    ++*(int *)arg;
}

static void test_auth_warning(void **state)
{
    struct conf *c;
    int n = 0;

    (void)state;
    c = load_ok(BASE);
    conf_warnings(c, warn_count, &n);
    assert_int_equal(n, 1);
    conf_free(c);
    n = 0;
    c = load_ok("[listen main]\nbind = 127.0.0.1:8080\nauth = off\n[pool p]\n[backend a]\n"
                "url = http://127.0.0.1:9101/v1\n");
    conf_warnings(c, warn_count, &n);
    assert_int_equal(n, 0);
    conf_free(c);
}

static void test_util_ai_values(void **state)
{
    uint64_t v;
    int64_t t;
    char list[] = " a , b*,c ", *items[4];
    int n;

    (void)state;
    assert_int_equal(util_parse_decimal("2.5", 6, &v), 0);
    assert_int_equal(v, 2500000);
    assert_int_equal(util_parse_decimal("0.000001", 6, &v), 0);
    assert_int_equal(v, 1);
    assert_int_equal(util_parse_decimal("12", 9, &v), 0);
    assert_int_equal(v, 12000000000ull);
    assert_int_equal(util_parse_decimal("1.", 6, &v), -EINVAL);
    assert_int_equal(util_parse_decimal(".5", 6, &v), 0);
    assert_int_equal(v, 500000);
    assert_int_equal(util_parse_decimal("1e3", 6, &v), -EINVAL);
    assert_int_equal(util_parse_decimal("", 6, &v), -EINVAL);
    assert_int_equal(util_parse_decimal("99999999999999999999", 0, &v), -ERANGE);
    assert_int_equal(util_parse_utc_end("1970-01-01", &t), 0);
    assert_int_equal(t, 86400);
    assert_int_equal(util_parse_utc_end("1970-01-01T00:01:00Z", &t), 0);
    assert_int_equal(t, 60);
    assert_int_equal(util_parse_utc_end("2027-13-01", &t), -EINVAL);
    assert_int_equal(util_parse_utc_end("2027-1-1", &t), -EINVAL);
    assert_int_equal(util_parse_utc_end("2027-01-01 junk", &t), -EINVAL);
    assert_int_equal(util_split_list(list, items, 4, &n), 0);
    assert_int_equal(n, 3);
    assert_string_equal(items[0], "a");
    assert_string_equal(items[1], "b*");
    assert_string_equal(items[2], "c");
}

/* [global] user, group, admin_group resolve names when read; pidfile is relative to the file. */
static void test_deploy_keys(void **state)
{
    struct conf *c = load_ok(BASE "[global]\ngroup = root\nuser = nobody\nadmin_group = root\n"
                                  "pidfile = aigw.pid\n");
    char want[512];

    assert_int_equal(c->global.uid, 65534);
    assert_int_equal(c->global.gid, 0); /* group = wins over the user's primary group */
    assert_int_equal(c->global.admin_gid, 0);
    snprintf(want, sizeof(want), "%s/aigw.pid", dir);
    assert_string_equal(c->global.pidfile, want);
    conf_free(c);
    c = load_ok(BASE "[global]\nuser = root\n");
    assert_int_equal(c->global.uid, 0);
    assert_int_equal(c->global.gid, 0);
    assert_int_equal(c->global.admin_gid, -1);
    assert_string_equal(c->global.pidfile, "");
    conf_free(c);
    load_bad(BASE "[global]\nuser = no-such-user-aigw\n", 7, "key 'user'",
             "unknown user 'no-such-user-aigw'", NULL);
    load_bad(BASE "[global]\ngroup = no-such-group-aigw\n", 7, "unknown group", NULL);
    load_bad(BASE "[global]\nadmin_group = \n", 7, "key 'admin_group'", NULL);
}

/* A list's items match a name as fnmatch(item, name, 0) says, literal items (compared as bytes)
 * and patterns alike, whatever their order. */
static void test_list_match(void **state)
{
    static char i0[] = "gpt-4o", i1[] = "o[13]-*", i2[] = "demo?", i3[] = "a\\*b", i4[] = "x",
                i5[] = "e\\f";
    char *items[] = {i0, i1, i2, i3, i4, i5};
    struct conf_list l = {items, 6};
    static const char *const names[] = {"gpt-4o", "gpt-4o-mini", "gpt-4", "o1-pro", "o2-pro",
                                        "demo1",  "demo",        "a*b",   "axb",    "a\\*b",
                                        "x",      "xx",          "",      "ef",     "e\\f"};

    (void)state;
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        int want = 0;
        for (int k = 0; k < l.n; k++)
            want |= fnmatch(items[k], names[i], 0) == 0;
        if (conf_list_match(&l, names[i], strlen(names[i])) != want)
            fail_msg("'%s': expected %d", names[i], want);
    }
    assert_int_equal(conf_list_match(&l, "gpt-4o\0x", 8), 0); /* a NUL is no name's */
    assert_int_equal(conf_list_match(&l, "gpt-4o", 5), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_valid),
        cmocka_unit_test(test_minimal_defaults),
        cmocka_unit_test(test_err_unknown_key),
        cmocka_unit_test(test_err_unknown_section),
        cmocka_unit_test(test_err_bad_values),
        cmocka_unit_test(test_err_missing_url),
        cmocka_unit_test(test_err_unknown_pool),
        cmocka_unit_test(test_err_env_unset),
        cmocka_unit_test(test_err_file_missing),
        cmocka_unit_test(test_err_secret_not_printed),
        cmocka_unit_test(test_err_duplicates),
        cmocka_unit_test(test_err_structure),
        cmocka_unit_test(test_indent_and_long_lines),
        cmocka_unit_test(test_no_secrets_flag),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_err_not_a_config_file),
        cmocka_unit_test(test_maxconn),
        cmocka_unit_test(test_access_log),
        cmocka_unit_test(test_resilience_defaults),
        cmocka_unit_test(test_resilience_valid),
        cmocka_unit_test(test_backend_overrides),
        cmocka_unit_test(test_err_resilience_values),
        cmocka_unit_test(test_err_conditions),
        cmocka_unit_test(test_err_backoff),
        cmocka_unit_test(test_err_breaker_open),
        cmocka_unit_test(test_err_hash_key),
        cmocka_unit_test(test_err_all_backup),
        cmocka_unit_test(test_renamed_idle_timeout),
        cmocka_unit_test(test_util_percent),
        cmocka_unit_test(test_util_backoff),
        cmocka_unit_test(test_ai_sections),
        cmocka_unit_test(test_err_ai_sections),
        cmocka_unit_test(test_auth_warning),
        cmocka_unit_test(test_util_ai_values),
        cmocka_unit_test(test_deploy_keys),
        cmocka_unit_test(test_stats_section),
        cmocka_unit_test(test_list_match),
        cmocka_unit_test(test_cluster_section),
        cmocka_unit_test(test_cluster_secret_not_printed),
        cmocka_unit_test(test_secret_messages_name_the_secret),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
