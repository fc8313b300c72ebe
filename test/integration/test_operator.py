"""Operator states set with aigwctl: DRAIN takes no new requests while in-flight ones finish,
MAINT also pauses the backend's checks, READY serves again; aigwctl errors go to stderr."""

import time

from harness import Conn, build_request, chat_body, check
from resil_util import Client, pool


def _served_by(port, n):
    c = Client(port)
    names = [c.chat(chat_body(f"op {i}"), i=i).name for i in range(n)]
    c.close()
    return names


def _models_checks(mock):
    return mock.stats()["models"]


def test_drain_maint_ready(env):
    a = env.mock("a", "--chunks", 6, "--chunk-interval", "100ms")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=1, pool=pool(check_interval="100ms"))

    # A stream in flight on a when it is drained must finish.
    stream, head = None, None
    for i in range(4):
        c = Conn(gw.port, timeout=5)
        c.send(build_request("POST", "/v1/chat/completions",
                             [("Content-Type", "application/json")],
                             chat_body(f"long {i}", stream=True)))
        r = c.read_head()
        if r.header("x-mock-name") == "a":
            stream, head = c, r
            break
        c.read_body(r)
        c.close()
    check(stream is not None, "no stream landed on backend a in 4 tries")

    r = gw.ctl("set", "backend", "a", "drain")
    check(r.returncode == 0 and "DRAIN" in r.stdout, f"set drain: {r.returncode} {r.stdout!r}")
    check(gw.backend("a")["admin"] == "DRAIN", f"show backends: {gw.backend('a')}")
    names = _served_by(gw.port, 12)
    check(names == ["b"] * 12, f"a drained, yet requests went to: {names}")
    stream.read_body(head)
    body = head.body.decode()
    check(body.rstrip().endswith("data: [DONE]"), f"drained stream did not finish: ...{body[-120:]!r}")
    stream.close()

    # MAINT: no traffic and no checks.
    r = gw.ctl("set", "backend", "a", "maint", "--json")
    check(r.returncode == 0 and '"admin":"MAINT"' in r.stdout, f"set maint: {r.stdout!r}")
    time.sleep(0.15)  # a check already under way may finish
    before = _models_checks(a)
    names = _served_by(gw.port, 6)
    time.sleep(0.5)
    after = _models_checks(a)
    check(names == ["b"] * 6, f"a in maintenance, yet requests went to: {names}")
    check(after == before, f"a in maintenance got {after - before} checks in 0.5 s "
                           f"(check_interval 100ms)")

    # READY: checks and traffic come back.
    r = gw.ctl("set", "backend", "a", "ready")
    check(r.returncode == 0, f"set ready: {r.stdout!r} {r.stderr!r}")
    names = _served_by(gw.port, 8)
    check(names.count("a") == 4, f"a ready again: {names}")
    deadline = time.monotonic() + 2
    while _models_checks(a) == after and time.monotonic() < deadline:
        time.sleep(0.05)
    check(_models_checks(a) > after, "a ready again, but its checks did not resume")


def test_operator_errors(env):
    m = env.mock("m")
    gw = env.gateway([m], workers=1)
    for args, what in ((("set", "backend", "nosuch", "drain"), "no backend called 'nosuch'"),
                       (("set", "backend", "m", "sleepy"), "usage: set backend"),
                       (("breaker", "open", "nosuch"), "no backend called 'nosuch'")):
        r = gw.ctl(*args)
        check(r.returncode == 1, f"aigwctl {' '.join(args)} exited {r.returncode}")
        check(r.stdout == "" and what in r.stderr,
              f"aigwctl {' '.join(args)}: stdout {r.stdout!r}, stderr {r.stderr!r}")
    check(gw.backend("m")["admin"] == "READY", f"a failed command changed state: {gw.backend('m')}")
