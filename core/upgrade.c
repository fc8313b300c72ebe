/* Binary upgrade: the old master forks and executes the binary on disk (its path as resolved at
 * start) with its own arguments and an environment naming what it hands over: the listening
 * sockets (AIGW_LISTEN_FDS, without CLOEXEC), its serving segment's memfd and a memfd listing the
 * section names the segment's records belong to. The two masters talk over a socketpair, one
 * line each way:
 *     new -> old  "ready PID VERSION"   its workers are up, holding (not accepting)
 *     old -> new  "go"                  the old generation stopped accepting
 *     new -> old  "serving GEN"         it holds the admin socket, its workers accept
 *     new -> old  "error WHY"           it will not start (then exits)
 * The new master sees the socket's end of file once the old master (and every process of it
 * that kept the socket) has exited: from then on nothing writes to the old segment. */
#include "core/upgrade.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/daemon.h"
#include "core/log.h"

#define UPGRADE_LINE_MAX 512
#define UPGRADE_POLL_MS  5
#define UPGRADE_TREE_MAX 512 /* processes of a hung new master killed at most */

extern char **environ;

static struct {
    char exe[PATH_MAX];
    char **argv;
    const char *version;
    int child_fd;      /* new master: its end of the socket to the old one; -1 = not upgraded */
    int child_waiting; /* new master: not taken over yet */
    int handed_over;   /* old master: the new one was told go */
    /* both sides: the socket (one line at a time) and a timer */
    uv_pipe_t pipe;
    uv_timer_t timer;
    int pipe_open, timer_init;
    char line[UPGRADE_LINE_MAX];
    size_t len;
    /* old master */
    void (*cb)(enum upgrade_event ev, const char *msg);
    pid_t pid; /* the new master while it is our child */
    int busy;
    int ready; /* it said ready */
    char reason[256];
    char admin_tmp[sizeof(((struct conf_global *)0)->admin_socket) + 16];
    char new_version[64];
    char answer_json[160]; /* the SERVING answer for aigwctl --json upgrade */
    /* new master */
    int (*child_ready)(void);
    void (*child_go)(void);
    void (*child_gone)(void);
    uint32_t gen;
} U = {.child_fd = -1};

void upgrade_init(char **argv, const char *version)
{
    ssize_t n = readlink("/proc/self/exe", U.exe, sizeof(U.exe) - 1);
    const char *fd = getenv(UPGRADE_ENV_FD);

    if (n > 0) {
        static const char deleted[] = " (deleted)";
        U.exe[n] = '\0';
        if ((size_t)n > sizeof(deleted) - 1 && !strcmp(U.exe + n - (sizeof(deleted) - 1), deleted))
            U.exe[n - (ssize_t)(sizeof(deleted) - 1)] = '\0';
    } else if (!realpath(argv[0], U.exe)) {
        snprintf(U.exe, sizeof(U.exe), "%s", argv[0]);
    }
    U.argv = argv;
    U.version = version;
    if (fd && *fd) {
        char *end;
        long v = strtol(fd, &end, 10);
        sigset_t none;

        if (*end == '\0' && v > 2 && v < INT_MAX && fcntl((int)v, F_GETFD) != -1) {
            U.child_fd = (int)v;
            U.child_waiting = 1;
            fcntl(U.child_fd, F_SETFD, FD_CLOEXEC);
        }
        unsetenv(UPGRADE_ENV_FD);
        /* the old master forked us with every signal blocked, and exec keeps the mask */
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
    }
}

int upgrade_is_child(void)
{
    return U.child_waiting;
}

int upgrade_owns_state(void)
{
    return !U.child_waiting && !U.handed_over;
}

int upgrade_busy(void)
{
    return U.busy;
}

const char *upgrade_exe(void)
{
    return U.exe;
}

/* The name the new master binds its admin socket to before it renames it over the real one. */
static void upgrade_admin_tmp(char *buf, size_t size, const char *path, pid_t pid)
{
    snprintf(buf, size, "%s.%d", path, (int)pid);
}

static void upgrade_send(const char *line)
{
    size_t len = strlen(line);
    int fd = U.child_fd;
    uv_os_fd_t ufd;

    if (U.pipe_open && uv_fileno((uv_handle_t *)&U.pipe, &ufd) == 0)
        fd = ufd;
    if (fd < 0)
        return;
    /* a few bytes into an empty socket buffer: never short */
    while (write(fd, line, len) == -1 && errno == EINTR)
        ;
}

