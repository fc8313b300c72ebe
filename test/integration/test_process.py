"""Processes and operations: worker and health checker restarts, graceful and fast stop, config
checking (aigw -t), and aigwctl."""

import os
import signal
import stat
import subprocess
import threading
import time

from harness import (AIGW, AIGWCTL, SseRecorder, build_request, chat, chat_body, check,
                     connect_refused, group_pids, pid_alive, ppid_of, wait_for)


def _new_pid(gw, role, slot, old_pid):
    for p in gw.procs(quiet=True) or []:
        if p.get("role") == role and p.get("slot", -1) == slot and p.get("pid") not in (0, old_pid):
            return p
    return None


def test_worker_killed_restarted(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=2)
    procs = gw.procs()
    victim = next(p for p in procs if p["role"] == "worker" and p["slot"] == 0)
    other = next(p for p in procs if p["role"] == "worker" and p["slot"] == 1)
    for i in range(4):
        check(chat(gw.port, chat_body(f"before {i}")).status == 200, f"request {i} before kill")
    # a second client keeps sending while the worker dies: its request in flight on the dead
    # worker may be lost, but no connection may be refused
    bg = {"ok": 0, "refused": 0, "lost": [], "stop": False}

    def background():
        while not bg["stop"]:
            try:
                r = chat(gw.port, chat_body("background"), timeout=5)
                if r.status == 200:
                    bg["ok"] += 1
                else:
                    bg["lost"].append(f"status {r.status}")
            except ConnectionRefusedError:
                bg["refused"] += 1
            except (OSError, AssertionError) as e:
                bg["lost"].append(f"{e.__class__.__name__}: {e}")

    t = threading.Thread(target=background)
    t.start()
    time.sleep(0.1)
    os.kill(victim["pid"], signal.SIGKILL)
    t_kill = time.monotonic()
    replaced, t_new, n = None, None, 0
    # requests go on while the slot is restarted: none may be refused or fail
    while time.monotonic() - t_kill < 4 and (replaced is None or n < 20):
        try:
            r = chat(gw.port, chat_body(f"during {n}"), timeout=5)
        except OSError as e:
            check(False, f"request {n}, {time.monotonic() - t_kill:.2f}s after kill -9 of "
                         f"worker {victim['pid']}: {e.__class__.__name__}: {e}")
        check(r.status == 200, f"request {n} after the kill: {r!r}")
        n += 1
        if replaced is None:
            replaced = _new_pid(gw, "worker", 0, victim["pid"])
            if replaced:
                t_new = time.monotonic() - t_kill
    bg["stop"] = True
    t.join(10)
    check(bg["refused"] == 0, f"{bg['refused']} connections refused while a worker restarted")
    check(len(bg["lost"]) <= 1 and bg["ok"] > 0,
          f"background client: {bg['ok']} ok, lost {bg['lost'][:3]} (at most the one in flight "
          f"on the killed worker may be lost)")
    check(replaced is not None, f"worker slot 0 not restarted 4s after kill -9: {gw.procs()}")
    check(t_new <= 1.5, f"worker slot 0 restarted only after {t_new:.2f}s (expected ~1s)")
    check(replaced["restarts"] == victim["restarts"] + 1,
          f"restarts {victim['restarts']} -> {replaced['restarts']}, expected +1")
    check(pid_alive(replaced["pid"]) and ppid_of(replaced["pid"]) == gw.proc.pid,
          f"new worker {replaced['pid']} not a live child of the master {gw.proc.pid}")
    now = {p["slot"]: p for p in gw.procs() if p["role"] == "worker"}
    check(now[1]["pid"] == other["pid"] and now[1]["restarts"] == 0,
          f"the other worker was touched: {other} -> {now[1]}")
    check(str(victim["pid"]) in gw.proc.log_text(),
          "the master did not log the death of the worker (its pid is not in the log)")


def test_health_checker_restarted(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=1)
    health = next(p for p in gw.procs() if p["role"] == "health")
    os.kill(health["pid"], signal.SIGKILL)
    p = wait_for(lambda: _new_pid(gw, "health", health.get("slot", -1), health["pid"]), 3,
                 "a new health checker pid")
    check(p["restarts"] == health["restarts"] + 1, f"restarts {health} -> {p}")
    # the new checker does the checking: a killed backend still goes DOWN
    a.kill()
    gw.wait_state("a", "DOWN", 3)
    for i in range(4):
        r = chat(gw.port, chat_body(f"h {i}"))
        check(r.status == 200 and r.header("x-mock-name") == "b", f"request {i}: {r!r}")


