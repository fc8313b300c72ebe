"""An upstream may answer before it has read the whole request body (a 413 from a relay with a
smaller body limit, a 400 after the head): the client gets that answer, not a 502 or a 504,
and the backend is not charged with a failure for it (else any client could mark healthy
backends DOWN with large bodies)."""

import socket
import threading
import time

from harness import build_request, chat_body, check
from resil_util import pool

CHAT = [("Content-Type", "application/json")]
BIG = 4 * 1024 * 1024  # far more than the socket buffers take before the upstream reads


class _EarlyUpstream:
    """A raw upstream that reads a request head only and answers at once: with `close`, a 413
    and a close with the body unread (the kernel then resets); without it, a 400 and the
    connection left open, the body never read."""

    def __init__(self, close):
        self.close_after = close
        self.requests = 0
        self.conns = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s):
        self.conns.append(s)
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                d = s.recv(65536)
                if not d:
                    return
                buf += d
            if buf.startswith(b"GET "):
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                return
            self.requests += 1
            if self.close_after:
                s.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain\r\n"
                          b"Content-Length: 7\r\nConnection: close\r\n\r\ntoo big")
                time.sleep(0.05)
                s.close()
            else:
                s.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                          b"Content-Length: 3\r\n\r\nbad")
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for s in self.conns:
            try:
                s.close()
            except OSError:
                pass


def _big_chat(env, gw):
    body = chat_body("x" * BIG)
    c = env.conn(gw.port, timeout=20)
    t0 = time.monotonic()
    c.send(build_request("POST", "/v1/chat/completions", CHAT, body))
    r = c.read_response()
    return r, time.monotonic() - t0


def _check_early(env, close, status, text):
    up = _EarlyUpstream(close)
    try:
        gw = env.gateway([("early", f"http://127.0.0.1:{up.port}/v1", {})], workers=1,
                         pool=pool(check="no", retries=1, max_fails=1, fail_timeout="30s",
                                   first_byte_timeout="15s"))
        r, took = _big_chat(env, gw)
        check(r.status == status and r.body == text,
              f"the upstream answered {status} before reading the body; the client got {r!r}")
        check(took < 5, f"the early answer took {took:.1f} s to reach the client")
        check(r.header("x-aigw-attempts") == "1", f"x-aigw-attempts: {r!r}")
        check(up.requests == 1, f"the upstream got {up.requests} requests")
        b = gw.backend("early")
        check(b.get("failures") == 0 and b.get("state") == "UP",
              f"an early answer counted against the backend: {b}")
    finally:
        up.close()


def test_early_answer_then_close(env):
    """413 and a close before the body is read: the 413 reaches the client."""
    _check_early(env, True, 413, b"too big")


def test_early_answer_body_unread(env):
    """400 after the head while the body is never read: the 400 reaches the client at once, not
    a 504 after first_byte_timeout."""
    _check_early(env, False, 400, b"bad")
