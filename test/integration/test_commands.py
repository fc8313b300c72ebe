"""Master commands through aigwctl (issue 8 item 3): show info / proc / pools / backends [POOL] /
keys / usage, set weight (traffic shares follow, a reload keeps it), check BACKEND against an up
and a down backend, stop; exit codes 0 (done), 1 (refused), 2 (unknown command, wrong words)."""

import json
import os
import time
import urllib.request

from harness import check, free_port, wait_for
from resil_util import Client, pool
from harness import chat_body


def _served_by(port, n):
    c = Client(port)
    names = [c.chat(chat_body(f"cmd {i}"), i=i).name for i in range(n)]
    c.close()
    return names


def _ok(r, what):
    check(r.returncode == 0, f"aigwctl {what} exited {r.returncode}: {r.stderr.strip()!r}")
    return r.stdout


def test_show_commands_and_exit_codes(env):
    a, b = env.mock("a"), env.mock("b")
    sport = free_port()
    gw = env.gateway([a, b], workers=2, pool=pool(),
                     sections=[("stats", {"bind": f"127.0.0.1:{sport}"})])
    names = _served_by(gw.port, 30)
    check(len([n for n in names if n]) == 30, f"requests failed: {names}")

    # show info: text and JSON; requests/s from the master's 1 s samples
    out = _ok(gw.ctl("show", "info"), "show info")
    for field in ("version:", "pid:", "uptime:", "generation:", "workers:", "connections:",
                  "requests/s:", "access log dropped:", "config:"):
        check(field in out, f"show info lacks {field!r}: {out!r}")
    check(gw.conf_path in out, f"show info does not name the config: {out!r}")
    info = {}

    def rate_seen():
        info.update(gw.ctl_json("show", "info", "--json"))
        return info["requests"] >= 30 and info["requests_per_s"] > 0

    wait_for(rate_seen, 3, "show info to count the 30 requests")
    check(info["pid"] == gw.proc.pid, f"show info pid {info['pid']} != {gw.proc.pid}")
    check(info["generation"] == 1 and info["workers"] == 2, f"show info: {info}")
    check(info["config"] == gw.conf_path and info["access_log_dropped"] == 0, f"show info: {info}")
    check(info["uptime_s"] >= 0 and info["version"], f"show info: {info}")
    check(info["connections"] >= 0 and 1 <= info["rate_window_s"] <= 10, f"show info: {info}")

    # show pools
    out = _ok(gw.ctl("show", "pools"), "show pools")
    check(out.startswith("POOL ") and "\nmain " in out and " 2/2 " in out, f"show pools: {out!r}")
    pools = gw.ctl_json("show", "pools", "--json")
    check(len(pools) == 1 and pools[0]["name"] == "main", f"show pools --json: {pools}")
    p = pools[0]
    check(p["algo"] == "roundrobin" and p["backends"] == 2 and p["backends_up"] == 2 and
          p["requests"] >= 30 and p["active"] == 0, f"show pools --json: {p}")

    # show backends [POOL]
    bs = gw.ctl_json("show", "backends", "main", "--json")
    check(sorted(x["name"] for x in bs) == ["a", "b"], f"show backends main: {bs}")
    r = gw.ctl("show", "backends", "nosuch")
    check(r.returncode == 1 and "no pool called 'nosuch'" in r.stderr and r.stdout == "",
          f"show backends nosuch: {r.returncode} {r.stdout!r} {r.stderr!r}")

    for args in (("show", "proc"), ("show", "keys"), ("show", "usage"), ("show", "proc", "--json"),
                 ("show", "keys", "--json"), ("show", "usage", "--by", "backend", "--json"),
                 ("help",)):
        out = _ok(gw.ctl(*args), " ".join(args))
        if "--json" in args:
            json.loads(out)

    # unknown command and wrong words: usage, exit 2; refused: the reason, exit 1
    for args in (("frobnicate",), ("show", "nothing"), ("show", "pools", "extra"),
                 ("set", "weight", "a"), ("check",), ("stop", "now")):
        r = gw.ctl(*args)
        check(r.returncode == 2, f"aigwctl {' '.join(args)} exited {r.returncode}: {r.stderr!r}")
        check(r.stdout == "" and "usage: aigwctl" in r.stderr,
              f"aigwctl {' '.join(args)}: no usage: {r.stdout!r} {r.stderr!r}")
    r = gw.ctl()
    check(r.returncode == 2 and "usage: aigwctl" in r.stderr, f"aigwctl alone: {r.returncode}")
    for args, why in ((("set", "weight", "nosuch", "3"), "no backend called 'nosuch'"),
                      (("set", "weight", "a", "300"), "bad weight"),
                      (("set", "backend", "a", "asleep"), "bad state"),
                      (("check", "nosuch"), "no backend called 'nosuch'"),
                      (("breaker", "open", "nosuch"), "no backend called 'nosuch'")):
        r = gw.ctl(*args)
        check(r.returncode == 1 and why in r.stderr and r.stdout == "",
              f"aigwctl {' '.join(args)}: {r.returncode} {r.stdout!r} {r.stderr!r}")
        check("usage: aigwctl" not in r.stderr, f"a refused command printed the usage: {r.stderr!r}")

    # the access log's drop counter in /metrics
    with urllib.request.urlopen(f"http://127.0.0.1:{sport}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    check("\naigw_access_log_dropped_total 0\n" in text, "no aigw_access_log_dropped_total 0")

    # admin_socket stays 0600 without admin_group
    mode = os.stat(gw.sock_path).st_mode & 0o777
    check(mode == 0o600, f"admin socket mode {oct(mode)}")


def test_set_weight_shares(env):
    a, b = env.mock("a"), env.mock("b")
    gw = env.gateway([("a", a, {"weight": 4}), ("b", b, {"weight": 4})], workers=1, pool=pool())

    def shares(n):
        names = _served_by(gw.port, n)
        return names.count("a"), names.count("b")

    def weight_is(name, w):
        wait_for(lambda: gw.backend(name)["weight"] == w, 2, f"{name}'s weight to be {w}")

    na, nb = shares(40)
    check((na, nb) == (20, 20), f"equal weights: a {na}, b {nb}")

    r = gw.ctl("set", "weight", "a", "12")
    check(r.returncode == 0 and "weight 12 (was 4, configured 4)" in r.stdout, f"{r.stdout!r}")
    weight_is("a", 12)
    na, nb = shares(40)
    check((na, nb) == (30, 10), f"a at 12, b at 4: a {na}, b {nb} of 40")

    r = gw.ctl("--json", "set", "weight", "a", "0")
    check(r.returncode == 0 and json.loads(r.stdout)["weight"] == 0, f"{r.stdout!r}")
    weight_is("a", 0)
    na, nb = shares(20)
    check((na, nb) == (0, 20), f"a at weight 0 still served {na} of 20")

    r = gw.ctl("set", "weight", "main/a", "50%")  # half the configured 4
    check(r.returncode == 0 and "weight 2 " in r.stdout, f"{r.stdout!r}")
    weight_is("a", 2)
    na, nb = shares(30)
    check((na, nb) == (10, 20), f"a at 2, b at 4: a {na}, b {nb} of 30")

    # a reload keeps the operator's weight
    r = gw.ctl("reload")
    check(r.returncode == 0 and "generation 2" in r.stdout, f"reload: {r.stdout!r} {r.stderr!r}")
    check(gw.backend("a")["weight_cfg"] == 2, f"after a reload: {gw.backend('a')}")
    weight_is("a", 2)
    na, nb = shares(30)
    check((na, nb) == (10, 20), f"after a reload, a at 2, b at 4: a {na}, b {nb} of 30")


def test_check_backend(env):
    up, down = env.mock("up"), env.mock("down")
    # checks rarely, so the checks counted are the ones asked for
    gw = env.gateway([up, down], workers=1, pool=pool(check_interval="60s", rise=1, fall=1),
                     sections=[("pool quiet", {"check": "no"}),
                               ("backend q", {"pool": "quiet", "url": up.url})])
    time.sleep(0.3)
    down.kill()
    before = up.stats()["models"]
    r = gw.ctl("check", "up")
    check(r.returncode == 0, f"check up exited {r.returncode}: {r.stderr!r}")
    check(r.stdout.startswith("main/up: pass: 200 in ") and " ms " in r.stdout, f"{r.stdout!r}")
    check(up.stats()["models"] == before + 1, f"the check did not reach the backend: "
                                               f"{before} -> {up.stats()['models']}")
    res = gw.ctl_json("check", "up", "--json")
    check(res["result"] == "pass" and res["status"] == 200 and res["error"] is None and
          res["latency_ms"] >= 0 and res["pool"] == "main" and res["name"] == "up", f"{res}")

    r = gw.ctl("check", "down")
    check(r.returncode == 0, f"check down exited {r.returncode}: {r.stderr!r}")
    check(r.stdout.startswith("main/down: fail: ECONNREFUSED in ") and "refused" in r.stdout,
          f"{r.stdout!r}")
    res = gw.ctl_json("check", "main/down", "--json")
    check(res["result"] == "fail" and res["status"] is None and res["error"] == "ECONNREFUSED",
          f"{res}")
    # it counted as a check: with fall = 1 the backend is DOWN now
    check(gw.backend("down")["state"] == "DOWN", f"{gw.backend('down')}")

    r = gw.ctl("check", "q")
    check(r.returncode == 1 and "no active checks" in r.stderr, f"{r.returncode} {r.stderr!r}")


def test_stop_command(env):
    m = env.mock("m")
    gw = env.gateway([m], workers=2)
    r = gw.ctl("stop")
    check(r.returncode == 0 and r.stdout.startswith("ok: stopping"), f"{r.returncode} {r.stdout!r}")
    rc = gw.proc.wait(10)
    check(rc == 0, f"the master exited with {rc} after aigwctl stop")
    check(not os.path.exists(gw.sock_path), "the admin socket is still there")
    check("graceful stop requested" in gw.proc.log_text(), "no log line for the stop")


def test_reload_and_upgrade_json(env):
    """reload and upgrade take --json like every other command (a script reads the generation and
    the new master's pid from JSON); a bad file is still the FILE:LINE error, exit 1."""
    m = env.mock("m")
    gw = env.gateway([m], workers=1)
    r = gw.ctl("--json", "reload", timeout=40)
    check(r.returncode == 0, f"aigwctl --json reload exited {r.returncode}: {r.stderr.strip()!r}")
    try:
        out = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"aigwctl --json reload printed no JSON: {r.stdout!r}")
    check(out == {"ok": True, "generation": 2, "workers": 1}, f"reload answered {out!r}")

    r = gw.ctl("--json", "upgrade", timeout=40)
    check(r.returncode == 0, f"aigwctl --json upgrade exited {r.returncode}: {r.stderr.strip()!r}")
    try:
        out = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"aigwctl --json upgrade printed no JSON: {r.stdout!r}")
    masters = [p["pid"] for p in gw.procs() if p.get("role") == "master"]
    check(out.get("ok") is True and out.get("generation") == 3 and out.get("version") and
          masters == [out.get("pid")], f"upgrade answered {out!r}, show proc has masters {masters}")

    # words after reload / upgrade other than json: usage, exit 2
    for cmd in ("reload", "upgrade"):
        r = gw.ctl(cmd, "now")
        check(r.returncode == 2 and f"usage: {cmd} [json]" in r.stderr,
              f"aigwctl {cmd} now: {r.returncode} {r.stderr[:200]!r}")

    good = gw.conf_text
    with open(gw.conf_path, "w") as f:
        f.write(good + "\n[pool extra]\nbogus_key = 1\n")
    r = gw.ctl("--json", "reload", timeout=40)
    with open(gw.conf_path, "w") as f:
        f.write(good)
    check(r.returncode == 1 and f"{gw.conf_path}:" in r.stderr and not r.stdout,
          f"--json reload of a bad file: {r.returncode} {r.stdout!r} {r.stderr!r}")


