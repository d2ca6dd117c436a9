// The one store of what this tab knows: the session, the connection, the conversation list,
// the transcripts this tab has opened, the turns not yet acknowledged.
//
// Modules read it through `store` (getters and look-ups; the collections themselves are not
// handed out) and change it only through the named updates exported below. Each update tells
// the subscribers what changed (`subscribe`), and page.js renders from that. Transcripts are
// changed only here too (their methods apply events; the fields below are the store's).
//
// Tests read it the way the modules do: `(await import("/store.js")).store`.

import { Transcript } from "./transcript.js";

const state = {
  token: null,
  user: null,
  info: null, // GET /api/info
  model: "",
  simulated: false,
  connection: null,
  everOnline: false, // a socket of this sign-in has been ready at least once
  conversations: new Map(), // id -> Conversation meta (the sidebar)
  listChanges: null, // id -> meta, or null when deleted, seen while the list loads
  transcripts: new Map(), // id -> Transcript (conversations this tab has opened)
  active: null, // the id of the conversation on screen
  outbox: new Map(), // message id -> {conversation, text}: turns not yet acknowledged
  stick: true, // keep the newest message in view
  rateLimitedUntil: 0, // Date.now() before which a new turn is refused here
  budget: null, // the user's token budget ({limit, used, remaining, resets_at}), if any
};

// ------------------------------------------------------------------ reading

export const store = {
  /** Every conversation's meta, as a new array. */
  conversations() {
    return [...state.conversations.values()];
  },
  conversation(id) {
    return state.conversations.get(id);
  },
  /** The transcripts this tab has opened. */
  transcripts() {
    return state.transcripts.values();
  },
  transcript(id) {
    return state.transcripts.get(id);
  },
  /** The transcript on screen, or undefined. */
  activeTranscript() {
    return state.active ? state.transcripts.get(state.active) : undefined;
  },
  /** The ids of the turns sent but not yet acknowledged. */
  unacknowledged() {
    return [...state.outbox.keys()];
  },
  turn(id) {
    return state.outbox.get(id);
  },
};

// Read-only values: store.token, store.user, store.info, store.model, store.simulated,
// store.connection, store.everOnline, store.active, store.stick, store.rateLimitedUntil,
// store.budget.
for (const key of [
  "token", "user", "info", "model", "simulated",
  "connection", "everOnline", "active", "stick", "rateLimitedUntil", "budget",
]) {
  Object.defineProperty(store, key, { get: () => state[key], enumerable: true });
}
Object.freeze(store); // assigning to store.active (say) throws: use the named updates

// ------------------------------------------------------------------ subscribers

const subscribers = new Set();

/**
 * Call `listener(topic, detail)` after each update that changes what the page shows.
 * Topics: "session" (token, user, info, model, budget), "conversations" (the list; detail: the id,
 * or null for the whole list), "selection" (the active conversation), "transcript" (detail:
 * {id, type}; type is a frame type, "pending" or "refused"). Returns the unsubscribe function.
 */
export function subscribe(listener) {
  subscribers.add(listener);
  return () => subscribers.delete(listener);
}

function changed(topic, detail = null) {
  for (const listener of subscribers) listener(topic, detail);
}

// ------------------------------------------------------------------ the session

export function signIn(token, user) {
  state.token = token;
  state.user = user;
  changed("session");
}

/** A fresh token for the same person (renewed, or signed in again). */
export function setToken(token) {
  state.token = token;
}

/** GET /api/info arrived; the `ready` frame's model and mode win over it. */
export function setInfo(info) {
  state.info = info;
  state.model = state.model || info.model;
  state.simulated = state.simulated || info.simulated;
  changed("session");
}

export function setConnection(connection) {
  state.connection = connection;
}

/**
 * The server accepted the socket (`ready`): every transcript needs joining again.
 * Returns whether this sign-in had been online before (a reconnection).
 */
export function connectionReady(frame) {
  const reconnected = state.everOnline;
  state.everOnline = true;
  state.user = frame.user;
  state.model = frame.model || state.model;
  state.simulated = Boolean(frame.simulated);
  state.budget = frame.budget ?? null;
  for (const t of state.transcripts.values()) t.joined = "no";
  changed("session");
  return reconnected;
}

/** Forget everything of the person who signed out (the info about the server stays). */
export function signOut() {
  state.connection = null;
  state.token = null;
  state.conversations.clear();
  state.transcripts.clear();
  state.outbox.clear();
  state.active = null;
  state.everOnline = false;
  changed("session");
  changed("conversations");
  changed("selection");
}

// ------------------------------------------------------------------ the conversation list

/**
 * A load of the list begins: changes that arrive meanwhile are recorded and win over it.
 * Returns the handle that `setConversations` and `endListLoad` take.
 */
export function beginListLoad() {
  state.listChanges = new Map();
  return state.listChanges;
}