def test_sigterm_finishes_stream(env):
    m = env.mock("m1", "--chunks", 10, "--chunk-interval", "200ms")
    gw = env.gateway([m], workers=2, glob={"hard_stop_after": "10s"})
    master = gw.proc
    pgid = master.pid
    sent = []

    def on_body(data):
        rec(data)
        if rec.events and not sent:
            master.signal(signal.SIGTERM)
            sent.append(time.monotonic())

    rec = SseRecorder()
    c = env.conn(gw.port, timeout=10)
    c.send(build_request("POST", "/v1/chat/completions", [("Content-Type", "application/json")],
                         chat_body("long answer", stream=True)))
    try:
        r = c.read_response(on_body=lambda d: on_body(d))
    except AssertionError as e:
        check(False, f"stream cut by SIGTERM after {len(rec.events)} events: {e}")
    check(sent, "no SSE event arrived, SIGTERM never sent")
    data = [ev for _, ev in rec.events if ev.startswith(b"data: {")]
    # the mock sends a role event, 10 content events and a finish event
    check(r.status == 200 and len(data) >= 11 and b'"finish_reason":"stop"' in data[-1],
          f"got {len(data)} data events after SIGTERM (status {r.status}), the last "
          f"{data[-1][:150] if data else b''!r}")
    check(r.body.rstrip().endswith(b"data: [DONE]"), f"stream end: {r.body[-100:]!r}")
    c.close()
    rc = master.wait(8)
    check(rc is not None, "master still running 8s after SIGTERM (stream already done)")
    check(rc == 0, f"master exit status {rc} after SIGTERM, expected 0")
    check(connect_refused(gw.port), "listening port still accepts after the master exited")
    wait_for(lambda: not group_pids(pgid), 3, "workers and health checker to exit")


def test_sigterm_hard_stop_after(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, glob={"hard_stop_after": "1s"},
                     pool={"first_byte_timeout": "60s"})
    c = env.conn(gw.port, timeout=10)
    c.send(build_request("POST", "/v1/chat/completions",
                         [("Content-Type", "application/json"), ("x-mock-stall", "1")],
                         chat_body("never answered")))
    time.sleep(0.3)  # the request reaches the upstream
    t0 = time.monotonic()
    gw.proc.signal(signal.SIGTERM)
    rc = gw.proc.wait(6)
    dt = time.monotonic() - t0
    check(rc is not None, "master still running 6s after SIGTERM with hard_stop_after 1s")
    check(dt < 3.5, f"stop took {dt:.2f}s with hard_stop_after 1s")
    wait_for(lambda: not group_pids(gw.proc.pid), 3, "children to exit")
    check(c.wait_closed(2), "client connection left open after the hard stop")


def test_sigint_fast_stop(env):
    m = env.mock("m1", "--chunks", 20, "--chunk-interval", "200ms")
    gw = env.gateway([m], workers=1, glob={"hard_stop_after": "30s"})
    c = env.conn(gw.port, timeout=10)
    c.send(build_request("POST", "/v1/chat/completions", [("Content-Type", "application/json")],
                         chat_body("long", stream=True)))
    c.read_head()
    t0 = time.monotonic()
    gw.proc.signal(signal.SIGINT)
    rc = gw.proc.wait(5)
    check(rc is not None, "master still running 5s after SIGINT")
    check(time.monotonic() - t0 < 2, f"SIGINT stop took {time.monotonic() - t0:.2f}s")
    wait_for(lambda: not group_pids(gw.proc.pid), 3, "children to exit")


GOOD = """[global]
workers = 1
admin_socket = {sock}

[listen main]
auth = off
bind = 127.0.0.1:{port}

[pool main]
check_interval = 200ms

[backend a]
url = http://127.0.0.1:9/v1
weight = 1
"""


