// The messages of one transcript as DOM, updated in place: only a message whose `rev`
// changed is rendered again. Every piece of text from the server goes in as text
// (textContent) or as sanitised Markdown.

import { $, el } from "./dom.js";
import { renderMarkdown } from "./markdown.js";
import { updateTools } from "./tools.js";

const nodes = new Map(); // message id -> {el, rev, version}
let shownVersion = -1;
let shownConversation = null;

const STATUS_LABELS = {
  cancelled: "Stopped",
  error: "The reply failed",
};

const BLOCKS = new Set([
  "P", "UL", "OL", "LI", "BLOCKQUOTE", "H1", "H2", "H3", "H4", "H5", "H6",
  "DIV", "PRE", "CODE", "TABLE", "TBODY", "TR", "TD",
]);

/** Where the streaming cursor goes: the end of the last block, so it follows the text. */
function lastBlock(root) {
  let node = root;
  while (node.lastElementChild && BLOCKS.has(node.lastElementChild.tagName)) {
    node = node.lastElementChild;
  }
  return node;
}

function createMessage(message) {
  const body = el("div", { class: "msg-body" });
  const content = el("div", {
    class: message.role === "user" ? "msg-content plain" : "msg-content markdown",
  });
  const meta = el("div", { class: "msg-meta" });
  body.append(content, meta);
  return el(
    "article",
    { class: `msg msg-${message.role}`, "data-id": message.id, "data-role": message.role },
    body,
  );
}

/** Seconds, as the Thinking block's summary says them. */
function seconds(ms) {
  return ms < 10_000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms / 1000)} s`;
}

/**
 * The collapsible "Thinking" block above the answer: open while the model reasons, closed once
 * the answer starts (the reader may open it again; a later update keeps their choice).
 */
function updateThinking(node, message) {
  const reasoning = (message.parts || []).filter((p) => p.kind === "reasoning");
  let block = node.querySelector(".msg-thinking");
  if (reasoning.length === 0) {
    block?.remove();
    return;
  }
  if (!block) {
    block = el(
      "details",
      { class: "msg-thinking" },
      el("summary", { class: "msg-thinking-summary" }),
      el("div", { class: "msg-thinking-text" }),
    );
    node.querySelector(".msg-body").prepend(block);
  }
  const thinking = message.streaming && reasoning.some((p) => p.open);
  const state = thinking ? "thinking" : "done";
  if (block.dataset.state !== state) {
    block.open = thinking; // only when the state changes: the reader's toggle stays
    block.dataset.state = state;
  }
  const took = reasoning.reduce((sum, p) => sum + (p.duration_ms || 0), 0);
  block.querySelector(".msg-thinking-summary").textContent = thinking
    ? "Thinking…"
    : took
      ? `Thought for ${seconds(took)}`
      : "Thoughts";
  block.querySelector(".msg-thinking-text").textContent = reasoning.map((p) => p.text).join("\n\n");
}

/** The usage as the tooltip of the token count: every figure the server reported. */
function usageTitle(usage) {
  const lines = [`${usage.prompt_tokens} prompt tokens`];
  if (typeof usage.cached_prompt_tokens === "number") lines.push(`${usage.cached_prompt_tokens} of them cached`);
  lines.push(`${usage.completion_tokens} completion tokens`);
  if (typeof usage.reasoning_tokens === "number") lines.push(`${usage.reasoning_tokens} of them reasoning`);
  if (typeof usage.first_token_ms === "number") lines.push(`first token after ${seconds(usage.first_token_ms)}`);
  if (typeof usage.duration_ms === "number") lines.push(`took ${seconds(usage.duration_ms)}`);
  if (usage.estimated) lines.push("(counted by Parley: the model reported none)");
  return lines.join("\n");
}

const STOPPED = new Set(["length", "content_filter", "tool_calls"]);

function updateMessage(node, message, transcript) {
  node.dataset.status = message.streaming ? "streaming" : message.status;
  node.dataset.chars = String(message.content.length);
  if (message.role === "assistant") {
    updateThinking(node, message);
    updateTools(node, message, transcript);
  }
  const content = node.querySelector(".msg-content");
  if (message.role === "user") {
    content.textContent = message.content;
  } else {
    content.replaceChildren(renderMarkdown(message.content));
    if (message.streaming) {
      lastBlock(content).append(el("span", { class: "cursor", "aria-hidden": "true" }));
    }
  }
  const meta = node.querySelector(".msg-meta");
  const parts = [];
  if (message.role === "assistant") {
    const label = message.streaming
      ? null
      : STATUS_LABELS[message.status] ||
        (STOPPED.has(message.reason) ? `stopped: ${message.reason}` : null);
    if (label) {
      parts.push(
        el("span", {
          class: `msg-status msg-status-${message.status}`,
          text: label,
          title: message.error || "",
        }),
      );
    }
    if (message.model) parts.push(el("span", { class: "msg-model", text: message.model }));
    if (message.usage && !message.streaming) {
      parts.push(
        el("span", {
          class: "msg-usage",
          text: `${message.usage.estimated ? "~" : ""}${message.usage.completion_tokens} tokens`,
          title: usageTitle(message.usage),
        }),
      );
    }
    if (!message.streaming) {
      parts.push(
        el(
          "span",
          { class: "msg-actions" },
          el("button", { type: "button", class: "msg-btn", "data-action": "copy", text: "Copy" }),
          el("button", {
            type: "button",
            class: "msg-btn regen",
            "data-action": "regenerate",
            text: "Regenerate",
          }),
        ),
      );
    }
  }
  meta.replaceChildren(...parts);
  meta.hidden = parts.length === 0;
}

/** Render every message again on the next renderTranscript (a grammar has arrived). */
export function invalidateMessages() {
  for (const entry of nodes.values()) entry.rev = -1;
}

/** Bring #messages in line with the transcript, touching only what changed. */
export function renderTranscript(transcript) {
  const list = $("messages");
  if (!transcript) {
    list.replaceChildren();
    nodes.clear();
    shownConversation = null;
    return;
  }
  if (shownConversation !== transcript.id || shownVersion !== transcript.version) {
    list.replaceChildren();
    nodes.clear();
    shownConversation = transcript.id;
    shownVersion = transcript.version;
  }
  const keep = new Set(transcript.messages.map((m) => m.id));
  for (const [id, entry] of nodes) {
    if (!keep.has(id)) {
      entry.el.remove();
      nodes.delete(id);
    }
  }
  let previous = null;
  for (const message of transcript.messages) {
    let entry = nodes.get(message.id);
    if (!entry) {
      entry = { el: createMessage(message), rev: -1 };
      nodes.set(message.id, entry);
    }
    if (entry.rev !== message.rev) {
      updateMessage(entry.el, message, transcript);
      entry.rev = message.rev;
    }
    const expected = previous ? previous.nextElementSibling : list.firstElementChild;
    if (expected !== entry.el) list.insertBefore(entry.el, expected);
    previous = entry.el;
  }
  const last = transcript.messages.at(-1);
  for (const node of list.querySelectorAll(".msg.is-last")) node.classList.remove("is-last");
  if (last && last.role === "assistant") nodes.get(last.id)?.el.classList.add("is-last");
  list.classList.toggle("busy", transcript.generating);
}
