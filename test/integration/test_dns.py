"""Backends named by host name: the workers look the name up without blocking (localhost here,
through /etc/hosts), try each address in turn, and answer a name that does not resolve with a
quick OpenAI-shaped 502 while the other backends keep serving."""

import socket
import time

from harness import Gateway, assert_openai_error, chat, chat_body, check, free_port, request


def _localhost_addrs():
    return [ai[4][0] for ai in socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)]


def test_localhost_backend_serves(env):
    addrs = _localhost_addrs()
    check("127.0.0.1" in addrs, f"localhost does not resolve to 127.0.0.1 here: {addrs}")
    a = env.mock("a")  # listens on 127.0.0.1 only: a ::1 listed first must be skipped
    url = a.url.replace("127.0.0.1", "localhost")
    check("localhost" in url, f"mock url {a.url}")
    gw = env.gateway([("a", url, {})], workers=2)
    for i in range(10):
        r = chat(gw.port, chat_body(f"by name {i}"))
        check(r.status == 200, f"request {i} to {url} (localhost = {addrs}): {r!r}")
        check(r.header("x-mock-name") == "a", f"request {i} served by {r.header('x-mock-name')}")
    log = gw.proc.log_text()
    check("cannot resolve" not in log, f"gateway log complains: {gw.proc.log_tail()}")


def test_unresolvable_backend_fails_fast(env):
    a = env.mock("a")
    gw = Gateway(env, [a], workers=2, start=False)
    ghost_port = free_port()
    gw.sections += [
        # passive detection and the breaker off: they would take the backend out of service
        # after a few of these failures (max_fails 3, breaker_failures 5 by default)
        ("pool ghosts", {"check": "no", "connect_timeout": "3s", "max_fails": "0",
                         "breaker_failures": "0"}),
        ("backend ghost", {"pool": "ghosts", "url": "http://nonexistent.invalid:9/v1"}),
        ("listen ghosts", {"bind": f"127.0.0.1:{ghost_port}", "pool": "ghosts", "auth": "off"}),
    ]
    gw._write_conf()
    gw.start()
    for i in range(6):
        t0 = time.monotonic()
        r = chat(ghost_port, chat_body(f"ghost {i}"), timeout=10.0)
        dt = time.monotonic() - t0
        e = assert_openai_error(r, 502)
        check(e.get("code") == "upstream_connect_failed", f"request {i}: {r!r}")
        check("cannot resolve nonexistent.invalid" in e["message"],
              f"request {i}: message {e['message']!r}")
        # the lookup fails at once (.invalid never resolves); well under connect_timeout (3 s)
        check(dt < 2.0, f"request {i} took {dt:.2f}s")
        # the other listener's backend is unaffected, before and after
        r = chat(gw.port, chat_body(f"real {i}"))
        check(r.status == 200 and r.header("x-mock-name") == "a", f"request {i} to a: {r!r}")
    r = request(gw.port, "GET", "/v1/models")
    check(r.status == 200, f"GET /v1/models: {r!r}")
    check(gw.proc.alive(), "gateway died")
    check("cannot resolve nonexistent.invalid" in gw.proc.log_text(),
          f"no warning logged: {gw.proc.log_tail()}")
