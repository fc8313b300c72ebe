// A 429 from aigw's own rate limiter that the SDK retries after Retry-After: params.fill requests
// use up the key's rpm, one more is refused, then (params.delay seconds after the first of them
// was sent) one request is made with maxRetries = params.max_retries. Prints when each attempt
// went out, its status and headers (from the recording fetch), so the test can check the SDK
// waited Retry-After and needed no more attempts than that.
// params: {model, content, fill, delay, max_retries}
import { client, now, params, run } from './common.mjs';

await run(async () => {
    const body = { model: params.model, messages: [{ role: 'user', content: params.content }] };
    const fillStart = now();
    const fill = [];
    for (let i = 0; i < params.fill; i++) {
        try {
            await client().chat.completions.create(body);
            fill.push(200);
        } catch (e) {
            fill.push(e?.status ?? String(e));
        }
    }
    const fillEnd = now();
    // The next request at once must be refused (no retry); when it is not, there is no limit to
    // wait for and the scenario ends here.
    let probe = 200;
    try {
        await client().chat.completions.create(body);
    } catch (e) {
        probe = e?.status ?? String(e);
    }
    if (probe !== 429) return { fill, probe };
    const wait = fillStart + params.delay - now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait * 1000));
    const start = now();
    const limited = client({ maxRetries: params.max_retries, timeout: 120000 });
    const c = await limited.chat.completions.create(body);
    const end = now();
    return {
        fill,
        probe,
        fill_start: fillStart,
        fill_end: fillEnd,
        start,
        end,
        content: c.choices[0]?.message?.content ?? null,
    };
});
