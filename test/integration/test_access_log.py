"""The access log (issue 8 item 4): one JSON line per request with what the client sent and got
(key name, method, path without its query, model, pool, backend, attempts, status, bytes, tokens,
cost, partial, times, the gateway's error code), never the key; a renamed file is replaced on
SIGUSR1 (logrotate's create mode); access_log = stderr writes to the gateway's stderr; a target
that takes nothing fills the buffer, and lines are then dropped and counted, never waited for."""

import json
import os
import re
import signal
import socket
import time
from decimal import Decimal

from harness import Skip, build_request, chat_body, check, key_sha256, wait_for

KEY_A = "sk-aigw-alog-key-a-0123456789abcdef"
KEY_B = "sk-aigw-alog-key-b-fedcba9876543210"
MODELS = {"gpt-a": {"price_input": "2.5", "price_output": "10"}}


def _raw(port, method, path, headers, body=b""):
    """One request with Connection: close; returns (request bytes, response bytes)."""
    req = build_request(method, path, list(headers) + [("Connection", "close")], body,
                        host=f"127.0.0.1:{port}")
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(req)
    data = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
    s.close()
    return req, data


def _status(resp):
    return int(resp[9:12])


def _body(resp):
    return resp.split(b"\r\n\r\n", 1)[1]


def _header(resp, name):
    m = re.search(rb"\r\n" + name.encode() + rb": ([^\r]*)\r\n", resp.split(b"\r\n\r\n")[0] +
                  b"\r\n", re.I)
    return m.group(1).decode() if m else None


def _err_code(resp):
    return json.loads(_body(resp))["error"]["code"]


def _sse_usage(resp):
    for line in resp.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage"' in line:
            u = json.loads(line[6:]).get("usage")
            if u:
                return u
    return None


