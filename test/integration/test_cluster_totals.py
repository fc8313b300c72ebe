"""Usage totals and budgets of a fleet (issue 9 item 3): each host's sync process flushes what its
workers counted to Redis every sync_interval and reads the fleet's totals back into shm, so that
`aigwctl show usage --fleet` and `show keys` (its fleet block) show the whole fleet on every host,
a Redis that is restarted (empty or with its data) or a lost answer never loses nor doubles a
count, and a host that joins later sees the fleet's totals and budget at once.

Real redis-server and aigw hosts on loopback, as in test_cluster.py (whose helpers this reuses)."""

import concurrent.futures as cf
from decimal import Decimal
import json
import os
import signal
import subprocess
import threading
import time

from harness import chat, chat_body, check, key_sha256, wait_for
import test_cluster as tc

AUTH = tc.AUTH
FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
          "partial", "cost_usd", "list_cost_usd", "saved_usd")
MODELS = {"gpt-a": {"price_input": "1000", "price_output": "1000"},
          "gpt-b": {"price_input": "500", "price_output": "2000"}}
POOL = {"models": "gpt-*", "check": "no"}


class Redis(tc.Redis):
    """test_cluster's redis-server, which can also be restarted with its data (SHUTDOWN SAVE
    writes dump.rdb in the test's directory, the next start loads it) and slowed down (DEBUG
    SLEEP: Redis runs the commands already sent once it wakes, after their sender gave up)."""

    def more_args(self, exe):
        argv = ["--dbfilename", "fleet.rdb"]
        if subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.find(
                "v=6.") < 0:
            argv += ["--enable-debug-command", "yes"]
        return argv

    def restart(self, keep_data):
        if keep_data:
            self.cli("SHUTDOWN", "SAVE")
            self.proc.wait(5)
        else:
            self.kill()
            rdb = os.path.join(self.env.dir, "fleet.rdb")
            if os.path.exists(rdb):
                os.unlink(rdb)
        self.start()


def _host(env, redis, m, i, lim=None, **kw):
    """Host i of the fleet (node host{i}, gateway gw{i}), as test_cluster's _fleet makes them."""
    key = {"key_sha256": key_sha256(tc.KEY)}
    key.update({k: str(v) for k, v in (lim or {}).items()})
    cl = {"redis": f"redis://127.0.0.1:{redis.port}/2", "node_name": f"host{i}",
          "sync_interval": "200ms", "lease_ttl": "2s"}
    g = env.gateway([m], workers=2, keys={"k": key}, name=f"gw{i}", sections=[("cluster", cl)],
                    pool=POOL, models=MODELS, **kw)
    wait_for(lambda: "cluster: connected to Redis" in g.proc.log_text(), 10,
             f"gw{i} to connect to Redis")
    return g


def _ctl(gw, *args):
    r = gw.ctl(*args, "--json")
    check(r.returncode == 0, f"aigwctl {' '.join(args)}: {r.returncode} {r.stderr.strip()}")
    return json.loads(r.stdout, parse_float=Decimal)


def _usage(gw, by, fleet=False):
    """{name: {field: value}} of show usage --by BY (--fleet), with the total under None."""
    u = _ctl(gw, "show", "usage", "--by", by, *(("--fleet",) if fleet else ()))
    out = {e["name"]: {f: e[f] for f in FIELDS} for e in u["entries"]}
    out[None] = {f: u["total"][f] for f in FIELDS}
    return out


def _sum(rows):
    out = {}
    for r in rows:
        for name, v in r.items():
            t = out.setdefault(name, {f: 0 for f in FIELDS})
            for f in FIELDS:
                t[f] += v[f]
    return out


