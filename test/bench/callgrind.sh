#!/bin/bash
# Instructions per request of one aigw worker, deterministic (the machine's load does not move
# it): callgrind's Ir of the worker for a run of N2 requests minus a run of N1, / (N2 - N1),
# with the functions that cost the most per request.
#
# usage: test/bench/callgrind.sh [BUILD_DIR]          (default build)
# env:   CG_TLS=0|1      the mock upstream speaks HTTPS (test CA, verified, keep-alive)
#        CG_KIND=json|sse  non-stream answer (597-byte body) or a stream of CG_SSE_CHUNKS events
#        CG_SSE_CHUNKS=20 CG_SSE_INTERVAL=0  (ms between events; 0 = the stream in one write)
#        CG_RECORD=N     TLS: the mock cuts its answers into records of N bytes
#        CG_CLIENTS=1    keep-alive client connections, requests spread over them
#        CG_N1=300 CG_N2=1300  requests in the short and the long run
#        CG_PORT=18480   first of two loopback ports (mock, aigw)
#        CG_TOP=25       functions listed (inclusive, per request); 0 = none
#        CG_KEEP=DIR     keep the callgrind files there
#        CG_MOCK=PATH    mock binary (default BUILD/test/mock/aigw-mock)
#        CG_AI=0|1       the AI layer on, as in test/bench/aigw.ini: a client key, routing by
#                        model, key and model limits and budget, usage read and accounted
set -u

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 1
BUILD=${1:-build}
TLS=${CG_TLS:-0}
KIND=${CG_KIND:-json}
SSE_CHUNKS=${CG_SSE_CHUNKS:-20}
SSE_INTERVAL=${CG_SSE_INTERVAL:-0}
CLIENTS=${CG_CLIENTS:-1}
N1=${CG_N1:-300}
N2=${CG_N2:-1300}
PORT0=${CG_PORT:-18480}
TOP=${CG_TOP:-25}
AI=${CG_AI:-0}
MOCK=${CG_MOCK:-$BUILD/test/mock/aigw-mock}
AIGW=$(realpath "$BUILD/cmd/aigw")

die() {
    echo "callgrind: $*" >&2
    exit 1
}
command -v valgrind >/dev/null || die "valgrind not found (apt-get install valgrind)"
[ -x "$MOCK" ] && [ -x "$AIGW" ] || die "build first (ninja -C $BUILD)"
[ "$N2" -gt "$N1" ] || die "CG_N2 must be larger than CG_N1"

TMP=$(mktemp -d /tmp/aigw-cg.XXXXXX) || die "mktemp failed"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

MOCK_PORT=$PORT0
AIGW_PORT=$((PORT0 + 1))
SCHEME=http
MOCK_ARGS=(--listen "127.0.0.1:$MOCK_PORT" --name bench --created 1700000000 --content-bytes 326
    --chunks "$SSE_CHUNKS" --chunk-interval "${SSE_INTERVAL}ms")
CA_LINE=""
if [ "$TLS" = 1 ]; then
    CERTS=$(realpath "$BUILD")/bench/certs
    "$ROOT/test/mock/gen-certs.sh" "$CERTS" || die "cannot make certificates"
    SCHEME=https
    MOCK_ARGS+=(--tls-cert "$CERTS/server.crt" --tls-key "$CERTS/server.key")
    CA_LINE="ca_file = $CERTS/ca.crt"
fi
"$MOCK" "${MOCK_ARGS[@]}" >"$TMP/mock.log" 2>&1 &
PIDS+=($!)

cat >"$TMP/aigw.ini" <<EOF
[global]
workers = 1
admin_socket = $TMP/aigw.sock
log_level = warn

[listen cg]
auth = off
bind = 127.0.0.1:$AIGW_PORT
pool = cg

[pool cg]
check = no

[backend mock]
url = $SCHEME://127.0.0.1:$MOCK_PORT/v1
$CA_LINE
keepalive = 256
EOF
if [ "$AI" = 1 ]; then
    # the AI layer of test/bench/aigw.ini (key sk-aigw-bench)
    sed -i -e 's/^auth = off$/auth = on/' -e 's/^check = no$/check = no\nmodels = demo, gpt-*/' \
        "$TMP/aigw.ini"
    sed -n '/^\[key bench\]/,$p' "$ROOT/test/bench/aigw.ini" >>"$TMP/aigw.ini"
