/* The master process: binds and holds the listeners, creates shm, forks the health checker and
 * the workers, restarts the ones that die, stops them on SIGTERM/SIGQUIT (graceful) or SIGINT
 * (fast), sets RLIMIT_NOFILE from maxconn, answers aigwctl. */
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <uv.h>

#include "core/admin.h"
#include "core/alog.h"
#include "core/daemon.h"
#include "core/log.h"
#include "core/master.h"
#include "core/sig.h"
#include "core/state.h"
#include "core/stats.h"
#include "core/sync.h"
#include "core/upgrade.h"
#include "core/util.h"
#include "core/worker.h"
#include "health/health.h"
#include "shm/shm.h"

#define ADMIN_LINE_MAX      1024 /* longest admin command line accepted */
#define ADMIN_IDLE_MS       5000 /* an admin client that sends nothing is dropped */
#define ADMIN_WAIT_MS       200  /* longest wait for the health checker to carry out a command */
#define ADMIN_POLL_MS       5    /* how often the wait looks at shm */
#define RESTART_FAST_MS     3000 /* a child dying sooner than this after start is crash-looping */
#define RESTART_BACKOFF_MS  100  /* first delayed restart; doubles while it keeps crashing */
#define RESTART_BACKOFF_MAX 1000 /* never wait longer than this to restart */
#define FAST_STOP_MS        1000 /* SIGINT: children still alive after this get SIGKILL */
/* SIGTERM: at hard_stop_after the workers end their streams themselves (an SSE error event, the
 * last chunk, a short linger); only children alive this much later get SIGKILL */
#define HARD_STOP_GRACE_MS 3000
/* [cluster] start: the workers wait this long at most for the sync process's first leases (or
 * its fallback, within a second when Redis does not answer) before they accept anyway */
#define START_HOLD_MS 3000
/* fds a process needs besides connections: stdio, epoll, signal pipe, resolver threads, shm,
 * TLS files, admin clients */
#define FD_RESERVE 64

enum master_stop {
    STOP_NONE = 0,
    STOP_GRACEFUL, /* SIGTERM, SIGQUIT: children finish in-flight work */
    STOP_FAST,     /* SIGINT: children close everything at once */
};

struct gen;

/* One supervised child: the health checker, the sync process ([cluster]) or a worker slot. */
struct child {
    struct gen *g;         /* its generation */
    const char *role;      /* "health", "worker" or "sync" */
    int slot;              /* worker slot, -1 for the health checker and the sync process */
    pid_t pid;             /* 0 while not running */
    uint64_t started_ms;   /* wall clock of the last fork, for show proc */
    uint64_t started_mono; /* monotonic ms of the last fork, to spot crash loops */
    unsigned restarts;
    unsigned fast_deaths; /* consecutive deaths soon after start */
    int pending;          /* waiting to be (re)started at restart_at */
    int release_busy;     /* its worker slot's limiter shares are not all given back yet */
    uint64_t restart_at;  /* monotonic ms */
};

/* A configuration generation: its config, segment, listening sockets and children. The master
 * runs one (M.g); a reload starts the next (M.next) beside it, and once its workers are ready the
 * old one drains (on M.old) until its last process has exited. */
struct gen {
    uint32_t id; /* 1 at start, +1 each reload: the segment's generation */
    struct conf *conf;
    struct shm shm;
    int shm_ready;
    int *fds; /* listening sockets, fds[slot * n_listens + listen]; its own (dup) copies */
    int n_fds;
    int workers;
    struct child *children; /* [0] health, [1 + slot] workers, then sync with [cluster] */
    int n_children;
    struct state_names names; /* of keys, models, backends: the state file's */
    const char **name_ptrs;
    /* what carries over from `prev` (the generation before, while it drains): limiters by
     * id, and the usage totals of the same names (index here -> index there, -1 = new) */
    struct gen *prev;
    struct limit_carry *carry;
    uint32_t n_carry;
    int32_t *acct_from[3]; /* per enum acct_kind */
    int32_t *be_from;      /* per backend: the one of `prev` whose counters it carries, or -1 */
    uint64_t req_seen;     /* its workers' requests at the last rate sample */
    uint64_t kill_at;      /* draining: monotonic ms after which what is left gets SIGKILL */
    int exited;            /* its processes are all gone (it waits for its own carry to end) */
    int steered;           /* its listeners' reuseport groups steer to its sockets (reload_steer) */
    struct gen *next;      /* on M.old */
};

/* An aigwctl connection: one line in, one answer out, then close. */
struct admin_client {
    uv_pipe_t pipe;
    uv_timer_t timer;
    uv_write_t wr;
    char *out;
    size_t out_len;
    size_t len;                         /* of line */
    struct admin_pending pending;       /* breaker command the answer waits for */
    struct admin_client *next_waiter;   /* reload: on M.waiters until the new generation runs */
    uint64_t wait_until;                /* monotonic ms: answer anyway after this */
    uint32_t gen_id;                    /* the generation whose segment the command went to */
    int json;                           /* reload, upgrade: the answer in JSON */
    int open_handles;                   /* freed when both handles have closed */
    struct admin_client *next, **pprev; /* on M.clients while it lives */
    char line[ADMIN_LINE_MAX + 1];
};

/* The master's state: one per process, static so signal and fork paths can reach it. */
static struct master {
    uv_loop_t loop;
    int loop_ready;               /* the loop exists: children must release it */
    struct gen *g;                /* the generation serving */
    struct gen *next;             /* being started by a reload, NULL when none */
    struct gen *old;              /* draining after a reload */
    struct admin_client *waiters; /* aigwctl reload: answered when M.next runs or fails */
    struct admin_client *clients; /* every open admin connection */
    uint64_t next_deadline;       /* monotonic ms: M.next must be ready by then */
    uv_timer_t reload_timer, sync_timer;
    uv_signal_t sig_chld, sig_term, sig_int, sig_quit, sig_hup, sig_usr1, sig_usr2;
    uv_pipe_t admin;
    uv_timer_t restart_timer, stop_timer, state_timer;
    uv_timer_t rate_timer; /* samples the requests answered once a second, for show info */
    /* [cluster] start: the workers hold (do not accept) until the fleet block is primed, and
     * systemd hears READY then; monotonic ms after which they accept anyway (0: not held) */
    uv_timer_t start_timer;
    uint64_t start_hold_until;
    struct admin_rate rate; /* requests answered since start (every generation), per second */
    uint64_t requests;
    /* binary upgrade, new master: the old master's generation (its segment mapped, no process of
     * ours) that M.g carries from until the old master has exited */
    struct gen *upfrom;
    pid_t upfrom_pid;
    int upgraded; /* old master: handed over to a new master, draining */
    /* new master: fd + 1 of the old master's listening admin socket, taken at the go (0 = none):
     * owner, group and mode stay as they are, which an unprivileged master could not set for an
     * admin_group it is not a member of */
    int admin_inherited;
    enum master_stop stopping;
    int done;
    uint64_t started_ms;
    char admin_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
} M;

static void master_reload_signal(void);
static void master_start_hold(struct gen *g);
static int master_reload(char **err);
static int master_upgrade(char **err);
static void admin_client_timeout(uv_timer_t *t);
static void admin_client_send(struct admin_client *c);
static void admin_client_close(struct admin_client *c);
static void master_stop(enum master_stop how);

static const char *child_name(const struct child *c, char *buf, size_t size)
{
    if (c->slot >= 0)
        snprintf(buf, size, "worker %d", c->slot);
    else
        snprintf(buf, size, "%s", c->role);
    return buf;
}

/* ---- listeners ---- */

static int addr_port(const struct sockaddr_storage *ss)
{
    if (ss->ss_family == AF_INET)
        return ntohs(((const struct sockaddr_in *)ss)->sin_port);
    if (ss->ss_family == AF_INET6)
        return ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
    return -1;
}

static void addr_set_port(struct sockaddr_storage *ss, int port)
{
    if (ss->ss_family == AF_INET)
        ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
    else if (ss->ss_family == AF_INET6)
        ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)port);
}

/* One listening socket with SO_REUSEPORT so each worker slot has its own accept queue.
 * With `reuseport` 0 it only checks that nobody else holds the address. */
static int listener_open(const struct conf_listen *l, const struct sockaddr_storage *addr,
                         int backlog, int reuseport, int *out)
{
    int one = 1, err;
    int fd = socket(addr->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd == -1)
        return -errno;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == -1)
        goto fail;
    if (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) == -1)
        goto fail;
    if (addr->ss_family == AF_INET6 &&
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) == -1)
        goto fail;
    if (bind(fd, (const struct sockaddr *)addr, l->addr_len) == -1)
        goto fail;
    if (reuseport && listen(fd, backlog) == -1)
        goto fail;
    *out = fd;
    return 0;
fail:
    err = -errno;
    close(fd);
    return err;
}

/* The old generation's listen with the same address as l (-1: none). */
static int listen_match(const struct gen *old, const struct conf_listen *l)
{
    for (int i = 0; old && i < old->conf->n_listens; i++) {
        const struct conf_listen *o = &old->conf->listens[i];
        if (o->addr_len == l->addr_len && !memcmp(&o->addr, &l->addr, l->addr_len))
            return i;
    }
    return -1;
}

/* Binds every [listen] of g once per worker slot. On a reload (old != NULL) a bind that stays
 * takes the old generation's sockets (its own dup'ed copies: the same accept queues, so no
 * connection waits in a queue that nobody will take), and only slots the old one did not have
 * get new sockets on the same port. Returns 0, or -errno after logging which address failed
 * and why. */
static int listeners_bind(struct gen *g, const struct gen *old)
{
    struct conf *conf = g->conf;
    int workers = g->workers;
    int n = conf->n_listens * workers;
    g->fds = malloc(sizeof(int) * (size_t)(n ? n : 1));
    if (!g->fds)
        return -ENOMEM;
    for (int i = 0; i < n; i++)
        g->fds[i] = -1;
    g->n_fds = n;

    for (int li = 0; li < conf->n_listens; li++) {
        const struct conf_listen *l = &conf->listens[li];
        struct sockaddr_storage addr = l->addr;
        int backlog = l->backlog > 0 ? l->backlog : 511;
        int rc, probe = -1, ol = listen_match(old, l), s = 0;

        if (ol >= 0) {
            int ofd = old->fds[ol]; /* slot 0's: its port, when the config says 0 */
            struct sockaddr_storage got;
            socklen_t len = sizeof(got);
            if (getsockname(ofd, (struct sockaddr *)&got, &len) == 0)
                addr_set_port(&addr, addr_port(&got));
            for (; s < workers && s < old->workers; s++) {
                int fd = fcntl(old->fds[s * old->conf->n_listens + ol], F_DUPFD_CLOEXEC, 3);
                if (fd == -1) {
                    rc = -errno;
                    log_err("cannot keep %s (listen %s): %s", l->bind, l->name, strerror(-rc));
                    return rc;
                }
                g->fds[s * conf->n_listens + li] = fd;
            }
        } else if (addr_port(&addr) != 0) {
            /* SO_REUSEPORT would let us share a port another process (another aigw) already
             * listens on: a plain bind first turns that into a clear "address in use". */
            rc = listener_open(l, &addr, backlog, 0, &probe);
            if (rc < 0) {
                log_err("cannot bind %s (listen %s): %s", l->bind, l->name, strerror(-rc));
                return rc;
            }
            close(probe);
        }
        for (; s < workers; s++) {
            int *fd = &g->fds[s * conf->n_listens + li];
            rc = listener_open(l, &addr, backlog, 1, fd);
            if (rc < 0) {
                log_err("cannot bind %s (listen %s): %s", l->bind, l->name, strerror(-rc));
                return rc;
            }
            /* Port 0 picks an ephemeral port: the other slots must share that one. */
            if (addr_port(&addr) == 0) {
                struct sockaddr_storage got;
                socklen_t len = sizeof(got);
                if (getsockname(*fd, (struct sockaddr *)&got, &len) == 0)
                    addr_set_port(&addr, addr_port(&got));
            }
        }
        log_info("listening on %s (listen %s, %d sockets, backlog %d%s)", l->bind, l->name, workers,
                 backlog, ol >= 0 ? ", kept" : "");
    }
    return 0;
}

