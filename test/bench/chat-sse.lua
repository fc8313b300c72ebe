-- wrk script for test/bench/bench.sh, kinds sse and sse-rec: POSTs a streaming chat completion
-- request on every keep-alive connection (the answer is an SSE stream of chunks) and prints the
-- summary line. sse-rec asks the mock for TLS records of BENCH_SSE_RECORD bytes.
wrk.method = "POST"
wrk.body = '{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
-- aigw's client key (test/bench/aigw.ini); HAProxy and nginx pass it on, the mock ignores it
wrk.headers["Authorization"] = "Bearer sk-aigw-bench"
if os.getenv("BENCH_KIND") == "sse-rec" then
    wrk.headers["x-mock-tls-record-size"] = os.getenv("BENCH_SSE_RECORD") or "200"
end

done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d status=%d connect=%d read=%d write=%d timeout=%d\n",
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
        e.status, e.connect, e.read, e.write, e.timeout))
end
