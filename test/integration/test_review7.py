"""Regressions from the review of the AI layer (issue 7): lookalike endpoint paths cannot skip
the model checks, one Authorization header only, other key headers stay here, reservations
clients cannot shrink (floats, the smallest of the limits, n), a request that reached an
upstream is billed its prompt even when the client left before the answer, a fallback the key
may not use is not taken."""

import json
import socket
import time

from harness import chat, chat_body, check, free_port, key_sha256, request

KEY = "sk-review7-0123456789"
AUTH = [("Authorization", f"Bearer {KEY}")]
JSON = [("Content-Type", "application/json")]


def _err(r, status, code):
    check(r.status == status, f"expected {status}, got {r!r}")
    e = r.json()["error"]
    check(e["code"] == code, f"expected code {code}: {e}")
    return e


def test_lookalike_paths_refused(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, pool={"check": "no"},
                     keys={"k": {"key_sha256": key_sha256(KEY), "models": "cheap*"}})
    body = chat_body(model="expensive")
    _err(chat(gw.port, body, headers=AUTH), 403, "model_not_allowed")
    for path in ("/v1/chat/completions/", "/v1/Chat/completions", "/v1/chat//completions",
                 "/v1/chat/completions;x", "/v1/%63hat/completions", "/V1/embeddings",
                 "/v1/responses/", "/v1/models/"):
        r = request(gw.port, "POST", path, JSON + AUTH, body)
        _err(r, 404, "not_found")
    # another path naming a model: the key's models apply there too
    r = request(gw.port, "POST", "/v1/images/generations", JSON + AUTH,
                json.dumps({"model": "expensive", "prompt": "x"}).encode())
    _err(r, 403, "model_not_allowed")
    check(m.stats()["chat_completions"] == 0, "a refused request reached the upstream")


def test_auth_headers(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, pool={"check": "no"},
                     keys={"k": {"key_sha256": key_sha256(KEY)}})
    r = chat(gw.port, headers=AUTH + [("Authorization", "Bearer sk-other")])
    _err(r, 400, "invalid_api_key")
    r = chat(gw.port, headers=[("Authorization", "Bearer sk-other")] + AUTH)
    _err(r, 400, "invalid_api_key")
    # unauthenticated: 401 before the body is even looked at
    r = chat(gw.port, b"not json")
    _err(r, 401, "invalid_api_key")
    r = chat(gw.port, headers=AUTH + [("api-key", KEY), ("x-api-key", KEY)])
    check(r.status == 200, f"{r!r}")
    sent = json.dumps(m.last())
    check(KEY not in sent, f"a client key went upstream: {sent[:500]}")


def test_reservations_cannot_shrink(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, pool={"check": "no"},
                     keys={"k": {"key_sha256": key_sha256(KEY), "tpm": 2000}})
    for extra in ({"max_tokens": 100000.0}, {"max_tokens": "100000"},
                  {"max_tokens": 1, "max_completion_tokens": 1000000},
                  {"max_output_tokens": 0, "max_tokens": 5000},
                  {"max_tokens": 100, "n": 128}, {"max_tokens": 100, "best_of": 64}):
        r = chat(gw.port, chat_body(**extra), headers=AUTH)
        e = _err(r, 429, "rate_limit_exceeded")
        check("never" in e["message"] and r.header("retry-after") is None,
              f"{extra}: should never fit a tpm of 2000: {r!r}")
    r = chat(gw.port, chat_body(max_tokens=100, n=2), headers=AUTH)
    check(r.status == 200, f"a request that fits: {r!r}")
    check(m.stats()["chat_completions"] == 1, "a refused request reached the upstream")


def test_client_gone_before_answer_is_billed(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, pool={"check": "no"},
                     keys={"k": {"key_sha256": key_sha256(KEY)}},
                     models={"gpt-test": {"price_input": "1000000"}})
    body = chat_body("x" * 3000)
    s = socket.create_connection(("127.0.0.1", gw.port))
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nx-mock-delay: 1s\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    s.sendall(head + body)
    time.sleep(0.3)  # written upstream, no answer yet
    s.close()
    deadline = time.monotonic() + 5
    usage = None
    while time.monotonic() < deadline:
        out = json.loads(gw.ctl("show", "usage", "--json").stdout)
        usage = out["entries"][0] if out["entries"] else None
        if usage and usage["requests"] == 1:
            break
        time.sleep(0.1)
    want = -(-len(body) // 3)
    check(usage and usage["requests"] == 1 and usage["partial"] == 1
          and usage["prompt_tokens"] == want,
          f"a request the upstream got, client gone: billed {usage} (want prompt {want})")


def test_fallback_the_key_may_not_use(env):
    m2 = env.mock("m2")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    gw = env.gateway(
        [("d1", dead, {})], workers=1,
        pool={"models": "cheap*", "check": "no", "retries": 0, "max_fails": 0,
              "breaker_failures": 0},
        keys={"k": {"key_sha256": key_sha256(KEY), "models": "cheap*"}},
        models={"cheap-1": {"fallback": "expensive-1"}},
        sections=[("pool big", {"models": "expensive*", "check": "no"}),
                  ("backend b2", {"pool": "big", "url": m2.url})])
    r = chat(gw.port, chat_body(model="cheap-1"), headers=AUTH)
    check(r.status == 502, f"the fallback is a model the key may not use: {r!r}")
    check(m2.stats()["chat_completions"] == 0, "the key's request reached the fallback")