def _fleet_is_sum(hosts, readers=None, timeout=6):
    """Waits until show usage --fleet (on every reader) equals the sum of the hosts' own show
    usage, for keys, models and backends; returns the fleet's totals by key."""
    last = {}

    def same():
        for by in ("key", "model", "backend"):
            want = _sum([_usage(g, by) for g in hosts])
            for g in readers or hosts:
                got = _usage(g, by, fleet=True)
                last[by] = (got, want)
                if got != want:
                    return False
        return True

    deadline = time.monotonic() + timeout
    while not same():
        if time.monotonic() > deadline:
            by = next(b for b, (got, want) in last.items() if got != want)
            check(False, f"fleet usage by {by} {last[by][0]} != the hosts' sum "
                                 f"{last[by][1]}")
        time.sleep(0.2)
    return last["key"][0]


def _traffic(gws, n, tag):
    """n chat requests round robin over gws, models gpt-a and gpt-b, all answered 200."""
    for i in range(n):
        model = "gpt-a" if i % 3 else "gpt-b"
        r = chat(gws[i % len(gws)].port, chat_body(f"{tag} {i} " + "w " * (i % 7), model=model,
                                                  max_tokens=8 + i % 5), headers=AUTH)
        check(r.status == 200, f"request {tag} {i}: {r!r}")


def test_fleet_usage_is_the_sum_of_the_hosts(env):
    redis = Redis(env)
    m = env.mock("m1")
    gws = [_host(env, redis, m, i) for i in range(2)]
    _traffic(gws, 7, "a")
    _traffic(gws[1:], 4, "b")
    fleet = _fleet_is_sum(gws)
    check(fleet["k"]["requests"] == 11 and fleet["k"]["cost_usd"] > 0, f"fleet: {fleet}")
    # show keys: this host's figures as before, the fleet's apart
    for g, own in zip(gws, (4, 7)):
        k = tc._key_row(g)
        check(k["requests"] == own, f"{g.name} counts {k['requests']} of its own requests")
        check(k["fleet"]["requests"] == 11 and k["fleet"]["age_ms"] is not None
              and Decimal(str(k["fleet"]["cost_usd"])) == fleet["k"]["cost_usd"],
              f"{g.name} show keys fleet: {k['fleet']}")
        text = g.ctl("show", "keys").stdout
        check("FLEET_REQUESTS" in text and "fleet (all hosts" in text, f"show keys: {text}")
        text = g.ctl("show", "usage", "--fleet").stdout
        check(text.startswith("fleet totals (all hosts)"), f"show usage --fleet: {text}")
    # without [cluster] there is no fleet to show
    solo = env.gateway([m], name="solo", keys={"k": {"key_sha256": key_sha256(tc.KEY)}})
    r = solo.ctl("show", "usage", "--fleet")
    check(r.returncode != 0 and "no [cluster]" in r.stdout + r.stderr, f"{r!r}")
    check(tc._key_row(solo).get("fleet", "absent") is None, "a fleet without [cluster]")


def test_fleet_usage_whole_across_redis_trouble(env):
    """Answers lost after Redis applied a flush (DEBUG SLEEP: the host gives up and resends),
    Redis restarted with its data, and restarted empty: the fleet's totals stay the hosts' sum,
    nothing lost and nothing counted twice."""
    redis = Redis(env)
    m = env.mock("m1")
    gws = [_host(env, redis, m, i) for i in range(2)]
    _traffic(gws, 6, "before")
    _fleet_is_sum(gws)
    for n in range(3):  # the hosts' flushes wait in Redis' socket while it sleeps
        _traffic(gws, 4, f"sleep{n}")
        redis.cli("DEBUG", "SLEEP", "1.2")
        _traffic(gws, 2, f"woke{n}")
        _fleet_is_sum(gws)
    check(sum(g.proc.log_text().count("is away") for g in gws) >= 2,
          "the hosts never gave up on a sleeping Redis: the test proves nothing")
    _traffic(gws, 5, "data")
    time.sleep(0.6)
    redis.restart(keep_data=True)
    _traffic(gws, 3, "after data")
    _fleet_is_sum(gws)
    _traffic(gws, 5, "empty")
    redis.kill()
    _traffic(gws, 4, "away")  # while Redis is away: kept for later
    redis.restart(keep_data=False)
    _traffic(gws, 3, "back")
    fleet = _fleet_is_sum(gws, timeout=10)
    check(fleet["k"]["requests"] == 6 + 3 * 6 + 5 + 3 + 5 + 4 + 3, f"fleet {fleet['k']}")


