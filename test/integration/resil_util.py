"""Helpers for the resilience and distribution tests (test_resilience.py, test_distribution.py):
keep-alive clients run from several threads with a bounded request count and a deadline, per
backend counts, mock request counters, waits on `aigwctl show backends --json` fields, and an
SSE event parser."""

import json
import threading
import time

from harness import Conn, Fail, build_request, chat_body, check

# A pool with every resilience feature off unless a test turns it on: each test then sees only
# the behaviour it is about (the gateway's defaults are retries 1, max_fails 3, breaker 5).
QUIET = {
    "retries": 0,
    "max_fails": 0,
    "breaker_failures": 0,
}

# Checks that never fail because of a mock's --status/--delay/--stall fault: /mock/* answers are
# exempt from faults, so a backend can fail live traffic while its checks pass.
CHECK_MOCK_STATS = {"check_path": "/mock/stats"}

CHAT_HEADERS = [("Content-Type", "application/json")]


def pool(*dicts, **kw):
    """QUIET merged with the given dicts and keyword overrides."""
    p = dict(QUIET)
    for d in dicts:
        p.update(d)
    p.update(kw)
    return p


class Result:
    __slots__ = ("i", "status", "name", "backend", "attempts", "error", "t0", "t1", "body",
                 "retry_after")

    def __repr__(self):
        return (f"<req {self.i}: {self.status} from {self.name} (x-aigw-backend {self.backend}, "
                f"attempts {self.attempts}) err={self.error} {self.body[:160]!r}>")


class Client:
    """A keep-alive client connection that reconnects when the gateway closed it."""

    def __init__(self, port, timeout=10.0):
        self.port = port
        self.timeout = timeout
        self.c = None

    def chat(self, body=None, headers=None, i=0):
        r = Result()
        r.i = i
        r.status, r.name, r.backend, r.attempts, r.error = 0, None, None, None, None
        r.body, r.retry_after = b"", None
        hdrs = CHAT_HEADERS + list(headers.items() if isinstance(headers, dict)
                                   else headers or [])
        data = build_request("POST", "/v1/chat/completions", hdrs,
                             body if body is not None else chat_body(f"load {i}"),
                             host=f"127.0.0.1:{self.port}")
        r.t0 = time.monotonic()
        try:
            if self.c is None:
                self.c = Conn(self.port, timeout=self.timeout)
            self.c.send(data)
            resp = self.c.read_response()
            r.status = resp.status
            r.name = resp.header("x-mock-name")
            r.backend = resp.header("x-aigw-backend")
            r.attempts = resp.header("x-aigw-attempts")
            r.retry_after = resp.header("retry-after")
            r.body = resp.body
            if (resp.header("connection") or "").lower() == "close":
                self.close()
        except (OSError, Fail) as e:
            r.error = f"{e.__class__.__name__}: {e}"
            self.close()
        r.t1 = time.monotonic()
        return r

    def close(self):
        if self.c is not None:
            self.c.close()
            self.c = None


def run_load(port, total, threads, headers=None, body=None, pace=0.0, deadline=30.0,
             on_result=None):
    """Sends `total` chat requests from `threads` keep-alive clients (request i goes to thread
    i % threads). headers/body: a value, or a function of the request number. pace: pause
    between two requests of one thread. Stops at the deadline (the unsent requests are missing
    from the result). Returns the Results sorted by request number."""
    results = []
    lock = threading.Lock()
    end = time.monotonic() + deadline

    def worker(k):
        cl = Client(port)
        try:
            for i in range(k, total, threads):
                if time.monotonic() >= end:
                    return
                h = headers(i) if callable(headers) else headers
                b = body(i) if callable(body) else body
                r = cl.chat(b, h, i)
                with lock:
                    results.append(r)
                if on_result:
                    on_result(r)
                if pace:
                    time.sleep(pace)
        finally:
            cl.close()

    ts = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(max(0.1, end - time.monotonic() + 5))
    check(not any(t.is_alive() for t in ts), f"load clients still running after {deadline}s")
    results.sort(key=lambda r: r.i)
    return results


def parallel(port, n, headers=None, body=None, timeout=10.0):
    """n requests at once, each on its own connection, released together. Returns Results."""
    results = [None] * n
    gate = threading.Barrier(n)

    def one(i):
        cl = Client(port, timeout=timeout)
        try:
            gate.wait(5)
            h = headers(i) if callable(headers) else headers
            b = body(i) if callable(body) else body
            results[i] = cl.chat(b, h, i)
        finally:
            cl.close()

    ts = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout + 6)
    check(all(r is not None for r in results), f"parallel requests did not finish: {results}")
    return results


def by_name(results):
    """{x-mock-name: count} of the answered requests."""
    out = {}
    for r in results:
        out[r.name] = out.get(r.name, 0) + 1
    return out


def failed(results, ok=(200,)):
    return [r for r in results if r.error or r.status not in ok]


def chats(mock):
    """Chat completions the mock has answered normally so far (an injected x-mock-status or
    --status fault is not counted here: see live())."""
    return mock.stats()["chat_completions"]


def live(mock):
    """Requests other than /mock/* the mock has received so far, faulted ones included: the
    live traffic when the pool checks /mock/stats (CHECK_MOCK_STATS) or not at all."""
    return mock.stats()["requests"]


mock_requests = live


def wait_backend(gw, name, pred, timeout, what):
    """Polls `show backends --json` until pred(record of `name`) is true; returns the record.
    On timeout fails with the last record seen."""
    last = [None]
    deadline = time.monotonic() + timeout
    while True:
        try:
            rec = gw.backend(name)
            last[0] = rec
            if pred(rec):
                return rec
        except (Fail, OSError, ValueError, KeyError, TypeError):
            pass
        if time.monotonic() >= deadline:
            raise Fail(f"timed out after {timeout:.1f}s waiting for backend {name}: {what}; "
                       f"last show backends record: {last[0]}")
        time.sleep(0.015)


def backend_rec(gw, name):
    return gw.backend(name)


def sse_events(body):
    """[(event name or None, data string)] of an SSE body."""
    out = []
    text = body.decode("utf-8", "replace").replace("\r\n", "\n")
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        ev, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                ev = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        out.append((ev, "\n".join(data)))
    return out


def sse_error_event(body):
    """The data JSON of the `event: error` of an SSE body, or None."""
    for ev, data in sse_events(body):
        if ev == "error":
            try:
                return json.loads(data)
            except ValueError:
                raise Fail(f"event: error data is not JSON: {data[:300]!r}")
    return None


def log_has(gw, *words):
    """A line of the gateway log containing every word."""
    for line in gw.proc.log_text().splitlines():
        if all(w in line for w in words):
            return line
    return None


def summary(results, n=3):
    """A short description of the first failed results, for a failure message."""
    bad = failed(results)
    return f"{len(bad)} of {len(results)} failed; first: {bad[:n]}"
