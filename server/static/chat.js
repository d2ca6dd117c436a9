// Conversations and the chat: joining, the frames that arrive, and what a person does.
// It changes the store through its named updates; page.js shows the result.

import { ApiError, api } from "./api.js";
import { $ } from "./dom.js";
import { Disconnected, ProtocolError, explain, when } from "./errors.js";
import { notify } from "./notices.js";
import { restoreDraft } from "./page.js";
import { closeSidebar } from "./sidebar.js";
import {
  applyEvent,
  beginListLoad,
  endListLoad,
  forgetConversation,
  joined,
  joinEnded,
  joinStarted,
  queueTurn,
  selectConversation,
  setBudget,
  setConversations,
  setStick,
  store,
  turnAccepted,
  turnRefused,
  upsertConversation,
} from "./store.js";

const DEFAULT_TITLE = "New conversation";

/** GET the list; changes that arrive while it loads (conversation_changed) win over it. */
export async function loadConversations() {
  const load = beginListLoad();
  try {
    setConversations(load, await api.list(store.token));
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return; // the socket says so too
    notify(`Could not load your conversations: ${error.message}`, { key: "list" });
  } finally {
    endListLoad(load);
  }
}

export function route() {
  const match = /^#\/c\/([0-9a-f-]{36})$/i.exec(location.hash);
  select(match ? match[1].toLowerCase() : null);
}

export function go(id) {
  const hash = id ? `#/c/${id}` : "#/";
  if (location.hash !== hash) location.hash = hash;
  select(id);
}

function select(id) {
  if (store.active === id) return;
  const previous = store.activeTranscript();
  if (previous) {
    const conn = store.connection;
    if (conn?.online && previous.joined !== "no") {
      conn.send({ type: "leave", conversation: previous.id });
    }
    joinEnded(previous);
  }
  closeSidebar();
  selectConversation(id);
  if (id) join(store.transcript(id));
  if (!matchMedia("(pointer: coarse)").matches) $("input").focus();
}

/** Join the conversation: with `after` when this tab already holds some of it. */
export function join(t) {
  const conn = store.connection;
  if (!conn?.online || t.joined === "joining") return;
  joinStarted(t);
  const frame = { type: "join", conversation: t.id };
  if (t.lastSeq !== null) frame.after = t.lastSeq;
  conn.request(frame).catch((error) => {
    if (t.joined === "joining") joinEnded(t);
    if (!(error instanceof ProtocolError)) return; // reconnecting: joins again when ready
    if (error.code === "not_found") {
      forget(t.id);
      notify("That conversation does not exist any more.", { key: "join" });
    } else {
      explain(error);
    }
  });
}

function forget(id) {
  const wasActive = store.active === id;
  forgetConversation(id);
  if (wasActive) go(null);
}

export async function createConversation(fields) {
  const body = {};
  for (const [key, value] of Object.entries(fields)) if (value) body[key] = value;
  const conn = store.connection;
  let meta;
  if (conn?.online) {
    meta = (await conn.request({ type: "create", ...body })).meta;
  } else {
    meta = await api.create(store.token, body);
  }
  upsertConversation(meta);
  go(meta.id);
  return meta;
}

export async function renameConversation(id, title) {
  upsertConversation(await api.change(store.token, id, { title }));
}

export async function deleteConversation(id) {
  await api.remove(store.token, id);
  const next = sortedConversations().find((m) => m.id !== id);
  forget(id);
  if (next && window.innerWidth > 760) go(next.id);
}

function sortedConversations() {
  return store.conversations().sort((a, b) => Date.parse(b.updated_at) - Date.parse(a.updated_at));
}

let budgetAsked = null; // the GET /api/usage under way, so a burst of replies asks once

/** A reply ended: what remains of the budget changed (settled on the server), ask again. */
function refreshBudget() {
  if (budgetAsked) return;
  budgetAsked = api
    .usage(store.token)
    .then((report) => setBudget(report.budget))
    .catch(() => {}) // the next reply asks again; the sidebar keeps the last known state
    .finally(() => {
      budgetAsked = null;
    });
}

export function onFrame(frame) {
  switch (frame.type) {
    case "joined": {
      const t = joined(frame);
      if (frame.conversation !== store.active) {
        store.connection.send({ type: "leave", conversation: t.id });
        joinEnded(t);
      }
      break;
    }
    case "notice":
      if (!frame.conversation) {
        notify(frame.text, { kind: "info", key: "notice" }); // to all the user's tabs
        break;
      }
    // falls through: a conversation's notice is an event with a seq
    case "message":
    case "start":
    case "token":
    case "part_start":
    case "part_delta":
    case "part_end":
    case "done":
    case "queued":
    case "updated":
    case "approval_request":
    case "approval_resolved":
      onEvent(frame);
      break;
    case "usage_warning":
      setBudget({ used: frame.used, limit: frame.limit, resets_at: frame.resets_at });
      notify(
        `You have used ${Math.round((100 * frame.used) / frame.limit)}% of your token budget ` +
          `(${frame.used.toLocaleString()} of ${frame.limit.toLocaleString()} tokens); ` +
          `it resets ${when(frame.resets_at)}.`,
        { kind: "info", key: "usage", ms: 15000 },
      );
      break;
    case "conversation_changed": {
      if (frame.deleted) {
        const wasActive = store.active === frame.conversation;
        forget(frame.conversation);
        if (wasActive) notify("This conversation was deleted.", { kind: "info", key: "deleted" });
      } else if (frame.meta) {
        upsertConversation(frame.meta);
      }
      break;
    }
    case "error":
      if (frame.conversation) {
        onEvent(frame); // a turn the application refused: an event with a seq
      } else if (!frame.ref) {
        explain(new ProtocolError(frame));
      }
      break;
    default:
      break;
  }
}

