"""A client that goes away cancels its upstream request: the upstream connection is closed (so
the upstream can stop generating) and the backend's in-flight slot is free at once, also while
the request waits out a retry back-off. Nothing is recorded against the backend."""

import time

from harness import build_request, chat_body, check, wait_for
from resil_util import pool

CHAT = [("Content-Type", "application/json")]


def _active(gw, name):
    return gw.backend(name)["active"]


def test_client_gone_frees_upstream_at_once(env):
    """20 clients send a request to a slow upstream (3 s) and close: the backend's in-flight
    count drops to 0 right away, not when the upstream answers."""
    a = env.mock("a", "--delay", "3s")
    gw = env.gateway([a], workers=2, pool=pool(check="no", max_fails=1, breaker_failures=1))
    conns = []
    for i in range(20):
        c = env.conn(gw.port)
        c.send(build_request("POST", "/v1/chat/completions", CHAT, chat_body(f"leave {i}")))
        conns.append(c)
    wait_for(lambda: _active(gw, "a") == 20, 2.5, "the 20 requests to be in flight")
    t0 = time.monotonic()
    for c in conns:
        c.close()
    wait_for(lambda: _active(gw, "a") == 0, 2.5,
             "the in-flight count to drop after the clients left")
    dt = time.monotonic() - t0
    check(dt < 1.5, f"in-flight back to 0 only {dt:.2f}s after the clients left (upstream delay 3s)")
    b = gw.backend("a")
    check(b["failures"] == 0 and b["state"] == "UP" and b["breaker"] == "closed",
          f"clients leaving counted against the backend: {b}")
    # the upstream saw its connections close before it answered: it can stop generating
    wait_for(lambda: a.stats()["aborted"] == 20, 1, "the upstream to see the 20 requests "
             "cancelled (their connections closed)")
    # and the backend serves again
    c = env.conn(gw.port)
    c.send(build_request("POST", "/v1/chat/completions", CHAT + [("x-mock-delay", "0")],
                         chat_body("after")))
    r = c.read_response()
    check(r.status == 200, f"request after the aborts: {r!r}")


def test_client_gone_during_retry_backoff(env):
    """A client that leaves while its request waits out a retry back-off: the retry is never
    sent. 10 requests fail on a (500), wait up to 3 s before b, and their clients leave after
    0.3 s: only those whose random back-off was shorter than that may reach b."""
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=1,
                     pool=pool(check="no", balance="first", retries=1, retry_on="5xx",
                               retry_backoff="3s..3s x1"))
    conns = []
    for i in range(10):
        c = env.conn(gw.port)
        c.send(build_request("POST", "/v1/chat/completions", CHAT + [("x-mock-status", "500")],
                             chat_body(f"backoff {i}")))
        conns.append(c)
    wait_for(lambda: a.stats()["requests"] >= 10, 2, "the 10 first tries on a")
    time.sleep(0.3)
    for c in conns:
        c.close()
    time.sleep(3.5)  # past every back-off
    got = b.stats()["requests"]
    check(got <= 5, f"{got} of 10 retries reached b after their clients had left")
