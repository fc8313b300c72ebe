/* aigwctl: sends one command to the aigw master over its admin socket and prints the answer. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <ini.h>
#include <mbedtls/sha256.h>

#include "core/admin.h"
#include "core/conf.h"

#define DEFAULT_SOCKET "aigw.sock"
/* a master that accepts but never answers must not hang us (a reload answers within the
 * master's 25 s readiness deadline) */
#define REPLY_TIMEOUT_S 40

static void usage(FILE *f)
{
    fprintf(
        f, "usage: aigwctl [-s SOCKET | -c CONFIG] [--json] COMMAND\n"
           "commands (--json: the answer as JSON, for those that show or change something):\n"
           "  show info               version, pid, uptime, generation, workers, client\n"
           "                          connections, requests/s (last 10 s), access log drops,\n"
           "                          config file\n"
           "  show proc               master, health checker and workers\n"
           "  show pools              algorithm, backends up/total, in-flight, requests, models\n"
           "                          and paths served and limits of each pool\n"
           "  show backends [POOL]    state, breaker, weights, latency and counters of each\n"
           "                          backend (of POOL only)\n"
           "  show keys               client keys: limits and their current use, budget\n"
           "                          (spent, reserved, remaining), totals; never the key;\n"
           "                          with [cluster] also the fleet's spent, remaining budget\n"
           "                          and totals (FLEET_* columns)\n"
           "  show cluster            [cluster]: node, Redis, state, hosts alive, and each fleet\n"
           "                          limit's lease, the fleet's counts and the lease bound\n"
           "  show usage [--by key|model|backend] [--fleet]\n"
           "                          requests, tokens, cost, list-price cost and saved per\n"
           "                          key (default), model or backend, with a total; --fleet:\n"
           "                          the whole fleet's totals ([cluster], read from Redis\n"
           "                          every sync_interval) instead of this host's\n"
           "  set weight BACKEND N|N%%\n"
           "                          weight 0..256, or a percentage of the configured one;\n"
           "                          a reload keeps it\n"
           "  set backend BACKEND ready|drain|maint\n"
           "                          operator state: drain takes no new requests (in-flight\n"
           "                          ones finish), maint also pauses checks, ready serves again\n"
           "  check BACKEND           run a health check now: pass/fail, status, latency, error\n"
           "  breaker reset BACKEND   force the circuit breaker of BACKEND (NAME or POOL/NAME)\n"
           "                          closed\n"
           "  breaker open BACKEND    force it open for the pool's breaker_open_for\n"
           "  reload                  check the config file and reload it without dropping a\n"
           "                          request: waits and prints the new generation; a bad\n"
           "                          file prints its FILE:LINE error (nothing changes)\n"
           "  upgrade                 start the aigw binary on disk as a new master on the\n"
           "                          same sockets with the state carried; prints its pid\n"
           "                          and version; a new binary that fails to start leaves\n"
           "                          the running one serving (exit 1, with the reason)\n"
           "  stop                    graceful stop, as SIGTERM: in-flight requests finish\n"
           "  key hash                the key_sha256 of a client key read from stdin (one\n"
           "                          line; answered by aigwctl, no master needed)\n"
           "  help                    this list (answered by aigwctl, no master needed)\n"
           "SOCKET defaults to " DEFAULT_SOCKET "; with -c it is the config's admin_socket.\n"
           "Exits 0 on success; 1 when the master is unreachable or refuses the command (unknown\n"
           "backend, bad value: the reason on stderr); 2 for an unknown command or wrong words.\n");
}

static int write_all(int fd, const char *p, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n == -1 && errno == EINTR)
            continue;
        if (n == -1)
            return -errno;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Sends `line`, copies the whole answer to stdout (an error answer to stderr). Returns 0 when
 * the answer is not an error, 2 when it says the command is unknown or its words are wrong (the
 * usage is printed too), 1 for any other error (message already printed). */
static int ctl_send(const char *path, const char *line)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct timeval tv = {.tv_sec = REPLY_TIMEOUT_S};
    char buf[8192];
    size_t total = 0;
    int fd, rc = 1, is_error = 0;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        fprintf(stderr, "aigwctl: socket path too long: %s\n", path);
        return 1;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd == -1) {
        fprintf(stderr, "aigwctl: socket: %s\n", strerror(errno));
        return 1;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == -1) {
        fprintf(stderr, "aigwctl: cannot reach the aigw master at %s: %s (is aigw running?)\n",
                path, strerror(errno));
        goto out;
    }
    int err = write_all(fd, line, strlen(line));
    if (!err)
        err = write_all(fd, "\n", 1);
    if (err) {
        fprintf(stderr, "aigwctl: cannot send to %s: %s\n", path, strerror(-err));
        goto out;
    }
    for (;;) {
        ssize_t n = read(fd, buf, sizeof(buf));
        if (n == -1 && errno == EINTR)
            continue;
        if (n == -1) {
            fprintf(stderr, "aigwctl: no answer from the aigw master at %s: %s\n", path,
                    errno == EAGAIN ? "timed out" : strerror(errno));
            goto out;
        }
        if (n == 0)
            break;
        if (total == 0 && n >= 6 && !memcmp(buf, "error:", 6))
            is_error = 1;
        if (total == 0 && is_error &&
            (((size_t)n >= sizeof(ADMIN_ERR_UNKNOWN) - 1 &&
              !memcmp(buf, ADMIN_ERR_UNKNOWN, sizeof(ADMIN_ERR_UNKNOWN) - 1)) ||
             ((size_t)n >= sizeof(ADMIN_ERR_USAGE) - 1 &&
              !memcmp(buf, ADMIN_ERR_USAGE, sizeof(ADMIN_ERR_USAGE) - 1))))
            is_error = 2;
        /* An error answer is a diagnostic: stderr, so scripts can capture stdout safely. */
        fwrite(buf, 1, (size_t)n, is_error ? stderr : stdout);
        total += (size_t)n;
    }
    if (total == 0) {
        fprintf(stderr,
                "aigwctl: the aigw master at %s closed the connection without an "
                "answer\n",
                path);
        goto out;
    }
    rc = is_error;
    if (rc == 2)
        usage(stderr);
