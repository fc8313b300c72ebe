#!/bin/bash
# make bench: aigw, HAProxy and nginx in front of the same aigw-mock, loaded by wrk in one run on
# one machine; prints req/s, p50, p99 and the ratio to HAProxy, and writes BUILD/bench/results.txt.
#
# usage: test/bench/bench.sh [BUILD_DIR]            (default build)
# env:   BENCH_DURATION=10s  measured wrk run per target and connection count (Ns or Nm)
#        BENCH_WARMUP=2s     unmeasured wrk run before each measured one (0 = none)
#        BENCH_CONNS="50 256"
#        BENCH_REPEAT=3      measured runs per target and connection count; the median is reported
#        BENCH_TARGETS="haproxy nginx aigw"  proxies to run (the direct line always runs)
#        BENCH_PORT=18400    first of four consecutive loopback ports (mock, aigw, haproxy, nginx)
#        BENCH_BODY_BYTES=600  wanted size of the mock's chat.completion body
#        BENCH_PROXY_CPU=1 BENCH_LOAD_CPU=0   taskset CPUs (proxy; wrk + mock); "" = no pinning
#        BENCH_MOCK=PATH     mock binary (default BUILD/test/mock/aigw-mock)
#        BENCH_REQUIRE_AIGW=1  fail instead of skipping the aigw leg when aigw does not answer
#        BENCH_AIGW_BASE=PATH  another aigw binary (e.g. of the main branch) measured as target
#                            "base" in the same run, for before/after comparisons
#        BENCH_CLUSTER=1     also target "cluster": aigw with the same configuration plus a
#                            [cluster] section sharing the key's limits through a redis-server
#                            on loopback (on the load CPU), in the same run (make bench-cluster)
#        BENCH_TLS=1         the upstream speaks HTTPS (test certificate, verified by every proxy;
#                            keep-alive and session reuse on every side); wrk still speaks HTTP
#        BENCH_KINDS="json"  request kinds, one table each: json (non-stream chat.completion),
#                            sse (stream: true, BENCH_SSE_CHUNKS content events), sse-rec (the same
#                            stream in TLS records of BENCH_SSE_RECORD bytes, as an upstream that
#                            sends each event as it is made; same as sse over plain HTTP)
#        BENCH_SSE_CHUNKS=20 BENCH_SSE_INTERVAL=0  content events per stream and the mock's pause
#                            between them (0: the whole stream in one write, ms otherwise)
#        BENCH_SSE_RECORD=200  sse-rec: bytes per TLS record
set -u

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 1
BUILD=${1:-build}
BENCH_DIR=$ROOT/test/bench

DURATION=${BENCH_DURATION:-10s}
WARMUP=${BENCH_WARMUP:-2s}
CONNS=${BENCH_CONNS:-50 256}
REPEAT=${BENCH_REPEAT:-3}
WANT=" ${BENCH_TARGETS:-haproxy nginx aigw} "
BASE_AIGW=${BENCH_AIGW_BASE:-}
[ -n "$BASE_AIGW" ] && WANT="$WANT base "
[ "${BENCH_CLUSTER:-0}" = 1 ] && WANT="$WANT cluster "
PORT0=${BENCH_PORT:-18400}
BODY_BYTES=${BENCH_BODY_BYTES:-600}
MOCK=${BENCH_MOCK:-$BUILD/test/mock/aigw-mock}
AIGW=$BUILD/cmd/aigw
OUT_DIR=$BUILD/bench
RESULTS=$OUT_DIR/results.txt

MOCK_PORT=$PORT0
AIGW_PORT=$((PORT0 + 1))
HAPROXY_PORT=$((PORT0 + 2))
NGINX_PORT=$((PORT0 + 3))
BASE_PORT=$((PORT0 + 4))
REDIS_PORT=$((PORT0 + 5))
CLUSTER_PORT=$((PORT0 + 6))

TLS=${BENCH_TLS:-0}
KINDS=${BENCH_KINDS:-json}
SSE_CHUNKS=${BENCH_SSE_CHUNKS:-20}
SSE_INTERVAL=${BENCH_SSE_INTERVAL:-0}
SSE_RECORD=${BENCH_SSE_RECORD:-200}
export BENCH_SSE_RECORD=$SSE_RECORD # read by chat-sse.lua for sse-rec

