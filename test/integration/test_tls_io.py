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


# The TLS 1.2 suites a client may offer under the gateway's policy (IANA code points), and
# the renegotiation-info signalling value, which is not a suite.
_SUITES = {0xCCA9: "ECDHE-ECDSA-CHACHA20-POLY1305", 0xCCA8: "ECDHE-RSA-CHACHA20-POLY1305",
           0xC02B: "ECDHE-ECDSA-AES128-GCM-SHA256", 0xC02C: "ECDHE-ECDSA-AES256-GCM-SHA384",
           0xC02F: "ECDHE-RSA-AES128-GCM-SHA256", 0xC030: "ECDHE-RSA-AES256-GCM-SHA384"}
_SCSV = 0x00FF


def _client_hello_suites(sock):
    """The cipher suites of the ClientHello waiting on sock (read with MSG_PEEK, so the
    handshake still sees it), in the client's order: names, or hex for unknown code points.
    Python's shared_ciphers() cannot say this (before 3.13 it lists the server's suites)."""
    data = b""
    for _ in range(100):
        data = sock.recv(16384, socket.MSG_PEEK)
        if len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big"):
            break
        time.sleep(0.01)
    check(data[:1] == b"\x16" and data[5:6] == b"\x01", f"not a ClientHello: {data[:16]!r}")
    i = 5 + 4 + 2 + 32  # record head, handshake head, client_version, random
    i += 1 + data[i]  # session_id
    n = int.from_bytes(data[i:i + 2], "big")
    ids = [int.from_bytes(data[j:j + 2], "big") for j in range(i + 2, i + 2 + n, 2)]
    return [_SUITES.get(c, f"0x{c:04x}") for c in ids if c != _SCSV]


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
        self.seen = []  # (negotiated suite, suites the client offered) per connection
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            try:
                raw.settimeout(5)
                offered = _client_hello_suites(raw)
                s = self.ctx.wrap_socket(raw, server_side=True)
                self.seen.append((s.cipher()[0], offered))
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
        check(offered and "CHACHA20-POLY1305" in offered[0], f"offered first: {offered}")
        weak = [c for c in offered if c not in _SUITES.values()]
        check(not weak, f"suites offered without forward secrecy or AEAD: {weak}")
    finally:
        srv.close()
