"""Proxying: answers identical to the upstream's, SSE timing kept, upstream keep-alive reuse,
request rewriting (Host, X-Forwarded-*, request id, API key, hop-by-hop headers)."""

import re

from harness import SseRecorder, chat, chat_body, check, request


def _compare_stream(direct, via):
    check(via.status == 200, f"stream via aigw: status {via.status}: {via!r}")
    ct = (via.header("content-type") or "").lower()
    check(ct.startswith("text/event-stream"), f"stream via aigw: content-type {ct!r}")
    check(via.body.rstrip(b"\n").endswith(b"data: [DONE]"),
          f"stream via aigw does not end with data: [DONE]: ...{via.body[-120:]!r}")
    check(via.body == direct.body,
          f"SSE body differs from the mock's direct one:\n direct {direct.body[:400]!r}\n"
          f" via    {via.body[:400]!r}")


def test_nonstream_identical(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1)
    body = chat_body("What is the capital of France?", max_tokens=16)
    direct = chat(m.port, body)
    check(direct.status == 200, f"mock direct: {direct!r}")
    via = chat(gw.port, body)
    check(via.status == 200, f"via aigw: status {via.status}: {via!r}")
    ct = (via.header("content-type") or "").lower()
    check(ct.startswith("application/json"), f"via aigw: content-type {ct!r}")
    check(via.body == direct.body,
          f"body differs from the mock's direct one:\n direct {direct.body[:300]!r}\n"
          f" via    {via.body[:300]!r}")
    check(via.header("x-mock-name") == "m1", f"x-mock-name {via.header('x-mock-name')!r}")


def test_stream_identical(env):
    m = env.mock("m1", "--chunks", 6, "--chunk-interval", "5ms")
    gw = env.gateway([m], workers=1)
    body = chat_body("Count to six.", stream=True)
    direct = chat(m.port, body)
    check(direct.status == 200 and b"[DONE]" in direct.body, f"mock direct: {direct!r}")
    _compare_stream(direct, chat(gw.port, body))
    # with the usage chunk too
    body = chat_body("Count to six.", stream=True, stream_options={"include_usage": True})
    direct = chat(m.port, body)
    check(b'"usage"' in direct.body, f"mock sent no usage chunk: {direct.body[-300:]!r}")
    _compare_stream(direct, chat(gw.port, body))


def test_stream_chunk_timing(env):
    m = env.mock("m1", "--chunks", 6, "--chunk-interval", "200ms")
    gw = env.gateway([m], workers=1)
    rec = SseRecorder()
    r = chat(gw.port, chat_body("Slowly.", stream=True), on_body=rec, timeout=15)
    check(r.status == 200, f"status {r.status}: {r!r}")
    data = [(t, ev) for t, ev in rec.events if ev.startswith(b"data: {")]
    check(len(data) >= 6, f"expected >= 6 data events, got {len(data)}: {r.body[:300]!r}")
    times = [t for t, _ in data[:6]]
    gaps = [round((b - a) * 1000) for a, b in zip(times, times[1:])]
    check(all(g >= 150 for g in gaps),
          f"SSE events not spaced ~200ms apart (buffered?): gaps in ms {gaps}")
    # the first token must not wait for the whole answer either
    first = round((times[0] - r.head_time) * 1000)
    check(first < 900, f"first event arrived {first}ms after the head")


def test_chunk_interval_header(env):
    """x-mock-chunk-interval reaches the upstream and the timing survives the proxy."""
    m = env.mock("m1", "--chunks", 4)
    gw = env.gateway([m], workers=1)
    rec = SseRecorder()
    r = chat(gw.port, chat_body("Slowly.", stream=True), {"x-mock-chunk-interval": "200ms"},
             on_body=rec, timeout=15)
    check(r.status == 200, f"status {r.status}: {r!r}")
    times = [t for t, ev in rec.events if ev.startswith(b"data: {")][:4]
    check(len(times) == 4, f"expected 4 data events, got {len(times)}")
    gaps = [round((b - a) * 1000) for a, b in zip(times, times[1:])]
    check(all(g >= 150 for g in gaps), f"gaps in ms {gaps}, expected each >= 150")


