"""Resilience (issue 3, points 2-8): DEGRADED and check cadence, passive detection, the circuit
breaker, retries, 429 cooling, stream failures after the first byte, and the x-aigw-* headers
and show backends fields. Each test asserts what the client receives and what
`aigwctl show backends --json` reports."""

import time

from harness import assert_openai_error, build_request, chat, chat_body, check
from resil_util import (
    CHECK_MOCK_STATS,
    Client,
    by_name,
    failed,
    live,
    log_has,
    mock_requests,
    parallel,
    pool,
    run_load,
    sse_error_event,
    summary,
    wait_backend,
)

# ---------------------------------------------------------------------------------------------
# 2. health states


def test_degraded_slow_checks(env):
    a = env.mock("a", "--delay", "150ms")
    b = env.mock("b")
    gw = env.gateway([("a", a, {"weight": 10}), ("b", b, {"weight": 10})], workers=2,
                     pool=pool(check_interval="100ms", check_timeout="1s",
                               degraded_latency="60ms", degraded_weight_pct="30%"))
    rec = wait_backend(gw, "a", lambda r: r["state"] == "DEGRADED", 4,
                       "DEGRADED (checks take 150 ms, degraded_latency 60ms)")
    check(rec["reason"] == "check slow", f"DEGRADED reason {rec['reason']!r}, expected "
          f"'check slow': {rec}")
    rec = wait_backend(gw, "a", lambda r: r["weight"] == 3, 1,
                       "effective weight 3 (30% of 10)")
    check(rec["weight_cfg"] == 10, f"weight_cfg changed: {rec}")
    rb = gw.backend("b")
    check(rb["state"] == "UP" and rb["weight"] == 10, f"fast backend b: {rb}")
    check(log_has(gw, "a", "DEGRADED"), "no log line says a is DEGRADED")
    # still serving, at its reduced share: 3 of every 13 requests
    res = run_load(gw.port, 130, 8, body=chat_body("degraded"))
    check(not failed(res), summary(res))
    share = by_name(res).get("a", 0) / len(res)
    check(0.12 <= share <= 0.32, f"DEGRADED a (weight 3 vs 10) got {share:.0%} of 130 requests: "
          f"{by_name(res)} (expected ~23%)")


