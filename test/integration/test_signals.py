"""Signals an operator may send, to the master or to the whole process group (as a terminal
does): none may kill or restart a process unless it asks for a stop. SIGQUIT is a graceful
stop like SIGTERM (as nginx's QUIT)."""

import os
import signal
import time

from harness import (SseRecorder, build_request, chat, chat_body, check, connect_refused,
                     group_pids, wait_for)

# Everything but the stop signals (TERM, INT, QUIT), job control (TSTP, STOP, CONT) and what
# only the kernel sends (SEGV, BUS, ...), SIGHUP, which reloads (test_reload.py), and SIGUSR2,
# which upgrades the binary (test_upgrade.py).
HARMLESS = [signal.SIGUSR1, signal.SIGPIPE, signal.SIGALRM,
            signal.SIGTTIN, signal.SIGTTOU, signal.SIGXFSZ, signal.SIGVTALRM, signal.SIGPROF,
            signal.SIGPWR, signal.SIGSTKFLT, signal.SIGIO]


def _proc_state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return None
    return st[st.rindex(")") + 2:].split()[0]


def _pids(gw):
    return {(p["role"], p.get("slot", -1)): (p["pid"], p.get("restarts", 0))
            for p in gw.procs()}


def test_signals_not_fatal(env):
    m = env.mock("m1")
    gw = env.gateway([m], workers=2)
    before = _pids(gw)
    pgid = gw.proc.pid
    check(chat(gw.port, chat_body("before")).status == 200, "request before the signals")
    for sig in HARMLESS:
        for to_group in (False, True):
            if to_group:
                os.killpg(pgid, sig)
            else:
                os.kill(gw.proc.pid, sig)
            time.sleep(0.15)
            where = f"{sig.name} to the {'process group' if to_group else 'master'}"
            check(gw.proc.alive(), f"the master died on {where}; log: "
                                   f"{' | '.join(gw.proc.log_tail(5))}")
            for pid in group_pids(pgid):
                check(_proc_state(pid) not in ("T", "t"), f"pid {pid} stopped by {where}")
            r = chat(gw.port, chat_body(f"after {sig.name}"), timeout=5)
            check(r.status == 200, f"request after {where}: {r!r}")
    after = _pids(gw)
    check(after == before, f"processes restarted by the signals: before {before}, after {after}")
    log = gw.proc.log_text()
    for want in ("SIGUSR1 received",):
        check(want in log, f"the log lacks '{want}'")
    check(" exited with code" not in log and "killed by signal" not in log,
          "a child ended: " + " | ".join(ln for ln in log.splitlines()
                                         if "exited with" in ln or "killed by" in ln))
    check(os.path.exists(gw.sock_path), "admin socket gone")


def _sigquit_stream(env, to_group):
    m = env.mock("m1", "--chunks", 8, "--chunk-interval", "150ms")
    gw = env.gateway([m], workers=2, glob={"hard_stop_after": "10s"})
    master = gw.proc
    pgid = master.pid
    sent = []

    def on_body(data):
        rec(data)
        if rec.events and not sent:
            if to_group:
                os.killpg(pgid, signal.SIGQUIT)
            else:
                master.signal(signal.SIGQUIT)
            sent.append(time.monotonic())

    rec = SseRecorder()
    c = env.conn(gw.port, timeout=10)
    c.send(build_request("POST", "/v1/chat/completions", [("Content-Type", "application/json")],
                         chat_body("long answer", stream=True)))
    r = c.read_response(on_body=on_body)
    check(sent, "no SSE event arrived, SIGQUIT never sent")
    check(r.status == 200 and r.body.rstrip().endswith(b"data: [DONE]"),
          f"the stream in flight did not finish after SIGQUIT: {r.status} {r.body[-120:]!r}")
    c.close()
    rc = master.wait(8)
    check(rc is not None, "master still running 8s after SIGQUIT")
    check(rc == 0, f"master exit status {rc} after SIGQUIT, expected 0 (a graceful stop)")
    check(connect_refused(gw.port), "listening port still accepts after the master exited")
    check(not os.path.exists(gw.sock_path), "admin socket left behind after SIGQUIT")
    wait_for(lambda: not group_pids(pgid), 3, "workers and health checker to exit")
    log = master.log_text()
    check("SIGQUIT received" in log, "the master did not log SIGQUIT")
    check("core dumped" not in log and "killed by signal" not in log,
          "a child was killed: " + " | ".join(ln for ln in log.splitlines() if "killed" in ln))


def test_sigquit_graceful_stop(env):
    _sigquit_stream(env, False)


def test_sigquit_group_graceful_stop(env):
    _sigquit_stream(env, True)
