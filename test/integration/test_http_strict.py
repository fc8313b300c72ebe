"""Strict HTTP/1.1 requests (RFC 9112/9110) and what reaches an upstream: only GET, POST,
DELETE and HEAD are forwarded, OPTIONS is answered by aigw, other methods get 405 / 501; a
malformed head, target or chunk framing gets 400 and a version other than 1.0/1.1 505. Every
answer given before the request was read whole carries Connection: close, the connection
closes, and nothing sent after it (a body, a pipelined request) is ever parsed as a request.
The request body has a whole-body deadline (client_body_total_timeout) besides the gap between
reads (client_body_timeout)."""

import select
import socket
import time

from harness import assert_openai_error, build_request, chat_body, check

JSON = [("Content-Type", "application/json")]
PATH = "/v1/chat/completions"
ALLOW = "GET, POST, DELETE, HEAD, OPTIONS"
# pipelined behind a refused request: it must never get an answer
NEXT = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
KEY = "sk-backend-secret-0123456789"


def _setup(env, listen=None, key=False):
    args = ("--api-key", KEY) if key else ()
    m = env.mock("m1", *args)
    extra = {"api_key": KEY} if key else {}
    gw = env.gateway([("m1", m, extra)], workers=1, pool={"check": "no"}, listen=listen)
    return m, gw


def _closed_after(c, what):
    """The answer said Connection: close, the socket reads EOF and nothing came after it."""
    check(c.wait_closed(3), f"{what}: connection still open after the answer")
    check(c.buf == b"", f"{what}: bytes after the answer (a pipelined request was parsed): "
                        f"{c.buf[:200]!r}")


def _refused(env, gw, raw, status, what, method="POST"):
    """raw (with a valid request pipelined behind it) gets `status` with Connection: close, and
    the pipelined request no answer."""
    c = env.conn(gw.port, timeout=5)
    c.send(raw + NEXT)
    try:
        r = c.read_response(method)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}")
    check(r.status == status, f"{what}: expected {status}, got {r!r}")
    if method != "HEAD":
        assert_openai_error(r, status)
    check((r.header("connection") or "").lower() == "close",
          f"{what}: {status} without Connection: close: {r.headers}")
    _closed_after(c, what)
    return r


def test_trace_never_forwarded(env):
    """TRACE is not forwarded: an upstream that implements it echoes the request head, and
    that head carries the backend's key."""
    m, gw = _setup(env, key=True)
    # the mock is an echoing upstream: the test can see a leak
    c = env.conn(m.port)
    c.send(b"TRACE /v1/models HTTP/1.1\r\nHost: m\r\nAuthorization: Bearer " + KEY.encode() +
           b"\r\n\r\n")
    direct = c.read_response()
    check(direct.status == 200 and KEY.encode() in direct.body,
          f"the mock does not echo TRACE: {direct!r}")
    m._get("/mock/reset")

    c = env.conn(gw.port, timeout=5)
    c.send(b"TRACE /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-client\r\n\r\n" +
           NEXT)
    r = c.read_response()
    check(KEY.encode() not in r.body and KEY not in str(r.headers),
          f"the backend's key reached the client: {r!r}")
    check(r.status == 405, f"TRACE: expected 405, got {r!r}")
    check(r.header("allow") == ALLOW, f"405 Allow: {r.header('allow')!r}")
    _closed_after(c, "TRACE")
    check(KEY.encode() not in c.buf, "the backend's key reached the client")
    check(m.stats()["requests"] == 0, f"TRACE reached the upstream: {m.last()}")