static void gen_close_fds(struct gen *g)
{
    for (int i = 0; g && i < g->n_fds; i++) {
        if (g->fds[i] >= 0)
            close(g->fds[i]);
        g->fds[i] = -1;
    }
}

/* Every generation the master holds: the serving one, the one starting, the draining ones. */
static int gen_all(struct gen **out, int max)
{
    int n = 0;
    if (M.g && n < max)
        out[n++] = M.g;
    if (M.next && n < max)
        out[n++] = M.next;
    for (struct gen *o = M.old; o && n < max; o = o->next)
        out[n++] = o;
    return n;
}

#define GEN_MAX 64 /* generations alive at once: reloads faster than old ones drain are refused */

static void listeners_close(void)
{
    struct gen *gs[GEN_MAX];
    int n = gen_all(gs, GEN_MAX);
    for (int i = 0; i < n; i++)
        gen_close_fds(gs[i]);
}

/* ---- admin socket ---- */

static void admin_client_closed(uv_handle_t *h)
{
    struct admin_client *c = h->data;
    if (--c->open_handles == 0) {
        if (c->next)
            c->next->pprev = c->pprev;
        *c->pprev = c->next;
        free(c->out);
        free(c);
    }
}

static void admin_client_close(struct admin_client *c)
{
    if (!uv_is_closing((uv_handle_t *)&c->pipe))
        uv_close((uv_handle_t *)&c->pipe, admin_client_closed);
    if (!uv_is_closing((uv_handle_t *)&c->timer))
        uv_close((uv_handle_t *)&c->timer, admin_client_closed);
}

static void admin_client_written(uv_write_t *req, int status)
{
    struct admin_client *c = req->data;
    int stop = c->pending.stop;

    admin_client_close(c);
    /* `stop` is answered first: the stop closes the admin socket */
    if (stop) {
        log_info("admin: graceful stop requested");
        master_stop(STOP_GRACEFUL);
    }
}

/* The process list as show proc reports it: master, health, then the workers. */
static int admin_procs(struct admin_proc *procs, int max)
{
    int n = 0;
    procs[n++] = (struct admin_proc){"master", -1, (int)getpid(), M.started_ms, 0};
    for (int i = 0; i < M.g->n_children && n < max; i++) {
        const struct child *c = &M.g->children[i];
        procs[n++] = (struct admin_proc){c->role, c->slot, (int)c->pid, c->started_ms, c->restarts};
    }
    return n;
}

/* A generation's workers' figures: requests answered, client connections, access log drops. */
static void gen_worker_sums(const struct gen *g, uint64_t *requests, uint64_t *conns,
                            uint64_t *drops)
{
    if (!g->shm_ready)
        return;
    for (uint32_t w = 0; w < shm_n_workers(&g->shm); w++) {
        struct shm_worker *sw = shm_worker(&g->shm, w);
        *requests += atomic_load_explicit(&sw->requests, memory_order_relaxed);
        *conns += atomic_load_explicit(&sw->conns, memory_order_relaxed);
        *drops += atomic_load_explicit(&sw->alog_drops, memory_order_relaxed);
    }
}

/* Once a second: the requests answered since the last sample, of every generation, added to
 * the master's own count (a generation's count starts at 0 in its new segment), into the ring
 * show info takes requests/s from. */
static void rate_note(struct gen *g)
{
    uint64_t r = 0, c = 0, d = 0;

    if (!g)
        return;
    gen_worker_sums(g, &r, &c, &d);
    M.requests += r > g->req_seen ? r - g->req_seen : 0;
    g->req_seen = r;
}

static void rate_timer_fired(uv_timer_t *t)
{
    (void)t;
    rate_note(M.g);
    rate_note(M.next);
    for (struct gen *o = M.old; o; o = o->next)
        rate_note(o);
    admin_rate_push(&M.rate, M.requests);
}

static void master_info(struct admin_info *in)
{
    uint64_t r = 0, conns = 0, drops = 0;
    int draining = 0;

    memset(in, 0, sizeof(*in));
    gen_worker_sums(M.g, &r, &conns, &drops);
    for (struct gen *o = M.old; o; o = o->next) {
        gen_worker_sums(o, &r, &conns, &drops);
        draining++;
    }
    in->version = AIGW_VERSION;
    in->pid = (int)getpid();
    in->started_ms = M.started_ms;
    in->now_ms = time_real_ms();
    in->generation = M.g->id;
    in->workers = M.g->workers;
    in->draining = draining;
    in->conns = conns;
    in->requests = M.requests;
    in->rate_x10 = admin_rate_x10(&M.rate, &in->rate_secs);
    in->alog_drops = drops;
    in->config = M.g->conf->path;
}

static void admin_client_timeout(uv_timer_t *t)
{
    struct admin_client *c = t->data;
    log_debug("admin: client idle for %d ms, closing", ADMIN_IDLE_MS);
    admin_client_close(c);
}

static void admin_client_send(struct admin_client *c)
{
    uv_buf_t buf = uv_buf_init(c->out, (unsigned)c->out_len);
    c->wr.data = c;
    if (uv_write(&c->wr, (uv_stream_t *)&c->pipe, &buf, 1, admin_client_written) < 0)
        admin_client_close(c);
}

/* Polls shm until the health checker has carried out the breaker command, so that a
 * `show backends` right after the answer shows the new state. Never longer than
 * ADMIN_WAIT_MS: a checker being restarted takes the command when it is back. */
static void admin_client_wait(uv_timer_t *t)
{
    struct admin_client *c = t->data;
    int moved = c->gen_id != M.g->id; /* a reload took over: the command's segment is old */
    int done = !moved && admin_pending_done(&M.g->shm, &c->pending);
    if (!done && !moved && time_mono_ms() < c->wait_until)
        return;
    /* Back to the idle timeout, which now bounds the write. */
    uv_timer_start(&c->timer, admin_client_timeout, ADMIN_IDLE_MS, 0);
    if (moved && c->pending.kind == ADMIN_WAIT_CHECK) {
        static const char msg[] = "error: a reload took over while the check ran; try again\n";
        char *out = strdup(msg);
        if (out) {
            free(c->out);
            c->out = out;
            c->out_len = sizeof(msg) - 1;
        }
    } else if (c->pending.kind == ADMIN_WAIT_CHECK) {
        char *out = NULL;
        size_t len = 0;
        if (admin_check_answer(M.g->conf, &M.g->shm, &c->pending, &out, &len) != -ENOMEM) {
            free(c->out);
            c->out = out;
            c->out_len = len;
        }
    } else if (!done) {
        log_warn("admin: the health checker has not carried out '%s' within %d ms", c->line,
                 ADMIN_WAIT_MS);
    }
    admin_client_send(c);
}

/* Answers the line read so far, or with `error` when there is one, then closes. */
static void admin_client_answer(struct admin_client *c, const char *error)
{
    int max = M.g->n_children + 1;
    struct admin_proc *procs = calloc((size_t)max, sizeof(*procs));
    char *out = NULL;
    size_t len = 0;
    int rc = -ENOMEM;

    uv_read_stop((uv_stream_t *)&c->pipe);
    c->pending.backend = -1;
    int rjson = 0, ujson = 0, reload = !error && admin_is_reload(c->line, &rjson);
    if (reload || (!error && admin_is_upgrade(c->line, &ujson))) {
        int up = !reload;
        c->json = rjson || ujson;
        char *err = NULL;
        free(procs);
        if ((up ? master_upgrade(&err) : master_reload(&err)) == 0) {
            uv_timer_stop(&c->timer); /* the reload's own deadline bounds the wait */
            c->next_waiter = M.waiters;
            M.waiters = c;
            return;
        }
        log_warn("admin: %s refused: %s", up ? "upgrade" : "reload", err ? err : "out of memory");
        len = (size_t)snprintf(NULL, 0, "error: %s\n", err ? err : "out of memory");
        out = malloc(len + 1);
        if (out)
            snprintf(out, len + 1, "error: %s\n", err ? err : "out of memory");
        free(err);
        c->out = out;
        c->out_len = out ? len : 0;
        if (out)
            admin_client_send(c);
        else
            admin_client_close(c);
        return;
    }
    if (error) {
        out = strdup(error);
        len = out ? strlen(out) : 0;
        rc = out ? -EINVAL : -ENOMEM;
    } else if (procs) {
        struct admin_info info;
        master_info(&info);
        rc = admin_exec(c->line, M.g->conf, &M.g->shm, procs, admin_procs(procs, max), &info,
                        &c->pending, &out, &len);
    }
    free(procs);
    if (rc == -ENOMEM || !out) {
        static const char oom[] = "error: out of memory\n";
        free(out);
        out = strdup(oom);
        len = out ? sizeof(oom) - 1 : 0;
    }
    if (!out) {
        admin_client_close(c);
        return;
    }
    log_debug("admin: '%s'", c->line);
    c->out = out;
    c->out_len = len;
    if (rc == 0 && c->pending.backend >= 0) {
        const struct conf_backend *cb = &M.g->conf->backends[c->pending.backend];
        if (c->pending.kind == ADMIN_WAIT_CHECK)
            log_info("admin: check requested for backend %s/%s", M.g->conf->pools[cb->pool].name,
                     cb->name);
        else
            log_info("admin: breaker %s requested for backend %s/%s",
                     c->pending.want == BREAKER_OPEN ? "open" : "reset",
                     M.g->conf->pools[cb->pool].name, cb->name);
        if (c->pending.kind == ADMIN_WAIT_CHECK || !admin_pending_done(&M.g->shm, &c->pending)) {
            c->wait_until =
                time_mono_ms() + (c->pending.wait_ms ? c->pending.wait_ms : ADMIN_WAIT_MS);
            c->gen_id = M.g->id;
            uv_timer_start(&c->timer, admin_client_wait, ADMIN_POLL_MS, ADMIN_POLL_MS);
            return;
        }
    }
    admin_client_send(c);
}

static void admin_client_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    struct admin_client *c = h->data;
    *buf = uv_buf_init(c->line + c->len, (unsigned)(ADMIN_LINE_MAX - c->len));
}

static void admin_client_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct admin_client *c = s->data;
    if (nread == UV_EOF && c->len > 0) { /* a last line without '\n' still counts */
        c->line[c->len] = '\0';
        admin_client_answer(c, NULL);
        return;
    }
    if (nread < 0) {
        admin_client_close(c);
        return;
    }
    char *nl = memchr(c->line + c->len, '\n', (size_t)nread);
    c->len += (size_t)nread;
    if (nl) {
        *nl = '\0';
        admin_client_answer(c, NULL);
    } else if (c->len >= ADMIN_LINE_MAX) {
        /* Refuse rather than run a truncated command. */
        admin_client_answer(c, "error: command line too long\n");
    }
}

static void admin_on_connection(uv_stream_t *server, int status)
{
    if (status < 0)
        return;
    struct admin_client *c = calloc(1, sizeof(*c));
    if (!c)
        return;
    /* these two only initialise the handles; the admin timers' uv_timer_start calls fail only
     * on a closing handle, which a client being answered never has */
    uv_pipe_init(&M.loop, &c->pipe, 0);
    uv_timer_init(&M.loop, &c->timer);
    c->pipe.data = c->timer.data = c;
    c->open_handles = 2;
    c->next = M.clients;
    if (c->next)
        c->next->pprev = &c->next;
    c->pprev = &M.clients;
    M.clients = c;
    if (uv_accept(server, (uv_stream_t *)&c->pipe) < 0 ||
        uv_read_start((uv_stream_t *)&c->pipe, admin_client_alloc, admin_client_read) < 0) {
        admin_client_close(c);
        return;
    }
    uv_timer_start(&c->timer, admin_client_timeout, ADMIN_IDLE_MS, 0);
}

