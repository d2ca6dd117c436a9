// Conversations and the chat: joining, the frames that arrive, and what a person does.

import { ApiError, api } from "./api.js";
import { Disconnected, ProtocolError } from "./connection.js";
import { explain } from "./errors.js";
import { autosize, closeSidebar, render, renderSidebar, scheduleRender } from "./screen.js";
import { $, state } from "./state.js";
import { Transcript } from "./transcript.js";
import { notify } from "./view.js";

const DEFAULT_TITLE = "New conversation";

/** GET the list; changes that arrive while it loads (conversation_changed) win over it. */
export async function loadConversations() {
  const changes = new Map(); // id -> meta, or null when deleted
  state.listChanges = changes;
  try {
    const list = await api.list(state.token);
    if (state.listChanges !== changes) return; // a newer load is under way
    const fresh = new Map(list.map((meta) => [meta.id, meta]));
    for (const [id, meta] of changes) {
      if (meta === null) fresh.delete(id);
      else if (!fresh.has(id) || newer(meta, fresh.get(id))) fresh.set(id, meta);
    }
    state.conversations = fresh;
    renderSidebar();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return; // the socket says so too
    notify(`Could not load your conversations: ${error.message}`, { key: "list" });
  } finally {
    if (state.listChanges === changes) state.listChanges = null;
  }
}

function newer(a, b) {
  return Date.parse(a.updated_at) > Date.parse(b.updated_at);
}

function transcript(id) {
  let t = state.transcripts.get(id);
  if (!t) {
    t = new Transcript(id);
    t.meta = state.conversations.get(id) || null;
    state.transcripts.set(id, t);
  }
  return t;
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
  if (state.active === id) return;
  const previous = state.active && state.transcripts.get(state.active);
  if (previous) {
    if (state.conn?.online && previous.joined !== "no") {
      state.conn.send({ type: "leave", conversation: previous.id });
    }
    previous.joined = "no";
  }
  state.active = id;
  state.stick = true;
  closeSidebar();
  if (id) join(transcript(id));
  renderSidebar();
  render();
  if (!matchMedia("(pointer: coarse)").matches) $("input").focus();
}