def test_upstream_keepalive_reuse(env):
    m = env.mock("m1")
    # no health checks: they would open their own connections to the mock
    gw = env.gateway([m], workers=1, pool={"check": "no"})
    n = 20
    before = m.stats()
    for i in range(n):
        r = chat(gw.port, chat_body(f"request {i}"))
        check(r.status == 200, f"request {i}: {r!r}")
    after = m.stats()
    # each stats call is itself one connection and one request to the mock
    conns = after["connections"] - before["connections"] - 1
    reqs = after["requests"] - before["requests"]
    check(reqs == n, f"mock saw {reqs} new requests, expected {n}")
    check(conns == 1,
          f"{n} sequential requests through 1 worker used {conns} upstream connections, "
          f"expected 1 (keep-alive reuse)")


def test_request_bodies_sent_once_whole(env):
    """Bodies around the size aigw copies behind the request head (4 KB) reach the upstream
    byte for byte, once each, on one kept-alive connection: the mock sees exactly the
    requests sent, no stray bytes between them."""
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, pool={"check": "no"})
    overhead = len(chat_body(""))
    sizes = [1, 100, 4096 - overhead - 1, 4096 - overhead, 4096 - overhead + 1, 9000]
    before = m.stats()
    for i, size in enumerate(sizes * 3):
        body = chat_body("x" * size)
        r = chat(gw.port, body)
        check(r.status == 200, f"request {i} ({len(body)} bytes): {r!r}")
        got = m.last()["body"]
        check(got == body.decode(), f"request {i}: {len(body)}-byte body arrived as {len(got)} bytes")
    after = m.stats()
    n = len(sizes) * 3
    # each stats or last call is one connection of its own (not counted as a request)
    conns = after["connections"] - before["connections"] - 1 - n
    reqs = after["requests"] - before["requests"]
    check(reqs == n, f"mock saw {reqs} requests for {n} sent")
    check(conns == 1, f"{n} requests used {conns} upstream connections, expected 1")


def test_keepalive_zero_closes(env):
    """keepalive = 0 on the backend: every request opens its own upstream connection."""
    m = env.mock("m1")
    gw = env.gateway([("m1", m, {"keepalive": 0})], workers=1, pool={"check": "no"})
    before = m.stats()
    for i in range(4):
        r = chat(gw.port, chat_body(f"request {i}"))
        check(r.status == 200, f"request {i}: {r!r}")
    after = m.stats()
    conns = after["connections"] - before["connections"] - 1
    check(conns == 4, f"keepalive=0: 4 requests used {conns} upstream connections, expected 4")


HEX32 = re.compile(r"^[0-9a-f]{32}$")


