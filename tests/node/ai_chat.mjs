// The Vercel AI SDK's own client against Parley (tests/e2e/test_sse.py runs it): send a user
// message with DefaultChatTransport, drop the stream after a few text deltas, resume it on
// another web process (reconnectToStream: GET /api/ai/chat/{id}/stream), and print the text
// readUIMessageStream built, as JSON on the last line.
import { DefaultChatTransport, readUIMessageStream } from "ai";

const [sendUrl, resumeUrl, token, chatId] = process.argv.slice(2);
const headers = { Authorization: `Bearer ${token}` };
const sender = new DefaultChatTransport({ api: `${sendUrl}/api/ai/chat`, headers });
const resumer = new DefaultChatTransport({ api: `${resumeUrl}/api/ai/chat`, headers });

const userMessage = { id: "msg-1", role: "user", parts: [{ type: "text", text: "hello from node" }] };
const abort = new AbortController();
const first = await sender.sendMessages({
  chatId,
  messages: [userMessage],
  trigger: "submit-message",
  messageId: undefined,
  abortSignal: abort.signal,
});
const reader = first.getReader();
const chunkTypes = [];
let deltas = 0;
for (let i = 0; i < 1000 && deltas < 3; i++) {
  const { value, done } = await reader.read();
  if (done) throw new Error("the reply ended before the drop");
  chunkTypes.push(value.type);
  if (value.type === "text-delta") deltas++;
}
abort.abort();
await reader.cancel().catch(() => {});

const resumed = await resumer.reconnectToStream({ chatId });
if (resumed === null) throw new Error("no running reply to resume");
let message;
for await (const snapshot of readUIMessageStream({ stream: resumed })) message = snapshot;
const text = message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
const afterFinish = await resumer.reconnectToStream({ chatId });
console.log(
  JSON.stringify({
    id: message.id,
    text,
    chunk_types: chunkTypes,
    dropped_after_deltas: deltas,
    after_finish: afterFinish,
  }),
);