/** A conversation event: applied in seq order, a gap rejoins with `after`. */
function onEvent(frame) {
  const result = applyEvent(frame);
  if (result === "gap") {
    const t = store.transcript(frame.conversation);
    joinEnded(t);
    join(t); // with after = the last seq applied
  } else if (result !== "applied") {
    return;
  } else if (frame.type === "notice") {
    notify(frame.text, { kind: "info", key: "notice" });
  } else if (frame.type === "done") {
    if (store.budget) refreshBudget();
    if (frame.reason === "error") {
      notify(`The model failed to answer${frame.error ? `: ${frame.error}` : "."}`, {
        key: "model",
      });
    }
  } else if (frame.type === "error") {
    notify(frame.message, { key: "refused" }); // the application's own words
  }
}

function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16)); // not a secure context (plain http)
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export async function submit(text) {
  if (!text.trim()) return false;
  const limit = store.info?.limits?.max_text_chars;
  if (limit && text.length > limit) {
    explain({ code: "too_large" });
    return false;
  }
  const wait = Math.ceil((store.rateLimitedUntil - Date.now()) / 1000);
  if (wait > 0) {
    notify(`You're sending too quickly — try again in ${wait} s.`, { key: "rate" });
    return false;
  }
  let t = store.activeTranscript();
  if (t && t.generating) {
    notify("A reply is still being written. Wait for it, or press Stop.", {
      kind: "info",
      key: "busy",
    });
    return false;
  }
  if (!t) {
    try {
      await createConversation({});
    } catch (error) {
      explain(error);
      return false;
    }
    t = store.activeTranscript();
  }
  const id = newId();
  const fresh = !t.messages.length && t.meta?.title === DEFAULT_TITLE;
  setStick(true);
  queueTurn(t, id, text);
  if (fresh) autoTitle(t.id, text);
  if (store.connection?.online) {
    say(id);
  } else {
    notify("You're offline — the message is sent when the connection is back.", {
      kind: "info",
      key: "conn",
    });
  }
  return true;
}

/** Send (or send again, with the same id: never a second turn) an unacknowledged `say`. */
export function say(id) {
  const item = store.turn(id);
  if (!item) return;
  store.connection
    .request({ type: "say", conversation: item.conversation, text: item.text, id })
    .then(() => turnAccepted(id))
    .catch((error) => {
      if (error instanceof Disconnected) return; // sent again after reconnecting
      turnRefused(id);
      if (item.conversation === store.active) restoreDraft(item.text);
      explain(error);
    });
}

function autoTitle(id, text) {
  const clean = text.replace(/\[sim:[^\]]*\]/g, "").replace(/\s+/g, " ").trim();
  if (!clean) return;
  const title = clean.length > 48 ? `${clean.slice(0, 47).replace(/\s+\S*$/, "")}…` : clean;
  api.change(store.token, id, { title }).catch(() => {});
}

export function stop() {
  if (!store.active) return;
  const conn = store.connection;
  if (!conn?.online) {
    notify("Can't stop the reply while offline.", { key: "conn" });
    return;
  }
  conn.request({ type: "cancel", conversation: store.active }).catch(explain);
}

export function regenerate() {
  const t = store.activeTranscript();
  if (!t || t.generating) return;
  setStick(true);
  store.connection?.request({ type: "regenerate", conversation: t.id }).catch(explain);
}

/** The user's answer to a tool call waiting for approval (`approve` or `deny`). Every tab
 * shows the outcome from `approval_resolved`; a later answer learns what won. */
export function answerApproval(callId, decision) {
  const conversation = store.active;
  const conn = store.connection;
  if (!conversation || !conn?.online) {
    notify("You're offline — answer again when the connection is back.", { key: "conn" });
    return Promise.resolve(null);
  }
  return conn
    .request({ type: decision, conversation, call_id: callId })
    .then((ack) => {
      const answer = ack.approval;
      if (answer && !answer.first) {
        notify(`That call was already ${answer.state}.`, { kind: "info", key: "approval" });
      }
      return answer;
    })
    .catch((error) => {
      if (error instanceof ProtocolError && error.code === "not_found") {
        notify("That tool call does not wait for an answer any more.", { key: "approval" });
      } else {
        explain(error);
      }
      return null;
    });
}