/* Listens on fd, the admin socket bound at path (the handle owns fd, even on failure). */
static int admin_start(int fd, const char *path)
{
    int rc;

    snprintf(M.admin_path, sizeof(M.admin_path), "%s", path);
    uv_pipe_init(&M.loop, &M.admin, 0); /* cannot fail: it only initialises the handle */
    rc = uv_pipe_open(&M.admin, fd);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    rc = uv_listen((uv_stream_t *)&M.admin, 16, admin_on_connection);
    if (rc < 0)
        log_err("cannot listen on admin socket %s: %s", path, uv_strerror(rc));
    return rc;
}

/* 1 when something answers on the unix socket at path, 0 when connecting fails (a socket file
 * nobody listens on: stale), -errno when it cannot be tried. */
static int admin_socket_probe(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int fd, rc;

    if (strlen(path) >= sizeof(sa.sun_path))
        return -ENAMETOOLONG;
    memcpy(sa.sun_path, path, strlen(path) + 1);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd == -1)
        return -errno;
    rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
    close(fd);
    return rc;
}

/* Binds the admin socket (mode 0600). A live master already answering there is an error; a
 * stale socket file left by a killed master is replaced. The socket is made by hand and
 * handed to libuv with uv_pipe_open so that closing the handle (in children too) never
 * unlinks the path: only the master removes it, when it stops. */
static int admin_listen(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct stat st;
    int fd = -1, rc;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        log_err("admin socket path too long: %s", path);
        return -ENAMETOOLONG;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);

    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            log_err("admin socket %s exists and is not a socket", path);
            return -EEXIST;
        }
        rc = admin_socket_probe(path);
        if (rc < 0)
            return rc;
        if (rc == 1) {
            log_err("another aigw is running on %s", path);
            return -EADDRINUSE;
        }
        log_info("removing stale admin socket %s", path);
        if (unlink(path) == -1 && errno != ENOENT) {
            rc = -errno;
            log_err("cannot remove stale admin socket %s: %s", path, strerror(-rc));
            return rc;
        }
    }

    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd == -1)
        return -errno;
    mode_t old = umask(0177); /* no window in which the socket is open to others */
    rc = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
    umask(old);
    if (rc == -1) {
        rc = -errno;
        log_err("cannot bind admin socket %s: %s", path, strerror(-rc));
        goto fail;
    }
    snprintf(M.admin_path, sizeof(M.admin_path), "%s", path);
    if (chmod(path, 0600) == -1) {
        rc = -errno;
        log_err("cannot chmod admin socket %s: %s", path, strerror(-rc));
        goto fail;
    }
    return admin_start(fd, path);
fail:
    if (fd >= 0)
        close(fd);
    return rc;
}

/* ---- children ---- */

static void child_after_fork_walk(uv_handle_t *h, void *arg)
{
    if (h->type == UV_SIGNAL) {
        /* A signal the master caught but had not dispatched when it forked is the master's:
         * its note is in the master's signal pipe, which uv_loop_fork replaced here. libuv
         * finishes closing a signal handle only once every caught signal was dispatched, so
         * the loop below would spin for ever (seen: a SIGCHLD from an old generation's exit
         * just before a reload's fork left new workers spinning, never ready). */
        uv_signal_t *s = (uv_signal_t *)h;
        s->dispatched_signals = s->caught_signals;
    }
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

void master_child_after_fork(void)
{
    if (M.loop_ready) {
        /* libuv's signal handling is process-wide: the inherited loop must be re-armed for
         * this process, then torn down, so its handlers and signal pipe stop existing here.
         * If it cannot be re-armed (no fd for its epoll or signal pipe), the loop is left as
         * it is: running it could block on the master's descriptors, and the dispositions set
         * below replace the master's handlers anyway. */
        int rc = uv_loop_fork(&M.loop);
        if (rc == 0) {
            /* admin clients are closed their own way, which frees them (a child's sanitizer
             * reported the one open at the fork as leaked) */
            for (struct admin_client *c = M.clients; c; c = c->next) {
                c->pending.stop = 0; /* its cancelled write must not stop this process */
                admin_client_close(c);
            }
            uv_walk(&M.loop, child_after_fork_walk, NULL);
            uv_run(&M.loop, UV_RUN_DEFAULT);
            uv_loop_close(&M.loop);
        } else {
            log_warn("cannot re-arm the inherited event loop: %s", uv_strerror(rc));
        }
        M.loop_ready = 0;
    }
    M.admin_path[0] = '\0'; /* the socket file is the master's to remove */
    daemon_child_after_fork();
    sig_child_after_fork();
}

/* Child side of a fork: release what belongs to the master, then run the role. */
static void __attribute__((noreturn)) child_run(struct child *c, pid_t master)
{
    char name[32];
    int rc;

    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != master) /* the master died before prctl took effect */
        _exit(0);
    log_set_role(child_name(c, name, sizeof(name)));
    struct gen *g = c->g, *gs[GEN_MAX];
    int n = gen_all(gs, GEN_MAX);
    /* Keep only this slot's listening sockets (the master keeps all of them), and only this
     * generation's segment. */
    for (int k = 0; k < n; k++) {
        for (int i = 0; i < gs[k]->n_fds; i++) {
            int mine = gs[k] == g && c->slot >= 0 && i / g->conf->n_listens == c->slot;
            if (!mine && gs[k]->fds[i] >= 0) {
                close(gs[k]->fds[i]);
                gs[k]->fds[i] = -1;
            }
        }
        if (gs[k] != g && gs[k]->shm_ready) {
            shm_destroy(&gs[k]->shm);
            gs[k]->shm_ready = 0;
        }
    }
    if (M.upfrom && M.upfrom->shm_ready) {
        shm_destroy(&M.upfrom->shm);
        M.upfrom->shm_ready = 0;
    }
    master_child_after_fork();
    if (c->slot >= 0)
        rc = worker_main(g->conf, &g->shm, c->slot, &g->fds[c->slot * g->conf->n_listens]);
    else if (!strcmp(c->role, "sync"))
        rc = sync_main(g->conf, &g->shm);
    else
        rc = health_main(g->conf, &g->shm);
    exit(rc); /* not _exit: sanitizers in the child report at exit */
}

static void child_spawn(struct child *c)
{
    char name[32];
    sigset_t all, old;
    pid_t master = getpid();

    c->pending = 0;

    /* Signals stay blocked across fork: a signal reaching the child before it dropped the
     * master's libuv handlers would be written into the master's signal pipe. */
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    pid_t pid = fork();
    if (pid == 0)
        child_run(c, master);
    sigprocmask(SIG_SETMASK, &old, NULL);

    if (pid == -1) {
        log_err("cannot fork %s: %s; retrying in %d ms", child_name(c, name, sizeof(name)),
                strerror(errno), RESTART_BACKOFF_MAX);
        c->pending = 1;
        c->restart_at = time_mono_ms() + RESTART_BACKOFF_MAX;
        return;
    }
    c->pid = pid;
    c->started_ms = time_real_ms();
    c->started_mono = time_mono_ms();
    if (c->slot >= 0)
        atomic_store_explicit(&shm_worker(&c->g->shm, (uint32_t)c->slot)->pid, pid,
                              memory_order_release);
    log_info("%s started (pid %d)", child_name(c, name, sizeof(name)), (int)pid);
}

/* The master's restart and stop timers live as long as its loop: uv_timer_start on them
 * cannot fail (it fails only on a closing handle). */
static void restart_timer_fired(uv_timer_t *t)
{
    uv_stop(&M.loop); /* forks happen outside uv_run, see master_run */
}

/* Starts every child whose restart is due and arms the timer for the next one. Runs outside
 * uv_run so a child never inherits a loop in the middle of a callback. */
static void children_spawn_due(void)
{
    uint64_t now = time_mono_ms(), next = 0;

    if (M.stopping)
        return;
    for (int k = 0; k < 2; k++) {
        struct gen *g = k ? M.next : M.g;
        for (int i = 0; g && i < g->n_children; i++) {
            struct child *c = &g->children[i];
            if (c->pending && c->restart_at <= now && c->release_busy &&
                !(c->release_busy = shm_worker_reset(&g->shm, (uint32_t)c->slot) == -EBUSY))
                log_info("worker %d: its limiter shares are given back: it starts again", c->slot);
            if (c->pending && c->restart_at <= now && c->release_busy) {
                /* a new worker in the slot would have its predecessor's shares given back as
                 * its own later: the slot waits until a stopped process lets go of the lock */
                log_warn("worker %d: a limiter's lock is held by a stopped process: its slots "
                         "cannot be given back yet; trying again in %d ms",
                         c->slot, RESTART_BACKOFF_MAX);
                c->restart_at = now + RESTART_BACKOFF_MAX;
            }
            if (c->pending && c->restart_at <= now)
                child_spawn(c);
            if (c->pending && (!next || c->restart_at < next))
                next = c->restart_at;
        }
    }
    if (next)
        uv_timer_start(&M.restart_timer, restart_timer_fired, next > now ? next - now : 0, 0);
}

static int gen_alive(const struct gen *g)
{
    int n = 0;
    for (int i = 0; i < g->n_children; i++)
        n += g->children[i].pid > 0;
    return n;
}

static void gen_signal(const struct gen *g, int sig)
{
    for (int i = 0; i < g->n_children; i++)
        if (g->children[i].pid > 0)
            kill(g->children[i].pid, sig);
}

static int children_alive(void)
{
    struct gen *gs[GEN_MAX];
    int n = 0, ng = gen_all(gs, GEN_MAX);
    for (int k = 0; k < ng; k++)
        n += gen_alive(gs[k]);
    return n;
}

static void children_signal(int sig)
{
    struct gen *gs[GEN_MAX];
    int ng = gen_all(gs, GEN_MAX);
    for (int k = 0; k < ng; k++)
        gen_signal(gs[k], sig);
}

/* The workers of every generation (not the health checkers, which ignore it anyway). */
static void workers_signal(int sig)
{
    struct gen *gs[GEN_MAX];
    int ng = gen_all(gs, GEN_MAX);
    for (int k = 0; k < ng; k++)
        for (int i = 0; i < gs[k]->n_children; i++)
            if (gs[k]->children[i].slot >= 0 && gs[k]->children[i].pid > 0)
                kill(gs[k]->children[i].pid, sig);
}

static void reload_fail(const char *msg);
static void gen_reap_old(void);
static void reload_unsteer(struct gen *g);

/* A child's restarts, also in its generation's segment: the next generation (a reload's, or a
 * binary upgrade's new master) goes on counting from there. */
static void gen_restarts_note(const struct child *c)
{
    if (!c->g->shm_ready)
        return;
    if (c->slot >= 0)
        atomic_store_explicit(&shm_worker(&c->g->shm, (uint32_t)c->slot)->restarts, c->restarts,
                              memory_order_relaxed);
    else
        atomic_store_explicit(&c->g->shm.hdr->carried.health_restarts, c->restarts,
                              memory_order_relaxed);
}

/* g's children start with the restarts of o's in the same role and slot. */
static void gen_restarts_carry(struct gen *g, const struct gen *o)
{
    for (int i = 0; o->shm_ready && i < g->n_children; i++) {
        struct child *c = &g->children[i];
        if (c->slot < 0)
            c->restarts = (unsigned)atomic_load_explicit(&o->shm.hdr->carried.health_restarts,
                                                         memory_order_relaxed);
        else if ((uint32_t)c->slot < shm_n_workers(&o->shm))
            c->restarts = atomic_load_explicit(&shm_worker(&o->shm, (uint32_t)c->slot)->restarts,
                                               memory_order_relaxed);
        gen_restarts_note(c);
    }
}

