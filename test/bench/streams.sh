#!/bin/bash
# make bench-streams: many concurrent SSE streams (default 10,000) through aigw with 2 workers,
# a chunk every 50 ms from the mock, each stamped with its send time: the latency each chunk
# adds (through aigw minus straight to the mock, same client, same mock) and the workers' memory
# per open stream. Writes BUILD/bench/streams.txt.
#
# usage: test/bench/streams.sh [BUILD_DIR]           (default build)
# env:   STREAMS=10000        concurrent streams
#        STREAMS_INTERVAL=50  ms between the chunks of a stream
#        STREAMS_DURATION=20  measured seconds (after every stream answered + STREAMS_SETTLE)
#        STREAMS_SETTLE=3     seconds between the last stream's first answer and measuring
#        STREAMS_RATE=2000    new connections per second while opening
#        STREAMS_SOURCES=8    loopback source addresses 127.0.0.1..N (ephemeral ports)
#        STREAMS_WORKERS=2    aigw workers
#        STREAMS_TARGETS="direct aigw"   also haproxy, nginx (one thread / worker each)
#        STREAMS_PORT=18440   first of four loopback ports (mock, aigw, haproxy, nginx)
#        STREAMS_PIN=0        1: the mock and the client on CPU 0, the proxy (all its workers) on
#                             CPU 1, as make bench does (2+ CPUs)
set -u

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 1
BUILD=${1:-build}
BENCH_DIR=$ROOT/test/bench
N=${STREAMS:-10000}
INTERVAL=${STREAMS_INTERVAL:-50}
DURATION=${STREAMS_DURATION:-20}
SETTLE=${STREAMS_SETTLE:-3}
RATE=${STREAMS_RATE:-2000}
SOURCES=${STREAMS_SOURCES:-8}
WORKERS=${STREAMS_WORKERS:-2}
TARGETS=${STREAMS_TARGETS:-direct aigw}
PORT0=${STREAMS_PORT:-18440}
PIN=${STREAMS_PIN:-0}
PIN_LOAD=() PIN_PROXY=()
if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ]; then
    PIN_LOAD=(taskset -c 0)
    PIN_PROXY=(taskset -c 1)
fi
MOCK=$BUILD/test/mock/aigw-mock
LOAD=$BUILD/test/bench/sse-load
AIGW=$(realpath "$BUILD/cmd/aigw" 2>/dev/null)
AIGWCTL=$(realpath "$BUILD/cmd/aigwctl" 2>/dev/null)
OUT=$BUILD/bench/streams.txt

die() {
    echo "streams: $*" >&2
    exit 1
}
for v in "$N" "$INTERVAL" "$DURATION" "$SETTLE" "$RATE" "$SOURCES" "$WORKERS" "$PORT0"; do
    [[ $v =~ ^[0-9]+$ ]] || die "bad number '$v'"
done
[ -x "$MOCK" ] && [ -x "$LOAD" ] && [ -x "$AIGW" ] || die "build first (ninja -C $BUILD)"
mkdir -p "$BUILD/bench" || die "cannot create $BUILD/bench"

# Every stream is an fd in the client, one in the mock, and two in a proxy; room for more.
ulimit -n $((4 * N + 4096)) 2>/dev/null || ulimit -n "$(ulimit -Hn)" ||
    die "cannot raise the open file limit (want $((4 * N + 4096)), root can)"

TMP=$(mktemp -d /tmp/aigw-streams.XXXXXX) || die "mktemp failed"
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
        # shellcheck disable=SC2207
        all+=("$p" $(descendants "$p"))
    done
    for p in "${all[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for _ in $(seq 50); do
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

start() { # NAME CMD...: background, output to $TMP/NAME.log, START_PID
    local name=$1
    shift
    "$@" >"$TMP/$name.log" 2>&1 &
    START_PID=$!
    PIDS+=("$START_PID")
}
stop_pid() {
    local p kids keep=()
    kids=$(descendants "$1")
    kill -TERM "$1" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" $kids 2>/dev/null
    wait "$1" 2>/dev/null
    for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}
