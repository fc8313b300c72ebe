#!/usr/bin/python3
"""Runs the aigw integration tests: every test_* function of every test_*.py module here, each
with its own Env (temp dir, processes), one "PASS name" / "FAIL name" / "SKIP name" line each.
Exit status = number of failures (capped at 100).

usage: AIGW_BUILD=build run_tests.py [--prefix P] [-k SUBSTRING ...] [--list]
  AIGW_IT_KEEP=1 keeps the temp dirs (configs, logs) of failed tests.
  AIGW_IT_TIMES=1 adds each test's duration to its line."""

import argparse
import glob
import importlib
import inspect
import os
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402


class TestTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise TestTimeout("test exceeded its time limit")


def collect():
    tests = []
    for path in sorted(glob.glob(os.path.join(HERE, "test_*.py"))):
        modname = os.path.basename(path)[:-3]
        mod = importlib.import_module(modname)
        fns = [f for n, f in inspect.getmembers(mod, inspect.isfunction)
               if n.startswith("test_") and f.__module__ == modname]
        fns.sort(key=lambda f: f.__code__.co_firstlineno)
        for f in fns:
            tests.append((f"{modname[5:]}.{f.__name__[5:]}", f))
    return tests


def reason_lines(exc):
    """The failure message plus where in the test file it happened."""
    lines = []
    if isinstance(exc, (harness.Fail, AssertionError)):
        msg = str(exc) or exc.__class__.__name__
        lines.extend(msg.splitlines()[:12])
    else:
        lines.append(f"{exc.__class__.__name__}: {exc}")
    tb = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(tb):
        if os.path.basename(fr.filename).startswith("test_"):
            lines.append(f"at {os.path.basename(fr.filename)}:{fr.lineno}: {fr.line}")
            break
    return lines


def run_one(name, fn, prefix):
    env = harness.Env(name)
    limit = getattr(fn, "timeout", 60)
    status, reasons = "PASS", []
    t0 = time.monotonic()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        fn(env)
    except harness.Skip as e:
        status, reasons = "SKIP", [str(e)]
    except TestTimeout:
        status, reasons = "FAIL", [f"timed out after {limit}s", *reason_lines(sys.exc_info()[1])]
    except Exception as e:  # every error fails the test, the run goes on
        status, reasons = "FAIL", reason_lines(e)
    finally:
        signal.alarm(0)
    try:
        san = env.cleanup()
    except Exception as e:
        san = [f"teardown error: {e}"]
    if san and status != "FAIL":
        status = "FAIL"
        reasons = []
    reasons += san
    dt = time.monotonic() - t0
    timing = f"  ({dt:.1f}s)" if os.environ.get("AIGW_IT_TIMES") else ""
    print(f"{status} {prefix}{name}{timing}")
    if status == "FAIL":
        for line in reasons:
            print("    " + line)
        for line in env.log_tails(8):
            print("    | " + line)
        if os.environ.get("AIGW_IT_KEEP"):
            print(f"    (kept {env.dir})")
    elif status == "SKIP":
        for line in reasons:
            print("    " + line)
    if status != "FAIL" or not os.environ.get("AIGW_IT_KEEP"):
        env.remove()
    sys.stdout.flush()
    return status


def _stopped(signum, frame):
    harness.kill_everything()
    print(f"integration runner stopped by signal {signum}", flush=True)
    os._exit(100)


def main():
    signal.signal(signal.SIGTERM, _stopped)
    signal.signal(signal.SIGINT, _stopped)
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", default="integration/")
    ap.add_argument("-k", action="append", default=[])
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    tests = collect()
    if args.k:
        tests = [(n, f) for n, f in tests if any(k in n for k in args.k)]
    if args.list:
        for n, _ in tests:
            print(n)
        return 0
    failed = 0
    for name, fn in tests:
        if run_one(name, fn, args.prefix) == "FAIL":
            failed += 1
    return min(failed, 100)


if __name__ == "__main__":
    sys.exit(main())
