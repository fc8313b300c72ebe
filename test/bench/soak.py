#!/usr/bin/env python3
"""make soak: aigw (2 workers, 3 mock backends) under mixed traffic for SOAK_SECONDS (default
600): keep-alive JSON requests, SSE streams, clients that leave before the answer or in the
middle of a stream, and every SOAK_KILL_EVERY seconds one backend killed (SIGKILL) and started
again SOAK_DOWN seconds later. Passes when no request failed that a retry could have saved
(every failure before a response started: another backend was up), no stream was cut without
an `event: error`, no aigw process restarted, and the RSS and open fds of every aigw process are
flat at the end (the numbers at the start and the end are reported). Writes BUILD/bench/soak.txt.

usage: test/bench/soak.py [--build build] [--seconds 600] [--port 18460]
env:   SOAK_SECONDS, SOAK_KILL_EVERY=60, SOAK_DOWN=10, SOAK_JSON_RPS=300, SOAK_STREAMS=24,
       SOAK_ABORTERS=4, SOAK_PORT=18460 (four consecutive loopback ports), SOAK_RETRIES=2 (the
       pool's retries; 0 shows what the soak catches without them)
"""

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BODY = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "soak"}]},
                  separators=(",", ":")).encode()
SBODY = json.dumps({"model": "demo", "stream": True,
                    "messages": [{"role": "user", "content": "soak"}]},
                   separators=(",", ":")).encode()

# RSS may grow this much from the warmed-up sample to the end (allocator noise, pools filling
# up to their caps) and still count as flat.
RSS_SLACK_KB = 1024
RSS_SLACK_PCT = 5


