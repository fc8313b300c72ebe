/* placeholder until the TLS client lands */
#include "core/tls.h"
int tls_global_init(void)
{
    return 0;
}
int tls_client_init(struct tls_client *t, const char *sni, const char *ca_file, int verify,
                    char **err)
{
    return -ENOSYS;
}
void tls_client_free(struct tls_client *t)
{
}
int tls_conn_init(struct tls_conn *c, struct tls_client *cli, int fd)
{
    return -ENOSYS;
}
int tls_conn_handshake(struct tls_conn *c)
{
    return -ENOSYS;
}
ssize_t tls_conn_read(struct tls_conn *c, void *buf, size_t len)
{
    return -ENOSYS;
}
ssize_t tls_conn_write(struct tls_conn *c, const void *buf, size_t len)
{
    return -ENOSYS;
}
size_t tls_conn_pending(const struct tls_conn *c)
{
    return 0;
}
void tls_conn_free(struct tls_conn *c)
{
}
const char *tls_strerror(const struct tls_conn *c, int ret, char *buf, size_t len)
{
    return "TLS not built yet";
}
