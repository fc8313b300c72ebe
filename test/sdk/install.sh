#!/bin/sh
# Set-up step of `make test` (`make sdk-deps`): installs the official OpenAI Node.js client pinned
# by test/sdk/package-lock.json into test/sdk/node_modules for test_openai_sdk.py. `npm ci` runs
# only when node_modules is missing or the lock file changed (a stamp holds the lock's digest);
# the tests themselves never reach anything but loopback. Exits non-zero with the reason when the
# install fails, and test_openai_sdk.py then fails with the same reason.
set -u

DIR=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$DIR/../.." && pwd)
STAMP="$DIR/node_modules/.aigw-lock.sha256"
LOG="$DIR/npm-install.log"

fail() {
    echo "sdk-deps: $*" >&2
    echo "sdk-deps: test_openai_sdk will fail until 'make sdk-deps' succeeds" >&2
    exit 1
}

# Node.js and npm: the machine's own when it has them (a NodeSource nodejs provides npm itself and
# conflicts with Debian's npm package), else Debian's (nodejs + npm on a fresh Debian 12).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    "$ROOT/test/deps.sh" nodejs npm || fail "could not install the Debian packages nodejs and npm"
fi
major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null) || fail "node does not run"
if [ "$major" -lt 20 ]; then
    echo "sdk-deps: warning: Node.js $(node --version) is older than 20, which openai 6 expects" >&2
fi

[ -f "$DIR/package-lock.json" ] || fail "test/sdk/package-lock.json missing"
want=$(sha256sum "$DIR/package-lock.json" | cut -d' ' -f1)
if [ -f "$DIR/node_modules/openai/package.json" ] && [ -f "$STAMP" ] &&
    [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

echo "sdk-deps: npm ci in test/sdk (openai from the npm registry, log in test/sdk/npm-install.log)"
rm -f "$STAMP"
if ! (cd "$DIR" && timeout 600 npm ci --no-audit --no-fund --fetch-retries=1 \
    --fetch-timeout=60000) >"$LOG" 2>&1; then
    tail -n 15 "$LOG" | sed 's/^/    /' >&2
    fail "'npm ci' in test/sdk failed (is the npm registry reachable?);" \
        "see test/sdk/npm-install.log"
fi
[ -f "$DIR/node_modules/openai/package.json" ] || fail "npm ci did not install openai"
echo "$want" >"$STAMP"
rm -f "$LOG" # kept only when the install failed: test_openai_sdk.py quotes it
