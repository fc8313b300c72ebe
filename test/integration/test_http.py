"""The gateway's HTTP/1.1 server: keep-alive, pipelining, chunked uploads, 100-continue,
limits (431, 413), malformed requests (400 + close), unknown paths (404); every error the
gateway makes is OpenAI-shaped JSON."""

import time

from harness import assert_openai_error, build_request, chat_body, check

JSON = [("Content-Type", "application/json")]
PATH = "/v1/chat/completions"


def _direct(m, body):
    c = m.env.conn(m.port)
    c.send(build_request("POST", PATH, JSON, body))
    r = c.read_response()
    check(r.status == 200, f"mock direct: {r!r}")
    return r


def test_keepalive_two_requests(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1)
    c = env.conn(gw.port)
    for i in range(2):
        c.send(build_request("POST", PATH, JSON, chat_body(f"ka {i}")))
        r = c.read_response()
        check(r.status == 200, f"request {i} on one connection: {r!r}")
        check("close" not in (r.header("connection") or "").lower(),
              f"gateway closes a keep-alive connection: Connection: {r.header('connection')}")
    # HTTP/1.0 without keep-alive: answered, then closed
    c2 = env.conn(gw.port)
    c2.send(b"GET /v1/models HTTP/1.0\r\nHost: x\r\n\r\n")
    r = c2.read_response("GET")
    check(r.status == 200, f"HTTP/1.0 request: {r!r}")
    check(c2.wait_closed(3), "HTTP/1.0 connection without keep-alive was not closed")


def test_pipelining(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1)
    b1, b2, b3 = chat_body("first"), chat_body("second"), chat_body("third")
    want = [_direct(m, b).body for b in (b1, b2, b3)]
    c = env.conn(gw.port)
    c.send(build_request("POST", PATH, JSON, b1) + build_request("POST", PATH, JSON, b2) +
           build_request("POST", PATH, JSON, b3))
    for i in range(3):
        r = c.read_response()
        check(r.status == 200, f"pipelined answer {i}: {r!r}")
        check(r.body == want[i], f"pipelined answer {i} out of order or changed: {r.body[:200]!r}")


def test_chunked_request_body(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1)
    body = chat_body("chunked upload " + "x" * 3000)
    parts = [body[:10], body[10:2000], body[2000:]]
    want = _direct(m, body).body
    c = env.conn(gw.port)
    c.send(build_request("POST", PATH, JSON, parts, chunked=True))
    r = c.read_response()
    check(r.status == 200, f"chunked upload: {r!r}")
    check(m.last()["body"] == body.decode(), f"upstream got body {m.last()['body'][:200]!r}")
    check(r.body == want, f"answer differs from the direct one: {r.body[:200]!r}")
    # slow chunks: the body arrives in pieces over time
    c.send(build_request("POST", PATH, JSON, None, chunked=True).replace(b"0\r\n\r\n", b""))
    for p in parts:
        c.send(b"%x\r\n" % len(p) + p + b"\r\n")
        time.sleep(0.05)
    c.send(b"0\r\n\r\n")
    r = c.read_response()
    check(r.status == 200 and r.body == want, f"slow chunked upload: {r!r}")


def test_expect_continue(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1)
    body = chat_body("continue")
    c = env.conn(gw.port, timeout=5)
    c.send(build_request("POST", PATH, JSON + [("Content-Length", str(len(body))),
                                               ("Expect", "100-continue")]))
    r = c.read_response(skip_continue=False)
    check(r.status == 100, f"expected 'HTTP/1.1 100 Continue' before sending the body, got {r!r}")
    c.send(body)
    r = c.read_response()
    check(r.status == 200, f"answer after 100 Continue: {r!r}")
    check(m.last()["body"] == body.decode(), f"upstream body {m.last()['body'][:200]!r}")


def test_expect_continue_too_large(env):
    """A body over max_body_size announced with Expect: 100-continue gets 413 right away."""
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, listen={"max_body_size": "1k"})
    c = env.conn(gw.port, timeout=5)
    c.send(build_request("POST", PATH, JSON + [("Content-Length", "5000"),
                                               ("Expect", "100-continue")]))
    r = c.read_response(skip_continue=False)
    assert_openai_error(r, 413)


def test_header_too_large(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, listen={"max_header_size": "4k"})
    c = env.conn(gw.port)
    c.send(build_request("POST", PATH, JSON + [("X-Big", "a" * 8000)], chat_body()))
    assert_openai_error(c.read_response(), 431)
    # too many headers
    c = env.conn(gw.port)
    many = [(f"X-H{i}", "v") for i in range(150)]
    c.send(build_request("POST", PATH, JSON + many, chat_body()))
    assert_openai_error(c.read_response(), 431)
    # a header just under the limit still works
    c = env.conn(gw.port)
    c.send(build_request("POST", PATH, JSON + [("X-Big", "a" * 3000)], chat_body()))
    r = c.read_response()
    check(r.status == 200, f"3000-byte header under a 4k limit: {r!r}")


