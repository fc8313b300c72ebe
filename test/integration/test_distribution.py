"""Balancing algorithms measured from the client side (issue 3, points 1 and 9): roundrobin and
random weights, least_conn and p2c favouring the faster backend, consistent hashing (sticky
keys, few keys moving when a backend joins), first, backup, max_conns, slowstart, and an outage
under continuous load that costs no client request."""

import threading
import time

from harness import chat, chat_body, check
from resil_util import (
    Client,
    by_name,
    chats,
    failed,
    parallel,
    pool,
    run_load,
    summary,
    wait_backend,
)


def _share_check(results, name, want, tol, what):
    bad = failed(results)
    check(not bad, f"{what}: {summary(results)}")
    n = len(results)
    got = by_name(results).get(name, 0) / n
    check(abs(got - want) <= tol,
          f"{what}: backend {name} got {got:.2%} of {n} requests, expected {want:.0%} +- "
          f"{tol:.0%} (counts {by_name(results)})")


def test_roundrobin_weights_3_to_1(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([("a", a, {"weight": 3}), ("b", b, {"weight": 1})], workers=2,
                     pool=pool(balance="roundrobin"))
    res = run_load(gw.port, 4000, 8, body=chat_body("rr"), deadline=40)
    check(len(res) == 4000, f"only {len(res)} of 4000 requests sent before the deadline")
    _share_check(res, "a", 0.75, 0.03, "roundrobin weights 3:1")


def test_random_weights_3_to_1(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([("a", a, {"weight": 3}), ("b", b, {"weight": 1})], workers=2,
                     pool=pool(balance="random"))
    res = run_load(gw.port, 2000, 8, body=chat_body("random"), deadline=30)
    check(len(res) == 2000, f"only {len(res)} of 2000 requests sent before the deadline")
    # binomial sd at n = 2000, p = .75 is ~1%: +-4% is 4 sd
    _share_check(res, "a", 0.75, 0.04, "random weights 3:1")


def _fast_slow(env, algo):
    fast = env.mock("fast", "--delay", "5ms")
    slow = env.mock("slow", "--delay", "50ms")
    gw = env.gateway([slow, fast], workers=2, pool=pool(balance=algo))
    res = run_load(gw.port, 480, 8, body=chat_body(algo), deadline=30)
    check(len(res) == 480, f"only {len(res)} of 480 requests sent before the deadline")
    check(not failed(res), f"{algo}: {summary(res)}")
    n = by_name(res)
    f, s = n.get("fast", 0), n.get("slow", 0)
    check(f > 2 * s,
          f"balance = {algo}: the 5 ms backend got {f} requests, the 50 ms one {s}: expected "
          f"more than twice as many on the fast one (8 concurrent clients)")
    return gw


def test_least_conn_prefers_fast(env):
    _fast_slow(env, "least_conn")


def test_p2c_prefers_fast(env):
    gw = _fast_slow(env, "p2c")
    # the peak-EWMA latency it decides on shows in show backends
    fast, slow = gw.backend("fast"), gw.backend("slow")
    check(isinstance(slow.get("ewma_ms"), (int, float)) and slow["ewma_ms"] >= 40,
          f"slow backend (50 ms) ewma_ms: {slow}")
    check(isinstance(fast.get("ewma_ms"), (int, float)) and fast["ewma_ms"] < slow["ewma_ms"],
          f"fast backend ewma_ms not below the slow one's: fast {fast}, slow {slow}")


def _hash_map(gw, keys, conns=1):
    """key -> backend for each key, sequentially (one request in flight at a time, so the
    bounded load never overflows a key), over `conns` successive connections."""
    out = {}
    per = (len(keys) + conns - 1) // conns
    for k in range(conns):
        cl = Client(gw.port)
        try:
            for key in keys[k * per:(k + 1) * per]:
                r = cl.chat(chat_body("hash"), {"x-session-id": key})
                check(r.status == 200 and not r.error, f"hash key {key}: {r}")
                out[key] = r.name
        finally:
            cl.close()
    return out


def test_hash_sticky_and_minimal_move(env):
    a = env.mock("a")
    b = env.mock("b")
    c = env.mock("c")
    hp = pool(balance="hash", hash_key="header:x-session-id")
    gw = env.gateway([a, b], workers=2, pool=hp)
    keys = [f"session-{i}" for i in range(1000)]
    m1 = _hash_map(gw, keys)
    n1 = {}
    for v in m1.values():
        n1[v] = n1.get(v, 0) + 1
    check(set(n1) == {"a", "b"} and min(n1.values()) > 250,
          f"1000 keys over two backends spread as {n1}")
    # the same key always lands on the same backend, whichever worker and connection serves it
    again = _hash_map(gw, keys[:300], conns=6)
    moved = [k for k in again if again[k] != m1[k]]
    check(not moved, f"{len(moved)} of 300 keys changed backend with nothing changed, e.g. "
          f"{[(k, m1[k], again[k]) for k in moved[:5]]}")
    gw.stop()
    # a third backend joins (same names for the first two: same ring points)
    gw2 = env.gateway([a, b, c], workers=2, pool=hp, name="gw2")
    m2 = _hash_map(gw2, keys)
    moved = [k for k in keys if m2[k] != m1[k]]
    wrong = [(k, m1[k], m2[k]) for k in moved if m2[k] != "c"]
    check(not wrong, f"{len(wrong)} keys moved between the old backends when c joined, e.g. "
          f"{wrong[:5]} (key, before, after)")
    check(len(moved) <= 380, f"{len(moved)} of 1000 keys moved when a third backend joined "
          f"(at most 38% may)")
    check(len(moved) >= 150, f"only {len(moved)} of 1000 keys moved to the new backend c "
          f"(expected about a third)")


def test_hash_json_field_key(env):
    """hash_key = json:prompt_cache_key: the key is a top-level string field of the body."""
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2,
                     pool=pool(balance="hash", hash_key="json:prompt_cache_key"))
    seen = {}
    cl = Client(gw.port)
    try:
        for rep in range(2):
            for i in range(100):
                key = f"conv-{i}"
                r = cl.chat(chat_body(f"turn {rep}", prompt_cache_key=key))
                check(r.status == 200 and not r.error, f"key {key}: {r}")
                if rep == 0:
                    seen[key] = r.name
                else:
                    check(r.name == seen[key], f"prompt_cache_key {key} went to {seen[key]}, "
                          f"then to {r.name}")
    finally:
        cl.close()
    n = sum(1 for v in seen.values() if v == "a")
    check(20 <= n <= 80, f"100 prompt_cache_keys spread {n} to a, {100 - n} to b")


def test_hash_json_key_unescaped(env):
    """json:FIELD hashes the field's value as JSON means it: a key written with \\u escapes
    goes where the same key written plainly goes."""
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=1,
                     pool=pool(balance="hash", hash_key="json:prompt_cache_key"))
    cl = Client(gw.port)
    try:
        for i in range(40):
            key = f"conv-{i}"
            plain = cl.chat(chat_body("plain", prompt_cache_key=key))
            esc = "".join(f"\\u{ord(ch):04x}" for ch in key)
            body = chat_body("escaped", prompt_cache_key="@").replace(b'"@"', f'"{esc}"'.encode())
            escaped = cl.chat(body)
            check(plain.status == 200 and escaped.status == 200, f"{key}: {plain} {escaped}")
            check(escaped.name == plain.name,
                  f"prompt_cache_key {key} went to {plain.name}, written as {esc} to "
                  f"{escaped.name}")
    finally:
        cl.close()


