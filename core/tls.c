/* mbedTLS client side for upstream connections and health checks, on non-blocking fds. */
#include "core/tls.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <mbedtls/asn1.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/net_sockets.h>
#include <mbedtls/oid.h>
#include <mbedtls/ssl_ciphersuites.h>
#include <mbedtls/version.h>
#include <mbedtls/x509.h>

/* One random generator per process: seeded after fork so children never share a stream. */
static mbedtls_entropy_context tls_entropy;
static mbedtls_ctr_drbg_context tls_drbg;
static int tls_seeded;
static pid_t tls_seed_pid; /* a child that forgot tls_global_init must not reuse its parent's */

/* Parsed CA bundles shared by every tls_client of the process that names the same file:
 * the system bundle is ~150 certificates, too much to hold once per backend. */
struct tls_ca_entry {
    struct tls_ca_entry *next;
    mbedtls_x509_crt crt;
    int refs;
    char path[];
};
static struct tls_ca_entry *tls_ca_list;

int tls_global_init(void)
{
    char pers[64];
    struct timespec ts;
    int n, ret;

    if (tls_seeded) {
        /* Inherited from the parent across fork: reseed from scratch. */
        mbedtls_ctr_drbg_free(&tls_drbg);
        mbedtls_entropy_free(&tls_entropy);
        tls_seeded = 0;
    }
    mbedtls_entropy_init(&tls_entropy);
    mbedtls_ctr_drbg_init(&tls_drbg);
    clock_gettime(CLOCK_MONOTONIC, &ts);
    n = snprintf(pers, sizeof(pers), "aigw-tls-%ld-%lld.%ld", (long)getpid(), (long long)ts.tv_sec,
                 ts.tv_nsec);
    ret = mbedtls_ctr_drbg_seed(&tls_drbg, mbedtls_entropy_func, &tls_entropy,
                                (const unsigned char *)pers, (size_t)n);
    if (ret != 0) {
        mbedtls_ctr_drbg_free(&tls_drbg);
        mbedtls_entropy_free(&tls_entropy);
        return -EIO;
    }
    tls_seeded = 1;
    tls_seed_pid = getpid();
    return 0;
}

static char *tls_fmt_err(const char *what, const char *path, int ret)
{
    char reason[160];
    char *msg = NULL;

    mbedtls_strerror(ret, reason, sizeof(reason));
    if (asprintf(&msg, "%s '%s': %s", what, path, reason) < 0)
        return NULL;
    return msg;
}

/* Returns a shared parsed bundle for path (refcounted), or NULL with *err set. */
static mbedtls_x509_crt *tls_ca_get(const char *path, char **err)
{
    struct tls_ca_entry *e;
    size_t len = strlen(path);
    int ret;

    for (e = tls_ca_list; e; e = e->next) {
        if (strcmp(e->path, path) == 0) {
            e->refs++;
            return &e->crt;
        }
    }
    e = calloc(1, sizeof(*e) + len + 1);
    if (!e) {
        *err = strdup("out of memory");
        return NULL;
    }
    memcpy(e->path, path, len + 1);
    mbedtls_x509_crt_init(&e->crt);
    /* mbedTLS reports a missing file as a generic I/O error: say which one. */
    if (access(path, R_OK) != 0) {
        if (asprintf(err, "cannot read CA file '%s': %s", path, strerror(errno)) < 0)
            *err = NULL;
        free(e);
        return NULL;
    }
    ret = mbedtls_x509_crt_parse_file(&e->crt, path);
    /* A positive return counts certificates that failed to parse: system bundles may hold a
     * few that mbedTLS can't read; the rest are usable. */
    if (ret < 0 || e->crt.version == 0) {
        *err = tls_fmt_err("cannot load CA file", path,
                           ret < 0 ? ret : MBEDTLS_ERR_X509_INVALID_FORMAT);
        mbedtls_x509_crt_free(&e->crt);
        free(e);
        return NULL;
    }
    e->refs = 1;
    e->next = tls_ca_list;
    tls_ca_list = e;
    return &e->crt;
}

