-- wrk script for test/bench/bench.sh: POSTs a small non-stream chat completion request on every
-- keep-alive connection and prints one machine-readable summary line at the end.
wrk.method = "POST"
wrk.body = '{"model":"demo","messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
-- aigw's client key (test/bench/aigw.ini); HAProxy and nginx pass it on, the mock ignores it
wrk.headers["Authorization"] = "Bearer sk-aigw-bench"

-- bench.sh parses this line rather than wrk's human-readable text: exact microseconds, and the
-- error counts split the same way wrk counts them (status = responses outside 2xx/3xx).
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d status=%d connect=%d read=%d write=%d timeout=%d\n",
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
        e.status, e.connect, e.read, e.write, e.timeout))
end
