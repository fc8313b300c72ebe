/* The sync process: leases the fleet limits from Redis (Lua scripts, one round trip each) into
 * shm, reports what was used, keeps a heartbeat, and applies cluster_fallback while Redis is
 * away. Workers never wait on it: they admit against what it last put in shm. */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <uv.h>

#include "core/log.h"
#include "core/sig.h"
#include "core/sync.h"
#include "core/util.h"

#define SYNC_FAST_MS                                                                               \
    5                        /* how often hungry flags are read (shm only): requests that          \
                              * ran out of lease wait for the top-up (core/stages.c) */
#define SYNC_SLOW_MIN_MS 500 /* a call slower than max(this, 2 x sync_interval): Redis is away */
/* before the first leases (the workers wait for them at start): a call slower than this */
#define SYNC_PRIME_MS       1000
#define SYNC_BACKOFF_MIN    100 /* first reconnect delay; doubles up to SYNC_BACKOFF_MAX */
#define SYNC_BACKOFF_MAX    5000
#define SYNC_WINDOW_MS      60000 /* the rpm/tpm window (LIMIT_WINDOW_MS) */
#define SYNC_KEY_MAX        (CONF_NAME_MAX * 2 + 32)
#define SYNC_ID_MAX         (CONF_NAME_MAX + 48)
#define SYNC_LOST_MAX       64 /* most lost renewals a limiter remembers (see lost_lo) */
#define SYNC_RENEW_REFUSED  1
#define SYNC_BUDGET_REFUSED 2

/* RENEW. KEYS: the window (ZSET record id -> time), the records' request and token counts
 * (HASHes), the parallel slots (HASH node -> slots) and their expiry (ZSET node -> until).
 * ARGV: 1 old lease id ("-" none), 2-3 what it used (requests, tokens), 4-5 the unused part of
 * it this host keeps (carried into the new lease), 6-7 wanted requests and tokens, 8-9 rpm, tpm
 * (0: none), 10 horizon (60 s + lease_ttl), 11 new lease id, 12 lease_ttl, 13 wanted slots (-1:
 * no max_parallel), 14 max_parallel, 15 this process's node id, 16-17 this host's window less
 * 18-19, 18-19 what was used while Redis was away, 20 "NODE:PID:" and 21-22 the first and last
 * number of this process's renewals whose answers were lost (1 0: none): Redis may have run them
 * after this host gave up on them; their leases (which it never had) are deleted, and when one of
 * them ran, it is what finalised an old lease found gone (not a Redis that lost its data).
 * The old lease's record becomes what it used (the rest is free at once). When it is gone from
 * Redis (Redis lost its data, or it expired), this host's own window is counted instead when it is
 * more: no use of the last minute is forgotten. Uses that belong to no lease (while Redis was
 * away, or that one) get a record of their own, timed now (the strict side). Records older than
 * the horizon leave; the new lease holds the carried part and is granted what the limits leave
 * of the rest. Slots: another node's count until it expires; this node's becomes what it wants
 * as far as the others leave room, valid lease_ttl. Returns {granted requests, granted tokens,
 * fleet requests, fleet tokens (the sums after it), requests and tokens of the records within
 * lease_ttl (what may still be admitted unseen), slots granted, slots held in the fleet}. */
