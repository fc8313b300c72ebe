"""Deployment: meson install (programs, reference config, man pages, systemd unit), sd_notify
READY=1 / STOPPING=1, the pidfile, [global] user / group / admin_group, and aigw -D."""

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time

from harness import (AIGW, BUILD, ROOT, Fail, Skip, chat, chat_body, check, free_port,
                     pid_alive, port_accepts, wait_for)

DEMO_INI = os.path.join(ROOT, "etc", "demo.ini")


def _ini_keys(path):
    """{section kind: set of keys} of an INI file, commented-out keys (";key = v") included."""
    keys, kind = {}, None
    with open(path) as f:
        for line in f:
            m = re.match(r"^;?\[(\w+)", line)
            if m:
                kind = m.group(1)
                keys.setdefault(kind, set())
                continue
            m = re.match(r"^;?(\w+) = ", line)
            if m and kind:
                keys[kind].add(m.group(1))
    return keys


def _install(env):
    dest = os.path.join(env.dir, "dest")
    r = subprocess.run(["meson", "install", "-C", BUILD, "--destdir", dest, "--quiet"],
                       capture_output=True, text=True, timeout=300)
    check(r.returncode == 0, f"meson install failed: {r.stdout[-800:]} {r.stderr[-800:]}")
    return dest


def _find(dest, suffix):
    for d, _, files in os.walk(dest):
        for f in files:
            p = os.path.join(d, f)
            if p.endswith(suffix):
                return p
    raise Fail(f"{suffix} not installed; installed: {sorted(_all_files(dest))}")


def _all_files(dest):
    return [os.path.relpath(os.path.join(d, f), dest) for d, _, fs in os.walk(dest) for f in fs]


def test_install_files(env):
    dest = _install(env)
    for exe in ("/bin/aigw", "/bin/aigwctl", "/bin/aigw-mock"):
        p = _find(dest, exe)
        check(os.access(p, os.X_OK), f"{p} is not executable")
    ini = _find(dest, "/aigw/aigw.ini")
    check(os.stat(ini).st_mode & 0o777 == 0o644, f"{ini} mode {oct(os.stat(ini).st_mode)}")
    unit = _find(dest, "/systemd/system/aigw.service")
    mans = [_find(dest, s) for s in ("/man8/aigw.8", "/man8/aigwctl.8", "/man5/aigw.ini.5")]

    # the reference config knows every key demo.ini documents, and no other
    want, got = _ini_keys(DEMO_INI), _ini_keys(ini)
    for kind in sorted(set(want) | set(got)):
        missing = want.get(kind, set()) - got.get(kind, set())
        extra = got.get(kind, set()) - want.get(kind, set())
        check(not missing and not extra,
              f"[{kind}] of aigw.ini vs demo.ini: missing {sorted(missing)}, extra "
              f"{sorted(extra)}")
    # and is a valid file as installed (only the upstream's key is to be provided)
    r = subprocess.run([AIGW, "-t", "-c", ini], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, OPENAI_API_KEY="sk-test"))
    check(r.returncode == 0, f"aigw -t on the installed aigw.ini: {r.stdout} {r.stderr}")
    # ...and lets no client in with the demo's key, which the README publishes
    import hashlib
    demo_hash = hashlib.sha256(b"sk-aigw-demo").hexdigest()
    with open(ini) as f:
        check(demo_hash not in f.read(), "the installed aigw.ini accepts the public demo key")

    # aigw.ini(5) names every key of every section
    with open(mans[2]) as f:
        page = f.read()
    for kind, ks in want.items():
        check(f'.SS "[{kind}' in page, f"aigw.ini.5 has no [{kind}] section")
        for k in ks:
            check(re.search(rf"^\.B .*\b{k}\b", page, re.M), f"aigw.ini.5 lacks key {k}")
    with open(mans[0]) as f:
        check("\n.B \\-D\n" in f.read(), "aigw.8 does not document -D")

    if shutil.which("groff"):
        for m in mans:
            r = subprocess.run(["groff", "-man", "-z", "-ww", m], capture_output=True, text=True,
                               timeout=30)
            check(r.returncode == 0 and not r.stderr.strip(), f"groff on {m}: {r.stderr}")

    with open(unit) as f:
        text = f.read()
    bindir = os.path.dirname(_find(dest, "/bin/aigw"))[len(dest):]
    confdir = os.path.dirname(ini)[len(dest):]
    for line in ("Type=notify", f"ExecStart={bindir}/aigw -c {confdir}/aigw.ini",
                 f"ExecReload={bindir}/aigwctl -c {confdir}/aigw.ini reload",
                 "WantedBy=multi-user.target"):
        check(f"\n{line}\n" in text, f"aigw.service lacks {line!r}")
    check("@" not in text, "aigw.service has an unsubstituted @VAR@")
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "verify", "--man=no", unit], capture_output=True,
                           text=True, timeout=60)
        # the programs are under --destdir, not where the unit points; anything else is a
        # mistake in the unit (unknown key, bad value, ...)
        bad = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip() and not re.search(
            r"is not executable: No such file|Unit sysinit.target not found", ln)]
        check(not bad, f"systemd-analyze verify aigw.service: {bad}")

    # a second install keeps an edited config
    with open(ini, "a") as f:
        f.write("# edited\n")
    _install(env)
    with open(ini) as f:
        check(f.read().endswith("# edited\n"), "meson install overwrote an existing aigw.ini")