def test_methods_not_allowed(env):
    """Known methods the API does not use get 405 with Allow, unknown ones 501; the connection
    closes and the request behind gets no answer. None reaches the upstream."""
    m, gw = _setup(env)
    for method, target in (("PUT", PATH), ("PATCH", PATH), ("TRACE", "/v1/models"),
                           ("CONNECT", "127.0.0.1:443"), ("PROPFIND", "/v1/models"),
                           ("PURGE", "/v1/models")):
        raw = f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode()
        r = _refused(env, gw, raw, 405, method)
        check(r.header("allow") == ALLOW, f"{method}: Allow {r.header('allow')!r}")
    for method in ("FOO", "get", "BREW", "M-GET"):
        raw = f"{method} /v1/models HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        _refused(env, gw, raw, 501, method)
    # an unknown method arriving byte by byte: decided once its space comes
    c = env.conn(gw.port, timeout=5)
    for b in b"FOOBAR":
        c.send(bytes([b]))
        time.sleep(0.02)
    c.send(b" /v1/models HTTP/1.1\r\nHost: x\r\n\r\n" + NEXT)
    r = c.read_response()
    check(r.status == 501, f"slow unknown method: {r!r}")
    _closed_after(c, "slow unknown method")
    check(m.stats()["requests"] == 0, f"a refused method reached the upstream: {m.last()}")


def test_connect_body_not_parsed(env):
    """CONNECT is refused at its head; its body (here: a whole request) is never parsed as the
    next request."""
    m, gw = _setup(env)
    inner = build_request("POST", PATH, JSON, chat_body("smuggled"))
    raw = (b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n"
           b"Content-Length: %d\r\n\r\n" % len(inner)) + inner
    _refused(env, gw, raw, 405, "CONNECT with a body")
    # also when the body comes later, on its own
    c = env.conn(gw.port, timeout=5)
    c.send(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" %
           len(inner))
    r = c.read_response()
    check(r.status == 405, f"CONNECT: {r!r}")
    try:
        c.send(inner)
    except OSError:
        pass
    _closed_after(c, "CONNECT, body sent after the answer")
    check(m.stats()["requests"] == 0, f"the CONNECT body reached the upstream: {m.last()}")


def test_allowed_methods_forwarded(env):
    m, gw = _setup(env)
    c = env.conn(gw.port)
    for method, path, body in (("GET", "/v1/models", None), ("POST", PATH, chat_body()),
                               ("DELETE", "/v1/files/file-1", None), ("HEAD", "/v1/models", None)):
        c.send(build_request(method, path, JSON if body else None, body))
        r = c.read_response(method)
        check(m.last()["method"] == method and m.last()["path"] == path,
              f"{method} {path} did not reach the upstream as is: {m.last()}")
        check(r.header("x-mock-name") == "m1", f"{method}: answer not the upstream's: {r!r}")


