"""Check settings against the mock (check_method HEAD, check_expect, check_path) and fail_on
deciding which live answers count toward a passive DOWN."""

import time

from harness import chat_body, check
from resil_util import CHECK_MOCK_STATS, Client, pool


def test_check_head_and_expect(env):
    """HEAD checks on /v1/models: a backend whose status is not in check_expect goes DOWN with
    reason "check status", one that matches stays UP; the mock saw HEAD requests."""
    a = env.mock("a")
    b = env.mock("b")
    gw = env.gateway([("a", a, {}), ("b", b, {})], workers=1,
                     pool=pool(check_method="HEAD", check_expect="204, 200"))
    time.sleep(0.6)
    check(gw.backend("a")["state"] == "UP", f"HEAD checks expecting 200: {gw.backend('a')}")
    last = a._get("/mock/last_check")
    check(last["method"] == "HEAD" and last["path"] == "/v1/models",
          f"the mock's last check was not a HEAD of /v1/models: {last['method']} {last['path']}")
    gw.stop()

    gw2 = env.gateway([("b", b, {})], workers=1, name="gw2",
                      pool=pool(check_method="HEAD", check_expect="204"))
    gw2.wait_state("b", "DOWN", 3)
    rec = gw2.backend("b")
    check(rec["reason"] == "check status" and rec["check_status"] == 200,
          f"check_expect 204 against a 200: {rec}")


def _five_hundreds(gw, n):
    c = Client(gw.port)
    for i in range(n):
        c.chat(chat_body(f"fail {i}"), headers={"x-mock-status": "500"}, i=i)
    c.close()


def test_fail_on_decides_passive_down(env):
    """fail_on without 5xx: upstream 500s are not failures, the backend stays UP; with 5xx
    (the default) the same traffic marks it DOWN with reason passive."""
    m = env.mock("m")
    gw = env.gateway([m], workers=1,
                     pool=pool(CHECK_MOCK_STATS, max_fails=3, fail_timeout="5s",
                               fail_on="connect-failure timeout reset"))
    _five_hundreds(gw, 6)
    time.sleep(0.3)
    rec = gw.backend("m")
    check(rec["state"] == "UP" and rec["failures"] == 0,
          f"fail_on without 5xx, 6 upstream 500s: {rec}")
    gw.stop()

    gw2 = env.gateway([m], workers=1, name="gw2",
                      pool=pool(CHECK_MOCK_STATS, max_fails=3, fail_timeout="5s",
                                check_downinter="5s"))
    _five_hundreds(gw2, 6)
    gw2.wait_state("m", "DOWN", 2)
    check(gw2.backend("m")["reason"] == "passive", f"{gw2.backend('m')}")