def _sync_pid(gw):
    pids = [p.get("pid") for p in gw.procs() if p.get("role") == "sync" and p.get("pid")]
    return pids[0] if pids else None


def test_killed_sync_process_resends_its_flush_once(env):
    """A sync process killed while its flush waits in a sleeping Redis (which applies it when it
    wakes): the restarted one finds the flush in shm and resends it under the same number, which
    Redis knows it applied."""
    redis = Redis(env)
    m = env.mock("m1")
    gws = [_host(env, redis, m, i) for i in range(2)]
    _traffic(gws, 6, "before")
    _fleet_is_sum(gws)
    for n in range(2):
        _traffic(gws, 4, f"killed{n}")
        old = _sync_pid(gws[0])
        t = threading.Thread(target=redis.cli, args=("DEBUG", "SLEEP", "1.5"))
        t.start()
        time.sleep(0.5)  # a flush (every 200 ms) waits in Redis' socket
        os.kill(old, signal.SIGKILL)
        t.join()
        wait_for(lambda: _sync_pid(gws[0]) not in (None, old), 10, "the sync process's restart")
        _traffic(gws, 2, f"restarted{n}")
        _fleet_is_sum(gws)


def test_fleet_usage_whole_across_reloads(env):
    """Reloads under load: each generation's sync process flushes what its own workers counted
    (the old one until its draining workers are gone), so nothing is sent twice nor forgotten."""
    redis = Redis(env)
    m = env.mock("m1")
    gws = [_host(env, redis, m, i) for i in range(2)]
    stop = [False]

    def load(i):
        out = []
        while not stop[0]:
            out.append(chat(gws[i % 2].port, chat_body(f"reload {i} {len(out)}", model="gpt-a"),
                            headers=AUTH, timeout=15).status)
        return out

    with cf.ThreadPoolExecutor(max_workers=4) as ex:
        futs = [ex.submit(load, i) for i in range(4)]
        time.sleep(0.5)
        for n in range(3):
            r = gws[0].ctl("reload", timeout=40)
            check(r.returncode == 0, f"reload: {r.stdout} {r.stderr}")
            time.sleep(0.4)
        stop[0] = True
        st = [x for f in futs for x in f.result()]
    check(len(st) > 20 and all(x == 200 for x in st), f"statuses {sorted(set(st))}")
    wait_for(lambda: len([p for p in gws[0].procs() if p.get("role") == "sync"]) == 1, 15,
             "the old generations to be gone")
    fleet = _fleet_is_sum(gws)
    check(fleet["k"]["requests"] == len(st), f"fleet {fleet['k']['requests']} of {len(st)}")


def test_reload_while_redis_lost_its_data(env):
    """Redis restarted empty while a reload replaces a host's generation: the new generation's
    sync process knows the epoch the old one flushed into, so it sends the host's whole totals
    to the new Redis (instead of starting from nothing there)."""
    redis = Redis(env)
    m = env.mock("m1")
    gws = [_host(env, redis, m, i) for i in range(2)]
    _traffic(gws, 8, "before")
    _fleet_is_sum(gws)
    redis.kill()
    r = gws[0].ctl("reload", timeout=40)
    check(r.returncode == 0, f"reload: {r.stdout} {r.stderr}")
    wait_for(lambda: len([p for p in gws[0].procs() if p.get("role") == "sync"]) == 1, 15,
             "the old generation to be gone")
    _traffic(gws, 2, "away")
    redis.restart(keep_data=False)
    fleet = _fleet_is_sum(gws, timeout=10)
    check(fleet["k"]["requests"] == 10, f"fleet {fleet['k']}")