REQ_BODY='{"model":"demo","messages":[{"role":"user","content":"hi"}]}'
SSE_BODY='{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}'
REQ_PATH=/v1/chat/completions

die() {
    echo "bench: $*" >&2
    exit 1
}

# Durations as wrk takes them ("10s", "1m", "2"): seconds, to bound every wrk run with timeout(1).
secs() {
    case $1 in
    *m) echo $((${1%m} * 60)) ;;
    *s) echo "${1%s}" ;;
    *) echo "$1" ;;
    esac
}
for d in "$DURATION" "$WARMUP"; do
    [[ $d =~ ^[0-9]+[sm]?$ ]] || die "bad duration '$d' (want Ns or Nm)"
done
[ "$(secs "$DURATION")" -gt 0 ] || die "BENCH_DURATION must be > 0"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "bad BENCH_REPEAT '$REPEAT'"
[[ $TLS =~ ^[01]$ ]] || die "bad BENCH_TLS '$TLS' (0 or 1)"
for k in $KINDS; do
    [[ $k == json || $k == sse || $k == sse-rec ]] ||
        die "bad kind '$k' in BENCH_KINDS (json, sse, sse-rec)"
done
[[ $SSE_CHUNKS =~ ^[0-9]+$ ]] || die "bad BENCH_SSE_CHUNKS '$SSE_CHUNKS'"
[[ $SSE_INTERVAL =~ ^[0-9]+$ ]] || die "bad BENCH_SSE_INTERVAL '$SSE_INTERVAL' (ms)"
[[ $SSE_RECORD =~ ^[1-9][0-9]*$ ]] || die "bad BENCH_SSE_RECORD '$SSE_RECORD'"

# --- processes: every one we start is remembered and killed, with its children, on exit --------

TMP=$(mktemp -d /tmp/aigw-bench.XXXXXX) || die "mktemp failed"
PIDS=()

descendants() {
    local c
    for c in $(pgrep -P "$1" 2>/dev/null); do
        echo "$c"
        descendants "$c"
    done
}

