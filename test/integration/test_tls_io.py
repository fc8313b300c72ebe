"""The TLS read path to an HTTPS upstream: records read ahead several at a time (one recv for a
record's header and body, often for the records after it too), body bytes handed from the TLS
buffer to the client write without a copy, and the cipher suites offered."""

import json
import os
import socket
import ssl
import threading
import time

from harness import SseRecorder, build_request, chat, chat_body, check

CONTENT = 3000  # --content-bytes of the mocks: a JSON body of about 3.3 KB


def _deltas(events):
    """The content of an SSE stream's chunks joined, and whether it ended with [DONE]."""
    out, done = [], False
    for _, ev in events:
        for line in ev.split(b"\n"):
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                continue
            for c in json.loads(data)["choices"]:
                out.append(c.get("delta", {}).get("content") or "")
    return "".join(out), done


def _content(r):
    check(r.status == 200, f"non-stream request: {r!r}")
    return r.json()["choices"][0]["message"]["content"]


def test_tls_tiny_records(env):
    """Responses cut into records of a few bytes arrive whole: dozens of records come in with
    one read, some split across reads (a JSON body, and a stream whose events straddle
    records)."""
    m = env.mock("tls", "--content-bytes", CONTENT, "--chunks", 40, "--chunk-interval", "0",
                 tls=True)
    ca = os.path.join(env.certs(), "ca.crt")
    gw = env.gateway([("tls", m.url, {"ca_file": ca})], workers=1, pool={"check": "no"})
    want = _content(chat(gw.port, chat_body("whole")))
    check(len(want) >= CONTENT - 100, f"mock content only {len(want)} bytes")
    for size in (1, 7, 100, 5000):
        hdr = {"x-mock-tls-record-size": str(size)}
        got = _content(chat(gw.port, chat_body("whole"), headers=hdr))
        check(got == want, f"records of {size} bytes: content differs "
              f"({len(got)} against {len(want)} bytes)")
        rec = SseRecorder()
        r = chat(gw.port, chat_body("stream", stream=True), headers=hdr, on_body=rec)
        check(r.status == 200, f"stream in records of {size} bytes: {r!r}")
        text, done = _deltas(rec.events)
        check(done and text == want, f"stream in records of {size} bytes: done={done}, "
              f"{len(text)} content bytes against {len(want)}")


def _slow_read(port, req, pause=0.2, rounds=4):
    """Sends req with a small receive buffer, then reads a little and pauses a few times so the
    gateway's writes to this client have to wait, and finally reads the whole response."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(20)
    s.connect(("127.0.0.1", port))
    s.sendall(req)
    data = b""
    for _ in range(rounds):
        time.sleep(pause)
        data += s.recv(4096)
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def _dechunk(body):
    out = b""
    while True:
        line, _, body = body.partition(b"\r\n")
        n = int(line.split(b";")[0], 16)
        if n == 0:
            return out
        out += body[:n]
        body = body[n + 2:]


def test_tls_slow_client_big_answers(env):
    """Multi-megabyte answers from an HTTPS upstream to a client that reads slowly: the
    gateway's writes wait while the bytes they carry sit in the TLS buffer, and every byte
    arrives intact, as a JSON body in 16 KB records and as a stream of many events."""
    big = 3 << 20  # loopback socket buffers take 1 MB whole: 3 MB makes the writes wait
    m = env.mock("tls", "--content-bytes", big, "--chunks", 1000, "--chunk-interval", "0",
                 tls=True)
    ca = os.path.join(env.certs(), "ca.crt")
    gw = env.gateway([("tls", m.url, {"ca_file": ca})], workers=1, pool={"check": "no"})
    want = _content(chat(gw.port, chat_body("big"), timeout=30))
    check(len(want) >= big - 100, f"mock content only {len(want)} bytes")
    close = [("Content-Type", "application/json"), ("Connection", "close")]
    head, body = _slow_read(gw.port, build_request("POST", "/v1/chat/completions", close,
                                                   chat_body("big")))
    check(b" 200 " in head.split(b"\r\n")[0], f"slow JSON client: {head[:200]!r}")
    if b"chunked" in head.lower():
        body = _dechunk(body)
    got = json.loads(body)["choices"][0]["message"]["content"]
    check(got == want, f"slow JSON client: content differs ({len(got)} against {len(want)})")

    head, body = _slow_read(gw.port, build_request("POST", "/v1/chat/completions", close,
                                                   chat_body("big", stream=True)))
    check(b" 200 " in head.split(b"\r\n")[0], f"slow stream client: {head[:200]!r}")
    rec = SseRecorder()
    rec(_dechunk(body))
    text, done = _deltas(rec.events)
    check(done and text == want, f"slow stream client: done={done}, {len(text)} content bytes "
          f"against {len(want)}")


class _TlsServer:
    """A one-answer-per-connection HTTPS server (Python's OpenSSL) that honours the client's
    cipher order and accepts every TLS 1.2 suite: it shows what the gateway offers."""

    def __init__(self, certs):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.path.join(certs, "server.crt"), os.path.join(certs, "server.key"))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.seen = []  # (negotiated suite, suites both sides have) per connection
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            try:
                s = self.ctx.wrap_socket(raw, server_side=True)
                s.settimeout(5)
                self.seen.append((s.cipher()[0], [c[0] for c in s.shared_ciphers() or []]))
                data = b""
                while b"\r\n\r\n" not in data:
                    d = s.recv(65536)
                    if not d:
                        break
                    data += d
                body = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "hi"},
                     "finish_reason": "stop"}]}).encode()
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                          b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                s.close()
            except (OSError, ssl.SSLError):
                raw.close()

    def close(self):
        self.sock.close()


def test_tls_cipher_suites_offered(env):
    """The gateway offers forward-secret AEAD suites only, ChaCha20-Poly1305 first (mbedTLS's
    fastest here): a server that follows the client's order picks it."""
    srv = _TlsServer(env.certs())
    try:
        ca = os.path.join(env.certs(), "ca.crt")
        gw = env.gateway([("py", f"https://127.0.0.1:{srv.port}/v1", {"ca_file": ca})],
                         workers=1, pool={"check": "no"})
        r = chat(gw.port)
        check(r.status == 200, f"request through the OpenSSL upstream: {r!r}")
        check(srv.seen, "the upstream saw no TLS connection")
        suite, offered = srv.seen[-1]
        check(suite == "ECDHE-ECDSA-CHACHA20-POLY1305",
              f"negotiated {suite}, not ChaCha20-Poly1305 (offered: {offered})")
        weak = [c for c in offered if not c.startswith("ECDHE-")
                or not ("GCM" in c or "CHACHA20-POLY1305" in c)]
        check(not weak, f"suites offered without forward secrecy or AEAD: {weak}")
    finally:
        srv.close()