/* Logs a child's end and, unless stopping, schedules its restart: at once the first time, with
 * a doubling delay while it keeps dying soon after starting. */
static void child_exited(struct child *c, int status)
{
    char name[32], how[64];
    uint64_t now = time_mono_ms();

    child_name(c, name, sizeof(name));
    if (WIFSIGNALED(status))
        snprintf(how, sizeof(how), "killed by signal %d%s", WTERMSIG(status),
                 WCOREDUMP(status) ? " (core dumped)" : "");
    else
        snprintf(how, sizeof(how), "exited with code %d", WEXITSTATUS(status));
    pid_t pid = c->pid;
    c->pid = 0;
    /* Its in-flight and trial slots end with it, now: not when a replacement starts, which a
     * crash loop's back-off (or a stop) may put off for long, holding max_conns and half-open
     * trial slots that nobody uses. */
    if (c->slot >= 0 && c->g->shm_ready)
        c->release_busy = shm_worker_reset(&c->g->shm, (uint32_t)c->slot) == -EBUSY;

    if (M.stopping || c->g != M.g) {
        if (c->g == M.next) { /* a new generation's process died before it was ready */
            char msg[160];
            snprintf(msg, sizeof(msg),
                     "generation %u: %s %s before it was ready; generation %u goes on serving",
                     c->g->id, name, how, M.g->id);
            reload_fail(msg);
        }
        log_info("%s (pid %d, generation %u) %s", name, (int)pid, c->g->id, how);
        return;
    }

    if (now - c->started_mono < RESTART_FAST_MS)
        c->fast_deaths++;
    else
        c->fast_deaths = 0;
    uint64_t delay = 0;
    if (c->fast_deaths > 1) {
        delay = RESTART_BACKOFF_MS;
        for (unsigned k = 2; k < c->fast_deaths && delay < RESTART_BACKOFF_MAX; k++)
            delay *= 2;
        if (delay > RESTART_BACKOFF_MAX)
            delay = RESTART_BACKOFF_MAX;
    }
    if (delay)
        log_warn("%s (pid %d) %s; restarting in %llu ms", name, (int)pid, how,
                 (unsigned long long)delay);
    else
        log_warn("%s (pid %d) %s; restarting", name, (int)pid, how);
    c->restarts++;
    gen_restarts_note(c);
    c->pending = 1;
    c->restart_at = now + delay;
    uv_stop(&M.loop);
}

static void on_sigchld(uv_signal_t *h, int sig)
{
    int status;
    pid_t pid;

    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        struct gen *gs[GEN_MAX];
        int ng = gen_all(gs, GEN_MAX), found = upgrade_reap(pid, status);
        for (int k = 0; k < ng && !found; k++) {
            for (int i = 0; i < gs[k]->n_children; i++) {
                if (gs[k]->children[i].pid == pid) {
                    child_exited(&gs[k]->children[i], status);
                    found = 1;
                    break;
                }
            }
        }
    }
    gen_reap_old();
    if (M.stopping && children_alive() == 0 && !upgrade_busy()) {
        M.done = 1;
        uv_stop(&M.loop);
    }
}

static void stop_timer_fired(uv_timer_t *t)
{
    int n = children_alive();
    if (!n)
        return;
    if (M.stopping == STOP_GRACEFUL)
        log_warn("hard_stop_after (%llu ms) passed %d ms ago: killing %d remaining children",
                 (unsigned long long)M.g->conf->global.hard_stop_after_ms, HARD_STOP_GRACE_MS, n);
    else
        log_warn("fast stop: killing %d children still running", n);
    children_signal(SIGKILL);
}

static void master_stop(enum master_stop how)
{
    if (M.stopping == STOP_FAST || M.stopping == how)
        return; /* already doing this, or something faster */
    if (!M.stopping && !M.upgraded)
        daemon_stopping();
    M.stopping = how;
    if (M.next)
        reload_fail("the master is stopping");
    stats_set_stopping();
    listeners_close(); /* the workers keep theirs until they exit */
    uv_timer_stop(&M.restart_timer);
    uv_timer_stop(&M.start_timer);
    M.start_hold_until = 0;
    for (int i = 0; i < M.g->n_children; i++)
        M.g->children[i].pending = 0;
    uv_timer_stop(&M.stop_timer);

    int n = children_alive();
    if (how == STOP_GRACEFUL) {
        log_info("graceful stop: stopped accepting, asking %d children to finish", n);
        children_signal(SIGTERM);
        if (M.g->conf->global.hard_stop_after_ms)
            uv_timer_start(&M.stop_timer, stop_timer_fired,
                           M.g->conf->global.hard_stop_after_ms + HARD_STOP_GRACE_MS, 0);
    } else {
        log_info("fast stop: closing %d children", n);
        children_signal(SIGINT);
        uv_timer_start(&M.stop_timer, stop_timer_fired, FAST_STOP_MS, 0);
    }
    if (n == 0 && !upgrade_busy()) {
        M.done = 1;
        uv_stop(&M.loop);
    }
}

static void on_signal(uv_signal_t *h, int sig)
{
    switch (sig) {
    case SIGTERM:
    case SIGQUIT: /* as nginx's QUIT: a graceful stop */
        log_info("%s received", sig == SIGTERM ? "SIGTERM" : "SIGQUIT");
        master_stop(STOP_GRACEFUL);
        break;
    case SIGINT:
        log_info("SIGINT received");
        master_stop(STOP_FAST);
        break;
    case SIGHUP:
        log_info("SIGHUP received: reloading the configuration");
        master_reload_signal();
        break;
    case SIGUSR2: {
        char *err = NULL;
        log_info("SIGUSR2 received: upgrading to the binary %s", upgrade_exe());
        if (master_upgrade(&err) < 0)
            log_err("upgrade refused: %s", err ? err : "out of memory");
        free(err);
        break;
    }
    case SIGUSR1:
        /* logrotate: each worker reopens its access log file (the error log is stderr) */
        if (M.g->conf->global.access_log != ALOG_FILE) {
            log_info("SIGUSR1 received: nothing to reopen (no access_log file); ignored");
            break;
        }
        log_info("SIGUSR1 received: the workers reopen %s", M.g->conf->global.access_log_path);
        workers_signal(SIGUSR1); /* of every generation: a draining one still logs */
        break;
    }
}

/* Every signal the master acts on, handled from the loop. Installed first thing, so that a
 * stop request during the start is a clean stop. */
static int master_signals(void)
{
    static const struct {
        uv_signal_t *h;
        int sig;
    } sigs[] = {
        {&M.sig_term, SIGTERM}, {&M.sig_int, SIGINT},   {&M.sig_quit, SIGQUIT},
        {&M.sig_hup, SIGHUP},   {&M.sig_usr1, SIGUSR1}, {&M.sig_usr2, SIGUSR2},
    };
    int rc;

    sig_ignore_unused(0);
    if ((rc = uv_signal_init(&M.loop, &M.sig_chld)) < 0 ||
        (rc = uv_signal_start(&M.sig_chld, on_sigchld, SIGCHLD)) < 0)
        goto fail;
    for (size_t i = 0; i < ARRAY_SIZE(sigs); i++)
        if ((rc = uv_signal_init(&M.loop, sigs[i].h)) < 0 ||
            (rc = uv_signal_start(sigs[i].h, on_signal, sigs[i].sig)) < 0)
            goto fail;
    return 0;
fail:
    log_err("cannot set up signal handling: %s", uv_strerror(rc));
    return rc;
}

/* The fds one process may need at most: a worker's clients, one upstream connection each, its
 * pooled idle upstream connections and listeners; the master's listeners; the checker's check
 * connections; each plus FD_RESERVE. per_worker = a worker's client limit. */
static uint64_t fd_need(const struct conf *conf, int workers, uint64_t per_worker)
{
    uint64_t idle = 0, need;

    for (int b = 0; b < conf->n_backends; b++)
        idle += (uint64_t)(conf->backends[b].keepalive > 0 ? conf->backends[b].keepalive : 0);
    need = FD_RESERVE + (uint64_t)conf->n_listens + idle + 2 * per_worker;
    if (need < FD_RESERVE + (uint64_t)conf->n_listens * (uint64_t)workers)
        need = FD_RESERVE + (uint64_t)conf->n_listens * (uint64_t)workers;
    if (need < FD_RESERVE + (uint64_t)conf->n_backends)
        need = FD_RESERVE + (uint64_t)conf->n_backends;
    return need;
}

/* Resolves maxconn and sets RLIMIT_NOFILE for every process (the children inherit it) so that
 * a worker at its client limit still has an fd for each upstream connection: running out of
 * fds is then never what a client or a backend sees. maxconn counts over all workers; each
 * worker takes ceil(maxconn / workers) (HAProxy's maxconn is per process: here the gateway is
 * the master and its workers). maxconn 0 takes the most the hard limit allows. */
static int master_fd_limit(struct conf *conf, int workers)
{
    struct rlimit rl, want;
    uint64_t per_worker, need;

    if (getrlimit(RLIMIT_NOFILE, &rl) == -1) {
        log_err("cannot read RLIMIT_NOFILE: %s", strerror(errno));
        return -errno;
    }
    if (!conf->global.maxconn) {
        uint64_t fixed = fd_need(conf, workers, 0);
        per_worker = rl.rlim_max > fixed ? (rl.rlim_max - fixed) / 2 : 0;
        if (per_worker * (uint64_t)workers > UINT32_MAX)
            per_worker = UINT32_MAX / (uint64_t)workers;
        if (per_worker < 1) {
            log_err("RLIMIT_NOFILE hard limit %llu leaves no file descriptor for client "
                    "connections (%llu needed besides them): raise it (ulimit -Hn, systemd "
                    "LimitNOFILE=)",
                    (unsigned long long)rl.rlim_max, (unsigned long long)fixed);
            return -EMFILE;
        }
        conf->global.maxconn = (uint32_t)(per_worker * (uint64_t)workers);
    }
    per_worker = (conf->global.maxconn + (uint64_t)workers - 1) / (uint64_t)workers;
    need = fd_need(conf, workers, per_worker);
    want = rl;
    if (want.rlim_cur < need)
        want.rlim_cur = need;
    if (want.rlim_max < need)
        want.rlim_max = need; /* only a privileged master may raise the hard limit */
    if ((want.rlim_cur != rl.rlim_cur || want.rlim_max != rl.rlim_max) &&
        setrlimit(RLIMIT_NOFILE, &want) == -1) {
        int err = errno;
        log_err("maxconn %u needs %llu file descriptors per worker (%llu connections, each with "
                "an upstream one, plus pooled connections and listeners), but RLIMIT_NOFILE is "
                "%llu (hard %llu) and cannot be raised: %s; raise the limit (ulimit -n, systemd "
                "LimitNOFILE=) or lower maxconn",
                conf->global.maxconn, (unsigned long long)need, (unsigned long long)per_worker,
                (unsigned long long)rl.rlim_cur, (unsigned long long)rl.rlim_max, strerror(err));
        return -err;
    }
    log_info("maxconn %u (%llu per worker), RLIMIT_NOFILE %llu", conf->global.maxconn,
             (unsigned long long)per_worker, (unsigned long long)want.rlim_cur);
    return 0;
}

/* Only admin client handles carry data (their struct admin_client); the master's own handles
 * are static. */
static void master_close_walk(uv_handle_t *h, void *arg)
{
    if (uv_is_closing(h))
        return;
    if (h->data)
        admin_client_close(h->data);
    else
        uv_close(h, NULL);
}