def test_degraded_error_ratio(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([("a", a, {"weight": 4}), b], workers=2,
                     pool=pool(balance="first", degraded_error_ratio="30%"))
    # the error ratio counts outcomes from the health checker's first snapshot of the totals:
    # let it run (a first check done, a few 25 ms evaluations) before the traffic
    wait_backend(gw, "a", lambda r: r["check_status"] is not None, 2, "a first check")
    time.sleep(0.1)
    for i in range(20):
        h = {"x-mock-status": "500"} if i % 2 else {}
        r = chat(gw.port, chat_body(f"ratio {i}"), headers=h)
        check(r.status == (500 if i % 2 else 200) and r.header("x-mock-name") == "a",
              f"request {i} (balance first, retries 0): {r!r}")
    rec = wait_backend(gw, "a", lambda r: r["state"] == "DEGRADED", 2,
                       "DEGRADED (10 of 20 live requests failed, degraded_error_ratio 30%)")
    check(rec["reason"] == "error ratio", f"DEGRADED reason {rec['reason']!r}: {rec}")
    check(rec["weight"] == 2 and rec["weight_cfg"] == 4,
          f"DEGRADED weight should be 50% (default degraded_weight_pct) of 4: {rec}")
    check(rec["failures"] == 10, f"failures counted {rec['failures']}, expected 10: {rec}")
    check(gw.backend("b")["state"] == "UP", f"b: {gw.backend('b')}")


def test_check_cadence_fastinter_downinter(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=1,
                     pool=pool(check_interval="1500ms", check_fastinter="100ms",
                               check_downinter="400ms", check_timeout="300ms", fall=3, rise=3))
    time.sleep(0.2)
    # fall: the first failed check comes within one interval (<= 1.65 s with jitter), the next
    # two at fastinter; at check_interval they would take 2 x 1.35 s more
    a.kill()
    t0 = time.monotonic()
    gw.wait_state("a", "DOWN", 6)
    dt = time.monotonic() - t0
    check(dt < 2.5, f"fall = 3 took {dt:.2f}s with check_interval 1500ms, check_fastinter 100ms "
          f"(expected <= 1.65 + 0.2 s; without fastinter >= 2.7 s)")
    # DOWN with checks failing (500): checks at check_downinter (400 ms) - about 3 in 1.2 s
    a.args = ["--status", "500"]
    a.start(same_port=True)
    time.sleep(0.5)
    n0 = mock_requests(a)
    time.sleep(1.2)
    n = mock_requests(a) - n0
    check(2 <= n <= 5, f"{n} checks in 1.2 s while DOWN with check_downinter 400ms "
          f"(check_interval 1500ms, fastinter 100ms): expected 2..5")
    check(gw.backend("a")["state"] == "DOWN", f"a: {gw.backend('a')}")
    # rise: the first passing check at downinter, the next two at fastinter
    a.kill()
    a.args = []
    a.start(same_port=True)
    t0 = time.monotonic()
    gw.wait_state("a", "UP", 5)
    dt = time.monotonic() - t0
    check(dt < 1.5, f"rise = 3 took {dt:.2f}s (downinter 400ms then fastinter 100ms: expected "
          f"<= 0.65 s; at check_interval it would be >= 2.7 s)")


# ---------------------------------------------------------------------------------------------
# 3. passive detection


def test_passive_down_checks_on(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2,
                     pool=pool(CHECK_MOCK_STATS, balance="first", max_fails=3, fail_timeout="2s",
                               check_interval="200ms", check_downinter="1s", rise=2))
    for i in range(3):
        r = chat(gw.port, chat_body(f"fail {i}"), headers={"x-mock-status": "500"})
        check(r.status == 500 and r.header("x-mock-name") == "a", f"failing request {i}: {r!r}")
    rec = wait_backend(gw, "a", lambda r: r["state"] == "DOWN", 1.5,
                       "DOWN after max_fails 3 live 500s within fail_timeout")
    t_down = time.monotonic()
    check(rec["reason"] == "passive", f"DOWN reason {rec['reason']!r}, expected 'passive': {rec}")
    line = log_has(gw, "a", "DOWN", "passive")
    check(line, "no log line says a is DOWN for a passive reason")
    # while DOWN, live traffic goes elsewhere. The way back is the checks (rise 2, the first at
    # check_downinter 1s), never a live trial: requests for 0.6 s all go to b
    c0 = live(a)
    cl = Client(gw.port)
    try:
        while time.monotonic() - t_down < 0.6:
            r = cl.chat(chat_body("while down"))
            check(r.status == 200 and r.name == "b", f"request while a is DOWN: {r}; a: "
                  f"{gw.backend('a')}")
            time.sleep(0.02)
    finally:
        cl.close()
    check(live(a) == c0, f"a got {live(a) - c0} live requests while passively DOWN with "
          f"checks on")
    rec = wait_backend(gw, "a", lambda r: r["state"] == "UP", 4,
                       "UP again after its checks pass (check_downinter 1s, rise 2)")
    check(rec["reason"] == "check passed", f"a back UP with reason {rec['reason']!r}, expected "
          f"'check passed': {rec}")
    r = chat(gw.port, chat_body("back"))
    check(r.status == 200 and r.header("x-mock-name") == "a", f"after recovery: {r!r}")


def test_passive_down_checks_off_live_recovery(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2,
                     pool=pool(balance="first", check="no", max_fails=2, fail_timeout="1s"))
    for i in range(2):
        r = chat(gw.port, chat_body(f"fail {i}"), headers={"x-mock-status": "502"})
        check(r.status == 502 and r.header("x-mock-name") == "a", f"failing request {i}: {r!r}")
    rec = wait_backend(gw, "a", lambda r: r["state"] == "DOWN", 1.5,
                       "DOWN after max_fails 2 live failures")
    t_down = time.monotonic()
    check(rec["reason"] == "passive", f"DOWN reason {rec['reason']!r}: {rec}")
    # before fail_timeout: nothing to a; after it, one live request goes to a and brings it back
    cl = Client(gw.port)
    first_a = None
    try:
        while time.monotonic() - t_down < 3:
            r = cl.chat(chat_body("probe"))
            check(r.status == 200, f"request while a is passively DOWN: {r}")
            if r.name == "a":
                first_a = time.monotonic() - t_down
                break
            time.sleep(0.03)
    finally:
        cl.close()
    check(first_a is not None, f"no live request reached a within 3 s of its passive DOWN "
          f"(fail_timeout 1s, checks off): {gw.backend('a')}")
    check(first_a >= 0.9, f"a got a live request {first_a:.2f}s after its passive DOWN, before "
          f"fail_timeout (1s)")
    rec = wait_backend(gw, "a", lambda r: r["state"] == "UP", 1, "UP after a live success")
    check(rec["reason"] == "live request ok", f"UP reason {rec['reason']!r}: {rec}")


def test_client_4xx_not_a_failure(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2,
                     pool=pool(CHECK_MOCK_STATS, balance="first", max_fails=2, breaker_failures=2,
                               retries=1))
    for i in range(6):
        r = chat(gw.port, chat_body(f"bad {i}"), headers={"x-mock-status": "400"})
        check(r.status == 400 and r.header("x-mock-name") == "a",
              f"client error {i} should pass through from a unretried: {r!r}")
    time.sleep(0.2)
    rec = gw.backend("a")
    check(rec["state"] == "UP" and rec["failures"] == 0 and rec["breaker"] == "closed",
          f"6 client 400s counted against a: {rec}")
    check(live(b) == 0, f"a 400 was retried on b ({live(b)} requests)")


def test_upstream_401_auth_down(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2,
                     pool=pool(balance="first", check="no", fail_timeout="10s"))
    r = chat(gw.port, chat_body("auth"), headers={"x-mock-status": "401"})
    check(r.status in (401, 200), f"request answered 401 by a: {r!r}")
    rec = wait_backend(gw, "a", lambda r: r["state"] == "DOWN", 1.5,
                       "DOWN after the upstream answered 401")
    check(rec["reason"] == "auth", f"DOWN reason {rec['reason']!r}, expected 'auth': {rec}")
    check(log_has(gw, "a", "auth"), "the log does not say a is DOWN for auth")
    c0 = live(a)
    for i in range(5):
        r = chat(gw.port, chat_body(f"after {i}"))
        check(r.status == 200 and r.header("x-mock-name") == "b", f"after auth DOWN: {r!r}")
    check(live(a) == c0, "a still got requests after its auth DOWN")


# ---------------------------------------------------------------------------------------------
# 4. circuit breaker

BREAKER = dict(breaker_failures=3, breaker_half_open_calls=1, breaker_successes=2)


def _trip(gw, n=3):
    for i in range(n):
        r = chat(gw.port, chat_body(f"trip {i}"), headers={"x-mock-status": "500"})
        check(r.status == 500 and r.header("x-mock-name") == "a", f"tripping request {i}: {r!r}")


def test_breaker_open_half_open_close(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2,
                     pool=pool(BREAKER, CHECK_MOCK_STATS, balance="first", breaker_open_for="800ms",
                               breaker_open_max="5s"))
    _trip(gw)
    rec = wait_backend(gw, "a", lambda r: r["breaker"] == "open", 1,
                       "breaker open after 3 consecutive failures")
    check(0 < rec["breaker_left_ms"] <= 800, f"breaker_left_ms of a fresh open: {rec}")
    check(rec["state"] == "UP", f"an open breaker is not a DOWN state: {rec}")
    check(log_has(gw, "a", "breaker open"), "no log line says a's breaker opened")
    # open: nothing reaches a (requests for at most 0.4 s of the 0.8 s open period)
    c0 = live(a)
    t_open = time.monotonic()
    for i in range(6):
        if i and time.monotonic() - t_open > 0.4:
            break
        r = chat(gw.port, chat_body(f"open {i}"))
        check(r.status == 200 and r.header("x-mock-name") == "b",
              f"request {i} while a's breaker is open: {r!r}; a: {gw.backend('a')}")
    check(live(a) == c0, f"{live(a) - c0} requests reached a while its breaker was open")
    rec = wait_backend(gw, "a", lambda r: r["breaker"] == "half-open", 1.5,
                       "half-open after breaker_open_for 800ms")
    # half-open: at most one trial in flight (breaker_half_open_calls 1)
    c0 = live(a)
    res = parallel(gw.port, 6, headers={"x-mock-delay": "300ms"})
    check(not failed(res), f"requests while half-open: {summary(res)}")
    trials = live(a) - c0
    check(trials == 1, f"6 parallel 300 ms requests while half-open (half_open_calls 1): {trials} "
          f"reached a, expected exactly 1 ({by_name(res)})")
    # breaker_successes 2: one more success closes it
    cl = Client(gw.port)
    try:
        deadline = time.monotonic() + 2
        while gw.backend("a")["breaker"] != "closed":
            check(time.monotonic() < deadline, f"breaker not closed after trial successes: "
                  f"{gw.backend('a')}")
            r = cl.chat(chat_body("trial"))
            check(r.status == 200, f"trial: {r}")
            time.sleep(0.03)
    finally:
        cl.close()
    r = chat(gw.port, chat_body("closed"))
    check(r.status == 200 and r.header("x-mock-name") == "a", f"after the breaker closed: {r!r}")


def test_breaker_failed_trial_doubles_open_time(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2,
                     pool=pool(BREAKER, CHECK_MOCK_STATS, balance="first", breaker_open_for="300ms",
                               breaker_open_max="1s"))
    _trip(gw)
    rec = wait_backend(gw, "a", lambda r: r["breaker"] == "open", 1, "open")
    check(rec["breaker_left_ms"] <= 300, f"first open period: {rec}")
    lefts = []
    for step in range(3):
        wait_backend(gw, "a", lambda r: r["breaker"] == "half-open", 2, f"half-open ({step})")
        # a failing trial (the only request a takes while half-open)
        deadline = time.monotonic() + 2
        while True:
            r = chat(gw.port, chat_body(f"bad trial {step}"), headers={"x-mock-status": "500"})
            if r.header("x-mock-name") == "a":
                check(r.status == 500, f"trial {step}: {r!r}")
                break
            check(time.monotonic() < deadline, f"no trial request reached a while half-open: "
                  f"{gw.backend('a')}")
        rec = wait_backend(gw, "a", lambda r: r["breaker"] == "open", 1,
                           f"open again after failed trial {step}")
        lefts.append(rec["breaker_left_ms"])
    check(400 < lefts[0] <= 600, f"open time after the first failed trial: {lefts[0]} ms left, "
          f"expected the doubled 600 ms (breaker_open_for 300ms); all {lefts}")
    check(700 < lefts[1] <= 1000, f"after the second failed trial: {lefts[1]} ms left, expected "
          f"1200 capped at breaker_open_max 1s; all {lefts}")
    check(700 < lefts[2] <= 1000, f"after the third failed trial: {lefts[2]} ms left, expected "
          f"the cap 1000; all {lefts}")


def test_breaker_operator_commands(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2,
                     pool=pool(BREAKER, CHECK_MOCK_STATS, balance="first", breaker_open_for="5s",
                               breaker_open_max="10s"))
    r = gw.ctl("breaker", "open", "a")
    check(r.returncode == 0, f"aigwctl breaker open a: exit {r.returncode}: {r.stderr.strip()}")
    rec = wait_backend(gw, "a", lambda r: r["breaker"] == "open", 1, "open by the operator")
    check(0 < rec["breaker_left_ms"] <= 5000, f"forced open: {rec}")
    c0 = live(a)
    for i in range(5):
        r = chat(gw.port, chat_body(f"forced {i}"))
        check(r.status == 200 and r.header("x-mock-name") == "b", f"while forced open: {r!r}")
    check(live(a) == c0, "requests reached a while its breaker was forced open")
    r = gw.ctl("breaker", "reset", "a")
    check(r.returncode == 0, f"aigwctl breaker reset a: exit {r.returncode}: {r.stderr.strip()}")
    wait_backend(gw, "a", lambda r: r["breaker"] == "closed" and r["breaker_left_ms"] == 0, 1,
                 "closed by the operator")
    r = chat(gw.port, chat_body("reset"))
    check(r.status == 200 and r.header("x-mock-name") == "a", f"after breaker reset: {r!r}")
    # a failure-opened breaker is reset the same way
    _trip(gw)
    wait_backend(gw, "a", lambda r: r["breaker"] == "open", 1, "open after failures")
    check(gw.ctl("breaker", "reset", "a").returncode == 0, "breaker reset")
    wait_backend(gw, "a", lambda r: r["breaker"] == "closed", 1, "closed after reset")
    r = gw.ctl("breaker", "open", "nosuch")
    check(r.returncode != 0 and "nosuch" in r.stdout + r.stderr,
          f"breaker open of an unknown backend: exit {r.returncode}, stdout {r.stdout!r}, "
          f"stderr {r.stderr!r} (expected a failure naming the backend)")


# ---------------------------------------------------------------------------------------------
# 5. retries


def test_retry_500_on_other_backend(env):
    a = env.mock("a", "--status", "500")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2, pool=pool(CHECK_MOCK_STATS, balance="first", retries=1))
    for i in range(3):
        r = chat(gw.port, chat_body(f"retry {i}"))
        check(r.status == 200 and r.header("x-mock-name") == "b",
              f"a answers 500, retries 1: the client should get b's 200, got {r!r}")
        check(r.header("x-aigw-attempts") == "2" and r.header("x-aigw-backend") == "b",
              f"x-aigw-attempts {r.header('x-aigw-attempts')!r} (expected '2'), x-aigw-backend "
              f"{r.header('x-aigw-backend')!r} (expected 'b')")
    check(live(a) == 3 and live(b) == 3, f"upstream requests a {live(a)}, b {live(b)}")
    ra = gw.backend("a")
    check(ra["retries"] >= 3 or gw.backend("b")["retries"] >= 3,
          f"retries not counted in show backends: a {ra}, b {gw.backend('b')}")
    check(ra["failures"] == 3, f"a's 500s not counted as failures: {ra}")


