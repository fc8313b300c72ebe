-- wrk script for test/bench/bench.sh, kind sse: POSTs a streaming chat completion request on every
-- keep-alive connection (the answer is an SSE stream of chunks) and prints the summary line.
wrk.method = "POST"
wrk.body = '{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d status=%d connect=%d read=%d write=%d timeout=%d\n",
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
        e.status, e.connect, e.read, e.write, e.timeout))
end
