"""Hitless reload (SIGHUP, aigwctl reload): a bad file changes nothing and aigwctl says where; a
good one starts a new generation on the same sockets and the old one drains; under load no
request fails and no stream is cut; rpm windows, usage and the operator's drain carry over."""

import os
import signal
import threading
import time

from harness import Conn, build_request, chat, chat_body, check, key_sha256, wait_for

KEY = "sk-aigw-reload-0123456789abcdef"
KEY2 = "sk-aigw-reload-second-key-000000"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _reload(gw, timeout=45.0):
    return gw.ctl("reload", timeout=timeout)


def _generation(r):
    check(r.returncode == 0, f"aigwctl reload exited {r.returncode}: {r.stdout!r} {r.stderr!r}")
    check(r.stdout.startswith("reloaded: generation "), f"aigwctl reload printed {r.stdout!r}")
    return int(r.stdout.split()[2])


def _worker_pids(gw):
    return sorted(p["pid"] for p in gw.procs() if p.get("role") in ("worker", "health"))


def _ok(port, headers=None, model="gpt-test"):
    r = chat(port, chat_body("hi", model=model), headers=headers)
    return r.status


def test_reload_bad_file_changes_nothing(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=2)
    before = _worker_pids(gw)
    good = gw.conf_text
    with open(gw.conf_path, "w") as f:
        f.write(good + "\n[pool extra]\nbogus_key = 1\n")
    r = _reload(gw)
    check(r.returncode == 1, f"aigwctl reload of a bad file exited {r.returncode}")
    line = len((good + "\n").splitlines()) + 2
    check(f"{gw.conf_path}:{line}" in r.stderr,
          f"no FILE:LINE ({gw.conf_path}:{line}) in {r.stderr!r}")
    check(_worker_pids(gw) == before, "the processes changed after a refused reload")
    check(all(_ok(gw.port) == 200 for _ in range(5)), "traffic failed after a refused reload")
    # SIGHUP with the bad file: logged, nothing changes
    gw.proc.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in gw.proc.log_text(), 5, "the refused SIGHUP reload logged")
    check(_worker_pids(gw) == before, "the processes changed after a refused SIGHUP")
    with open(gw.conf_path, "w") as f:
        f.write(good)


def test_reload_new_generation_old_exits(env):
    m = env.mock("m1", "--chunks", 10, "--chunk-interval", "100ms")
    gw = env.gateway([m], workers=2)
    old = _worker_pids(gw)
    # a stream in flight across the reload finishes on the old worker
    c = Conn(gw.port, timeout=10)
    c.send(build_request("POST", "/v1/chat/completions", [("Content-Type", "application/json")],
                         chat_body("long", stream=True)))
    head = c.read_head()
    gen = _generation(_reload(gw))
    check(gen == 2, f"first reload made generation {gen}")
    new = _worker_pids(gw)
    check(not set(new) & set(old), f"show proc after the reload still lists old pids: {new}")
    check(_ok(gw.port) == 200, "a request after the reload failed")
    c.read_body(head)
    body = head.body.decode()
    check(body.rstrip().endswith("data: [DONE]"), f"stream cut by the reload: ...{body[-200:]!r}")
    c.close()
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in old), 10,
             "the old generation's processes to exit")
    # SIGHUP reloads as well
    gw.proc.signal(signal.SIGHUP)
    wait_for(lambda: "generation 3 serves" in gw.proc.log_text(), 10, "SIGHUP's generation 3")
    # a change of the workers count works both ways
    for workers in (3, 1):
        gw.sections[0][1]["workers"] = workers
        gw.workers = workers
        gw._write_conf()
        _generation(_reload(gw))
        wait_for(lambda: len([p for p in gw.procs() if p.get("role") == "worker"]) == workers,
                 5, f"{workers} workers")
        check(all(_ok(gw.port) == 200 for _ in range(6)), f"traffic failed with {workers} workers")


def test_reload_while_signals_arrive(env):
    """A signal the master caught but had not handled yet when it forked a new generation's
    process is the master's: the child must not wait for it (it did, spinning, never ready)."""
    m = env.mock("m1")
    gw = env.gateway([m], workers=2)
    stop = threading.Event()
    sent = [0]

    def flood():  # SIGCHLD is harmless to the master: it reaps, and finds nobody
        while not stop.is_set():
            os.kill(gw.proc.pid, signal.SIGCHLD)
            sent[0] += 1
            time.sleep(0.00005)

    t = threading.Thread(target=flood)
    t.start()
    t0 = time.monotonic()
    try:
        i = 0
        while i < 16 or (i < 100 and time.monotonic() - t0 < 2.0):  # 16 reloads, 2 s at most
            gw.sections[0][1]["workers"] = 3 if i % 2 == 0 else 1
            gw._write_conf()
            r = _reload(gw)
            check(r.returncode == 0, f"reload {i + 1} with signals arriving: {r.stderr!r}")
            i += 1
    finally:
        stop.set()
        t.join(5)
    check(sent[0] > 1000, f"only {sent[0]} signals sent")
    check(_ok(gw.port) == 200, "traffic failed after the reloads")


