"""Binary upgrade (aigwctl upgrade, SIGUSR2): the master executes the binary on disk as a new
master on the same sockets; under load no request fails and no stream is cut, usage totals and the
operator's drain carry over, the pidfile and the admin socket move to the new master. A new binary
that fails to start leaves the old master serving and aigwctl upgrade says why (exit 1)."""

import json
import os
import shutil
import signal
import threading
import time

import harness
from harness import Conn, build_request, chat, chat_body, check, key_sha256, pid_alive, wait_for

KEY = "sk-aigw-upgrade-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _master_pid(gw):
    for p in gw.procs():
        if p.get("role") == "master":
            return p["pid"]
    raise harness.Fail("no master in show proc")


def _upgrade(gw):
    r = gw.ctl("upgrade", timeout=40)
    check(r.returncode == 0, f"aigwctl upgrade exited {r.returncode}: {r.stdout!r} {r.stderr!r}")
    check(r.stdout.startswith("upgraded: master pid "), f"aigwctl upgrade printed {r.stdout!r}")
    return int(r.stdout.split()[3]), r.stdout


def _key_requests(gw):
    out = json.loads(gw.ctl("show", "usage", "--json").stdout)
    return {e["name"]: e["requests"] for e in out["entries"]}.get("k", 0)


def _load(port, stop, results, stream):
    """Requests one after another until stop, each on its own connection; a stream must end
    with [DONE]."""
    while not stop.is_set():
        try:
            c = Conn(port, timeout=20)
            c.send(build_request("POST", "/v1/chat/completions",
                                 [("Content-Type", "application/json")] + list(AUTH.items()),
                                 chat_body("load", stream=stream)))
            r = c.read_response()
            c.close()
            ok = r.status == 200 and (not stream or r.body.decode().rstrip().endswith("[DONE]"))
            results.append("ok" if ok else f"{r.status} {r.body[-120:]!r}")
        except Exception as e:  # noqa: BLE001 - every failure is a result
            results.append(f"exception {e!r}")


def _stop_master(pid):
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), 15, f"master {pid} to stop")


def test_upgrade_under_load(env):
    m = env.mock("m1", "--chunks", 10, "--chunk-interval", "200ms")  # 2-second streams
    m2 = env.mock("m2")
    pidfile = os.path.join(env.dir, "aigw.pid")
    gw = env.gateway([m, m2], workers=2, keys={"k": {"key_sha256": key_sha256(KEY)}},
                     glob={"hard_stop_after": "30s", "pidfile": pidfile})
    old = _master_pid(gw)
    r = gw.ctl("set", "backend", "m2", "drain")
    check(r.returncode == 0, f"set drain: {r.stderr!r}")
    warm = [chat(gw.port, chat_body("hi"), headers=AUTH).status for _ in range(5)]
    check(warm == [200] * 5, f"before the upgrade: {warm}")

    stop = threading.Event()
    short, streams = [], []
    threads = [threading.Thread(target=_load, args=(gw.port, stop, short, False))
               for _ in range(3)]
    threads += [threading.Thread(target=_load, args=(gw.port, stop, streams, True))
                for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.7)  # streams in flight across the upgrade
        new, out = _upgrade(gw)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    check(new != old and pid_alive(new), f"upgrade printed pid {new} (old {old}): {out!r}")
    check("generation 2" in out and "(aigw " in out, f"no version or generation in {out!r}")
    check(_master_pid(gw) == new, "show proc after the upgrade is not answered by the new master")
    bad_short = [x for x in short if x != "ok"]
    bad_streams = [x for x in streams if x != "ok"]
    check(not bad_short, f"{len(bad_short)} of {len(short)} short requests failed: {bad_short[:5]}")
    check(not bad_streams, f"{len(bad_streams)} of {len(streams)} streams failed or were cut: "
                           f"{bad_streams[:5]}")
    check(len(short) > 20 and len(streams) >= 3,
          f"too little load: {len(short)} short, {len(streams)} streams")
    wait_for(lambda: not pid_alive(old), 15, "the old master to drain and exit")
    # the pidfile and the drain moved with the master; usage counted by both adds up exactly
    with open(pidfile) as f:
        check(int(f.read().strip()) == new, "the pidfile does not name the new master")
    check(gw.backend("m2")["admin"] == "DRAIN", f"drain lost in the upgrade: {gw.backend('m2')}")
    check(m2.stats()["chat_completions"] == 0, "the drained backend got requests")
    want = 5 + len(short) + len(streams)
    got = _key_requests(gw)
    check(got == want, f"key k's usage after the upgrade: {got} requests, {want} were answered")
    check(chat(gw.port, chat_body("hi"), headers=AUTH).status == 200, "a request after it failed")
    # SIGUSR2 upgrades as well, from the new master
    os.kill(new, signal.SIGUSR2)
    wait_for(lambda: _master_pid(gw) != new, 20, "SIGUSR2's new master")
    newer = _master_pid(gw)
    wait_for(lambda: not pid_alive(new), 15, "the second old master to exit")
    check(_key_requests(gw) == want + 1, "usage lost in the SIGUSR2 upgrade")
    check(chat(gw.port, chat_body("hi"), headers=AUTH).status == 200, "traffic after SIGUSR2")
    _stop_master(newer)
    check(not os.path.exists(pidfile), "the last master left its pidfile behind")


