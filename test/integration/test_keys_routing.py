"""Client keys and model routing (issue 7 items 1 and 2): 401/403 with OpenAI's bodies, keys
never sent upstream, expiry, the pool chosen by the body's model (globs, alias_of), 404
model_not_found, GET /v1/models from the config filtered by the key, the /v1 hint, aigw -t's
warning and aigwctl key hash."""

import json
import os
import subprocess

from harness import AIGW, AIGWCTL, chat, chat_body, check, key_sha256, request

KEY_A = "sk-aigw-test-key-a-0123456789"
KEY_B = "sk-aigw-test-key-b-9876543210"


def _bearer(key):
    return {"Authorization": f"Bearer {key}"}


def _error(r, status, code):
    check(r.status == status, f"expected {status}, got {r!r}")
    err = r.json().get("error") or {}
    check(err.get("code") == code and err.get("type") == "invalid_request_error"
          and err.get("message"), f"expected an OpenAI error with code {code}: {r.body!r}")
    return err


def test_keys_auth(env):
    m = env.mock("m1")
    keys = {"a": {"key_sha256": key_sha256(KEY_A)},
            "b": {"key": "file:b.key", "expires": "2020-01-31"}}
    with open(os.path.join(env.dir, "b.key"), "w") as f:
        f.write(KEY_B + "\n")
    gw = env.gateway([m], workers=1, keys=keys)

    r = chat(gw.port)
    err = _error(r, 401, "invalid_api_key")
    check("Authorization" in err["message"], f"no hint about the header: {err!r}")
    check((r.header("www-authenticate") or "").lower().startswith("bearer"),
          f"401 without WWW-Authenticate: Bearer: {r!r}")
    _error(chat(gw.port, headers={"Authorization": "Basic " + KEY_A}), 401, "invalid_api_key")
    err = _error(chat(gw.port, headers=_bearer(KEY_A + "x")), 401, "invalid_api_key")
    check(KEY_A not in json.dumps(err), "the error echoes the key")
    err = _error(chat(gw.port, headers=_bearer(KEY_B)), 401, "invalid_api_key")
    check("expired" in err["message"], f"expired key: {err!r}")
    check(m.stats()["chat_completions"] == 0, "a refused request reached the backend")

    r = chat(gw.port, headers=_bearer(KEY_A))
    check(r.status == 200, f"a valid key: {r!r}")
    r = chat(gw.port, headers={"authorization": f"bearer   {KEY_A} "})
    check(r.status == 200, f"scheme in any case, blanks around the key: {r!r}")
    last = json.dumps(m.last())
    check(KEY_A not in last, f"the client's aigw key went upstream: {last[:400]}")
    check(KEY_A not in open(gw.log_path).read(), "the key is in the log")


