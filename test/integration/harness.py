"""Integration test harness: starts aigw-mock upstreams and aigw gateways on loopback ports,
speaks raw HTTP/1.1 over sockets (byte-level control for pipelining, chunked uploads,
100-continue and SSE timing), calls aigwctl, and always tears everything down."""

import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.path.join(ROOT, os.environ.get("AIGW_BUILD", "build"))
AIGW = os.path.join(BUILD, "cmd", "aigw")
AIGWCTL = os.path.join(BUILD, "cmd", "aigwctl")
MOCK = os.path.join(BUILD, "test", "mock", "aigw-mock")
GEN_CERTS = os.path.join(ROOT, "test", "mock", "gen-certs.sh")

# Fixed "created" for the mocks so answers are byte-for-byte reproducible.
CREATED = "1700000000"

SANITIZER_PATTERNS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")
# the master logging a child that crashed (tests kill with SIGKILL only)
CRASH_RE = re.compile(r"killed by signal (4|6|7|8|11|SIG(ILL|ABRT|BUS|FPE|SEGV))\b")


class Skip(Exception):
    """Raised by a test that cannot run here (the runner prints SKIP)."""


class Fail(AssertionError):
    pass


class Abort(Fail):
    """A failure that ends a wait_for() at once (the thing waited for can no longer happen)."""


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def wait_for(pred, timeout, what, interval=0.02):
    """Polls pred() until it returns a true value (returned) or the deadline passes (Fail)."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except Abort:
            raise
        except (OSError, ValueError, Fail) as e:
            last_exc = e
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc})" if last_exc else ""
            raise Fail(f"timed out after {timeout:.1f}s waiting for {what}{extra}")
        time.sleep(interval)


# ----------------------------------------------------------------------------------------------
# Ports

_used_ports = set()


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port():
    """A loopback TCP port that is free now. Ports are taken below the ephemeral range so an
    outgoing connection cannot grab one between this check and the server's bind."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(15000, max(15001, low - 1))
        if port in _used_ports:
            continue
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        _used_ports.add(port)
        return port
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    _used_ports.add(port)
    return port


def port_accepts(port, timeout=0.5):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def connect_refused(port):
    """True when a connection to the port is actively refused (nothing listening)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(("127.0.0.1", port))
        return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        s.close()


# ----------------------------------------------------------------------------------------------
# Processes


_all_procs = []


def kill_everything():
    """SIGKILL to every process group started by this run (the runner calls it when it is
    itself being stopped, so nothing outlives it)."""
    for p in _all_procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Proc:
    """A child process in its own process group, output to a log file."""

    def __init__(self, name, argv, log_path, cwd=None, env=None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        self.pid = self.p.pid
        self.scan_offset = 0
        _all_procs.append(self)

    def alive(self):
        return self.p.poll() is None

    def wait(self, timeout):
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, sig):
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill_group(self):
        """SIGKILL to the whole process group (master and all its children)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.wait(5)

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, n=15):
        lines = self.log_text().splitlines()
        return lines[-n:]

    def sanitizer_reports(self):
        """New sanitizer report lines (with a little context) since the last call."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.scan_offset)
                data = f.read()
        except OSError:
            return []
        self.scan_offset += len(data)
        lines = data.decode("utf-8", "replace").splitlines()
        out = []
        for i, line in enumerate(lines):
            if any(p in line for p in SANITIZER_PATTERNS):
                out.extend(lines[i : i + 12])
                break
        out.extend(line for line in lines if CRASH_RE.search(line) and line not in out)
        return out

    def close(self):
        if self.alive():
            self.kill_group()
        try:
            self.log.close()
        except OSError:
            pass


def group_pids(pgid):
    """Pids of live processes (not zombies) whose process group is pgid."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d))
    return out


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return False
    return st[st.rindex(")") + 2 :].split()[0] != "Z"


def ppid_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        st = f.read()
    return int(st[st.rindex(")") + 2 :].split()[1])