static int master_shm_create(struct gen *g);
static int gen_children(struct gen *g);
static void gen_free(struct gen *g);
static int master_state_load(const struct conf *conf);
static void master_state_save(void);

/* The access log file can be opened (each worker opens it itself): a wrong path or mode stops
 * the start, as nginx does, rather than a worker logging it later. */
static int master_access_log_check(const struct conf *conf)
{
    int fd;

    if (conf->global.access_log != ALOG_FILE)
        return 0;
    fd = open(conf->global.access_log_path, O_WRONLY | O_APPEND | O_CREAT | O_NONBLOCK | O_CLOEXEC,
              0640);
    if (fd == -1) {
        int e = errno;
        log_err("access_log: cannot open %s: %s", conf->global.access_log_path, strerror(e));
        return -e;
    }
    close(fd);
    return 0;
}

static void gens_sync_counters(void);
static void gen_sync_counters(struct gen *g);
static void gen_restarts_carry(struct gen *g, const struct gen *o);
/* As nginx does: the access log file is created by the privileged side, and given to the user
 * the workers run as, so that a directory only root may write to (/var/log) works. The workers
 * open it themselves (SIGUSR1 reopens it as that user: see README). Nothing when aigw does not
 * switch users. */
static void master_access_log_prepare(const struct conf *conf)
{
    struct stat st;
    int fd;

    if (conf->global.access_log != ALOG_FILE || conf->global.uid < 0 || geteuid() != 0)
        return;
    fd = open(conf->global.access_log_path,
              O_WRONLY | O_APPEND | O_CREAT | O_NONBLOCK | O_CLOEXEC | O_NOFOLLOW, 0640);
    if (fd == -1)
        return; /* master_access_log_check says why, as the user */
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid != (uid_t)conf->global.uid &&
        fchown(fd, (uid_t)conf->global.uid, (gid_t)-1) == -1)
        log_warn("access_log: cannot give %s to uid %d: %s", conf->global.access_log_path,
                 (int)conf->global.uid, strerror(errno));
    close(fd);
}

static int master_upgrade_inherit(struct conf *conf);
static int master_upgrade_carry(void);
static int master_upgrade_ready(void);
static void master_upgrade_go(void);
static void master_upgrade_gone(void);

static int master_setup(struct conf *conf)
{
    int rc, workers = conf->global.workers > 0 ? conf->global.workers : 1;

    M.g = calloc(1, sizeof(*M.g));
    if (!M.g)
        return -ENOMEM;
    M.g->id = 1;
    M.g->conf = conf;
    M.g->workers = workers;
    M.started_ms = time_real_ms();
    signal(SIGPIPE, SIG_IGN); /* an aigwctl that hangs up must not kill the master */

    rc = uv_loop_init(&M.loop);
    if (rc < 0) {
        log_err("cannot create the event loop: %s", uv_strerror(rc));
        return rc;
    }
    M.loop_ready = 1;
    /* uv_timer_init cannot fail (it only initialises the handle) */
    uv_timer_init(&M.loop, &M.restart_timer);
    uv_timer_init(&M.loop, &M.stop_timer);
    uv_timer_init(&M.loop, &M.reload_timer);
    uv_timer_init(&M.loop, &M.sync_timer);
    uv_timer_init(&M.loop, &M.rate_timer);
    uv_timer_init(&M.loop, &M.start_timer);
    uv_timer_start(&M.rate_timer, rate_timer_fired, 1000, 1000);
    admin_rate_push(&M.rate, 0);
    rc = master_signals();
    if (rc < 0)
        return rc;
    rc = master_fd_limit(conf, workers);
    if (rc < 0)
        return rc;

    rc = daemon_priv_check(&conf->global);
    if (rc < 0)
        return rc;
    if (upgrade_is_child() && (rc = master_upgrade_inherit(conf)) < 0)
        return rc;
    /* an upgrade's new master writes the pidfile and takes the admin socket at its go: until
     * then the admin socket is bound under a temporary name */
    if (!M.upfrom && conf->global.pidfile[0] &&
        (rc = daemon_pidfile_write(conf->global.pidfile)) < 0)
        return rc;
    char admin_tmp[sizeof(M.admin_path) + 16];
    snprintf(admin_tmp, sizeof(admin_tmp), "%s.%d", conf->global.admin_socket, (int)getpid());
    if (!M.admin_inherited) { /* else the old master's, taken at the go */
        rc = admin_listen(M.upfrom ? admin_tmp : conf->global.admin_socket);
        if (rc < 0)
            return rc;
        rc = daemon_admin_perms(M.admin_path, &conf->global);
        if (rc < 0)
            return rc;
    }
    rc = listeners_bind(M.g, M.upfrom);
    gen_close_fds(M.upfrom); /* what M.g keeps it has dup'ed */
    if (rc < 0)
        return rc;

    rc = master_shm_create(M.g);
    if (rc < 0) {
        log_err("cannot create the shared memory segment: %s", strerror(-rc));
        return rc;
    }
    M.g->shm_ready = 1;
    rc = master_state_load(conf);
    if (rc < 0)
        return rc;
    for (int b = 0; b < conf->n_backends; b++)
        shm_backend_init(&M.g->shm, (uint32_t)b, (uint32_t)conf->backends[b].weight,
                         (uint32_t)conf->backends[b].max_conns);
    if (M.upfrom && (rc = master_upgrade_carry()) < 0)
        return rc;

    master_access_log_prepare(conf);
    /* Everything that needs root is done: listeners, admin socket, shm, state file, log file. */
    rc = daemon_drop_privileges(&conf->global);
    if (rc < 0)
        return rc;
    /* as the user the workers run as: they open it themselves */
    rc = master_access_log_check(conf);
    if (rc < 0)
        return rc;

    rc = gen_children(M.g);
    if (rc < 0)
        return rc;
    if (M.upfrom && M.upfrom->shm_ready)
        gen_restarts_carry(M.g, M.upfrom);

    if (M.upfrom && (rc = upgrade_child_start(&M.loop, master_upgrade_ready, master_upgrade_go,
                                              master_upgrade_gone, M.g->id)) < 0) {
        log_err("upgrade: cannot watch the socket to the old master: %s", uv_strerror(rc));
        return rc;
    }
    /* after the children's table: /healthz reads it */
    rc = stats_start(&M.loop, conf, &M.g->shm, admin_procs, gens_sync_counters, M.g->n_children + 1,
                     M.started_ms);
    if (rc < 0)
        return rc;
    master_start_hold(M.g);

    log_info("aigw master started (pid %d): %d workers, %d listeners, admin socket %s",
             (int)getpid(), workers, conf->n_listens, conf->global.admin_socket);
    daemon_detach_stdio();
    return 0;
}

static void master_teardown(void)
{
    if (M.g && M.g->shm_ready && M.g->name_ptrs)
        master_state_save(); /* the workers are gone: the totals are final */
    /* Closing the signal handles puts the default actions back: a late signal must not kill
     * the master before it removed its socket. */
    sig_block_all_handled();
    listeners_close();
    if (M.loop_ready) {
        stats_stop(); /* its handles carry data that is no admin client's */
        uv_walk(&M.loop, master_close_walk, NULL);
        uv_run(&M.loop, UV_RUN_DEFAULT);
        uv_loop_close(&M.loop);
        M.loop_ready = 0;
    }
    if (M.admin_path[0]) {
        unlink(M.admin_path);
        M.admin_path[0] = '\0';
    }
    while (M.old) {
        struct gen *o = M.old;
        M.old = o->next;
        gen_free(o);
    }
    if (M.next)
        gen_free(M.next);
    M.next = NULL;
    if (M.upfrom)
        gen_free(M.upfrom);
    M.upfrom = NULL;
    if (M.g)
        gen_free(M.g);
    M.g = NULL;
    daemon_pidfile_remove();
}

/* ---- the AI layer's shared state: limits, usage, the state file ---- */

/* The segment with the limiter and usage regions: one limiter per key, model and pool, in
 * that order (the workers' limit stage uses the same ids). */
static int master_shm_create(struct gen *g)
{
    const struct conf *conf = g->conf;
    int workers = g->workers;
    uint32_t n = (uint32_t)(conf->n_keys + conf->n_models + conf->n_pools);
    struct limit_spec *specs = calloc(n ? n : 1, sizeof(*specs));
    struct shm_ai ai;
    int rc;

    if (!specs)
        return -ENOMEM;
    for (int i = 0; i < conf->n_keys; i++) {
        const struct conf_apikey *k = &conf->keys[i];
        specs[i] =
            (struct limit_spec){.rpm = k->lim.rpm,
                                .tpm = k->lim.tpm,
                                .max_parallel = k->lim.max_parallel,
                                .budget_nano = k->budget_nusd,
                                .period = k->budget_period == BUDGET_DAY     ? LIMIT_PERIOD_DAY
                                          : k->budget_period == BUDGET_TOTAL ? LIMIT_PERIOD_TOTAL
                                                                             : LIMIT_PERIOD_MONTH};
    }
    for (int i = 0; i < conf->n_models; i++) {
        const struct conf_limits *l = &conf->models[i].lim;
        specs[conf->n_keys + i] =
            (struct limit_spec){.rpm = l->rpm, .tpm = l->tpm, .max_parallel = l->max_parallel};
    }
    for (int i = 0; i < conf->n_pools; i++) {
        const struct conf_limits *l = &conf->pools[i].lim;
        specs[conf->n_keys + conf->n_models + i] =
            (struct limit_spec){.rpm = l->rpm, .tpm = l->tpm, .max_parallel = l->max_parallel};
    }
    /* [cluster]: the fleet limits and budgets are leased from Redis by the sync process */
    for (uint32_t i = 0; conf->cluster.enabled && i < n; i++) {
        specs[i].leased =
            specs[i].rpm || specs[i].tpm || specs[i].max_parallel || specs[i].budget_nano;
        specs[i].lease_retry_ms = (uint32_t)conf->cluster.sync_interval_ms;
        /* until the first grant: the fallback, with no other host seen (see lease_start) */
        specs[i].lease_start = conf->cluster.fallback == CLUSTER_FALLBACK_OPEN ? LIMIT_FALLBACK_OPEN
                               : conf->cluster.fallback == CLUSTER_FALLBACK_CLOSED
                                   ? LIMIT_FALLBACK_CLOSED
                                   : LIMIT_FALLBACK_SHARE;
    }
    ai = (struct shm_ai){(uint32_t)conf->n_keys, (uint32_t)conf->n_models, (uint32_t)conf->n_pools,
                         specs, (int64_t)(time_real_ms() / 1000)};
    rc = shm_create_ai(&g->shm, (uint32_t)conf->n_backends, (uint32_t)workers, g->id, &ai);
    free(specs);
    return rc;
}

static void master_state_save(void)
{
    char *err = NULL;

    /* an upgrade's new master before it took over, or the old one after */
    if (!M.g->conf->global.state_file[0] || !upgrade_owns_state())
        return;
    if (state_save(M.g->conf->global.state_file, &M.g->names, shm_limits(&M.g->shm),
                   shm_acct(&M.g->shm), (int64_t)(time_real_ms() / 1000), &err) < 0) {
        log_warn("cannot save the state: %s", err ? err : "out of memory");
        free(err);
    }
}

static void state_timer_fired(uv_timer_t *t)
{
    (void)t;
    master_state_save();
}

/* The names the state file matches budgets and totals by; the budgets and totals it holds put
 * back before any worker runs. A damaged file stops the start: budgets must not reset by
 * accident (move the file away to start from zero). */
static int gen_names(struct gen *g)
{
    return state_names_build(g->conf, &g->name_ptrs, &g->names);
}

