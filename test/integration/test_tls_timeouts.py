"""Upstream TLS session resumption and the upstream connect timeout."""

import os
import socket
import time

from harness import assert_openai_error, chat, chat_body, check


def test_tls_session_resumption(env):
    """With no pooled connections every request is a new TLS connection: after the first full
    handshake the worker resumes its session (fewer round trips and no certificate checks)."""
    m = env.mock("tls", tls=True)
    ca = os.path.join(env.certs(), "ca.crt")
    gw = env.gateway([("tls", m.url, {"ca_file": ca, "keepalive": 0})], workers=1,
                     pool={"check": "no"})
    s0 = m.stats()
    for i in range(6):
        r = chat(gw.port, chat_body(f"resume {i}"))
        check(r.status == 200, f"request {i}: {r!r}")
    s1 = m.stats()
    # The test's own /mock/stats calls are full handshakes too: s1's is counted in s1.
    gw_handshakes = s1["tls_handshakes"] - s0["tls_handshakes"] - 1
    resumed = s1["tls_resumed"] - s0["tls_resumed"]
    check(gw_handshakes >= 6, f"keepalive = 0, yet only {gw_handshakes} handshakes for 6 requests")
    check(resumed >= gw_handshakes - 1,
          f"{gw_handshakes} TLS handshakes from the gateway, only {resumed} resumed a session")


def test_upstream_connect_timeout(env):
    """A backend whose SYNs go unanswered (its accept queue is full, so the kernel drops them):
    the request fails with a 502 after connect_timeout, not after the kernel's minutes."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    port = lst.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the accept queue; later SYNs are dropped
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    time.sleep(0.1)
    try:
        gw = env.gateway([("dead", f"http://127.0.0.1:{port}/v1", {})], workers=1,
                         pool={"check": "no", "connect_timeout": "300ms", "retries": 0})
        t0 = time.monotonic()
        r = chat(gw.port, chat_body("nobody answers"), timeout=10)
        took = time.monotonic() - t0
        assert_openai_error(r, 502)
        check(r.json()["error"].get("code") == "upstream_connect_failed",
              f"error code: {r.json()['error']}")
        check(0.25 <= took <= 2.0, f"connect_timeout 300ms, yet the answer took {took:.2f}s")
    finally:
        for s in fillers:
            s.close()
        lst.close()
