// One non-stream chat completion through aigw; prints the answer as the SDK returned it.
// params: {model, content}
import { client, params, run } from './common.mjs';

await run(async () => {
    const c = await client().chat.completions.create({
        model: params.model,
        messages: [{ role: 'user', content: params.content }],
    });
    return { completion: c, content: c.choices[0]?.message?.content ?? null };
});