def test_first_ordered_failover(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2, pool=pool(balance="first"))
    res = run_load(gw.port, 40, 4, body=chat_body("first"))
    check(not failed(res), f"first: {summary(res)}")
    check(by_name(res) == {"a": 40}, f"balance = first sent traffic to {by_name(res)}, "
          f"expected all 40 to a")
    check(chats(b) == 0, f"b received {chats(b)} requests while a was up")
    a.kill()
    gw.wait_state("a", "DOWN", 3)
    res = run_load(gw.port, 20, 2, body=chat_body("first2"))
    check(not failed(res) and by_name(res) == {"b": 20},
          f"with a DOWN, balance = first gave {by_name(res)}; {summary(res)}")


def test_backup_only_when_primaries_down(env):
    a = env.mock("a")
    b = env.mock("b")
    k = env.mock("k")
    gw = env.gateway([a, b, ("k", k, {"backup": "yes"})], workers=2, pool=pool())
    res = run_load(gw.port, 60, 4, body=chat_body("p"))
    check(not failed(res), summary(res))
    check(by_name(res).get("k", 0) == 0 and chats(k) == 0,
          f"backup k got traffic while both primaries were UP: {by_name(res)}")
    a.kill()
    gw.wait_state("a", "DOWN", 3)
    res = run_load(gw.port, 20, 2, body=chat_body("p2"))
    check(not failed(res) and by_name(res) == {"b": 20},
          f"one primary DOWN: expected all to b, got {by_name(res)}; {summary(res)}")
    check(chats(k) == 0, "backup got traffic while a primary was UP")
    b.kill()
    gw.wait_state("b", "DOWN", 3)
    res = run_load(gw.port, 20, 2, body=chat_body("p3"))
    check(not failed(res) and by_name(res) == {"k": 20},
          f"every primary DOWN: expected all 20 to the backup k, got {by_name(res)}; "
          f"{summary(res)}")
    # a primary back: the backup is left again
    a.start(same_port=True)
    gw.wait_state("a", "UP", 3)
    before = chats(k)
    res = run_load(gw.port, 20, 2, body=chat_body("p4"))
    check(not failed(res) and by_name(res) == {"a": 20},
          f"primary a back UP: expected all to a, got {by_name(res)}")
    check(chats(k) == before, "backup still got traffic after a primary came back")