def test_retry_on_without_5xx(env):
    a = env.mock("a", "--status", "500")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2,
                     pool=pool(CHECK_MOCK_STATS, balance="first", retries=1,
                               retry_on="connect-failure timeout reset"))
    r = chat(gw.port)
    check(r.status == 500 and r.header("x-mock-name") == "a",
          f"retry_on without 5xx: the client should get a's 500, got {r!r}")
    check(r.header("x-aigw-attempts") == "1", f"x-aigw-attempts {r.header('x-aigw-attempts')!r}")
    check(live(b) == 0, "the 500 was retried on b")


def test_retry_never_same_backend_twice(env):
    ms = [env.mock(n) for n in ("a", "b", "c")]
    gw = env.gateway(ms, workers=2,
                     pool=pool(CHECK_MOCK_STATS, retries=5, retry_backoff="1ms..5ms x2"))
    for i in range(3):
        before = [live(m) for m in ms]
        r = chat(gw.port, chat_body(f"all fail {i}"), headers={"x-mock-status": "503"})
        after = [live(m) for m in ms]
        delta = [x - y for x, y in zip(after, before)]
        check(r.status == 503, f"every backend answers 503: the client should get a 503, got "
              f"{r!r}")
        check(delta == [1, 1, 1], f"retries 5 over 3 failing backends: requests per backend "
              f"{delta}, expected [1, 1, 1] (never the same backend twice)")
        check(r.header("x-aigw-attempts") == "3", f"x-aigw-attempts "
              f"{r.header('x-aigw-attempts')!r}, expected '3'")