static void upgrade_close(void)
{
    if (U.pipe_open && !uv_is_closing((uv_handle_t *)&U.pipe))
        uv_close((uv_handle_t *)&U.pipe, NULL);
    U.pipe_open = 0;
    if (U.timer_init)
        uv_timer_stop(&U.timer);
}

static void upgrade_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    (void)h;
    (void)hint;
    *buf = uv_buf_init(U.line + U.len, (unsigned)(sizeof(U.line) - 1 - U.len));
}

/* ---- the old master ---- */

/* The parent of pid as /proc says, or -1. */
static pid_t proc_ppid(pid_t pid)
{
    char path[64], buf[512];
    ssize_t n;
    int fd;

    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    if ((fd = open(path, O_RDONLY | O_CLOEXEC)) == -1)
        return -1;
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    /* "pid (comm) state ppid ...": comm may hold anything, the last ')' ends it */
    char *p = strrchr(buf, ')');
    int ppid;
    if (!p || sscanf(p + 1, " %*c %d", &ppid) != 1)
        return -1;
    return (pid_t)ppid;
}

/* Kills root and every process under it (what a new master that hangs has forked: its workers,
 * or whatever a wrapper script started), so that a failed upgrade leaves nothing behind. Each
 * one found is stopped first, so none can fork another between two looks at /proc. */
static void upgrade_kill_tree(pid_t root)
{
    pid_t tree[UPGRADE_TREE_MAX];
    int n = 0, found = 1;

    tree[n++] = root;
    kill(root, SIGSTOP);
    while (found && n < UPGRADE_TREE_MAX) {
        DIR *d = opendir("/proc");
        struct dirent *e;

        found = 0;
        if (!d)
            break;
        while ((e = readdir(d)) && n < UPGRADE_TREE_MAX) {
            char *end;
            long v = strtol(e->d_name, &end, 10);
            pid_t pid = (pid_t)v, ppid;
            int known = 0;

            if (*end || v <= 0)
                continue;
            for (int i = 0; i < n && !known; i++)
                known = tree[i] == pid;
            if (known || (ppid = proc_ppid(pid)) <= 0)
                continue;
            for (int i = 0; i < n; i++) {
                if (tree[i] == ppid) {
                    kill(pid, SIGSTOP);
                    tree[n++] = pid;
                    found = 1;
                    break;
                }
            }
        }
        closedir(d);
    }
    for (int i = 0; i < n; i++)
        kill(tree[i], SIGKILL);
    if (n > 1)
        log_info("upgrade: killed the new master (pid %d) and %d processes under it", (int)root,
                 n - 1);
}

/* The upgrade will not happen: the new master (if alive) is killed, aigwctl hears why. */
static void upgrade_fail(const char *why)
{
    char msg[512];

    if (!U.busy)
        return;
    U.busy = 0;
    upgrade_close();
    if (U.pid > 0) {
        upgrade_kill_tree(U.pid);
        unlink(U.admin_tmp); /* its admin socket under the temporary name, if it got that far */
    }
    log_err("upgrade failed: %s%s", why, U.ready ? " (after the handover: not serving)" : "");
    snprintf(msg, sizeof(msg), "error: upgrade failed: %s; %s\n", why,
             U.ready ? "the old generation had stopped accepting already"
                     : "the running master serves on");
    U.cb(UPGRADE_EV_FAILED, msg);
}

static void upgrade_timeout(uv_timer_t *t)
{
    char why[128];

    (void)t;
    snprintf(why, sizeof(why), "the new master (pid %d) was not %s within %d ms", (int)U.pid,
             U.ready ? "serving" : "ready", UPGRADE_READY_MS);
    upgrade_fail(why);
}

