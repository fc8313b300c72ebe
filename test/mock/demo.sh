#!/usr/bin/env bash
# `make run`: two aigw-mock upstreams on 127.0.0.1:9101/9102 and aigw on etc/demo.ini
# (127.0.0.1:8080), in the foreground. Ctrl-C stops all of it.
set -u
build=${1:-build}
cd "$(dirname "$0")/../.."

pids=()
stop() {
    trap - INT TERM EXIT
    # aigw's master stops its workers itself; SIGINT is its fast stop.
    [ -n "${aigw_pid:-}" ] && kill -INT "$aigw_pid" 2>/dev/null
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
    wait 2>/dev/null
    echo "demo stopped"
}
trap stop INT TERM EXIT

for port in 9101 9102; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is already in use: stop whatever listens there first" >&2
        exit 1
    fi
done

"$build/test/mock/aigw-mock" --listen 127.0.0.1:9101 --name mock1 --chunk-interval 100ms &
pids+=($!)
"$build/test/mock/aigw-mock" --listen 127.0.0.1:9102 --name mock2 --chunk-interval 100ms &
pids+=($!)

"$build/cmd/aigw" -c etc/demo.ini &
aigw_pid=$!

for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null && break
    kill -0 "$aigw_pid" 2>/dev/null || { echo "aigw failed to start" >&2; exit 1; }
    sleep 0.1
done

cat <<MSG

aigw is listening on http://127.0.0.1:8080 in front of mock1 (:9101) and mock2 (:9102).
Try (sk-aigw-demo is the demo's client key, [key demo] in etc/demo.ini):
  curl -s localhost:8080/v1/chat/completions -H 'Authorization: Bearer sk-aigw-demo' \\
       -H 'content-type: application/json' \\
       -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
  curl -sN localhost:8080/v1/chat/completions -H 'Authorization: Bearer sk-aigw-demo' \\
       -H 'content-type: application/json' \\
       -d '{"model":"fast","stream":true,"messages":[{"role":"user","content":"hi"}]}'
  curl -s localhost:8080/v1/models -H 'Authorization: Bearer sk-aigw-demo'
  $build/cmd/aigwctl -c etc/demo.ini show backends
  $build/cmd/aigwctl -c etc/demo.ini show proc
Ctrl-C stops the demo.

MSG
# `aigwctl upgrade` (or SIGUSR2) replaces the master by a new process that is not our child:
# follow it through the admin socket, so that the demo neither ends at an upgrade nor leaves
# the new master running after Ctrl-C.
while :; do
    if ! wait "$aigw_pid" 2>/dev/null; then
        while kill -0 "$aigw_pid" 2>/dev/null; do sleep 0.5; done
    fi
    new=$("$build/cmd/aigwctl" -c etc/demo.ini --json show info 2>/dev/null |
          sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
    { [ -n "$new" ] && [ "$new" != "$aigw_pid" ]; } || break
    echo "demo: the aigw master is now pid $new (binary upgrade)"
    aigw_pid=$new
done