def test_retry_budget_zero_no_retry(env):
    a = env.mock("a", "--status", "500")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2,
                     pool=pool(CHECK_MOCK_STATS, balance="first", retries=1, retry_budget="0%",
                               retry_budget_min=0))
    for i in range(5):
        r = chat(gw.port, chat_body(f"budget {i}"))
        check(r.status == 500 and r.header("x-mock-name") == "a",
              f"retry_budget 0% and retry_budget_min 0: request {i} should get a's 500 "
              f"unretried, got {r!r}")
    check(live(b) == 0, f"{live(b)} retries went to b with a zero retry budget")


def test_try_timeout_retried_elsewhere(env):
    a = env.mock("a", "--delay", "3s")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2,
                     pool=pool(CHECK_MOCK_STATS, balance="first", retries=1,
                               try_timeout="300ms", first_byte_timeout="10s"))
    t0 = time.monotonic()
    r = chat(gw.port)
    dt = time.monotonic() - t0
    check(r.status == 200 and r.header("x-mock-name") == "b",
          f"a answers after 3 s, try_timeout 300ms: the client should get b's 200, got {r!r}")
    check(0.25 <= dt < 1.5, f"answer after {dt:.2f}s (try_timeout 300ms)")
    check(r.header("x-aigw-attempts") == "2", f"x-aigw-attempts {r.header('x-aigw-attempts')!r}")


