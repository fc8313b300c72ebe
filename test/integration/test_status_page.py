"""The status page at / of the [stats] listener (issue 8 item 6), rendered by headless Chromium
(Debian's chromium): after its script ran, the live backend table lists every backend with its
state and the keys table every key; when a backend goes DOWN, the next rendering says so."""

import os
import re
import shutil
import subprocess
import tempfile

from harness import Fail, check, free_port, key_sha256, request

KEY = "sk-aigw-status-page-0123456789"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _dump_dom(env, url):
    """The page's DOM after its script has run (virtual time lets its fetch and redraw finish)."""
    if not os.access(CHROMIUM, os.X_OK):
        raise Fail("chromium is not installed (make test installs Debian's chromium package)")
    profile = tempfile.mkdtemp(prefix="chromium-", dir=env.dir)
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            "--virtual-time-budget=3000", "--dump-dom", url]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    check(r.returncode == 0 and "<html" in r.stdout,
          f"chromium --dump-dom exited {r.returncode}: {r.stderr.strip()[-500:]!r}")
    return r.stdout


def _rows(dom):
    """{backend: state} of the rendered backend table."""
    table = re.search(r'<table id="backends">(.*?)</table>', dom, re.S)
    check(table, f"no backend table in the page: {dom[:500]!r}")
    return dict(re.findall(r'<tr [^>]*data-backend="([^"]+)" data-state="([^"]+)"', table.group(1)))


def test_status_page_live_backends(env):
    m1, m2 = env.mock("m1"), env.mock("m2")
    port = free_port()
    gw = env.gateway([m1, m2], keys={"team": {"key_sha256": key_sha256(KEY), "rpm": 100}},
                     sections=[("stats", {"bind": f"127.0.0.1:{port}"})])
    url = f"http://127.0.0.1:{port}/"

    # self-contained: nothing loaded from anywhere else
    r = request(port, "GET", "/", [("Connection", "close")])
    check(r.status == 200 and r.header("content-type", "").startswith("text/html"), f"/: {r!r}")
    check(not re.search(rb'(src|href)\s*=|@import|url\(', r.body),
          "the page loads no external asset")

    gw.wait_state("m1", "UP", 10)
    gw.wait_state("m2", "UP", 10)
    dom = _dump_dom(env, url)
    check(_rows(dom) == {"m1": "UP", "m2": "UP"}, f"backend table: {_rows(dom)}")
    check(re.search(r'<tr data-key="team">', dom), "keys table lists the key")
    check('<div id="err"></div>' in dom, "the page's fetch worked")

    m2.kill()
    gw.wait_state("m2", "DOWN", 10)
    dom = _dump_dom(env, url)
    check(_rows(dom) == {"m1": "UP", "m2": "DOWN"}, f"backend table after m2 died: {_rows(dom)}")
    row = re.search(r'<tr [^>]*data-backend="m2"[^>]*>(.*?)</tr>', dom, re.S).group(1)
    check(re.search(r'<td class="state">DOWN', row), f"m2's state cell: {row!r}")
