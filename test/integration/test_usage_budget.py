"""Usage, cost and budgets as an operator sees them (issue 7 items 4, 5 and 7): the totals per
key, model and backend in `aigwctl show usage` / `show keys` match the traffic sent (JSON and
streams, with and without include_usage), x-aigw-cost is the cost of the answer's usage, a
stream cut by the upstream or by the client is billed once from what was delivered, and a
key's budget refuses with 429 insufficient_quota, also after a graceful restart and after a
kill -9 of the whole gateway (the state file)."""

import json
import os
import signal
import socket
import subprocess
import time
from decimal import Decimal

from harness import (AIGW, build_request, chat, chat_body, check, group_pids, key_sha256, wait_for)

KEY_A = "sk-aigw-usage-key-a-0123456789"
KEY_B = "sk-aigw-usage-key-b-9876543210"

# USD per 1M tokens, as in [model]; the cost arithmetic below is aigw's own (per request,
# in nano-USD, rounded up).
PRICES = {
    "gpt-a": {"price_input": "2.5", "price_output": "10", "list_price_input": "5",
              "list_price_output": "20"},
    "gpt-b": {"price_input": "0.15", "price_output": "0.6"},
}


def _bearer(key):
    return {"Authorization": f"Bearer {key}"}


def _cost_nano(model, prompt, completion, price="price"):
    p = PRICES[model]
    pin = Decimal(p.get(f"{price}_input", p["price_input"]))
    pout = Decimal(p.get(f"{price}_output", p["price_output"]))
    pico = prompt * pin * 10**6 + completion * pout * 10**6
    return int(-(-pico // 1000))


def _usd(nano):
    return Decimal(nano) / 10**9


def _ctl_json(gw, *args):
    r = gw.ctl(*args, "--json")
    check(r.returncode == 0, f"aigwctl {' '.join(args)}: {r.returncode} {r.stderr.strip()}")
    try:
        return json.loads(r.stdout, parse_float=Decimal)
    except ValueError as e:
        raise AssertionError(f"aigwctl {' '.join(args)}: bad JSON ({e}): {r.stdout[:300]!r}")


def _usage(gw, by):
    d = _ctl_json(gw, "show", "usage", "--by", by)
    check(d.get("by") == by, f"show usage --by {by}: {d}")
    return {e["name"]: e for e in d["entries"]}, d["total"]


def _keys(gw):
    return {k["name"]: k for k in _ctl_json(gw, "show", "keys")}


class Tally:
    """What the test sent, billed the way aigw should bill it."""

    FIELDS = ("requests", "prompt_tokens", "completion_tokens", "partial", "cost", "list")

    def __init__(self):
        self.by = {"key": {}, "model": {}, "backend": {}}

    def add(self, key, model, backend, prompt, completion, partial=0):
        row = {"requests": 1, "prompt_tokens": prompt, "completion_tokens": completion,
               "partial": partial, "cost": _cost_nano(model, prompt, completion),
               "list": _cost_nano(model, prompt, completion, "list_price")}
        for kind, name in (("key", key), ("model", model), ("backend", backend)):
            t = self.by[kind].setdefault(name, dict.fromkeys(self.FIELDS, 0))
            for f in self.FIELDS:
                t[f] += row[f]

    def check(self, gw):
        for kind, want in self.by.items():
            entries, total = _usage(gw, kind)
            tot = dict.fromkeys(self.FIELDS, 0)
            for name, w in want.items():
                got = entries.get(name)
                check(got is not None, f"show usage --by {kind}: no entry {name}: {entries}")
                have = {"requests": got["requests"], "prompt_tokens": got["prompt_tokens"],
                        "completion_tokens": got["completion_tokens"],
                        "partial": got["partial"], "cost": got["cost_usd"],
                        "list": got["list_cost_usd"]}
                exp = dict(w, cost=_usd(w["cost"]), list=_usd(w["list"]))
                check(have == exp, f"show usage --by {kind}, {name}: got {have}, want {exp}")
                check(got["saved_usd"] == max(exp["list"] - exp["cost"], 0),
                      f"{kind} {name}: saved {got['saved_usd']} != list - cost")
                for f in self.FIELDS:
                    tot[f] += w[f]
            check(total["requests"] == tot["requests"] and total["cost_usd"] == _usd(tot["cost"])
                  and total["prompt_tokens"] == tot["prompt_tokens"]
                  and total["list_cost_usd"] == _usd(tot["list"]),
                  f"show usage --by {kind}: total {total}, want {tot}")
            for name, e in entries.items():
                if name not in want:
                    check(e["requests"] == 0, f"{kind} {name} has usage the test never sent: {e}")


def _sse_usage(body):
    """The usage of the stream's usage chunk, or None."""
    for line in body.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage"' in line:
            u = json.loads(line[6:]).get("usage")
            if u:
                return u
    return None


def _two_pools(env, **kw):
    m1 = env.mock("m1", "--chunks", 4, "--chunk-interval", "0ms")
    m2 = env.mock("m2", "--chunks", 4, "--chunk-interval", "0ms")
    gw = env.gateway(
        [("b1", m1, {})], workers=2,
        pool={"models": "gpt-a", "check": "no"},
        keys={"a": {"key_sha256": key_sha256(KEY_A)}, "b": {"key_sha256": key_sha256(KEY_B)}},
        models=PRICES,
        sections=[("pool other", {"models": "gpt-b", "check": "no"}),
                  ("backend b2", {"pool": "other", "url": m2.url})], **kw)
    return m1, m2, gw


def test_usage_totals_match_traffic(env):
    m1, m2, gw = _two_pools(env)
    t = Tally()
    backend_of = {"gpt-a": "b1", "gpt-b": "b2"}
    plan = [("a", KEY_A, "gpt-a"), ("a", KEY_A, "gpt-b"), ("b", KEY_B, "gpt-a"),
            ("b", KEY_B, "gpt-a")]

    # JSON answers: the usage in the body is what is billed, and x-aigw-cost says its cost
    for i, (kname, key, model) in enumerate(plan):
        r = chat(gw.port, chat_body(f"json {i} " + "x" * (7 * i), model=model),
                 headers=_bearer(key))
        check(r.status == 200, f"{kname}/{model}: {r!r}")
        u = r.json()["usage"]
        t.add(kname, model, backend_of[model], u["prompt_tokens"], u["completion_tokens"])
        want = _usd(_cost_nano(model, u["prompt_tokens"], u["completion_tokens"]))
        got = r.header("x-aigw-cost")
        check(got is not None and Decimal(got) == want,
              f"x-aigw-cost {got!r}, the answer's usage {u} costs {want}")

    # streams whose client asked for usage: the chunk it receives is what is billed
    for i, (kname, key, model) in enumerate(plan[:3]):
        body = chat_body(f"stream {i}", stream=True, model=model,
                         stream_options={"include_usage": True})
        r = chat(gw.port, body, headers=_bearer(key))
        u = _sse_usage(r.body)
        check(r.status == 200 and u, f"{kname}/{model} stream with include_usage: {r!r}")
        t.add(kname, model, backend_of[model], u["prompt_tokens"], u["completion_tokens"])

    # streams without include_usage: aigw asks upstream and bills what the upstream counted;
    # the same body sent with include_usage straight to the mock gives that count
    for i, (kname, key, model) in enumerate(plan[1:]):
        body = chat_body(f"plain stream {i}", stream=True, model=model)
        r = chat(gw.port, body, headers=_bearer(key))
        check(r.status == 200 and b"[DONE]" in r.body and _sse_usage(r.body) is None,
              f"{kname}/{model} stream without include_usage: {r!r}")
        m = m1 if model == "gpt-a" else m2
        up = m.last()["body"].encode()
        check(json.loads(up).get("stream_options") == {"include_usage": True},
              f"upstream body {up!r}")
        u = _sse_usage(chat(m.port, up).body)
        t.add(kname, model, backend_of[model], u["prompt_tokens"], u["completion_tokens"])

    # the workers add to the totals after the answer is out: give them a moment
    wait_for(lambda: _usage(gw, "key")[1]["requests"] == 10, 5, "10 requests in show usage")
    t.check(gw)

    keys = _keys(gw)
    for kname in ("a", "b"):
        k, w = keys[kname], t.by["key"][kname]
        check(k["requests"] == w["requests"] and k["cost_usd"] == _usd(w["cost"])
              and k["tokens"] == w["prompt_tokens"] + w["completion_tokens"],
              f"show keys {kname}: {k}, want {w}")
        check(KEY_A not in json.dumps(k, default=str) and key_sha256(KEY_A) not in
              json.dumps(k, default=str), "show keys shows a key or its digest")

    # the text tables: a row per entry and the total, aligned under the header
    r = gw.ctl("show", "usage", "--by", "model")
    lines = r.stdout.splitlines()
    check(r.returncode == 0 and len(lines) == 4 and lines[0].startswith("MODEL")
          and lines[3].startswith("TOTAL"), f"show usage --by model: {r.stdout!r}")
    end = lines[0].index("COST_USD") + len("COST_USD")
    check(lines[3][:end].endswith(str(_usd(t.by["model"]["gpt-a"]["cost"] +
                                            t.by["model"]["gpt-b"]["cost"]))),
          f"TOTAL COST_USD not under its header: {r.stdout!r}")
    r = gw.ctl("show", "usage", "--by", "pool")
    check(r.returncode == 2 and "usage: show usage" in r.stderr, f"--by pool: {r!r}")
    r = gw.ctl("show", "keys")
    check(r.returncode == 0 and r.stdout.startswith("NAME") and len(r.stdout.splitlines()) == 3
          and key_sha256(KEY_B) not in r.stdout, f"show keys: {r.stdout!r}")


def _cut_and_abort(env, gw, m1):
    """One stream cut by the upstream and one the client gives up on: each billed once, marked
    partial, prompt from the reservation and completion from the delivered text."""
    body_cut = chat_body("cut me off", stream=True, model="gpt-a")
    r = chat(gw.port, body_cut, headers=dict(_bearer(KEY_A), **{"x-mock-close-after": "450"}))
    check(b"[DONE]" not in r.body and b'"content"' in r.body,
          f"the upstream cut should leave a stream with some text and no end: {r!r}")

    body_abort = chat_body("let me go", stream=True, model="gpt-a")
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    s.sendall(build_request("POST", "/v1/chat/completions",
                            [("Content-Type", "application/json"),
                             ("x-mock-chunks", "20"), ("x-mock-chunk-interval", "100ms")]
                            + list(_bearer(KEY_A).items()), body_abort))
    got = b""
    while got.count(b'"content"') < 2:
        d = s.recv(65536)
        check(d, f"the stream ended before the abort: {got!r}")
        got += d
    s.close()
    return body_cut, body_abort


def test_partial_stream_billing(env):
    m1, _, gw = _two_pools(env)
    body_cut, body_abort = _cut_and_abort(env, gw, m1)
    wait_for(lambda: _usage(gw, "key")[1]["requests"] == 2, 5, "2 requests billed")
    time.sleep(0.3)  # anything billed twice would show by now
    keys, total = _usage(gw, "key")
    a = keys["a"]
    check(a["requests"] == 2 and a["partial"] == 2, f"cut + abort: {a}")
    want_prompt = (len(body_cut) + 2) // 3 + (len(body_abort) + 2) // 3
    check(a["prompt_tokens"] == want_prompt,
          f"prompt {a['prompt_tokens']}, want the reservations' {want_prompt}")
    # each delivered some text: at least one token each, never zero
    check(a["completion_tokens"] >= 2, f"completion {a['completion_tokens']}")
    check(a["cost_usd"] > 0 and keys["b"]["requests"] == 0, f"{a} / {keys['b']}")
    models, _ = _usage(gw, "model")
    check(models["gpt-a"]["partial"] == 2 and models["gpt-a"]["requests"] == 2,
          f"by model: {models}")
    backends, _ = _usage(gw, "backend")
    check(backends["b1"]["partial"] == 2, f"by backend: {backends}")
    k = _keys(gw)["a"]
    check(k["requests"] == 2 and k["cost_usd"] == a["cost_usd"], f"show keys: {k}")


# A budget a few requests spend: each of these asks for 16 tokens at most (reserved at
# 1 USD per 1k tokens with its prompt estimate), and costs its real usage.
BUDGET_MODEL = {"gpt-a": {"price_input": "1000", "price_output": "1000"}}


def _budget_gw(env, m, state, interval="5s"):
    return env.gateway(
        [("b1", m, {})], workers=2, pool={"models": "gpt-*", "check": "no"},
        keys={"a": {"key_sha256": key_sha256(KEY_A), "budget_usd": "0.15",
                    "budget_period": "total"},
              "b": {"key_sha256": key_sha256(KEY_B)}},
        models=BUDGET_MODEL,
        glob={"state_file": state, "state_interval": interval})


def _spend_budget(gw):
    """Requests of key a until the budget refuses one; returns how many passed."""
    passed = 0
    for i in range(20):
        r = chat(gw.port, chat_body(f"budget {i}", model="gpt-a", max_tokens=16),
                 headers=_bearer(KEY_A))
        if r.status == 429:
            _insufficient_quota(r)
            return passed
        check(r.status == 200, f"request {i}: {r!r}")
        passed += 1
    raise AssertionError(f"budget_usd 0.15 never refused: {passed} requests passed")


def _insufficient_quota(r):
    check(r.status == 429, f"expected 429 insufficient_quota, got {r!r}")
    err = r.json().get("error") or {}
    check(err.get("type") == "insufficient_quota" and err.get("code") == "insufficient_quota",
          f"429 body: {r.body!r}")


def _spent(gw):
    k = _keys(gw)["a"]
    return k["spent_usd"], k


def test_budget_refuses_and_survives_restart(env):
    m = env.mock("m1")
    state = os.path.join(env.dir, "state.ini")
    gw = _budget_gw(env, m, state)
    passed = _spend_budget(gw)
    check(2 <= passed <= 6, f"{passed} requests passed a 0.15 USD budget")
    spent, k = _spent(gw)
    check(Decimal("0.1") < spent <= Decimal("0.15") and k["reserved_usd"] == 0
          and k["remaining_usd"] == Decimal("0.15") - spent and k["budget_period"] == "total",
          f"show keys after the budget ran out: {k}")
    # another key is not affected
    check(chat(gw.port, chat_body(model="gpt-a"), headers=_bearer(KEY_B)).status == 200,
          "key b refused")

    check(gw.stop() == 0, "aigw did not stop cleanly")
    check(os.path.exists(state), "no state file after a graceful stop")
    gw.start()
    spent2, k2 = _spent(gw)
    check(spent2 == spent, f"spent after the restart {spent2}, before {spent}: {k2}")
    _insufficient_quota(chat(gw.port, chat_body(model="gpt-a", max_tokens=16),
                             headers=_bearer(KEY_A)))
    u, _ = _usage(gw, "key")
    check(u["a"]["requests"] == passed and u["b"]["requests"] == 1,
          f"usage totals after the restart: {u}")


def test_budget_survives_kill_9(env):
    m = env.mock("m1")
    state = os.path.join(env.dir, "state.ini")
    gw = _budget_gw(env, m, state, interval="200ms")
    passed = _spend_budget(gw)
    spent, _ = _spent(gw)
    time.sleep(0.6)  # longer than state_interval: the spend is on disk
    pgid = gw.proc.pid
    os.killpg(pgid, signal.SIGKILL)
    gw.proc.wait(5)
    wait_for(lambda: not group_pids(pgid), 5, "every aigw process to die")
    gw.start()
    spent2, k2 = _spent(gw)
    check(spent2 >= spent, f"kill -9 lost spend: {spent2} now, {spent} before: {k2}")
    _insufficient_quota(chat(gw.port, chat_body(model="gpt-a", max_tokens=16),
                             headers=_bearer(KEY_A)))
    u, _ = _usage(gw, "key")
    check(u["a"]["requests"] == passed, f"requests after kill -9: {u['a']}, want {passed}")


def test_damaged_state_file_stops_start(env):
    """A state file aigw cannot read stops the start with FILE:LINE (budgets must not reset by
    accident); moved away, aigw starts from zero."""
    m = env.mock("m1")
    state = os.path.join(env.dir, "state.ini")
    with open(state, "w") as f:
        f.write("aigw-state 1\nsaved 1773615600\nthis line is not state\nend\n")
    gw = env.gateway(
        [("b1", m, {})], workers=1, pool={"models": "gpt-*", "check": "no"}, start=False,
        keys={"a": {"key_sha256": key_sha256(KEY_A), "budget_usd": "1"}},
        glob={"state_file": state})
    # aigw -t, as an operator's ExecStartPre or a check before a restart, says so as well
    t = subprocess.run([AIGW, "-t", "-c", gw.conf_path], capture_output=True, text=True,
                       timeout=20)
    check(t.returncode == 1 and f"{state}:3:" in t.stderr,
          f"aigw -t on a damaged state file: {t.returncode} {t.stdout!r} {t.stderr!r}")
    gw.start(wait=False)
    check(gw.proc.wait(10) not in (None, 0), "aigw started on a damaged state file")
    check(f"{state}:3:" in gw.proc.log_text(), f"no FILE:LINE: {gw.proc.log_tail(5)}")
    os.rename(state, state + ".bad")
    gw.start()
    check(_keys(gw)["a"]["spent_usd"] == 0, "spent after starting from zero")
    check(chat(gw.port, chat_body(model="gpt-a"), headers=_bearer(KEY_A)).status == 200,
          "a request after starting from zero")


def test_budget_holds_through_a_dearer_fallback(env):
    """A model whose fallback costs more: the budget holds the fallback's price at admission
    (regression: it held the primary's, so requests the fallback served spent past budget_usd)."""
    m = env.mock("m1")
    gw = env.gateway(
        [("dead", "http://127.0.0.1:1/v1", {"pool": "pa"}), ("live", m, {"pool": "pe"}),
         ("mz", env.mock("mz"), {})],
        workers=2, pool={"models": "gpt-z", "check": "no"},
        keys={"a": {"key_sha256": key_sha256(KEY_A), "budget_usd": "0.15",
                    "budget_period": "total"}},
        models={"gpt-cheap": {"price_input": "0.01", "price_output": "0.01",
                              "fallback": "gpt-dear"},
                "gpt-dear": {"price_input": "1000", "price_output": "1000"}},
        sections=[("pool pa", {"models": "gpt-cheap", "check": "no"}),
                  ("pool pe", {"models": "gpt-dear", "check": "no"})])
    passed = 0
    for i in range(20):
        r = chat(gw.port, chat_body(f"fallback {i}", model="gpt-cheap", max_tokens=16),
                 headers=_bearer(KEY_A))
        if r.status == 429:
            _insufficient_quota(r)
            break
        check(r.status == 200 and r.header("x-aigw-model") == "gpt-dear", f"request {i}: {r!r}")
        passed += 1
    check(0 < passed < 20, f"{passed} requests passed")
    spent, k = _spent(gw)
    check(spent <= Decimal("0.15"), f"{passed} requests through the dear fallback spent {spent} "
                                     f"of a 0.15 USD budget: {k}")