def test_request_timeout_504(env):
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2,
                     pool=pool(retries=1, request_timeout="700ms", first_byte_timeout="10s"))
    t0 = time.monotonic()
    r = chat(gw.port, headers={"x-mock-delay": "3s"})
    dt = time.monotonic() - t0
    assert_openai_error(r, 504)
    check(0.6 <= dt < 1.6, f"504 after {dt:.2f}s with request_timeout 700ms")


def test_no_retry_after_first_byte(env):
    a = env.mock("a", "--chunks", 8, "--chunk-interval", "20ms")
    b = env.mock("b", "--chunks", 8, "--chunk-interval", "20ms")
    gw = env.gateway([a, b], workers=2, pool=pool(retries=2, check="no"))
    for i in range(2):
        before = live(a) + live(b)
        c = env.conn(gw.port, timeout=5)
        c.send(build_request("POST", "/v1/chat/completions",
                             [("Content-Type", "application/json"), ("x-mock-reset-after", "300")],
                             chat_body(f"cut {i}", stream=True)))
        r = c.read_head()
        check(r.status == 200, f"stream cut after 300 bytes: status {r.status}: {r!r}")
        try:
            c.read_body(r)
        except (AssertionError, OSError):
            pass  # how the stream ends is test_stream_reset_mid_stream_error_event's business
        c.close()
        total = live(a) + live(b) - before
        check(total == 1, f"upstream reset after the first byte reached the client: {total} "
              f"upstream requests, expected 1 (no retry once bytes were sent)")


