"""Running out of file descriptors is the gateway's problem, not its backends': maxconn makes
extra clients wait in the kernel's backlog, and a worker out of fds answers 503 and logs it
without counting anything against a backend."""

import os
import re
import resource
import signal
import subprocess
import time

from harness import assert_openai_error, build_request, chat_body, check, wait_for

CHAT = ("POST", "/v1/chat/completions")


def _req(text):
    return build_request(*CHAT, [("Content-Type", "application/json")], chat_body(text))


def _served(c, text, status=200):
    c.send(_req(text))
    r = c.read_response()
    check(r.status == status, f"request '{text}': {r!r}")
    return r


def _waiting(c, secs):
    """The connection gets no byte and is not closed for secs: it waits in the backlog."""
    return not c.wait_closed(secs) and not c.buf


def test_maxconn_waits_then_serves(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, glob={"maxconn": 2})
    a, b = env.conn(gw.port), env.conn(gw.port)
    _served(a, "a")
    _served(b, "b")
    # a third client connects (the kernel completes the handshake) but is not accepted
    c = env.conn(gw.port)
    c.send(_req("c"))
    check(_waiting(c, 1.0), f"a third connection was served (or closed) with maxconn 2: "
                            f"{c.buf[:80]!r}")
    _served(a, "a again")  # the two accepted ones keep working
    a.close()
    r = c.read_response()
    check(r.status == 200, f"the waiting connection after one closed: {r!r}")
    log = gw.proc.log_text()
    check("maxconn reached" in log, "reaching maxconn is not logged")
    check("maxconn 2 (2 per worker)" in log, "the master does not log the resolved maxconn")


def test_listen_maxconn(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, listen={"maxconn": 1})
    a = env.conn(gw.port)
    _served(a, "a")
    b = env.conn(gw.port)
    b.send(_req("b"))
    check(_waiting(b, 0.8), "a second connection was served with the listen's maxconn 1")
    a.close()
    r = b.read_response()
    check(r.status == 200, f"the waiting connection after the first closed: {r!r}")


def _lowest_free_fd(pid):
    used = {int(x) for x in os.listdir(f"/proc/{pid}/fd")}
    n = 0
    while n in used:
        n += 1
    return n


def test_fd_exhaustion_is_not_a_backend_failure(env):
    m1, m2 = env.mock("m1"), env.mock("m2")
    # no pooled upstream connections: every request opens a socket; a single counted failure
    # would take a backend DOWN and open its breaker
    gw = env.gateway([("m1", m1, {"keepalive": 0}), ("m2", m2, {"keepalive": 0})], workers=1,
                     pool={"max_fails": 1, "breaker_failures": 1, "retries": 1})
    for name in ("m1", "m2"):
        gw.wait_state(name, "UP", 10)
    a = env.conn(gw.port)
    _served(a, "before")
    pid = gw.worker_pids()[0]
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    before = {b["name"]: b for b in gw.backends()}
    # the worker can open no fd any more (as at its limit: the next one would be EMFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (_lowest_free_fd(pid), hard))
    try:
        for i in range(4):
            r = _served(a, f"at the limit {i}", 503)
            assert_openai_error(r, 503)
            check(r.json()["error"]["code"] == "gateway_overloaded", f"error body: {r.body!r}")
            check(r.header("retry-after") is not None, "503 without Retry-After")
        # a new client is not accepted and reset: it waits in the backlog
        c = env.conn(gw.port)
        c.send(_req("new client"))
        check(_waiting(c, 0.8), f"a new connection at the fd limit was answered or reset: "
                                f"{c.buf[:80]!r} eof={c.eof}")
        time.sleep(0.3)  # the health checker evaluates every 25 ms
        for b in gw.backends():
            was = before[b["name"]]
            check(b["state"] == "UP" and b["breaker"] == "closed",
                  f"backend {b['name']} is {b['state']}, breaker {b['breaker']} after the "
                  f"gateway ran out of fds")
            check(b["failures"] == was["failures"], f"backend {b['name']}: failures "
                                                    f"{was['failures']} -> {b['failures']}")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    # with fds again: the waiting client is served, and so is the old connection
    r = c.read_response()
    check(r.status == 200, f"the client that waited at the fd limit: {r!r}")
    _served(a, "after")
    log = gw.proc.log_text()
    lines = [ln for ln in log.splitlines() if "out of a local resource" in ln]
    check(any("Too many open files" in ln for ln in lines),
          "EMFILE on an upstream socket is not logged")
    check(len([ln for ln in lines if "backend " in ln]) <= 2,
          f"the upstream EMFILE is logged more than once a second: {lines}")
    check(any("cannot accept: Too many open files" in ln for ln in log.splitlines()),
          "EMFILE on accept is not logged")
    check(not any("is DOWN" in ln or "breaker" in ln and "open" in ln
                  for ln in log.splitlines()), "a backend went DOWN or its breaker opened")


def _run_limited(env, glob, nofile, wait=3.0):
    """aigw under RLIMIT_NOFILE nofile (soft = hard) without CAP_SYS_RESOURCE (so it cannot
    raise the hard limit, as an unprivileged master): (returncode or None if still running,
    log text). A running one is stopped."""
    from harness import AIGW, free_port

    port = free_port()
    path = os.path.join(env.dir, "lim.ini")
    g = {"workers": 1, "admin_socket": os.path.join(env.dir, "lim.sock")}
    g.update(glob)
    with open(path, "w") as f:
        f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in g.items()))
        f.write(f"[listen main]\nauth = off\nbind = 127.0.0.1:{port}\n[pool main]\ncheck = no\n"
                f"[backend a]\nurl = http://127.0.0.1:9/v1\n")
    argv = ["prlimit", f"--nofile={nofile}:{nofile}", "setpriv", "--bounding-set=-sys_resource",
            "--inh-caps=-sys_resource", AIGW, "-c", path]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=wait)
        return p.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)
        out, _ = p.communicate(timeout=10)
        return None, out


def test_maxconn_needs_fds_fails_clearly(env):
    rc, out = _run_limited(env, {"maxconn": 1000}, 200)
    check(rc == 1, f"aigw with maxconn 1000 under a hard fd limit of 200 exited {rc}: {out!r}")
    check("maxconn 1000 needs" in out and "RLIMIT_NOFILE" in out and "hard 200" in out,
          f"the failure does not say why: {out!r}")
    # without maxconn it takes what the hard limit allows (about half of it: one upstream
    # socket per client) and runs
    rc, out = _run_limited(env, {}, 200)
    check(rc is None, f"aigw without maxconn under a hard fd limit of 200 exited {rc}: {out!r}")
    m = re.search(r"maxconn (\d+) \((\d+) per worker\), RLIMIT_NOFILE 200", out)
    check(m and 50 <= int(m.group(1)) < 100, f"maxconn derived from the fd limit: {out!r}")


def test_health_check_at_fd_limit(env):
    m1 = env.mock("m1")
    gw = env.gateway([m1], workers=1, pool={"check_interval": "100ms", "fall": 2})
    gw.wait_state("m1", "UP", 10)
    pid = next(p["pid"] for p in gw.procs() if p["role"] == "health")
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (_lowest_free_fd(pid), hard))
    try:
        time.sleep(1.0)  # about ten checks that cannot open a socket
        b = gw.backend("m1")
        check(b["state"] == "UP", f"the checker out of fds took m1 {b['state']} ({b['reason']})")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    check("check not run" in gw.proc.log_text(), "a check the checker could not run is not "
                                                 "logged")
