// models.list() (every page) and models.retrieve(id) for each of params.retrieve through aigw.
// A retrieve that throws is reported in place. params: {retrieve: [id, ...]}
import { client, errorInfo, params, run } from './common.mjs';

await run(async () => {
    const c = client();
    const list = [];
    for await (const m of c.models.list()) list.push(m);
    const retrieved = {};
    for (const id of params.retrieve ?? []) {
        try {
            retrieved[id] = { ok: true, model: await c.models.retrieve(id) };
        } catch (e) {
            retrieved[id] = { ok: false, error: errorInfo(e) };
        }
    }
    return { list, ids: list.map((m) => m.id), retrieved };
});
