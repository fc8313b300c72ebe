"""The official OpenAI Node.js client (npm `openai`, pinned by test/sdk/package-lock.json and
installed by `make sdk-deps`, run with the machine's node) against aigw on loopback: chat, streams
with and without include_usage (and equal to what a raw HTTP client gets), models.list() and
models.retrieve(), a wrong key (401), an unknown model (404) and a 429 from aigw's own limiter that
the SDK retries after Retry-After. Each scenario is a test/sdk/*.mjs script printing JSON."""

import hashlib
import json
import os
import shutil
import subprocess

import harness
from harness import chat, chat_body, check

SDK_DIR = os.path.join(harness.ROOT, "test", "sdk")
MODEL = "gpt-test"
KEY = "sk-aigw-sdk-test-4f1c2a9e7b3d"
WRONG_KEY = "sk-aigw-sdk-wrong-0d9e8f7a6b5c"

# The config of the keyed gateway (issue 7's syntax): one key that may use gpt-test and team-*,
# three public models, the pool serving gpt-test and gpt-4.1.
MODELS = {MODEL: {}, "team-fast": {"alias_of": MODEL}, "gpt-4.1": {}}
POOL_MODELS = f"{MODEL}, gpt-4.1"


# ----------------------------------------------------------------------------------------------
# Running the SDK


def _node():
    node = shutil.which("node") or "/usr/bin/node"
    check(os.access(node, os.X_OK), "node not found: Node.js is needed (`make sdk-deps` installs "
          "Debian's nodejs and npm when the machine has none)")
    return node