# ----------------------------------------------------------------------------------------------
# HTTP client


class Response:
    def __init__(self):
        self.version = ""
        self.status = 0
        self.reason = ""
        self.headers = []  # [(name, value)] as received
        self.body = b""  # de-chunked
        self.parts = []  # body pieces as they arrived (also when reading failed midway)
        self.chunked = False
        self.head_time = 0.0
        self.end_time = 0.0

    def header(self, name, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise Fail(f"response body is not JSON ({e}): {self.body[:300]!r}")

    def __repr__(self):
        return f"<{self.status} {self.reason} {self.headers} {self.body[:300]!r}>"


class Conn:
    """One client connection with a receive buffer."""

    def __init__(self, port, timeout=10.0, env=None):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = port
        self.timeout = timeout
        self.buf = b""
        self.eof = False
        if env is not None:
            env.socks.append(self)

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _recv(self, timeout=None):
        """Reads more into buf; False at EOF."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _need(self, n):
        while len(self.buf) < n:
            if not self._recv():
                raise Fail(f"connection closed after {len(self.buf)} of {n} bytes")

    def _line(self):
        while b"\r\n" not in self.buf:
            if not self._recv():
                raise Fail(f"connection closed in the middle of a line: {self.buf[:200]!r}")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read_head(self):
        """Reads a status line and headers; returns a Response without body."""
        while b"\r\n\r\n" not in self.buf:
            if not self._recv():
                if self.buf:
                    raise Fail(f"connection closed inside a response head: {self.buf[:300]!r}")
                raise Fail("connection closed with no response")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        r = Response()
        r.head_time = time.monotonic()
        m = re.match(r"(HTTP/1\.[01]) (\d{3})(?: (.*))?$", lines[0])
        if not m:
            raise Fail(f"bad status line {lines[0]!r}")
        r.version, r.status, r.reason = m.group(1), int(m.group(2)), m.group(3) or ""
        for line in lines[1:]:
            if ":" not in line:
                raise Fail(f"bad header line {line!r}")
            k, v = line.split(":", 1)
            r.headers.append((k.strip(), v.strip()))
        return r

    def read_response(self, method="POST", on_body=None, skip_continue=True):
        """Reads one whole response. on_body(bytes) is called with body data as it arrives
        (de-chunked). With skip_continue, 100 Continue heads are skipped."""
        while True:
            r = self.read_head()
            if r.status == 100 and skip_continue:
                continue
            break
        return self.read_body(r, method, on_body)

    def read_body(self, r, method="POST", on_body=None):
        """Reads the body of the response whose head read_head() returned; fills r.body."""
        if 100 <= r.status < 200 or r.status in (204, 304) or method == "HEAD":
            r.end_time = time.monotonic()
            return r
        body = r.parts = []  # kept on r so a caller sees what arrived before an error

        def emit(data):
            if data:
                body.append(data)
                if on_body:
                    on_body(data)

        te = (r.header("transfer-encoding") or "").lower()
        cl = r.header("content-length")
        if "chunked" in te:
            r.chunked = True
            while True:
                line = self._line()
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise Fail(f"bad chunk size line {line!r}")
                if size == 0:
                    # trailers up to the empty line
                    while self._line() != b"":
                        pass
                    break
                left = size
                while left > 0:
                    if not self.buf and not self._recv():
                        raise Fail("connection closed inside a chunk")
                    take = self.buf[:left]
                    self.buf = self.buf[left:]
                    left -= len(take)
                    emit(take)
                self._need(2)
                if self.buf[:2] != b"\r\n":
                    raise Fail(f"chunk not followed by CRLF: {self.buf[:20]!r}")
                self.buf = self.buf[2:]
        elif cl is not None:
            left = int(cl)
            while left > 0:
                if not self.buf and not self._recv():
                    raise Fail(f"connection closed with {left} body bytes missing")
                take = self.buf[:left]
                self.buf = self.buf[left:]
                left -= len(take)
                emit(take)
        else:
            while True:
                if self.buf:
                    emit(self.buf)
                    self.buf = b""
                if not self._recv():
                    break
        r.body = b"".join(body)
        r.end_time = time.monotonic()
        return r

    def wait_closed(self, timeout=3.0):
        """True when the peer closes (EOF or reset) within timeout; data read meanwhile is
        kept in buf."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                if not self._recv(timeout=left):
                    return True
            except socket.timeout:
                return False
            except OSError:
                return True
        return True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def build_request(method, path, headers=None, body=None, host="127.0.0.1", chunked=False):
    """Request bytes. headers: list of (name, value) or dict; Host and Content-Length are added
    unless given (Content-Length is not added for chunked=True, body then being a list of
    chunks)."""
    hdrs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {k.lower() for k, _ in hdrs}
    out = [f"{method} {path} HTTP/1.1"]
    if "host" not in names:
        out.append(f"Host: {host}")
    if isinstance(body, str):
        body = body.encode()
    if chunked:
        if "transfer-encoding" not in names:
            out.append("Transfer-Encoding: chunked")
    elif body is not None and "content-length" not in names:
        out.append(f"Content-Length: {len(body)}")
    for k, v in hdrs:
        out.append(f"{k}: {v}")
    data = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")
    if chunked:
        for c in body or []:
            c = c.encode() if isinstance(c, str) else c
            data += b"%x\r\n" % len(c) + c + b"\r\n"
        data += b"0\r\n\r\n"
    elif body is not None:
        data += body
    return data


def request(port, method, path, headers=None, body=None, timeout=10.0, on_body=None, env=None):
    """One request on a new connection; returns the Response."""
    c = Conn(port, timeout=timeout)
    try:
        c.send(build_request(method, path, headers, body, host=f"127.0.0.1:{port}"))
        return c.read_response(method, on_body=on_body)
    finally:
        c.close()


def key_sha256(key):
    """The key_sha256 value of a client key, as `aigwctl key hash` prints it."""
    return hashlib.sha256(key.encode()).hexdigest()


def chat_body(content="Say hello.", stream=False, model="gpt-test", **extra):
    d = {"model": model, "messages": [{"role": "user", "content": content}]}
    if stream:
        d["stream"] = True
    d.update(extra)
    return json.dumps(d, separators=(",", ":")).encode()


def chat(port, body=None, headers=None, timeout=10.0, on_body=None):
    h = [("Content-Type", "application/json")] + list(
        headers.items() if isinstance(headers, dict) else headers or []
    )
    return request(
        port,
        "POST",
        "/v1/chat/completions",
        h,
        body if body is not None else chat_body(),
        timeout=timeout,
        on_body=on_body,
    )


class SseRecorder:
    """on_body callback that splits the body into SSE events and records each event's
    arrival time (time.monotonic())."""

    def __init__(self):
        self.buf = b""
        self.events = []  # [(time, bytes of the event without the blank line)]

    def __call__(self, data):
        now = time.monotonic()
        self.buf += data
        while b"\n\n" in self.buf:
            ev, self.buf = self.buf.split(b"\n\n", 1)
            self.events.append((now, ev))


def assert_openai_error(r, status):
    """The response is a gateway-made OpenAI-shaped JSON error with this status (or one of
    these statuses)."""
    statuses = status if isinstance(status, (tuple, list, set)) else (status,)
    check(r.status in statuses, f"expected status {status}, got {r.status}: {r!r}")
    ct = (r.header("content-type") or "").lower()
    check(ct.startswith("application/json"), f"error content-type is {ct!r}, not application/json")
    d = r.json()
    check(isinstance(d, dict) and isinstance(d.get("error"), dict),
          f"error body is not {{\"error\":{{...}}}}: {r.body[:300]!r}")
    e = d["error"]
    check(isinstance(e.get("message"), str) and e["message"],
          f"error.message missing/empty: {r.body[:300]!r}")
    check(isinstance(e.get("type"), str) and e["type"], f"error.type missing: {r.body[:300]!r}")
    check("code" in e, f"error.code missing: {r.body[:300]!r}")
    return e


# ----------------------------------------------------------------------------------------------
# Upstream mock and gateway


class Mock:
    def __init__(self, env, name, args=(), tls=False):
        self.env = env
        self.name = name
        self.args = list(args)
        self.tls = tls
        self.proc = None
        self.port = 0
        self.start()

    def start(self, same_port=False):
        """Starts (or restarts, on the same port with same_port=True) the mock process."""
        if not os.access(MOCK, os.X_OK):
            raise Fail(f"{MOCK} not built")
        for attempt in range(3):
            if not same_port:
                self.port = free_port()
            argv = [MOCK, "--listen", f"127.0.0.1:{self.port}", "--name", self.name,
                    "--created", CREATED] + self.args
            if self.tls:
                certs = self.env.certs()
                argv += ["--tls-cert", os.path.join(certs, "server.crt"),
                         "--tls-key", os.path.join(certs, "server.key")]
            log = os.path.join(self.env.dir, f"mock-{self.name}.log")
            self.proc = Proc(f"mock {self.name}", argv, log)
            self.env.procs.append(self.proc)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if not self.proc.alive():
                    break
                if port_accepts(self.port, 0.2):
                    return
                time.sleep(0.02)
            text = self.proc.log_text()
            self.proc.close()
            if "in use" in text.lower() and attempt < 2:
                if same_port:
                    time.sleep(0.5)
                continue
            raise Fail(f"aigw-mock {self.name} did not start on port {self.port}: "
                       f"{text.strip()[-500:]!r}")

    @property
    def url(self):
        scheme = "https" if self.tls else "http"
        host = "localhost" if self.tls else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}/v1"

    def _get(self, path):
        if self.tls:
            import ssl

            ctx = ssl.create_default_context(cafile=os.path.join(self.env.certs(), "ca.crt"))
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s = ctx.wrap_socket(raw, server_hostname="localhost")
            s.sendall(build_request("GET", path, [("Connection", "close")]))
            data = b""
            while True:
                d = s.recv(65536)
                if not d:
                    break
                data += d
            s.close()
            body = data.split(b"\r\n\r\n", 1)[1]
            return json.loads(body)
        r = request(self.port, "GET", path, [("Connection", "close")], timeout=5)
        check(r.status == 200, f"mock {path}: {r!r}")
        return r.json()

    def stats(self):
        return self._get("/mock/stats")

    def last(self):
        return self._get("/mock/last")

    def kill(self):
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(5)