/** The loaded list, unless a newer load began since; returns whether it was taken. */
export function setConversations(load, list) {
  if (state.listChanges !== load) return false;
  const fresh = new Map(list.map((meta) => [meta.id, meta]));
  for (const [id, meta] of load) {
    if (meta === null) fresh.delete(id);
    else if (!fresh.has(id) || newer(meta, fresh.get(id))) fresh.set(id, meta);
  }
  state.conversations = fresh;
  changed("conversations");
  return true;
}

export function endListLoad(load) {
  if (state.listChanges === load) state.listChanges = null;
}

/** A conversation's meta, unless the store holds a newer one. */
export function upsertConversation(meta) {
  const known = state.conversations.get(meta.id);
  if (known && newer(known, meta)) return;
  state.listChanges?.set(meta.id, meta);
  state.conversations.set(meta.id, meta);
  const t = state.transcripts.get(meta.id);
  if (t) t.meta = meta;
  changed("conversations", meta.id);
}

/** The conversation is gone (deleted, or not found): drop it and its transcript. */
export function forgetConversation(id) {
  state.listChanges?.set(id, null);
  state.conversations.delete(id);
  state.transcripts.delete(id);
  changed("conversations", id);
}

function newer(a, b) {
  return Date.parse(a.updated_at) > Date.parse(b.updated_at);
}

// ------------------------------------------------------------------ the active conversation

/** Put conversation `id` (or none) on screen, opening its transcript; follow its newest
 * message. */
export function selectConversation(id) {
  state.active = id;
  state.stick = true;
  if (id) openTranscript(id);
  changed("selection");
}

/** The transcript of conversation `id`, created empty the first time. */
function openTranscript(id) {
  let t = state.transcripts.get(id);
  if (!t) {
    t = new Transcript(id);
    t.meta = state.conversations.get(id) || null;
    state.transcripts.set(id, t);
  }
  return t;
}

/** Whether the page follows the newest message (the person has not scrolled up). */
export function setStick(stick) {
  state.stick = stick;
}

// ------------------------------------------------------------------ joining a transcript

export function joinStarted(t) {
  t.joined = "joining";
}

/** A join failed, was given up, or the conversation was left. */
export function joinEnded(t) {
  t.joined = "no";
}

/**
 * The `joined` frame: the history (with this tab's unacknowledged turns on top) or, when the
 * tab already holds the start, only the seq it has reached. Returns the transcript.
 */
export function joined(frame) {
  const t = openTranscript(frame.conversation);
  t.meta = frame.meta;
  upsertConversation(frame.meta);
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
  // The events up to meta.last_seq follow at once: the page waits for them (or a second),
  // so a reload mid-reply shows the reply so far in one go (no flash, no jump).
  t.catchUpTo = frame.meta.last_seq || 0;
  t.catchUpDeadline = Date.now() + 1000;
  changed("transcript", { id: t.id, type: "joined" });
  return t;
}

/** A conversation event for a joined transcript: "applied", "repeat", "gap" or "ignored". */
export function applyEvent(frame) {
  const t = state.transcripts.get(frame.conversation);
  if (!t || t.joined !== "yes") return "ignored"; // a join is under way: it brings these again
  const result = t.apply(frame);
  if (result !== "applied") return result;
  if (frame.type === "message") state.outbox.delete(frame.message.id);
  if (frame.type === "updated") upsertConversation(frame.meta);
  changed("transcript", { id: t.id, type: frame.type });
  return result;
}

// ------------------------------------------------------------------ this tab's turns

/** A turn this tab sends: shown at once, kept until the server acknowledges it. */
export function queueTurn(t, id, text) {
  state.outbox.set(id, { conversation: t.id, text });
  t.addPending(id, text);
  changed("transcript", { id: t.id, type: "pending" });
}

export function turnAccepted(id) {
  state.outbox.delete(id);
}

/** The server refused the turn: it leaves the transcript. Returns what was sent. */
export function turnRefused(id) {
  const item = state.outbox.get(id);
  state.outbox.delete(id);
  if (item) state.transcripts.get(item.conversation)?.dropPending(id);
  changed("transcript", { id: item?.conversation, type: "refused" });
  return item;
}

/** The user's token budget as the server last told it (`ready`, `usage_warning`, a refusal,
 * GET /api/usage); `changes` are the fields it told. */
export function setBudget(changes) {
  if (!changes) return;
  state.budget = { ...(state.budget ?? {}), ...changes };
  if (state.budget.limit > 0) {
    state.budget.remaining = changes.remaining ?? Math.max(state.budget.limit - state.budget.used, 0);
  }
  changed("session");
}

/** The server said to wait `seconds` before the next turn. */
export function rateLimit(seconds) {
  state.rateLimitedUntil = Date.now() + seconds * 1000;
}