static int master_state_load(const struct conf *conf)
{
    char *err = NULL;
    int rc = gen_names(M.g);

    if (rc < 0)
        return rc;
    if (!conf->global.state_file[0])
        return 0;
    if (M.upfrom && M.upfrom->shm_ready)
        rc = 1; /* an upgrade: the old master's segment carries fresher figures */
    else
        rc = state_load(conf->global.state_file, &M.g->names, shm_limits(&M.g->shm),
                        shm_acct(&M.g->shm), &err);
    if (rc == 1) {
        log_info("upgrade: usage and budgets carried from the old master's segment");
    } else if (rc == -ENOENT) {
        log_info("state file %s does not exist yet: usage and budgets start from zero",
                 conf->global.state_file);
    } else if (rc < 0) {
        log_err("%s (move the file away to start from zero)", err ? err : "bad state file");
        free(err);
        return rc;
    } else {
        log_info("usage and budgets loaded from %s", conf->global.state_file);
    }
    uv_timer_init(&M.loop, &M.state_timer);
    uv_timer_start(&M.state_timer, state_timer_fired, conf->global.state_interval_ms,
                   conf->global.state_interval_ms);
    return 0;
}

/* ---- generations and reload ---- */

#define RELOAD_READY_MS                                                                            \
    25000          /* a new generation's workers must be ready within this (slow                   \
                      starts: sanitizer builds on a loaded host) */
#define SYNC_MS 20 /* while an old generation drains: how often its limiters carry */

/* [cluster]: whether g's sync process has put the first leases in shm, or fallen back (1
 * without [cluster]). */
static int gen_primed(struct gen *g)
{
    return !g->conf->cluster.enabled || !shm_limits(&g->shm) ||
           atomic_load_explicit(&limit_fleet(shm_limits(&g->shm))->primed, memory_order_acquire);
}

/* The start's hold ends: g's workers accept (a worker not set up yet sees hold cleared itself,
 * worker_setup), and systemd hears READY. */
static void start_release(struct gen *g, int primed)
{
    uv_timer_stop(&M.start_timer);
    M.start_hold_until = 0;
    for (int s = 0; s < g->workers; s++)
        atomic_store_explicit(&shm_worker(&g->shm, (uint32_t)s)->hold, 0, memory_order_seq_cst);
    for (int s = 0; s < g->workers; s++) {
        struct child *c = &g->children[1 + s];

        if (c->pid > 0 &&
            atomic_load_explicit(&shm_worker(&g->shm, (uint32_t)s)->ready, memory_order_seq_cst))
            kill(c->pid, SIGUSR2);
    }
    stats_set_starting(0);
    if (!primed)
        log_warn("cluster: no first leases after %d ms (is the sync process up?): serving on "
                 "cluster_fallback's terms with no other host seen",
                 START_HOLD_MS);
    if (!upgrade_is_child())
        daemon_ready();
}

static void start_timer_fired(uv_timer_t *t)
{
    int primed = gen_primed(M.g);

    (void)t;
    if (primed || time_mono_ms() >= M.start_hold_until)
        start_release(M.g, primed);
}

/* [cluster] start (not an upgrade's, which waits for primed before its go): the workers hold
 * until the sync process's first leases are in shm or it fell back, so that a gateway that just
 * started refuses nothing it would admit a moment later. Connections wait in the listening
 * sockets' backlogs meanwhile (a few ms; about a second when Redis does not answer). */
static void master_start_hold(struct gen *g)
{
    if (!g->conf->cluster.enabled || M.upfrom)
        return;
    for (int s = 0; s < g->workers; s++)
        atomic_store_explicit(&shm_worker(&g->shm, (uint32_t)s)->hold, 1, memory_order_release);
    M.start_hold_until = time_mono_ms() + START_HOLD_MS;
    stats_set_starting(1);
    uv_timer_start(&M.start_timer, start_timer_fired, ADMIN_POLL_MS, ADMIN_POLL_MS);
}

static int gen_children(struct gen *g)
{
    uint64_t now = time_mono_ms();

    /* [cluster]: the sync process comes last, so workers keep their [1 + slot] */
    g->n_children = 1 + g->workers + (g->conf->cluster.enabled ? 1 : 0);
    g->children = calloc((size_t)g->n_children, sizeof(*g->children));
    if (!g->children)
        return -ENOMEM;
    for (int i = 0; i < g->n_children; i++) {
        struct child *c = &g->children[i];
        c->g = g;
        c->role = i == 0 ? "health" : i <= g->workers ? "worker" : "sync";
        c->slot = i == 0 || i > g->workers ? -1 : i - 1;
        c->pending = 1;
        c->restart_at = now;
    }
    return 0;
}

/* The counters /metrics shows and the usage totals carry from g->prev into g: the old
 * generation's totals (what it carried itself and what its workers counted, draining ones too)
 * are g's carried counters and usage base, to which g's workers add. */
static void gen_sync_counters(struct gen *g)
{
    struct gen *o = g->prev;

    if (!o || !o->shm_ready || !g->shm_ready)
        return;
    for (int b = 0; g->be_from && b < g->conf->n_backends; b++)
        if (g->be_from[b] >= 0)
            shm_carry_counters(&g->shm, (uint32_t)b, &o->shm, (uint32_t)g->be_from[b]);
    shm_carry_proc(&g->shm, &o->shm);
    for (int k = ACCT_KEY; k <= ACCT_BACKEND; k++) {
        uint32_t n = acct_count(shm_acct(&g->shm), (enum acct_kind)k);
        for (uint32_t i = 0; g->acct_from[k] && i < n; i++) {
            struct acct_usage u;
            if (g->acct_from[k][i] >= 0 && acct_get(shm_acct(&o->shm), (enum acct_kind)k,
                                                    (uint32_t)g->acct_from[k][i], &u) == 0)
                acct_base_set(shm_acct(&g->shm), (enum acct_kind)k, i, &u);
        }
    }
}

/* [cluster]: g's sync process goes on with the usage epoch and fleet totals g->prev's knew. */
static void gen_sync_inherit(struct gen *g)
{
    if (g->conf->cluster.enabled && g->prev && g->prev->shm_ready && g->shm_ready &&
        shm_acct(&g->shm) && shm_acct(&g->prev->shm))
        acct_sync_inherit(shm_acct(&g->shm), shm_acct(&g->prev->shm),
                          (const int32_t *const *)g->acct_from);
}

/* Every generation's carried counters brought up to date, oldest first so that what the oldest
 * counted reaches the serving one in one pass: a scrape sees the draining workers' traffic. */
static void gens_sync_counters(void)
{
    struct gen *chain[GEN_MAX];
    int n = 0;

    for (struct gen *o = M.old; o && n < GEN_MAX; o = o->next)
        chain[n++] = o;
    for (int i = n - 1; i >= 0; i--)
        gen_sync_counters(chain[i]);
    gen_sync_counters(M.g);
}

/* One step of what carries from g->prev into g: the limiters' admissions, spent money and
 * in-flight holds (limit_carry_sync), and the counters and usage totals. */
static void gen_sync(struct gen *g)
{
    struct gen *o = g->prev;
    uint64_t now = time_mono_ms();

    if (!o || !o->shm_ready)
        return;
    gen_sync_counters(g);
    for (uint32_t i = 0; i < g->n_carry; i++) /* a busy one (-EBUSY) catches up next time */
        limit_carry_sync(shm_limits(&g->shm), shm_limits(&o->shm), (uint32_t)g->workers,
                         &g->carry[i], now);
}

/* g->prev is going away: a last sync, then g no longer holds its in-flight shares. */
static void gen_carry_end(struct gen *g)
{
    if (!g->prev)
        return;
    gen_sync(g);
    for (uint32_t i = 0; g->shm_ready && i < g->n_carry; i++)
        if (limit_carry_end(shm_limits(&g->shm), (uint32_t)g->workers, &g->carry[i]) == -EBUSY)
            log_warn("generation %u: limiter %u: a process stopped while holding its lock: the "
                     "old generation's in-flight requests stay counted in it",
                     g->id, g->carry[i].to);
    g->prev = NULL;
}

static void gen_free(struct gen *g)
{
    struct gen *gs[GEN_MAX];
    int n = gen_all(gs, GEN_MAX);

    for (int k = 0; k < n; k++)
        if (gs[k]->prev == g)
            gen_carry_end(gs[k]);
    gen_close_fds(g);
    free(g->fds);
    if (g->shm_ready)
        shm_destroy(&g->shm);
    free(g->children);
    free(g->name_ptrs);
    free(g->carry);
    for (int k = 0; k < 3; k++)
        free(g->acct_from[k]);
    free(g->be_from);
    if (g->conf)
        conf_free(g->conf);
    free(g);
}

/* Frees the old generations whose last process has exited; kills what outlived
 * hard_stop_after; stops the sync timer when none is left. One whose own carry from an older
 * generation still runs (that one drains longer) is kept, segment and all, until it ends: the
 * newer ones carry through it what the older one still counts. */
static void gen_reap_old(void)
{
    uint64_t now = time_mono_ms();

    for (int again = 1; again;) {
        again = 0;
        for (struct gen **p = &M.old; *p;) {
            struct gen *o = *p;
            if (gen_alive(o) == 0 && !o->prev) {
                *p = o->next;
                if (!o->exited)
                    log_info("generation %u: all its processes have exited", o->id);
                gen_free(o); /* may end a newer one's carry: look again */
                again = 1;
                continue;
            }
            if (gen_alive(o) == 0 && !o->exited) {
                o->exited = 1;
                log_info("generation %u: all its processes have exited", o->id);
            }
            p = &o->next;
        }
    }
    for (struct gen *o = M.old; o; o = o->next) {
        if (o->kill_at && now >= o->kill_at && gen_alive(o)) {
            log_warn("generation %u: %d processes still running after hard_stop_after: killing",
                     o->id, gen_alive(o));
            gen_signal(o, SIGKILL);
            o->kill_at = 0;
        }
    }
    if (!M.old && !M.upfrom)
        uv_timer_stop(&M.sync_timer);
    reload_unsteer(M.g);
}

static void sync_timer_fired(uv_timer_t *t)
{
    struct gen *chain[GEN_MAX];
    int n = 0;

    (void)t;
    /* oldest first, so what a generation admitted reaches the newest in one pass */
    for (struct gen *o = M.old; o && n < GEN_MAX; o = o->next)
        chain[n++] = o;
    for (int i = n - 1; i >= 0; i--)
        gen_sync(chain[i]);
    gen_sync(M.g);
    gen_reap_old();
}

/* Answers every aigwctl waiting for the reload or upgrade: `msg`, or `json` (NULL for an error,
 * which is text for all) to those that asked for JSON. */
static void reload_answer(const char *msg, const char *json)
{
    while (M.waiters) {
        struct admin_client *c = M.waiters;
        M.waiters = c->next_waiter;
        c->out = strdup(c->json && json ? json : msg);
        c->out_len = c->out ? strlen(c->out) : 0;
        uv_timer_start(&c->timer, admin_client_timeout, ADMIN_IDLE_MS, 0);
        if (c->out)
            admin_client_send(c);
        else
            admin_client_close(c);
    }
}

/* M.next will not serve: its processes are stopped (and it is freed once they are gone), the
 * serving generation is untouched. */
static void reload_fail(const char *msg)
{
    struct gen *g = M.next;
    char out[512];

    if (!g)
        return;
    M.next = NULL;
    uv_timer_stop(&M.reload_timer);
    log_err("reload failed: %s", msg);
    for (int i = 0; i < g->n_children; i++)
        g->children[i].pending = 0;
    gen_signal(g, SIGINT);
    g->kill_at = time_mono_ms() + FAST_STOP_MS;
    gen_close_fds(g);
    g->prev = NULL;
    g->next = M.old;
    M.old = g;
    uv_timer_start(&M.sync_timer, sync_timer_fired, SYNC_MS, SYNC_MS);
    snprintf(out, sizeof(out), "error: reload failed: %s\n", msg);
    reload_answer(out, NULL);
}

