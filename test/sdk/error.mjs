// One call through aigw that is expected to fail; prints the error as the SDK raised it.
// params: {call: "chat" | "stream" | "retrieve", model, content}
import { client, params, run } from './common.mjs';

await run(async () => {
    const c = client();
    const body = { model: params.model, messages: [{ role: 'user', content: params.content }] };
    let result;
    if (params.call === 'retrieve') result = await c.models.retrieve(params.model);
    else if (params.call === 'stream') {
        const chunks = [];
        for await (const chunk of await c.chat.completions.create({ ...body, stream: true }))
            chunks.push(chunk);
        result = chunks;
    } else result = await c.chat.completions.create(body);
    return { result };
});
