#!/bin/sh
# Runs every aigw test: the format check once, then for each build dir given the cmocka unit
# test binaries and the integration suite. One "PASS name" / "FAIL name" line per test, and the
# last line is "N passed, N failed[, N skipped]". Exits non-zero when anything failed.
#
# usage: test/run.sh BUILD_DIR [ASAN_BUILD_DIR]
#   AIGW_IT_FILTER=SUBSTRING  run only the integration tests whose name contains it
#   AIGW_NO_UNIT=1 / AIGW_NO_INTEGRATION=1 / AIGW_NO_FORMAT=1  skip a whole stage (development)

set -u

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 BUILD_DIR [ASAN_BUILD_DIR]" >&2
    exit 2
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

PASSED=0
FAILED=0
SKIPPED=0
TMP=$(mktemp -d "${TMPDIR:-/tmp}/aigw-run.XXXXXX") || exit 2
trap 'rm -rf "$TMP"' EXIT INT TERM

pass() {
    echo "PASS $1"
    PASSED=$((PASSED + 1))
}

# fail NAME FILE: prints the tail of FILE (the reason) indented under the FAIL line.
fail() {
    echo "FAIL $1"
    if [ -n "${2:-}" ] && [ -s "$2" ]; then
        tail -n "${3:-40}" "$2" | sed 's/^/    /'
    fi
    FAILED=$((FAILED + 1))
}

format_check() {
    if [ -n "${AIGW_NO_FORMAT:-}" ]; then
        return
    fi
    if ! command -v clang-format >/dev/null 2>&1; then
        echo "clang-format not installed" >"$TMP/format.out"
        fail format "$TMP/format.out"
        return
    fi
    files=$(find cmd core balancer health shm test/unit test/mock test/fuzz \
        -name '*.[ch]' 2>/dev/null | sort)
    if [ -z "$files" ]; then
        pass format
        return
    fi
    # shellcheck disable=SC2086
    if clang-format --dry-run --Werror $files >"$TMP/format.out" 2>&1; then
        pass format
    else
        {
            echo "not clang-formatted (run 'make fmt'):"
            grep -o '^[^: ]*\.[ch]:[0-9]*:' "$TMP/format.out" | cut -d: -f1 | sort -u | head -n 20
            # anything else clang-format said (it failing to run at all, say)
            grep -q '^[^: ]*\.[ch]:[0-9]*:' "$TMP/format.out" || head -n 5 "$TMP/format.out"
        } >"$TMP/format.reason"
        fail format "$TMP/format.reason" 30
    fi
}

unit_tests() {
    build=$1
    [ -n "${AIGW_NO_UNIT:-}" ] && return
    found=0
    for t in "$build"/test/unit/test_*; do
        [ -f "$t" ] && [ -x "$t" ] || continue
        found=1
        name="$build/unit/$(basename "$t")"
        # cmocka prints to stdout; a hung test is killed after 120 s.
        if timeout -k 5 120 "$t" >"$TMP/unit.out" 2>&1; then
            pass "$name"
        else
            rc=$?
            echo "exit status $rc" >>"$TMP/unit.out"
            fail "$name" "$TMP/unit.out" 60
        fi
    done
    if [ "$found" = 0 ]; then
        echo "    (no unit test binaries in $build/test/unit)"
    fi
}

fuzz_tests() {
    build=$1
    [ -n "${AIGW_NO_UNIT:-}" ] && return
    # Each fuzz target replays its corpus and a fixed set of mutations (see test/fuzz/driver.c);
    # open-ended fuzzing with libFuzzer is `make fuzz`.
    for t in "$build"/test/fuzz/fuzz_*; do
        [ -f "$t" ] && [ -x "$t" ] || continue
        target=$(basename "$t")
        name="$build/fuzz/$target"
        if timeout -k 5 120 "$t" -n "${AIGW_FUZZ_MUTATIONS:-3000}" \
            "test/fuzz/corpus/${target#fuzz_}" >"$TMP/fuzz.out" 2>&1; then
            pass "$name"
        else
            echo "exit status $?" >>"$TMP/fuzz.out"
            fail "$name" "$TMP/fuzz.out" 40
        fi
    done
}

integration_tests() {
    build=$1
    [ -n "${AIGW_NO_INTEGRATION:-}" ] && return
    # The runner prints PASS/FAIL/SKIP lines itself; they are counted here. Its exit status is
    # the number of failures, so a crash without FAIL lines still counts as one failure.
    {
        AIGW_BUILD="$build" timeout -k 10 600 "$PY" -u test/integration/run_tests.py \
            --prefix "$build/integration/" ${AIGW_IT_FILTER:+-k "$AIGW_IT_FILTER"} 2>&1
        echo $? >"$TMP/it.rc"
    } | tee "$TMP/it.out"
    rc=$(cat "$TMP/it.rc")
    p=$(grep -c '^PASS ' "$TMP/it.out")
    f=$(grep -c '^FAIL ' "$TMP/it.out")
    s=$(grep -c '^SKIP ' "$TMP/it.out")
    PASSED=$((PASSED + p))
    FAILED=$((FAILED + f))
    SKIPPED=$((SKIPPED + s))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        echo "integration runner exited with status $rc" >"$TMP/it.reason"
        fail "$build/integration" "$TMP/it.reason"
    fi
}

run_build() {
    build=$1
    if [ ! -d "$build" ]; then
        echo "build dir $build does not exist" >"$TMP/build.reason"
        fail "$build" "$TMP/build.reason"
        return
    fi
    unit_tests "$build"
    fuzz_tests "$build"
    integration_tests "$build"
}

format_check

run_build "$1"

if [ $# -ge 2 ]; then
    # Sanitizer reports go to stderr; the integration harness fails a test whose processes
    # wrote one (it scans their logs).
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=0
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    export ASAN_OPTIONS UBSAN_OPTIONS
    run_build "$2"
    unset ASAN_OPTIONS UBSAN_OPTIONS
fi

summary="$PASSED passed, $FAILED failed"
if [ "$SKIPPED" -gt 0 ]; then
    summary="$summary, $SKIPPED skipped"
fi
echo "$summary"
[ "$FAILED" -eq 0 ]