static void tls_ca_put(const mbedtls_x509_crt *crt)
{
    struct tls_ca_entry **pp, *e;

    for (pp = &tls_ca_list; (e = *pp); pp = &e->next) {
        if (&e->crt != crt)
            continue;
        if (--e->refs == 0) {
            *pp = e->next;
            mbedtls_x509_crt_free(&e->crt);
            free(e);
        }
        return;
    }
}

/* Parses an IP literal; returns the address length (4 or 16) or 0 for a host name. */
static size_t tls_ip_literal(const char *host, unsigned char addr[16])
{
    if (inet_pton(AF_INET, host, addr) == 1)
        return 4;
    if (inet_pton(AF_INET6, host, addr) == 1)
        return 16;
    return 0;
}

/* Looks for an iPAddress subjectAltName equal to ip in the certificate's raw extensions.
 * mbedTLS 2.28 only matches host names (CN and dNSName SANs), and does not list iPAddress
 * entries in crt->subject_alt_names, so the extension is walked here. */
static int tls_crt_has_ip_san(const mbedtls_x509_crt *crt, const unsigned char *ip, size_t iplen)
{
    unsigned char *p = crt->v3_ext.p, *end, *ext_end, *san_end;
    size_t len;

    if (!p || crt->v3_ext.len == 0)
        return 0;
    end = p + crt->v3_ext.len;
    /* v3_ext is the [3] EXPLICIT wrapper or the Extensions SEQUENCE, depending on version:
     * skip an outer context tag when present. */
    if (*p == (MBEDTLS_ASN1_CONTEXT_SPECIFIC | MBEDTLS_ASN1_CONSTRUCTED | 3)) {
        if (mbedtls_asn1_get_tag(&p, end, &len,
                                 MBEDTLS_ASN1_CONTEXT_SPECIFIC | MBEDTLS_ASN1_CONSTRUCTED | 3))
            return 0;
    }
    if (mbedtls_asn1_get_tag(&p, end, &len, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE))
        return 0;
    end = p + len;
    while (p < end) {
        mbedtls_x509_buf oid;
        int critical = 0;

        if (mbedtls_asn1_get_tag(&p, end, &len, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE))
            return 0;
        ext_end = p + len;
        if (mbedtls_asn1_get_tag(&p, ext_end, &oid.len, MBEDTLS_ASN1_OID))
            return 0;
        oid.p = p;
        p += oid.len;
        if (p < ext_end && *p == MBEDTLS_ASN1_BOOLEAN)
            if (mbedtls_asn1_get_bool(&p, ext_end, &critical))
                return 0;
        if (mbedtls_asn1_get_tag(&p, ext_end, &len, MBEDTLS_ASN1_OCTET_STRING))
            return 0;
        if (MBEDTLS_OID_CMP(MBEDTLS_OID_SUBJECT_ALT_NAME, &oid) != 0) {
            p = ext_end;
            continue;
        }
        if (mbedtls_asn1_get_tag(&p, ext_end, &len,
                                 MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE))
            return 0;
        san_end = p + len;
        while (p < san_end) {
            unsigned char tag = *p++;

            if (mbedtls_asn1_get_len(&p, san_end, &len))
                return 0;
            if (tag == (MBEDTLS_ASN1_CONTEXT_SPECIFIC | MBEDTLS_X509_SAN_IP_ADDRESS) &&
                len == iplen && memcmp(p, ip, iplen) == 0)
                return 1;
            p += len;
        }
        return 0;
    }
    return 0;
}

/* Verify callback for IP literal backends: no host name is given to mbedTLS (no SNI for an
 * address, RFC 6066), so the leaf certificate's iPAddress SANs are checked here. */
static int tls_verify_ip(void *arg, mbedtls_x509_crt *crt, int depth, uint32_t *flags)
{
    const struct tls_client *t = arg;
    unsigned char ip[16];
    size_t iplen;

    if (depth != 0)
        return 0;
    iplen = tls_ip_literal(t->sni, ip);
    if (iplen == 0 || !tls_crt_has_ip_san(crt, ip, iplen))
        *flags |= MBEDTLS_X509_BADCERT_CN_MISMATCH;
    return 0;
}