def test_upgrade_failing_binary(env):
    m = env.mock("m1")
    exe = os.path.join(env.dir, "aigw-copy")
    shutil.copy(harness.AIGW, exe)
    saved = harness.AIGW
    harness.AIGW = exe
    try:
        gw = env.gateway([m], workers=2)
    finally:
        harness.AIGW = saved
    old = _master_pid(gw)
    workers = gw.worker_pids()
    # a new build that cannot start: replaced the way installs do (a new file renamed over)
    tmp = exe + ".new"
    with open(tmp, "w") as f:
        f.write("#!/bin/sh\necho 'broken build' >&2\nexit 1\n")
    os.chmod(tmp, 0o755)
    os.replace(tmp, exe)
    r = gw.ctl("upgrade", timeout=40)
    check(r.returncode == 1, f"aigwctl upgrade with a failing binary exited {r.returncode}")
    check("exited with code 1" in r.stderr and exe in r.stderr,
          f"aigwctl upgrade did not say why: {r.stderr!r}")
    check(_master_pid(gw) == old and gw.worker_pids() == workers,
          "the old master or its workers changed after a failed upgrade")
    check(all(chat(gw.port, chat_body("hi")).status == 200 for _ in range(5)),
          "traffic failed after a failed upgrade")
    # (a binary that hangs: test_upgrade_hanging_binary_leaves_nothing); one that cannot be
    # executed at all is refused at once
    os.chmod(exe, 0o644)
    r = gw.ctl("upgrade", timeout=40)
    check(r.returncode == 1 and "cannot execute" in r.stderr,
          f"non-executable binary: {r.returncode} {r.stderr!r}")
    # the real binary back: the upgrade goes through, from the same path
    shutil.copy(saved, tmp)
    os.replace(tmp, exe)
    new, out = _upgrade(gw)
    check(new != old, f"upgrade printed {out!r}")
    check(chat(gw.port, chat_body("hi")).status == 200, "traffic after the upgrade")
    wait_for(lambda: not pid_alive(old), 15, "the old master to exit")
    _stop_master(new)


def test_upgrade_hanging_binary_leaves_nothing(env):
    """A new binary that never says ready: at the deadline (15 s) the old master kills it and
    everything it started, and serves on."""
    m = env.mock("m1")
    exe = os.path.join(env.dir, "aigw-copy")
    shutil.copy(harness.AIGW, exe)
    saved = harness.AIGW
    harness.AIGW = exe
    try:
        gw = env.gateway([m], workers=2)
    finally:
        harness.AIGW = saved
    old = _master_pid(gw)
    workers = gw.worker_pids()
    pids = os.path.join(env.dir, "hang.pids")
    tmp = exe + ".new"
    with open(tmp, "w") as f:  # a wrapper that hangs, with processes of its own
        f.write("#!/bin/sh\n"
                f"sleep 300 & echo $! >> {pids}\n"
                f"sh -c 'sleep 300' & echo $! >> {pids}\n"
                f"echo $$ >> {pids}\n"
                "wait\n")
    os.chmod(tmp, 0o755)
    os.replace(tmp, exe)
    t0 = time.monotonic()
    r = gw.ctl("upgrade", timeout=40)
    took = time.monotonic() - t0
    check(r.returncode == 1, f"aigwctl upgrade with a hanging binary exited {r.returncode}: "
                             f"{r.stdout!r} {r.stderr!r}")
    check("not ready within" in r.stderr, f"aigwctl upgrade did not say why: {r.stderr!r}")
    check(took < 25, f"aigwctl upgrade took {took:.1f} s")
    with open(pids) as f:
        started = [int(x) for x in f.read().split()]
    check(len(started) == 3, f"the wrapper did not start: {started}")
    # the grandchild `sleep` under `sh -c` too
    wait_for(lambda: not any(pid_alive(p) for p in started), 3,
             "the hung new master and its processes to be gone")
    leftovers = [p for p in harness.group_pids(os.getpgid(old))
                 if p != old and p not in gw.worker_pids().values()
                 and p not in [x["pid"] for x in gw.procs()]]
    check(not leftovers, f"processes left behind by the failed upgrade: {leftovers}")
    check(_master_pid(gw) == old and gw.worker_pids() == workers,
          "the old master or its workers changed after a failed upgrade")
    check(all(chat(gw.port, chat_body("hi")).status == 200 for _ in range(5)),
          "traffic failed after a failed upgrade")


