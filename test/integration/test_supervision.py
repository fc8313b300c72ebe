"""The master's supervision of its children: what a dead worker held in shm is given back when
the master reaps it, not when (or if) its replacement starts."""

import os
import signal
import time

from harness import build_request, chat_body, check, wait_for


def _worker0(gw):
    for p in gw.procs(quiet=True) or []:
        if p.get("role") == "worker" and p.get("slot") == 0:
            return p
    return None


def test_dead_worker_slots_released_when_reaped(env):
    m = env.mock("m1")
    gw = env.gateway([("m1", m, {"max_conns": 1})], workers=1,
                     pool={"first_byte_timeout": "60s"})
    # a crash loop: each replacement dies within RESTART_FAST_MS of its start, so the master
    # waits longer and longer (100, 200, 400, 800 ms) before starting the next one
    for i in range(5):
        w = wait_for(lambda: (_worker0(gw) or {}).get("pid") or None, 5,
                     f"worker 0 to be running (round {i})")
        if i == 4:
            # the last one holds the backend's only in-flight slot (max_conns 1) when it dies
            c = env.conn(gw.port, timeout=10)
            c.send(build_request("POST", "/v1/chat/completions",
                                 [("Content-Type", "application/json"), ("x-mock-stall", "1")],
                                 chat_body("held")))
            wait_for(lambda: gw.backend("m1").get("active") == 1, 5,
                     "the stalled request to hold the in-flight slot")
        os.kill(w, signal.SIGKILL)
        if i < 4:
            wait_for(lambda: (_worker0(gw) or {}).get("pid") not in (None, 0, w), 5,
                     f"worker 0 to be restarted (round {i})")
    # while the replacement waits out its back-off (800 ms), the slot must already be free
    t0 = time.monotonic()
    seen = None
    while time.monotonic() - t0 < 0.7:
        p, b = _worker0(gw), gw.backend("m1")
        if p and p.get("pid") == 0:
            seen = (p.get("pid"), b.get("active"))
            if b.get("active") == 0:
                break
        time.sleep(0.02)
    check(seen is not None, "never saw worker 0 waiting for its restart (pid 0)")
    check(seen[1] == 0, f"the dead worker's in-flight slot is still counted while its "
                        f"replacement waits: show backends says active {seen[1]}")
    # and the replacement serves, the slot usable again
    wait_for(lambda: (_worker0(gw) or {}).get("pid"), 5, "worker 0 to be restarted")
    wait_for(lambda: gw.backend("m1").get("active") == 0, 2, "active back to 0")


def test_worker_forked_while_admin_connected(env):
    """A worker forked while an aigwctl connection is open releases the master's copy of it
    (regression: the sanitizer build's worker reported the connection's memory as leaked)."""
    import socket
    m = env.mock("m1")
    gw = env.gateway([m], workers=1)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(gw.sock_path)  # open, no command yet: the master holds it when it forks
    w = wait_for(lambda: (_worker0(gw) or {}).get("pid") or None, 5, "worker 0")
    time.sleep(0.1)
    os.kill(w, signal.SIGKILL)
    wait_for(lambda: (_worker0(gw) or {}).get("pid") not in (None, 0, w), 5,
             "worker 0 to be restarted")
    s.close()
    check(gw.stop() == 0, "aigw did not stop cleanly")
    reports = env.sanitizer_reports()
    check(not reports, "\n".join(reports[:8]))
