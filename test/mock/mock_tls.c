/* aigw-mock TLS: mbedTLS 2.28 server configuration (certificate, session cache and tickets) and
 * the memory BIO that moves records between mbedTLS and the connection's buffers. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/error.h>

#include "mock.h"

static const char *tls_alpn[] = {"http/1.1", "http/1.0", NULL};

/* The stock cache and ticket callbacks, counting the sessions they resume: a get or a parse
 * that succeeds is a resumed handshake. */
static int tls_cache_get(void *p, mbedtls_ssl_session *s)
{
    struct mock_tls_srv *t = p;
    int r = mbedtls_ssl_cache_get(&t->cache, s);

    if (r == 0)
        t->resumed++;
    return r;
}

static int tls_cache_set(void *p, const mbedtls_ssl_session *s)
{
    return mbedtls_ssl_cache_set(&((struct mock_tls_srv *)p)->cache, s);
}

static int tls_ticket_write(void *p, const mbedtls_ssl_session *s, unsigned char *start,
                            const unsigned char *end, size_t *tlen, uint32_t *lifetime)
{
    return mbedtls_ssl_ticket_write(&((struct mock_tls_srv *)p)->ticket, s, start, end, tlen,
                                    lifetime);
}

static int tls_ticket_parse(void *p, mbedtls_ssl_session *s, unsigned char *buf, size_t len)
{
    struct mock_tls_srv *t = p;
    int r = mbedtls_ssl_ticket_parse(&t->ticket, s, buf, len);

    if (r == 0)
        t->resumed++;
    return r;
}

int tls_srv_init(struct mock_tls_srv *t, const char *cert, const char *key, char *err,
                 size_t errlen)
{
    static const char pers[] = "aigw-mock";
    char msg[128];
    const char *what;
    int r;

    mbedtls_ssl_config_init(&t->conf);
    mbedtls_x509_crt_init(&t->crt);
    mbedtls_pk_init(&t->key);
    mbedtls_entropy_init(&t->entropy);
    mbedtls_ctr_drbg_init(&t->drbg);
    mbedtls_ssl_cache_init(&t->cache);
    mbedtls_ssl_ticket_init(&t->ticket);

    what = "seeding the random generator";
    r = mbedtls_ctr_drbg_seed(&t->drbg, mbedtls_entropy_func, &t->entropy,
                              (const unsigned char *)pers, sizeof(pers) - 1);
    if (r != 0)
        goto out;
    what = "cannot load certificate";
    r = mbedtls_x509_crt_parse_file(&t->crt, cert);
    if (r != 0)
        goto out;
    what = "cannot load key";
    r = mbedtls_pk_parse_keyfile(&t->key, key, NULL);
    if (r != 0)
        goto out;
    what = "key does not match certificate";
    r = mbedtls_pk_check_pair(&t->crt.pk, &t->key);
    if (r != 0)
        goto out;
    what = "TLS configuration";
    r = mbedtls_ssl_config_defaults(&t->conf, MBEDTLS_SSL_IS_SERVER, MBEDTLS_SSL_TRANSPORT_STREAM,
                                    MBEDTLS_SSL_PRESET_DEFAULT);
    if (r != 0)
        goto out;
    mbedtls_ssl_conf_rng(&t->conf, mbedtls_ctr_drbg_random, &t->drbg);
    r = mbedtls_ssl_conf_own_cert(&t->conf, &t->crt, &t->key);
    if (r != 0)
        goto out;
    r = mbedtls_ssl_conf_alpn_protocols(&t->conf, tls_alpn);
    if (r != 0)
        goto out;
    /* Both resumption kinds, so clients resume with a session id or a ticket. */
    mbedtls_ssl_conf_session_cache(&t->conf, t, tls_cache_get, tls_cache_set);
    what = "session tickets";
    r = mbedtls_ssl_ticket_setup(&t->ticket, mbedtls_ctr_drbg_random, &t->drbg,
                                 MBEDTLS_CIPHER_AES_256_GCM, 86400);
    if (r != 0)
        goto out;
    mbedtls_ssl_conf_session_tickets_cb(&t->conf, tls_ticket_write, tls_ticket_parse, t);
out:
    if (r != 0) {
        mbedtls_strerror(r, msg, sizeof(msg));
        snprintf(err, errlen, "%s: %s", what, msg);
        return -1;
    }
    return 0;
}

void tls_srv_free(struct mock_tls_srv *t)
{
    mbedtls_ssl_ticket_free(&t->ticket);
    mbedtls_ssl_cache_free(&t->cache);
    mbedtls_ssl_config_free(&t->conf);
    mbedtls_pk_free(&t->key);
    mbedtls_x509_crt_free(&t->crt);
    mbedtls_ctr_drbg_free(&t->drbg);
    mbedtls_entropy_free(&t->entropy);
}

/* Ciphertext out: appended to the connection's buffer, flushed by the caller with uv_write. */
static int tls_bio_send(void *ctx, const unsigned char *buf, size_t len)
{
    struct mock_tls_conn *t = ((struct mock_conn *)ctx)->tls;
    size_t room = MOCK_TLS_OUT_SIZE - t->out_len;

    if (room == 0)
        return MBEDTLS_ERR_SSL_WANT_WRITE;
    if (len > room)
        len = room;
    memcpy(t->out + t->out_len, buf, len);
    t->out_len += len;
    return (int)len;
}

/* Ciphertext in: what uv reads left in the connection's buffer. */
static int tls_bio_recv(void *ctx, unsigned char *buf, size_t len)
{
    struct mock_tls_conn *t = ((struct mock_conn *)ctx)->tls;
    size_t avail = t->in_len - t->in_off;

    if (avail == 0)
        return MBEDTLS_ERR_SSL_WANT_READ;
    if (len > avail)
        len = avail;
    memcpy(buf, t->in + t->in_off, len);
    t->in_off += len;
    return (int)len;
}

int tls_conn_init(struct mock_conn *c)
{
    struct mock_tls_conn *t = calloc(1, sizeof(*t));

    if (!t)
        return -1;
    c->tls = t;
    mbedtls_ssl_init(&t->ssl);
    if (mbedtls_ssl_setup(&t->ssl, &c->srv->tls->conf) != 0)
        return -1;
    mbedtls_ssl_set_bio(&t->ssl, c, tls_bio_send, tls_bio_recv, NULL);
    return 0;
}

void tls_conn_free(struct mock_conn *c)
{
    mbedtls_ssl_free(&c->tls->ssl);
    mock_buf_free(&c->tls->plain);
    free(c->tls);
    c->tls = NULL;
}