/* What a client offers, fastest first: forward-secret AEAD suites only. ChaCha20-Poly1305
 * comes first because mbedTLS 2.28's C implementation beats its AES-GCM (which handles 16 bytes
 * per call even with AES-NI) at every record size: 330 against 200-230 MB/s for 16 KB records,
 * as fast for 200-byte ones, on an AES-NI x86-64 (test/bench/tls-speed); servers that honour
 * the client's order pick it. AES-128 before AES-256: as fast or faster, and as secure for
 * this use. */
static const int tls_ciphersuites[] = {
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    MBEDTLS_TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    MBEDTLS_TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    MBEDTLS_TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    0,
};

int tls_client_init(struct tls_client *t, const char *sni, const char *ca_file, int verify,
                    char **err)
{
    unsigned char ip[16];
    mbedtls_x509_crt *ca = NULL;
    int ret;

    memset(t, 0, sizeof(*t));
    mbedtls_ssl_config_init(&t->conf);
    mbedtls_x509_crt_init(&t->ca);
    mbedtls_ssl_session_init(&t->session);
    *err = NULL;

    if ((!tls_seeded || tls_seed_pid != getpid()) && tls_global_init() != 0) {
        *err = strdup("cannot seed the TLS random generator");
        ret = -EIO;
        goto out;
    }
    if (strlen(sni) >= sizeof(t->sni)) {
        *err = strdup("TLS host name too long");
        ret = -ENAMETOOLONG;
        goto out;
    }
    strcpy(t->sni, sni);

    ret = mbedtls_ssl_config_defaults(&t->conf, MBEDTLS_SSL_IS_CLIENT, MBEDTLS_SSL_TRANSPORT_STREAM,
                                      MBEDTLS_SSL_PRESET_DEFAULT);
    if (ret != 0) {
        *err = tls_fmt_err("TLS setup failed for", sni, ret);
        ret = -EINVAL;
        goto out;
    }
    mbedtls_ssl_conf_min_version(&t->conf, MBEDTLS_SSL_MAJOR_VERSION_3,
                                 MBEDTLS_SSL_MINOR_VERSION_3);
    mbedtls_ssl_conf_rng(&t->conf, mbedtls_ctr_drbg_random, &tls_drbg);
    mbedtls_ssl_conf_ciphersuites(&t->conf, tls_ciphersuites);

    if (!verify) {
        mbedtls_ssl_conf_authmode(&t->conf, MBEDTLS_SSL_VERIFY_NONE);
        ret = 0;
        goto out;
    }
    if (!ca_file)
        ca_file = TLS_SYSTEM_CA_FILE;
    ca = tls_ca_get(ca_file, err);
    if (!ca) {
        ret = -EINVAL;
        goto out;
    }
    mbedtls_ssl_conf_ca_chain(&t->conf, ca, NULL);
    mbedtls_ssl_conf_authmode(&t->conf, MBEDTLS_SSL_VERIFY_REQUIRED);
    if (tls_ip_literal(sni, ip))
        mbedtls_ssl_conf_verify(&t->conf, tls_verify_ip, t);
    ret = 0;
out:
    if (ret != 0) {
        if (!*err)
            *err = strdup("TLS setup failed");
        mbedtls_ssl_config_free(&t->conf);
        mbedtls_x509_crt_free(&t->ca);
        mbedtls_ssl_session_free(&t->session);
    }
    return ret;
}

void tls_client_free(struct tls_client *t)
{
    if (t->conf.ca_chain)
        tls_ca_put(t->conf.ca_chain);
    mbedtls_ssl_config_free(&t->conf);
    mbedtls_x509_crt_free(&t->ca);
    mbedtls_ssl_session_free(&t->session);
    t->has_session = 0;
}

static int tls_bio_send(void *ctx, const unsigned char *buf, size_t len)
{
    const struct tls_conn *c = ctx;
    ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL);

    if (n >= 0)
        return (int)n;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        return MBEDTLS_ERR_SSL_WANT_WRITE;
    if (errno == EPIPE || errno == ECONNRESET)
        return MBEDTLS_ERR_NET_CONN_RESET;
    return MBEDTLS_ERR_NET_SEND_FAILED;
}