static void upgrade_old_line(char *line)
{
    if (!strncmp(line, "ready ", 6)) {
        char *ver = strchr(line + 6, ' ');
        snprintf(U.new_version, sizeof(U.new_version), "%.63s", ver ? ver + 1 : "unknown");
        U.ready = 1;
        log_info("upgrade: the new master (pid %d, aigw %s) is ready: stopping this generation",
                 (int)U.pid, U.new_version);
        uv_timer_start(&U.timer, upgrade_timeout, UPGRADE_READY_MS, 0);
        U.cb(UPGRADE_EV_READY, NULL);
    } else if (!strncmp(line, "serving ", 8)) {
        char msg[256];
        char ver[sizeof(U.new_version)];
        size_t k = 0;
        snprintf(msg, sizeof(msg), "upgraded: master pid %d (aigw %s), generation %.32s\n",
                 (int)U.pid, U.new_version, line + 8);
        /* the version is the new binary's word: kept a JSON string whatever it holds */
        for (const char *v = U.new_version; *v && k < sizeof(ver) - 1; v++)
            ver[k++] = *v >= 0x20 && *v < 0x7f && *v != '"' && *v != '\\' ? *v : '?';
        ver[k] = '\0';
        snprintf(U.answer_json, sizeof(U.answer_json),
                 "{\"ok\":true,\"pid\":%d,\"version\":\"%s\",\"generation\":%lu}\n", (int)U.pid,
                 ver, strtoul(line + 8, NULL, 10));
        U.busy = 0;
        /* the socket stays open until this process exits: its end of file tells the new master
         * that nothing writes to the old segment any more */
        uv_read_stop((uv_stream_t *)&U.pipe);
        uv_timer_stop(&U.timer);
        log_info("upgrade: the new master (pid %d) serves; this master drains and exits",
                 (int)U.pid);
        U.cb(UPGRADE_EV_SERVING, msg);
    } else if (!strncmp(line, "error ", 6)) {
        snprintf(U.reason, sizeof(U.reason), "%.255s", line + 6);
    } else if (!strncmp(line, "exec-failed ", 12)) {
        snprintf(U.reason, sizeof(U.reason), "cannot execute %.150s: %.80s", U.exe,
                 strerror(atoi(line + 12)));
    }
}

static void upgrade_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    char *nl;

    (void)s;
    (void)buf;
    if (nread < 0) {
        /* the new master closed its end: its exit (SIGCHLD) or the deadline reports */
        int child = U.child_fd >= 0;
        upgrade_close();
        if (child && U.child_gone)
            U.child_gone();
        return;
    }
    U.len += (size_t)nread;
    U.line[U.len] = '\0';
    while ((nl = memchr(U.line, '\n', U.len))) {
        size_t used = (size_t)(nl - U.line) + 1;
        *nl = '\0';
        if (U.child_fd >= 0) {
            if (!strcmp(U.line, "go") && U.child_waiting) {
                char out[64];
                U.child_waiting = 0;
                U.child_go();
                snprintf(out, sizeof(out), "serving %u\n", U.gen);
                upgrade_send(out);
            }
        } else {
            upgrade_old_line(U.line);
        }
        if (!U.pipe_open)
            return;
        memmove(U.line, U.line + used, U.len - used);
        U.len -= used;
    }
    if (U.len >= sizeof(U.line) - 1)
        U.len = 0; /* a line that long is nothing we sent: drop it */
}

int upgrade_reap(pid_t pid, int status)
{
    char why[384];

    if (U.pid <= 0 || pid != U.pid)
        return 0;
    if (WIFSIGNALED(status))
        snprintf(why, sizeof(why),
                 "the new master (pid %d, %.150s) was killed by signal %d%s%.160s", (int)pid, U.exe,
                 WTERMSIG(status), U.reason[0] ? ": " : "", U.reason);
    else
        snprintf(why, sizeof(why), "the new master (pid %d, %.150s) exited with code %d%s%.160s",
                 (int)pid, U.exe, WEXITSTATUS(status), U.reason[0] ? ": " : "", U.reason);
    U.pid = 0;
    if (U.busy)
        upgrade_fail(why);
    else
        log_warn("%s", why);
    return 1;
}

const char *upgrade_answer_json(void)
{
    return U.answer_json;
}

void upgrade_go(void)
{
    if (!U.busy || !U.ready)
        return;
    U.handed_over = 1;
    daemon_mainpid(U.pid); /* systemd: the new master is the service's main process now */
    upgrade_send("go\n");
}

/* text append for the environment and the names file */
struct upgrade_buf {
    char *p;
    size_t len, cap;
    int oom;
};