wait_port() { # PID PORT
    for _ in $(seq 100); do
        kill -0 "$1" 2>/dev/null || return 1
        (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}
rss_kb() { # PIDS...: summed VmRSS
    local p s=0 v
    for p in "$@"; do
        v=$(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null)
        s=$((s + ${v:-0}))
    done
    echo $s
}
cpu_ticks() { # PIDS...: summed user + system CPU ticks
    local p sum=0 st
    for p in "$@"; do
        st=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        st=${st##*) }
        # shellcheck disable=SC2086
        set -- $st
        sum=$((sum + ${12} + ${13}))
    done
    echo $sum
}
fds() { # PIDS...: summed open fds
    local p s=0
    for p in "$@"; do s=$((s + $(ls "/proc/$p/fd" 2>/dev/null | wc -l))); done
    echo $s
}

MOCK_PORT=$PORT0
declare -A PORT=([direct]=$PORT0 [aigw]=$((PORT0 + 1)) [haproxy]=$((PORT0 + 2)) [nginx]=$((PORT0 + 3)))
for p in "${PORT[@]}"; do
    [ -z "$(ss -Hltn "sport = :$p" 2>/dev/null)" ] || die "port $p in use (set STREAMS_PORT)"
done

# Streams outlast the run: opening, settling, measuring, and slack.
CHUNKS=$(((N / RATE + SETTLE + DURATION + 30) * 1000 / INTERVAL))
start mock "${PIN_LOAD[@]}" "$MOCK" --listen "127.0.0.1:$MOCK_PORT" --name streams --stamp --chunks "$CHUNKS" \
    --chunk-interval "${INTERVAL}ms"
wait_port "$START_PID" "$MOCK_PORT" || die "aigw-mock did not start: $(tail -n 3 "$TMP/mock.log")"
MOCK_PID=$START_PID

# proxy_up TARGET: starts the proxy, sets PROXY_PID and WORKER_PIDS (the processes carrying
# streams, whose memory is reported)
proxy_up() {
    case $1 in
    aigw)
        cat >"$TMP/aigw.ini" <<EOF
[global]
workers = $WORKERS
admin_socket = $TMP/aigw.sock
log_level = warn

[listen streams]
auth = off
bind = 127.0.0.1:${PORT[aigw]}
pool = streams

[pool streams]
check = no
stream_idle_timeout = 30s

[backend mock]
url = http://127.0.0.1:$MOCK_PORT/v1
EOF
        start aigw bash -c "cd '$TMP' && exec ${PIN_PROXY[*]} '$AIGW' -c '$TMP/aigw.ini'"
        PROXY_PID=$START_PID
        wait_port "$PROXY_PID" "${PORT[aigw]}" || die "aigw did not start: $(tail -n 3 "$TMP/aigw.log")"
        WORKER_PIDS=$("$AIGWCTL" -s "$TMP/aigw.sock" show proc --json |
            sed -n 's/.*"role":"worker".*"pid":\([0-9]*\).*/\1/p' | tr '\n' ' ')
        ;;
    haproxy)
        sed -e "s|@PORT@|${PORT[haproxy]}|g" -e "s|@MOCK_PORT@|$MOCK_PORT|g" \
            -e "s|@HAPROXY_TLS@||g" -e "s|maxconn 4096|maxconn $((2 * N + 100))|" \
            -e "s|timeout client 30s|timeout client 120s|" \
            -e "s|timeout server 30s|timeout server 120s|" \
            "$BENCH_DIR/haproxy.cfg" >"$TMP/haproxy.cfg"
        start haproxy "${PIN_PROXY[@]}" haproxy -db -f "$TMP/haproxy.cfg"
        PROXY_PID=$START_PID
        wait_port "$PROXY_PID" "${PORT[haproxy]}" || die "haproxy did not start"
        WORKER_PIDS=$PROXY_PID
        ;;
    nginx)
        sed -e "s|@PORT@|${PORT[nginx]}|g" -e "s|@MOCK_PORT@|$MOCK_PORT|g" -e "s|@TMP@|$TMP|g" \
            -e "s|@SCHEME@|http|g" -e "s|@NGINX_TLS@|proxy_buffering off;|g" \
            -e "s|worker_connections 4096|worker_connections $((2 * N + 100))|" \
            "$BENCH_DIR/nginx.conf" >"$TMP/nginx.conf"
        start nginx "${PIN_PROXY[@]}" nginx -p "$TMP" -c "$TMP/nginx.conf"
        PROXY_PID=$START_PID
        wait_port "$PROXY_PID" "${PORT[nginx]}" || die "nginx did not start"
        WORKER_PIDS=$(pgrep -P "$PROXY_PID" | tr '\n' ' ')
        ;;
    esac
}