# ---------------------------------------------------------------------------------------------
# 6. 429 from upstream


def test_429_cooling_and_failover(env):
    a = env.mock("a", "--status", "429", "--retry-after", "2")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2,
                     pool=pool(CHECK_MOCK_STATS, balance="first", retries=1, max_fails=1,
                               breaker_failures=1))
    r = chat(gw.port)
    check(r.status == 200 and r.header("x-mock-name") == "b",
          f"a answers 429 Retry-After 2: the request should succeed on b, got {r!r}")
    rec = gw.backend("a")
    check(0 < rec["cooling_ms"] <= 2000, f"a's cooling_ms after a 429 with Retry-After 2: {rec}")
    check(rec["state"] == "UP" and rec["breaker"] == "closed" and rec["failures"] == 0,
          f"a 429 is not a failure (max_fails 1, breaker_failures 1): {rec}")
    c0 = live(a)
    t0 = time.monotonic()
    res = run_load(gw.port, 20, 2, body=chat_body("cooling"), deadline=1.0)
    check(res and not failed(res) and set(by_name(res)) == {"b"},
          f"while a is cooling: {by_name(res)}; {summary(res)}")
    check(live(a) == c0 or time.monotonic() - t0 > 1.8,
          f"{live(a) - c0} requests went to a while it was cooling")
    rec = wait_backend(gw, "a", lambda r: r["cooling_ms"] == 0, 2.5, "cooling over")
    r = chat(gw.port, chat_body("after cooling"))
    check(live(a) == c0 + 1, f"a got no request after its cooling ended: {r!r}")


def test_429_retry_after_http_date(env):
    a = env.mock("a", "--status", "429")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2, pool=pool(CHECK_MOCK_STATS, balance="first", retries=1))
    r = chat(gw.port, headers={"x-mock-retry-after-date": "3"})
    check(r.status == 200 and r.header("x-mock-name") == "b", f"429 then b: {r!r}")
    rec = gw.backend("a")
    check(1000 < rec["cooling_ms"] <= 3000,
          f"Retry-After as an HTTP date 3 s ahead: a's cooling_ms should be 2000..3000: {rec}")


def test_429_ratelimit_reset_header(env):
    a = env.mock("a", "--status", "429")
    b = env.mock("b")
    gw = env.gateway([a, b], workers=2, pool=pool(CHECK_MOCK_STATS, balance="first", retries=1))
    r = chat(gw.port, headers={"x-mock-ratelimit-reset": "2500ms"})
    check(r.status == 200 and r.header("x-mock-name") == "b", f"429 then b: {r!r}")
    rec = gw.backend("a")
    check(2000 < rec["cooling_ms"] <= 2500,
          f"x-ratelimit-reset-requests: 2500ms: a's cooling_ms should be 2000..2500: {rec}")


