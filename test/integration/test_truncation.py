"""Never a silently truncated 200: an SSE stream that the upstream delimits by closing the
connection, or sends with a Content-Length, reaches an HTTP/1.1 client chunked, framed by the
gateway, so that a cut (a reset, a short Content-Length, a TLS close without close_notify)
ends it with an OpenAI-shaped `event: error` and a clean end; and a stop that cuts streams
(hard_stop_after) ends them the same way."""

import json
import os
import signal
import time

from harness import SseRecorder, build_request, chat_body, check, group_pids, wait_for
from resil_util import pool

CHAT = [("Content-Type", "application/json")]


def _stream(c, headers=(), content="tell me"):
    c.send(build_request("POST", "/v1/chat/completions", CHAT + list(headers),
                         chat_body(content, stream=True)))
    r = c.read_head()
    check(r.status == 200, f"stream head: {r!r}")
    try:
        c.read_body(r)
    except AssertionError as e:
        check(False, f"the stream's body was cut off ({e}) after "
                     f"{sum(map(len, r.parts))} bytes: {b''.join(r.parts)[-160:]!r}")
    return r


def _error_event(r):
    """The stream is chunked and ends with an OpenAI-shaped event: error, no [DONE]; returns
    the error object."""
    check(r.chunked, f"the stream is not chunked: {r.headers}")
    check(r.header("content-length") is None, f"chunked with a Content-Length: {r.headers}")
    body = r.body.decode("utf-8", "replace")
    check("data: [DONE]" not in body, f"a cut stream ends with [DONE]: ...{body[-200:]!r}")
    idx = body.rfind("event: error\n")
    check(idx >= 0, f"a cut stream ended without an error event: ...{body[-200:]!r}")
    data = body[idx:].split("\n", 2)[1]
    check(data.startswith("data: "), f"error event without data: {body[idx:]!r}")
    err = json.loads(data[len("data: "):])["error"]
    check(err.get("message") and err.get("type") and err.get("code"),
          f"error event is not OpenAI-shaped: {err!r}")
    return err


def _whole(r):
    check(r.chunked, f"the stream is not chunked: {r.headers}")
    body = r.body.decode("utf-8", "replace")
    check(body.rstrip().endswith("data: [DONE]"), f"stream end: ...{body[-200:]!r}")
    check("event: error" not in body, f"a whole stream with an error event: {body[-300:]!r}")


def test_close_delimited_stream_cut(env):
    """The upstream delimits the stream by closing, then resets the connection part-way: the
    client gets a chunked 200 that ends with an error event, not a close that looks like the
    end."""
    a = env.mock("a", "--chunks", 8, "--chunk-interval", "20ms")
    gw = env.gateway([a], workers=1, pool=pool(check="no"))
    c = env.conn(gw.port)
    r = _stream(c, [("x-mock-framing", "close"), ("x-mock-reset-after", "300")])
    _error_event(r)


def test_close_delimited_stream_whole(env):
    """A stream delimited by the close that ends normally: chunked to the client with its last
    chunk, and the client's connection stays open for the next request."""
    a = env.mock("a", "--chunks", 4, "--chunk-interval", "5ms")
    gw = env.gateway([a], workers=1, pool=pool(check="no"))
    c = env.conn(gw.port)
    r = _stream(c, [("x-mock-framing", "close")])
    _whole(r)
    check((r.header("connection") or "").lower() != "close", f"connection closed: {r.headers}")
    r = _stream(c, [("x-mock-framing", "close")], "again")
    _whole(r)


def test_content_length_stream_cut(env):
    """An SSE answer with a Content-Length that the upstream cuts short (FIN after 300 bytes):
    detected, and the client's stream ends with an error event."""
    a = env.mock("a", "--chunks", 8)
    gw = env.gateway([a], workers=1, pool=pool(check="no"))
    c = env.conn(gw.port)
    r = _stream(c, [("x-mock-framing", "length"), ("x-mock-close-after", "300")])
    _error_event(r)


def test_content_length_stream_whole(env):
    a = env.mock("a", "--chunks", 4)
    gw = env.gateway([a], workers=1, pool=pool(check="no"))
    c = env.conn(gw.port)
    for i in range(2):
        _whole(_stream(c, [("x-mock-framing", "length")], f"whole {i}"))


def test_tls_close_without_close_notify(env):
    """Over TLS, a stream delimited by the close that ends with a bare FIN (no close_notify) was
    cut: error event. With close_notify it is a clean end."""
    m = env.mock("tls", "--chunks", 8, "--chunk-interval", "20ms", tls=True)
    ca = os.path.join(env.certs(), "ca.crt")
    gw = env.gateway([("tls", m.url, {"ca_file": ca})], workers=1, pool=pool(check="no"))
    c = env.conn(gw.port)
    r = _stream(c, [("x-mock-framing", "close"), ("x-mock-close-after", "300")])
    _error_event(r)
    c = env.conn(gw.port)
    _whole(_stream(c, [("x-mock-framing", "close")], "clean"))


def test_hard_stop_ends_streams_with_error(env):
    """SIGTERM with hard_stop_after 1s during a 6 s stream: at 1 s the worker ends the stream
    with an error event and the last chunk, and exits by itself (the master does not have to
    kill it)."""
    m = env.mock("m", "--chunks", 60, "--chunk-interval", "100ms")
    gw = env.gateway([m], workers=1, glob={"hard_stop_after": "1s"}, pool=pool(check="no"))
    c = env.conn(gw.port, timeout=10)
    c.send(build_request("POST", "/v1/chat/completions", CHAT, chat_body("long", stream=True)))
    r = c.read_head()
    check(r.status == 200, f"stream head: {r!r}")
    rec = SseRecorder()
    sent = []

    def on_body(data):
        rec(data)
        if rec.events and not sent:
            gw.proc.signal(signal.SIGTERM)
            sent.append(time.monotonic())

    try:
        c.read_body(r, on_body=on_body)
    except AssertionError as e:
        check(False, f"hard_stop_after cut the stream without an error event ({e}), after "
                     f"{len(rec.events)} events: ...{b''.join(r.parts)[-160:]!r}")
    dt = time.monotonic() - sent[0]
    check(0.8 <= dt < 2.5, f"the stream ended {dt:.2f}s after SIGTERM (hard_stop_after 1s)")
    err = _error_event(r)
    check(err["code"] == "gateway_shutdown", f"error event: {err!r}")
    c.close()
    rc = gw.proc.wait(5)
    check(rc == 0, f"master exit status {rc}")
    wait_for(lambda: not group_pids(gw.proc.pid), 3, "children to exit")
    log = gw.proc.log_text()
    check("killing" not in log, f"the master killed a worker that was ending its streams: "
                                f"{[ln for ln in log.splitlines() if 'killing' in ln]}")