LOAD_AVG_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A LINE MEM CPU
FAILED=0
for t in $TARGETS; do
    PROXY_PID="" WORKER_PIDS=""
    [ "$t" = direct ] || proxy_up "$t"
    # shellcheck disable=SC2086
    rss0=$([ -n "$WORKER_PIDS" ] && rss_kb $WORKER_PIDS)
    echo "streams: $t: opening $N streams ($RATE/s), then measuring ${DURATION}s ..." >&2
    "${PIN_LOAD[@]}" "$LOAD" --port "${PORT[$t]}" --streams "$N" --sources "$SOURCES" --rate "$RATE" \
        --settle "$SETTLE" --duration "$DURATION" >"$TMP/load-$t.out" 2>"$TMP/load-$t.err" &
    lp=$!
    # memory once every stream is open and flowing
    for _ in $(seq $((N / RATE * 10 + SETTLE * 10 + 300))); do
        grep -q measuring "$TMP/load-$t.err" && break
        kill -0 $lp 2>/dev/null || break
        sleep 0.1
    done
    sleep 2
    if [ -n "$WORKER_PIDS" ]; then
        # shellcheck disable=SC2086
        rss1=$(rss_kb $WORKER_PIDS) fd1=$(fds $WORKER_PIDS)
        MEM[$t]="workers' RSS ${rss0} kB idle -> ${rss1} kB with the streams open ($fd1 fds):"
        MEM[$t]+=" $(awk -v a="$rss0" -v b="$rss1" -v n="$N" 'BEGIN { printf "%.1f kB per stream (growth), %.1f kB (total / streams)", (b - a) / n, b / n }')"
    fi
    # CPU over a few measured seconds: the proxy's workers, the mock, the client
    span=$((DURATION > 5 ? DURATION - 4 : 1))
    # shellcheck disable=SC2086
    c0="$([ -n "$WORKER_PIDS" ] && cpu_ticks $WORKER_PIDS || echo 0) $(cpu_ticks "$MOCK_PID") $(cpu_ticks $lp)"
    sleep "$span"
    # shellcheck disable=SC2086
    c1="$([ -n "$WORKER_PIDS" ] && cpu_ticks $WORKER_PIDS || echo 0) $(cpu_ticks "$MOCK_PID") $(cpu_ticks $lp)"
    CPU[$t]=$(awk -v a="$c0" -v b="$c1" -v s="$span" -v hz="$(getconf CLK_TCK)" 'BEGIN {
        split(a, x); split(b, y)
        printf "%.0f%% %.0f%% %.0f%%", (y[1] - x[1]) * 100 / hz / s, (y[2] - x[2]) * 100 / hz / s,
            (y[3] - x[3]) * 100 / hz / s }')
    wait $lp
    rc=$?
    LINE[$t]=$(grep '^SSELOAD' "$TMP/load-$t.out")
    if [ $rc -ne 0 ] || [ -z "${LINE[$t]}" ]; then
        echo "streams: $t: load client failed (exit $rc): ${LINE[$t]:-$(tail -n 3 "$TMP/load-$t.err")}" >&2
        FAILED=1
    fi
    [ -n "$PROXY_PID" ] && stop_pid "$PROXY_PID"
done

field() { # LINE KEY
    local kv
    for kv in $1; do [ "${kv%%=*}" = "$2" ] && echo "${kv#*=}"; done
}
{
    echo "# aigw make bench-streams, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git describe --always --dirty 2>/dev/null)"
    echo "# $N streams, a chunk every ${INTERVAL} ms each (aigw-mock --stamp), measured ${DURATION} s;" \
        "aigw workers = $WORKERS; $(nproc) CPUs, $([ ${#PIN_PROXY[@]} -gt 0 ] && echo "mock + client on CPU 0, proxy on CPU 1" || echo "no pinning");"
    echo "# load average before: $LOAD_AVG_BEFORE, after: $(cut -d' ' -f1-3 /proc/loadavg)"
    printf '%-8s %7s %6s %9s %8s %8s %8s %8s %9s %6s %5s %6s\n' target streams failed chunks/s \
        p50 p90 p99 p99.9 max proxy mock client
    for t in $TARGETS; do
        l=${LINE[$t]:-}
        [ -n "$l" ] || {
            printf '%-8s %s\n' "$t" failed
            continue
        }
        read -r cp cm cc <<<"${CPU[$t]:-- - -}"
        [ "$t" = direct ] && cp=-
        printf '%-8s %7s %6s %9s %7.2fms %7.2fms %7.2fms %7.2fms %8.1fms %6s %5s %6s\n' "$t" \
            "$(field "$l" open)" "$(field "$l" failed)" "$(field "$l" chunks_per_s)" \
            "$(awk -v v="$(field "$l" p50_us)" 'BEGIN { print v / 1000 }')" \
            "$(awk -v v="$(field "$l" p90_us)" 'BEGIN { print v / 1000 }')" \
            "$(awk -v v="$(field "$l" p99_us)" 'BEGIN { print v / 1000 }')" \
            "$(awk -v v="$(field "$l" p999_us)" 'BEGIN { print v / 1000 }')" \
            "$(awk -v v="$(field "$l" max_us)" 'BEGIN { print v / 1000 }')" "$cp" "$cm" "$cc"
    done
    if [ -n "${LINE[direct]:-}" ]; then
        for t in $TARGETS; do
            [ "$t" = direct ] || [ -z "${LINE[$t]:-}" ] && continue
            echo "$t adds per chunk: p50 $(awk -v a="$(field "${LINE[$t]}" p50_us)" -v b="$(field "${LINE[direct]}" p50_us)" 'BEGIN { printf "%.2f", (a - b) / 1000 }') ms," \
                "p99 $(awk -v a="$(field "${LINE[$t]}" p99_us)" -v b="$(field "${LINE[direct]}" p99_us)" 'BEGIN { printf "%.2f", (a - b) / 1000 }') ms (gateway minus direct)"
        done
    fi
    for t in $TARGETS; do
        [ -n "${MEM[$t]:-}" ] && echo "$t memory: ${MEM[$t]}"
    done
    echo "(latency = the client's receive time minus the mock's send time stamped in the chunk,"
    echo " CLOCK_MONOTONIC; every chunk of every open stream during the measured seconds;"
    echo " proxy, mock, client = CPU used during the measurement, % of one core)"
} >"$OUT"
cat "$OUT"
for t in $TARGETS; do
    echo "raw $t: ${LINE[$t]:-}" >>"$OUT"
done
[ $FAILED = 0 ] || die "a load run failed (see above)"