cleanup() {
    local all=() p
    for p in "${PIDS[@]}"; do
        # shellcheck disable=SC2207 # pids: one word each
        all+=("$p" $(descendants "$p"))
    done
    for p in "${all[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for _ in $(seq 30); do
        local alive=0
        for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for p in "${all[@]}"; do kill -KILL "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Pinning: the proxy under test gets a core of its own; wrk and the mock share the other one.
NCPU=$(nproc)
if [ "$NCPU" -ge 2 ]; then
    PROXY_CPU=${BENCH_PROXY_CPU-1}
    LOAD_CPU=${BENCH_LOAD_CPU-0}
else
    PROXY_CPU=${BENCH_PROXY_CPU-}
    LOAD_CPU=${BENCH_LOAD_CPU-}
fi
pin() {
    if [ -n "$1" ]; then echo "taskset -c $1"; fi
}
PIN_PROXY=$(pin "$PROXY_CPU")
PIN_LOAD=$(pin "$LOAD_CPU")

# start NAME CMD...: runs CMD in the background, output to $TMP/NAME.log; sets START_PID.
start() {
    local name=$1
    shift
    "$@" >"$TMP/$name.log" 2>&1 &
    START_PID=$!
    PIDS+=("$START_PID")
}

log_tail() {
    [ -f "$TMP/$1.log" ] && sed 's/^/    /' "$TMP/$1.log" | tail -n 15 >&2
}

# wait_port PID PORT: until something accepts on 127.0.0.1:PORT (5 s), while PID lives.
wait_port() {
    for _ in $(seq 50); do
        kill -0 "$1" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

port_free() {
    [ -z "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]
}

# check_target PORT [KIND] [URL]: one request as wrk sends it; sets CHECK_MSG; succeeds on a 200
# chat.completion JSON body (json) or an SSE stream of chunks ending in [DONE] (sse, sse-rec). Sets
# CHECK_SIZE to the body size. URL defaults to plain HTTP on 127.0.0.1:PORT.
check_target() {
    local out code kind=${2:-json} url=${3:-http://127.0.0.1:$1$REQ_PATH} body=$REQ_BODY
    local tls=() hdr=()
    [ "$kind" != json ] && body=$SSE_BODY
    [ "$kind" = sse-rec ] && hdr=(-H "x-mock-tls-record-size: $SSE_RECORD")
    [[ $url == https:* ]] && tls=(--cacert "$CERTS/ca.crt")
    out=$(curl -sS -m 10 "${tls[@]}" -o "$TMP/check.body" -w '%{http_code} %{size_download}' \
        -X POST -H 'Content-Type: application/json' -H 'Authorization: Bearer sk-aigw-bench' \
        "${hdr[@]}" --data "$body" "$url" 2>&1)
    code=${out%% *}
    CHECK_SIZE=${out##* }
    if [ "$code" != 200 ]; then
        CHECK_MSG="POST $url ($kind): ${out} $(head -c 300 "$TMP/check.body" 2>/dev/null)"
        return 1
    fi
    if [ "$kind" != json ]; then
        if ! grep -q '"chat.completion.chunk"' "$TMP/check.body" ||
            [ "$(tail -c 14 "$TMP/check.body" | tr -d '\n')" != "data: [DONE]" ]; then
            CHECK_MSG="POST $url: 200 but not an SSE stream ending in [DONE]: $(head -c 300 "$TMP/check.body")"
            return 1
        fi
    elif ! grep -q '"chat.completion"' "$TMP/check.body"; then
        CHECK_MSG="POST $url: 200 but not a chat.completion: $(head -c 300 "$TMP/check.body")"
        return 1
    fi
    CHECK_MSG=ok
    return 0
}

# --- preconditions -------------------------------------------------------------------------------

for t in wrk haproxy nginx curl taskset pgrep ss; do
    command -v $t >/dev/null || die "$t not found (make bench-deps installs it)"
done
[ -x "$MOCK" ] || die "mock not found: $MOCK (ninja -C $BUILD)"
for p in $MOCK_PORT $AIGW_PORT $HAPROXY_PORT $NGINX_PORT $BASE_PORT; do
    port_free "$p" || die "port 127.0.0.1:$p is in use (set BENCH_PORT to another base)"
done
mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"

# HTTPS upstream: a test CA and a certificate for localhost / 127.0.0.1 (made once, kept).
CERTS=$(realpath "$OUT_DIR")/certs
SCHEME=http
MOCK_TLS_ARGS=()
if [ "$TLS" = 1 ]; then
    "$ROOT/test/mock/gen-certs.sh" "$CERTS" || die "cannot make test certificates in $CERTS"
    SCHEME=https
    MOCK_TLS_ARGS=(--tls-cert "$CERTS/server.crt" --tls-key "$CERTS/server.key")
fi
MOCK_URL=$SCHEME://127.0.0.1:$MOCK_PORT$REQ_PATH

# --- mock: sized so that a chat.completion body is about BODY_BYTES ------------------------------

start_mock() {
    start mock $PIN_LOAD "$MOCK" --listen "127.0.0.1:$MOCK_PORT" --name bench \
        --created 1700000000 --content-bytes "$1" --chunks "$SSE_CHUNKS" \
        --chunk-interval "${SSE_INTERVAL}ms" "${MOCK_TLS_ARGS[@]}"
    MOCK_PID=$START_PID
    wait_port "$MOCK_PID" "$MOCK_PORT" || {
        log_tail mock
        die "aigw-mock did not start on 127.0.0.1:$MOCK_PORT"
    }
}
# stop_pid PID: TERM to it and its children (taken first: once it is gone they are orphans).
stop_pid() {
    local p kids
    kids=$(descendants "$1")
    kill -TERM "$1" 2>/dev/null
    wait "$1" 2>/dev/null
    for p in $kids; do kill -KILL "$p" 2>/dev/null; done
    # Forget it, so that cleanup never signals a recycled pid.
    local keep=()
    for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# The body grows about one byte per content byte (the token counts in "usage" grow too): a few
# restarts with the corrected size land on the target or next to it.
content=64
for _ in 1 2 3; do
    start_mock "$content"
    check_target "$MOCK_PORT" json "$MOCK_URL" || die "aigw-mock does not answer: $CHECK_MSG"
    next=$((content + BODY_BYTES - CHECK_SIZE))
    [ "$next" -lt 1 ] && next=1
    [ "$next" = "$content" ] && break
    stop_pid "$MOCK_PID"
    content=$next
done
kill -0 "$MOCK_PID" 2>/dev/null || {
    start_mock "$content"
    check_target "$MOCK_PORT" json "$MOCK_URL" || die "aigw-mock does not answer: $CHECK_MSG"
}
declare -A RESP_SIZES
RESP_SIZES[json]=$CHECK_SIZE
for k in $KINDS; do
    check_target "$MOCK_PORT" "$k" "$MOCK_URL" || die "aigw-mock does not answer: $CHECK_MSG"
    RESP_SIZES[$k]=$CHECK_SIZE
done
RESP_SIZE=${RESP_SIZES[json]}
echo "mock: $SCHEME://127.0.0.1:$MOCK_PORT, --content-bytes $content, chat.completion body $RESP_SIZE bytes"

# --- proxies -------------------------------------------------------------------------------------

# fill FILE PORT [OUT]: the configuration with @VARS@ filled in, as $TMP/OUT (default FILE). The @..._TLS@ lines carry what each
# proxy needs to reach the mock over HTTPS (empty for plain HTTP).
fill() {
    local h_tls="" n_tls="" a_tls=""
    if [ "$TLS" = 1 ]; then
        h_tls="ssl verify required ca-file $CERTS/ca.crt sni str(localhost) verifyhost localhost"
        n_tls="proxy_ssl_verify on; proxy_ssl_trusted_certificate $CERTS/ca.crt;"
        n_tls="$n_tls proxy_ssl_name localhost; proxy_ssl_server_name on;"
        n_tls="$n_tls proxy_ssl_session_reuse on;"
        a_tls="ca_file = $CERTS/ca.crt"
    fi
    sed -e "s|@PORT@|$2|g" -e "s|@MOCK_PORT@|$MOCK_PORT|g" -e "s|@TMP@|$TMP|g" \
        -e "s|@SCHEME@|$SCHEME|g" -e "s|@HAPROXY_TLS@|$h_tls|g" -e "s|@NGINX_TLS@|$n_tls|g" \
        -e "s|@AIGW_TLS@|$a_tls|g" "$BENCH_DIR/$1" >"$TMP/${3:-$1}"
}

# check_kinds PORT: every kind of request through the target on PORT.
check_kinds() {
    local k
    for k in $KINDS; do
        check_target "$1" "$k" || return 1
    done
}

declare -A PROXY_PID PROXY_PORT
TARGETS=(mock)
PROXY_PID[mock]=$MOCK_PID
PROXY_PORT[mock]=$MOCK_PORT
AIGW_SKIP=""

haproxy_leg() {
    fill haproxy.cfg "$HAPROXY_PORT"
    haproxy -c -q -f "$TMP/haproxy.cfg" >"$TMP/haproxy-check.log" 2>&1 || {
        log_tail haproxy-check
        die "haproxy rejects $BENCH_DIR/haproxy.cfg"
    }
    start haproxy $PIN_PROXY haproxy -db -f "$TMP/haproxy.cfg"
    PROXY_PID[haproxy]=$START_PID
    PROXY_PORT[haproxy]=$HAPROXY_PORT
    wait_port "$START_PID" "$HAPROXY_PORT" || {
        log_tail haproxy
        die "haproxy did not start on 127.0.0.1:$HAPROXY_PORT"
    }
    check_kinds "$HAPROXY_PORT" || die "haproxy does not proxy: $CHECK_MSG"
    TARGETS+=(haproxy)
}

nginx_leg() {
    fill nginx.conf "$NGINX_PORT"
    nginx -q -t -p "$TMP" -c "$TMP/nginx.conf" >"$TMP/nginx-check.log" 2>&1 || {
        log_tail nginx-check
        die "nginx rejects $BENCH_DIR/nginx.conf"
    }
    start nginx $PIN_PROXY nginx -p "$TMP" -c "$TMP/nginx.conf"
    PROXY_PID[nginx]=$START_PID
    PROXY_PORT[nginx]=$NGINX_PORT
    wait_port "$START_PID" "$NGINX_PORT" || {
        log_tail nginx
        die "nginx did not start on 127.0.0.1:$NGINX_PORT"
    }
    check_kinds "$NGINX_PORT" || die "nginx does not proxy: $CHECK_MSG"
    TARGETS+=(nginx)
}

# aigw is skipped, not fatal, while it does not work yet (unless BENCH_REQUIRE_AIGW=1).
aigw_leg() {
    local msg rc
    [ -x "$AIGW" ] || {
        AIGW_SKIP="$AIGW not built"
        return 1
    }
    fill aigw.ini "$AIGW_PORT"
    msg=$("$AIGW" -t -c "$TMP/aigw.ini" 2>&1)
    rc=$?
    if [ $rc -ne 0 ]; then
        AIGW_SKIP="aigw -t -c aigw.ini exits $rc: ${msg:-(no output)}"
        AIGW_SKIP=$(echo "$AIGW_SKIP" | head -n 3 | tr '\n' ' ')
        return 1
    fi
    # aigw resolves admin_socket against its cwd; run it from the temporary directory.
    start aigw bash -c "cd '$TMP' && exec $PIN_PROXY '$(realpath "$AIGW")' -c '$TMP/aigw.ini'"
    PROXY_PID[aigw]=$START_PID
    PROXY_PORT[aigw]=$AIGW_PORT
    if ! wait_port "$START_PID" "$AIGW_PORT"; then
        AIGW_SKIP="not listening on 127.0.0.1:$AIGW_PORT: $(tail -n 3 "$TMP/aigw.log" | tr '\n' ' ')"
        return 1
    fi
    if ! check_kinds "$AIGW_PORT"; then
        AIGW_SKIP=$CHECK_MSG
        return 1
    fi
    TARGETS+=(aigw)
}
# The "base" leg: another aigw binary with the same configuration, for before/after.
base_leg() {
    [ -x "$BASE_AIGW" ] || die "BENCH_AIGW_BASE: $BASE_AIGW is not an executable"
    fill aigw.ini "$BASE_PORT" base.ini
    sed -i "s|aigw.sock|base.sock|" "$TMP/base.ini"
    start base bash -c "cd '$TMP' && exec $PIN_PROXY '$(realpath "$BASE_AIGW")' -c '$TMP/base.ini'"
    PROXY_PID[base]=$START_PID
    PROXY_PORT[base]=$BASE_PORT
    wait_port "$START_PID" "$BASE_PORT" || die "base aigw did not start: $(tail -n 3 "$TMP/base.log")"
    check_kinds "$BASE_PORT" || die "base aigw does not proxy: $CHECK_MSG"
    TARGETS+=(base)
}
# The "cluster" leg: the aigw configuration with [cluster] on (issue 9): the key's limits are
# leased from a redis-server, none of it on the request path.
cluster_leg() {
    command -v redis-server >/dev/null || die "BENCH_CLUSTER: redis-server is not installed"
    port_free "$REDIS_PORT" || die "BENCH_CLUSTER: port $REDIS_PORT is taken"
    start redis $PIN_LOAD redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' \
        --appendonly no
    wait_port "$START_PID" "$REDIS_PORT" || die "redis-server did not start: $(tail -n 3 "$TMP/redis.log")"
    fill aigw.ini "$CLUSTER_PORT" cluster.ini
    sed -i "s|aigw.sock|cluster.sock|" "$TMP/cluster.ini"
    printf '\n[cluster]\nredis = redis://127.0.0.1:%s/0\nnode_name = bench\n' "$REDIS_PORT" \
        >>"$TMP/cluster.ini"
    start cluster bash -c "cd '$TMP' && exec $PIN_PROXY '$(realpath "$AIGW")' -c '$TMP/cluster.ini'"
    PROXY_PID[cluster]=$START_PID
    PROXY_PORT[cluster]=$CLUSTER_PORT
    wait_port "$START_PID" "$CLUSTER_PORT" || die "aigw with [cluster] did not start: $(tail -n 3 "$TMP/cluster.log")"
    sleep 1 # the first leases
    check_kinds "$CLUSTER_PORT" || die "aigw with [cluster] does not proxy: $CHECK_MSG"
    TARGETS+=(cluster)
}
[[ $WANT == *" haproxy "* ]] && haproxy_leg
[[ $WANT == *" nginx "* ]] && nginx_leg
if [[ $WANT == *" aigw "* ]] && ! aigw_leg; then
    echo "bench: aigw not working: $AIGW_SKIP" >&2
    [ "${BENCH_REQUIRE_AIGW:-0}" = 1 ] && exit 1
    [ -n "${PROXY_PID[aigw]:-}" ] && stop_pid "${PROXY_PID[aigw]}"
fi
[[ $WANT == *" base "* ]] && base_leg
[[ $WANT == *" cluster "* ]] && cluster_leg

# --- load ----------------------------------------------------------------------------------------

CLK_TCK=$(getconf CLK_TCK)

# CPU ticks (user + system) used so far by a process and its children still alive.
cpu_ticks() {
    local p sum=0 st
    for p in "$1" $(descendants "$1"); do
        st=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        st=${st##*) }
        set -- $st
        sum=$((sum + ${12} + ${13}))
    done
    echo $sum
}

# "BUSY TOTAL" jiffies of CPU $1 (all CPUs when empty) from /proc/stat; busy counts steal too,
# so a busy proxy core with a target well under 100% shows contention on it.
core_ticks() {
    local l
    l=$(grep "^cpu$1 " /proc/stat)
    set -- $l
    echo "$(($2 + $3 + $4 + $7 + $8 + $9)) $(($2 + $3 + $4 + $5 + $6 + $7 + $8 + $9))"
}

# run_wrk TARGET CONNS DURATION OUTFILE: requests of kind $KIND (wrk speaks HTTPS to the mock
# itself when the upstream is HTTPS, HTTP to the proxies).
run_wrk() {
    local limit=$(($(secs "$3") + 30)) script=$BENCH_DIR/chat.lua url
    [ "$KIND" != json ] && script=$BENCH_DIR/chat-sse.lua
    export BENCH_KIND=$KIND
    url="http://127.0.0.1:${PROXY_PORT[$1]}$REQ_PATH"
    [ "$1" = mock ] && url=$MOCK_URL
    timeout -k 5 "$limit" $PIN_LOAD wrk -t1 -c"$2" -d"$3" --latency -s "$script" "$url" >"$4" 2>&1
}

GIT_REV=$(git describe --always --dirty 2>/dev/null || echo unknown)
{
    echo "# aigw make bench, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $GIT_REV"
    echo "# $(uname -srm), $NCPU CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'))"
    echo "# proxy CPU: ${PROXY_CPU:-any}, wrk + mock CPU: ${LOAD_CPU:-any};" \
        "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# upstream: aigw-mock over $SCHEME$([ "$TLS" = 1 ] && echo " (TLS 1.2, verified, keep-alive, session reuse)")"
    echo "# wrk -t1 -cN -d$DURATION --latency (warm-up $WARMUP), POST $REQ_PATH ${#REQ_BODY} bytes (json),"
    [[ " $KINDS " == *" sse"* ]] && echo "# sse: ${#SSE_BODY} bytes, stream of $SSE_CHUNKS content events" \
        "($([ "$SSE_INTERVAL" = 0 ] && echo "one write" || echo "${SSE_INTERVAL} ms apart")), ${RESP_SIZES[sse]:-${RESP_SIZES[sse-rec]}} bytes;" \
        "sse-rec: the same in TLS records of $SSE_RECORD bytes"
    echo "# json response body $RESP_SIZE bytes; $(wrk -v 2>&1 | head -n1 | cut -d' ' -f1-2); $(haproxy -v | head -n1 | cut -d' ' -f1-3); $(nginx -v 2>&1)"
    [ -n "$AIGW_SKIP" ] && echo "# aigw not working: $AIGW_SKIP"
} >"$TMP/header"

: >"$TMP/raw"
FAILED=0
# measure TARGET CONNS REP: one warm-up and one measured wrk run of kind $KIND; stores the
# figures under "KIND/TARGET:CONNS:REP" in the arrays below (rates and percentages already
# formatted).
declare -A RPS P50 P99 CPU CORE PERCPU ERR USREQ
measure() {
    local t=$1 c=$2 k="$KIND/$1:$2:$3" tcpu rc b0 a0 b1 a1 t0 t1 line kv errs
    local -A f=()
    echo "bench: $KIND, $t, $c connections, $DURATION (run $3 of $REPEAT) ..." >&2
    if [ "$(secs "$WARMUP")" -gt 0 ]; then
        run_wrk "$t" "$c" "$WARMUP" "$TMP/warmup.out"
    fi
    tcpu=$PROXY_CPU
    [ "$t" = mock ] && tcpu=$LOAD_CPU
    read -r b0 a0 <<<"$(core_ticks "$tcpu")"
    t0=$(cpu_ticks "${PROXY_PID[$t]}")
    run_wrk "$t" "$c" "$DURATION" "$TMP/wrk.out"
    rc=$?
    t1=$(cpu_ticks "${PROXY_PID[$t]}")
    read -r b1 a1 <<<"$(core_ticks "$tcpu")"
    {
        echo "## $KIND, $t, $c connections, run $3 (wrk exit $rc)"
        cat "$TMP/wrk.out"
        echo
    } >>"$TMP/raw"
    line=$(grep '^BENCH ' "$TMP/wrk.out")
    if [ $rc -ne 0 ] || [ -z "$line" ]; then
        echo "bench: wrk failed against $t ($KIND, $c connections), exit $rc:" >&2
        sed 's/^/    /' "$TMP/wrk.out" | tail -n 10 >&2
        FAILED=1
        return
    fi
    for kv in ${line#BENCH }; do f[${kv%%=*}]=${kv#*=}; done
    RPS[$k]=$(awk -v n="${f[requests]}" -v d="${f[duration_us]}" 'BEGIN { printf "%.0f", n * 1e6 / d }')
    P50[$k]=$(awk -v u="${f[p50_us]}" 'BEGIN { printf "%.2fms", u / 1000 }')
    P99[$k]=$(awk -v u="${f[p99_us]}" 'BEGIN { printf "%.2fms", u / 1000 }')
    CPU[$k]=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v d="${f[duration_us]}" \
        'BEGIN { printf "%.0f%%", t / hz * 100 / (d / 1e6) }')
    # CPU time of the target's own processes per request (user + system, not softirq): how much
    # work a request costs it, which other work on the machine hardly changes.
    USREQ[$k]=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n="${f[requests]}" \
        'BEGIN { if (n > 0) printf "%.1f", t / hz * 1e6 / n; else printf "-" }')
    CORE[$k]=$(awk -v b=$((b1 - b0)) -v a=$((a1 - a0)) \
        'BEGIN { if (a > 0) printf "%.0f%%", b * 100 / a; else printf "-" }')
    # Requests per busy second of the proxy's core: compares efficiency even when the load side,
    # not the proxy, limits req/s. The core's time rather than the process's, as the loopback
    # receive path runs in softirq time that /proc/PID/stat does not charge to the process (a
    # quarter of the core with HAProxy here). Meaningless for CPU 0, shared by wrk and the mock.
    PERCPU[$k]=-
    if [ "$t" != mock ]; then
        PERCPU[$k]=$(awk -v n="${f[requests]}" -v b=$((b1 - b0)) -v hz="$CLK_TCK" \
            'BEGIN { if (b > 0) printf "%.0f", n * hz / b; else printf "-" }')
    fi
    errs=$((f[status] + f[connect] + f[read] + f[write] + f[timeout]))
    ERR[$k]=$errs
    echo "=> $KIND $t $c run $3: ${RPS[$k]} req/s, p50 ${P50[$k]}, p99 ${P99[$k]}, cpu ${CPU[$k]}," \
        "core ${CORE[$k]}, ${PERCPU[$k]} req/core-s, ${USREQ[$k]} us/req, $errs errors" >>"$TMP/raw"
    if [ "$errs" -gt 0 ]; then
        echo "bench: $t ($KIND, $c connections): ${f[status]} non-2xx/3xx responses, socket errors" \
            "connect ${f[connect]} read ${f[read]} write ${f[write]} timeout ${f[timeout]}" >&2
        FAILED=1
    fi
}

# Repeats go round all targets in turn, so that a burst of other work on a shared machine hits
# one run of each rather than every run of one.
for r in $(seq "$REPEAT"); do
    for KIND in $KINDS; do
        for c in $CONNS; do
            for t in "${TARGETS[@]}"; do
                measure "$t" "$c" "$r"
            done
        done
    done
done

# --- report --------------------------------------------------------------------------------------

# median_run TARGET CONNS: the run whose req/s is the median of the target's runs (lower middle
# for an even count); prints nothing when no run succeeded.
median_run() {
    local r
    for r in $(seq "$REPEAT"); do
        [ -n "${RPS[$1:$2:$r]:-}" ] && echo "${RPS[$1:$2:$r]} $r"
    done | sort -n | awk '{ v[NR] = $2 } END { if (NR) print v[int((NR + 1) / 2)] }'
}

# spread TARGET CONNS: (max - min) / median of req/s over the runs, in %.
spread() {
    local r
    for r in $(seq "$REPEAT"); do
        [ -n "${RPS[$1:$2:$r]:-}" ] && echo "${RPS[$1:$2:$r]}"
    done | sort -n | awk '{ v[NR] = $1 } END {
        if (NR > 1) printf "%.0f%%", (v[NR] - v[1]) * 100 / v[int((NR + 1) / 2)]; else print "-" }'
}

for KIND in $KINDS; do
    [ "$KINDS" = json ] || echo "$KIND:"
    printf '%-8s %6s %8s %7s %9s %9s %11s %5s %5s %10s %7s %6s\n' target conns req/s spread p50 p99 \
        vs-haproxy cpu core req/core-s us/req errors
    for c in $CONNS; do
        hr=$(median_run "$KIND/haproxy" "$c")
        for t in mock haproxy nginx aigw base cluster; do
            [[ $t == mock || $WANT == *" $t "* ]] || continue
            if [ "$t" = aigw ] && [ -n "$AIGW_SKIP" ]; then
                printf '%-8s %6s %s\n' aigw "$c" "skipped: aigw not working (figures pending)"
                continue
            fi
            mr=$(median_run "$KIND/$t" "$c")
            [ -n "$mr" ] || {
                printf '%-8s %6s %s\n' "$t" "$c" "failed (see raw output)"
                continue
            }
            k="$KIND/$t:$c:$mr"
            ratio=-
            [ -n "$hr" ] &&
                ratio=$(awk -v a="${RPS[$k]}" -v b="${RPS[$KIND/haproxy:$c:$hr]}" 'BEGIN { printf "%.2f", a / b }')
            errs=0
            for r in $(seq "$REPEAT"); do errs=$((errs + ${ERR[$KIND/$t:$c:$r]:-0})); done
            name=$t
            [ "$t" = mock ] && name=direct
            printf '%-8s %6s %8s %7s %9s %9s %11s %5s %5s %10s %7s %6s\n' "$name" "$c" "${RPS[$k]}" \
                "$(spread "$KIND/$t" "$c")" "${P50[$k]}" "${P99[$k]}" "$ratio" "${CPU[$k]}" "${CORE[$k]}" \
                "${PERCPU[$k]}" "${USREQ[$k]}" "$errs"
        done
    done
done >"$TMP/table"

{
    echo "(median of $REPEAT runs by req/s, with that run's latency and CPU figures; spread = (max - min)"
    echo " / median req/s; direct = wrk straight to the mock; cpu = the target's processes, % of one"
    echo " core; core = how busy the target's CPU was, counting everything on it (for direct: CPU 0,"
    echo " wrk + mock); req/core-s = requests per busy second of the proxy's core; us/req = CPU time"
    echo " of the target's processes per request (for direct: the mock's); errors = non-2xx/3xx"
    echo " responses and socket errors, all runs)"
} >"$TMP/legend"

{
    cat "$TMP/header"
    echo
    cat "$TMP/table" "$TMP/legend"
    echo
    echo "# raw wrk output"
    cat "$TMP/raw"
} >"$RESULTS"

echo
cat "$TMP/header" "$TMP/table" "$TMP/legend"
echo "raw output: $RESULTS"
[ -n "$AIGW_SKIP" ] && echo "aigw not working: $AIGW_SKIP" >&2
[ $FAILED = 0 ] || die "errors during the run (see above)"
exit 0