def test_body_too_large(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, listen={"max_body_size": "1k"})
    big = chat_body("y" * 2000)
    nxt = build_request("GET", "/v1/models")
    c = env.conn(gw.port)
    c.send(build_request("POST", PATH, JSON, big) + nxt)
    r = c.read_response()
    assert_openai_error(r, 413)
    # answered before the body was read: the connection closes, the next request is not read
    check(r.header("connection") == "close", f"413 headers: {r.headers}")
    check(c.wait_closed(3) and c.buf == b"", f"413: not closed, or more came: {c.buf[:100]!r}")
    # chunked: the size is only known while reading
    c = env.conn(gw.port)
    c.send(build_request("POST", PATH, JSON, [big[:600], big[600:]], chunked=True) + nxt)
    r = c.read_response()
    assert_openai_error(r, 413)
    check(r.header("connection") == "close", f"chunked 413 headers: {r.headers}")
    check(c.wait_closed(3) and c.buf == b"", f"chunked 413: not closed: {c.buf[:100]!r}")
    # under the limit is fine
    r = env.conn(gw.port)
    r.send(build_request("POST", PATH, JSON, chat_body("small")))
    check(r.read_response().status == 200, "small body under max_body_size rejected")


def test_malformed_request_line(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1)
    for raw in (b"GARBAGE\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"):
        c = env.conn(gw.port, timeout=5)
        c.send(raw)
        r = c.read_response()
        assert_openai_error(r, 400)
        check(r.header("connection") == "close", f"400 headers for {raw[:40]!r}: {r.headers}")
        check(c.wait_closed(3), f"connection not closed after 400 for {raw[:40]!r}")


def test_unknown_path_404(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1)
    for method, path in (("GET", "/"), ("GET", "/mock/stats"), ("POST", "/v2/chat/completions"),
                         ("GET", "/v1")):
        c = env.conn(gw.port)
        c.send(build_request(method, path, JSON, b"{}" if method == "POST" else None))
        r = c.read_response(method)
        assert_openai_error(r, 404)
    # a 404 does not cost the connection: the next request on it is answered
    c = env.conn(gw.port)
    c.send(build_request("GET", "/nope"))
    assert_openai_error(c.read_response("GET"), 404)
    c.send(build_request("POST", PATH, JSON, chat_body()))
    r = c.read_response()
    check(r.status == 200, f"request after a 404 on the same connection: {r!r}")


def test_client_header_timeout(env):
    """A client that never finishes its head is dropped after client_header_timeout."""
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, listen={"client_header_timeout": "500ms"})
    c = env.conn(gw.port, timeout=5)
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    check(c.wait_closed(4), "half-sent head still open after 4s (client_header_timeout 500ms)")
    dt = time.monotonic() - t0
    check(dt >= 0.3, f"connection closed after {dt:.2f}s, before the 500ms timeout")
    # part of a request came: it is answered 408 (Connection: close) before the close
    check(c.buf.startswith(b"HTTP/1.1 408 "), f"no 408 before the close: {c.buf[:100]!r}")
    check(b"\r\nConnection: close\r\n" in c.buf.split(b"\r\n\r\n")[0] + b"\r\n",
          f"408 without Connection: close: {c.buf[:300]!r}")


def test_keepalive_timeout(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, listen={"keepalive_timeout": "500ms"})
    c = env.conn(gw.port, timeout=5)
    c.send(build_request("POST", PATH, JSON, chat_body()))
    check(c.read_response().status == 200, "first request")
    t0 = time.monotonic()
    check(c.wait_closed(4), "idle keep-alive connection still open after 4s (timeout 500ms)")
    dt = time.monotonic() - t0
    check(0.3 <= dt, f"idle connection closed after {dt:.2f}s, before keepalive_timeout 500ms")
    check(c.buf == b"", f"data sent on an idle connection: {c.buf[:100]!r}")


def test_http10_client_stream(env):
    """An HTTP/1.0 client cannot read chunked framing: a stream reaches it close-delimited,
    the same SSE bytes as the upstream's."""
    m = env.mock("m1", "--chunks", 4, "--chunk-interval", "10ms")
    gw = env.gateway([m], workers=1)
    body = chat_body("old client", stream=True)
    want = _direct(m, body).body
    c = env.conn(gw.port)
    c.send(build_request("POST", PATH, JSON, body).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
    r = c.read_response()
    check(r.status == 200, f"HTTP/1.0 stream: {r!r}")
    check(r.header("transfer-encoding") is None,
          f"chunked answer to an HTTP/1.0 client: {r.headers}")
    check(r.body == want, f"HTTP/1.0 stream body differs: {r.body[:200]!r}")