#ifndef SO_DETACH_REUSEPORT_BPF
#define SO_DETACH_REUSEPORT_BPF 68
#endif

/* A reload to fewer workers drops the old generation's sockets of slots g->workers and up: the
 * kernel would go on spreading new connections over them until their last copy closes, and
 * then reset what is queued there. Each listen's reuseport group numbers its sockets in the
 * order they joined, which is slot order while no older generation drains (slots are opened in
 * order, and only the top ones are ever dropped), so a filter sending each connection to
 * socket rxhash % g->workers keeps new ones on the kept sockets, and the old workers take what
 * was queued before (acceptor_sweep) as they stop. Lifted once the old generation is gone
 * (reload_unsteer), so that the kernel's own spreading is back. */
static void reload_steer(struct gen *g, const struct gen *o)
{
    if (o->workers <= g->workers)
        return;
    if (M.old || M.upfrom) {
        log_info("reload: generation %u drops sockets while an older generation still drains: "
                 "connections queued on them may be reset",
                 g->id);
        return; /* the numbering may not be slot order */
    }
    for (int li = 0; li < g->conf->n_listens; li++) {
        struct sock_filter code[] = {
            {BPF_LD | BPF_W | BPF_ABS, 0, 0, (uint32_t)(SKF_AD_OFF + SKF_AD_RXHASH)},
            {BPF_ALU | BPF_MOD | BPF_K, 0, 0, (uint32_t)g->workers},
            {BPF_RET | BPF_A, 0, 0, 0},
        };
        struct sock_fprog prog = {(unsigned short)(sizeof(code) / sizeof(code[0])), code};

        if (listen_match(o, &g->conf->listens[li]) < 0 || g->fds[li] < 0)
            continue; /* a new listen: its group is g's alone */
        if (setsockopt(g->fds[li], SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof(prog)))
            log_warn("listen %s: cannot steer new connections to the kept sockets (%s): some "
                     "queued on the dropped ones may be reset",
                     g->conf->listens[li].name, strerror(errno));
        else
            g->steered = 1;
    }
}

static void reload_unsteer(struct gen *g)
{
    int one = 1;

    if (!g || !g->steered || M.old)
        return;
    g->steered = 0;
    for (int li = 0; li < g->conf->n_listens; li++)
        if (g->fds[li] >= 0 &&
            setsockopt(g->fds[li], SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, &one, sizeof(one)) &&
            errno != ENOENT)
            log_warn("listen %s: cannot lift the steering of new connections: %s",
                     g->conf->listens[li].name, strerror(errno));
}

/* M.next's workers are all ready: the old generation stops accepting and drains, its limiters'
 * windows are copied, and the new workers start accepting. Between the two, new connections
 * wait in the listening sockets' backlogs. */
static void reload_handover(void)
{
    struct gen *g = M.next, *o = M.g;
    char out[128];

    uv_timer_stop(&M.reload_timer);
    M.next = NULL;
    M.g = g;
    stats_set_gen(g->conf, &g->shm, g->n_children + 1);
    for (int i = 0; i < o->n_children; i++)
        o->children[i].pending = 0;
    reload_steer(g, o); /* before the old workers stop: nothing new lands on a dropped socket */
    gen_signal(o, SIGTERM);
    if (o->conf->global.hard_stop_after_ms)
        o->kill_at = time_mono_ms() + o->conf->global.hard_stop_after_ms + HARD_STOP_GRACE_MS;
    /* its workers closed their copies (or will at once): sockets g did not keep go now, so that
     * no connection lands in a queue nobody takes */
    gen_close_fds(o);
    o->next = M.old;
    M.old = o;
    gen_sync(g); /* the windows as the old workers leave them */
    for (int s = 0; s < g->workers; s++) {
        struct child *c = &g->children[1 + s];
        atomic_store_explicit(&shm_worker(&g->shm, (uint32_t)s)->hold, 0, memory_order_release);
        if (c->pid > 0)
            kill(c->pid, SIGUSR2);
    }
    uv_timer_start(&M.sync_timer, sync_timer_fired, SYNC_MS, SYNC_MS);
    log_info("reload: generation %u serves (%d workers); generation %u drains", g->id, g->workers,
             o->id);
    char json[96];
    snprintf(out, sizeof(out), "reloaded: generation %u (%d workers)\n", g->id, g->workers);
    snprintf(json, sizeof(json), "{\"ok\":true,\"generation\":%u,\"workers\":%d}\n", g->id,
             g->workers);
    reload_answer(out, json);
}

static void reload_timer_fired(uv_timer_t *t)
{
    struct gen *g = M.next;
    int ready = 0;

    (void)t;
    if (!g)
        return;
    for (int s = 0; s < g->workers; s++)
        ready +=
            g->children[1 + s].pid > 0 &&
            atomic_load_explicit(&shm_worker(&g->shm, (uint32_t)s)->ready, memory_order_acquire);
    /* [cluster]: not before its sync process put the first leases in shm (or fell back): its
     * workers would admit the leased keys against the fallback's share until then */
    if (!gen_primed(g))
        ready = -1;
    if (ready == g->workers) {
        reload_handover();
    } else if (time_mono_ms() >= M.next_deadline) {
        char msg[128];
        snprintf(msg, sizeof(msg), "generation %u: %d of %d workers not ready after %d ms", g->id,
                 g->workers - ready, g->workers, RELOAD_READY_MS);
        reload_fail(msg);
    }
}

/* What of o carries into g, by section name: the backends' state (now: the new checker starts
 * from it), and which limiter and usage entry each of g's comes from (copied at the handover,
 * when the old workers stop admitting, and while they drain). */
static int gen_carry_setup(struct gen *g, const struct gen *o)
{
    const struct conf *nc = g->conf, *oc = o->conf;
    uint32_t n = (uint32_t)(nc->n_keys + nc->n_models + nc->n_pools);

    for (int b = 0; b < nc->n_backends; b++) {
        const struct conf_backend *cb = &nc->backends[b];
        int ob = -1;
        for (int i = 0; i < oc->n_backends; i++)
            if (!strcmp(oc->backends[i].name, cb->name) &&
                !strcmp(oc->pools[oc->backends[i].pool].name, nc->pools[cb->pool].name))
                ob = i;
        if (ob < 0)
            continue;
        /* the operator's `set weight` stays; a weight the file changed is the file's */
        uint32_t w = atomic_load_explicit(&shm_backend(&o->shm, (uint32_t)ob)->weight_cfg,
                                          memory_order_relaxed);
        int64_t keep = w != (uint32_t)oc->backends[ob].weight ? (int64_t)w : -1;
        shm_backend_carry(&g->shm, (uint32_t)b, &o->shm, (uint32_t)ob, keep);
    }
    g->carry = calloc(n ? n : 1, sizeof(*g->carry));
    g->be_from = malloc(sizeof(int32_t) * (size_t)(nc->n_backends ? nc->n_backends : 1));
    if (!g->be_from)
        return -ENOMEM;
    for (int b = 0; b < nc->n_backends; b++) {
        const struct conf_backend *cb = &nc->backends[b];
        g->be_from[b] = -1; /* a series by pool and backend: carried when both are the same */
        for (int i = 0; i < oc->n_backends; i++)
            if (!strcmp(oc->backends[i].name, cb->name) &&
                !strcmp(oc->pools[oc->backends[i].pool].name, nc->pools[cb->pool].name))
                g->be_from[b] = i;
    }
    for (int k = 0; k < 3; k++) {
        int cnt = k == ACCT_KEY ? nc->n_keys : k == ACCT_MODEL ? nc->n_models : nc->n_backends;
        g->acct_from[k] = malloc(sizeof(int32_t) * (size_t)(cnt ? cnt : 1));
        if (!g->acct_from[k])
            return -ENOMEM;
        for (int i = 0; i < cnt; i++) {
            g->acct_from[k][i] = k == ACCT_KEY     ? conf_key_find(oc, nc->keys[i].name)
                                 : k == ACCT_MODEL ? conf_model_find(oc, nc->models[i].name)
                                                   : conf_backend_find(oc, nc->backends[i].name);
        }
    }
    if (!g->carry)
        return -ENOMEM;
    for (uint32_t i = 0; i < n; i++) {
        int from;
        if (i < (uint32_t)nc->n_keys)
            from = conf_key_find(oc, nc->keys[i].name);
        else if (i < (uint32_t)(nc->n_keys + nc->n_models))
            from = conf_model_find(oc, nc->models[i - (uint32_t)nc->n_keys].name);
        else
            from = conf_pool_find(oc, nc->pools[i - (uint32_t)(nc->n_keys + nc->n_models)].name);
        if (from < 0)
            continue;
        if (i >= (uint32_t)nc->n_keys)
            from += oc->n_keys;
        if (i >= (uint32_t)(nc->n_keys + nc->n_models))
            from += oc->n_models;
        g->carry[g->n_carry++] = (struct limit_carry){.from = (uint32_t)from, .to = i};
    }
    return 0;
}

/* Checks the file and starts its generation beside the serving one. 0: under way (the handover
 * or the failure answers M.waiters); else -errno with *err (malloc'd) saying why. */
static int master_reload(char **err)
{
    struct conf *conf = NULL;
    struct gen *g;
    int rc, n = 0;

    for (struct gen *o = M.old; o; o = o->next)
        n++;
    if (M.stopping) {
        *err = strdup("the master is stopping");
        return -EBUSY;
    }
    if (M.next) {
        *err = strdup("a reload is already under way");
        return -EBUSY;
    }
    if (upgrade_busy() || M.upfrom) {
        *err = strdup(M.upfrom ? "the previous master (binary upgrade) is still draining"
                               : "a binary upgrade is under way");
        return -EBUSY;
    }
    if (n >= GEN_MAX - 2) {
        *err = strdup("too many old generations still draining");
        return -EBUSY;
    }
    rc = conf_load(M.g->conf->path, &conf, err);
    if (rc < 0) {
        if (!*err)
            *err = strdup("cannot load the configuration");
        return rc;
    }
    if (strcmp(conf->global.admin_socket, M.g->conf->global.admin_socket))
        log_warn("reload: admin_socket changed: it takes a restart; %s stays",
                 M.g->conf->global.admin_socket);
    if (conf->stats.enabled != M.g->conf->stats.enabled ||
        (conf->stats.enabled && strcmp(conf->stats.bind, M.g->conf->stats.bind)))
        log_warn("reload: [stats] changed: it takes a restart or an upgrade; %s stays",
                 M.g->conf->stats.enabled ? M.g->conf->stats.bind : "(no listener)");
    g = calloc(1, sizeof(*g));
    if (!g) {
        conf_free(conf);
        return -ENOMEM;
    }
    g->id = M.g->id + 1;
    g->conf = conf;
    g->workers = conf->global.workers > 0 ? conf->global.workers : 1;
    if ((rc = master_fd_limit(conf, g->workers)) < 0 || (rc = listeners_bind(g, M.g)) < 0) {
        *err = strdup("cannot set up the listeners or the fd limit (see the log)");
        goto fail;
    }
    if ((rc = master_shm_create(g)) < 0) {
        *err = strdup("cannot create the shared memory segment");
        goto fail;
    }
    g->shm_ready = 1;
    for (int b = 0; b < conf->n_backends; b++)
        shm_backend_init(&g->shm, (uint32_t)b, (uint32_t)conf->backends[b].weight,
                         (uint32_t)conf->backends[b].max_conns);
    if ((rc = gen_names(g)) < 0 || (rc = gen_carry_setup(g, M.g)) < 0 ||
        (rc = gen_children(g)) < 0) {
        *err = strdup("out of memory");
        goto fail;
    }
    for (int s = 0; s < g->workers; s++)
        atomic_store_explicit(&shm_worker(&g->shm, (uint32_t)s)->hold, 1, memory_order_release);
    if (shm_limits(&g->shm) && shm_limits(&M.g->shm)) /* the fallback's share, if it needs one */
        atomic_store_explicit(&limit_fleet(shm_limits(&g->shm))->nodes_alive,
                              atomic_load_explicit(&limit_fleet(shm_limits(&M.g->shm))->nodes_alive,
                                                   memory_order_relaxed),
                              memory_order_relaxed);
    g->prev = M.g;
    gen_sync_counters(g); /* before the fork: the new checker starts from these counts */
    gen_sync_inherit(g);
    gen_restarts_carry(g, M.g);
    M.next = g;
    M.next_deadline = time_mono_ms() + RELOAD_READY_MS;
    uv_timer_start(&M.reload_timer, reload_timer_fired, ADMIN_POLL_MS, ADMIN_POLL_MS);
    log_info("reload: generation %u starting (%d workers) from %s", g->id, g->workers, conf->path);
    uv_stop(&M.loop); /* forks happen outside uv_run */
    return 0;
fail:
    g->prev = NULL;
    gen_free(g);
    return rc;
}

