"""Usage read from answers as they pass, and stream_options.include_usage added upstream for a
stream whose client did not ask for it, its chunk removed: the client's bytes are the upstream's
own stream for the client's body. The usage read shows in the gateway's debug log (the stub of
client_on_usage, until accounting is wired)."""

import json
import re
import socket
import time

from harness import build_request, chat, chat_body, check, request, wait_for

USAGE_RE = re.compile(
    r"request (\S+): usage prompt=(\d+) completion=(\d+) cached=(\d+) reasoning=(\d+) "
    r"total=(\d+) have=(\d) text_tokens=(\d+) partial=(\d)")


def _usages(gw):
    out = []
    for m in USAGE_RE.finditer(gw.proc.log_text()):
        out.append({"rid": m.group(1), "prompt": int(m.group(2)),
                    "completion": int(m.group(3)), "total": int(m.group(6)),
                    "have": int(m.group(7)), "text_tokens": int(m.group(8)),
                    "partial": int(m.group(9))})
    return out


def _wait_usage(gw, n):
    wait_for(lambda: len(_usages(gw)) >= n, 5, f"{n} usage log lines")
    return _usages(gw)


def _gw(env, m, **kw):
    return env.gateway([m], workers=1, glob={"log_level": "debug"}, **kw)


def _upstream_body(m):
    return m.last()["body"].encode()


def test_stream_usage_injected_and_removed(env):
    m = env.mock("m1", "--chunks", 5, "--chunk-interval", "2ms")
    gw = _gw(env, m)
    for framing in ("chunked", "length", "close"):
        body = chat_body("Count to five.", stream=True)
        hdr = {"x-mock-framing": framing}
        direct = chat(m.port, body, hdr)
        check(direct.status == 200 and b'"usage"' not in direct.body, f"direct: {direct!r}")
        n = len(_usages(gw))
        via = chat(gw.port, body, hdr)
        check(via.status == 200, f"{framing}: via aigw: {via!r}")
        up = _upstream_body(m)
        check(json.loads(up).get("stream_options") == {"include_usage": True},
              f"{framing}: the upstream was not asked for usage: {up!r}")
        check(via.body == direct.body,
              f"{framing}: the client's bytes differ from the upstream's own stream:\n"
              f" direct {direct.body[-300:]!r}\n via    {via.body[-300:]!r}")
        u = _wait_usage(gw, n + 1)[-1]
        want_prompt = (len(up) + 3) // 4  # the mock's prompt_tokens: its body's bytes / 4
        check(u["have"] == 1 and u["partial"] == 0 and u["prompt"] == want_prompt
              and u["completion"] > 0 and u["total"] == u["prompt"] + u["completion"],
              f"{framing}: usage read {u}, want prompt {want_prompt}")


def test_stream_client_asked_for_usage(env):
    """A client that asked gets the chunk, and its body goes upstream as it is."""
    m = env.mock("m1", "--chunks", 4)
    gw = _gw(env, m)
    body = chat_body("Hi.", stream=True, stream_options={"include_usage": True})
    direct = chat(m.port, body)
    check(b'"usage"' in direct.body, f"direct: {direct.body[-200:]!r}")
    via = chat(gw.port, body)
    check(_upstream_body(m) == body, f"body changed upstream: {_upstream_body(m)!r}")
    check(via.body == direct.body, f"via {via.body[-300:]!r}\n direct {direct.body[-300:]!r}")
    u = _wait_usage(gw, 1)[-1]
    check(u["have"] == 1 and u["prompt"] == (len(body) + 3) // 4, f"usage {u}")


def test_stream_include_usage_false(env):
    """include_usage false (and stream_options with other fields) is set true upstream; the
    client still gets no usage chunk."""
    m = env.mock("m1", "--chunks", 3)
    gw = _gw(env, m)
    for so in ({"include_usage": False}, {}):
        body = chat_body("Hi.", stream=True, stream_options=so)
        direct = chat(m.port, body)
        via = chat(gw.port, body)
        up = json.loads(_upstream_body(m))
        check(up["stream_options"]["include_usage"] is True, f"upstream body {up}")
        check(via.body == direct.body and b'"usage"' not in via.body,
              f"{so}: via {via.body[-300:]!r}\n direct {direct.body[-300:]!r}")


def test_nonstream_usage_read(env):
    m = env.mock("m1")
    gw = _gw(env, m)
    body = chat_body("What is the capital of France?")
    direct = chat(m.port, body)
    via = chat(gw.port, body)
    check(via.body == direct.body, "non-stream body changed")
    check(_upstream_body(m) == body, "non-stream request body changed upstream")
    want = json.loads(direct.body)["usage"]
    u = _wait_usage(gw, 1)[-1]
    check(u["have"] == 1 and u["prompt"] == want["prompt_tokens"]
          and u["completion"] == want["completion_tokens"] and u["partial"] == 0,
          f"usage {u}, upstream said {want}")
    # HTTP/1.0 client, chunked-from-upstream body read too
    r = request(gw.port, "POST", "/v1/chat/completions",
                [("Content-Type", "application/json")], body)
    check(r.status == 200, f"{r!r}")
    _wait_usage(gw, 2)


def test_stream_cut_by_upstream_is_partial(env):
    """An upstream that dies mid-stream: billed from the delivered text, marked partial."""
    m = env.mock("m1", "--chunks", 20, "--chunk-interval", "5ms")
    gw = _gw(env, m)
    body = chat_body("Long.", stream=True)
    full = chat(m.port, body)
    cut = len(full.body) // 2
    via = chat(gw.port, body, {"x-mock-reset-after": str(cut)})
    check(b"event: error" in via.body, f"no error event: {via.body[-200:]!r}")
    u = _wait_usage(gw, 1)[-1]
    check(u["partial"] == 1 and u["have"] == 0 and u["text_tokens"] > 0,
          f"cut stream usage {u}")


def test_stream_client_abort_is_partial(env):
    m = env.mock("m1", "--chunks", 10, "--chunk-interval", "100ms", "--content-bytes", 400)
    gw = _gw(env, m)
    body = chat_body("Long.", stream=True)
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    s.sendall(build_request("POST", "/v1/chat/completions",
                            [("Content-Type", "application/json")], body))
    got = b""
    while got.count(b"data: {") < 5:
        d = s.recv(65536)
        check(d, "closed early")
        got += d
    s.close()
    u = _wait_usage(gw, 1)[-1]
    check(u["partial"] == 1 and u["have"] == 0 and u["text_tokens"] > 0,
          f"aborted stream usage {u}")
    time.sleep(0.1)
    check(len(_usages(gw)) == 1, f"usage reported twice: {_usages(gw)}")