/** Join the conversation: with `after` when this tab already holds some of it. */
export function join(t) {
  const conn = state.conn;
  if (!conn?.online || t.joined === "joining") return;
  t.joined = "joining";
  const frame = { type: "join", conversation: t.id };
  if (t.lastSeq !== null) frame.after = t.lastSeq;
  conn.request(frame).catch((error) => {
    if (t.joined === "joining") t.joined = "no";
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
  state.listChanges?.set(id, null);
  state.conversations.delete(id);
  state.transcripts.delete(id);
  if (state.active === id) go(null);
  renderSidebar();
}

export async function createConversation(fields) {
  const body = {};
  for (const [key, value] of Object.entries(fields)) if (value) body[key] = value;
  let meta;
  if (state.conn?.online) {
    meta = (await state.conn.request({ type: "create", ...body })).meta;
  } else {
    meta = await api.create(state.token, body);
  }
  upsertMeta(meta);
  go(meta.id);
  return meta;
}

export async function renameConversation(id, title) {
  upsertMeta(await api.change(state.token, id, { title }));
  render();
}

export async function deleteConversation(id) {
  await api.remove(state.token, id);
  const next = sortedConversations().find((m) => m.id !== id);
  forget(id);
  if (next && window.innerWidth > 760) go(next.id);
}

function sortedConversations() {
  return [...state.conversations.values()].sort(
    (a, b) => Date.parse(b.updated_at) - Date.parse(a.updated_at),
  );
}

export function onFrame(frame) {
  switch (frame.type) {
    case "joined": {
      const t = transcript(frame.conversation);
      t.meta = frame.meta;
      upsertMeta(frame.meta);
      const hadMessages = t.messages.some((m) => !m.pending);
      if (frame.history) {
        t.load(frame.history, frame.last_seq);
        for (const [id, item] of state.outbox) {
          if (item.conversation === t.id) t.addPending(id, item.text);
        }
        if (frame.reset && hadMessages) console.info("parley: transcript reset by the server");
      } else {
        t.lastSeq = frame.last_seq;
      }
      t.joined = "yes";
      // The events up to meta.last_seq follow at once: show the conversation when they are
      // all in, so a reload mid-reply shows the reply so far in one go (no flash, no jump).
      t.catchUpTo = frame.meta.last_seq || 0;
      t.catchUpDeadline = Date.now() + 1000;
      setTimeout(scheduleRender, 1050);
      if (frame.conversation !== state.active) {
        state.conn.send({ type: "leave", conversation: t.id });
        t.joined = "no";
      }
      scheduleRender();
      break;
    }
    case "message":
    case "start":
    case "token":
    case "done":
    case "queued":
    case "updated": {
      const t = state.transcripts.get(frame.conversation);
      if (!t || t.joined !== "yes") break; // a join is under way: it brings these again
      const result = t.apply(frame);
      if (result === "gap") {
        t.joined = "no";
        join(t); // with after = the last seq applied
        break;
      }
      if (result !== "applied") break;
      if (frame.type === "message") state.outbox.delete(frame.message.id);
      if (frame.type === "updated") upsertMeta(frame.meta);
      if (frame.type === "done" && frame.reason === "error") {
        notify(`The model failed to answer${frame.error ? `: ${frame.error}` : "."}`, {
          key: "model",
        });
      }
      if (frame.type !== "token") renderSidebar();
      scheduleRender();
      break;
    }
    case "conversation_changed": {
      if (frame.deleted) {
        const wasActive = state.active === frame.conversation;
        forget(frame.conversation);
        if (wasActive) notify("This conversation was deleted.", { kind: "info", key: "deleted" });
      } else if (frame.meta) {
        upsertMeta(frame.meta);
      }
      break;
    }
    case "error":
      if (!frame.ref) explain(new ProtocolError(frame));
      break;
    default:
      break;
  }
}

function upsertMeta(meta) {
  const known = state.conversations.get(meta.id);
  if (known && newer(known, meta)) return;
  state.listChanges?.set(meta.id, meta);
  state.conversations.set(meta.id, meta);
  const t = state.transcripts.get(meta.id);
  if (t) t.meta = meta;
  renderSidebar();
  if (meta.id === state.active) scheduleRender();
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
  const limit = state.info?.limits?.max_text_chars;
  if (limit && text.length > limit) {
    explain({ code: "too_large" });
    return false;
  }
  const wait = Math.ceil((state.rateLimitedUntil - Date.now()) / 1000);
  if (wait > 0) {
    notify(`You're sending too quickly — try again in ${wait} s.`, { key: "rate" });
    return false;
  }
  let t = state.active && state.transcripts.get(state.active);
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
    t = state.transcripts.get(state.active);
  }
  const id = newId();
  const fresh = !t.messages.length && t.meta?.title === DEFAULT_TITLE;
  state.outbox.set(id, { conversation: t.id, text });
  t.addPending(id, text);
  state.stick = true;
  scheduleRender();
  if (fresh) autoTitle(t.id, text);
  if (state.conn?.online) {
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
  const item = state.outbox.get(id);
  if (!item) return;
  state.conn
    .request({ type: "say", conversation: item.conversation, text: item.text, id })
    .then(() => state.outbox.delete(id))
    .catch((error) => {
      if (error instanceof Disconnected) return; // sent again after reconnecting
      state.outbox.delete(id);
      state.transcripts.get(item.conversation)?.dropPending(id);
      if (item.conversation === state.active && !$("input").value) {
        $("input").value = item.text;
        autosize();
      }
      explain(error);
      scheduleRender();
    });
}

function autoTitle(id, text) {
  const clean = text.replace(/\[sim:[^\]]*\]/g, "").replace(/\s+/g, " ").trim();
  if (!clean) return;
  const title = clean.length > 48 ? `${clean.slice(0, 47).replace(/\s+\S*$/, "")}…` : clean;
  api.change(state.token, id, { title }).catch(() => {});
}

export function stop() {
  if (!state.active) return;
  if (!state.conn?.online) {
    notify("Can't stop the reply while offline.", { key: "conn" });
    return;
  }
  state.conn.request({ type: "cancel", conversation: state.active }).catch(explain);
}

export function regenerate() {
  const t = state.active && state.transcripts.get(state.active);
  if (!t || t.generating) return;
  state.stick = true;
  state.conn?.request({ type: "regenerate", conversation: t.id }).catch(explain);
}