static int tls_recv_err(void)
{
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        return MBEDTLS_ERR_SSL_WANT_READ;
    if (errno == EPIPE || errno == ECONNRESET)
        return MBEDTLS_ERR_NET_CONN_RESET;
    return MBEDTLS_ERR_NET_RECV_FAILED;
}

/* mbedTLS reads a record as two exact requests, its 5-byte header and then its body. Both are
 * served from rbuf, which one recv fills with as much as the socket holds (usually the whole
 * record, often several). A request at least as large as rbuf, the body of a big record, is
 * read straight into mbedTLS's buffer: copying it through rbuf would gain no syscall. */
static int tls_bio_recv(void *ctx, unsigned char *buf, size_t len)
{
    struct tls_conn *c = ctx;
    size_t have = c->rlen - c->roff;
    ssize_t n;

    if (have == 0) {
        if (len >= TLS_RBUF_SIZE) {
            n = recv(c->fd, buf, len, 0);
            if (n < 0)
                return tls_recv_err();
            c->eof = n == 0;
            return (int)n;
        }
        n = recv(c->fd, c->rbuf, TLS_RBUF_SIZE, 0);
        if (n <= 0) {
            if (n < 0)
                return tls_recv_err();
            c->eof = 1;
            return 0;
        }
        c->roff = 0;
        c->rlen = (uint32_t)n;
        have = (size_t)n;
    }
    if (len > have)
        len = have;
    memcpy(buf, c->rbuf + c->roff, len);
    c->roff += (uint32_t)len;
    if (c->roff == c->rlen)
        c->roff = c->rlen = 0;
    return (int)len;
}

int tls_conn_init(struct tls_conn *c, struct tls_client *cli, int fd)
{
    unsigned char ip[16];
    int ret;

    mbedtls_ssl_init(&c->ssl);
    c->cli = cli;
    c->fd = fd;
    c->handshake_done = 0;
    c->close_notify = 0;
    c->eof = 0;
    c->roff = c->rlen = 0;
    ret = mbedtls_ssl_setup(&c->ssl, &cli->conf);
    if (ret != 0)
        goto fail;
    /* Host names go into SNI and the certificate name check; IP literals are checked by
     * tls_verify_ip instead (SNI must not carry an address). */
    if (!tls_ip_literal(cli->sni, ip)) {
        ret = mbedtls_ssl_set_hostname(&c->ssl, cli->sni);
        if (ret != 0)
            goto fail;
    }
    mbedtls_ssl_set_bio(&c->ssl, c, tls_bio_send, tls_bio_recv, NULL);
    /* A stale or rejected session only costs a full handshake: ignore failures. */
    if (cli->has_session)
        (void)mbedtls_ssl_set_session(&c->ssl, &cli->session);
    return 0;
fail:
    mbedtls_ssl_free(&c->ssl);
    return ret == MBEDTLS_ERR_SSL_ALLOC_FAILED ? -ENOMEM : -EINVAL;
}

static int tls_map(int ret)
{
    if (ret == MBEDTLS_ERR_SSL_WANT_READ)
        return TLS_WANT_READ;
    if (ret == MBEDTLS_ERR_SSL_WANT_WRITE)
        return TLS_WANT_WRITE;
    return ret;
}

int tls_conn_handshake(struct tls_conn *c)
{
    struct tls_client *cli = c->cli;
    int ret = mbedtls_ssl_handshake(&c->ssl);

    if (ret != 0)
        return tls_map(ret);
    c->handshake_done = 1;
    /* Keep the newest session for the next connection to resume. */
    if (cli->has_session) {
        mbedtls_ssl_session_free(&cli->session);
        mbedtls_ssl_session_init(&cli->session);
        cli->has_session = 0;
    }
    if (mbedtls_ssl_get_session(&c->ssl, &cli->session) == 0)
        cli->has_session = 1;
    else
        mbedtls_ssl_session_free(&cli->session);
    return 0;
}

