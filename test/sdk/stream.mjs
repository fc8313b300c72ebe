// One streamed chat completion through aigw; prints every chunk the SDK yielded, the content
// they add up to and which chunks carried usage.
// params: {model, content, include_usage: true | false | null (no stream_options sent)}
import { client, params, run } from './common.mjs';

await run(async () => {
    const body = {
        model: params.model,
        messages: [{ role: 'user', content: params.content }],
        stream: true,
    };
    if (params.include_usage !== null && params.include_usage !== undefined)
        body.stream_options = { include_usage: params.include_usage };
    const stream = await client().chat.completions.create(body);
    const chunks = [];
    let content = '';
    for await (const chunk of stream) {
        chunks.push(chunk);
        for (const ch of chunk.choices ?? []) content += ch.delta?.content ?? '';
    }
    const usage_chunks = [];
    chunks.forEach((c, i) => {
        if (c.usage !== undefined && c.usage !== null) usage_chunks.push(i);
    });
    return { chunks, content, usage_chunks };
});