def _sdk_ready():
    """Fails, saying why, unless `make sdk-deps` installed the locked openai package."""
    node = _node()
    pkg = os.path.join(SDK_DIR, "node_modules", "openai", "package.json")
    log = os.path.join(SDK_DIR, "npm-install.log")
    why = ""
    if os.path.exists(log):
        with open(log, errors="replace") as f:
            tail = f.read().strip().splitlines()[-6:]
        why = "; last lines of test/sdk/npm-install.log: " + " | ".join(tail)
    check(os.path.exists(pkg), "the openai package is not installed in test/sdk/node_modules: "
          "`make sdk-deps` (npm ci in test/sdk, run by `make test`) failed or did not run" + why)
    with open(os.path.join(SDK_DIR, "package-lock.json"), "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    try:
        with open(os.path.join(SDK_DIR, "node_modules", ".aigw-lock.sha256")) as f:
            have = f.read().strip()
    except OSError:
        have = ""
    check(have == want, "test/sdk/node_modules does not match test/sdk/package-lock.json: "
          "run `make sdk-deps`" + why)
    return node


def run_sdk(env, script, gw, key=KEY, timeout=40, **params):
    """Runs test/sdk/SCRIPT.mjs with its client pointed at gw; returns the JSON it printed.
    Only loopback is reachable from it: the base URL is the gateway's and no proxy is set."""
    node = _sdk_ready()
    penv = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": env.dir,
        "AIGW_BASE_URL": f"http://127.0.0.1:{gw.port}/v1",
        "AIGW_API_KEY": key,
        "NO_PROXY": "*",
    }
    argv = [node, os.path.join(SDK_DIR, f"{script}.mjs"), json.dumps(params)]
    try:
        r = subprocess.run(argv, cwd=SDK_DIR, env=penv, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise harness.Fail(f"node {script}.mjs did not finish within {timeout}s")
    lines = r.stdout.strip().splitlines()
    check(r.returncode == 0 and lines,
          f"node {script}.mjs exited {r.returncode}: {r.stderr.strip()[-800:]}")
    try:
        out = json.loads(lines[-1])
    except ValueError as e:
        raise harness.Fail(f"node {script}.mjs printed no JSON ({e}): {r.stdout[-300:]!r}")
    with open(os.path.join(env.dir, f"sdk-{script}.json"), "a") as f:
        f.write(lines[-1] + "\n")
    return out


def _ok(out, what):
    if not out.get("ok"):
        e = out.get("error") or {}
        raise harness.Fail(f"{what}: the SDK raised {e.get('name')} status {e.get('status')} "
                           f"code {e.get('code')}: {e.get('message', '')[:300]}")
    return out


def _sdk_error(out, what, cls, status, code):
    """The scenario ended with the SDK raising cls (status, error.code)."""
    check(not out.get("ok"), f"{what}: the SDK returned a result instead of raising {cls}: "
          f"{json.dumps(out.get('completion') or out.get('result'))[:300]}")
    e = out["error"]
    check(cls in e["classes"] and e["status"] == status and e["code"] == code,
          f"{what}: expected {cls} ({status}, code {code}), the SDK raised {e['name']} "
          f"status {e['status']} code {e['code']} type {e['type']}: {e['message'][:200]}")
    return e


# ----------------------------------------------------------------------------------------------
# Gateways

def _open_gateway(env, mock, **kw):
    """A gateway whose listener needs no key (the harness sets auth = off when no key is given)."""
    return env.gateway([mock], **kw)


def _keyed_gateway(env, mock, key_opts=None, **kw):
    """A gateway with auth on, one key (KEY, by its digest) and model routing."""
    key = {"key_sha256": harness.key_sha256(KEY), "models": f"{MODEL}, team-*"}
    key.update(key_opts or {})
    return env.gateway([mock], pool={"models": POOL_MODELS}, keys={"sdk": key}, models=MODELS,
                       **kw)


def _raw_stream_chunks(gw, body):
    """The same request by a raw HTTP client: the JSON of each `data:` event and whether the
    stream ended with data: [DONE]."""
    r = chat(gw.port, body.encode(), headers=[("Authorization", f"Bearer {KEY}")])
    check(r.status == 200, f"raw stream via aigw: {r!r}")
    chunks, done = [], False
    for ev in r.body.decode().split("\n\n"):
        for line in ev.splitlines():
            if line.startswith("data:"):
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                else:
                    check(not done, f"raw stream: data after [DONE]: {data[:200]}")
                    chunks.append(json.loads(data))
    return chunks, done


def _whole_content(gw, content):
    """The content of the non-stream answer to the same prompt (the mock's deltas add up to
    it), read by a raw HTTP client."""
    r = chat(gw.port, chat_body(content, model=MODEL), headers=[("Authorization", f"Bearer {KEY}")])
    check(r.status == 200, f"raw non-stream chat via aigw: {r!r}")
    return r.json()["choices"][0]["message"]["content"]


def _check_stream(env, gw, mock, include_usage):
    prompt = f"Stream please (include_usage={include_usage})."
    out = _ok(run_sdk(env, "stream", gw, model=MODEL, content=prompt,
                      include_usage=include_usage), f"stream, include_usage={include_usage}")
    what = f"SDK stream with include_usage={include_usage}"
    chunks = out["chunks"]
    check(len(chunks) >= 3, f"{what}: only {len(chunks)} chunks: {chunks}")
    check(all(c.get("object") == "chat.completion.chunk" for c in chunks),
          f"{what}: a chunk is not a chat.completion.chunk: {chunks}")
    whole = _whole_content(gw, prompt)
    check(out["content"] == whole, f"{what}: the deltas give {out['content']!r}, the non-stream "
          f"answer is {whole!r}")
    content_chunks = [c for c in chunks if c.get("choices")]
    check(content_chunks[-1]["choices"][0].get("finish_reason") == "stop",
          f"{what}: no finish_reason stop: {content_chunks[-1]}")
    if include_usage:
        check(out["usage_chunks"] == [len(chunks) - 1],
              f"{what}: usage should be in the last chunk only, it is in chunks "
              f"{out['usage_chunks']} of {len(chunks)}")
        last = chunks[-1]
        u = last["usage"]
        check(last["choices"] == [], f"{what}: the usage chunk has choices: {last}")
        check(all(isinstance(u.get(k), int) for k in
                  ("prompt_tokens", "completion_tokens", "total_tokens"))
              and u["prompt_tokens"] > 0 and u["completion_tokens"] > 0
              and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"],
              f"{what}: bad usage {u}")
    else:
        check(out["usage_chunks"] == [], f"{what}: the client did not ask for usage but chunks "
              f"{out['usage_chunks']} carry it: {[chunks[i] for i in out['usage_chunks']]}")
    # A raw HTTP client sending the very bytes the SDK sent gets the very same chunks.
    sent = out["attempts"][-1].get("body")
    check(isinstance(sent, str) and json.loads(sent)["stream"] is True,
          f"{what}: the recorded SDK request body is {sent!r}")
    raw, done = _raw_stream_chunks(gw, sent)
    check(done, f"{what}: the raw client's stream did not end with data: [DONE]")
    check(raw == chunks, f"{what}: the SDK's chunks differ from the raw client's:\n"
          f" sdk {json.dumps(chunks)[:500]}\n raw {json.dumps(raw)[:500]}")
    return out


# ----------------------------------------------------------------------------------------------
# Scenarios that need no key


def test_chat(env):
    m = env.mock("m1")
    gw = _open_gateway(env, m)
    out = _ok(run_sdk(env, "chat", gw, model=MODEL, content="Say hello."), "chat")
    c = out["completion"]
    check(c.get("object") == "chat.completion" and c.get("model") == MODEL,
          f"chat: unexpected completion {c}")
    check(isinstance(out["content"], str) and out["content"], f"chat: empty content: {c}")
    u = c.get("usage") or {}
    check(u.get("total_tokens", 0) > 0, f"chat: no usage in {c}")
    check(len(out["attempts"]) == 1 and out["attempts"][0]["status"] == 200,
          f"chat: attempts {out['attempts']}")
    check(out["attempts"][0]["url"] == f"http://127.0.0.1:{gw.port}/v1/chat/completions",
          f"chat: the SDK called {out['attempts'][0]['url']}")
    # the same bytes from a raw client give the same answer
    raw = chat(gw.port, out["attempts"][0]["body"].encode())
    check(raw.status == 200 and raw.json() == c,
          f"chat: the SDK got {json.dumps(c)[:300]}, a raw client {raw!r}")


def test_stream_without_include_usage(env):
    m = env.mock("m1", "--chunks", 6, "--chunk-interval", "5ms")
    gw = _open_gateway(env, m)
    _check_stream(env, gw, m, None)  # no stream_options at all
    _check_stream(env, gw, m, False)


def test_stream_with_include_usage(env):
    m = env.mock("m1", "--chunks", 6, "--chunk-interval", "5ms")
    gw = _open_gateway(env, m)
    _check_stream(env, gw, m, True)


# ----------------------------------------------------------------------------------------------
# Scenarios that need issue 7's keys, model routing and limits


def test_keyed_chat_and_stream(env):
    m = env.mock("m1", "--chunks", 4, "--chunk-interval", "5ms")
    gw = _keyed_gateway(env, m)
    out = _ok(run_sdk(env, "chat", gw, model=MODEL, content="Hello with a key."), "keyed chat")
    check(out["completion"].get("object") == "chat.completion", f"keyed chat: {out}")
    _check_stream(env, gw, m, None)
    _check_stream(env, gw, m, True)


def test_models(env):
    m = env.mock("m1")
    gw = _keyed_gateway(env, m)
    out = _ok(run_sdk(env, "models", gw, retrieve=[MODEL, "team-fast", "gpt-4.1",
                                                   "no-such-model"]), "models")
    # answered by aigw from its config and filtered by the key (models = gpt-test, team-*):
    # not the mock's own list (demo, gpt-4o-mini)
    check(sorted(out["ids"]) == sorted([MODEL, "team-fast"]),
          f"models.list(): ids {out['ids']}, expected {MODEL} and team-fast (the key's models)")
    check(all(x.get("object") == "model" for x in out["list"]),
          f"models.list(): an entry is not a model object: {out['list']}")
    got = out["retrieved"]
    for mid in (MODEL, "team-fast"):
        check(got[mid]["ok"] and got[mid]["model"].get("id") == mid
              and got[mid]["model"].get("object") == "model",
              f"models.retrieve({mid!r}): {got[mid]}")
    e = got["gpt-4.1"]
    check(not e["ok"] and e["error"]["status"] in (403, 404),
          f"models.retrieve('gpt-4.1'), a model the key may not use: {e}")
    e = got["no-such-model"]
    check(not e["ok"] and "NotFoundError" in e["error"]["classes"]
          and e["error"]["code"] == "model_not_found",
          f"models.retrieve('no-such-model'): expected NotFoundError model_not_found, got {e}")


def test_wrong_key(env):
    m = env.mock("m1")
    gw = _keyed_gateway(env, m)
    out = run_sdk(env, "error", gw, key=WRONG_KEY, call="chat", model=MODEL, content="Hi.")
    e = _sdk_error(out, "chat with a wrong key", "AuthenticationError", 401, "invalid_api_key")
    check(e["type"] == "invalid_request_error", f"wrong key: error type {e['type']}")
    check(WRONG_KEY not in e["message"] and KEY not in e["message"],
          f"wrong key: the error message echoes a key: {e['message']}")
    check(len(out["attempts"]) == 1, f"wrong key: the SDK made {len(out['attempts'])} attempts")
    out = run_sdk(env, "models", gw, key=WRONG_KEY)
    _sdk_error(out, "models.list() with a wrong key", "AuthenticationError", 401,
               "invalid_api_key")
    check(m.stats()["chat_completions"] == 0, "wrong key: the request reached the upstream")
    # the right key passes
    _ok(run_sdk(env, "chat", gw, model=MODEL, content="Hi."), "chat with the right key")


def test_unknown_model(env):
    m = env.mock("m1")
    gw = _keyed_gateway(env, m)
    for call in ("chat", "stream"):
        out = run_sdk(env, "error", gw, call=call, model="no-such-model", content="Hi.")
        e = _sdk_error(out, f"{call} with an unknown model", "NotFoundError", 404,
                       "model_not_found")
        check(e["type"] == "invalid_request_error", f"unknown model: error type {e['type']}")
    check(m.stats()["chat_completions"] == 0, "unknown model: the request reached the upstream")


def test_rate_limit_retry_after(env):
    """rpm = 2: two requests fill the minute and a third at once is refused; one made 50 s after
    the first gets aigw's 429 with Retry-After (about 10 s: when the first leaves the sliding
    window); the SDK (maxRetries 2) waits that long and its first retry succeeds."""
    m = env.mock("m1")
    gw = _keyed_gateway(env, m, key_opts={"rpm": 2})
    out = run_sdk(env, "ratelimit", gw, timeout=120, model=MODEL, content="Limited.", fill=2,
                  delay=50, max_retries=2)
    att = out["attempts"]
    t0 = att[0]["start"] if att else 0
    timeline = ", ".join(f"{a.get('status')} at +{a['start'] - t0:.2f}s (Retry-After "
                         f"{a.get('headers', {}).get('retry-after')})" for a in att)
    statuses = [a.get("status") for a in att]
    check(statuses == [200, 200, 429, 429, 200],
          f"rpm = 2: attempt statuses {statuses}, expected 200 200 429 (two requests, a third "
          f"refused), then 429 200 (one retry after Retry-After); attempts: {timeline}")
    _ok(out, "rate-limited chat")
    first, refused, limited, retry = att[0], att[2], att[3], att[4]
    # the first request leaves the 60 s window between its start + 60 and its answer + 60
    ra0 = refused["headers"].get("retry-after", "")
    lo = first["start"] + 60 - refused["head_time"]
    hi = first["head_time"] + 60 - refused["start"]
    check(ra0.isdigit() and lo - 0.001 <= int(ra0) <= hi + 1,
          f"the request right after rpm = 2 was used up: Retry-After {ra0!r}, the window admits "
          f"again in {lo:.2f}..{hi:.2f} s")
    h = limited["headers"]
    check(h.get("x-ratelimit-limit-requests") == "2" and h.get("x-ratelimit-remaining-requests")
          == "0", f"429: x-ratelimit headers {h}")
    check(h.get("retry-after", "").isdigit(), f"429: Retry-After {h.get('retry-after')!r}")
    ra = int(h["retry-after"])
    wait = float(h["retry-after-ms"]) / 1000 if "retry-after-ms" in h else ra
    lo = first["start"] + 60 - limited["head_time"]
    hi = first["head_time"] + 60 - limited["start"]
    check(lo - 0.001 <= ra <= hi + 1, f"429: Retry-After {ra}, the window admits again in "
          f"{lo:.2f}..{hi:.2f} s")
    check(retry["start"] - limited["head_time"] >= wait - 0.01,
          f"the SDK retried {retry['start'] - limited['head_time']:.2f} s after the 429, "
          f"Retry-After said {wait} s")
    check(retry["start"] >= first["start"] + 60 - 0.01,
          "the retry passed less than 60 s after the first of the two requests")
    check(out["end"] - out["start"] >= wait, f"the call took {out['end'] - out['start']:.2f} s, "
          f"less than Retry-After {wait}")
    check(out["content"], f"rate-limited chat: no content: {out}")


test_rate_limit_retry_after.timeout = 150