def test_routing_by_model(env):
    m1 = env.mock("m1")
    m2 = env.mock("m2")
    gw = env.gateway(
        [("b1", m1, {"model_map": "gpt-4o=gpt-4o-2024-08-06"})], workers=1,
        pool={"models": "gpt-*", "check": "no"},
        keys={"a": {"key_sha256": key_sha256(KEY_A), "models": "gpt-4o*, llama-*, fast"}},
        models={"fast": {"alias_of": "llama-3"}},
        sections=[("pool local", {"models": "llama-*, mistral", "check": "no"}),
                  ("backend b2", {"pool": "local", "url": m2.url})])
    h = _bearer(KEY_A)

    r = chat(gw.port, chat_body(model="llama-3"), headers=h)
    check(r.status == 200 and r.header("x-aigw-backend") == "b2",
          f"llama-3 should go to pool local (b2): {r!r}")
    r = chat(gw.port, chat_body(model="gpt-4o-mini"), headers=h)
    check(r.status == 200 and r.header("x-aigw-backend") == "b1",
          f"gpt-4o-mini should go to pool main (b1): {r!r}")
    body = chat_body(model="gpt-4o-mini")
    check(m1.last()["body"] == body.decode(), f"a body without renames changed: {m1.last()!r}")
    r = chat(gw.port, chat_body(model="fast"), headers=h)
    check(r.status == 200 and r.header("x-aigw-backend") == "b2",
          f"fast (alias of llama-3) should go to pool local: {r!r}")
    sent = m2.last()["body"]
    check(sent == chat_body(model="llama-3").decode(),
          f"the upstream should get the alias's model, the rest unchanged: {sent!r}")
    r = chat(gw.port, chat_body(model="gpt-4o"), headers=h)
    check(r.status == 200 and json.loads(m1.last()["body"])["model"] == "gpt-4o-2024-08-06",
          f"model_map: b1 should get gpt-4o-2024-08-06: {m1.last()['body']!r}")
    err = _error(chat(gw.port, chat_body(model="claude-3"), headers=h), 404, "model_not_found")
    check("claude-3" in err["message"], f"404 does not name the model: {err!r}")
    err = _error(chat(gw.port, chat_body(model="mistral"), headers=h), 403, "model_not_allowed")
    check("mistral" in err["message"], f"403 does not name the model: {err!r}")
    _error(chat(gw.port, b'{"messages":[]}', headers=h), 400, "missing_model")
    r = request(gw.port, "POST", "/v1/embeddings", [("Content-Type", "application/json")]
                + list(h.items()), json.dumps({"model": "nope", "input": "x"}).encode())
    _error(r, 404, "model_not_found")

    # the models list: [model] sections and literal names of pools' models, filtered by key
    r = request(gw.port, "GET", "/v1/models", list(h.items()))
    check(r.status == 200, f"GET /v1/models: {r!r}")
    ids = [d["id"] for d in r.json()["data"]]
    check(ids == ["fast"], f"models for key a: {ids}")
    check(all(d["object"] == "model" and isinstance(d["created"], int) for d in r.json()["data"]),
          f"model objects: {r.body!r}")
    check(m1.stats()["models"] == 0 and m2.stats()["models"] == 0,
          "GET /v1/models reached a backend")
    r = request(gw.port, "GET", "/v1/models/fast", list(h.items()))
    check(r.status == 200 and r.json()["id"] == "fast", f"GET /v1/models/fast: {r!r}")
    _error(request(gw.port, "GET", "/v1/models/mistral", list(h.items())), 404, "model_not_found")
    _error(request(gw.port, "GET", "/v1/models", []), 401, "invalid_api_key")


def test_models_list_all(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, pool={"models": "gpt-test, gpt-4o*, o1", "check": "no"},
                     models={"fast": {"alias_of": "gpt-test"}, "o1": {"price_input": "15"}})
    r = request(gw.port, "GET", "/v1/models", [])
    ids = [d["id"] for d in r.json()["data"]]
    check(ids == ["fast", "o1", "gpt-test"], f"models without keys: {ids}")
    r = request(gw.port, "HEAD", "/v1/models", [])
    check(r.status == 200 and r.body == b"", f"HEAD /v1/models: {r!r}")


def test_no_routing_forwards_models(env):
    """A config naming no model keeps forwarding /v1/models and every model to its pool."""
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, pool={"check": "no"})
    r = request(gw.port, "GET", "/v1/models", [])
    check(r.status == 200 and m.stats()["models"] == 1, f"/v1/models not forwarded: {r!r}")
    r = chat(gw.port, chat_body(model="anything-at-all"))
    check(r.status == 200, f"any model goes to the listener's pool: {r!r}")


def test_missing_v1_hint(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1)
    r = request(gw.port, "POST", "/chat/completions", [("Content-Type", "application/json")],
                chat_body())
    err = _error(r, 404, "not_found")
    check("/v1" in err["message"] and "base URL" in err["message"], f"no /v1 hint: {err!r}")
    err = _error(request(gw.port, "GET", "/nothing", []), 404, "not_found")
    check("base URL" not in err["message"], f"a hint for a path that is not the API's: {err!r}")