static const char SYNC_LUA_RENEW[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local horizon = tonumber(ARGV[10])\n"
    "local ran = false\n"
    "for n = tonumber(ARGV[21]), tonumber(ARGV[22]) do\n"
    "  local id = ARGV[20] .. n\n"
    "  if redis.call('ZREM', KEYS[1], id, id .. ':u') > 0 then ran = true end\n"
    "  redis.call('HDEL', KEYS[2], id, id .. ':u')\n"
    "  redis.call('HDEL', KEYS[3], id, id .. ':u')\n"
    "end\n"
    "local cr, ct = tonumber(ARGV[4]), tonumber(ARGV[5])\n"
    "local pr, pt = tonumber(ARGV[18]), tonumber(ARGV[19])\n"
    "if ARGV[1] ~= '-' then\n"
    "  if redis.call('ZSCORE', KEYS[1], ARGV[1]) then\n"
    "    if tonumber(ARGV[2]) == 0 and tonumber(ARGV[3]) == 0 then\n"
    "      redis.call('ZREM', KEYS[1], ARGV[1])\n"
    "      redis.call('HDEL', KEYS[2], ARGV[1])\n"
    "      redis.call('HDEL', KEYS[3], ARGV[1])\n"
    "    else\n"
    "      redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])\n"
    "      redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])\n"
    "    end\n"
    "  elseif ran then\n"
    "    pr = pr + math.max(0, tonumber(ARGV[2]))\n"
    "    pt = pt + math.max(0, tonumber(ARGV[3]))\n"
    "  else\n"
    "    pr = pr + math.max(0, tonumber(ARGV[2]), tonumber(ARGV[16]))\n"
    "    pt = pt + math.max(0, tonumber(ARGV[3]), tonumber(ARGV[17]))\n"
    "  end\n"
    "end\n"
    "if pr > 0 or pt > 0 then\n"
    "  redis.call('ZADD', KEYS[1], now, ARGV[11] .. ':u')\n"
    "  redis.call('HSET', KEYS[2], ARGV[11] .. ':u', pr)\n"
    "  redis.call('HSET', KEYS[3], ARGV[11] .. ':u', pt)\n"
    "end\n"
    "local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - horizon)\n"
    "for i = 1, #dead do\n"
    "  redis.call('ZREM', KEYS[1], dead[i])\n"
    "  redis.call('HDEL', KEYS[2], dead[i])\n"
    "  redis.call('HDEL', KEYS[3], dead[i])\n"
    "end\n"
    "local ids = redis.call('ZRANGE', KEYS[1], 0, -1)\n"
    "local sr, st = 0, 0\n"
    "for i = 1, #ids do\n"
    "  sr = sr + (tonumber(redis.call('HGET', KEYS[2], ids[i])) or 0)\n"
    "  st = st + (tonumber(redis.call('HGET', KEYS[3], ids[i])) or 0)\n"
    "end\n"
    "local rpm, tpm = tonumber(ARGV[8]), tonumber(ARGV[9])\n"
    "local gr, gt = tonumber(ARGV[6]), tonumber(ARGV[7])\n"
    "if rpm > 0 then gr = math.max(0, math.min(gr, rpm - sr - cr)) end\n"
    "if tpm > 0 then gt = math.max(0, math.min(gt, tpm - st - ct)) end\n"
    "local nr, nt = cr + gr, ct + gt\n"
    "if nr > 0 or nt > 0 then\n"
    "  redis.call('ZADD', KEYS[1], now, ARGV[11])\n"
    "  redis.call('HSET', KEYS[2], ARGV[11], nr)\n"
    "  redis.call('HSET', KEYS[3], ARGV[11], nt)\n"
    "end\n"
    "for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], 2 * horizon) end\n"
    "local open = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[12]), '+inf')\n"
    "local orr, ort = 0, 0\n"
    "for i = 1, #open do\n"
    "  orr = orr + (tonumber(redis.call('HGET', KEYS[2], open[i])) or 0)\n"
    "  ort = ort + (tonumber(redis.call('HGET', KEYS[3], open[i])) or 0)\n"
    "end\n"
    "local gp, sp, wp = 0, 0, tonumber(ARGV[13])\n"
    "if wp >= 0 then\n"
    "  local gone = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)\n"
    "  for i = 1, #gone do\n"
    "    redis.call('ZREM', KEYS[5], gone[i])\n"
    "    redis.call('HDEL', KEYS[4], gone[i])\n"
    "  end\n"
    "  local all = redis.call('HGETALL', KEYS[4])\n"
    "  for i = 1, #all, 2 do\n"
    "    if all[i] ~= ARGV[15] then sp = sp + tonumber(all[i + 1]) end\n"
    "  end\n"
    "  gp = math.max(0, math.min(wp, tonumber(ARGV[14]) - sp))\n"
    "  if gp > 0 then\n"
    "    redis.call('HSET', KEYS[4], ARGV[15], gp)\n"
    "    redis.call('ZADD', KEYS[5], now + tonumber(ARGV[12]), ARGV[15])\n"
    "  else\n"
    "    redis.call('HDEL', KEYS[4], ARGV[15])\n"
    "    redis.call('ZREM', KEYS[5], ARGV[15])\n"
    "  end\n"
    "  sp = sp + gp\n"
    "  for i = 4, 5 do redis.call('PEXPIRE', KEYS[i], 2 * horizon) end\n"
    "end\n"
    "return {gr, gt, sr + nr, st + nt, orr, ort, gp, sp}\n";

/* BUDGET. KEYS: the period's HASH (field spent, n:NODE -> the node's open lease: what it may
 * still reserve plus what its requests in flight reserved, c:NODE -> what the node reported in
 * the period) and the open leases' expiry (ZSET node -> until). ARGV: node id, what this node
 * has spent in the period as far as it reported or reports now (nano-USD: it only grows, and a
 * report Redis ran after the node gave up on its answer is not added twice), this node's open
 * part kept, wanted, budget_usd (nano), lease_ttl, how long the period's keys live (0: for
 * ever), 1 for the node's last report (it stops, and none of its reports can still run late:
 * its c:NODE field goes, else one per sync process would pile up in a total budget's key for
 * ever, and every call reads them all). Spent only grows; an open lease of a node that stopped
 * renewing is dropped after lease_ttl.
 * Returns {granted, spent in the period, open leases of the fleet}. */
static const char SYNC_LUA_BUDGET[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local rep = tonumber(redis.call('HGET', KEYS[1], 'c:' .. ARGV[1]) or '0')\n"
    "if tonumber(ARGV[2]) > rep then\n"
    "  redis.call('HINCRBY', KEYS[1], 'spent', tonumber(ARGV[2]) - rep)\n"
    "  redis.call('HSET', KEYS[1], 'c:' .. ARGV[1], ARGV[2])\n"
    "end\n"
    "if ARGV[8] == '1' then redis.call('HDEL', KEYS[1], 'c:' .. ARGV[1]) end\n"
    "local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)\n"
    "for i = 1, #gone do\n"
    "  redis.call('ZREM', KEYS[2], gone[i])\n"
    "  redis.call('HDEL', KEYS[1], 'n:' .. gone[i])\n"
    "end\n"
    "local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')\n"
    "local others = 0\n"
    "local all = redis.call('HGETALL', KEYS[1])\n"
    "for i = 1, #all, 2 do\n"
    "  if string.sub(all[i], 1, 2) == 'n:' and all[i] ~= 'n:' .. ARGV[1] then\n"
    "    others = others + tonumber(all[i + 1])\n"
    "  end\n"
    "end\n"
    "local open = tonumber(ARGV[3])\n"
    "local g = math.max(0, math.min(tonumber(ARGV[4]), tonumber(ARGV[5]) - spent - others - "
    "open))\n"
    "if open + g > 0 then\n"
    "  redis.call('HSET', KEYS[1], 'n:' .. ARGV[1], open + g)\n"
    "  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[1])\n"
    "else\n"
    "  redis.call('HDEL', KEYS[1], 'n:' .. ARGV[1])\n"
    "  redis.call('ZREM', KEYS[2], ARGV[1])\n"
    "end\n"
    "if tonumber(ARGV[7]) > 0 then\n"
    "  for i = 1, 2 do redis.call('PEXPIRE', KEYS[i], ARGV[7]) end\n"
    "end\n"
    "return {g, spent, others + open + g}\n";

/* HEARTBEAT. KEYS: the nodes (ZSET node -> last seen), their owners (HASH node -> the instance
 * token of the aigw that last heartbeat under that name). ARGV: node, alive_ms, this instance's
 * token. Two instances sharing a node_name (a copied config) would mix up their leases, slots
 * and budget reports and be counted as one host: a name last seen within alive_ms from another
 * token is a clash. Returns {the number of nodes seen within alive_ms (this one included),
 * 1 for a clash}. */
static const char SYNC_LUA_HB[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local alive = tonumber(ARGV[2])\n"
    "local prev = redis.call('HGET', KEYS[2], ARGV[1])\n"
    "local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])\n"
    "local clash = 0\n"
    "if prev and prev ~= ARGV[3] and seen and tonumber(seen) >= now - alive then clash = 1 end\n"
    "redis.call('ZADD', KEYS[1], now, ARGV[1])\n"
    "redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])\n"
    "local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - 100 * alive)\n"
    "for i = 1, #gone do redis.call('HDEL', KEYS[2], gone[i]) end\n"
    "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 100 * alive)\n"
    "for i = 1, 2 do redis.call('PEXPIRE', KEYS[i], 100 * alive + 60000) end\n"
    "return {redis.call('ZCOUNT', KEYS[1], now - alive, '+inf'), clash}\n";

/* USAGE. KEYS: 1 this flusher's last applied sequence number (a string, expires after a week),
 * 2 the usage epoch (made when missing: Redis lost or never had the totals), 3.. one HASH of
 * totals per entry (key, model, backend). ARGV: 1 sequence number, 2 the epoch the flusher knows
 * ("-": none yet), 3 full (1: the values are whole totals, sent after Redis lost its data), then
 * groups of 9: the entry's KEYS index and its 8 figures to add. A flush is applied once: one
 * whose number is not above the last applied one is a resend of an applied one. Deltas meant for
 * an epoch Redis no longer has are refused ({-1, epoch}): the flusher sends its whole totals.
 * Returns {1 applied / 0 a resend, epoch, the 8 totals of every entry in KEYS order}. */
static const char SYNC_LUA_USAGE[] =
    "local e = redis.call('GET', KEYS[2])\n"
    "if not e then\n"
    "  local t = redis.call('TIME')\n"
    "  e = t[1] .. '.' .. t[2]\n"
    "  redis.call('SET', KEYS[2], e)\n"
    "end\n"
    "if ARGV[2] ~= '-' and ARGV[2] ~= e and ARGV[3] ~= '1' then return {-1, e} end\n"
    "local f = {'requests', 'prompt', 'completion', 'cached', 'reasoning', 'partial',\n"
    "  'cost_nano', 'list_cost_nano'}\n"
    "local applied = 0\n"
    "if tonumber(ARGV[1]) > tonumber(redis.call('GET', KEYS[1]) or '0') then\n"
    "  for i = 4, #ARGV, 9 do\n"
    "    local k = KEYS[tonumber(ARGV[i])]\n"
    "    for j = 1, 8 do\n"
    "      if ARGV[i + j] ~= '0' then redis.call('HINCRBY', k, f[j], ARGV[i + j]) end\n"
    "    end\n"
    "  end\n"
    "  applied = 1\n"
    "end\n"
    "redis.call('SET', KEYS[1], ARGV[1], 'PX', 604800000)\n"
    "local out = {applied, e}\n"
    "for i = 3, #KEYS do\n"
    "  local v = redis.call('HMGET', KEYS[i], unpack(f))\n"
    "  for j = 1, 8 do out[#out + 1] = v[j] or '0' end\n"
    "end\n"
    "return out\n";

enum sync_conn_state {
    SYNC_DOWN = 0,  /* no connection; reconnect at next_connect_ms */
    SYNC_HANDSHAKE, /* connecting, AUTH, SELECT, SCRIPT LOAD in flight */
    SYNC_READY,
};

/* One leased limiter, as this process tracks it. */
struct sync_lim {
    uint32_t id;
    const char *kind, *name;
    uint32_t rpm, tpm, par;
    char k_win[SYNC_KEY_MAX], k_req[SYNC_KEY_MAX], k_tok[SYNC_KEY_MAX];
    char k_par[SYNC_KEY_MAX], k_parx[SYNC_KEY_MAX]; /* slots per node, and their expiry */
    char lease_id[SYNC_ID_MAX];                     /* the open lease in Redis, "-" when none */
    char new_id[SYNC_ID_MAX];                       /* of the RENEW in flight */
    uint64_t seq;
    /* renewals (by seq) whose answers were lost with the connection: Redis may still run them
     * (a paused or slow Redis runs what was sent before it hears of the close), so the next
     * renewal deletes the leases they made, which this host never had. 0 0: none */
    uint64_t lost_lo, lost_hi;
    int busy;          /* a RENEW in flight */
    uint64_t sent_ms;  /* monotonic, of the RENEW in flight */
    int64_t unrep_req; /* used under lease_id, not yet reported */
    int64_t unrep_tok;
    int64_t extra_req; /* used while Redis was away: counted with the next lease */
    int64_t extra_tok;
    int64_t recent_req[2], recent_tok[2]; /* used in the last two intervals */
    int64_t held_req, held_tok;           /* granted into shm and not yet reported used */
    int64_t fleet_req, fleet_tok;         /* the fleet's sums at the last renewal */
    int in_fallback;
    int fin, b_fin; /* the last renewal (everything given back) was sent */
    int b_lost;     /* a budget report's answer was lost: Redis may run it late */
    /* what the renewal (budget's) in flight asks for; dry: the last answer granted none of it
     * (the fleet's quota is spent): hungry flags wait for the next tick, as refused clients
     * do (Retry-After), instead of a script every SYNC_FAST_MS */
    int64_t asked_req, asked_tok, b_asked;
    int dry, b_dry;
    int refused; /* SYNC_RENEW_REFUSED, SYNC_BUDGET_REFUSED: Redis answered that script of it
                  * with an error: in the fallback (sync_refused) */
    /* budget_usd (0: none) and its lease, renewed by its own script */
    uint64_t budget;
    enum limit_period period;
    int b_busy, b_quiet;
    uint64_t b_sent_ms;
    int64_t b_unrep;  /* spent not yet reported (of period b_period) */
    int64_t b_acked;  /* spent in period b_period whose report Redis answered */
    int64_t b_period; /* the period b_unrep belongs to */
    int64_t b_need_max;
    int64_t b_recent[2];
    int quiet;        /* nothing used nor refused since the renewal before */
    int64_t need_max; /* the largest request the tokens refused lately (see sync_need) */
    unsigned need_age, b_need_age;
};

struct sync {
    struct conf *conf;
    struct shm *shm;
    struct limit_region *lr;
    struct limit_fleet *fleet;
    uv_loop_t loop;
    uv_timer_t tick, fast;
    uv_signal_t sigterm, sigint, sigquit;
    struct sync_conn *conn;
    enum sync_conn_state state;
    int handshake_left; /* replies the handshake still waits for */
    uint64_t handshake_ms;
    uint64_t next_connect_ms, backoff_ms;
    int hb_busy;
    uint64_t hb_sent_ms;
    uint32_t nodes_alive;
    int fallback;        /* the fallback applies (entered once Redis was found away) */
    int refused;         /* errors answered to scripts since the last success (sync_refused) */
    int stopping;        /* SIGTERM/SIGQUIT: no reconnect; the generation's workers finish */
    int final;           /* they have: everything is given back, then the process exits */
    uint64_t stop_by_ms; /* the workers are not waited for longer than this */
    uint64_t final_ms;   /* when the last renewals were sent: their answers are waited for 1 s */
    char sha_renew[48], sha_hb[48], sha_budget[48];
    char k_nodes[SYNC_KEY_MAX], k_owners[SYNC_KEY_MAX];
    char token[24];     /* this aigw instance (see sync_token) */
    int clash, clashes; /* the heartbeat saw another instance under node_name; in a row */
    struct sync_lim *lims;
    uint32_t n_lims;
    uint64_t slow_ms;
    /* usage totals flushed to Redis (see SYNC_LUA_USAGE) */
    struct acct_region *acct;
    struct acct_sync *as;
    char sha_usage[48];
    char **u_keys;      /* Redis key of each entry: keys, models, backends (acct's order) */
    uint32_t u_n[3];    /* entries of each kind */
    uint32_t u_entries; /* their sum */
    int u_busy, u_fin;
    unsigned u_refused; /* flushes answered with an error since the last applied one */
    uint64_t u_sent_ms;
    char k_useq[SYNC_KEY_MAX], k_uepoch[SYNC_KEY_MAX];
};

/* The uv_poll_t driving one hiredis connection; freed when both are done with it. */
struct sync_conn {
    struct sync *s;
    redisAsyncContext *ac;
    uv_poll_t poll;
    int events;
};

static struct sync S;

int64_t sync_want(uint32_t limit, uint32_t nodes, int64_t recent, int64_t held, int64_t need,
                  int hungry)
{
    int64_t base, target, want;

    if (!limit)
        return 0;
    if (!nodes)
        nodes = 1;
    base = (int64_t)limit / (8 * (int64_t)nodes);
    if (base < 1)
        base = 1;
    target = recent > base ? recent : base;
    if (need > target)
        target = need;
    want = target - (held > 0 ? held : 0);
    if (hungry && want < base)
        want = base; /* ran low: a chunk at least, whatever the past says */
    if (hungry && need > 0 && want < need - held)
        want = need - held;
    if (want < 0)
        want = 0;
    return want > (int64_t)limit ? (int64_t)limit : want;
}

/* redisAsyncCommand, with the compiler checking its arguments against the format (hiredis takes
 * printf's conversions and makes each space-separated word one argument). */
__attribute__((format(printf, 4, 5))) static int
sync_cmd(redisAsyncContext *ac, redisCallbackFn *fn, void *priv, const char *fmt, ...)
{
    va_list ap;
    int rc;

    va_start(ap, fmt);
    rc = redisvAsyncCommand(ac, fn, priv, fmt, ap);
    va_end(ap);
    return rc;
}

/* ---- hiredis on our uv_poll_t ---- */

static void sync_poll_cb(uv_poll_t *h, int status, int events)
{
    struct sync_conn *c = h->data;

    if (status < 0)
        events = UV_READABLE; /* let hiredis see the error on its read */
    if (c->ac && (events & UV_READABLE))
        redisAsyncHandleRead(c->ac);
    if (c->ac && (events & UV_WRITABLE))
        redisAsyncHandleWrite(c->ac);
}

static void sync_poll_update(struct sync_conn *c)
{
    if (c->events)
        uv_poll_start(&c->poll, c->events, sync_poll_cb);
    else
        uv_poll_stop(&c->poll);
}

static void ev_add_read(void *p)
{
    struct sync_conn *c = p;
    c->events |= UV_READABLE;
    sync_poll_update(c);
}

static void ev_del_read(void *p)
{
    struct sync_conn *c = p;
    c->events &= ~UV_READABLE;
    sync_poll_update(c);
}

static void ev_add_write(void *p)
{
    struct sync_conn *c = p;
    c->events |= UV_WRITABLE;
    sync_poll_update(c);
}

static void ev_del_write(void *p)
{
    struct sync_conn *c = p;
    c->events &= ~UV_WRITABLE;
    sync_poll_update(c);
}

static void sync_conn_closed(uv_handle_t *h)
{
    free(h->data);
}

static void sync_drop(struct sync *s, const char *why);

/* hiredis is freeing the context: the poll handle goes with it. When hiredis does it on its own
 * (the connection failed or was lost; before it calls the disconnect callback), the connection
 * is down from now on. */
static void ev_cleanup(void *p)
{
    struct sync_conn *c = p;
    struct sync *s = c->s;

    if (s->conn == c) {
        char why[160];

        snprintf(why, sizeof(why), "connection lost: %s",
                 c->ac && c->ac->errstr[0] ? c->ac->errstr : "closed");
        s->conn = NULL;
        sync_drop(s, why);
    }
    c->ac = NULL;
    uv_poll_stop(&c->poll);
    uv_close((uv_handle_t *)&c->poll, sync_conn_closed);
}

/* ---- state ---- */

static void fleet_state(struct sync *s, enum limit_fleet_state st)
{
    if (atomic_load_explicit(&s->fleet->state, memory_order_relaxed) == st)
        return;
    atomic_store_explicit(&s->fleet->since_ms, time_real_ms(), memory_order_relaxed);
    atomic_store_explicit(&s->fleet->state, st, memory_order_relaxed);
}

/* Limiter l follows cluster_fallback (Redis away, or refusing its scripts). */
static void sync_lim_fallback(struct sync *s, struct sync_lim *l)
{
    enum conf_cluster_fallback f = s->conf->cluster.fallback;
    uint32_t nodes = s->nodes_alive ? s->nodes_alive : 1;
    struct limit_lease le;
    enum limit_fallback m = f == CLUSTER_FALLBACK_OPEN     ? LIMIT_FALLBACK_OPEN
                            : f == CLUSTER_FALLBACK_CLOSED ? LIMIT_FALLBACK_CLOSED
                                                           : LIMIT_FALLBACK_SHARE;
    uint32_t cr = l->rpm / nodes, ct = l->tpm / nodes, cp = l->par / nodes;

    /* what was used under the open lease is reported to it when Redis is back */
    if (limit_lease_take(s->lr, l->id, time_mono_ms(), INT64_MAX, INT64_MAX, UINT32_MAX, &le) ==
        0) {
        l->unrep_req += le.used_req;
        l->unrep_tok += le.used_tok;
    }
    if (l->budget && limit_lease_take_budget(s->lr, l->id, (int64_t)(time_real_ms() / 1000),
                                             INT64_MAX, &le) == 0) {
        if (le.period_start != l->b_period)
            l->b_unrep = l->b_acked = 0, l->b_period = le.period_start;
        l->b_unrep += le.used_nano;
    }
    limit_lease_fallback(s->lr, l->id, m, cr ? cr : 1, ct ? ct : 1, cp ? cp : 1,
                         l->budget / nodes ? l->budget / nodes : 1);
    l->in_fallback = 1;
}

/* Redis is away: each leased limiter follows cluster_fallback. Logged once per outage. */
static void sync_fallback_enter(struct sync *s, const char *why)
{
    enum conf_cluster_fallback f = s->conf->cluster.fallback;
    uint32_t nodes = s->nodes_alive ? s->nodes_alive : 1;

    atomic_fetch_add_explicit(&s->fleet->errors, 1, memory_order_relaxed);
    if (s->fallback)
        return;
    s->fallback = 1;
    log_warn("cluster: Redis %s is away (%s): limits fall back to %s (%u host%s last seen)",
             s->conf->cluster.redis, why, conf_cluster_fallback_str(f), nodes,
             nodes == 1 ? "" : "s");
    for (uint32_t i = 0; i < s->n_lims; i++)
        sync_lim_fallback(s, &s->lims[i]);
    fleet_state(s, LIMIT_FLEET_FALLBACK);
    atomic_store_explicit(&s->fleet->primed, 1, memory_order_release);
}

/* Redis answered limiter l's script with an error (maxmemory reached with noeviction, a replica
 * that turned read-only, a key of the wrong type): its lease cannot be renewed and would run
 * out, so l follows cluster_fallback until a script of it succeeds. Logged once per episode. */
static void sync_refused(struct sync *s, struct sync_lim *l, int which, const redisReply *rep)
{
    if (!l->in_fallback)
        sync_lim_fallback(s, l);
    l->refused |= which;
    fleet_state(s, LIMIT_FLEET_FALLBACK);
    atomic_store_explicit(&s->fleet->primed, 1, memory_order_release);
    if (s->refused++)
        return;
    log_warn("cluster: Redis %s refuses the fleet's scripts (%.*s): limits fall back to %s until "
             "it takes them again",
             s->conf->cluster.redis, (int)rep->len, rep->str,
             conf_cluster_fallback_str(s->conf->cluster.fallback));
}

/* Script `which` of l succeeded (its grant ended the cell's fallback): while l's other script
 * is still refused, l stays in the fallback; when none is, the fleet is leased again. */
static void sync_accepted(struct sync *s, struct sync_lim *l, int which)
{
    if (!l->refused)
        return;
    l->refused &= ~which;
    if (l->refused) {
        sync_lim_fallback(s, l);
        return;
    }
    for (uint32_t i = 0; i < s->n_lims; i++)
        if (s->lims[i].refused)
            return;
    s->refused = 0;
    log_info("cluster: Redis %s takes the fleet's scripts again: leasing from the fleet again",
             s->conf->cluster.redis);
    if (s->state == SYNC_READY)
        fleet_state(s, LIMIT_FLEET_CONNECTED);
}

/* Drops the connection (hiredis answers what is in flight with NULL) and plans a reconnect. */
static void sync_drop(struct sync *s, const char *why)
{
    uint64_t now = time_mono_ms();

    /* DOWN first: freeing answers what is in flight with NULL, which must not drop again */
    s->state = SYNC_DOWN;
    if (s->conn && s->conn->ac) {
        redisAsyncContext *ac = s->conn->ac;

        s->conn = NULL;
        redisAsyncFree(ac);
    }
    s->hb_busy = 0;
    s->backoff_ms = s->backoff_ms ? s->backoff_ms * 2 : SYNC_BACKOFF_MIN;
    if (s->backoff_ms > SYNC_BACKOFF_MAX)
        s->backoff_ms = SYNC_BACKOFF_MAX;
    s->next_connect_ms = now + s->backoff_ms;
    if (!s->stopping)
        sync_fallback_enter(s, why);
}

/* ---- RENEW ---- */

static void sync_renew_done(redisAsyncContext *ac, void *r, void *priv)
{
    struct sync_lim *l = priv;
    struct sync *s = &S;
    redisReply *rep = r;
    uint64_t now = time_mono_ms();
    struct limit_grant gr;
    int64_t g[8];

    l->busy = 0;
    if (!rep) { /* the connection went with it: Redis may have run it, or may still */
        l->lost_lo = l->lost_lo ? l->lost_lo : l->seq;
        l->lost_hi = l->seq;
        if (l->lost_hi - l->lost_lo > SYNC_LOST_MAX)
            l->lost_lo = l->lost_hi - SYNC_LOST_MAX;
    }
    if (!rep || rep->type != REDIS_REPLY_ARRAY || rep->elements != 8) {
        if (rep && rep->type == REDIS_REPLY_ERROR) {
            if (!l->refused) /* once per limiter and episode, not every interval */
                log_warn("cluster: lease of %s %s: Redis: %.*s", l->kind, l->name, (int)rep->len,
                         rep->str);
            if (!strncmp(rep->str, "NOSCRIPT", 8) && s->state == SYNC_READY)
                sync_drop(s, "scripts lost"); /* the reconnect loads them again */
            else if (!s->stopping)
                sync_refused(s, l, SYNC_RENEW_REFUSED, rep);
        }
        atomic_fetch_add_explicit(&s->fleet->errors, 1, memory_order_relaxed);
        return; /* what was not reported is kept for the next renewal */
    }
    for (int i = 0; i < 8; i++)
        g[i] = rep->element[i]->type == REDIS_REPLY_INTEGER ? rep->element[i]->integer : 0;
    l->unrep_req = l->unrep_tok = 0;
    l->extra_req = l->extra_tok = 0;
    l->lost_lo = l->lost_hi = 0; /* this renewal deleted them */
    if (g[0] || g[1] || l->held_req > 0 || l->held_tok > 0)
        snprintf(l->lease_id, sizeof(l->lease_id), "%s", l->new_id);
    else
        snprintf(l->lease_id, sizeof(l->lease_id), "-");
    l->dry = (l->asked_req > 0 && g[0] == 0) || (l->asked_tok > 0 && g[1] == 0);
    l->held_req += g[0];
    l->held_tok += g[1];
    l->fleet_req = g[2];
    l->fleet_tok = g[3];
    l->in_fallback = 0;
    /* valid from when it was asked for: the grant happened after that, in any clock */
    gr = (struct limit_grant){.add_req = g[0],
                              .add_tok = g[1],
                              .par = (uint32_t)g[6],
                              .until_ms = l->sent_ms + s->conf->cluster.lease_ttl_ms,
                              .low_req = l->rpm ? (g[0] + 3) / 4 : 0,
                              .low_tok = l->tpm ? (g[1] + 3) / 4 : 0,
                              .fleet_req = g[2],
                              .fleet_tok = g[3],
                              .out_req = g[4],
                              .out_tok = g[5],
                              .fleet_par = g[7]};
    limit_lease_grant(s->lr, l->id, &gr);
    atomic_fetch_add_explicit(&s->fleet->renewals, 1, memory_order_relaxed);
    sync_accepted(s, l, SYNC_RENEW_REFUSED);
    atomic_store_explicit(&s->fleet->rtt_us, (now - l->sent_ms) * 1000, memory_order_relaxed);
    (void)ac;
}

/* The chunk a host holds at least while it has any use: limit / (8 x hosts alive), 1 or more. */
static int64_t sync_base(uint32_t limit, uint32_t nodes)
{
    int64_t b = (int64_t)limit / (8 * (int64_t)(nodes ? nodes : 1));

    return limit ? (b > 0 ? b : 1) : 0;
}

#define SYNC_NEED_RENEWALS 64 /* how long the largest refused request is remembered */

/* Remembers the largest request a lease refused for SYNC_NEED_RENEWALS renewals after the last
 * refusal: an idle host keeps that much, up to its fair share (a request costing more than the
 * base chunk would be refused every time the host went idle between two of them). */
static void sync_need(int64_t *max, unsigned *age, int64_t need)
{
    if (need > 0) {
        *max = need > *max ? need : *max;
        *age = 0;
    } else if (++*age >= SYNC_NEED_RENEWALS) {
        *max = 0;
        *age = 0;
    }
}

/* What an idle host keeps of a lease: its base chunk, so that a sporadic request is not refused,
 * when the limit is large enough for every host to keep one at no more than 1/8 of it; nothing
 * otherwise (rpm 5 on 4 hosts: idle hosts would hold 4 of the 5). */
static int64_t sync_idle_keep(uint32_t limit, uint32_t nodes, int64_t base)
{
    return (int64_t)limit >= 8 * (int64_t)(nodes ? nodes : 1) ? base : 0;
}

/* Reports what limiter l used and asks for its next chunk (hungry: it ran low). Every interval,
 * so that the lease is extended; idle for an interval, it keeps a base chunk at most (sporadic
 * requests are not refused) and returns the rest to the fleet. */
static void sync_renew(struct sync *s, struct sync_lim *l, int hungry)
{
    struct limit_lease le;
    int64_t carry_req, carry_tok, want_req, want_tok, used_req, used_tok, keep_req, keep_tok;
    int64_t base_req = sync_base(l->rpm, s->nodes_alive),
            base_tok = sync_base(l->tpm, s->nodes_alive);
    uint32_t base_par = (uint32_t)sync_base(l->par, s->nodes_alive), keep_par, want_par = 0;
    int idle, quiet;

    if (l->busy || s->state != SYNC_READY || (!l->rpm && !l->tpm && !l->par))
        return;
    if (limit_lease_get(s->lr, l->id, &le) < 0)
        return;
    /* idle: nothing used, in flight or refused (need_tok) for two renewals in a row, so that a
     * top-up for traffic coming every little more than sync_interval is not given back before
     * it is used */
    quiet = !hungry && !l->in_fallback && le.used_req == 0 && le.used_tok == 0 &&
            le.parallel == 0 && le.need_tok == 0;
    idle = (quiet && l->quiet) || s->final; /* stopping: everything goes back */
    l->quiet = quiet;
    sync_need(&l->need_max, &l->need_age, (int64_t)le.need_tok);
    /* the largest recent request is kept up to this host's fair share (tpm / hosts): one client
     * sending a request of nearly the whole tpm of a model or pool must not make this host hold
     * it idle for SYNC_NEED_RENEWALS while the other hosts refuse; a larger one is topped up
     * when it comes (hungry: its whole need is asked for) */
    if (base_tok && l->need_max > base_tok) {
        int64_t fair = (int64_t)l->tpm / (s->nodes_alive ? s->nodes_alive : 1);

        base_tok = l->need_max < fair ? l->need_max : fair > base_tok ? fair : base_tok;
    }
    if (idle && le.req <= 0 && le.tok <= 0 && le.par == 0 && !l->unrep_req && !l->unrep_tok &&
        !strcmp(l->lease_id, "-"))
        return; /* nothing held, nothing to report */
    /* parallel slots: what is in flight and a base more (two when it ran out), a base when
     * idle; cut here before Redis hears of it */
    keep_par = l->in_fallback || s->final ? 0
               : idle ? (uint32_t)sync_idle_keep(l->par, s->nodes_alive, base_par)
                      : le.parallel + base_par * (hungry ? 2 : 1);
    /* back from a fallback: what is left of the old lease goes back whole */
    keep_req = l->in_fallback || s->final ? 0
               : idle                     ? sync_idle_keep(l->rpm, s->nodes_alive, base_req)
                                          : INT64_MAX;
    keep_tok = l->in_fallback || s->final ? 0
               : idle                     ? sync_idle_keep(l->tpm, s->nodes_alive, base_tok)
                                          : INT64_MAX;
    if (limit_lease_take(s->lr, l->id, time_mono_ms(), keep_req, keep_tok, keep_par, &le) < 0)
        return;
    if (l->par)
        want_par = keep_par > le.parallel ? keep_par : le.parallel;
    used_req = le.used_req;
    used_tok = le.used_tok;
    carry_req = le.req < keep_req ? le.req : keep_req;
    carry_tok = le.tok < keep_tok ? le.tok : keep_tok;
    carry_req = carry_req > 0 ? carry_req : 0;
    carry_tok = carry_tok > 0 ? carry_tok : 0;
    /* used while Redis was away, or before the first grant (the cells start in the fallback):
     * counted with the new lease */
    if (l->in_fallback || le.fallback != LIMIT_FALLBACK_NONE) {
        l->extra_req += used_req;
        l->extra_tok += used_tok;
    } else {
        l->unrep_req += used_req;
        l->unrep_tok += used_tok;
    }
    l->recent_req[1] = l->recent_req[0];
    l->recent_req[0] = used_req;
    l->recent_tok[1] = l->recent_tok[0];
    l->recent_tok[0] = used_tok;
    want_req = idle ? 0
                    : sync_want(l->rpm, s->nodes_alive, l->recent_req[0] + l->recent_req[1],
                                carry_req, 0, hungry || carry_req < 1);
    want_tok =
        idle ? 0
             : sync_want(l->tpm, s->nodes_alive, l->recent_tok[0] + l->recent_tok[1], carry_tok,
                         (int64_t)le.need_tok > base_tok ? le.need_tok : base_tok, hungry);
    l->held_req = carry_req;
    l->asked_req = want_req;
    l->asked_tok = want_tok;
    l->held_tok = carry_tok;
    snprintf(l->new_id, sizeof(l->new_id), "%s:%d:%llu", s->conf->cluster.node_name, (int)getpid(),
             (unsigned long long)++l->seq);
    l->sent_ms = time_mono_ms();
    if (sync_cmd(s->conn->ac, sync_renew_done, l,
                 "EVALSHA %s 5 %s %s %s %s %s %s %lld %lld %lld %lld %lld %lld %u %u %llu %s %llu "
                 "%d %u %s:%d %lld %lld %lld %lld %s:%d: %llu %llu",
                 s->sha_renew, l->k_win, l->k_req, l->k_tok, l->k_par, l->k_parx, l->lease_id,
                 (long long)l->unrep_req, (long long)l->unrep_tok, (long long)carry_req,
                 (long long)carry_tok, (long long)want_req, (long long)want_tok, l->rpm, l->tpm,
                 (unsigned long long)(SYNC_WINDOW_MS + s->conf->cluster.lease_ttl_ms), l->new_id,
                 (unsigned long long)s->conf->cluster.lease_ttl_ms, l->par ? (int)want_par : -1,
                 l->par, s->conf->cluster.node_name, (int)getpid(),
                 (long long)((int64_t)le.win_req > l->extra_req ? (int64_t)le.win_req - l->extra_req
                                                                : 0),
                 (long long)((int64_t)le.win_tok > l->extra_tok ? (int64_t)le.win_tok - l->extra_tok
                                                                : 0),
                 (long long)l->extra_req, (long long)l->extra_tok, s->conf->cluster.node_name,
                 (int)getpid(), (unsigned long long)(l->lost_lo ? l->lost_lo : 1),
                 (unsigned long long)l->lost_hi) != REDIS_OK) {
        atomic_fetch_add_explicit(&s->fleet->errors, 1, memory_order_relaxed);
        return;
    }
    l->busy = 1;
}

/* ---- budget ---- */

static void sync_budget_done(redisAsyncContext *ac, void *r, void *priv)
{
    struct sync_lim *l = priv;
    struct sync *s = &S;
    redisReply *rep = r;
    int64_t g[3];

    l->b_busy = 0;
    if (!rep)
        l->b_lost = 1;
    if (!rep || rep->type != REDIS_REPLY_ARRAY || rep->elements != 3) {
        if (rep && rep->type == REDIS_REPLY_ERROR) {
            if (!l->refused)
                log_warn("cluster: budget lease of %s %s: Redis: %.*s", l->kind, l->name,
                         (int)rep->len, rep->str);
            if (!strncmp(rep->str, "NOSCRIPT", 8) && s->state == SYNC_READY)
                sync_drop(s, "scripts lost");
            else if (!s->stopping)
                sync_refused(s, l, SYNC_BUDGET_REFUSED, rep);
        }
        atomic_fetch_add_explicit(&s->fleet->errors, 1, memory_order_relaxed);
        return; /* the spent not reported is kept for the next renewal */
    }
    for (int i = 0; i < 3; i++)
        g[i] = rep->element[i]->type == REDIS_REPLY_INTEGER ? rep->element[i]->integer : 0;
    l->b_dry = l->b_asked > 0 && g[0] == 0;
    l->b_acked += l->b_unrep; /* b_unrep is what was sent: it changes only when not busy */
    l->b_unrep = 0;
    if (!l->rpm && !l->tpm && !l->par)
        l->in_fallback = 0;
    limit_lease_grant_budget(s->lr, l->id, g[0], l->b_sent_ms + s->conf->cluster.lease_ttl_ms,
                             g[1]);
    sync_accepted(s, l, SYNC_BUDGET_REFUSED);
    (void)ac;
}

/* The budget's lease, like sync_renew's: what was spent is added to the period's total in Redis
 * (spent only grows: no window), and this host holds what it may still reserve plus what its
 * requests in flight reserved. */
static void sync_renew_budget(struct sync *s, struct sync_lim *l, int hungry)
{
    struct limit_lease le;
    int64_t base, keep, carry, open, want, target;
    uint64_t nodes = s->nodes_alive ? s->nodes_alive : 1, life_ms;
    int64_t wall_s = (int64_t)(time_real_ms() / 1000);
    char k_b[SYNC_KEY_MAX + 32], k_bx[SYNC_KEY_MAX + 32];
    int quiet, idle;

    if (!l->budget || l->b_busy || s->state != SYNC_READY)
        return;
    if (limit_lease_get(s->lr, l->id, &le) < 0)
        return;
    quiet = !hungry && !l->in_fallback && le.used_nano == 0 && le.reserved_nano == 0 &&
            le.need_nano == 0;
    idle = (quiet && l->b_quiet) || s->final;
    l->b_quiet = quiet;
    if (idle && le.nano <= 0 && !l->b_unrep)
        return;
    base = (int64_t)(l->budget / (8 * nodes));
    base = base > 0 ? base : 1;
    sync_need(&l->b_need_max, &l->b_need_age, (int64_t)le.need_nano);
    /* idle: a base chunk, or the dearest recent request, is kept when the budget is large */
    keep = l->in_fallback || s->final ? 0
           : idle ? (l->budget >= 8 * nodes ? (base > l->b_need_max ? base : l->b_need_max) : 0)
                  : INT64_MAX;
    if (limit_lease_take_budget(s->lr, l->id, wall_s, keep, &le) < 0)
        return;
    if (le.period_start != l->b_period) { /* a new period: the old one's total is done */
        l->b_unrep = l->b_acked = 0;
        l->b_period = le.period_start;
    }
    l->b_unrep += le.used_nano;
    l->b_recent[1] = l->b_recent[0];
    l->b_recent[0] = le.used_nano + (int64_t)le.reserved_nano;
    carry = le.nano < keep ? le.nano : keep;
    carry = carry > 0 ? carry : 0;
    open = carry + (int64_t)le.reserved_nano;
    target = l->b_recent[0] + l->b_recent[1];
    target = target > base ? target : base;
    target = target > l->b_need_max ? target : l->b_need_max;
    want = idle ? 0 : target - carry;
    if (!idle && hungry && want < base)
        want = base;
    want = want < 0 ? 0 : want > (int64_t)l->budget ? (int64_t)l->budget : want;
    l->b_asked = want;
    snprintf(k_b, sizeof(k_b), "%s{key:%s}:budget:%lld", s->conf->cluster.key_prefix, l->name,
             (long long)le.period_start);
    snprintf(k_bx, sizeof(k_bx), "%s{key:%s}:budgetx:%lld", s->conf->cluster.key_prefix, l->name,
             (long long)le.period_start);
    life_ms = l->period == LIMIT_PERIOD_DAY     ? 2ull * 86400 * 1000
              : l->period == LIMIT_PERIOD_MONTH ? 40ull * 86400 * 1000
                                                : 0;
    l->b_sent_ms = time_mono_ms();
    if (sync_cmd(s->conn->ac, sync_budget_done, l,
                 "EVALSHA %s 2 %s %s %s:%d %lld %lld %lld %llu %llu %llu %d", s->sha_budget, k_b,
                 k_bx, s->conf->cluster.node_name, (int)getpid(),
                 (long long)(l->b_acked + l->b_unrep), (long long)open, (long long)want,
                 (unsigned long long)l->budget, (unsigned long long)s->conf->cluster.lease_ttl_ms,
                 (unsigned long long)life_ms, s->final && !l->b_lost) != REDIS_OK) {
        atomic_fetch_add_explicit(&s->fleet->errors, 1, memory_order_relaxed);
        return;
    }
    l->b_busy = 1;
}

/* ---- USAGE ---- */

/* d = a - b, word by word (0 where b is ahead: it never is, the counts only grow). */
static void usage_diff(struct acct_usage *d, const struct acct_usage *a, const struct acct_usage *b)
{
    const uint64_t *aw = (const uint64_t *)a, *bw = (const uint64_t *)b;
    uint64_t *dw = (uint64_t *)d;

    for (size_t w = 0; w < ACCT_WORDS; w++)
        dw[w] = aw[w] > bw[w] ? aw[w] - bw[w] : 0;
}

static void sync_usage_done(redisAsyncContext *ac, void *r, void *priv)
{
    struct sync *s = priv;
    struct acct_sync *as = s->as;
    redisReply *rep = r;

    s->u_busy = 0;
    (void)ac;
    if (!rep || rep->type != REDIS_REPLY_ARRAY || rep->elements < 2 ||
        rep->element[0]->type != REDIS_REPLY_INTEGER ||
        rep->element[1]->type != REDIS_REPLY_STRING) {
        /* the flush stays pending in shm: resent as it is, Redis applies it once */
        if (rep && rep->type == REDIS_REPLY_ERROR) {
            if (!s->u_refused++) /* once until a flush succeeds */
                log_warn("cluster: usage flush: Redis: %.*s", (int)rep->len, rep->str);
            atomic_fetch_add_explicit(&s->fleet->errors, 1, memory_order_relaxed);
            if (!strncmp(rep->str, "NOSCRIPT", 8) && s->state == SYNC_READY)
                sync_drop(s, "scripts lost");
        }
        return;
    }
    snprintf(as->epoch, sizeof(as->epoch), "%.*s", (int)rep->element[1]->len, rep->element[1]->str);
    if (rep->element[0]->integer < 0) {
        /* Redis lost the totals: this generation's flush carries all this host counted (a
         * stopping generation's counts are in its successor's: it resends its deltas only) */
        if (!s->stopping) {
            log_warn("cluster: Redis %s lost the fleet's usage totals: sending this host's whole "
                     "totals again",
                     s->conf->cluster.redis);
            as->pending = 0;
            as->full = 1;
        }
        return;
    }
    for (int k = ACCT_KEY; k <= ACCT_BACKEND; k++)
        for (uint32_t i = 0; i < s->u_n[k]; i++) {
            struct acct_usage u;

            if (acct_slice_get(s->acct, ACCT_PEND_OWN, (enum acct_kind)k, i, &u) == 0)
                acct_slice_set(s->acct, ACCT_ACKED, (enum acct_kind)k, i, &u);
        }
    as->pending = 0;
    as->full = 0;
    s->u_refused = 0;
    if (rep->elements != 2 + (size_t)ACCT_WORDS * s->u_entries)
        return;
    for (uint32_t e = 0, k = ACCT_KEY, i = 0; e < s->u_entries; e++, i++) {
        uint64_t v[ACCT_WORDS];

        while (i >= s->u_n[k])
            i = 0, k++;
        for (size_t w = 0; w < ACCT_WORDS; w++) {
            const redisReply *x = rep->element[2 + e * ACCT_WORDS + w];

            v[w] = x->type == REDIS_REPLY_STRING ? strtoull(x->str, NULL, 10) : 0;
        }
        acct_slice_set(s->acct, ACCT_FLEET, (enum acct_kind)k, i, (const struct acct_usage *)v);
    }
    atomic_store_explicit(&as->fleet_ms, time_real_ms(), memory_order_release);
}

/* Flushes what this generation's workers counted since Redis last acknowledged it (or, after
 * Redis lost its data, everything this host counted), and reads the fleet's totals back. The
 * flush is built in shm once and resent unchanged until Redis answers: a lost answer, a lost
 * connection or a restarted sync process never loses nor doubles a count. */
static void sync_usage(struct sync *s)
{
    struct acct_sync *as = s->as;
    uint32_t argc = 0, cap;
    const char **argv;
    size_t *lens;
    char *num, *p;
    int rc;

    if (!s->acct || !s->u_entries || s->state != SYNC_READY || s->u_busy)
        return;
    if (!as->pending) {
        for (int k = ACCT_KEY; k <= ACCT_BACKEND; k++)
            for (uint32_t i = 0; i < s->u_n[k]; i++) {
                struct acct_usage own, base, sent;

                acct_own_get(s->acct, (enum acct_kind)k, i, &own);
                if (as->full)
                    acct_get(s->acct, (enum acct_kind)k, i, &sent);
                else {
                    acct_slice_get(s->acct, ACCT_ACKED, (enum acct_kind)k, i, &base);
                    usage_diff(&sent, &own, &base);
                }
                acct_slice_set(s->acct, ACCT_PEND_SENT, (enum acct_kind)k, i, &sent);
                acct_slice_set(s->acct, ACCT_PEND_OWN, (enum acct_kind)k, i, &own);
            }
        as->seq++;
        as->pending = 1;
    }
    cap = 8 + s->u_entries * (1 + 1 + (uint32_t)ACCT_WORDS); /* see the ARG_ calls below */
    argv = calloc(cap, sizeof(*argv));
    lens = calloc(cap, sizeof(*lens));
    num = malloc((size_t)cap * 24);
    if (!argv || !lens || !num)
        goto out;
    p = num;
#define ARG_STR(str) (argv[argc] = (str), lens[argc] = strlen(argv[argc]), argc++)
#define ARG_NUM(fmt, v)                                                                            \
    (argv[argc] = p, lens[argc] = (size_t)snprintf(p, 24, fmt, v), p += 24, argc++)
    ARG_STR("EVALSHA");
    ARG_STR(s->sha_usage);
    ARG_NUM("%u", 2 + s->u_entries);
    ARG_STR(s->k_useq);
    ARG_STR(s->k_uepoch);
    for (uint32_t e = 0; e < s->u_entries; e++)
        ARG_STR(s->u_keys[e]);
    ARG_NUM("%llu", (unsigned long long)as->seq);
    ARG_STR(as->epoch[0] ? as->epoch : "-");
    ARG_STR(as->full ? "1" : "0");
    for (uint32_t e = 0, k = ACCT_KEY, i = 0; e < s->u_entries; e++, i++) {
        struct acct_usage u;
        const uint64_t *w = (const uint64_t *)&u;
        int zero = 1;

        while (i >= s->u_n[k])
            i = 0, k++;
        acct_slice_get(s->acct, ACCT_PEND_SENT, (enum acct_kind)k, i, &u);
        for (size_t j = 0; j < ACCT_WORDS; j++)
            zero &= !w[j];
        if (zero)
            continue;
        ARG_NUM("%u", 3 + e);
        for (size_t j = 0; j < ACCT_WORDS; j++) /* HINCRBY takes a signed 64-bit number */
            ARG_NUM("%llu", (unsigned long long)(w[j] > INT64_MAX ? INT64_MAX : w[j]));
    }
#undef ARG_STR
#undef ARG_NUM
    rc = redisAsyncCommandArgv(s->conn->ac, sync_usage_done, s, (int)argc, argv, lens);
    if (rc == REDIS_OK) {
        s->u_busy = 1;
        s->u_sent_ms = time_mono_ms();
    } else {
        atomic_fetch_add_explicit(&s->fleet->errors, 1, memory_order_relaxed);
    }
out:
    free(argv);
    free(lens);
    free(num);
}

/* ---- heartbeat and handshake ---- */

static void sync_hb_done(redisAsyncContext *ac, void *r, void *priv)
{
    struct sync *s = priv;
    redisReply *rep = r;
    int clash;

    s->hb_busy = 0;
    (void)ac;
    if (!rep || rep->type != REDIS_REPLY_ARRAY || rep->elements != 2 ||
        rep->element[0]->type != REDIS_REPLY_INTEGER ||
        rep->element[1]->type != REDIS_REPLY_INTEGER)
        return;
    s->nodes_alive = rep->element[0]->integer > 0 && rep->element[0]->integer <= UINT32_MAX
                         ? (uint32_t)rep->element[0]->integer
                         : 1;
    atomic_store_explicit(&s->fleet->nodes_alive, s->nodes_alive, memory_order_relaxed);
    /* two clean heartbeats in a row end it: the other instance stopped (or was renamed) */
    clash = rep->element[1]->integer == 1;
    s->clashes = clash ? 0 : s->clashes + 1;
    if (clash && !s->clash) {
        s->clash = 1;
        atomic_store_explicit(&s->fleet->node_clash, 1, memory_order_relaxed);
        log_err("cluster: another aigw instance heartbeats as node %s: node_name must be unique "
                "per host (their leases, parallel slots and budget reports get mixed up, and the "
                "fleet counts them as one host)",
                s->conf->cluster.node_name);
    } else if (s->clash && s->clashes >= 2) {
        s->clash = 0;
        atomic_store_explicit(&s->fleet->node_clash, 0, memory_order_relaxed);
        log_info("cluster: node %s is this instance's alone again", s->conf->cluster.node_name);
    }
}

static void sync_heartbeat(struct sync *s)
{
    if (s->state != SYNC_READY || s->hb_busy)
        return;
    if (sync_cmd(s->conn->ac, sync_hb_done, s, "EVALSHA %s 2 %s %s %s %llu %s", s->sha_hb,
                 s->k_nodes, s->k_owners, s->conf->cluster.node_name,
                 (unsigned long long)(3 * s->conf->cluster.sync_interval_ms),
                 s->token) == REDIS_OK) {
        s->hb_busy = 1;
        s->hb_sent_ms = time_mono_ms();
    }
}

static void sync_ready(struct sync *s)
{
    s->state = SYNC_READY;
    s->backoff_ms = 0;
    fleet_state(s, LIMIT_FLEET_CONNECTED);
    if (s->fallback)
        log_info("cluster: Redis %s is back: leasing from the fleet again", s->conf->cluster.redis);
    else
        log_info("cluster: connected to Redis %s as node %s", s->conf->cluster.redis,
                 s->conf->cluster.node_name);
    s->fallback = 0;
    sync_heartbeat(s);
    sync_usage(s);
    for (uint32_t i = 0; i < s->n_lims; i++) { /* resynchronise: report and lease at once */
        sync_renew(s, &s->lims[i], 1);
        sync_renew_budget(s, &s->lims[i], 1);
    }
}

/* One reply of the handshake (AUTH, SELECT, SCRIPT LOAD x2); priv names which. */
static void sync_handshake_done(redisAsyncContext *ac, void *r, void *priv)
{
    struct sync *s = &S;
    redisReply *rep = r;
    const char *what = priv;

    if (s->state != SYNC_HANDSHAKE)
        return;
    if (!rep || rep->type == REDIS_REPLY_ERROR) {
        char why[160];

        snprintf(why, sizeof(why), "%s failed: %.*s", what, rep ? (int)rep->len : 12,
                 rep ? rep->str : "no answer");
        log_warn("cluster: Redis %s: %s", s->conf->cluster.redis, why);
        sync_drop(s, why);
        return;
    }
    if (!strcmp(what, "SCRIPT LOAD renew") && rep->type == REDIS_REPLY_STRING)
        snprintf(s->sha_renew, sizeof(s->sha_renew), "%.*s", (int)rep->len, rep->str);
    if (!strcmp(what, "SCRIPT LOAD budget") && rep->type == REDIS_REPLY_STRING)
        snprintf(s->sha_budget, sizeof(s->sha_budget), "%.*s", (int)rep->len, rep->str);
    if (!strcmp(what, "SCRIPT LOAD usage") && rep->type == REDIS_REPLY_STRING)
        snprintf(s->sha_usage, sizeof(s->sha_usage), "%.*s", (int)rep->len, rep->str);
    if (!strcmp(what, "SCRIPT LOAD heartbeat") && rep->type == REDIS_REPLY_STRING)
        snprintf(s->sha_hb, sizeof(s->sha_hb), "%.*s", (int)rep->len, rep->str);
    if (--s->handshake_left == 0)
        sync_ready(s);
    (void)ac;
}

static void sync_on_connect(const redisAsyncContext *ac, int status)
{
    struct sync *s = &S;

    if (status != REDIS_OK && s->state == SYNC_HANDSHAKE) {
        char why[160];

        snprintf(why, sizeof(why), "cannot connect: %s", ac->errstr);
        s->conn = NULL; /* hiredis frees the context after this */
        s->state = SYNC_DOWN;
        sync_drop(s, why);
    }
}

static void sync_connect(struct sync *s)
{
    const struct conf_cluster *cl = &s->conf->cluster;
    struct sync_conn *c = calloc(1, sizeof(*c));
    redisAsyncContext *ac;

    if (!c)
        return;
    ac = cl->redis_unix ? redisAsyncConnectUnix(cl->redis_host)
                        : redisAsyncConnect(cl->redis_host, cl->redis_port);
    if (!ac || ac->err) {
        char why[160];

        snprintf(why, sizeof(why), "cannot connect: %s", ac ? ac->errstr : "out of memory");
        if (ac)
            redisAsyncFree(ac);
        free(c);
        sync_drop(s, why);
        return;
    }
    c->s = s;
    c->ac = ac;
    if (uv_poll_init(&s->loop, &c->poll, ac->c.fd) < 0) {
        redisAsyncFree(ac);
        free(c);
        sync_drop(s, "cannot poll its socket");
        return;
    }
    c->poll.data = c;
    ac->ev.data = c;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    redisAsyncSetConnectCallback(ac, sync_on_connect);
    s->conn = c;
    s->state = SYNC_HANDSHAKE;
    s->handshake_ms = time_mono_ms();
    s->handshake_left = 4;
    if (cl->redis_password) {
        sync_cmd(ac, sync_handshake_done, "AUTH", "AUTH %s", cl->redis_password);
        s->handshake_left++;
    }
    if (cl->redis_db) {
        sync_cmd(ac, sync_handshake_done, "SELECT", "SELECT %u", cl->redis_db);
        s->handshake_left++;
    }
    sync_cmd(ac, sync_handshake_done, "SCRIPT LOAD renew", "SCRIPT LOAD %s", SYNC_LUA_RENEW);
    sync_cmd(ac, sync_handshake_done, "SCRIPT LOAD heartbeat", "SCRIPT LOAD %s", SYNC_LUA_HB);
    sync_cmd(ac, sync_handshake_done, "SCRIPT LOAD budget", "SCRIPT LOAD %s", SYNC_LUA_BUDGET);
    sync_cmd(ac, sync_handshake_done, "SCRIPT LOAD usage", "SCRIPT LOAD %s", SYNC_LUA_USAGE);
}

/* ---- timers ---- */

/* A call (or the handshake) older than slow_ms: Redis is slow or gone. Before the first leases
 * (the master holds the workers until then) SYNC_PRIME_MS at most: the fallback serves. */
static int sync_too_slow(struct sync *s, uint64_t now)
{
    uint64_t slow = s->slow_ms;

    if (slow > SYNC_PRIME_MS && !atomic_load_explicit(&s->fleet->primed, memory_order_relaxed))
        slow = SYNC_PRIME_MS;
    if (s->state == SYNC_HANDSHAKE)
        return now - s->handshake_ms > slow;
    if (s->state != SYNC_READY)
        return 0;
    if (s->hb_busy && now - s->hb_sent_ms > slow)
        return 1;
    if (s->u_busy && now - s->u_sent_ms > s->slow_ms)
        return 1;
    for (uint32_t i = 0; i < s->n_lims; i++)
        if ((s->lims[i].busy && now - s->lims[i].sent_ms > slow) ||
            (s->lims[i].b_busy && now - s->lims[i].b_sent_ms > slow))
            return 1;
    return 0;
}

static void sync_stop_step(struct sync *s, uint64_t now);

static void sync_fast(uv_timer_t *t)
{
    struct sync *s = t->data;
    uint64_t now = time_mono_ms();

    if (s->stopping) {
        sync_stop_step(s, now);
        if (s->final)
            return;
    }
    if (sync_too_slow(s, now)) {
        sync_drop(s, "a call took too long");
        return;
    }
    if (s->state == SYNC_DOWN && now >= s->next_connect_ms && !s->stopping) {
        sync_connect(s);
        return;
    }
    if (s->state == SYNC_READY && !atomic_load_explicit(&s->fleet->primed, memory_order_relaxed)) {
        int busy = 0;

        for (uint32_t i = 0; i < s->n_lims; i++)
            busy += s->lims[i].busy || s->lims[i].b_busy;
        if (!busy) /* the first leases are in shm */
            atomic_store_explicit(&s->fleet->primed, 1, memory_order_release);
    }
    /* a renewal in flight: the flag waits for its answer (it is read when not busy only); the
     * fleet's quota spent (dry): it waits for the next tick */
    for (uint32_t i = 0; s->state == SYNC_READY && i < s->n_lims; i++)
        if (!s->lims[i].busy && !s->lims[i].b_busy && !s->lims[i].dry && !s->lims[i].b_dry &&
            limit_lease_hungry(s->lr, s->lims[i].id)) {
            sync_renew(s, &s->lims[i], 1);
            sync_renew_budget(s, &s->lims[i], 1);
        }
}

static void sync_tick(uv_timer_t *t)
{
    struct sync *s = t->data;

    if (s->state != SYNC_READY || s->final)
        return;
    sync_heartbeat(s);
    sync_usage(s);
    for (uint32_t i = 0; i < s->n_lims; i++) {
        if (!s->lims[i].busy && !s->lims[i].b_busy) {
            int hungry = limit_lease_hungry(s->lr, s->lims[i].id);

            sync_renew(s, &s->lims[i], hungry);
            sync_renew_budget(s, &s->lims[i], hungry);
        }
    }
}

static void sync_close_walk(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

/* The process ends: the connection and every handle close, the loop returns. */
static void sync_shutdown(struct sync *s)
{
    if (s->conn && s->conn->ac) {
        redisAsyncContext *ac = s->conn->ac;

        s->conn = NULL;
        redisAsyncFree(ac);
    }
    uv_walk(&s->loop, sync_close_walk, NULL);
}

/* Whether a worker of this generation still runs (the master reaps them: no zombie stays). */
static int sync_workers_alive(struct sync *s)
{
    for (uint32_t w = 0; w < shm_n_workers(s->shm); w++) {
        pid_t pid = atomic_load_explicit(&shm_worker(s->shm, w)->pid, memory_order_acquire);

        if (pid > 0 && (kill(pid, 0) == 0 || errno != ESRCH))
            return 1;
    }
    return 0;
}

/* Stopping gracefully: once the generation's workers are gone (what they settled reported), one
 * last renewal of each limiter gives everything back to the fleet, and the process exits when
 * they are answered. */
static void sync_stop_step(struct sync *s, uint64_t now)
{
    int pending = 0;

    if (!s->final) {
        if (sync_workers_alive(s) && now < s->stop_by_ms)
            return;
        if (s->state != SYNC_READY) {
            sync_shutdown(s);
            return;
        }
        s->final = 1;
        s->final_ms = now;
    }
    for (uint32_t i = 0; i < s->n_lims; i++) {
        struct sync_lim *l = &s->lims[i];

        if (!l->fin && !l->busy) {
            sync_renew(s, l, 0);
            l->fin = 1;
        }
        if (!l->b_fin && !l->b_busy) {
            sync_renew_budget(s, l, 0);
            l->b_fin = 1;
        }
        pending += !l->fin || !l->b_fin || l->busy || l->b_busy;
    }
    if (!s->u_fin && !s->u_busy) { /* what the workers counted last */
        sync_usage(s);
        s->u_fin = 1;
    }
    pending += s->u_busy;
    if (!pending || s->state != SYNC_READY || now - s->final_ms > 1000)
        sync_shutdown(s);
}

static void sync_on_signal(uv_signal_t *h, int sig)
{
    struct sync *s = h->data;
    uint64_t hard = s->conf->global.hard_stop_after_ms;

    if (sig == SIGINT) { /* fast stop: the leases lapse after lease_ttl */
        s->stopping = s->final = 1;
        sync_shutdown(s);
        return;
    }
    if (s->stopping)
        return;
    s->stopping = 1;
    s->stop_by_ms = time_mono_ms() + (hard ? hard : 30000) + 1000;
}

/* The usage entries' Redis keys ({usage}: one hash slot for the script), and this generation's
 * flushing identity (kept in shm: a restarted sync process goes on with it). */
static int sync_setup_usage(struct sync *s)
{
    const struct conf *conf = s->conf;
    const char *pfx = conf->cluster.key_prefix;
    struct acct_sync *as;
    uint32_t e = 0;

    s->acct = shm_acct(s->shm);
    if (!s->acct)
        return 0;
    as = s->as = acct_sync(s->acct);
    for (int k = ACCT_KEY; k <= ACCT_BACKEND; k++)
        s->u_entries += s->u_n[k] = acct_count(s->acct, (enum acct_kind)k);
    s->u_keys = calloc(s->u_entries ? s->u_entries : 1, sizeof(*s->u_keys));
    if (!s->u_keys)
        return -ENOMEM;
    for (int k = ACCT_KEY; k <= ACCT_BACKEND; k++)
        for (uint32_t i = 0; i < s->u_n[k]; i++, e++) {
            char buf[SYNC_KEY_MAX + CONF_NAME_MAX];

            if (k == ACCT_KEY && (int)i < conf->n_keys)
                snprintf(buf, sizeof(buf), "%s{usage}:key:%s", pfx, conf->keys[i].name);
            else if (k == ACCT_MODEL && (int)i < conf->n_models)
                snprintf(buf, sizeof(buf), "%s{usage}:model:%s", pfx, conf->models[i].name);
            else if (k == ACCT_BACKEND && (int)i < conf->n_backends)
                snprintf(buf, sizeof(buf), "%s{usage}:backend:%s/%s", pfx,
                         conf->backends[i].pool >= 0 && conf->backends[i].pool < conf->n_pools
                             ? conf->pools[conf->backends[i].pool].name
                             : "-",
                         conf->backends[i].name);
            else
                snprintf(buf, sizeof(buf), "%s{usage}:%s:#%u", pfx, acct_kind_str(k), i);
            s->u_keys[e] = strdup(buf);
            if (!s->u_keys[e])
                return -ENOMEM;
        }
    if (!as->inc)
        as->inc = (time_real_ms() << 16) ^ (uint64_t)getpid();
    snprintf(s->k_useq, sizeof(s->k_useq), "%s{usage}:seq:%s:%llx", pfx, conf->cluster.node_name,
             (unsigned long long)as->inc);
    snprintf(s->k_uepoch, sizeof(s->k_uepoch), "%s{usage}:epoch", pfx);
    return 0;
}

/* This aigw instance's token for the heartbeat's clash check: the same for every sync process
 * of one instance (restarts, reloads and binary upgrades keep the host, its boot and its admin
 * socket's path), different for two instances on one machine (their admin sockets) or on two. */
static void sync_token(struct sync *s)
{
    char host[256] = "", boot[64] = "", cwd[4096] = "";
    uint64_t h = 1469598103934665603ull; /* FNV-1a 64 */
    const char *sock = s->conf->global.admin_socket;
    const char *parts[4] = {host, boot, cwd, sock};
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");

    if (f) {
        if (!fgets(boot, sizeof(boot), f))
            boot[0] = 0;
        fclose(f);
    }
    if (gethostname(host, sizeof(host) - 1) < 0)
        host[0] = 0;
    if (sock[0] != '/' && !getcwd(cwd, sizeof(cwd))) /* a relative socket: where it is */
        cwd[0] = 0;
    for (int i = 0; i < 4; i++)
        for (const char *c = parts[i];; c++) {
            h = (h ^ (unsigned char)*c) * 1099511628211ull;
            if (!*c)
                break;
        }
    snprintf(s->token, sizeof(s->token), "%016llx", (unsigned long long)h);
}

/* The leased limiters, in the ids the master gave them (keys, models, pools). */
static int sync_setup(struct sync *s)
{
    const struct conf *conf = s->conf;
    uint32_t n = limit_region_count(s->lr);
    const char *pfx = conf->cluster.key_prefix;

    s->lims = calloc(n ? n : 1, sizeof(*s->lims));
    if (!s->lims)
        return -ENOMEM;
    for (uint32_t id = 0; id < n; id++) {
        uint32_t nk = (uint32_t)conf->n_keys, nm = (uint32_t)conf->n_models;
        const struct conf_limits *lim;
        struct sync_lim *l;

        if (!limit_leased(s->lr, id))
            continue;
        l = &s->lims[s->n_lims++];
        l->id = id;
        if (id < nk) {
            l->kind = "key";
            l->name = conf->keys[id].name;
            lim = &conf->keys[id].lim;
        } else if (id < nk + nm) {
            l->kind = "model";
            l->name = conf->models[id - nk].name;
            lim = &conf->models[id - nk].lim;
        } else {
            l->kind = "pool";
            l->name = conf->pools[id - nk - nm].name;
            lim = &conf->pools[id - nk - nm].lim;
        }
        l->rpm = lim->rpm;
        l->tpm = lim->tpm;
        l->par = lim->max_parallel;
        if (id < nk) {
            l->budget = conf->keys[id].budget_nusd;
            l->period = conf->keys[id].budget_period == BUDGET_DAY     ? LIMIT_PERIOD_DAY
                        : conf->keys[id].budget_period == BUDGET_TOTAL ? LIMIT_PERIOD_TOTAL
                                                                       : LIMIT_PERIOD_MONTH;
        }
        /* {kind:name}: one hash slot, so the script's keys may live in a Redis Cluster too */
        snprintf(l->k_win, sizeof(l->k_win), "%s{%s:%s}:win", pfx, l->kind, l->name);
        snprintf(l->k_req, sizeof(l->k_req), "%s{%s:%s}:req", pfx, l->kind, l->name);
        snprintf(l->k_tok, sizeof(l->k_tok), "%s{%s:%s}:tok", pfx, l->kind, l->name);
        snprintf(l->k_par, sizeof(l->k_par), "%s{%s:%s}:par", pfx, l->kind, l->name);
        snprintf(l->k_parx, sizeof(l->k_parx), "%s{%s:%s}:parx", pfx, l->kind, l->name);
        snprintf(l->lease_id, sizeof(l->lease_id), "-");
    }
    snprintf(s->k_nodes, sizeof(s->k_nodes), "%snodes", pfx);
    snprintf(s->k_owners, sizeof(s->k_owners), "%snodes:owner", pfx);
    sync_token(s);
    return sync_setup_usage(s);
}

int sync_main(struct conf *conf, struct shm *shm)
{
    struct sync *s = &S;
    int ret;

    memset(s, 0, sizeof(*s));
    s->conf = conf;
    s->shm = shm;
    s->lr = shm_limits(shm);
    if (!s->lr) {
        log_err("cluster: the segment has no limiters");
        return 1;
    }
    s->fleet = limit_fleet(s->lr);
    /* the hosts the sync process before this one saw (it was restarted, or a reload carried
     * them): the fallback's share if Redis does not answer now */
    s->nodes_alive = atomic_load_explicit(&s->fleet->nodes_alive, memory_order_relaxed);
    s->nodes_alive = s->nodes_alive ? s->nodes_alive : 1;
    s->slow_ms = 2 * conf->cluster.sync_interval_ms;
    if (s->slow_ms < SYNC_SLOW_MIN_MS)
        s->slow_ms = SYNC_SLOW_MIN_MS;
    if (sync_setup(s) < 0) {
        log_err("cluster: out of memory");
        return 1;
    }
    ret = uv_loop_init(&s->loop);
    if (ret < 0) {
        log_err("cluster: loop init failed: %s", uv_strerror(ret));
        return 1;
    }
    uv_signal_init(&s->loop, &s->sigterm);
    uv_signal_init(&s->loop, &s->sigint);
    uv_signal_init(&s->loop, &s->sigquit);
    s->sigterm.data = s->sigint.data = s->sigquit.data = s;
    uv_signal_start(&s->sigterm, sync_on_signal, SIGTERM);
    uv_signal_start(&s->sigint, sync_on_signal, SIGINT);
    uv_signal_start(&s->sigquit, sync_on_signal, SIGQUIT);
    sig_child_ready();
    uv_timer_init(&s->loop, &s->tick);
    uv_timer_init(&s->loop, &s->fast);
    s->tick.data = s->fast.data = s;
    uv_timer_start(&s->tick, sync_tick, conf->cluster.sync_interval_ms,
                   conf->cluster.sync_interval_ms);
    uv_timer_start(&s->fast, sync_fast, SYNC_FAST_MS, SYNC_FAST_MS);
    log_info("cluster: node %s, %u leased limiter%s, Redis %s", conf->cluster.node_name, s->n_lims,
             s->n_lims == 1 ? "" : "s", conf->cluster.redis);
    sync_connect(s);
    uv_run(&s->loop, UV_RUN_DEFAULT);
    uv_loop_close(&s->loop);
    free(s->lims);
    for (uint32_t e = 0; s->u_keys && e < s->u_entries; e++)
        free(s->u_keys[e]);
    free(s->u_keys);
    return 0;
}