def _short_load(port, stop, results):
    """Short requests one after another, each on a new connection, until stop."""
    while not stop.is_set():
        try:
            r = chat(port, chat_body("hi"), timeout=10)
            results.append("ok" if r.status == 200 else f"{r.status} {r.body[-120:]!r}")
        except Exception as e:  # noqa: BLE001 - every failure is a result
            results.append(f"exception {e!r}")


def test_reload_fewer_workers_loses_nothing(env):
    """A reload to fewer workers drops listening sockets: connections queued on them are taken
    by the old workers as they stop, and new ones go to the kept sockets (regression: the
    kernel reset what was queued on a dropped socket, a few per reload under load)."""
    m = env.mock("m1")
    gw = env.gateway([m], workers=3)
    stop = threading.Event()
    results = []
    threads = [threading.Thread(target=_short_load, args=(gw.port, stop, results))
               for _ in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        for i in range(8):
            gw.sections[0][1]["workers"] = 1 if i % 2 == 0 else 3
            gw._write_conf()
            _generation(_reload(gw))
            time.sleep(0.4)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    bad = [r for r in results if r != "ok"]
    check(len(results) > 200, f"too little load: {len(results)} requests")
    check(not bad, f"{len(bad)} of {len(results)} requests failed across 8 reloads between 3 "
                   f"and 1 workers: {bad[:5]}")


def test_reload_keeps_drain_and_rpm(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2,
                     keys={"k": {"key_sha256": key_sha256(KEY), "rpm": "30"}})
    r = gw.ctl("set", "backend", "a", "drain")
    check(r.returncode == 0, f"set drain: {r.stderr!r}")
    first = [_ok(gw.port, AUTH) for _ in range(20)]
    check(first.count(200) == 20, f"before the reload: {first}")
    _generation(_reload(gw))
    check(gw.backend("a")["admin"] == "DRAIN", f"drain lost in the reload: {gw.backend('a')}")
    after = [_ok(gw.port, AUTH) for _ in range(20)]
    check(after.count(200) == 10 and after.count(429) == 10,
          f"rpm 30 across a reload: 20 before, then {after.count(200)} of 20 passed: {after}")
    check(a.stats()["chat_completions"] == 0, "the drained backend got requests")


def _load(port, stop, results, stream):
    """Requests one after another until stop: each on its own connection; a stream must end
    with [DONE]."""
    while not stop.is_set():
        try:
            c = Conn(port, timeout=20)
            c.send(build_request("POST", "/v1/chat/completions",
                                 [("Content-Type", "application/json")] + list(AUTH.items()),
                                 chat_body("load", stream=stream)))
            r = c.read_response()
            c.close()
            ok = r.status == 200 and (not stream or r.body.decode().rstrip().endswith("[DONE]"))
            results.append("ok" if ok else f"{r.status} {r.body[-120:]!r}")
        except Exception as e:  # noqa: BLE001 - every failure is a result
            results.append(f"exception {e!r}")


def test_reload_under_load(env):
    n_reloads = int(os.environ.get("AIGW_RELOADS", "20"))
    m = env.mock("m1", "--chunks", 25, "--chunk-interval", "200ms")  # 5-second streams
    m2 = env.mock("m2", "--chunks", 25, "--chunk-interval", "200ms")
    keys = {"k": {"key_sha256": key_sha256(KEY)}}
    # hard_stop_after above the streams' length: a cut would be its doing, not the reload's
    gw = env.gateway([m], workers=2, keys=keys, glob={"hard_stop_after": "30s"})
    conf_a = gw.conf_text
    conf_b = conf_a + "\n" + "\n".join([
        "[backend m2]", "pool = main", f"url = {m2.url}", "",
        "[key k2]", f"key_sha256 = {key_sha256(KEY2)}", ""])
    stop = threading.Event()
    short, streams = [], []
    threads = [threading.Thread(target=_load, args=(gw.port, stop, short, False))
               for _ in range(4)]
    threads += [threading.Thread(target=_load, args=(gw.port, stop, streams, True))
                for _ in range(4)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    gens = []
    try:
        time.sleep(0.5)
        for i in range(n_reloads):
            with open(gw.conf_path, "w") as f:
                f.write(conf_b if i % 2 == 0 else conf_a)
            gens.append(_generation(_reload(gw)))
            time.sleep(0.3)
        time.sleep(5.5)  # the last streams end
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    took = time.monotonic() - t0
    bad_short = [r for r in short if r != "ok"]
    bad_streams = [r for r in streams if r != "ok"]
    check(gens == list(range(2, 2 + n_reloads)), f"generations: {gens}")
    check(not bad_short, f"{len(bad_short)} of {len(short)} short requests failed across "
                         f"{n_reloads} reloads: {bad_short[:5]}")
    check(not bad_streams, f"{len(bad_streams)} of {len(streams)} streams failed or were cut "
                           f"across {n_reloads} reloads: {bad_streams[:5]}")
    check(len(short) > 50 and len(streams) >= 8, f"too little load: {len(short)} short, "
                                                   f"{len(streams)} streams in {took:.1f} s")
    print(f"{n_reloads} reloads in {took:.1f} s: {len(short)} short requests, "
          f"{len(streams)} streams, 0 failed")


def _keepalive_client(port, stop, results):
    """POSTs back to back on ONE keep-alive connection, a new one only after an answer said
    Connection: close (what a client such as the OpenAI SDK's pool does)."""
    c = None
    while not stop.is_set():
        try:
            if c is None:
                c = Conn(port, timeout=10)
            c.send(build_request("POST", "/v1/chat/completions",
                                 [("Content-Type", "application/json")] + list(AUTH.items()),
                                 chat_body("keep-alive")))
            r = c.read_response()
            ok = r.status == 200 and r.json().get("choices")
            results.append("ok" if ok else f"{r.status} {r.body[-120:]!r}")
            if (r.header("connection") or "").lower() == "close":
                c.close()
                c = None
        except Exception as e:  # noqa: BLE001 - every failure is a result
            results.append(f"exception {e!r}")
            if c is not None:
                c.close()
            c = None
    if c is not None:
        c.close()


def test_reload_keepalive_clients_lose_nothing(env):
    """An old generation's worker does not close an idle keep-alive connection when it drains:
    a client may be sending its next request on it at that moment (a POST is not retried). It
    answers that request with Connection: close, then closes; and it exits as soon as its last
    connection is gone."""
    n_reloads = 12
    m = env.mock("m1")
    gw = env.gateway([m], workers=2, keys={"k": {"key_sha256": key_sha256(KEY)}},
                     glob={"hard_stop_after": "30s"})
    stop = threading.Event()
    results = [[] for _ in range(6)]
    threads = [threading.Thread(target=_keepalive_client, args=(gw.port, stop, results[i]))
               for i in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        for i in range(n_reloads):
            _generation(_reload(gw))
            time.sleep(0.15)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(20)
    flat = [r for rs in results for r in rs]
    bad = [r for r in flat if r != "ok"]
    check(not bad, f"{len(bad)} of {len(flat)} keep-alive requests failed across {n_reloads} "
                   f"reloads: {bad[:5]}")
    check(all(len(rs) > 20 for rs in results), f"too little load: {[len(rs) for rs in results]}")
    # the clients are gone: every old generation exits now, not at its keepalive_timeout (75 s)
    wait_for(lambda: gw.proc.log_text().count("all its processes have exited") >= n_reloads, 5,
             f"the {n_reloads} old generations to exit once their clients left")


def test_graceful_stop_answers_idle_keepalive(env):
    """SIGTERM: an idle keep-alive connection stays open; a request sent on it is answered with
    Connection: close, and the gateway exits once that connection is closed."""
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, glob={"hard_stop_after": "30s"})
    c = Conn(gw.port, timeout=10)
    req = build_request("POST", "/v1/chat/completions", [("Content-Type", "application/json")],
                        chat_body("one"))
    c.send(req)
    r = c.read_response()
    check(r.status == 200 and (r.header("connection") or "").lower() != "close",
          f"first answer: {r!r}")
    gw.proc.signal(signal.SIGTERM)
    time.sleep(0.5)
    check(gw.proc.alive(), "the master exited with a keep-alive connection open")
    c.send(req)
    r = c.read_response()
    check(r.status == 200 and r.json().get("choices"), f"request on the idle connection: {r!r}")
    check((r.header("connection") or "").lower() == "close",
          f"the answer during the stop has no Connection: close: {r.headers}")
    check(c.wait_closed(3), "the connection stayed open after the Connection: close answer")
    c.close()
    rc = gw.proc.wait(5)
    check(rc == 0, f"master exit status {rc} after the last connection closed")