/* mbedtls_ssl_read's result as tls_conn_read returns it. */
static ssize_t tls_read_ret(struct tls_conn *c, int ret)
{
    if (ret >= 0)
        return ret;
    /* A peer that closes without close_notify reads as a close too: HTTP framing (Content-Length,
     * chunked) detects a truncated response; for a body delimited by the close, the caller
     * looks at close_notify. */
    if (ret == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY) {
        c->close_notify = 1;
        return 0;
    }
    if (ret == MBEDTLS_ERR_SSL_CONN_EOF)
        return 0;
    return tls_map(ret);
}

ssize_t tls_conn_read(struct tls_conn *c, void *buf, size_t len)
{
    int ret;

    /* mbedTLS also returns 0 for a record with no data (which some peers send): only an end
     * of the socket or close_notify (mapped to 0 below) ends the stream. */
    do
        ret = mbedtls_ssl_read(&c->ssl, buf, len);
    while (ret == 0 && len > 0 && !c->eof);
    return tls_read_ret(c, ret);
}

ssize_t tls_conn_read_inplace(struct tls_conn *c, char **p)
{
#if MBEDTLS_VERSION_NUMBER < 0x03000000
    /* mbedTLS 2.x has no read without a copy, but its context is a plain struct: a read of 0
     * bytes decrypts the next record (in place, in in_buf) and leaves it unread at in_offt;
     * marking it read is what mbedtls_ssl_read does once it has copied all of it. */
    mbedtls_ssl_context *s = &c->ssl;
    size_t n;

    while (s->in_offt == NULL) {
        int ret = mbedtls_ssl_read(s, NULL, 0);
        if (ret != 0)
            return tls_read_ret(c, ret);
        if (s->in_offt == NULL && c->eof)
            return 0;
    }
    n = s->in_msglen;
    *p = (char *)s->in_offt;
    s->in_msglen = 0;
    s->in_offt = NULL;
    s->keep_current_message = 0;
    return (ssize_t)n;
#else
#error "tls_conn_read_inplace needs mbedTLS 2.x (Debian 12's 2.28)"
#endif
}

ssize_t tls_conn_write(struct tls_conn *c, const void *buf, size_t len)
{
    int ret = mbedtls_ssl_write(&c->ssl, buf, len);

    if (ret >= 0)
        return ret;
    return tls_map(ret);
}

int tls_conn_pending(const struct tls_conn *c)
{
    const unsigned char *h = c->rbuf + c->roff;
    size_t have = c->rlen - c->roff;

    if (mbedtls_ssl_get_bytes_avail(&c->ssl) > 0)
        return 1;
    /* A partial record is not: its rest comes with the next readable event. */
    return have >= 5 && have >= 5 + ((size_t)h[3] << 8 | h[4]);
}

size_t tls_conn_buffered(const struct tls_conn *c)
{
    return c->rlen - c->roff + mbedtls_ssl_get_bytes_avail(&c->ssl);
}

const char *tls_conn_ciphersuite(const struct tls_conn *c)
{
    const char *s = mbedtls_ssl_get_ciphersuite(&c->ssl);
    return s ? s : "?";
}

void tls_conn_free(struct tls_conn *c)
{
    mbedtls_ssl_free(&c->ssl);
    c->cli = NULL;
    c->handshake_done = 0;
}

const char *tls_strerror(const struct tls_conn *c, int ret, char *buf, size_t len)
{
    size_t n;
    char *s;

    if (len == 0)
        return "";
    if (ret == TLS_WANT_READ || ret == TLS_WANT_WRITE) {
        snprintf(buf, len, "TLS operation would block");
        return buf;
    }
    if (ret == MBEDTLS_ERR_X509_CERT_VERIFY_FAILED && c) {
        uint32_t flags = mbedtls_ssl_get_verify_result(&c->ssl);

        n = (size_t)snprintf(buf, len, "certificate verify failed: ");
        if (n < len && flags != 0 && flags != (uint32_t)-1) {
            mbedtls_x509_crt_verify_info(buf + n, len - n, "", flags);
            /* The info comes one reason per line: fold it into one log line. */
            for (s = buf + n; *s; s++)
                if (*s == '\n')
                    *s = s[1] ? ';' : '\0';
        }
        return buf;
    }
    mbedtls_strerror(ret, buf, len);
    return buf;
}
