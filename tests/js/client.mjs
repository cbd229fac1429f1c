// The official OpenAI JavaScript client against an edge-agent API: structured output,
// a tool-call round trip (streamed and not), logprobs and a refused part (an image sent to a text-only model).
// Prints one JSON object of what it saw; tests/integration/test_api_js_client.py judges it.
//
//   node tests/js/client.mjs http://127.0.0.1:PORT/v1

import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "unused", maxRetries: 0, timeout: 120_000 });

const place = {
  type: "object", additionalProperties: false, required: ["city", "country", "is_capital"],
  properties: {
    city: { type: "string", maxLength: 40 }, country: { type: "string", maxLength: 40 },
    is_capital: { type: "boolean" },
  },
};
const weather = {
  type: "function",
  function: {
    name: "get_weather", description: "The current weather in a city",
    parameters: {
      type: "object", additionalProperties: false, required: ["city"],
      properties: { city: { type: "string", maxLength: 40 } },
    },
  },
};

const seen = { structured: [], toolCall: null, streamedToolCall: null, answer: null, logprobs: null, refused: null };

for (const city of ["Paris", "Tokyo", "Lima", "Oslo", "Cairo"]) {
  const r = await client.chat.completions.create({
    model: "default", temperature: 0, max_tokens: 80,
    messages: [{ role: "user", content: `Tell me about ${city} as JSON.` }],
    response_format: { type: "json_schema", json_schema: { name: "place", strict: true, schema: place } },
  });
  const parsed = JSON.parse(r.choices[0].message.content);
  seen.structured.push({
    finish: r.choices[0].finish_reason,
    valid: typeof parsed.city === "string" && typeof parsed.country === "string"
      && typeof parsed.is_capital === "boolean" && Object.keys(parsed).length === 3,
  });
}

const question = [{ role: "user", content: "What is the weather in Paris?" }];
const first = await client.chat.completions.create({
  model: "default", temperature: 0, max_tokens: 80, messages: question, tools: [weather], tool_choice: "required",
});
const call = first.choices[0].message.tool_calls[0];
seen.toolCall = { finish: first.choices[0].finish_reason, name: call.function.name,
  arguments: JSON.parse(call.function.arguments) };

const stream = await client.chat.completions.create({
  model: "default", temperature: 0, max_tokens: 80, messages: question, tools: [weather], tool_choice: "required",
  stream: true,
});
let streamedFinish = null;
const streamedCalls = [];
for await (const chunk of stream) {
  for (const choice of chunk.choices) {
    streamedCalls.push(...(choice.delta.tool_calls ?? []));
    streamedFinish = choice.finish_reason ?? streamedFinish;
  }
}
seen.streamedToolCall = { finish: streamedFinish, calls: streamedCalls.map((c) => c.function) };

const answer = await client.chat.completions.create({
  model: "default", temperature: 0, max_tokens: 60, tools: [weather], tool_choice: "none",
  messages: [...question, first.choices[0].message,
    { role: "tool", tool_call_id: call.id, content: JSON.stringify({ celsius: 21, sky: "sunny" }) }],
});
seen.answer = { finish: answer.choices[0].finish_reason, content: answer.choices[0].message.content };

const withLogprobs = await client.chat.completions.create({
  model: "default", temperature: 0, max_tokens: 12, messages: question, logprobs: true, top_logprobs: 2,
});
const content = withLogprobs.choices[0].logprobs.content;
seen.logprobs = {
  entries: content.length, completionTokens: withLogprobs.usage.completion_tokens,
  joined: content.map((t) => t.token).join("") === withLogprobs.choices[0].message.content,
  allNegative: content.every((t) => t.logprob <= 0 && t.top_logprobs.length === 2),
};

try {
  await client.chat.completions.create({
    model: "default", max_tokens: 2,
    messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: "data:image/png;base64,AA==" } }] }],
  });
} catch (error) {
  seen.refused = { status: error.status, param: error.param ?? error.error?.param ?? null };
}

console.log(JSON.stringify(seen));