static void __attribute__((format(printf, 2, 3)))
ub_printf(struct upgrade_buf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    for (;;) {
        va_start(ap, fmt);
        n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = 1;
            return;
        }
        if (b->p && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = (b->cap ? b->cap * 2 : 256) + (size_t)n;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
}

/* The section names the segment's records belong to, in their order there. */
static int upgrade_names_fd(const struct upgrade_offer *o)
{
    const struct conf *c = o->conf;
    struct upgrade_buf b = {0};
    int fd;

    ub_printf(&b, "aigw-upgrade 1\ngen %u\nworkers %d\n", o->gen, o->workers);
    for (int i = 0; i < c->n_keys; i++)
        ub_printf(&b, "key %s\n", c->keys[i].name);
    for (int i = 0; i < c->n_models; i++)
        ub_printf(&b, "model %s\n", c->models[i].name);
    for (int i = 0; i < c->n_pools; i++)
        ub_printf(&b, "pool %s\n", c->pools[i].name);
    for (int i = 0; i < c->n_backends; i++)
        ub_printf(&b, "backend %d %d %s\n", c->backends[i].pool, c->backends[i].weight,
                  c->backends[i].name);
    if (b.oom) {
        free(b.p);
        return -ENOMEM;
    }
    fd = memfd_create("aigw-upgrade-names", MFD_CLOEXEC);
    if (fd == -1 || write(fd, b.p, b.len) != (ssize_t)b.len || lseek(fd, 0, SEEK_SET) == -1) {
        int e = errno ? errno : EIO;
        if (fd >= 0)
            close(fd);
        free(b.p);
        return -e;
    }
    free(b.p);
    return fd;
}

static char *env_int(const char *name, int v)
{
    char *p;
    return asprintf(&p, "%s=%d", name, v) < 0 ? NULL : p;
}

/* Our environment without a previous upgrade's variables, plus this one's (entries from *owned
 * on are malloc'd). NULL on no memory. */
static char **upgrade_env(const struct upgrade_offer *o, int sock, int names, size_t *owned)
{
    struct upgrade_buf l = {0};
    size_t n = 0, k = 0;
    const struct conf *c = o->conf;
    char **env;
    int bad = 0;

    ub_printf(&l, "%s=", UPGRADE_ENV_LISTEN);
    for (int li = 0; li < c->n_listens; li++) {
        ub_printf(&l, "%s%s=", li ? ";" : "", c->listens[li].bind);
        for (int s = 0; s < o->workers; s++)
            ub_printf(&l, "%s%d", s ? "," : "", o->fds[s * c->n_listens + li]);
    }
    if (o->stats_fd >= 0)
        ub_printf(&l, "%sstats=%d", c->n_listens ? ";" : "", o->stats_fd);
    while (environ[n])
        n++;
    env = calloc(n + 6, sizeof(*env));
    if (!env || l.oom) {
        free(env);
        free(l.p);
        return NULL;
    }
    for (size_t i = 0; i < n; i++)
        if (strncmp(environ[i], "AIGW_UPGRADE_", 13) &&
            strncmp(environ[i], UPGRADE_ENV_LISTEN "=", sizeof(UPGRADE_ENV_LISTEN)))
            env[k++] = environ[i];
    *owned = k;
    env[k++] = l.p;
    env[k++] = env_int(UPGRADE_ENV_FD, sock);
    env[k++] = env_int(UPGRADE_ENV_SHM, o->shm_fd);
    env[k++] = env_int(UPGRADE_ENV_NAMES, names);
    if (o->admin_fd >= 0)
        env[k++] = env_int(UPGRADE_ENV_ADMIN, o->admin_fd);
    for (size_t i = *owned; i < k; i++)
        bad |= !env[i];
    if (bad) {
        for (size_t i = *owned; i < k; i++)
            free(env[i]);
        free(env);
        return NULL;
    }
    return env;
}

static void upgrade_env_free(char **env, size_t owned)
{
    if (!env)
        return;
    for (size_t i = owned; env[i]; i++)
        free(env[i]);
    free(env);
}

/* Between fork and exec (async-signal-safe calls only): the handed-over descriptors lose CLOEXEC;
 * every signal stays blocked across exec (the new master unblocks them in upgrade_init). */
static void __attribute__((noreturn))
upgrade_exec(const struct upgrade_offer *o, int sock, int names, char **env)
{
    char msg[32] = "exec-failed ";
    int e, n = 12, digits = 0, t;

    fcntl(sock, F_SETFD, 0);
    fcntl(names, F_SETFD, 0);
    fcntl(o->shm_fd, F_SETFD, 0);
    if (o->stats_fd >= 0)
        fcntl(o->stats_fd, F_SETFD, 0);
    if (o->admin_fd >= 0)
        fcntl(o->admin_fd, F_SETFD, 0);
    for (int i = 0; i < o->conf->n_listens * o->workers; i++)
        fcntl(o->fds[i], F_SETFD, 0);
    execve(U.exe, U.argv, env);
    e = errno;
    for (t = e; t; t /= 10)
        digits++;
    for (int i = digits - 1, v = e; i >= 0; i--, v /= 10)
        msg[n + i] = (char)('0' + v % 10);
    n += digits;
    msg[n++] = '\n';
    while (write(sock, msg, (size_t)n) == -1 && errno == EINTR)
        ;
    _exit(127);
}

int upgrade_start(uv_loop_t *loop, const struct upgrade_offer *o,
                  void (*cb)(enum upgrade_event ev, const char *msg), char **err)
{
    int sv[2], names, rc;
    sigset_t all, old;
    size_t owned = 0;
    char **env;
    pid_t pid;

    if (U.busy) {
        *err = strdup("an upgrade is already under way");
        return -EBUSY;
    }
    if (access(U.exe, X_OK) == -1) {
        rc = -errno;
        if (asprintf(err, "cannot execute %.150s: %.80s", U.exe, strerror(-rc)) < 0)
            *err = NULL;
        return rc;
    }
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == -1) {
        rc = -errno;
        *err = strdup("cannot create the socket to the new master");
        return rc;
    }
    names = upgrade_names_fd(o);
    env = names >= 0 ? upgrade_env(o, sv[1], names, &owned) : NULL;
    if (!env) {
        rc = names < 0 ? names : -ENOMEM;
        *err = strdup("cannot prepare the new master's environment");
        goto fail;
    }
    U.reason[0] = '\0';
    U.ready = 0;
    U.len = 0;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    pid = fork();
    if (pid == 0)
        upgrade_exec(o, sv[1], names, env);
    rc = -errno;
    sigprocmask(SIG_SETMASK, &old, NULL);
    upgrade_env_free(env, owned);
    close(names);
    names = -1;
    if (pid == -1) {
        *err = strdup("cannot fork the new master");
        goto fail;
    }
    close(sv[1]);
    sv[1] = -1;
    U.pid = pid;
    U.cb = cb;
    U.busy = 1;
    U.child_fd = -1;
    upgrade_admin_tmp(U.admin_tmp, sizeof(U.admin_tmp), o->conf->global.admin_socket, pid);
    if (!U.timer_init) {
        uv_timer_init(loop, &U.timer);
        U.timer_init = 1;
    }
    uv_timer_start(&U.timer, upgrade_timeout, UPGRADE_READY_MS, 0);
    uv_pipe_init(loop, &U.pipe, 0);
    if (uv_pipe_open(&U.pipe, sv[0]) < 0 ||
        uv_read_start((uv_stream_t *)&U.pipe, upgrade_alloc, upgrade_read) < 0) {
        uv_close((uv_handle_t *)&U.pipe, NULL);
        U.pipe_open = 0;
        log_warn("upgrade: cannot watch the socket to the new master: its readiness is lost");
    } else {
        U.pipe_open = 1;
    }
    log_info("upgrade: started the new master (pid %d) from %s", (int)pid, U.exe);
    return 0;
fail:
    if (names >= 0)
        close(names);
    close(sv[0]);
    if (sv[1] >= 0)
        close(sv[1]);
    return rc;
}