def test_max_conns_caps_inflight(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([("a", a, {"max_conns": 2}), b], workers=2, pool=pool())
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], gw.backend("a")["active"])
            except Exception:  # sampling only
                pass
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        for wave in range(2):
            res = parallel(gw.port, 10, headers={"x-mock-delay": "600ms"})
            check(not failed(res), f"wave {wave}: {summary(res)}")
            on_a = [r for r in res if r.name == "a"]
            check(1 <= len(on_a) <= 2,
                  f"wave {wave}: 10 parallel 600 ms requests, backend a (max_conns 2) served "
                  f"{len(on_a)} of them (counts {by_name(res)})")
            # the ones on a really overlapped: none of them started after another ended
            for r in on_a:
                check(r.t1 - r.t0 >= 0.55, f"request on a took only {r.t1 - r.t0:.2f}s")
    finally:
        stop.set()
        t.join(2)
    check(peak[0] <= 2, f"show backends reported {peak[0]} requests in flight on a "
          f"(max_conns 2)")
    check(peak[0] >= 1, "show backends never saw a request in flight on a")


def test_slowstart_ramps_weight(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([("a", a, {"weight": 100}), ("b", b, {"weight": 100})], workers=1,
                     pool=pool(slowstart="2s", check_interval="100ms", rise=1, fall=1))
    rec = gw.backend("a")
    check(rec["weight"] == 100 and rec["weight_cfg"] == 100,
          f"at start (no ramp for the initial UP) a: {rec}")
    a.kill()
    gw.wait_state("a", "DOWN", 3)
    a.start(same_port=True)
    wait_backend(gw, "a", lambda r: r["state"] == "UP", 3, "UP again")
    t_up = time.monotonic()
    seen = []
    while True:
        rec = gw.backend("a")
        dt = time.monotonic() - t_up
        seen.append((round(dt, 2), rec["weight"]))
        # (the state and the effective weight are separate shm words, written by the health
        # checker's check callback and its 25 ms evaluation: the first reads may see UP at the
        # weight it had while DOWN)
        if rec["weight"] >= 100 and dt > 0.1:
            break
        check(dt < 4, f"a's weight not back to 100 after {dt:.1f}s (slowstart 2s): {seen[-6:]}")
        time.sleep(0.05)
    early = [w for t, w in seen if t <= 0.3]
    check(rec["weight_cfg"] == 100 and min(early) < 60,
          f"in the first 0.3s after coming UP with slowstart 2s, a's effective weight should be "
          f"well below its configured 100: weights seen (s after UP, weight) {seen[:8]}")
    check(dt >= 1.4, f"a's weight was back to 100 already {dt:.2f}s after UP (slowstart 2s): "
          f"{seen}")
    mid = [w for t, w in seen if 20 <= w <= 80]
    check(mid, f"no intermediate weight seen during the ramp: {seen}")
    ws = [w for t, w in seen if t > 0.1]
    check(ws == sorted(ws), f"weight went down during the ramp: {seen}")


def test_outage_under_load_no_failed_requests(env):
    """Two backends, retries = 1, four clients in a loop; one backend is SIGKILLed mid-run:
    every client request still succeeds."""
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2, pool={"retries": 1})
    done = [0]
    lock = threading.Lock()
    killed = threading.Event()

    def on_result(r):
        with lock:
            done[0] += 1
            if done[0] == 300 and not killed.is_set():
                killed.set()
                a.kill()

    res = run_load(gw.port, 1000, 4, body=lambda i: chat_body(f"outage {i}"), pace=0.01,
                   deadline=20, on_result=on_result)
    check(killed.is_set(), "the load ended before backend a was killed")
    check(len(res) == 1000, f"only {len(res)} of 1000 requests sent before the deadline")
    bad = failed(res)
    check(not bad, f"backend a killed under load with retries = 1: {len(bad)} of 1000 client "
          f"requests failed; first: {bad[:3]}")
    n = by_name(res)
    check(n.get("a", 0) >= 50 and n.get("b", 0) >= 500, f"served: {n}")
    gw.wait_state("a", "DOWN", 3)
    # no request after the kill was answered by a
    check(all(r.name == "b" for r in res[-200:]), "requests after the kill answered by a?")
    rec = gw.backend("a")
    check(rec["failures"] >= 1, f"a's failures not counted: {rec}")
    check(chat(gw.port, chat_body("after")).status == 200, "request after the outage")
