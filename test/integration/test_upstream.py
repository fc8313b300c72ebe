"""Upstream health and failures: a killed backend goes DOWN and traffic moves to the other one,
HTTPS upstreams with a good and a wrong CA, all backends down, first-byte timeout, upstream
errors passed through, retries before anything was sent."""

import os
import json
import time

from harness import assert_openai_error, build_request, chat, chat_body, check

INTERVAL = 0.2  # check_interval of the test configs
FALL = 2
RISE = 2
# scheduling, a check in flight, an ASan build: a check result may land this much late
SLACK = 1.5


def test_backend_killed_goes_down(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2)
    check(gw.backend("a")["state"] == "UP" and gw.backend("b")["state"] == "UP",
          f"backends not UP at start: {gw.backends()}")
    a.kill()
    limit = FALL * INTERVAL + SLACK
    dt = gw.wait_state("a", "DOWN", limit + 2)
    check(dt <= limit, f"backend a DOWN only after {dt:.2f}s (fall {FALL} x {INTERVAL}s + "
          f"{SLACK}s slack = {limit:.1f}s)")
    check(gw.backend("b")["state"] == "UP", f"b not UP: {gw.backend('b')}")
    for i in range(12):
        r = chat(gw.port, chat_body(f"after down {i}"))
        check(r.status == 200, f"request {i} after a was marked DOWN: {r!r}")
        check(r.header("x-mock-name") == "b", f"request {i} served by {r.header('x-mock-name')}")
    # the backend comes back: UP again after rise checks, and takes traffic again
    a.start(same_port=True)
    limit = RISE * INTERVAL + SLACK
    dt = gw.wait_state("a", "UP", limit + 2)
    check(dt <= limit, f"backend a UP again only after {dt:.2f}s (limit {limit:.1f}s)")
    names = {chat(gw.port, chat_body(f"back {i}")).header("x-mock-name") for i in range(6)}
    check(names == {"a", "b"}, f"after recovery requests went to {names}")


def test_failed_checks_counted(env):
    a = env.mock("a")
    gw = env.gateway([a, ("dead", f"http://127.0.0.1:{_dead_port()}/v1", {})], workers=1)
    gw.wait_state("dead", "DOWN", FALL * INTERVAL + SLACK + 2)
    d = gw.backend("dead")
    check(d.get("reason"), f"DOWN backend has no reason: {d}")
    check(gw.backend("a")["state"] == "UP", f"a: {gw.backend('a')}")
    for i in range(5):
        r = chat(gw.port, chat_body(f"x {i}"))
        check(r.status == 200 and r.header("x-mock-name") == "a", f"request {i}: {r!r}")


def _dead_port():
    from harness import free_port

    return free_port()  # nothing listens there


def test_https_upstream(env):
    m = env.mock("tls", tls=True)
    ca = os.path.join(env.certs(), "ca.crt")
    gw = env.gateway([("tls", m.url, {"ca_file": ca})], workers=1)
    for i in range(3):
        r = chat(gw.port, chat_body(f"over tls {i}"))
        check(r.status == 200, f"request {i} to an https upstream: {r!r}")
        check(r.header("x-mock-name") == "tls", f"x-mock-name {r.header('x-mock-name')}")
    r = chat(gw.port, chat_body("tls stream", stream=True))
    check(r.status == 200 and r.body.rstrip().endswith(b"data: [DONE]"), f"stream: {r!r}")
    # health checks over TLS pass: still UP after several intervals
    time.sleep(FALL * INTERVAL * 3)
    check(gw.backend("tls")["state"] == "UP", f"https backend: {gw.backend('tls')}")


def test_https_wrong_ca(env):
    m = env.mock("tls", tls=True)
    other = os.path.join(env.certs(), "other-ca.crt")
    gw = env.gateway([("tls", m.url, {"ca_file": other})], workers=1)
    r = chat(gw.port)
    assert_openai_error(r, 502)
    gw.wait_state("tls", "DOWN", FALL * INTERVAL + SLACK + 2)
    r = chat(gw.port)
    assert_openai_error(r, (502, 503))


def test_https_verify_off(env):
    m = env.mock("tls", tls=True)
    other = os.path.join(env.certs(), "other-ca.crt")
    gw = env.gateway([("tls", m.url, {"ca_file": other, "tls_verify": "no"})], workers=1)
    r = chat(gw.port)
    check(r.status == 200, f"tls_verify = no with a foreign CA: {r!r}")


def test_all_backends_down_no_checks(env):
    a = env.mock("a")
    gw = env.gateway([a], workers=1, pool={"check": "no"})
    check(chat(gw.port).status == 200, "first request")
    a.kill()
    for i in range(3):
        assert_openai_error(chat(gw.port, chat_body(f"down {i}")), (502, 503))


def test_all_backends_down_detected(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=1)
    a.kill()
    b.kill()
    gw.wait_state("a", "DOWN", FALL * INTERVAL + SLACK + 2)
    gw.wait_state("b", "DOWN", FALL * INTERVAL + SLACK + 2)
    t0 = time.monotonic()
    assert_openai_error(chat(gw.port), (502, 503))
    dt = time.monotonic() - t0
    check(dt < 1.0, f"answer with every backend DOWN took {dt:.2f}s (should not wait)")


