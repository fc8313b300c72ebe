/* mbedTLS client side, for upstream connections and health checks, on non-blocking fds. */
#ifndef AIGW_CORE_TLS_H
#define AIGW_CORE_TLS_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <mbedtls/ssl.h>
#include <mbedtls/x509_crt.h>

#define TLS_SYSTEM_CA_FILE "/etc/ssl/certs/ca-certificates.crt"

/* Return codes of the non-blocking calls below besides byte counts and -errno. */
#define TLS_WANT_READ  (-EAGAIN)      /* wait for the fd to be readable, call again */
#define TLS_WANT_WRITE (-EINPROGRESS) /* wait for the fd to be writable, call again */

/* Once per process (after fork): seeds the process's random generator. 0 or -errno. */
int tls_global_init(void);

/* Per backend, per process: configuration, CA chain, and the last session for resumption. */
struct tls_client {
    mbedtls_ssl_config conf;
    mbedtls_x509_crt ca;
    mbedtls_ssl_session session; /* valid when has_session */
    int has_session;
    char sni[256];
};

/* sni: the backend's host name (also the name verified in its certificate).
 * ca_file: NULL = TLS_SYSTEM_CA_FILE. verify: 0 skips verification (tls_verify = no).
 * Returns 0 or a negative code with *err set to a malloc'd message. */
int tls_client_init(struct tls_client *t, const char *sni, const char *ca_file, int verify,
                    char **err);
void tls_client_free(struct tls_client *t);

/* Ciphertext read from the socket ahead of what mbedTLS asked for: a record's header and body
 * (and often the records after it) come in with one recv instead of two. Room for a whole
 * record of the usual maximum size (16 KB of data; a few bytes of it go to the next recv), as
 * OpenSSL's read buffer; mbedTLS itself keeps about 33 KB per connection. */
#define TLS_RBUF_SIZE 16384

/* One TLS connection over a connected non-blocking socket. Must not move once initialised
 * (mbedTLS's BIO callbacks point at it). */
struct tls_conn {
    mbedtls_ssl_context ssl;
    struct tls_client *cli;
    int fd;
    int handshake_done;
    int close_notify;    /* the peer ended the connection with close_notify (a clean TLS end) */
    int eof;             /* the socket read returned 0 */
    uint32_t roff, rlen; /* unread ciphertext: rbuf[roff, rlen) */
    unsigned char rbuf[TLS_RBUF_SIZE];
};

/* Prepares c for fd, offering the cached session of cli for resumption. 0 or -errno. */
int tls_conn_init(struct tls_conn *c, struct tls_client *cli, int fd);
/* 0 when done (and the session is cached in cli), TLS_WANT_READ/WRITE, or another negative
 * value on failure (tls_strerror explains it; certificate failures name the reason). */
int tls_conn_handshake(struct tls_conn *c);
/* Bytes read (> 0), 0 when the peer closed, TLS_WANT_READ/WRITE, or another negative on
 * error. After a 0, close_notify says whether the close was clean or the transport just ended
 * (which truncates a body delimited by the close). */
ssize_t tls_conn_read(struct tls_conn *c, void *buf, size_t len);
/* As tls_conn_read, without copying: *p points at the decrypted bytes inside mbedTLS's record
 * buffer (writable), which count as read and stay valid until the next read or handshake call
 * on c, or tls_conn_free. */
ssize_t tls_conn_read_inplace(struct tls_conn *c, char **p);
/* Bytes written (> 0), TLS_WANT_READ/WRITE, or another negative on error. mbedTLS requires a
 * call that returned WANT_* to be repeated with the same buffer and length. */
ssize_t tls_conn_write(struct tls_conn *c, const void *buf, size_t len);
/* Whether a read would return bytes without waiting for the socket: decrypted bytes inside
 * mbedTLS, or a whole record already read ahead (read them before polling again). */
int tls_conn_pending(const struct tls_conn *c);
/* Bytes received and not read yet: ciphertext read ahead, plaintext decrypted and not read. */
size_t tls_conn_buffered(const struct tls_conn *c);
/* Name of the negotiated cipher suite ("?" before the handshake). */
const char *tls_conn_ciphersuite(const struct tls_conn *c);
void tls_conn_free(struct tls_conn *c);

/* Text for a failed call's return value (and the verify flags when it was a certificate). */
const char *tls_strerror(const struct tls_conn *c, int ret, char *buf, size_t len);

#endif
