// The tool calls of an assistant message as cards: the tool's name, its arguments as they
// stream in, where the call stands, its result (folded), and Approve / Deny while the call
// waits for the user. Built from the message's `tool_call` / `tool_result` parts and the
// transcript's approvals (a stored reply keeps how each approval ended on its
// `tool_result` part), so a reload (history, then the events after it) shows the same.
// Cards are updated in place: a reader's unfolded result stays unfolded.

import { el } from "./dom.js";

const RESULT_LABELS = {
  ok: "done",
  error: "failed",
  timeout: "timed out",
  cancelled: "cancelled",
};

const APPROVAL_LABELS = {
  pending: "waiting for your approval",
  approved: "approved",
  denied: "denied",
  expired: "not approved in time",
  cancelled: "cancelled with the reply",
};

/** The calls of a message in order: {id, name, args, open, result, status, approval}. */
function callsOf(message, transcript) {
  const calls = new Map();
  for (const part of message.parts || []) {
    if (!part.call_id || (part.kind !== "tool_call" && part.kind !== "tool_result")) continue;
    const call = calls.get(part.call_id) || { id: part.call_id, name: part.name || "", args: "" };
    if (part.kind === "tool_call") {
      call.args = part.text;
      call.open = part.open && message.streaming;
    } else {
      call.result = part.text;
      call.status = part.status || (part.open && message.streaming ? "running" : "ok");
      call.approval = part.approval;
    }
    calls.set(part.call_id, call);
  }
  for (const [id, approval] of transcript?.approvals || []) {
    if (approval.message_id !== message.id || calls.has(id)) continue;
    calls.set(id, { id, name: approval.tool, args: approval.arguments });
  }
  return [...calls.values()];
}

/** Where the call stands, in words, and as a `data-state` for the stylesheet. */
function stateOf(call, approval, streaming) {
  const refused = ["denied", "expired", "cancelled"].includes(approval?.state);
  if (call.status && call.status !== "running" && !refused) {
    return [call.status, RESULT_LABELS[call.status] || call.status];
  }
  if (approval?.state === "pending" && !streaming) return ["ended", "did not run"];
  if (approval && approval.state !== "approved") {
    const by = approval.state === "denied" && approval.by ? ` by ${approval.by}` : "";
    return [approval.state, APPROVAL_LABELS[approval.state] + by];
  }
  if (call.open) return ["calling", "writing the arguments…"];
  if (!streaming) return ["ended", "did not run"];
  return ["running", approval ? "approved — running…" : "running…"];
}

function createCard(id) {
  return el(
    "div",
    { class: "tool-card", "data-call-id": id },
    el(
      "div",
      { class: "tool-head" },
      el("span", { class: "tool-name" }),
      el("span", { class: "tool-status" }),
    ),
    el("pre", { class: "tool-args" }),
    el("div", { class: "tool-approval" }),
    el(
      "details",
      { class: "tool-result" },
      el("summary", { text: "Result" }),
      el("pre", { class: "tool-result-text" }),
    ),
  );
}

function approvalRow(call, approval, streaming) {
  if (!approval || (approval.state === "pending" && !streaming)) return [];
  if (approval.state === "pending") {
    return [
      el("span", { class: "tool-question", text: "Let the model run this?" }),
      el("button", {
        type: "button",
        class: "tool-btn approve",
        "data-action": "approve",
        "data-call-id": call.id,
        text: "Approve",
      }),
      el("button", {
        type: "button",
        class: "tool-btn deny",
        "data-action": "deny",
        "data-call-id": call.id,
        text: "Deny",
      }),
    ];
  }
  const by = approval.by ? ` by ${approval.by}` : "";
  const why = approval.reason ? `: ${approval.reason}` : "";
  return [el("span", { class: "tool-decision", text: `${APPROVAL_LABELS[approval.state]}${by}${why}` })];
}

function updateCard(card, call, approval, streaming) {
  const [state, label] = stateOf(call, approval, streaming);
  card.dataset.state = state;
  card.querySelector(".tool-name").textContent = call.name || "tool";
  card.querySelector(".tool-status").textContent = label;
  card.querySelector(".tool-args").textContent = call.args;
  const row = card.querySelector(".tool-approval");
  const wanted = approval
    ? `${approval.state}|${approval.by || ""}|${approval.reason || ""}|${streaming}`
    : "";
  if (row.dataset.shown !== wanted) {
    row.replaceChildren(...approvalRow(call, approval, streaming)); // new buttons only now
    row.dataset.shown = wanted;
  }
  row.hidden = row.childElementCount === 0;
  const result = card.querySelector(".tool-result");
  result.hidden = call.result === undefined;
  result.querySelector(".tool-result-text").textContent = call.result || "";
}

/** Bring the message's tool cards (in `node`, before its text) in line with its calls. */
export function updateTools(node, message, transcript) {
  const calls = callsOf(message, transcript);
  let box = node.querySelector(".msg-tools");
  if (calls.length === 0) {
    box?.remove();
    return;
  }
  if (!box) {
    box = el("div", { class: "msg-tools" });
    node.querySelector(".msg-content").before(box);
  }
  const cards = new Map([...box.children].map((card) => [card.dataset.callId, card]));
  let previous = null;
  for (const call of calls) {
    let card = cards.get(call.id);
    if (!card) card = createCard(call.id);
    cards.delete(call.id);
    const approval = transcript?.approval(call.id) || call.approval;
    updateCard(card, call, approval, message.streaming);
    const expected = previous ? previous.nextElementSibling : box.firstElementChild;
    if (expected !== card) box.insertBefore(card, expected);
    previous = card;
  }
  for (const stale of cards.values()) stale.remove();
}