def test_first_byte_timeout(env):
    a = env.mock("a")
    gw = env.gateway([a], workers=1, pool={"first_byte_timeout": "500ms", "check": "no"})
    t0 = time.monotonic()
    r = chat(gw.port, headers={"x-mock-delay": "3s"})
    dt = time.monotonic() - t0
    assert_openai_error(r, 504)
    check(0.4 <= dt < 2.5, f"504 after {dt:.2f}s with first_byte_timeout 500ms")
    # a stalled upstream times out the same way
    t0 = time.monotonic()
    r = chat(gw.port, headers={"x-mock-stall": "1"})
    dt = time.monotonic() - t0
    assert_openai_error(r, 504)
    check(dt < 2.5, f"504 for a stalled upstream after {dt:.2f}s")
    # and the gateway still works afterwards
    check(chat(gw.port).status == 200, "request after the timeouts")


def test_upstream_500_passed_through(env):
    a = env.mock("a")
    gw = env.gateway([a], workers=1, pool={"check": "no"})
    body = chat_body("fail please")
    direct = chat(a.port, body, headers={"x-mock-status": "500"})
    check(direct.status == 500, f"mock direct with x-mock-status 500: {direct!r}")
    r = chat(gw.port, body, headers={"x-mock-status": "500"})
    check(r.status == 500, f"upstream 500 became {r.status}: {r!r}")
    check(r.header("x-mock-name") == "a", "the 500 did not come from the upstream")
    check(r.body == direct.body, f"500 body changed: {r.body[:200]!r} vs {direct.body[:200]!r}")


def test_upstream_429_retry_after_passed_through(env):
    a = env.mock("a")
    gw = env.gateway([a], workers=1, pool={"check": "no"})
    r = chat(gw.port, headers={"x-mock-status": "429", "x-mock-retry-after": "7"})
    check(r.status == 429, f"upstream 429 became {r.status}: {r!r}")
    check(r.header("retry-after") == "7", f"Retry-After {r.header('retry-after')!r}")


def test_retry_before_first_byte(env):
    """A backend that refuses connections (not yet detected: checks off) costs no request:
    nothing was sent to the client yet, so the gateway tries the other backend."""
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=1, pool={"check": "no"})
    a.kill()
    for i in range(6):
        r = chat(gw.port, chat_body(f"retry {i}"))
        check(r.status == 200, f"request {i} with backend a dead (checks off): {r!r}")
        check(r.header("x-mock-name") == "b", f"served by {r.header('x-mock-name')}")


def test_upstream_reset_mid_stream(env):
    """The upstream dies after part of an SSE stream: the client must never get a silently
    truncated 200. The gateway ends the stream with an `event: error` carrying an OpenAI-shaped
    error and a clean end of the chunked body, and no [DONE]."""
    a = env.mock("a", "--chunks", 8, "--chunk-interval", "20ms")
    gw = env.gateway([a], workers=1, pool={"check": "no"})
    c = env.conn(gw.port, timeout=5)
    c.send(build_request("POST", "/v1/chat/completions", [("Content-Type", "application/json"),
                                                          ("x-mock-reset-after", "300")],
                         chat_body("cut", stream=True)))
    r = c.read_head()  # no head at all would be a bug too
    if r.status != 200:
        c.read_body(r)
        assert_openai_error(r, 502)  # the head had not been forwarded yet: a clean 502 is fine
        return
    t0 = time.monotonic()
    try:
        c.read_body(r)
    except AssertionError as e:
        check(False, f"upstream reset 300 bytes into an SSE stream: the client's response was "
                     f"cut off ({e}) instead of ending with an error event")
    except TimeoutError:
        check(False, f"upstream reset 300 bytes into a stream: the client got the 200 head, "
                     f"then {sum(map(len, r.parts))} body bytes and no close for "
                     f"{time.monotonic() - t0:.1f}s (stream_idle_timeout is 10s)")
    body = r.body.decode("utf-8", "replace")
    check("data: [DONE]" not in body, f"a cut stream must not end with [DONE]: ...{body[-200:]!r}")
    idx = body.rfind("event: error\n")
    check(idx >= 0, f"upstream reset after 300 body bytes, yet the client got a well-terminated "
                    f"{r.status} response of {len(r.body)} bytes without an error event: "
                    f"...{body[-160:]!r}")
    data = body[idx:].split("\n", 2)[1]
    check(data.startswith("data: "), f"error event without data line: {body[idx:]!r}")
    err = json.loads(data[len("data: "):])
    check(isinstance(err.get("error"), dict) and err["error"].get("message")
          and err["error"].get("type"), f"error event is not OpenAI-shaped: {err!r}")


def test_passive_down_without_checks(env):
    """Active checks off: failed requests alone (max_fails within fail_timeout) mark a backend
    DOWN, and then nothing more is sent to it."""
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=1,
                     pool={"check": "no", "max_fails": 2, "fail_timeout": "10s"})
    a.kill()
    for i in range(6):
        chat(gw.port, chat_body(f"passive {i}"))  # some may fail while a is still UP
    gw.wait_state("a", "DOWN", 2)
    for i in range(6):
        r = chat(gw.port, chat_body(f"after {i}"))
        check(r.status == 200 and r.header("x-mock-name") == "b",
              f"request {i} after a was marked DOWN passively: {r!r}")