def test_429_every_backend_cooling(env):
    a = env.mock("a", "--status", "429", "--retry-after", "2")
    b = env.mock("b", "--status", "429", "--retry-after", "5")
    gw = env.gateway([a, b], workers=2, pool=pool(CHECK_MOCK_STATS, retries=1))
    r = chat(gw.port)
    check(r.status == 429, f"both backends answer 429: the client should get 429, got {r!r}")
    wait_backend(gw, "a", lambda r: r["cooling_ms"] > 0, 1, "cooling")
    wait_backend(gw, "b", lambda r: r["cooling_ms"] > 0, 1, "cooling")
    c0 = live(a) + live(b)
    for i in range(3):
        r = chat(gw.port, chat_body(f"all cooling {i}"))
        assert_openai_error(r, 429)
        ra = r.header("retry-after")
        check(ra is not None and ra.isdigit() and 1 <= int(ra) <= 2,
              f"every backend cooling (a 2 s, b 5 s): Retry-After {ra!r}, expected the smallest "
              f"remaining in whole seconds, 1..2")
    check(live(a) + live(b) == c0, "requests reached a cooling backend")


# ---------------------------------------------------------------------------------------------
# 7. streams


def test_stream_first_byte_timeout_failover(env):
    a = env.mock("a", "--stall")
    b = env.mock("b", "--chunks", 4, "--chunk-interval", "10ms")
    gw = env.gateway([a, b], workers=2,
                     pool=pool(CHECK_MOCK_STATS, balance="first", retries=1,
                               first_byte_timeout="300ms"))
    t0 = time.monotonic()
    r = chat(gw.port, chat_body("stall", stream=True))
    dt = time.monotonic() - t0
    check(r.status == 200 and r.header("x-mock-name") == "b",
          f"a sends no head within first_byte_timeout 300ms: the stream should come from b, "
          f"got {r!r}")
    check(r.body.rstrip().endswith(b"data: [DONE]"), f"b's stream incomplete: {r.body[-200:]!r}")
    check(0.25 <= dt < 2, f"stream answered after {dt:.2f}s")
    check(r.header("x-aigw-attempts") == "2", f"x-aigw-attempts {r.header('x-aigw-attempts')!r}")
    rec = wait_backend(gw, "a", lambda r: r["failures"] >= 1, 1, "the timeout counted")
    check(rec["active"] == 0, f"a: {rec}")


def _stream_error_case(env, gw, mock, headers, what, max_time):
    f0 = gw.backend(mock.name)["failures"]
    c = env.conn(gw.port, timeout=8)
    c.send(build_request("POST", "/v1/chat/completions",
                         [("Content-Type", "application/json")] + list(headers.items()),
                         chat_body(what, stream=True)))
    t0 = time.monotonic()
    r = c.read_head()
    check(r.status == 200, f"{what}: head {r!r}")
    try:
        c.read_body(r)
    except AssertionError as e:
        check(False, f"{what}: the client got a 200 stream cut without an end: {e}; body so far "
              f"...{b''.join(r.parts)[-200:]!r}")
    except OSError as e:
        check(False, f"{what}: no clean end of the stream within 8 s ({e}); body so far "
              f"...{b''.join(r.parts)[-200:]!r}")
    dt = time.monotonic() - t0
    check(r.chunked, f"{what}: stream not chunked: {r.headers}")
    err = sse_error_event(r.body)
    check(err is not None, f"{what}: the stream ended cleanly but without an SSE 'event: error': "
          f"...{r.body[-300:]!r}")
    e = err.get("error") if isinstance(err, dict) else None
    check(isinstance(e, dict) and isinstance(e.get("message"), str) and e["message"]
          and isinstance(e.get("type"), str),
          f"{what}: event: error data is not an OpenAI error object: {err}")
    check(dt < max_time, f"{what}: the stream ended {dt:.2f}s after the head")
    rec = wait_backend(gw, mock.name, lambda r: r["failures"] > f0, 1,
                       f"failures to count the {what}")
    check(rec["active"] == 0, f"active after the failed stream: {rec}")
    return r


