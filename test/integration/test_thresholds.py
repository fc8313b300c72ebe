"""Passive detection and the circuit breaker under load (issue 6, A.10): a worker acts on
max_fails, breaker_failures and breaker_successes at the very request that reaches one, for every
worker at once, instead of waiting for the health checker's next evaluation. However fast the
requests come, a backend that starts failing takes the threshold's worth of them plus those
already in flight, and a half-open breaker closes after breaker_successes trial successes."""

import threading
import time

from harness import Conn, Fail, build_request, chat_body, check
from resil_util import CHAT_HEADERS, log_has, pool, wait_backend

CONNS = 8  # client connections: at most this many requests are in flight at once
DEPTH = 8  # requests pipelined on each, so that the rate is not the client's round trips


class Load:
    """Pipelined chat requests from CONNS keep-alive connections until stop()."""

    def __init__(self, port):
        self.port = port
        self.req = build_request("POST", "/v1/chat/completions", CHAT_HEADERS,
                                 chat_body("load"), host=f"127.0.0.1:{port}") * DEPTH
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.count = 0
        self.status = {}
        self.errors = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CONNS)]
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()

    def _run(self):
        c = None
        while not self.stopping.is_set():
            try:
                if c is None:
                    c = Conn(self.port, timeout=10)
                c.send(self.req)
                for _ in range(DEPTH):
                    r = c.read_response()
                    with self.lock:
                        self.count += 1
                        self.status[r.status] = self.status.get(r.status, 0) + 1
                    if (r.header("connection") or "").lower() == "close":
                        raise Fail("closed by the gateway")
            except (OSError, Fail) as e:
                with self.lock:
                    self.errors.append(str(e))
                if c is not None:
                    c.close()
                c = None
        if c is not None:
            c.close()

    def wait_count(self, n, timeout=20):
        deadline = time.monotonic() + timeout
        while self.count < n:
            check(time.monotonic() < deadline, f"load: {self.count} responses in {timeout}s")
            time.sleep(0.02)

    def rate(self):
        return self.count / max(time.monotonic() - self.t0, 0.001)

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(15)
        check(not any(t.is_alive() for t in self.threads), "load clients still running")


def _failures(gw, name):
    return gw.backend(name)["failures"]


def test_max_fails_holds_under_load(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=4,
                     pool=pool(check="no", max_fails=5, fail_timeout="30s"))
    load = Load(gw.port)
    try:
        load.wait_count(1500)
        a.kill()  # every request a takes from now on fails (reset, then refused)
        wait_backend(gw, "a", lambda r: r["state"] == "DOWN", 5, "a DOWN after max_fails 5")
        time.sleep(0.3)  # whatever was in flight ends
        n = _failures(gw, "a")
        rate = load.rate()
    finally:
        load.stop()
    check(load.count > 1500 and load.status.get(200, 0) > 1000, f"load: {load.status}")
    # the 5th failure stops the workers; only requests already sent to a can fail after it
    check(n <= 5 + CONNS, f"a took {n} failing requests with max_fails 5 at ~{rate:.0f} req/s "
          f"({CONNS} in flight at most): expected <= {5 + CONNS}")
    check(log_has(gw, "a", "DOWN", "passive"), "no log line says a is DOWN for a passive reason")


def test_breaker_thresholds_hold_under_load(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=4,
                     pool=pool(check="no", breaker_failures=5, breaker_open_for="500ms",
                               breaker_open_max="2s", breaker_half_open_calls=1,
                               breaker_successes=2))
    load = Load(gw.port)
    try:
        load.wait_count(1500)
        a.kill()
        wait_backend(gw, "a", lambda r: r["breaker"] == "open", 5,
                     "a's breaker open after breaker_failures 5")
        time.sleep(0.3)
        n = _failures(gw, "a")
        rate = load.rate()
        check(n <= 5 + CONNS, f"a took {n} failing requests with breaker_failures 5 at "
              f"~{rate:.0f} req/s ({CONNS} in flight at most): expected <= {5 + CONNS}")
        # back: half-open trials, one at a time, the second success closes it
        a.start(same_port=True)
        wait_backend(gw, "a", lambda r: r["breaker"] == "closed", 6, "a's breaker closed")
        c0 = load.count
        load.wait_count(c0 + 500)
    finally:
        load.stop()
    line = log_has(gw, "a", "breaker closed:", "succeeded")
    check(line, "no log line says a's breaker closed after trial requests")
    trials = int(line.split("breaker closed:")[1].split()[0])
    check(trials == 2, f"a's half-open breaker closed after {trials} trial successes with "
          f"breaker_successes 2 and breaker_half_open_calls 1 at ~{rate:.0f} req/s: {line!r}")
    check(gw.backend("a")["requests"] > 20, f"a takes traffic again: {gw.backend('a')}")