def req(body, port, extra=()):
    head = [b"POST /v1/chat/completions HTTP/1.1", b"Host: 127.0.0.1:%d" % port,
            b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    head += [k.encode() + b": " + v.encode() for k, v in extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class Stats:
    def __init__(self):
        self.c = {}
        self.examples = {}

    def add(self, key, example=None):
        self.c[key] = self.c.get(key, 0) + 1
        if example is not None and key not in self.examples:
            self.examples[key] = example

    def get(self, key):
        return self.c.get(key, 0)


async def read_head(r):
    """Status and lower-cased headers of a response, or raises."""
    head = await r.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    hdrs = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
    return status, hdrs


async def read_body(r, hdrs, on_data=None):
    """The whole body (de-chunked); raises if the connection ends before its end."""
    out = bytearray()
    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        while True:
            line = await r.readuntil(b"\r\n")
            n = int(line.split(b";")[0], 16)
            if n == 0:
                await r.readuntil(b"\r\n")
                return bytes(out)
            data = await r.readexactly(n + 2)
            out += data[:n]
            if on_data and on_data(out):
                return bytes(out)
    if "content-length" in hdrs:
        return await r.readexactly(int(hdrs["content-length"]))
    return await r.read()


class Load:
    def __init__(self, port, stats):
        self.port = port
        self.s = stats
        self.stop = False

    async def json_client(self, interval):
        r = w = None
        while not self.stop:
            t0 = time.monotonic()
            try:
                if w is None:
                    r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.write(req(BODY, self.port))
                status, hdrs = await asyncio.wait_for(read_head(r), 30)
                body = await asyncio.wait_for(read_body(r, hdrs), 30)
                if status == 200 and b'"chat.completion"' in body:
                    self.s.add("json ok")
                else:
                    self.s.add("json failed (saveable)", f"{status} {body[:200]!r}")
                if hdrs.get("connection", "").lower() == "close":
                    w.close()
                    r = w = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    asyncio.TimeoutError, ValueError, IndexError) as e:
                self.s.add("json failed (saveable)", f"connection: {e!r}")
                if w is not None:
                    w.close()
                r = w = None
            await asyncio.sleep(max(0.0, interval * random.uniform(0.5, 1.5) -
                                    (time.monotonic() - t0)))
        if w is not None:
            w.close()

    async def stream_client(self):
        while not self.stop:
            w = None
            started = False
            try:
                r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.write(req(SBODY, self.port, [("x-mock-chunks", "10"),
                                                ("x-mock-chunk-interval", "50ms"),
                                                ("Connection", "close")]))
                status, hdrs = await asyncio.wait_for(read_head(r), 30)
                if status != 200:
                    body = await asyncio.wait_for(read_body(r, hdrs), 30)
                    self.s.add("stream failed before its answer (saveable)",
                               f"{status} {body[:200]!r}")
                    continue
                started = True
                body = await asyncio.wait_for(read_body(r, hdrs), 60)
                if body.rstrip().endswith(b"data: [DONE]"):
                    self.s.add("stream ok")
                elif b"event: error" in body:
                    self.s.add("stream cut with event: error (backend killed mid-stream)")
                else:
                    self.s.add("stream cut silently", body[-200:])
            except (asyncio.IncompleteReadError, OSError, asyncio.TimeoutError,
                    asyncio.LimitOverrunError, ValueError, IndexError) as e:
                if started:
                    self.s.add("stream cut silently", f"connection: {e!r}")
                else:
                    self.s.add("stream failed before its answer (saveable)",
                               f"connection: {e!r}")
            finally:
                if w is not None:
                    w.close()

    async def aborter(self):
        """Leaves early: before the answer of a slow JSON request, or a few events into a
        stream."""
        while not self.stop:
            w = None
            try:
                r, w = await asyncio.open_connection("127.0.0.1", self.port)
                if random.random() < 0.5:
                    w.write(req(BODY, self.port, [("x-mock-delay", "300ms")]))
                    await w.drain()
                    await asyncio.sleep(random.uniform(0.01, 0.2))
                    self.s.add("abort before the answer")
                else:
                    w.write(req(SBODY, self.port, [("x-mock-chunks", "40"),
                                                   ("x-mock-chunk-interval", "25ms")]))
                    status, hdrs = await asyncio.wait_for(read_head(r), 30)
                    if status == 200:
                        n = random.randint(1, 5)
                        await asyncio.wait_for(
                            read_body(r, hdrs, lambda b: b.count(b"\n\n") >= n), 30)
                        self.s.add("abort mid-stream")
                    else:
                        self.s.add("stream failed before its answer (saveable)",
                                   f"aborter: {status}")
            except (asyncio.IncompleteReadError, OSError, asyncio.TimeoutError, ValueError,
                    IndexError, asyncio.LimitOverrunError) as e:
                self.s.add("aborter connection error", repr(e))
            finally:
                if w is not None:
                    w.transport.abort()  # RST-like: no graceful close
            await asyncio.sleep(random.uniform(0.05, 0.15))


class Procs:
    """Everything started here, each in its own process group, stopped by its pid on exit."""

    def __init__(self, d):
        self.d = d
        self.all = []

    def start(self, name, argv, cwd=None):
        log = open(os.path.join(self.d, name + ".log"), "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                             start_new_session=True)
        self.all.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=10):
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def stop_all(self):
        for p in reversed(self.all):
            try:
                self.stop(p)
            except (OSError, subprocess.TimeoutExpired):
                pass


def wait_port(port, proc, timeout=10):
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def proc_sample(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return rss, fds
    except (OSError, StopIteration):
        return None, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("SOAK_SECONDS", 600)))
    ap.add_argument("--port", type=int, default=int(os.environ.get("SOAK_PORT", 18460)))
    a = ap.parse_args()
    kill_every = int(os.environ.get("SOAK_KILL_EVERY", 60))
    down = int(os.environ.get("SOAK_DOWN", 10))
    json_rps = int(os.environ.get("SOAK_JSON_RPS", 300))
    streams = int(os.environ.get("SOAK_STREAMS", 24))
    aborters = int(os.environ.get("SOAK_ABORTERS", 4))
    build = os.path.join(ROOT, a.build) if not os.path.isabs(a.build) else a.build
    mock = os.path.join(build, "test", "mock", "aigw-mock")
    aigw = os.path.join(build, "cmd", "aigw")
    ctl = os.path.join(build, "cmd", "aigwctl")
    for f in (mock, aigw, ctl):
        if not os.access(f, os.X_OK):
            sys.exit(f"soak: {f} not built")
    # the whole run is bounded, whatever happens
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("soak: ran too long, stopped"))
    signal.alarm(a.seconds + 120)

    d = tempfile.mkdtemp(prefix="aigw-soak.")
    procs = Procs(d)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("soak: terminated"))
    try:
        return run(a, d, procs, mock, aigw, ctl, build, kill_every, down, json_rps, streams,
                   aborters)
    finally:
        procs.stop_all()
        subprocess.run(["rm", "-rf", d])