/* ---- the new master ---- */

static int parse_fd(const char *s, char **end)
{
    long v = strtol(s, end, 10);
    if (*end == s || v < 3 || v > INT_MAX || fcntl((int)v, F_GETFD) == -1)
        return -1;
    return (int)v;
}

static int env_fd(const char *name)
{
    const char *s = getenv(name);
    char *end;
    int fd;

    if (!s)
        return -1;
    fd = parse_fd(s, &end);
    if (fd >= 0 && *end)
        fd = -1;
    if (fd >= 0)
        fcntl(fd, F_SETFD, FD_CLOEXEC);
    return fd;
}

/* Appends one zeroed element to *arr (of *n, each `size` bytes); NULL on no memory. */
static void *grow(void *arr_ptr, int *n, size_t size)
{
    void **arr = arr_ptr;
    char *p = realloc(*arr, size * (size_t)(*n + 1));
    if (!p)
        return NULL;
    *arr = p;
    memset(p + size * (size_t)*n, 0, size);
    return p + size * (size_t)(*n)++;
}

static int upgrade_read_names(int fd, struct upgrade_inherited *in, char **err)
{
    FILE *f = fdopen(fd, "r");
    struct conf *c = in->conf;
    char line[CONF_NAME_MAX + 64];
    int rc = 0;

    if (!f) {
        close(fd);
        return -errno;
    }
    while (rc == 0 && fgets(line, sizeof(line), f)) {
        int a, b, n = 0;
        line[strcspn(line, "\n")] = '\0';
        if (sscanf(line, "gen %u", &in->gen) == 1 || sscanf(line, "workers %d", &a) == 1 ||
            !strncmp(line, "aigw-upgrade ", 13)) {
            continue;
        } else if (!strncmp(line, "key ", 4)) {
            struct conf_apikey *k = grow(&c->keys, &c->n_keys, sizeof(*k));
            if (!k)
                rc = -ENOMEM;
            else
                snprintf(k->name, sizeof(k->name), "%.63s", line + 4);
        } else if (!strncmp(line, "model ", 6)) {
            struct conf_model *m = grow(&c->models, &c->n_models, sizeof(*m));
            if (!m)
                rc = -ENOMEM;
            else
                snprintf(m->name, sizeof(m->name), "%.63s", line + 6);
        } else if (!strncmp(line, "pool ", 5)) {
            struct conf_pool *p = grow(&c->pools, &c->n_pools, sizeof(*p));
            if (!p)
                rc = -ENOMEM;
            else
                snprintf(p->name, sizeof(p->name), "%.63s", line + 5);
        } else if (sscanf(line, "backend %d %d %n", &a, &b, &n) == 2 && n > 0) {
            struct conf_backend *be = grow(&c->backends, &c->n_backends, sizeof(*be));
            if (!be) {
                rc = -ENOMEM;
            } else {
                be->pool = a;
                be->weight = b;
                snprintf(be->name, sizeof(be->name), "%.63s", line + n);
            }
        } else {
            rc = -EINVAL;
        }
    }
    fclose(f);
    for (int i = 0; rc == 0 && i < c->n_backends; i++)
        if (c->backends[i].pool < 0 || c->backends[i].pool >= c->n_pools)
            rc = -EINVAL;
    if (rc < 0 &&
        asprintf(err, "the old master's section names are unreadable: %s", strerror(-rc)) < 0)
        *err = NULL;
    return rc;
}