def test_request_rewriting(env):
    m = env.mock("m1", "--api-key", "sk-backend")
    gw = env.gateway([("m1", m, {"api_key": "sk-backend"})], workers=1, pool={"check": "no"})
    body = chat_body("rewrite me")
    r = chat(gw.port, body, [
        ("Authorization", "Bearer sk-client"),
        ("Connection", "keep-alive, X-Hop"),
        ("Keep-Alive", "timeout=123"),
        ("TE", "trailers"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Custom", "kept-value"),
        ("User-Agent", "aigw-it/1"),
    ])
    check(r.status == 200, f"status {r.status} (401 = the backend key was not sent): {r!r}")
    last = m.last()
    h = last["headers"]
    problems = []
    if last.get("method") != "POST" or last.get("path") != "/v1/chat/completions":
        problems.append(f"method/path {last.get('method')} {last.get('path')}")
    if last.get("body") != body.decode():
        problems.append(f"body changed: {last.get('body')!r}")
    if h.get("host") != f"127.0.0.1:{m.port}":
        problems.append(f"host {h.get('host')!r}, expected '127.0.0.1:{m.port}'")
    for k, want in (("x-forwarded-for", "127.0.0.1"), ("x-real-ip", "127.0.0.1"),
                    ("x-forwarded-proto", "http"), ("authorization", "Bearer sk-backend"),
                    ("x-custom", "kept-value"), ("user-agent", "aigw-it/1")):
        if h.get(k) != want:
            problems.append(f"{k}: {h.get(k)!r}, expected {want!r}")
    rid = h.get("x-request-id", "")
    if not HEX32.match(rid):
        problems.append(f"x-request-id {rid!r} is not 32 lower-case hex digits")
    if "x-hop" in h.get("connection", "").lower():
        problems.append(f"client's Connection header forwarded: {h.get('connection')!r}")
    for k in ("keep-alive", "te", "proxy-connection"):
        if k in h:
            problems.append(f"hop-by-hop header {k}: {h[k]!r} forwarded")
    if r.header("x-request-id") != rid:
        problems.append(f"response x-request-id {r.header('x-request-id')!r} != upstream's {rid!r}")
    check(not problems, "; ".join(problems))


def test_request_id_kept(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, pool={"check": "no"})
    mine = "0123456789abcdef0123456789abcdef"
    r = chat(gw.port, headers={"X-Request-Id": mine})
    check(r.status == 200, f"status {r.status}: {r!r}")
    got = m.last()["headers"].get("x-request-id")
    check(got == mine, f"upstream saw x-request-id {got!r}, expected the client's {mine!r}")
    check(r.header("x-request-id") == mine,
          f"response x-request-id {r.header('x-request-id')!r}, expected {mine!r}")
    # two requests without one get different ids
    ids = set()
    for _ in range(2):
        chat(gw.port)
        ids.add(m.last()["headers"].get("x-request-id"))
    check(len(ids) == 2 and all(i and HEX32.match(i) for i in ids), f"generated ids {ids}")


def test_backend_key_added(env):
    """A client that sends no Authorization: the backend's key is still added."""
    m = env.mock("m1", "--api-key", "sk-backend")
    gw = env.gateway([("m1", m, {"api_key": "sk-backend"})], workers=1, pool={"check": "no"})
    r = chat(gw.port)  # no client Authorization at all: the gateway still adds the backend's
    check(r.status == 200, f"status {r.status}: {r!r}")
    check(m.last()["headers"].get("authorization") == "Bearer sk-backend",
          f"authorization {m.last()['headers'].get('authorization')!r}")


def test_path_prefix_mapping(env):
    m = env.mock("m1")
    # the mock answers only under /v1: a backend prefix /v1 maps /v1/models -> /v1/models
    gw = env.gateway([m], workers=1, pool={"check": "no"})
    r = request(gw.port, "GET", "/v1/models")
    check(r.status == 200, f"GET /v1/models via aigw: {r!r}")
    check(m.last()["path"] == "/v1/models", f"upstream path {m.last()['path']!r}")
    check(b'"object"' in r.body, f"models body {r.body[:200]!r}")


def test_path_prefix_other(env):
    """url prefix /openai/v1: /v1/chat/completions goes upstream as
    /openai/v1/chat/completions (whatever the mock answers there is passed through)."""
    m = env.mock("m1")
    gw = env.gateway([("m1", f"http://127.0.0.1:{m.port}/openai/v1", {})], workers=1,
                     pool={"check": "no"})
    r = chat(gw.port)
    check(r.header("x-mock-name") == "m1", f"answer not from the upstream: {r!r}")
    check(m.last()["path"] == "/openai/v1/chat/completions",
          f"upstream path {m.last()['path']!r}, expected '/openai/v1/chat/completions'")
    r = request(gw.port, "GET", "/v1/models?limit=2")
    check(m.last()["path"] == "/openai/v1/models?limit=2",
          f"upstream path with a query {m.last()['path']!r}")


def test_roundrobin_spreads(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=1, pool={"check": "no"})
    names = []
    for i in range(6):
        r = chat(gw.port, chat_body(f"rr {i}"))
        check(r.status == 200, f"request {i}: {r!r}")
        names.append(r.header("x-mock-name"))
    check(names.count("a") == 3 and names.count("b") == 3,
          f"roundrobin over two equal backends gave {names}")


def test_weight_zero_takes_nothing(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([("a", a, {"weight": 0}), b], workers=1, pool={"check": "no"})
    names = [chat(gw.port, chat_body(f"w {i}")).header("x-mock-name") for i in range(4)]
    check(names == ["b"] * 4, f"weight 0 backend got traffic: {names}")


def test_concurrent_clients(env):
    """Many clients at once over two workers, streams and plain answers mixed, each on a
    keep-alive connection: every answer is the upstream's, byte for byte."""
    import threading

    from harness import Conn, build_request

    m = env.mock("m1", "--chunks", 4, "--chunk-interval", "10ms")
    gw = env.gateway([m], workers=2, pool={"check": "no"})
    bodies = [chat_body(f"client {i}", stream=(i % 2 == 0)) for i in range(8)]
    want = [chat(m.port, b).body for b in bodies]
    errors = []

    def client(k):
        try:
            c = Conn(gw.port, timeout=10)
            try:
                for j in range(6):
                    i = (k + j) % len(bodies)
                    c.send(build_request("POST", "/v1/chat/completions",
                                         [("Content-Type", "application/json")], bodies[i]))
                    r = c.read_response()
                    if r.status != 200 or r.body != want[i]:
                        errors.append(f"client {k} request {j}: {r!r}")
                        return
            finally:
                c.close()
        except Exception as e:  # reported below
            errors.append(f"client {k}: {e.__class__.__name__}: {e}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    check(not any(t.is_alive() for t in threads), "clients still running after 30s")
    check(not errors, f"{len(errors)} of 16 clients failed; first: {errors[:2]}")


def test_large_bodies(env):
    """A 3 MB request and a 2 MB answer pass intact."""
    m = env.mock("m1", "--content-bytes", 2000000)
    gw = env.gateway([m], workers=1, pool={"check": "no"})
    body = chat_body("z" * (3 << 20))
    direct = chat(m.port, body, timeout=20)
    check(direct.status == 200 and len(direct.body) > 2000000, f"mock direct: {len(direct.body)}")
    via = chat(gw.port, body, timeout=20)
    check(via.status == 200, f"status {via.status}: {via.body[:200]!r}")
    check(m.last()["body"] == body.decode(), "3 MB request body changed on its way upstream")
    check(via.body == direct.body, f"2 MB answer differs: {len(via.body)} vs {len(direct.body)}")
    s = chat(gw.port, chat_body("big stream", stream=True), timeout=20)
    d = chat(m.port, chat_body("big stream", stream=True), timeout=20)
    check(s.body == d.body and len(s.body) > 2000000, f"2 MB stream differs ({len(s.body)})")


def test_client_abort_mid_stream(env):
    """A client that goes away mid-stream: the gateway lets go of the upstream request (active
    back to 0) and keeps serving."""
    from harness import build_request, wait_for

    m = env.mock("m1", "--chunks", 20, "--chunk-interval", "100ms")
    gw = env.gateway([m], workers=1)
    c = env.conn(gw.port, timeout=10)
    c.send(build_request("POST", "/v1/chat/completions", [("Content-Type", "application/json")],
                         chat_body("abandon", stream=True)))
    c.read_head()
    check(sum(b["active"] for b in gw.backends()) == 1, f"active during stream: {gw.backends()}")
    c.close()
    wait_for(lambda: sum(b["active"] for b in gw.backends()) == 0, 2,
             "active to drop to 0 after the client left")
    wait_for(lambda: m.stats()["active"] <= 1, 2,
             "the upstream stream connection to be closed (mock active <= 1: the stats call)")
    r = chat(gw.port)
    check(r.status == 200, f"request after an abandoned stream: {r!r}")


def test_invalid_json_400(env):
    """A chat completion whose body is not one JSON object is answered 400 invalid_json by aigw
    and never reaches a backend; a valid one with escapes, nesting and huge numbers goes
    upstream byte for byte."""
    from harness import assert_openai_error
    from resil_util import live

    m = env.mock("m1")
    gw = env.gateway([m], workers=1, pool={"check": "no"})  # checks would count as requests
    bad = [b"[1,2]", b'"s"', b"42", b"null", b'{"model":"m"', b'{"model":"m"} x', b"{}{}",
           b'{"a":1,}', b"{'a':1}", b'{"a":"\xff"}', b'{"a":[' * 2000 + b"]" * 2000 + b"}",
           b"not json"]
    before = live(m)
    for body in bad:
        r = chat(gw.port, body)
        e = assert_openai_error(r, 400)
        check(e.get("code") == "invalid_json", f"{body[:40]!r}: error {e}")
    check(live(m) == before, f"{live(m) - before} invalid bodies reached the backend")
    body = (b' {"model":"gpt-\\u0034o","messages":[{"role":"user","content":"\\"hi\\"\\n",'
            b'"x":{"model":"no"}}],"n":123456789012345678901234567890,"t":1.5e400} ')
    r = chat(gw.port, body)
    check(r.status == 200, f"valid body: {r!r}")
    check(m.last()["body"] == body.decode(), f"body changed on its way: {m.last()['body']!r}")