fi

# load N: N requests over CLIENTS keep-alive connections (each reads its whole answer).
load() {
    python3 - "$AIGW_PORT" "$1" "$CLIENTS" "$KIND" "${CG_RECORD:-}" <<'EOF'
import http.client, sys, threading
port, n, clients, kind = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
hdrs = {"Content-Type": "application/json", "Authorization": "Bearer sk-aigw-bench"}
if sys.argv[5]:
    hdrs["x-mock-tls-record-size"] = sys.argv[5]
body = ('{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}' if kind == "sse"
        else '{"model":"demo","messages":[{"role":"user","content":"hi"}]}')
bad = []
def run(count):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(count):
        c.request("POST", "/v1/chat/completions", body, hdrs)
        r = c.getresponse()
        data = r.read()
        if r.status != 200 or (kind == "sse" and not data.rstrip().endswith(b"[DONE]")):
            bad.append((r.status, data[:200]))
    c.close()
ts = [threading.Thread(target=run, args=(n // clients + (i < n % clients),)) for i in range(clients)]
for t in ts: t.start()
for t in ts: t.join()
if bad:
    sys.exit(f"{len(bad)} bad answers, first: {bad[0]}")
EOF
}

# run N: aigw under callgrind, one warm-up request, N requests, stop; prints the worker's file.
run() {
    local out=$TMP/run$1 pid f best="" bestn=0 n
    mkdir -p "$out"
    (cd "$TMP" && exec valgrind --tool=callgrind --trace-children=yes \
        --callgrind-out-file="$out/cg.%p" "$AIGW" -c "$TMP/aigw.ini") >"$out/aigw.log" 2>&1 &
    pid=$!
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$AIGW_PORT") 2>/dev/null && break
        sleep 0.1
    done
    load 1 || die "warm-up request failed: $(tail -n 5 "$out/aigw.log")"
    load "$1" || die "load failed"
    kill -TERM "$pid"
    wait "$pid"
    # the worker is the process with the most instructions
    for f in "$out"/cg.*; do
        n=$(grep -m1 '^summary:' "$f" 2>/dev/null | awk '{ print $2 }')
        [ -n "$n" ] && [ "$n" -gt "$bestn" ] && bestn=$n best=$f
    done
    [ -n "$best" ] || die "no callgrind output: $(tail -n 5 "$out/aigw.log")"
    echo "$best"
}

for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$MOCK_PORT") 2>/dev/null && break
    sleep 0.1
done
echo "callgrind: $SCHEME upstream, $KIND, $CLIENTS client(s), runs of $N1 and $N2 requests ..." >&2
F1=$(run "$N1") || exit 1
F2=$(run "$N2") || exit 1
I1=$(grep -m1 '^summary:' "$F1" | awk '{ print $2 }')
I2=$(grep -m1 '^summary:' "$F2" | awk '{ print $2 }')
echo "instructions per request: $(((I2 - I1) / (N2 - N1))) ($SCHEME, $KIND, $CLIENTS client(s))"

# Per function: inclusive Ir of the long run minus the short one, per request.
if [ "$TOP" -gt 0 ]; then
    callgrind_annotate --inclusive=yes --threshold=100 "$F1" 2>/dev/null >"$TMP/a1"
    callgrind_annotate --inclusive=yes --threshold=100 "$F2" 2>/dev/null >"$TMP/a2"
    awk -v d=$((N2 - N1)) '
        /^ *[0-9,]+ / && !/=>/ {
            v = $1; gsub(",", "", v)
            name = $0; sub(/^ *[0-9,]+ +(\( *[0-9.]+%\) +)?/, "", name)
            if (FILENAME == ARGV[1]) a[name] = v; else b[name] = v
        }
        END {
            for (k in b) { x = (b[k] - a[k]) / d; if (x >= 1) printf "%10.0f  %s\n", x, k }
        }' "$TMP/a1" "$TMP/a2" | sort -rn | head -n "$TOP"
fi
if [ -n "${CG_KEEP:-}" ]; then
    mkdir -p "$CG_KEEP" && cp "$F1" "$CG_KEEP/short.cg" && cp "$F2" "$CG_KEEP/long.cg"
fi
