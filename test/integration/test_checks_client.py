"""Health checks go through the workers' own HTTP client and resolver (core/upstream.c): they
probe the addresses traffic uses, in the same order, keep the last good addresses when a lookup
fails as traffic does, verify and resume TLS as traffic does, and are never counted as traffic.

Host names come from a hosts file of the test's own, through nss_wrapper (Debian's
libnss-wrapper, preloaded into aigw): no system file is touched."""

import os
import time

from harness import Gateway, chat, chat_body, check

NAME = "twoaddr.aigw.test"


def _hosts(env, lines):
    path = os.path.join(env.dir, "hosts")
    with open(path + ".new", "w") as f:
        f.write("".join(f"{ip} {name}\n" for ip, name in lines))
    os.replace(path + ".new", path)  # nss_wrapper reloads the file when it changes
    return path


def _nss_env(hosts):
    e = dict(os.environ)
    e["LD_PRELOAD"] = "libnss_wrapper.so"
    e["NSS_WRAPPER_HOSTS"] = hosts
    # an ASan build wants its runtime first in the preload list; nss_wrapper only wraps libc
    e["ASAN_OPTIONS"] = ":".join(x for x in (e.get("ASAN_OPTIONS"), "verify_asan_link_order=0")
                                 if x)
    return e


def _by_name(env, mock, lines, **kw):
    hosts = _hosts(env, lines)
    url = mock.url.replace("127.0.0.1", NAME)
    pool = {"check_interval": "100ms", "check_timeout": "500ms", "fall": 2, "rise": 2}
    pool.update(kw.pop("pool", {}))
    gw = Gateway(env, [("a", url, {})], workers=1, pool=pool, proc_env=_nss_env(hosts), **kw)
    return gw, hosts


def test_check_tries_each_address(env):
    """The name has two addresses and the backend listens on the second only (as a host whose
    AAAA record points where nothing listens): traffic gets through on the second, and so do
    the checks, which go where traffic goes. A checker with a client of its own that probed the
    first address only took the backend DOWN while traffic was fine."""
    a = env.mock("a")
    gw, _ = _by_name(env, a, [("127.0.0.2", NAME), ("127.0.0.1", NAME)])
    for i in range(5):
        r = chat(gw.port, chat_body(f"by name {i}"))
        check(r.status == 200 and r.header("x-mock-name") == "a", f"request {i}: {r!r}")
    time.sleep(0.8)  # about 8 checks, 2 failed ones would take it DOWN
    rec = gw.backend("a")
    check(rec["state"] == "UP" and rec["check_status"] == 200,
          f"checks of a name whose second address answers: {rec}; "
          f"log: {' | '.join(gw.proc.log_tail(6))}")
    last = a._get("/mock/last_check")
    check(last.get("path") == "/v1/models", f"the mock saw no check: {last}")


def test_check_keeps_last_addresses(env):
    """The name stops resolving: traffic goes on to the addresses it had, and so do the checks
    (one resolver policy: a failed lookup keeps the last good addresses). A checker that looked
    the name up at every check took a serving backend DOWN at the first DNS hiccup."""
    a = env.mock("a")
    gw, hosts = _by_name(env, a, [("127.0.0.1", NAME)])
    gw.wait_state("a", "UP", 5)
    models0 = a.stats()["models"]
    time.sleep(0.3)
    check(a.stats()["models"] > models0, "no checks reached the mock")
    _hosts(env, [("127.0.0.3", "other.aigw.test")])  # the name is gone
    time.sleep(1.0)  # about 10 checks
    rec = gw.backend("a")
    check(rec["state"] == "UP", f"the name stopped resolving, the backend went {rec['state']} "
          f"({rec['reason']}); log: {' | '.join(gw.proc.log_tail(6))}")
    models1 = a.stats()["models"]
    time.sleep(0.3)
    check(a.stats()["models"] > models1, "the checks stopped reaching the backend")
    r = chat(gw.port, chat_body("still by name"))
    check(r.status == 200, f"traffic after the name went: {r!r}")
    check(os.path.exists(hosts), "hosts file")


def test_checks_are_not_traffic(env):
    """Checks run in the checker process, which has no worker slot: no request, byte or
    in-flight count of any worker moves for them."""
    a = env.mock("a")
    gw = env.gateway([a], workers=2, pool={"check_interval": "50ms"})
    models0 = a.stats()["models"]
    time.sleep(0.6)
    check(a.stats()["models"] - models0 >= 5, "the checks did not run")
    rec = gw.backend("a")
    check(rec["requests"] == 0 and rec["active"] == 0 and rec["failures"] == 0,
          f"checks counted as traffic: {rec}")


def test_tls_checks_verify_and_resume(env):
    """Checks over TLS use the backend's TLS client as traffic does: its CA, and a session
    resumed from one check to the next (each check is a new connection)."""
    m = env.mock("tls", tls=True)
    ca = os.path.join(env.certs(), "ca.crt")
    gw = env.gateway([("tls", m.url, {"ca_file": ca})], workers=1,
                     pool={"check_interval": "50ms"})
    gw.wait_state("tls", "UP", 5)
    s0 = m.stats()
    time.sleep(0.6)
    s1 = m.stats()
    handshakes = s1["tls_handshakes"] - s0["tls_handshakes"] - 1  # s1's own is counted
    resumed = s1["tls_resumed"] - s0["tls_resumed"]
    check(handshakes >= 5, f"{handshakes} TLS handshakes in 0.6 s of checks every 50 ms")
    check(resumed >= handshakes - 1, f"{handshakes} checks over TLS, {resumed} resumed a session")
    check(s1["connections"] - s0["connections"] >= handshakes,
          f"checks share connections: {s0} -> {s1}")
    check(gw.backend("tls")["state"] == "UP", f"{gw.backend('tls')}")
