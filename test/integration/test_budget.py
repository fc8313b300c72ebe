"""The retry budget bounds retries to a share of the requests, so an outage does not turn
into a retry storm; a budget of 100% retries everything."""

from harness import chat_body, check
from resil_util import CHECK_MOCK_STATS, Client, pool


def _run(env, budget):
    bad = env.mock("bad", "--status", 500)
    good = env.mock("good")
    gw = env.gateway([bad, good], workers=1,
                     pool=pool(CHECK_MOCK_STATS, retries=1, retry_on="5xx",
                               retry_backoff="0ms..0ms x1", retry_budget=budget,
                               retry_budget_min=0))
    c = Client(gw.port)
    results = [c.chat(chat_body(f"budget {i}"), i=i) for i in range(100)]
    c.close()
    retried = sum(1 for r in results if r.status == 200 and r.attempts == "2")
    failed = sum(1 for r in results if r.status == 500)
    first_try = sum(1 for r in results if r.status == 200 and r.attempts == "1")
    return retried, failed, first_try, results


def test_retry_budget_limits_retries(env):
    retried, failed, first_try, results = _run(env, "20%")
    # Half the requests land on the failing backend first; the budget lets about 20% of all
    # requests be retried, the rest get the upstream's 500.
    check(first_try >= 40, f"only {first_try} requests succeeded on the first try")
    check(5 <= retried <= 30, f"retry_budget 20%: {retried} of 100 requests were retried "
                              f"(500s passed through: {failed})")
    check(failed >= 20, f"retry_budget 20%: only {failed} failures passed through, "
                        f"{retried} retried")
    check(retried + failed + first_try == 100, f"other answers: {[r for r in results][:3]}")


def test_retry_budget_full(env):
    retried, failed, first_try, _ = _run(env, "100%")
    check(failed == 0 and retried >= 40, f"retry_budget 100%: {retried} retried, {failed} failed")