def test_check_warns_and_key_hash(env):
    conf = os.path.join(env.dir, "warn.ini")
    with open(conf, "w") as f:
        f.write("[listen main]\nbind = 127.0.0.1:1\n[pool p]\n[backend a]\n"
                "url = http://127.0.0.1:9/v1\n")
    r = subprocess.run([AIGW, "-t", "-c", conf], capture_output=True, text=True, timeout=10)
    check(r.returncode == 0, f"aigw -t: {r.returncode} {r.stderr}")
    check("auth is on and no [key]" in r.stderr and f"{conf}:1:" in r.stderr,
          f"aigw -t does not warn about auth without keys: {r.stderr!r}")
    r = subprocess.run([AIGWCTL, "key", "hash"], input=KEY_A + "\n", capture_output=True,
                       text=True, timeout=10)
    check(r.returncode == 0 and r.stdout.strip() == key_sha256(KEY_A),
          f"aigwctl key hash: {r.returncode} {r.stdout!r} {r.stderr!r}")
    check(KEY_A not in r.stdout + r.stderr, "aigwctl key hash echoes the key")


def test_model_fallback(env):
    """Every backend of the model's pool fails before a byte: its fallback answers through its
    own pool, the client sees one response, x-aigw-model names the model that answered."""
    from harness import free_port

    m2 = env.mock("m2")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    gw = env.gateway(
        [("d1", dead, {}), ("d2", dead, {})], workers=1,
        pool={"models": "gpt-*", "check": "no", "retries": 1, "max_fails": 0,
              "breaker_failures": 0},
        models={"gpt-x": {"fallback": "llama-3"}},
        sections=[("pool local", {"models": "llama-*", "check": "no"}),
                  ("backend b2", {"pool": "local", "url": m2.url})])
    r = chat(gw.port, chat_body(model="gpt-x"))
    check(r.status == 200, f"fallback did not answer: {r!r}")
    check(r.header("x-aigw-backend") == "b2" and r.header("x-aigw-model") == "llama-3",
          f"answered by {r.header('x-aigw-backend')} as {r.header('x-aigw-model')}: {r!r}")
    check(r.header("x-aigw-attempts") == "3", f"attempts: {r.header('x-aigw-attempts')}")
    check(m2.last()["body"] and json.loads(m2.last()["body"])["model"] == "llama-3",
          f"the fallback's upstream got {m2.last()['body'][:200]!r}")
    # a model without a fallback gets the pool's error
    r = chat(gw.port, chat_body(model="gpt-y"))
    check(r.status == 502, f"no fallback: {r!r}")
    r = chat(gw.port, chat_body(model="llama-3"))
    check(r.status == 200 and r.header("x-aigw-model") == "llama-3", f"llama-3: {r!r}")


def test_stream_must_be_boolean(env):
    """"stream": "true" or 1 (and include_usage likewise) get OpenAI's 400 invalid_type, and
    nothing goes upstream: forwarded, an upstream that coerces it would stream an answer aigw
    reads, bills and filters as a JSON one. null and booleans pass."""
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, pool={"check": "no"})
    before = m.stats()["requests"]
    for body in (b'{"model":"gpt-4o","messages":[],"stream":"true"}',
                 b'{"model":"gpt-4o","messages":[],"stream":1}',
                 b'{"model":"gpt-4o","messages":[],"stream":false,"stream":{}}',
                 b'{"model":"gpt-4o","messages":[],"stream":true,'
                 b'"stream_options":{"include_usage":"yes"}}'):
        err = _error(chat(gw.port, body), 400, "invalid_type")
        field = "include_usage" if b"include_usage" in body else "'stream'"
        check(field in err["message"], f"{body!r}: message does not name the field: {err!r}")
    check(m.stats()["requests"] == before, "a request with a bad stream type went upstream")
    r = chat(gw.port, b'{"model":"gpt-4o","messages":[{"role":"user","content":"x"}],'
                      b'"stream":null}')
    check(r.status == 200 and r.json().get("object") == "chat.completion", f"stream null: {r!r}")
    r = chat(gw.port, chat_body("s", stream=True))
    check(r.status == 200 and b"[DONE]" in r.body, f"stream true: {r!r}")
