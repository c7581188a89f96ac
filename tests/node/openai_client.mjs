// `jetmoe serve` through the official openai npm package (tests/serve_clients_tests.py runs this).
//   node openai_client.mjs BASE_URL API_KEY
// BASE_URL is http://127.0.0.1:PORT/v1. Prints one JSON line: the models, a chat completion, the same
// request streamed, a completion plain and streamed (temperature 0, seed 1, max_tokens 12), and the
// HTTP status the client saw with a wrong key and with none. The python side checks the figures.
import OpenAI from "openai";

const [baseURL, apiKey] = process.argv.slice(2);
const MAX_TOKENS = 12;
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 120000 });
const messages = [
  { role: "system", content: "You are terse." },
  { role: "user", content: "Say something about software licences." },
];
const common = { temperature: 0, seed: 1, max_tokens: MAX_TOKENS };

// An error as a string the python side prints (the API's message when there is one).
const why = (e) => `${e.constructor.name}${e.status ? " " + e.status : ""}: ${e.message}`;

async function attempt(f) {
  try {
    return await f();
  } catch (e) {
    return { error: why(e) };
  }
}

async function main() {
  const out = { max_tokens: MAX_TOKENS };
  const models = await client.models.list();
  out.models = models.data.map((m) => m.id);
  const model = out.models[0] || "jetmoe";

  out.chat = await attempt(async () => {
    const r = await client.chat.completions.create({ model, messages, ...common });
    const c = r.choices[0];
    return { text: c.message.content, role: c.message.role, finish_reason: c.finish_reason, usage: r.usage,
             object: r.object };
  });

  out.chat_stream = await attempt(async () => {
    const stream = await client.chat.completions.create({
      model, messages, ...common, stream: true, stream_options: { include_usage: true } });
    let text = "", finish = null, chunks = 0, usage = null, firstRole;
    const objects = new Set(), ids = new Set();
    for await (const chunk of stream) {
      objects.add(chunk.object);
      ids.add(chunk.id);
      if (chunk.usage) usage = chunk.usage;
      const c = chunk.choices && chunk.choices[0];
      if (!c) continue;
      chunks++;
      if (firstRole === undefined) firstRole = c.delta.role ?? null;
      if (c.delta.content) text += c.delta.content;
      if (c.finish_reason) finish = c.finish_reason;
    }
    return { text, finish_reason: finish, chunks, usage, first_role: firstRole ?? null,
             objects: [...objects], ids: ids.size };
  });

  const prompt = "The licence grants";
  out.completion = await attempt(async () => {
    const r = await client.completions.create({ model, prompt, ...common });
    return { text: r.choices[0].text, finish_reason: r.choices[0].finish_reason, usage: r.usage };
  });
  out.completion_stream = await attempt(async () => {
    const stream = await client.completions.create({ model, prompt, ...common, stream: true });
    let text = "", finish = null;
    for await (const chunk of stream) {
      const c = chunk.choices && chunk.choices[0];
      if (!c) continue;
      text += c.text || "";
      if (c.finish_reason) finish = c.finish_reason;
    }
    return { text, finish_reason: finish };
  });

  // A wrong key: the client raises its AuthenticationError (status 401).
  const status = async (key) => {
    const c = new OpenAI({ baseURL, apiKey: key, maxRetries: 0, timeout: 30000 });
    try {
      await c.chat.completions.create({ model, messages, ...common });
      return 200;
    } catch (e) {
      return e.status ?? why(e);
    }
  };
  out.wrong_key = await status(apiKey + "-wrong");
  // the client refuses to run without a key, so "none" is a plain fetch without Authorization
  const r = await fetch(baseURL + "/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model, messages, ...common }) });
  out.no_key = r.status;
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.log(JSON.stringify({ fatal: why(e) }));
  process.exit(1);
});