def test_upgrade_as_user_keeps_admin_group(env):
    """[global] user and admin_group (a group the user is not in, as an operators' group is): the
    master runs unprivileged, and an upgrade's new master, which may not give a socket of its own
    to that group, takes over the old master's admin socket, group and mode 0660 kept."""
    if os.geteuid() != 0:
        raise harness.Skip("needs root to switch users")
    import grp
    import pwd
    import stat
    nobody = pwd.getpwnam("nobody")
    try:
        adm = grp.getgrnam("adm")
    except KeyError:
        raise harness.Skip("no group adm")
    if "nobody" in adm.gr_mem or adm.gr_gid == nobody.pw_gid:
        raise harness.Skip("nobody is in adm")
    os.chown(env.dir, nobody.pw_uid, -1)  # the admin socket's directory is the user's (README)
    os.chmod(env.dir, 0o755)
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, glob={"user": "nobody", "admin_group": "adm"})
    st = os.stat(gw.sock_path)
    check(st.st_gid == adm.gr_gid and stat.S_IMODE(st.st_mode) == 0o660,
          f"before: admin socket gid {st.st_gid} mode {oct(stat.S_IMODE(st.st_mode))}")
    old = _master_pid(gw)
    new, out = _upgrade(gw)
    check(new != old and _master_pid(gw) == new, f"upgrade printed {out!r}; old master {old}")
    st = os.stat(gw.sock_path)
    check(st.st_uid == nobody.pw_uid and st.st_gid == adm.gr_gid and
          stat.S_IMODE(st.st_mode) == 0o660,
          f"after: admin socket uid {st.st_uid} gid {st.st_gid} "
          f"mode {oct(stat.S_IMODE(st.st_mode))}")
    check(chat(gw.port, chat_body("after")).status == 200, "request after the upgrade")
    # and once more (one upgrade at a time: the old master first drains and exits): the socket
    # the new master took over is handed on again
    wait_for(lambda: not pid_alive(old), 15, "the old master to drain and exit")
    new2, out = _upgrade(gw)
    check(new2 != new and _master_pid(gw) == new2, f"second upgrade printed {out!r}")
    check(gw.stop() == 0, "aigw did not exit 0")


def test_upgrade_to_another_admin_socket(env):
    """The new file names another admin_socket: the new master answers there and the old path,
    which nobody answers on any more, is removed (not left as a stale socket file)."""
    m = env.mock("m1")
    gw = env.gateway([m], workers=1)
    old_sock = gw.sock_path
    new_sock = os.path.join(env.dir, "moved.sock")
    with open(gw.conf_path, "w") as f:
        f.write(gw.conf_text.replace(f"admin_socket = {old_sock}", f"admin_socket = {new_sock}"))
    old = _master_pid(gw)
    new, out = _upgrade(gw)
    gw.sock_path = new_sock
    check(_master_pid(gw) == new, f"the new master does not answer on {new_sock}: {out!r}")
    wait_for(lambda: not pid_alive(old), 15, "the old master to drain and exit")
    check(not os.path.exists(old_sock), f"{old_sock} is left behind")
    check(chat(gw.port, chat_body("after")).status == 200, "a request after the upgrade")
    _stop_master(new)
    check(not os.path.exists(new_sock), f"{new_sock} is left behind at the stop")


def test_upgrade_applies_admin_group_change(env):
    """The admin socket carries over an upgrade, and so does what the new file says of it: an
    admin_group added gives it that group and mode 0660, one removed takes it back to 0600."""
    import grp
    import stat
    group = grp.getgrgid(os.getegid()).gr_name
    m = env.mock("m1")
    gw = env.gateway([m], workers=1)
    check(stat.S_IMODE(os.stat(gw.sock_path).st_mode) == 0o600, "the admin socket is not 0600")
    base = gw.conf_text
    with open(gw.conf_path, "w") as f:
        f.write(base.replace("[global]\n", f"[global]\nadmin_group = {group}\n", 1))
    old = _master_pid(gw)
    _upgrade(gw)
    st = os.stat(gw.sock_path)
    check(stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getegid(),
          f"admin_group added: mode {oct(stat.S_IMODE(st.st_mode))} gid {st.st_gid}")
    with open(gw.conf_path, "w") as f:
        f.write(base)
    wait_for(lambda: not pid_alive(old), 15, "the old master to drain and exit")
    _upgrade(gw)
    check(stat.S_IMODE(os.stat(gw.sock_path).st_mode) == 0o600,
          "admin_group removed: the admin socket is not 0600 again")
    check(gw.ctl("show", "proc").returncode == 0, "aigwctl after the upgrades")