def _notify_sock(env):
    path = os.path.join(env.dir, "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    env.socks.append(s)
    return s, path


def _recv_until(s, word, timeout):
    """Messages received until one holds the line `word`; Fail after timeout."""
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            msg = s.recv(4096).decode()
        except socket.timeout:
            break
        got.append(msg)
        if word in msg.split("\n"):
            return msg, got
    raise Fail(f"no {word} within {timeout}s; got {got}")


def test_sd_notify(env):
    m = env.mock("m1")
    s, path = _notify_sock(env)
    gw = env.gateway([m], start=False, proc_env=dict(os.environ, NOTIFY_SOCKET=path))
    gw.start(wait=False)
    msg, _ = _recv_until(s, "READY=1", 15)
    # READY=1 comes once the listeners are bound and the children forked
    check(port_accepts(gw.port, 0.5), "READY=1 arrived before the port accepts")
    check(f"MAINPID={gw.proc.pid}" in msg.split("\n"), f"READY message without MAINPID: {msg!r}")
    gw.wait_ready()
    check(chat(gw.port, chat_body("hi")).status == 200, "request after READY=1")
    gw.proc.signal(signal.SIGTERM)
    _recv_until(s, "STOPPING=1", 10)
    check(gw.proc.wait(10) == 0, "aigw did not exit 0 after SIGTERM")


def test_no_notify_socket(env):
    # without NOTIFY_SOCKET nothing is sent and nothing fails
    m = env.mock("m1")
    e = dict(os.environ)
    e.pop("NOTIFY_SOCKET", None)
    gw = env.gateway([m], proc_env=e)
    check(chat(gw.port, chat_body("hi")).status == 200, "request without NOTIFY_SOCKET")
    check(gw.stop() == 0, "aigw did not exit 0")


def test_pidfile(env):
    m = env.mock("m1")
    pidfile = os.path.join(env.dir, "aigw.pid")
    gw = env.gateway([m], glob={"pidfile": pidfile})
    with open(pidfile) as f:
        check(f.read() == f"{gw.proc.pid}\n", "pidfile does not hold the master's pid")
    # a second start with the same pidfile is refused, naming the running pid
    conf2 = os.path.join(env.dir, "second.ini")
    with open(conf2, "w") as f:
        f.write(gw.conf_text.replace(gw.sock_path, os.path.join(env.dir, "second.sock"))
                .replace(f"127.0.0.1:{gw.port}", f"127.0.0.1:{free_port()}"))
    r = subprocess.run([AIGW, "-c", conf2], capture_output=True, text=True, timeout=20,
                       cwd=env.dir)
    check(r.returncode == 1, f"second start exited {r.returncode}: {r.stderr[-500:]}")
    check(f"already running as pid {gw.proc.pid}" in r.stderr,
          f"second start's message: {r.stderr[-500:]}")
    with open(pidfile) as f:
        check(f.read() == f"{gw.proc.pid}\n", "the refused start touched the pidfile")
    check(gw.stop() == 0, "aigw did not exit 0")
    check(not os.path.exists(pidfile), "pidfile left after the stop")

    # a pidfile naming a dead process (a kill -9) is replaced
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(pidfile, "w") as f:
        f.write(f"{dead.pid}\n")
    gw.start()
    with open(pidfile) as f:
        check(f.read() == f"{gw.proc.pid}\n", "stale pidfile not replaced")
    check(gw.stop() == 0, "aigw did not exit 0")


def _status_ids(pid):
    ids = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Uid", "Gid", "Groups"):
                ids[k] = v.split()
    return ids


def test_user_group(env):
    if os.geteuid() != 0:
        raise Skip("needs root to switch users")
    import grp
    import pwd
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    m = env.mock("m1")
    gw = env.gateway([m], glob={"user": "nobody", "admin_group": group})
    procs = gw.procs()
    check(len(procs) == 4, f"show proc: {procs}")
    for p in procs:
        ids = _status_ids(p["pid"])
        check(ids["Uid"] == [str(nobody.pw_uid)] * 4,
              f"{p['role']} (pid {p['pid']}) uids {ids['Uid']}, want nobody's")
        check(ids["Gid"] == [str(nobody.pw_gid)] * 4,
              f"{p['role']} (pid {p['pid']}) gids {ids['Gid']}")
        check(ids["Groups"] in ([], [str(nobody.pw_gid)]),
              f"{p['role']} kept supplementary groups {ids['Groups']}")
    st = os.stat(gw.sock_path)
    check(st.st_uid == nobody.pw_uid, f"admin socket owner {st.st_uid}")
    check(st.st_gid == nobody.pw_gid and stat.S_IMODE(st.st_mode) == 0o660,
          f"admin socket gid {st.st_gid} mode {oct(stat.S_IMODE(st.st_mode))}")
    check(chat(gw.port, chat_body("as nobody")).status == 200, "request as nobody")
    check(gw.stop() == 0, "aigw did not exit 0")

    # without admin_group the socket stays 0600, owned by the user
    gw2 = env.gateway([m], name="gw2", glob={"user": "nobody"})
    st = os.stat(gw2.sock_path)
    check(st.st_uid == nobody.pw_uid and stat.S_IMODE(st.st_mode) == 0o600,
          f"admin socket uid {st.st_uid} mode {oct(stat.S_IMODE(st.st_mode))}")
    check(gw2.ctl("show", "proc").returncode == 0, "aigwctl show proc")
    check(gw2.stop() == 0, "aigw did not exit 0")


def test_user_errors(env):
    conf = os.path.join(env.dir, "bad.ini")
    for key, val, what in (("user", "no-such-user-aigw", "unknown user"),
                           ("group", "no-such-group-aigw", "unknown group"),
                           ("admin_group", "no-such-group-aigw", "unknown group")):
        with open(conf, "w") as f:
            f.write(f"[global]\nworkers = 1\n{key} = {val}\n[listen main]\n"
                    "bind = 127.0.0.1:8080\n[pool p]\n[backend b]\nurl = http://127.0.0.1:1\n")
        for argv in ([AIGW, "-t", "-c", conf], [AIGW, "-c", conf]):
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=env.dir)
            check(r.returncode == 1, f"{' '.join(argv)} with {key} = {val}: exit {r.returncode}")
            check(f"{conf}:3: [global] key '{key}': {what} '{val}'" in r.stderr,
                  f"{' '.join(argv)}: {r.stderr!r}")

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return
    # not root, asked to become another user: a clear refusal, nothing bound
    d = tempfile.mkdtemp(prefix="aigw-it-user-")
    os.chmod(d, 0o777)
    try:
        conf = os.path.join(d, "root.ini")
        with open(conf, "w") as f:
            f.write(f"[global]\nworkers = 1\nuser = root\nadmin_socket = {d}/a.sock\n"
                    f"[listen main]\nbind = 127.0.0.1:{free_port()}\n[pool p]\n[backend b]\n"
                    "url = http://127.0.0.1:1\n")
        os.chmod(conf, 0o644)
        r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                            AIGW, "-c", conf], capture_output=True, text=True, timeout=20, cwd=d)
        check(r.returncode == 1, f"non-root start with user = root exited {r.returncode}")
        check("[global] user = root" in r.stderr and "may not switch" in r.stderr,
              f"non-root start with user = root: {r.stderr[-400:]}")
        check(not os.path.exists(f"{d}/a.sock"), "admin socket created before the refusal")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _kill_daemon(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def test_daemonize(env):
    m = env.mock("m1")
    pidfile = os.path.join(env.dir, "aigw.pid")
    gw = env.gateway([m], start=False, glob={"pidfile": pidfile})
    e = dict(os.environ)
    e.pop("NOTIFY_SOCKET", None)
    log = open(os.path.join(env.dir, "daemon.log"), "wb")
    t0 = time.monotonic()
    parent = subprocess.Popen([AIGW, "-D", "-c", gw.conf_path], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=log, cwd=env.dir, env=e)
    daemon = None
    try:
        rc = parent.wait(20)
        check(rc == 0, f"aigw -D exited {rc}; log: {open(log.name).read()[-500:]}")
        # the parent returns only once the daemon is up: the port accepts at once
        check(port_accepts(gw.port, 0.5), f"port not accepting when aigw -D returned "
                                           f"({time.monotonic() - t0:.2f}s)")
        with open(pidfile) as f:
            daemon = int(f.read().strip())
        check(daemon != parent.pid and pid_alive(daemon), f"pidfile holds {daemon}")
        check(os.getsid(daemon) == daemon, "the daemon is not a session leader")
        check(chat(gw.port, chat_body("daemon")).status == 200, "request to the daemon")
        procs = gw.procs()
        check([p["pid"] for p in procs if p["role"] == "master"] == [daemon],
              f"show proc's master is not the pidfile's pid: {procs}")
        os.kill(daemon, signal.SIGTERM)
        wait_for(lambda: not pid_alive(daemon), 15, "the daemon to exit after SIGTERM")
        check(not os.path.exists(pidfile), "pidfile left after the daemon stopped")
        check("master started" in open(log.name).read(), "the daemon's log is not kept in a file")
    finally:
        if daemon:
            _kill_daemon(daemon)
        log.close()


def test_daemonize_errors(env):
    e = dict(os.environ)
    e.pop("NOTIFY_SOCKET", None)
    # a bad file: exit 1 with the FILE:LINE message, nothing forked
    conf = os.path.join(env.dir, "bad.ini")
    with open(conf, "w") as f:
        f.write("[global]\nworkers = zero\n")
    r = subprocess.run([AIGW, "-D", "-c", conf], capture_output=True, text=True, timeout=20,
                       cwd=env.dir, env=e)
    check(r.returncode == 1 and f"{conf}:2: [global] key 'workers'" in r.stderr,
          f"aigw -D on a bad file: exit {r.returncode}, {r.stderr!r}")

    # a start that fails after the fork (port taken): the parent reports it and exits 1
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    env.socks.append(held)
    port = held.getsockname()[1]
    pidfile = os.path.join(env.dir, "aigw.pid")
    with open(conf, "w") as f:
        f.write(f"[global]\nworkers = 1\nadmin_socket = {env.dir}/d.sock\npidfile = {pidfile}\n"
                f"[listen main]\nbind = 127.0.0.1:{port}\n[pool p]\ncheck = no\n[backend b]\n"
                "url = http://127.0.0.1:1\n")
    r = subprocess.run([AIGW, "-D", "-c", conf], capture_output=True, text=True, timeout=20,
                       cwd=env.dir, env=e)
    check(r.returncode == 1, f"aigw -D with its port taken exited {r.returncode}: {r.stderr!r}")
    check(f"cannot bind 127.0.0.1:{port}" in r.stderr, f"aigw -D's message: {r.stderr!r}")
    check(not os.path.exists(pidfile), "pidfile left by a failed start")