def test_options_answered_by_aigw(env):
    """OPTIONS gets 204 with Allow from aigw itself (not forwarded), keeps the connection;
    the asterisk form is for OPTIONS only."""
    m, gw = _setup(env)
    c = env.conn(gw.port)
    for target in ("/v1/chat/completions", "*"):
        c.send(f"OPTIONS {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        r = c.read_response("OPTIONS")
        check(r.status == 204, f"OPTIONS {target}: {r!r}")
        check(r.header("allow") == ALLOW, f"OPTIONS {target}: Allow {r.header('allow')!r}")
        check(r.header("content-length") is None, f"204 with Content-Length: {r.headers}")
    c.send(build_request("POST", PATH, JSON, chat_body()))
    check(c.read_response().status == 200, "request after OPTIONS on the same connection")
    check(m.stats()["requests"] == 1, f"OPTIONS reached the upstream: {m.stats()}")
    _refused(env, gw, b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400, "GET *")


def test_strict_request_head(env):
    """Heads RFC 9112 makes invalid get 400 (or 505 for the version) and a closed connection;
    none reaches the upstream."""
    m, gw = _setup(env)
    req = "GET /v1/models HTTP/1.1\r\n"
    bad = [
        (b"GET /v1/models HTTP/1.1\r\n\r\n", "no Host"),
        (b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "two Host headers"),
        (b"GET /v1/models HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", "two Host, same value"),
        (b"GET /v1/models HTTP/1.1\r\nHost: a b\r\n\r\n", "invalid Host value"),
        (b"GET /v1/models HTTP/1.1\r\nHost: a/b\r\n\r\n", "Host with a slash"),
        (b"GET /v1/models HTTP/1.1\r\nHost : x\r\n\r\n", "space before the colon"),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n", "space before a colon"),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n", "space in a name"),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX(A): b\r\n\r\n", "separator in a name"),
        (b"GET /v1/models HTTP/1.1\nHost: x\r\n\r\n", "bare LF after the request line"),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\n", "bare LF ending the head"),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\n\r\n", "bare LF after a header"),
        (b"GET /v1/models\r\n\r\n", "HTTP/0.9"),
        (b"GET /v1/models\tHTTP/1.1\r\nHost: x\r\n\r\n", "tab in the request line"),
        (b"GET 127.0.0.1:80 HTTP/1.1\r\nHost: x\r\n\r\n", "authority form"),
        (b"GET v1/models HTTP/1.1\r\nHost: x\r\n\r\n", "relative target"),
        (b"GET /v1/models#frag HTTP/1.1\r\nHost: x\r\n\r\n", "fragment"),
        (b"GET /v1/mod\xc3\xa9ls HTTP/1.1\r\nHost: x\r\n\r\n", "non-ASCII target"),
        (b"GET http://u@h/v1/models HTTP/1.1\r\nHost: x\r\n\r\n", "userinfo"),
        (b"GET ftp://h/v1/models HTTP/1.1\r\nHost: x\r\n\r\n", "ftp scheme"),
        (b"GET http:///v1/models HTTP/1.1\r\nHost: x\r\n\r\n", "empty authority"),
        (b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"2\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding in HTTP/1.0"),
        (req.encode() + b"Host: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"2\r\n{}\r\n0\r\n\r\n", "Content-Length and Transfer-Encoding"),
        (req.encode() + b"Host: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n"
         b"2\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding and Content-Length"),
        (req.encode() + b"Host: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
         "two differing Content-Length"),
        (req.encode() + b"Host: x\r\nContent-Length: 2, 2\r\n\r\n{}", "Content-Length list"),
        (req.encode() + b"Host: x\r\nTransfer-Encoding: gzip\r\n\r\n{}", "not chunked"),
        (req.encode() + b"Host: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n{}",
         "chunked not last"),
    ]
    for raw, what in bad:
        _refused(env, gw, raw, 400, what)
    for raw, what in ((b"GET /v1/models HTTP/2.0\r\nHost: x\r\n\r\n", "HTTP/2.0"),
                      (b"GET /v1/models HTTP/1.2\r\nHost: x\r\n\r\n", "HTTP/1.2"),
                      (b"GET /v1/models HTTP/3.7\r\nHost: x\r\n\r\n", "HTTP/3.7"),
                      (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/2 preface")):
        _refused(env, gw, raw, 505, what)
    check(m.stats()["requests"] == 0, f"an invalid request reached the upstream: {m.last()}")
    # HTTP/1.0 without Host is fine (Host is HTTP/1.1's)
    c = env.conn(gw.port)
    c.send(b"GET /v1/models HTTP/1.0\r\n\r\n")
    check(c.read_response("GET").status == 200, "HTTP/1.0 request without Host")


def test_chunk_framing_errors(env):
    """Chunk framing errors get 400 and close; so does a chunked body that ends in a bare LF,
    which llhttp takes but a front proxy may read as a body that goes on."""
    m, gw = _setup(env)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    for body, what in ((b"zz\r\n{}\r\n0\r\n\r\n", "bad chunk size"),
                       (b"2\r\n{}X\r\n0\r\n\r\n", "chunk not followed by CRLF"),
                       (b"2\n{}\r\n0\r\n\r\n", "bare LF after a chunk size"),
                       (b"ffffffffffffffffff\r\n{}\r\n0\r\n\r\n", "chunk size overflow"),
                       (b"2 \r\n{}\r\n0\r\n\r\n", "space after a chunk size"),
                       (b"2\r\n{}\r\n0\r\n\n", "bare LF ending the body"),
                       (b"2\r\n{}\r\n0\r\nX-T: y\r\n\n", "bare LF after a trailer")):
        _refused(env, gw, head + body, 400, what)
    check(m.stats()["requests"] == 0, f"a bad chunked body reached the upstream: {m.last()}")
    # the same end split over reads (the last bytes arrive alone) is still caught
    body = chat_body("split")
    c = env.conn(gw.port, timeout=5)
    c.send(head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n")
    time.sleep(0.1)
    c.send(b"\n" + NEXT)
    r = c.read_response()
    check(r.status == 400, f"bare LF ending the body in its own read: {r!r}")
    _closed_after(c, "bare LF ending the body in its own read")
    # and a good one split the same way passes
    c = env.conn(gw.port, timeout=5)
    c.send(head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r")
    time.sleep(0.1)
    c.send(b"\n")
    check(c.read_response().status == 200, "chunked body whose last byte came alone")


def test_absolute_form(env):
    """An absolute-form target is served by its path (RFC 9112 3.2.2); the upstream gets the
    origin form and the backend's Host."""
    m, gw = _setup(env)
    c = env.conn(gw.port)
    c.send(b"GET http://api.example.com/v1/models HTTP/1.1\r\nHost: other.example\r\n\r\n")
    r = c.read_response("GET")
    check(r.status == 200, f"absolute form: {r!r}")
    check(m.last()["path"] == "/v1/models", f"upstream path {m.last()['path']!r}")
    check(m.last()["headers"].get("host") == f"127.0.0.1:{m.port}",
          f"upstream Host {m.last()['headers'].get('host')!r}")
    body = chat_body("absolute")
    c.send(b"POST HTTPS://API.EXAMPLE.COM:443/v1/chat/completions?x=1 HTTP/1.1\r\nHost: h\r\n"
           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    r = c.read_response()
    check(r.status == 200, f"absolute form POST: {r!r}")
    check(m.last()["path"] == "/v1/chat/completions?x=1", f"upstream path {m.last()['path']!r}")


def test_answers_before_body_close(env):
    """413 (declared or found while reading), 400 and 417 come before the body was read: each
    says Connection: close, the connection closes, and what the client sent after (the rest of
    the body, a request) is never answered."""
    m, gw = _setup(env, listen={"max_body_size": "1k"})
    big = chat_body("y" * 5000)
    _refused(env, gw, build_request("POST", PATH, JSON, big), 413, "declared too large")
    _refused(env, gw, build_request("POST", PATH, JSON, [big[:600], big[600:]], chunked=True),
             413, "chunked too large")
    _refused(env, gw, build_request("POST", PATH, JSON + [("Expect", "whatever")],
                                    chat_body()), 417, "unsupported Expect")
    _refused(env, gw, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: abc\r\n\r\n", 400, "bad Content-Length")
    # a 413 for a body the client is still sending: the rest never becomes a request
    c = env.conn(gw.port, timeout=5)
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" %
           len(big))
    r = c.read_response()
    assert_openai_error(r, 413)
    try:
        c.send(big[:200] + NEXT)
    except OSError:
        pass
    _closed_after(c, "413, body sent after it")
    check(m.stats()["requests"] == 0, f"a refused request reached the upstream: {m.last()}")


def test_refused_body_bounded(env):
    """The body of a request already refused (unknown path) is read and dropped only up to
    max_body_size: then 413 and close, never read for ever."""
    m, gw = _setup(env, listen={"max_body_size": "1k"})
    c = env.conn(gw.port, timeout=5)
    c.send(b"POST /nope HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"400\r\n" + b"x" * 1024 + b"\r\n"
    try:
        for _ in range(64):
            c.send(piece)
    except OSError:
        pass  # closed while sending: the answer is in the buffer
    r = c.read_response()
    assert_openai_error(r, 413)
    check(c.wait_closed(3), "connection still open after 413")


def test_linger_drain_bounded(env):
    """After an answer that closes the connection, what the client still sends is drained for
    a moment so the answer is not reset away, but no more than max_body_size of it."""
    m, gw = _setup(env, listen={"max_body_size": "1k"})
    c = env.conn(gw.port, timeout=5)
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    r = c.read_response()
    assert_openai_error(r, 413)
    t0 = time.monotonic()
    sent, err = 0, None
    while time.monotonic() - t0 < 1.5:
        try:
            c.sock.settimeout(0.2)
            sent += c.sock.send(b"z" * 65536)
        except socket.timeout:
            pass
        except OSError as e:
            err = e
            break
    check(err is not None, f"the gateway drained {sent} bytes in 1.5 s after a 413 "
                           f"(max_body_size 1k) without closing")


def _wait_answer(c, limit):
    """Waits up to limit seconds for data on c without sending; True when some came."""
    r, _, _ = select.select([c.sock], [], [], limit)
    return bool(r)


def test_body_total_timeout(env):
    """A body trickling in (one byte every 200 ms, well within client_body_timeout) is cut by
    client_body_total_timeout: 408 with Connection: close, then the connection closes."""
    m, gw = _setup(env, listen={"client_body_timeout": "5s",
                                "client_body_total_timeout": "1s"})
    c = env.conn(gw.port, timeout=5)
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 200\r\n\r\n")
    t0 = time.monotonic()
    answered = False
    while time.monotonic() - t0 < 4:
        try:
            c.send(b" ")
        except OSError:
            break
        if _wait_answer(c, 0.2):
            answered = True
            break
    dt = time.monotonic() - t0
    check(answered, f"no answer after {dt:.1f}s of a trickling body (total timeout 1s)")
    check(0.8 <= dt <= 2.5, f"answer after {dt:.2f}s, total timeout 1s")
    r = c.read_response()
    assert_openai_error(r, 408)
    check((r.header("connection") or "").lower() == "close", f"408 headers: {r.headers}")
    _closed_after(c, "408 for a trickling body")
    check(m.stats()["requests"] == 0, "the cut request reached the upstream")
    # a body that arrives in time is not affected
    c = env.conn(gw.port, timeout=5)
    body = chat_body("in time")
    c.send(build_request("POST", PATH, JSON + [("Content-Length", str(len(body)))]))
    time.sleep(0.5)
    c.send(body)
    check(c.read_response().status == 200, "a body sent within the total timeout")


def test_body_idle_timeout_408(env):
    """A body that stops is answered 408 with Connection: close after client_body_timeout, and
    what comes after is never parsed as a request."""
    m, gw = _setup(env, listen={"client_body_timeout": "500ms"})
    c = env.conn(gw.port, timeout=5)
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    t0 = time.monotonic()
    r = c.read_response()
    dt = time.monotonic() - t0
    assert_openai_error(r, 408)
    check(0.3 <= dt <= 3, f"408 after {dt:.2f}s, client_body_timeout 500ms")
    check((r.header("connection") or "").lower() == "close", f"408 headers: {r.headers}")
    try:
        c.send(b" " * 99 + NEXT)
    except OSError:
        pass
    _closed_after(c, "408 for a stalled body")
    check(m.stats()["requests"] == 0, "the timed-out request reached the upstream")


def test_upgrade_not_taken(env):
    """aigw upgrades nothing: Upgrade is hop-by-hop (not forwarded) and the bytes after such a
    request are the next request, answered as usual."""
    m, gw = _setup(env)
    c = env.conn(gw.port, timeout=5)
    c.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           b"\r\n" + NEXT)
    for i in range(2):
        r = c.read_response("GET")
        check(r.status == 200, f"answer {i} after a request with Upgrade: {r!r}")
    check("upgrade" not in m.last()["headers"], f"Upgrade forwarded: {m.last()['headers']}")
