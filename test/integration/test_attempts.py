"""Every send of a request to an upstream is an attempt: it shows in x-aigw-attempts and counts
against `retries`; nothing is sent again behind the client's back. A failure after the request
was written (the upstream may be generating the answer) is retried only where retry_on lists
it. A response head the gateway cannot forward is a 502 and a failure of the backend."""

import socket
import threading

from harness import assert_openai_error, chat_body, check
from resil_util import pool

CHAT = [("Content-Type", "application/json")]


def _chat_on(c, content, headers=()):
    from harness import build_request

    c.send(build_request("POST", "/v1/chat/completions", CHAT + list(headers),
                         chat_body(content)))
    return c.read_response()


def _requests(m):
    return m.stats()["requests"]


def _pooled_then_dropped(env, gw, mocks):
    """One request that leaves a kept-alive upstream connection in the pool, then one that the
    upstream reads and drops (closes the connection without an answer) on that connection.
    Returns the second response and how many times each mock received a request after the
    first."""
    c = env.conn(gw.port)
    r = _chat_on(c, "first")
    check(r.status == 200, f"first request: {r!r}")
    before = {m.name: _requests(m) for m in mocks}
    r = _chat_on(c, "dropped", [("x-mock-drop", "1")])
    got = {m.name: _requests(m) - before[m.name] for m in mocks}
    return r, got


def test_retries_0_sends_once(env):
    """retries = 0: a reused connection that the upstream closes after reading the request gives
    the client a 502 with x-aigw-attempts 1, and the upstream got the request exactly once."""
    a = env.mock("a")
    gw = env.gateway([a], workers=1, pool=pool(check="no", retries=0))
    r, got = _pooled_then_dropped(env, gw, [a])
    assert_openai_error(r, 502)
    check(got["a"] == 1, f"retries = 0, yet the upstream received the request {got['a']} times")
    check(r.header("x-aigw-attempts") == "1", f"x-aigw-attempts {r.header('x-aigw-attempts')!r}")


def test_reset_not_in_retry_on_sends_once(env):
    """retries = 1, retry_on without `reset`: a reset after the request was written is not
    retried, neither on a new connection to the same backend nor on another backend."""
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=1,
                     pool=pool(check="no", balance="first", retries=1, retry_on="5xx"))
    r, got = _pooled_then_dropped(env, gw, [a, b])
    assert_openai_error(r, 502)
    check(got == {"a": 1, "b": 0}, f"requests received after the drop: {got} (want a once)")
    check(r.header("x-aigw-attempts") == "1", f"x-aigw-attempts {r.header('x-aigw-attempts')!r}")


def test_reset_retried_is_an_attempt(env):
    """retry_on lists `reset`: the request is sent again, and that send is an attempt like any
    other: two sends, x-aigw-attempts 2, the pool's retry counter moves."""
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=1,
                     pool=pool(check="no", balance="first", retries=1, retry_on="reset"))
    r, got = _pooled_then_dropped(env, gw, [a, b])
    assert_openai_error(r, 502)  # b drops it too: the header travels with the request
    check(got == {"a": 1, "b": 1}, f"requests received after the drop: {got} (want one each)")
    check(r.header("x-aigw-attempts") == "2", f"x-aigw-attempts {r.header('x-aigw-attempts')!r}")
    retries = sum(x.get("retries", 0) for x in gw.backends())
    check(retries == 1, f"show backends counts {retries} retries, want 1: {gw.backends()}")


def test_stale_pooled_connection_is_an_attempt(env):
    """A pooled connection the upstream reset while idle, found when the next request is written
    to it: the upstream never saw that request, so it is sent again on a new connection even
    with retry_on = 5xx, and that second send shows as attempt 2. Which way a pair goes depends
    on whether the reset is in before the write (stale) or after it (a reset after the write, not
    retried here); both must add up: never more sends than attempts, never a silent one."""
    from harness import build_request, chat

    a = env.mock("a")
    gw = env.gateway([a], workers=1, pool=pool(check="no", retries=1, retry_on="5xx"))
    body = chat_body("first")
    n = len(chat(a.port, body).body)
    outcomes = []
    for i in range(12):
        c = env.conn(gw.port)
        # the mock sends the whole first answer, then resets the connection; the pipelined
        # second request goes to the pooled connection in the same loop turn
        req1 = build_request("POST", "/v1/chat/completions",
                             CHAT + [("x-mock-reset-after", str(n))], body)
        req2 = build_request("POST", "/v1/chat/completions", CHAT, chat_body(f"second {i}"))
        before = _requests(a)
        c.send(req1 + req2)
        r1 = c.read_response()
        r2 = c.read_response()
        c.close()
        check(r1.status == 200, f"pair {i}: first answer {r1!r}")
        sends = _requests(a) - before - 1
        att = r2.header("x-aigw-attempts")
        if r2.status == 200:
            check(att == "2" and sends == 1,
                  f"pair {i}: the second request was answered after its pooled connection "
                  f"broke, with x-aigw-attempts {att!r} ({sends} sends reached the upstream): "
                  f"the send on the stale connection must count as attempt 1")
        else:
            assert_openai_error(r2, 502)
            check(att == "1" and sends == 0, f"pair {i}: {r2!r}, attempts {att}, sends {sends}")
        outcomes.append(r2.status)
    check(200 in outcomes, f"no pair found its pooled connection stale: {outcomes}")


class _BigHeadUpstream:
    """A raw upstream that answers every request with a head of `size` bytes."""

    def __init__(self, size):
        self.size = size
        self.requests = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s):
        with s:
            buf = b""
            try:
                while b"\r\n\r\n" not in buf:
                    d = s.recv(65536)
                    if not d:
                        return
                    buf += d
                self.requests += 1
                filler = b"x" * 100
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                i = 0
                while len(head) < self.size:
                    head += b"X-Filler-%d: %s\r\n" % (i, filler)
                    i += 1
                s.sendall(head + b"Content-Length: 2\r\n\r\n{}")
                s.recv(65536)
            except OSError:
                pass

    def close(self):
        self.sock.close()


def test_head_too_large_is_502_and_a_failure(env):
    """A response head larger than the gateway's buffer: the client gets a 502 (not a cut
    connection), and the backend is charged with a failure (max_fails 1 marks it DOWN)."""
    up = _BigHeadUpstream(40000)
    try:
        gw = env.gateway([("big", f"http://127.0.0.1:{up.port}/v1", {})], workers=1,
                         pool=pool(check="no", max_fails=1, fail_timeout="30s"))
        c = env.conn(gw.port)
        try:
            r = _chat_on(c, "big head")
        except AssertionError as e:
            check(False, f"response head larger than the buffer: the client got no answer ({e})")
        assert_openai_error(r, 502)
        check(up.requests == 1, f"upstream got {up.requests} requests")
        gw.wait_state("big", "DOWN", 3)
    finally:
        up.close()