def _lines(path):
    """Every line of the file, each parsed as JSON (a line that is not is a failure)."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    out = []
    for line in data.split(b"\n")[:-1]:
        try:
            out.append(json.loads(line, parse_float=Decimal))
        except ValueError as e:
            raise AssertionError(f"access log line is not JSON ({e}): {line!r}")
    check(data.endswith(b"\n") or not data, f"the access log ends in half a line: {data[-200:]!r}")
    return out


def _by_rid(path, rid, timeout=5):
    def find():
        got = [l for l in _lines(path) if l.get("request_id") == rid]
        return got or None

    got = wait_for(find, timeout, f"the access log line of {rid}")
    check(len(got) == 1, f"{rid} logged {len(got)} times: {got}")
    return got[0]


def _gateway(env, log, **kw):
    m = env.mock("m1", "--chunks", 4, "--chunk-interval", "0ms")
    gw = env.gateway(
        [("b1", m, {})], workers=2, pool={"models": "gpt-*", "check": "no", "retries": 0},
        keys={"a": {"key_sha256": key_sha256(KEY_A)},
              "b": {"key_sha256": key_sha256(KEY_B), "rpm": 1}},
        models=MODELS, glob={"access_log": log}, **kw)
    return m, gw


def _common(line, rid, req, resp, key="a", model="gpt-a", pool="main", path="/v1/chat/completions"):
    want = {"request_id": rid, "client": "127.0.0.1", "key": key, "method": "POST",
            "path": path, "model": model, "model_served": None, "pool": pool,
            "status": _status(resp), "bytes_in": len(req), "bytes_out": len(resp)}
    got = {k: line.get(k) for k in want}
    check(got == want, f"{rid}: got {got}, want {want}")
    check(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]),
          f"{rid}: time {line['time']!r}")
    check(line["duration_ms"] >= 0 and (line["ttfb_ms"] is None or
                                        0 <= line["ttfb_ms"] <= line["duration_ms"]),
          f"{rid}: ttfb {line['ttfb_ms']} duration {line['duration_ms']}")


def test_access_log_lines(env):
    log = os.path.join(env.dir, "access.log")
    m, gw = _gateway(env, log)
    port = gw.port
    auth_a = [("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY_A}")]
    auth_b = [("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY_B}")]

    # JSON, with a query string that must not be logged
    req, resp = _raw(port, "POST", "/v1/chat/completions?token=s3cr3t-query",
                     auth_a + [("X-Request-Id", "alog-json")], chat_body("hello", model="gpt-a"))
    check(_status(resp) == 200, f"json: {resp[:300]!r}")
    u = json.loads(_body(resp))["usage"]
    line = _by_rid(log, "alog-json")
    _common(line, "alog-json", req, resp)
    check(line["backend"] == "b1" and line["attempts"] == 1 and line["error"] is None
          and line["partial"] is False, f"json: {line}")
    check((line["tokens_in"], line["tokens_out"], line["tokens_cached"]) ==
          (u["prompt_tokens"], u["completion_tokens"], 0), f"json tokens: {line} vs {u}")
    check(line["cost"] == Decimal(_header(resp, "x-aigw-cost")) and line["cost"] > 0,
          f"json cost {line['cost']} vs x-aigw-cost {_header(resp, 'x-aigw-cost')}")

    # a stream with include_usage
    body = chat_body("stream me", stream=True, model="gpt-a",
                     stream_options={"include_usage": True})
    req, resp = _raw(port, "POST", "/v1/chat/completions",
                     auth_a + [("X-Request-Id", "alog-stream")], body)
    u = _sse_usage(resp)
    check(_status(resp) == 200 and u, f"stream: {resp[:300]!r}")
    line = _by_rid(log, "alog-stream")
    _common(line, "alog-stream", req, resp)
    check((line["tokens_in"], line["tokens_out"]) == (u["prompt_tokens"], u["completion_tokens"])
          and line["partial"] is False and line["backend"] == "b1" and line["error"] is None,
          f"stream: {line} vs {u}")

    # 401: no key; nothing routed, the body not read (auth comes first)
    req, resp = _raw(port, "POST", "/v1/chat/completions",
                     [("Content-Type", "application/json"), ("X-Request-Id", "alog-401")],
                     chat_body("who", model="gpt-a"))
    line = _by_rid(log, "alog-401")
    _common(line, "alog-401", req, resp, key=None, model=None, pool=None)
    check(line["status"] == 401 and line["error"] == "invalid_api_key" and
          line["backend"] is None and line["attempts"] == 0 and line["tokens_in"] == 0 and
          line["cost"] == 0, f"401: {line}")

    # 404: an unknown model
    req, resp = _raw(port, "POST", "/v1/chat/completions",
                     auth_a + [("X-Request-Id", "alog-404")], chat_body("x", model="nope\"\n"))
    line = _by_rid(log, "alog-404")
    _common(line, "alog-404", req, resp, model="nope\"\n")  # the listener's pool
    check(line["status"] == 404 and line["error"] == "model_not_found" and
          line["backend"] is None, f"404: {line}")

    # 429: key b may send 1 request a minute
    _raw(port, "POST", "/v1/chat/completions", auth_b + [("X-Request-Id", "alog-b1")],
         chat_body("one", model="gpt-a"))
    req, resp = _raw(port, "POST", "/v1/chat/completions",
                     auth_b + [("X-Request-Id", "alog-429")], chat_body("two", model="gpt-a"))
    check(_status(resp) == 429, f"429: {resp[:300]!r}")
    line = _by_rid(log, "alog-429")
    _common(line, "alog-429", req, resp, key="b")
    check(line["error"] == "rate_limit_exceeded" and line["backend"] is None, f"429: {line}")

    # 502: the upstream closes without an answer (retries = 0)
    req, resp = _raw(port, "POST", "/v1/chat/completions",
                     auth_a + [("X-Request-Id", "alog-502"), ("x-mock-drop", "1")],
                     chat_body("drop", model="gpt-a"))
    check(_status(resp) == 502, f"502: {resp[:300]!r}")
    line = _by_rid(log, "alog-502")
    _common(line, "alog-502", req, resp)
    check(line["error"] == _err_code(resp) and line["backend"] == "b1" and
          line["attempts"] == 1 and line["tokens_out"] == 0, f"502: {line}")

    # a client that leaves in the middle of a stream: partial, billed from what it got
    body = chat_body("let me go", stream=True, model="gpt-a")
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(build_request("POST", "/v1/chat/completions",
                            auth_a + [("X-Request-Id", "alog-abort"), ("x-mock-chunks", "20"),
                                      ("x-mock-chunk-interval", "100ms")], body))
    got = b""
    while got.count(b'"content"') < 4:
        d = s.recv(65536)
        check(d, f"the stream ended before the abort: {got!r}")
        got += d
    s.close()
    line = _by_rid(log, "alog-abort")
    check(line["status"] == 200 and line["partial"] is True and line["backend"] == "b1" and
          line["tokens_out"] >= 1 and line["bytes_out"] >= len(got) and line["error"] is None,
          f"abort: {line}")

    # two requests on one connection: the second, answered before auth and routing, shows
    # nothing of the first (key, model, pool, tokens)
    c = env.conn(port)
    c.send(build_request("POST", "/v1/chat/completions", auth_a + [("X-Request-Id", "ka-1")],
                         chat_body("first", model="gpt-a")))
    check(c.read_response().status == 200, "keep-alive first")
    c.send(build_request("GET", "/nope?x=1", [("X-Request-Id", "ka-2")]))
    check(c.read_response("GET").status == 404, "keep-alive second")
    c.close()
    line = _by_rid(log, "ka-2")
    want = {"key": None, "method": "GET", "path": "/nope", "model": None, "pool": None,
            "backend": None, "attempts": 0, "status": 404, "tokens_in": 0, "tokens_out": 0,
            "error": "not_found"}
    got = {k: line.get(k) for k in want}
    check(got == want, f"second request on a connection: got {got}, want {want}")

    # never the key (nor its digest) anywhere in the file
    with open(log, "rb") as f:
        data = f.read()
    for secret in (KEY_A, KEY_B, key_sha256(KEY_A), key_sha256(KEY_B), "s3cr3t-query"):
        check(secret.encode() not in data, f"{secret} appears in the access log")
    check(b"hello" not in data and b"stream me" not in data, "a prompt appears in the access log")


def test_access_log_reopen_on_sigusr1(env):
    log = os.path.join(env.dir, "access.log")
    m, gw = _gateway(env, log)
    auth = [("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY_A}")]
    _raw(gw.port, "POST", "/v1/chat/completions", auth + [("X-Request-Id", "before-rotate")],
         chat_body("one", model="gpt-a"))
    _by_rid(log, "before-rotate")
    os.rename(log, log + ".1")
    gw.proc.signal(signal.SIGUSR1)
    # every worker opens the path anew (create mode): the new file appears
    wait_for(lambda: os.path.exists(log), 5, "the workers to create a new access log")
    time.sleep(0.2)  # the other worker too
    for i in range(6):  # both workers (connections spread over them)
        _raw(gw.port, "POST", "/v1/chat/completions", auth + [("X-Request-Id", f"after-{i}")],
             chat_body("two", model="gpt-a"))
    for i in range(6):
        _by_rid(log, f"after-{i}")
    old = [l["request_id"] for l in _lines(log + ".1")]
    check(old == ["before-rotate"], f"the rotated file got {old}")
    check("SIGUSR1 received" in gw.proc.log_text(), "the master did not log the SIGUSR1")


def test_access_log_stderr(env):
    m, gw = _gateway(env, "stderr")
    _raw(gw.port, "POST", "/v1/chat/completions",
         [("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY_A}"),
          ("X-Request-Id", "to-stderr")], chat_body("one", model="gpt-a"))

    def find():
        for line in gw.proc.log_text().splitlines():
            if line.startswith("{") and '"to-stderr"' in line:
                return json.loads(line)
        return None

    line = wait_for(find, 5, "the access log line on stderr")
    check(line["status"] == 200 and line["key"] == "a", f"stderr line: {line}")


def test_access_log_full_buffer_drops(env):
    """A FIFO whose reader never reads: the pipe (64 KiB) and the 4 KiB buffer fill up, and
    then lines are dropped and counted while every request is still answered at once."""
    fifo = os.path.join(env.dir, "access.fifo")
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads
    try:
        m = env.mock("m1", "--chunks", 1, "--chunk-interval", "0ms")
        gw = env.gateway([("b1", m, {})], workers=1, pool={"check": "no"},
                         glob={"access_log": fifo, "access_log_buffer": "4k"})
        n = 200
        t0 = time.monotonic()
        for i in range(n):
            _, resp = _raw(gw.port, "POST", "/v1/chat/completions",
                           [("Content-Type", "application/json"),
                            ("X-Request-Id", f"fill-{i:04d}-" + "x" * 100)], chat_body("x"))
            check(_status(resp) == 200, f"request {i}: {resp[:200]!r}")
        took = time.monotonic() - t0
        wait_for(lambda: "line(s) dropped" in gw.proc.log_text(), 5, "the dropped-lines warning")
        check(took < 30, f"{n} requests took {took:.1f}s")
        # what the pipe holds is whole lines, in order, fewer than were sent
        data = b""
        while True:
            try:
                d = os.read(rfd, 65536)
            except BlockingIOError:
                break
            if not d:
                break
            data += d
        lines = data.split(b"\n")
        check(lines[-1] == b"", f"the pipe holds half a line: {data[-100:]!r}")
        rids = [json.loads(l)["request_id"] for l in lines[:-1]]
        check(0 < len(rids) < n, f"{len(rids)} of {n} lines got through")
        check(rids == sorted(rids), f"lines out of order: {rids}")
        m_ = re.findall(r"(\d+) in all by this worker", gw.proc.log_text())
        check(m_ and int(m_[-1]) >= 1, f"no drop count in the log: {m_}")
        # the gateway still stops at once (nothing waits on the full pipe)
        t0 = time.monotonic()
        gw.stop()
        check(time.monotonic() - t0 < 5, "the gateway took long to stop")
    finally:
        os.close(rfd)


def test_access_log_root_owned_dir_with_user(env):
    """[global] user: the access log in a directory only root may write to works, as with nginx
    (the master creates the file while still root and gives it to the user); SIGUSR1 reopens it
    as the user, a file logrotate created for that user (create 0640 USER GROUP)."""
    if os.geteuid() != 0:
        raise Skip("needs root to switch users")
    import pwd
    nobody = pwd.getpwnam("nobody")
    os.chmod(env.dir, 0o755)  # the user may look up paths under it, not write there
    logdir = os.path.join(env.dir, "logs")
    os.mkdir(logdir, 0o755)
    log = os.path.join(logdir, "access.log")
    m = env.mock("m1")
    gw = env.gateway([("b1", m, {})], workers=2, pool={"models": "gpt-*", "check": "no"},
                     keys={"a": {"key_sha256": key_sha256(KEY_A)}}, models=MODELS,
                     glob={"access_log": log, "user": "nobody"})
    st = os.stat(log)
    check(st.st_uid == nobody.pw_uid, f"the access log is owned by uid {st.st_uid}, not nobody")
    auth = [("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY_A}")]
    _raw(gw.port, "POST", "/v1/chat/completions", auth + [("X-Request-Id", "as-nobody")],
         chat_body("one", model="gpt-a"))
    _by_rid(log, "as-nobody")
    # logrotate, create mode: the new file is made for the user, then SIGUSR1
    os.rename(log, log + ".1")
    fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o640)
    os.fchown(fd, nobody.pw_uid, nobody.pw_gid)
    os.close(fd)
    gw.proc.signal(signal.SIGUSR1)
    time.sleep(0.3)
    for i in range(6):
        _raw(gw.port, "POST", "/v1/chat/completions", auth + [("X-Request-Id", f"rot-{i}")],
             chat_body("two", model="gpt-a"))
    for i in range(6):
        _by_rid(log, f"rot-{i}")
    check([l["request_id"] for l in _lines(log + ".1")] == ["as-nobody"],
          "the rotated file got lines after SIGUSR1")