/* SIGHUP: a reload nobody waits for; the log says how it went. */
static void master_reload_signal(void)
{
    char *err = NULL;
    if (master_reload(&err) < 0)
        log_err("reload refused: %s", err ? err : "out of memory");
    free(err);
}

int master_run(struct conf *conf)
{
    int rc = master_setup(conf);
    if (rc < 0) {
        upgrade_child_fail(log_last_err());
        if (!M.g)
            conf_free(conf);
        master_teardown();
        return 1;
    }
    for (int ready = 0;; ready = 1) {
        children_spawn_due();
        /* listeners bound, children forked (an upgrade's: at its go; [cluster]: once the first
         * leases are in shm, start_timer_fired) */
        if (!ready && !upgrade_is_child() && !M.start_hold_until)
            daemon_ready();
        if (M.done)
            break;
        uv_run(&M.loop, UV_RUN_DEFAULT);
    }
    log_info("all children stopped; master exiting");
    master_teardown(); /* frees every generation's conf (conf's too, or its reload's) */
    return 0;
}

/* ---- binary upgrade (core/upgrade.c does the exec and the talking) ---- */

/* Old master: the new one's workers are ready. This generation stops accepting and drains, as
 * on a stop, except that the admin socket, the pidfile, the state file and the [stats] listener
 * are the new master's now (none is removed), and systemd is not told we stop. */
static char upgrade_admin_path[sizeof(M.admin_path)]; /* old master: the socket it handed over */

static void master_upgrade_handover(void)
{
    M.upgraded = 1;
    daemon_pidfile_forget();
    snprintf(upgrade_admin_path, sizeof(upgrade_admin_path), "%s", M.admin_path);
    if (M.admin_path[0] && !uv_is_closing((uv_handle_t *)&M.admin))
        uv_close((uv_handle_t *)&M.admin, NULL); /* the new master listens on it, or renames
                                                  * its own over it */
    M.admin_path[0] = '\0';
    stats_stop();
    master_stop(STOP_GRACEFUL);
    upgrade_go();
}

static void master_upgrade_event(enum upgrade_event ev, const char *msg)
{
    if (ev == UPGRADE_EV_READY) {
        master_upgrade_handover();
        return;
    }
    reload_answer(msg, ev == UPGRADE_EV_SERVING ? upgrade_answer_json() : NULL);
    if (ev == UPGRADE_EV_SERVING && upgrade_admin_path[0] &&
        admin_socket_probe(upgrade_admin_path) == 0) {
        /* the new master's admin_socket is another path: nobody answers on ours any more */
        log_info("upgrade: removing %s (the new master's admin socket is elsewhere)",
                 upgrade_admin_path);
        unlink(upgrade_admin_path);
    }
    if (M.stopping && children_alive() == 0) {
        M.done = 1;
        uv_stop(&M.loop);
    }
}

/* Starts the binary on disk as a new master with the serving generation's sockets and segment.
 * 0: under way (its end answers M.waiters); else -errno with *err (malloc'd). */
static int master_upgrade(char **err)
{
    struct upgrade_offer o;

    if (M.stopping) {
        *err = strdup("the master is stopping");
        return -EBUSY;
    }
    if (M.next) {
        *err = strdup("a reload is under way");
        return -EBUSY;
    }
    if (upgrade_busy()) {
        *err = strdup("an upgrade is already under way");
        return -EBUSY;
    }
    if (M.upfrom) {
        *err = strdup("the previous master (binary upgrade) is still draining");
        return -EBUSY;
    }
    /* a new binary whose segment layout differs starts from the state file: make it current */
    master_state_save();
    uv_os_fd_t admin_fd = -1;
    if (!M.admin_path[0] || uv_fileno((uv_handle_t *)&M.admin, &admin_fd) < 0)
        admin_fd = -1;
    o = (struct upgrade_offer){.conf = M.g->conf,
                               .workers = M.g->workers,
                               .fds = M.g->fds,
                               .stats_fd = stats_listen_fd(),
                               .admin_fd = admin_fd,
                               .shm_fd = M.g->shm.fd,
                               .gen = M.g->id};
    return upgrade_start(&M.loop, &o, master_upgrade_event, err);
}

/* New master: the old generation as handed over becomes M.upfrom (never forked from, never in
 * gen_all), which listeners_bind takes the sockets of and M.g carries state from. */
static int master_upgrade_inherit(struct conf *conf)
{
    struct upgrade_inherited in;
    char *err = NULL;
    struct gen *o = NULL;
    int rc = upgrade_inherit(&in, &err);

    if (rc == 0 && !(o = calloc(1, sizeof(*o))))
        rc = -ENOMEM;
    if (rc < 0) {
        log_err("upgrade: %s", err ? err : strerror(-rc));
        free(err);
        if (in.admin_fd >= 0)
            close(in.admin_fd);
        for (int i = 0; i < in.n_fds; i++)
            close(in.fds[i]);
        free(in.fds);
        conf_free(in.conf);
        return rc;
    }
    o->id = in.gen;
    o->conf = in.conf;
    o->workers = in.workers;
    o->fds = in.fds;
    o->n_fds = in.n_fds;
    if (in.shm_fd >= 0) {
        rc = shm_attach(&o->shm, in.shm_fd);
        if (rc == 0) {
            o->shm_ready = 1;
        } else {
            log_warn("upgrade: cannot map the old master's segment (%s): usage and budgets come "
                     "from the state file, backend states and limiter windows start afresh",
                     rc == -EPROTO ? "another layout version" : strerror(-rc));
            close(in.shm_fd);
        }
    }
    if (in.admin_fd >= 0) {
        /* the same path: listen on the old master's socket from the go on; another path gets
         * a socket of its own, bound now under a temporary name and renamed at the go */
        struct sockaddr_un got;
        socklen_t len = sizeof(got);
        if (getsockname(in.admin_fd, (struct sockaddr *)&got, &len) == 0 &&
            len > offsetof(struct sockaddr_un, sun_path) &&
            !strncmp(got.sun_path, conf->global.admin_socket, sizeof(got.sun_path)))
            M.admin_inherited = in.admin_fd + 1;
        else
            close(in.admin_fd);
    }
    if (in.stats_fd >= 0) {
        struct sockaddr_storage got;
        socklen_t len = sizeof(got);
        if (conf->stats.enabled && getsockname(in.stats_fd, (struct sockaddr *)&got, &len) == 0 &&
            len == conf->stats.addr_len && !memcmp(&got, &conf->stats.addr, len))
            stats_inherit_fd(in.stats_fd);
        else
            close(in.stats_fd);
    }
    M.upfrom = o;
    M.upfrom_pid = in.old_pid;
    M.g->id = in.gen + 1;
    log_info("upgrade: started by the master pid %d (generation %u, %d sockets per listen)",
             (int)in.old_pid, in.gen, in.workers);
    return 0;
}

/* New master: the backends' state now, limiters and usage from the go on (as a reload does);
 * the workers hold until the old generation stopped accepting. */
static int master_upgrade_carry(void)
{
    if (M.upfrom->shm_ready) {
        if (gen_carry_setup(M.g, M.upfrom) < 0)
            return -ENOMEM;
        M.g->prev = M.upfrom;
        gen_sync_counters(M.g); /* before the fork: the new checker starts from these counts */
        gen_sync_inherit(M.g);
    }
    for (int s = 0; s < M.g->workers; s++)
        atomic_store_explicit(&shm_worker(&M.g->shm, (uint32_t)s)->hold, 1, memory_order_release);
    return 0;
}

static int master_upgrade_ready(void)
{
    for (int s = 0; s < M.g->workers; s++)
        if (M.g->children[1 + s].pid <= 0 ||
            !atomic_load_explicit(&shm_worker(&M.g->shm, (uint32_t)s)->ready, memory_order_acquire))
            return 0;
    return gen_primed(M.g); /* as a reload's: its workers would refuse leased keys until then */
}

/* New master: the old generation stopped accepting. The admin socket is renamed over the old
 * one's (no moment without one), the pidfile names us, our workers accept. */
static void master_upgrade_go(void)
{
    const struct conf_global *cg = &M.g->conf->global;

    if (M.admin_inherited) {
        int fd = M.admin_inherited - 1;
        M.admin_inherited = 0;
        struct stat st;
        if (admin_start(fd, cg->admin_socket) < 0)
            log_err("upgrade: cannot take over the admin socket %s", cg->admin_socket);
        else if (stat(cg->admin_socket, &st) == 0) {
            /* the new file's admin_group where it changed (not fatal: the socket serves on) */
            if (cg->admin_gid >= 0) {
                if (st.st_gid != (gid_t)cg->admin_gid || (st.st_mode & 0777) != 0660)
                    daemon_admin_perms(cg->admin_socket, cg);
            } else if ((st.st_mode & 0777) != 0600 && chmod(cg->admin_socket, 0600) == -1) {
                log_warn("cannot chmod admin socket %s: %s", cg->admin_socket, strerror(errno));
            }
        }
    } else if (rename(M.admin_path, cg->admin_socket) == -1) {
        log_err("upgrade: cannot move the admin socket %s to %s: %s", M.admin_path,
                cg->admin_socket, strerror(errno));
    } else {
        snprintf(M.admin_path, sizeof(M.admin_path), "%s", cg->admin_socket);
    }
    if (cg->pidfile[0])
        daemon_pidfile_replace(cg->pidfile, M.upfrom_pid);
    gen_sync(M.g); /* the windows as the old workers leave them */
    for (int s = 0; s < M.g->workers; s++) {
        struct child *c = &M.g->children[1 + s];
        atomic_store_explicit(&shm_worker(&M.g->shm, (uint32_t)s)->hold, 0, memory_order_release);
        if (c->pid > 0)
            kill(c->pid, SIGUSR2);
    }
    if (M.g->prev)
        uv_timer_start(&M.sync_timer, sync_timer_fired, SYNC_MS, SYNC_MS);
    daemon_ready(); /* systemd: READY=1 with MAINPID us */
    log_info("upgrade: this master serves generation %u; the old master (pid %d) drains", M.g->id,
             (int)M.upfrom_pid);
}

/* New master: the old master and its processes have exited: nothing writes to its segment. */
static void master_upgrade_gone(void)
{
    if (!M.upfrom)
        return;
    gen_carry_end(M.g);
    gen_free(M.upfrom);
    M.upfrom = NULL;
    gen_reap_old(); /* stops the sync timer when nothing else needs it */
    log_info("upgrade: the old master (pid %d) has exited", (int)M.upfrom_pid);
}