/* AIGW_LISTEN_FDS: BIND=fd,fd,...;...;stats=fd. Each fd must be a listening socket; its address
 * is what the new configuration's [listen] sections are matched with. */
static int upgrade_read_listens(const char *spec, struct upgrade_inherited *in, char **err)
{
    struct conf *c = in->conf;
    char *copy = strdup(spec), *save = NULL, *ent;
    int rc = 0;

    if (!copy)
        return -ENOMEM;
    in->workers = -1;
    for (ent = strtok_r(copy, ";", &save); ent && rc == 0; ent = strtok_r(NULL, ";", &save)) {
        char *eq = strrchr(ent, '='), *p, *end;
        int count = 0;

        if (!eq) {
            rc = -EINVAL;
            break;
        }
        *eq = '\0';
        if (!strcmp(ent, "stats")) {
            in->stats_fd = parse_fd(eq + 1, &end);
            if (in->stats_fd >= 0)
                fcntl(in->stats_fd, F_SETFD, FD_CLOEXEC);
            continue;
        }
        struct conf_listen *l = grow(&c->listens, &c->n_listens, sizeof(*l));
        if (!l) {
            rc = -ENOMEM;
            break;
        }
        snprintf(l->name, sizeof(l->name), "inherited");
        snprintf(l->bind, sizeof(l->bind), "%s", ent);
        for (p = eq + 1; rc == 0 && *p; p = *end ? end + 1 : end) {
            int fd = parse_fd(p, &end), acc = 0;
            socklen_t len = sizeof(acc);
            int *fds;

            if (fd < 0 || (*end && *end != ',') ||
                getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &len) == -1 || !acc) {
                rc = -EBADF;
                break;
            }
            fcntl(fd, F_SETFD, FD_CLOEXEC);
            if (count == 0) {
                l->addr_len = sizeof(l->addr);
                if (getsockname(fd, (struct sockaddr *)&l->addr, &l->addr_len) == -1) {
                    rc = -errno;
                    break;
                }
            }
            fds = realloc(in->fds, sizeof(int) * (size_t)(in->n_fds + 1));
            if (!fds) {
                rc = -ENOMEM;
                break;
            }
            in->fds = fds;
            in->fds[in->n_fds++] = fd;
            count++;
        }
        if (rc == 0 && (count == 0 || (in->workers >= 0 && count != in->workers)))
            rc = -EINVAL;
        in->workers = count;
    }
    free(copy);
    if (rc == 0 && in->workers < 0)
        in->workers = 0;
    if (rc == 0 && c->n_listens > 1) {
        /* read listen-major, used slot-major: [slot * n_listens + listen] */
        int *t = malloc(sizeof(int) * (size_t)in->n_fds);
        if (!t)
            return -ENOMEM;
        for (int li = 0; li < c->n_listens; li++)
            for (int s = 0; s < in->workers; s++)
                t[s * c->n_listens + li] = in->fds[li * in->workers + s];
        memcpy(in->fds, t, sizeof(int) * (size_t)in->n_fds);
        free(t);
    }
    if (rc < 0 && asprintf(err, "%s is not what an old master hands over: %s", UPGRADE_ENV_LISTEN,
                           strerror(-rc)) < 0)
        *err = NULL;
    return rc;
}