def test_restarted_host_keeps_its_totals_counted_once(env):
    """A host stopped and started again loads its totals from its state_file (its show usage
    goes on from them) and flushes only what it counts from then on: Redis has the rest."""
    redis = Redis(env)
    m = env.mock("m1")
    gws = [_host(env, redis, m, i, glob={"state_file": os.path.join(env.dir, f"state{i}")})
           for i in range(2)]
    _traffic(gws, 8, "before")
    _fleet_is_sum(gws)
    _traffic(gws[:1], 2, "last")  # flushed by the stopping sync process's last flush
    check(gws[0].stop() == 0, "gw0 did not stop cleanly")
    _traffic(gws[1:], 3, "alone")
    gws[0].start()
    wait_for(lambda: gws[0].proc.log_text().count("cluster: connected to Redis") >= 1, 10,
             "gw0 to connect again")
    check(_usage(gws[0], "key")["k"]["requests"] == 6, "gw0 did not load its state_file")
    _traffic(gws, 4, "after")
    fleet = _fleet_is_sum(gws)
    check(fleet["k"]["requests"] == 17, f"fleet {fleet['k']}")


def test_joining_host_sees_fleet_totals_and_budget(env):
    """Two hosts spend most of a key's budget; a third one, started later with an empty state,
    shows the fleet's totals and spent, and lets through only what is left."""
    budget = Decimal("0.3")
    redis = Redis(env)
    m = env.mock("m1")
    lim = {"budget_usd": str(budget), "budget_period": "day"}
    gws = [_host(env, redis, m, i, lim) for i in range(2)]
    spent = Decimal(0)
    i = 0
    while spent < budget * Decimal("0.6"):
        r = chat(gws[i % 2].port, chat_body(f"spend {i}", model="gpt-a", max_tokens=16),
                 headers=AUTH)
        i += 1
        if r.status != 200:
            check(r.status == 429, f"{r!r}")
            time.sleep(0.25)
            continue
        u = r.json()["usage"]
        spent += Decimal(u["prompt_tokens"] + u["completion_tokens"]) / 1000
    _fleet_is_sum(gws)
    g3 = _host(env, redis, m, 2, lim)
    before = _fleet_is_sum(gws, readers=[g3])["k"]
    check(before["cost_usd"] == spent, f"fleet cost {before['cost_usd']}, spent {spent}")

    def fleet_budget():
        k = tc._key_row(g3)
        return k if k["fleet"]["spent_usd"] is not None else None

    k = wait_for(fleet_budget, 5, "the new host to read the fleet's budget")
    check(k["spent_usd"] == 0 and k["requests"] == 0, f"the new host's own: {k}")
    check(Decimal(str(k["fleet"]["spent_usd"])) == spent
          and Decimal(str(k["fleet"]["remaining_usd"])) == budget - spent,
          f"the new host shows fleet spent {k['fleet']}, the fleet spent {spent}")
    # the new host lets through only what is left of the budget
    own = Decimal(0)
    refused = 0
    deadline = time.monotonic() + 20
    while refused < 4 and time.monotonic() < deadline:
        r = chat(g3.port, chat_body(f"new {i}", model="gpt-a", max_tokens=16), headers=AUTH)
        i += 1
        if r.status == 200:
            u = r.json()["usage"]
            own += Decimal(u["prompt_tokens"] + u["completion_tokens"]) / 1000
            refused = 0
            continue
        check(r.status == 429, f"{r!r}")
        refused += r.json()["error"]["type"] == "insufficient_quota"
        time.sleep(0.25)
    check(refused >= 4, f"the budget never ran out on the new host ({own} USD spent)")
    check(spent + own <= budget, f"the fleet spent {spent} + {own} USD of a {budget} USD budget "
                                 f"(the new host did not see what the others spent)")
    check(own > 0, "the new host let nothing through")