def run(a, d, procs, mock, aigw, ctl, build, kill_every, down, json_rps, streams, aborters):
    names = ["a", "b", "c"]
    ports = {n: a.port + i for i, n in enumerate(names)}
    gw_port = a.port + 3
    mocks = {}

    def start_mock(n):
        p = procs.start(f"mock-{n}", [mock, "--listen", f"127.0.0.1:{ports[n]}", "--name", n,
                                      "--created", "1700000000"])
        if not wait_port(ports[n], p):
            sys.exit(f"soak: mock {n} did not start on {ports[n]}")
        mocks[n] = p

    for n in names:
        start_mock(n)
    conf = os.path.join(d, "aigw.ini")
    sock = os.path.join(d, "aigw.sock")
    with open(conf, "w") as f:
        f.write(f"""[global]
workers = 2
admin_socket = {sock}
log_level = warn

[listen soak]
auth = off
bind = 127.0.0.1:{gw_port}
pool = soak

[pool soak]
check = yes
check_interval = 500ms
rise = 2
fall = 2
connect_timeout = 1s
first_byte_timeout = 10s
stream_idle_timeout = 10s
pool_idle_timeout = 5s
retries = {os.environ.get("SOAK_RETRIES", "2")}
""")
        for n in names:
            f.write(f"\n[backend {n}]\nurl = http://127.0.0.1:{ports[n]}/v1\nkeepalive = 64\n")
    gw = procs.start("aigw", [aigw, "-c", conf], cwd=d)
    if not wait_port(gw_port, gw):
        sys.exit("soak: aigw did not start: " + open(os.path.join(d, "aigw.log")).read()[-500:])

    def proc_list():
        out = subprocess.run([ctl, "-s", sock, "show", "proc", "--json"], capture_output=True,
                             text=True, timeout=10).stdout
        return json.loads(out) if out.strip() else []

    time.sleep(1.5)  # checks settle, backends UP
    start_procs = proc_list()
    samples = []  # (t, {role/slot: (pid, rss, fds)})

    def sample(t):
        s = {}
        for p in proc_list():
            key = p["role"] + ("" if p["slot"] < 0 else str(p["slot"]))
            s[key] = (p["pid"],) + proc_sample(p["pid"])
        samples.append((t, s))

    sample(0.0)
    idle_before = samples[-1][1]
    stats = Stats()
    load = Load(gw_port, stats)
    kills = []
    load_avg_before = open("/proc/loadavg").read().split()[:3]

    async def chaos(t0):
        i = 0
        next_kill = kill_every
        next_sample = 5
        while True:
            t = time.monotonic() - t0
            if t >= a.seconds:
                return
            if t >= next_sample:
                await asyncio.get_running_loop().run_in_executor(None, sample, t)
                next_sample += 5
            if kill_every and t >= next_kill and t + down < a.seconds:
                n = names[i % len(names)]
                i += 1
                os.kill(mocks[n].pid, signal.SIGKILL)
                mocks[n].wait()
                kills.append((round(t, 1), n))
                await asyncio.sleep(down)
                await asyncio.get_running_loop().run_in_executor(None, start_mock, n)
                next_kill += kill_every
            await asyncio.sleep(0.2)

    async def main_load():
        t0 = time.monotonic()
        n_json = max(1, json_rps // 20)
        tasks = [asyncio.create_task(load.json_client(n_json / json_rps)) for _ in range(n_json)]
        tasks += [asyncio.create_task(load.stream_client()) for _ in range(streams)]
        tasks += [asyncio.create_task(load.aborter()) for _ in range(aborters)]
        await chaos(t0)
        load.stop = True
        await asyncio.wait(tasks, timeout=40)

    print(f"soak: {a.seconds}s: JSON ~{json_rps}/s, {streams} streams, {aborters} aborting "
          f"clients, a backend killed every {kill_every}s for {down}s ...", file=sys.stderr)
    t_load = time.monotonic()
    asyncio.run(main_load())
    load_s = time.monotonic() - t_load
    # pooled upstream connections close after pool_idle_timeout; then the gateway is idle
    time.sleep(7)
    sample(load_s + 7)
    idle_after = samples[-1][1]
    end_procs = proc_list()

    under_load = [s for t, s in samples if 0 < t <= a.seconds]
    warm = under_load[max(0, len(under_load) // 4 - 1)] if under_load else idle_before
    last = under_load[-1] if under_load else idle_before
    problems = []
    saveable = stats.get("json failed (saveable)") + \
        stats.get("stream failed before its answer (saveable)")
    if saveable:
        problems.append(f"{saveable} requests failed that a retry could have saved")
    if stats.get("stream cut silently"):
        problems.append(f"{stats.get('stream cut silently')} streams cut without event: error")
    restarts = {p["role"] + str(p["slot"]): p["restarts"] for p in end_procs}
    if any(restarts.values()) or len(end_procs) != len(start_procs):
        problems.append(f"aigw processes restarted: {restarts}")
    rows = []
    for key in sorted(idle_before):
        b, w, l, e = idle_before.get(key), warm.get(key), last.get(key), idle_after.get(key)
        if not (b and w and l and e) or None in b + w + l + e:
            problems.append(f"{key}: missing samples")
            continue
        rows.append((key, b, w, l, e))
        if e[0] != b[0]:
            problems.append(f"{key}: pid changed {b[0]} -> {e[0]}")
        if l[1] > w[1] + max(RSS_SLACK_KB, w[1] * RSS_SLACK_PCT // 100):
            problems.append(f"{key}: RSS grew under load {w[1]} -> {l[1]} kB")
        if e[2] != b[2]:
            problems.append(f"{key}: open fds idle before {b[2]}, idle after {e[2]}")

    out = []
    out.append(f"# aigw make soak, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
               f"{a.seconds}s, commit " + subprocess.run(
                   ["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                   text=True).stdout.strip())
    out.append(f"# load average before: {' '.join(load_avg_before)}, after: "
               f"{' '.join(open('/proc/loadavg').read().split()[:3])}")
    out.append(f"# traffic: JSON ~{json_rps}/s, {streams} streams of 12 events 50 ms apart, "
               f"{aborters} clients leaving early; backend killed (SIGKILL) every {kill_every}s, "
               f"back {down}s later: {', '.join(f'{n} at {t}s' for t, n in kills) or 'none'}")
    for k in sorted(stats.c):
        out.append(f"{stats.c[k]:9d}  {k}")
    for k, ex in sorted(stats.examples.items()):
        if "ok" not in k and "abort" not in k:
            out.append(f"           e.g. {k}: {ex}")
    out.append("process   pid    RSS kB: idle before / warm (1/4) / end of load / idle after"
               "    fds: idle before / warm / end of load / idle after")
    for key, b, w, l, e in rows:
        out.append(f"{key:8s} {b[0]:6d}   {b[1]:8d} {w[1]:8d} {l[1]:8d} {e[1]:8d}"
                   f"           {b[2]:5d} {w[2]:5d} {l[2]:5d} {e[2]:5d}")
    out.append("result: " + ("PASS" if not problems else "FAIL: " + "; ".join(problems)))
    text = "\n".join(out)
    print(text)
    os.makedirs(os.path.join(build, "bench"), exist_ok=True)
    with open(os.path.join(build, "bench", "soak.txt"), "w") as f:
        f.write(text + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