int upgrade_inherit(struct upgrade_inherited *in, char **err)
{
    const char *listen = getenv(UPGRADE_ENV_LISTEN);
    int names = env_fd(UPGRADE_ENV_NAMES), rc;

    memset(in, 0, sizeof(*in));
    in->stats_fd = -1;
    in->admin_fd = env_fd(UPGRADE_ENV_ADMIN);
    in->shm_fd = env_fd(UPGRADE_ENV_SHM);
    in->old_pid = getppid();
    in->conf = calloc(1, sizeof(*in->conf));
    if (!in->conf)
        return -ENOMEM;
    rc = names >= 0 ? upgrade_read_names(names, in, err) : 0;
    if (rc == 0 && listen)
        rc = upgrade_read_listens(listen, in, err);
    unsetenv(UPGRADE_ENV_LISTEN);
    unsetenv(UPGRADE_ENV_SHM);
    unsetenv(UPGRADE_ENV_NAMES);
    unsetenv(UPGRADE_ENV_ADMIN);
    return rc;
}

static void upgrade_child_poll(uv_timer_t *t)
{
    char out[128];

    (void)t;
    if (!U.child_ready())
        return;
    uv_timer_stop(&U.timer);
    snprintf(out, sizeof(out), "ready %d %s\n", (int)getpid(), U.version ? U.version : "unknown");
    log_info("upgrade: workers ready; waiting for the old master to stop accepting");
    upgrade_send(out);
}

int upgrade_child_start(uv_loop_t *loop, int (*ready)(void), void (*go)(void), void (*gone)(void),
                        uint32_t gen)
{
    int rc;

    U.child_ready = ready;
    U.child_go = go;
    U.child_gone = gone;
    U.gen = gen;
    uv_timer_init(loop, &U.timer);
    U.timer_init = 1;
    uv_pipe_init(loop, &U.pipe, 0);
    if ((rc = uv_pipe_open(&U.pipe, U.child_fd)) < 0 ||
        (rc = uv_read_start((uv_stream_t *)&U.pipe, upgrade_alloc, upgrade_read)) < 0) {
        uv_close((uv_handle_t *)&U.pipe, NULL);
        return rc;
    }
    U.pipe_open = 1;
    uv_timer_start(&U.timer, upgrade_child_poll, UPGRADE_POLL_MS, UPGRADE_POLL_MS);
    return 0;
}

void upgrade_child_fail(const char *why)
{
    char out[UPGRADE_LINE_MAX];

    if (!U.child_waiting)
        return;
    snprintf(out, sizeof(out), "error %s", why && *why ? why : "it could not start (see the log)");
    out[strcspn(out, "\n")] = '\0';
    strcat(out, "\n");
    upgrade_send(out);
}