def test_stream_reset_mid_stream_error_event(env):
    a = env.mock("a", "--chunks", 8, "--chunk-interval", "20ms")
    gw = env.gateway([a], workers=2, pool=pool(check="no"))
    r = _stream_error_case(env, gw, a, {"x-mock-reset-after": "300"}, "reset mid-stream", 3)
    check(b"data: {" in r.body.split(b"event: error")[0],
          f"the chunks before the reset were not forwarded: {r.body[:300]!r}")
    check(chat(gw.port).status == 200, "request after the failed stream")


def test_stream_idle_timeout_error_event(env):
    a = env.mock("a", "--chunks", 4)
    gw = env.gateway([a], workers=2, pool=pool(check="no", stream_idle_timeout="300ms"))
    _stream_error_case(env, gw, a, {"x-mock-chunk-interval": "3s"},
                       "stall past stream_idle_timeout", 2)


# ---------------------------------------------------------------------------------------------
# 8. visibility


def test_aigw_headers(env):
    a = env.mock("a")
    gw = env.gateway([("alpha", a, {})], workers=1, pool=pool())
    for body in (chat_body("plain"), chat_body("stream", stream=True)):
        r = chat(gw.port, body)
        check(r.status == 200, f"{r!r}")
        check(r.header("x-aigw-backend") == "alpha",
              f"x-aigw-backend {r.header('x-aigw-backend')!r}, expected 'alpha'")
        check(r.header("x-aigw-attempts") == "1",
              f"x-aigw-attempts {r.header('x-aigw-attempts')!r}, expected '1'")
    gw2 = env.gateway([("alpha", a, {})], workers=1, pool=pool(expose_headers="no"), name="gw2")
    for body in (chat_body("plain"), chat_body("stream", stream=True)):
        r = chat(gw2.port, body)
        check(r.status == 200, f"{r!r}")
        leaked = [(k, v) for k, v in r.headers if k.lower().startswith("x-aigw-")]
        check(not leaked, f"expose_headers = no, yet the response carries {leaked}")


def test_show_backends_fields(env):
    a = env.mock("a", "--delay", "20ms")
    b = env.mock("b")
    gw = env.gateway([("a", a, {"weight": 7}), b], workers=2, pool=pool())
    for i in range(8):
        check(chat(gw.port, chat_body(f"f {i}")).status == 200, "request")
    # Before the failing request: a failure counts as a >= 1 s latency sample (so p2c does not
    # take a fast-failing backend for a fast one), and it may land on a.
    ra = gw.backend("a")
    check(isinstance(ra["ewma_ms"], (int, float)) and 15 <= ra["ewma_ms"] < 1000,
          f"ewma_ms of a backend answering in 20 ms: {ra}")
    chat(gw.port, chat_body("fail"), headers={"x-mock-status": "500"})
    types = {"state": str, "weight": int, "weight_cfg": int, "active": int, "breaker": str,
             "breaker_left_ms": int, "cooling_ms": int, "requests": int, "failures": int,
             "retries": int, "reason": str}
    recs = {r["name"]: r for r in gw.backends()}
    for name, rec in recs.items():
        for k, t in types.items():
            check(isinstance(rec.get(k), t), f"show backends: {name}.{k} is {rec.get(k)!r}, "
                  f"expected {t.__name__}: {rec}")
        check("ewma_ms" in rec, f"no ewma_ms in {rec}")
    ra = recs["a"]
    check(ra["weight"] == 7 and ra["weight_cfg"] == 7, f"weights: {ra}")
    check(ra["state"] == "UP" and ra["breaker"] == "closed" and ra["breaker_left_ms"] == 0
          and ra["cooling_ms"] == 0 and ra["active"] == 0, f"idle healthy backend: {ra}")
    total = ra["requests"] + recs["b"]["requests"]
    check(total == 9, f"requests over both backends {total}, expected 9: {recs}")
    check(ra["failures"] + recs["b"]["failures"] == 1, f"failures: {recs}")
    t = gw.ctl("show", "backends")
    check(t.returncode == 0, f"show backends: {t.stderr}")
    head = t.stdout.splitlines()[0] if t.stdout else ""
    for col in ("STATE", "BREAKER", "WEIGHT", "ACTIVE", "COOLING", "EWMA_MS", "FAILURES"):
        check(col in head, f"show backends table has no {col} column: {head!r}")