def test_ctl_with_config_being_edited(env):
    """aigwctl -c FILE while FILE has an error: show and set commands still reach the master (it
    runs what it loaded before), with the FILE:LINE as a warning; reload is refused with it."""
    m = env.mock("m")
    gw = env.gateway([m], workers=1)
    good = gw.conf_text
    with open(gw.conf_path, "w") as f:
        f.write(good + "\n[pool extra]\nbogus_key = 1\n")
    line = len((good + "\n").splitlines()) + 2
    try:
        r = gw.ctl("show", "info", use_conf=True)
        check(r.returncode == 0 and "generation:" in r.stdout,
              f"show info with a broken file: {r.returncode} {r.stdout!r} {r.stderr!r}")
        check(f"{gw.conf_path}:{line}" in r.stderr, f"no FILE:LINE warning in {r.stderr!r}")
        r = gw.ctl("set", "backend", "m", "drain", use_conf=True)
        check(r.returncode == 0 and gw.backend("m")["admin"] == "DRAIN",
              f"set backend with a broken file: {r.returncode} {r.stderr!r}")
        r = gw.ctl("reload", use_conf=True)
        check(r.returncode == 1 and f"{gw.conf_path}:{line}" in r.stderr,
              f"reload of the broken file: {r.returncode} {r.stderr!r}")
    finally:
        with open(gw.conf_path, "w") as f:
            f.write(good)