def _aigw(*args, timeout=10, cwd=None):
    return subprocess.run([AIGW] + list(args), capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def test_config_check(env):
    from harness import free_port

    port = free_port()
    good = os.path.join(env.dir, "good.ini")
    with open(good, "w") as f:
        f.write(GOOD.format(sock=os.path.join(env.dir, "t.sock"), port=port))
    r = _aigw("-t", "-c", good)
    out = r.stdout + r.stderr
    check(r.returncode == 0, f"aigw -t on a good file exited {r.returncode}: {out.strip()}")
    check(f"configuration file {good} is valid" in out, f"aigw -t output {out.strip()!r}")
    check(not os.path.exists(os.path.join(env.dir, "t.sock")) and connect_refused(port),
          "aigw -t started something (admin socket or listener exists)")

    lines = GOOD.splitlines()

    def bad(name, lineno, replacement):
        """The good file with line `lineno` (1-based) replaced."""
        ls = [ln.format(sock=os.path.join(env.dir, "t.sock"), port=port) for ln in lines]
        ls[lineno - 1] = replacement
        path = os.path.join(env.dir, f"bad-{name}.ini")
        with open(path, "w") as f:
            f.write("\n".join(ls) + "\n")
        return path

    cases = [
        ("workers", 2, "workers = banana"),
        ("interval", 9, "check_interval = 5parsecs"),
        ("url", 12, "url = ftp://127.0.0.1/v1"),
        ("unknown-key", 9, "frobnicate = 1"),
        ("syntax", 9, "this line is not ini"),
        ("bind", 6, "bind = 127.0.0.1:99999"),
        ("weight", 13, "weight = 300"),
    ]
    problems = []
    for name, lineno, text in cases:
        path = bad(name, lineno, text)
        r = _aigw("-t", "-c", path)
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 1:
            problems.append(f"{name}: aigw -t exited {r.returncode} for {text!r}: {out!r}")
        elif f"{path}:{lineno}" not in out:
            problems.append(f"{name}: message does not name {os.path.basename(path)}:{lineno} "
                            f"for {text!r}: {out!r}")
    # a backend without url: the message points at its section
    ls = [ln.format(sock="x.sock", port=port) for ln in lines][:10] + ["[backend b]", "weight = 1"]
    path = os.path.join(env.dir, "bad-nourl.ini")
    with open(path, "w") as f:
        f.write("\n".join(ls) + "\n")
    r = _aigw("-t", "-c", path)
    out = (r.stdout + r.stderr).strip()
    if r.returncode != 1 or f"{path}:11" not in out:
        problems.append(f"nourl: exit {r.returncode}, expected 1 and {path}:11 in {out!r}")
    # a missing file
    r = _aigw("-t", "-c", os.path.join(env.dir, "missing.ini"))
    out = (r.stdout + r.stderr).strip()
    if r.returncode != 1 or "missing.ini" not in out:
        problems.append(f"missing file: exit {r.returncode}, output {out!r}")
    check(not problems, "\n".join(problems))


def test_bad_config_run_exits(env):
    from harness import free_port

    port = free_port()
    path = os.path.join(env.dir, "bad.ini")
    with open(path, "w") as f:
        f.write(GOOD.format(sock=os.path.join(env.dir, "b.sock"), port=port)
                .replace("check_interval = 200ms", "check_interval = never"))
    t0 = time.monotonic()
    p = subprocess.Popen([AIGW, "-c", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        check(False, "aigw -c BAD still running after 5s")
    check(p.returncode == 1, f"aigw -c BAD exited {p.returncode}: {err.strip()!r}")
    check(f"{path}:10" in out + err, f"aigw -c BAD message {(out + err).strip()!r}")
    check(connect_refused(port), "aigw -c BAD left a listener")
    check(time.monotonic() - t0 < 5, "slow failure")


def test_ctl_show_backends(env):
    a = env.mock("a", "--chunks", 5, "--chunk-interval", "200ms")
    b = env.mock("b")
    gw = env.gateway([("a", a, {"weight": 3}), ("b", b, {"weight": 1})], workers=1)
    r = gw.ctl("show", "backends")
    check(r.returncode == 0, f"show backends exited {r.returncode}: {r.stderr.strip()}")
    for name in ("a", "b"):
        rows = [ln for ln in r.stdout.splitlines() if f" {name} " in f" {ln} "]
        check(any("UP" in ln and "main" in ln for ln in rows),
              f"no table row with pool main, backend {name}, UP: {r.stdout!r}")
    bs = gw.backends()
    check(isinstance(bs, list) and len(bs) == 2, f"show backends --json: {bs!r}")
    want = {"pool": str, "name": str, "url": str, "state": str, "admin": str, "weight": int,
            "active": int, "requests": int, "failures": int, "check_ms": int,
            "check_status": int, "reason": str}
    for be in bs:
        for k, t in want.items():
            check(k in be, f"field {k} missing in {be}")
            if t is int:
                # a backend not checked yet may show null for the check figures
                nullable = k in ("check_ms", "check_status") and be[k] is None
                check(nullable or (isinstance(be[k], int) and not isinstance(be[k], bool)),
                      f"{k} is not an integer in {be}")
            elif k != "reason":
                check(isinstance(be[k], str), f"{k} is not a string in {be}")
    by = {be["name"]: be for be in bs}
    check(set(by) == {"a", "b"}, f"names {set(by)}")
    check(by["a"]["pool"] == "main" and by["a"]["url"] == a.url, f"a: {by['a']}")
    check(by["a"]["weight"] == 3 and by["b"]["weight"] == 1, f"weights {bs}")
    check(all(be["state"] == "UP" and be["admin"] == "READY" for be in bs), f"states {bs}")
    # requests are counted
    base = sum(be["requests"] for be in bs)
    for i in range(8):
        check(chat(gw.port, chat_body(f"c {i}")).status == 200, f"request {i}")
    wait_for(lambda: sum(be["requests"] for be in gw.backends()) - base == 8, 2,
             "the 8 requests to be counted in show backends")
    cur = {be["name"]: be for be in gw.backends()}
    check(cur["a"]["requests"] - by["a"]["requests"] == 6, f"weight 3:1 split of 8: {cur}")
    # an open stream is an active connection
    c = env.conn(gw.port, timeout=10)
    c.send(build_request("POST", "/v1/chat/completions", [("Content-Type", "application/json")],
                         chat_body("active", stream=True)))
    r = c.read_head()
    act = sum(be["active"] for be in gw.backends())
    check(act == 1, f"active during one stream: {act}")
    c.read_body(r)
    check(r.status == 200 and r.body.rstrip().endswith(b"data: [DONE]"), f"stream: {r!r}")
    wait_for(lambda: sum(be["active"] for be in gw.backends()) == 0, 4,
             "active back to 0 after the stream")


def test_ctl_show_proc(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=3)
    ps = gw.procs()
    roles = [p["role"] for p in ps]
    check(roles.count("master") == 1 and roles.count("health") == 1 and
          roles.count("worker") == 3, f"show proc roles {roles}")
    for p in ps:
        for k in ("role", "slot", "pid", "started", "restarts"):
            check(k in p, f"field {k} missing in {p}")
        check(pid_alive(p["pid"]), f"{p} pid not alive")
        check(abs(time.time() - p["started"]) < 300, f"started {p['started']} not epoch seconds")
        check(p["restarts"] == 0, f"restarts {p}")
    master = next(p for p in ps if p["role"] == "master")
    check(master["pid"] == gw.proc.pid, f"master pid {master['pid']} != {gw.proc.pid}")
    workers = sorted((p["slot"], p["pid"]) for p in ps if p["role"] == "worker")
    check([s for s, _ in workers] == [0, 1, 2], f"worker slots {workers}")
    check(len({pid for _, pid in workers}) == 3, f"worker pids not distinct {workers}")
    for p in ps:
        if p["role"] != "master":
            check(ppid_of(p["pid"]) == gw.proc.pid, f"{p} is not a child of the master")
    r = gw.ctl("show", "proc")
    check(r.returncode == 0 and all(w in r.stdout for w in ("master", "worker", "health")),
          f"show proc table: {r.returncode} {r.stdout!r} {r.stderr!r}")
    # -c CONFIG finds the socket from the config
    r = gw.ctl("show", "proc", "--json", use_conf=True)
    check(r.returncode == 0 and '"master"' in r.stdout, f"aigwctl -c CONF: {r.stderr.strip()}")


def test_workers_auto(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers="auto")
    n = len([p for p in gw.procs() if p["role"] == "worker"])
    check(n in gw.auto_counts(), f"workers = auto started {n} workers, CPUs: {gw.auto_counts()}")
    for i in range(2 * n):
        check(chat(gw.port, chat_body(f"auto {i}")).status == 200, f"request {i}")


def test_ctl_errors_and_socket_mode(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1)
    mode = stat.S_IMODE(os.stat(gw.sock_path).st_mode)
    check(stat.S_ISSOCK(os.stat(gw.sock_path).st_mode), "admin_socket is not a socket")
    check(mode == 0o600, f"admin socket mode {oct(mode)}, expected 0600")
    r = gw.ctl("show", "nonsense")
    check(r.returncode != 0, f"unknown command exited 0: {r.stdout!r}")
    missing = os.path.join(env.dir, "missing.sock")
    r = subprocess.run([AIGWCTL, "-s", missing, "show", "proc", "--json"], capture_output=True,
                       text=True, timeout=10)
    check(r.returncode == 1, f"aigwctl with a missing socket exited {r.returncode}")
    check(r.stderr.strip() and r.stdout.strip() == "",
          f"missing socket: stdout {r.stdout!r}, stderr {r.stderr!r}")
    check("missing.sock" in r.stderr or "connect" in r.stderr.lower(),
          f"message does not say what failed: {r.stderr.strip()!r}")
    # a stopped master: the socket is gone or refuses
    gw.stop()
    r = gw.ctl("show", "backends", "--json")
    check(r.returncode == 1 and r.stderr.strip(), f"after stop: {r.returncode} {r.stderr!r}")