out:
    close(fd);
    if (fflush(stdout) == EOF)
        rc = 1;
    return rc;
}

/* key hash: the SHA-256 of the key on stdin (a final newline is not part of it), in hex, for
 * key_sha256 = in a [key] section. The key is never echoed. */
static int key_hash(void)
{
    char buf[4097];
    unsigned char sha[32];
    size_t len = fread(buf, 1, sizeof(buf), stdin);

    if (ferror(stdin) || len == sizeof(buf)) {
        fprintf(stderr, "aigwctl: %s\n",
                len == sizeof(buf) ? "key longer than 4096 bytes" : "cannot read stdin");
        return 1;
    }
    while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r'))
        len--;
    if (len == 0 || memchr(buf, '\n', len) || memchr(buf, '\0', len)) {
        fprintf(stderr, "aigwctl: %s\n", len ? "expected the key on one line" : "no key on stdin");
        return 1;
    }
    mbedtls_sha256_ret((const unsigned char *)buf, len, sha, 0);
    memset(buf, 0, sizeof(buf));
    for (int i = 0; i < 32; i++)
        printf("%02x", sha[i]);
    printf("\n");
    return 0;
}

/* inih handler: [global] admin_socket of a file conf_load refused (the last one wins, as in
 * conf_load). */
static int ctl_socket_line(void *user, const char *section, const char *name, const char *value)
{
    char *sock = user;

    if (!strcmp(section, "global") && !strcmp(name, "admin_socket"))
        snprintf(sock, sizeof(((struct conf_global *)0)->admin_socket), "%s", value);
    return 1; /* go on: the rest of the file is not ours to judge */
}

int main(int argc, char **argv)
{
    const char *sock = NULL, *config = NULL, *by = NULL;
    char line[256] = "";
    int json = 0, fleet = 0, nwords = 0, rc;
    struct conf *conf = NULL;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if ((!strcmp(a, "-s") || !strcmp(a, "-c")) && i + 1 < argc) {
            if (a[1] == 's')
                sock = argv[++i];
            else
                config = argv[++i];
        } else if (!strcmp(a, "--json") || !strcmp(a, "-j")) {
            json = 1;
        } else if (!strcmp(a, "--fleet")) {
            fleet = 1; /* show usage --fleet: passed on like --by */
        } else if (!strcmp(a, "--by") || !strncmp(a, "--by=", 5)) {
            /* show usage --by KIND: passed on to the master after the command words. */
            by = a[4] == '=' ? a + 5 : i + 1 < argc ? argv[++i] : NULL;
            if (!by || !*by || strlen(by) > 16) {
                fprintf(stderr, "aigwctl: --by needs key, model or backend\n");
                return 1;
            }
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (a[0] == '-') {
            fprintf(stderr, "aigwctl: unknown or incomplete option '%s'\n", a);
            usage(stderr);
            return 2;
        } else {
            /* Command words are joined into the one line the master reads. */
            if (strlen(line) + strlen(a) + 2 + sizeof(" --by ") + 16 + sizeof(" --fleet") +
                    sizeof(" json") >
                sizeof(line)) {
                fprintf(stderr, "aigwctl: command too long\n");
                return 1;
            }
            if (nwords++)
                strcat(line, " ");
            strcat(line, a);
        }
    }
    if (!nwords) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(line, "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(line, "key hash"))
        return key_hash();
    if (sock && config) {
        fprintf(stderr, "aigwctl: give either -s SOCKET or -c CONFIG, not both\n");
        return 1;
    }
    if (by) {
        strcat(line, " --by "); /* fits: the word loop keeps room for it and for " json" */
        strcat(line, by);
    }
    if (fleet)
        strcat(line, " --fleet");
    if (json)
        strcat(line, " json");

    static char file_sock[sizeof(((struct conf_global *)0)->admin_socket)] = DEFAULT_SOCKET;
    if (config) {
        char *err = NULL;
        /* Only admin_socket matters here: the operator running aigwctl may not be allowed to
         * read the backends' API keys. */
        if (conf_load_flags(config, CONF_LOAD_NO_SECRETS, &conf, &err) < 0) {
            /* reload and upgrade would be refused for it: its FILE:LINE is the answer. Any other
             * command goes to the master, which still runs the file it loaded before: an
             * operator in the middle of an edit can still see and steer it. */
            int refuse = !strncmp(line, "reload", 6) || !strncmp(line, "upgrade", 7) ||
                         ini_parse(config, ctl_socket_line, file_sock) < 0;
            fprintf(stderr, "aigwctl: %s%s\n",
                    refuse ? "" : "warning: ", err ? err : "cannot read the configuration");
            free(err);
            if (refuse)
                return 1;
            fprintf(stderr,
                    "aigwctl: warning: the master runs the configuration it loaded "
                    "before; admin socket %s\n",
                    file_sock);
        } else {
            snprintf(file_sock, sizeof(file_sock), "%s", conf->global.admin_socket);
        }
        sock = file_sock;
    }
    if (!sock)
        sock = DEFAULT_SOCKET;
    rc = ctl_send(sock, line);
    if (conf)
        conf_free(conf);
    return rc;
}
