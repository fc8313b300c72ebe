// Shared by the scenario scripts run by test/integration/test_openai_sdk.py: an OpenAI client
// pointed at aigw (AIGW_BASE_URL, AIGW_API_KEY), a fetch that records every HTTP attempt the SDK
// makes (its retries included), and one JSON line of results on stdout.
import OpenAI from 'openai';
import { VERSION } from 'openai/version';

// Seconds on a monotonic clock; every time in the output uses it.
export function now() {
    return performance.now() / 1000;
}

export const attempts = [];

// The SDK's retries are invisible from outside: each attempt is recorded here as it happens.
async function recordingFetch(url, init) {
    const a = { start: now(), method: init?.method ?? 'GET', url: String(url) };
    if (typeof init?.body === 'string') a.body = init.body;
    attempts.push(a);
    const res = await fetch(url, init);
    a.head_time = now();
    a.status = res.status;
    a.headers = Object.fromEntries(res.headers);
    return res;
}

// The scenario's parameters: a JSON object as the first argument.
export const params = JSON.parse(process.argv[2] ?? '{}');

export function client(opts = {}) {
    return new OpenAI({
        baseURL: process.env.AIGW_BASE_URL,
        apiKey: process.env.AIGW_API_KEY,
        maxRetries: 0,
        timeout: 30000,
        fetch: recordingFetch,
        ...opts,
    });
}

const ERROR_CLASSES = [
    'AuthenticationError',
    'PermissionDeniedError',
    'NotFoundError',
    'RateLimitError',
    'BadRequestError',
    'InternalServerError',
    'APIConnectionError',
    'APIError',
];

// What a program using the SDK sees of an error: its classes, status and OpenAI error fields.
export function errorInfo(e) {
    return {
        classes: ERROR_CLASSES.filter((n) => e instanceof OpenAI[n]),
        name: e?.constructor?.name,
        message: String(e?.message ?? e),
        status: e?.status ?? null,
        code: e?.code ?? null,
        type: e?.type ?? null,
        headers: e?.headers ? Object.fromEntries(e.headers) : null,
    };
}

// Runs the scenario and prints {"ok":true,...result,"attempts":[...]} or, when it threw,
// {"ok":false,"error":{...},"attempts":[...]}. The exit status is 0 either way: the Python test
// decides what was expected.
export async function run(scenario) {
    let out;
    try {
        out = { ok: true, ...(await scenario()) };
    } catch (e) {
        out = { ok: false, error: errorInfo(e) };
    }
    out.attempts = attempts;
    out.sdk_version = VERSION;
    process.stdout.write(JSON.stringify(out) + '\n');
}
