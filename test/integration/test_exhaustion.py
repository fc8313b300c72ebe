"""Running out of file descriptors is the gateway's problem, not its backends': maxconn makes
extra clients wait in the kernel's backlog, and the fd limit is set to fit it."""

import os
import re
import resource
import signal
import subprocess
import time

from harness import build_request, chat_body, check

CHAT = ("POST", "/v1/chat/completions")


def _req(text):
    return build_request(*CHAT, [("Content-Type", "application/json")], chat_body(text))


def _served(c, text, status=200):
    c.send(_req(text))
    r = c.read_response()
    check(r.status == status, f"request '{text}': {r!r}")
    return r


def _waiting(c, secs):
    """The connection gets no byte and is not closed for secs: it waits in the backlog."""
    return not c.wait_closed(secs) and not c.buf


def test_maxconn_waits_then_serves(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, glob={"maxconn": 2})
    a, b = env.conn(gw.port), env.conn(gw.port)
    _served(a, "a")
    _served(b, "b")
    # a third client connects (the kernel completes the handshake) but is not accepted
    c = env.conn(gw.port)
    c.send(_req("c"))
    check(_waiting(c, 1.0), f"a third connection was served (or closed) with maxconn 2: "
                            f"{c.buf[:80]!r}")
    _served(a, "a again")  # the two accepted ones keep working
    a.close()
    r = c.read_response()
    check(r.status == 200, f"the waiting connection after one closed: {r!r}")
    log = gw.proc.log_text()
    check("maxconn reached" in log, "reaching maxconn is not logged")
    check("maxconn 2 (2 per worker)" in log, "the master does not log the resolved maxconn")


def test_listen_maxconn(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=1, listen={"maxconn": 1})
    a = env.conn(gw.port)
    _served(a, "a")
    b = env.conn(gw.port)
    b.send(_req("b"))
    check(_waiting(b, 0.8), "a second connection was served with the listen's maxconn 1")
    a.close()
    r = b.read_response()
    check(r.status == 200, f"the waiting connection after the first closed: {r!r}")


def _lowest_free_fd(pid):
    used = {int(x) for x in os.listdir(f"/proc/{pid}/fd")}
    n = 0
    while n in used:
        n += 1
    return n


def _run_limited(env, glob, nofile, wait=3.0):
    """aigw under RLIMIT_NOFILE nofile (soft = hard) without CAP_SYS_RESOURCE (so it cannot
    raise the hard limit, as an unprivileged master): (returncode or None if still running,
    log text). A running one is stopped."""
    from harness import AIGW, free_port

    port = free_port()
    path = os.path.join(env.dir, "lim.ini")
    g = {"workers": 1, "admin_socket": os.path.join(env.dir, "lim.sock")}
    g.update(glob)
    with open(path, "w") as f:
        f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in g.items()))
        f.write(f"[listen main]\nbind = 127.0.0.1:{port}\n[pool main]\ncheck = no\n"
                f"[backend a]\nurl = http://127.0.0.1:9/v1\n")
    argv = ["prlimit", f"--nofile={nofile}:{nofile}", "setpriv", "--bounding-set=-sys_resource",
            "--inh-caps=-sys_resource", AIGW, "-c", path]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=wait)
        return p.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)
        out, _ = p.communicate(timeout=10)
        return None, out


def test_maxconn_needs_fds_fails_clearly(env):
    rc, out = _run_limited(env, {"maxconn": 1000}, 200)
    check(rc == 1, f"aigw with maxconn 1000 under a hard fd limit of 200 exited {rc}: {out!r}")
    check("maxconn 1000 needs" in out and "RLIMIT_NOFILE" in out and "hard 200" in out,
          f"the failure does not say why: {out!r}")
    # without maxconn it takes what the hard limit allows (about half of it: one upstream
    # socket per client) and runs
    rc, out = _run_limited(env, {}, 200)
    check(rc is None, f"aigw without maxconn under a hard fd limit of 200 exited {rc}: {out!r}")
    m = re.search(r"maxconn (\d+) \((\d+) per worker\), RLIMIT_NOFILE 200", out)
    check(m and 50 <= int(m.group(1)) < 100, f"maxconn derived from the fd limit: {out!r}")