def _ini(sections):
    out = []
    for title, opts in sections:
        out.append(f"[{title}]")
        for k, v in opts.items():
            if v is None:
                continue
            out.append(f"{k} = {v}")
        out.append("")
    return "\n".join(out)


class Gateway:
    """An aigw master (with its workers and health checker) on its own port and admin socket.

    backends: list of (name, url_or_Mock, {extra backend keys}) or Mock objects."""

    DEFAULT_POOL = {
        "check": "yes",
        "check_interval": "200ms",
        "check_timeout": "500ms",
        "rise": 2,
        "fall": 2,
        "connect_timeout": "1s",
        "first_byte_timeout": "10s",
        "stream_idle_timeout": "10s",
    }

    def __init__(self, env, backends, workers=2, pool=None, listen=None, glob=None, start=True,
                 name="gw", proc_env=None, keys=None, models=None, sections=None):
        self.env = env
        self.proc_env = proc_env  # environment of the aigw process (None: this one's)
        self.workers = workers
        self.name = name
        self.port = free_port()
        self.sock_path = os.path.join(env.dir, f"{name}.sock")
        self.conf_path = os.path.join(env.dir, f"{name}.ini")
        self.log_path = os.path.join(env.dir, f"{name}.log")
        g = {"workers": workers, "admin_socket": self.sock_path, "log_level": "info",
             "hard_stop_after": "5s"}
        g.update(glob or {})
        # client keys are off unless the test gives some ([key NAME]: {"key": "env:V"} or
        # {"key_sha256": key_sha256("sk-...")})
        self.listen = {"bind": None, "pool": "main", "auth": "on" if keys else "off"}
        self.listen.update(listen or {})
        p = dict(self.DEFAULT_POOL)
        p.update(pool or {})
        self.sections = [("global", g), ("listen main", self.listen), ("pool main", p)]
        for kname, kopts in (keys or {}).items():
            self.sections.append((f"key {kname}", kopts))
        for mname, mopts in (models or {}).items():
            self.sections.append((f"model {mname}", mopts))
        self.sections.extend(sections or [])
        self.backend_names = []
        for b in backends:
            if isinstance(b, Mock):
                b = (b.name, b, {})
            bname, url, extra = b if len(b) == 3 else (b[0], b[1], {})
            if isinstance(url, Mock):
                url = url.url
            opts = {"pool": "main", "url": url}
            opts.update(extra)
            self.sections.append((f"backend {bname}", opts))
            self.backend_names.append(bname)
        self._write_conf()
        self.proc = None
        if start:
            self.start()

    def _write_conf(self):
        self.listen["bind"] = f"127.0.0.1:{self.port}"
        self.conf_text = _ini(self.sections)
        with open(self.conf_path, "w") as f:
            f.write(self.conf_text)

    def start(self, wait=True):
        if not os.access(AIGW, os.X_OK):
            raise Fail(f"{AIGW} not built")
        for attempt in range(3):
            self.proc = Proc("aigw", [AIGW, "-c", self.conf_path], self.log_path,
                             cwd=self.env.dir, env=self.proc_env)
            self.env.procs.append(self.proc)
            if self not in self.env.gateways:
                self.env.gateways.append(self)
            if not wait:
                return
            try:
                self.wait_ready()
                return
            except Fail:
                # another run on this host took the port between the check and the bind
                if self.proc.alive() or "in use" not in self.proc.log_text() or attempt == 2:
                    raise
                self.proc.close()
                self.env.procs.remove(self.proc)
                os.rename(self.log_path, f"{self.log_path}.{attempt}")
                self.port = free_port()
                self._write_conf()

    def wait_ready(self, timeout=15.0):
        def ready():
            if not self.proc.alive():
                raise Abort(f"aigw exited with status {self.proc.p.returncode} while starting; "
                           f"log: {' | '.join(self.proc.log_tail(10))}")
            if not port_accepts(self.port, 0.2):
                return False
            procs = self.procs(quiet=True)
            if procs is None:
                return False
            workers = [p for p in procs if p.get("role") == "worker" and p.get("pid")]
            health = [p for p in procs if p.get("role") == "health" and p.get("pid")]
            want = self.workers
            if want == "auto":
                want = len(procs) - 2 if len(procs) - 2 in self.auto_counts() else -1
            return len(workers) == want and len(health) == 1

        try:
            wait_for(ready, timeout, "aigw to listen and list all its workers", interval=0.05)
        except Abort:
            raise
        except Fail as e:
            raise Fail(f"{e}; log: {' | '.join(self.proc.log_tail(10))}")

    @staticmethod
    def auto_counts():
        """What workers = auto may resolve to: the CPUs online or the ones we may run on."""
        return {os.cpu_count(), len(os.sched_getaffinity(0))}

    def ctl(self, *args, timeout=10.0, use_conf=False):
        if not os.access(AIGWCTL, os.X_OK):
            raise Fail(f"{AIGWCTL} not built")
        where = ["-c", self.conf_path] if use_conf else ["-s", self.sock_path]
        return subprocess.run([AIGWCTL] + where + list(args), capture_output=True, text=True,
                              timeout=timeout, cwd=self.env.dir)

    def ctl_json(self, *args, quiet=False):
        r = self.ctl(*args)
        if r.returncode != 0:
            if quiet:
                return None
            raise Fail(f"aigwctl {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        try:
            return json.loads(r.stdout)
        except ValueError as e:
            if quiet:
                return None
            raise Fail(f"aigwctl {' '.join(args)} printed invalid JSON ({e}): {r.stdout[:300]!r}")

    def procs(self, quiet=False):
        return self.ctl_json("show", "proc", "--json", quiet=quiet)

    def backends(self):
        return self.ctl_json("show", "backends", "--json")

    def backend(self, name):
        for b in self.backends():
            if b.get("name") == name:
                return b
        raise Fail(f"backend {name} not in show backends --json")

    def wait_state(self, name, state, timeout):
        t0 = time.monotonic()
        try:
            wait_for(lambda: self.backend(name).get("state") == state, timeout,
                     f"backend {name} to be {state}", interval=0.02)
        except Fail as e:
            raise Fail(f"{e}; show backends: {self.backend(name)}")
        return time.monotonic() - t0

    def worker_pids(self):
        return {p["slot"]: p["pid"] for p in self.procs() if p.get("role") == "worker"}

    def stop(self, timeout=8.0):
        """Graceful stop (SIGTERM, so sanitizers get to report at exit), then SIGKILL to the
        whole group. Returns the master's exit status or None when it had to be killed."""
        if self.proc is None:
            return None
        rc = None
        if self.proc.alive():
            self.proc.signal(signal.SIGTERM)
            rc = self.proc.wait(timeout)
        else:
            rc = self.proc.p.returncode
        # children get a moment to exit on their own (sanitizers report at exit), then the
        # whole group is killed in case any hung
        deadline = time.monotonic() + 3
        while group_pids(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.proc.kill_group()
        return rc


class Env:
    """Everything one test starts; cleanup() tears it all down and reports sanitizer output."""

    def __init__(self, name):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="aigw-it-")
        self.procs = []
        self.gateways = []
        self.socks = []
        self._certs = None

    def mock(self, name, *args, tls=False):
        return Mock(self, name, [str(a) for a in args], tls=tls)

    def gateway(self, backends, **kw):
        return Gateway(self, backends, **kw)

    def conn(self, port, timeout=10.0):
        return Conn(port, timeout=timeout, env=self)

    def certs(self):
        if self._certs is None:
            if not os.path.exists(GEN_CERTS):
                raise Fail(f"{GEN_CERTS} missing")
            d = os.path.join(self.dir, "certs")
            os.makedirs(d, exist_ok=True)
            r = subprocess.run(["sh", GEN_CERTS, d], capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise Fail(f"gen-certs.sh failed: {r.stderr.strip()[-300:]}")
            for f in ("ca.crt", "server.crt", "server.key", "other-ca.crt"):
                check(os.path.exists(os.path.join(d, f)), f"gen-certs.sh did not create {f}")
            self._certs = d
        return self._certs

    def sanitizer_reports(self):
        out = []
        for p in self.procs:
            lines = p.sanitizer_reports()
            if lines:
                out.append(f"crash or sanitizer report in {p.name} log "
                           f"({os.path.basename(p.log_path)}):")
                out.extend("  " + ln for ln in lines)
        return out

    def log_tails(self, n=12):
        out = []
        for p in self.procs:
            tail = p.log_tail(n if p.name == "aigw" else 2)
            if tail:
                out.append(f"--- {os.path.basename(p.log_path)} (last {len(tail)} lines)")
                out.extend(tail)
        return out

    def cleanup(self):
        for c in self.socks:
            c.close()
        for g in self.gateways:
            try:
                g.stop()
            except Exception:  # teardown must go on
                pass
        for p in self.procs:
            if p.alive():
                p.signal(signal.SIGTERM)
        for p in self.procs:
            if p.alive() and p.wait(3) is None:
                p.kill_group()
            p.close()
        # a gateway whose master died early can leave children: kill its group
        for g in self.gateways:
            if g.proc is not None:
                for pid in group_pids(g.proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        return self.sanitizer_reports()

    def remove(self):
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)
