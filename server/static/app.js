// Parley's browser UI: sign-in, the conversation list, and the chat itself.
//
// Modules: api.js (REST + the token), connection.js (the socket that keeps itself open),
// transcript.js (one conversation, applied in seq order), view.js + markdown.js (the DOM).
// The protocol is described in docs (PROTOCOL.md / the AsyncAPI document).

import {
  ApiError,
  adoptUrlToken,
  api,
  claims,
  devUser,
  forgetToken,
  rememberDevUser,
  secondsLeft,
  storeToken,
  storedToken,
  wsUrl,
} from "./api.js";
import { Connection, Disconnected, ProtocolError } from "./connection.js";
import { Transcript } from "./transcript.js";
import { notify, renderConversations, renderTranscript } from "./view.js";

const $ = (id) => document.getElementById(id);
const DEFAULT_TITLE = "New conversation";

const state = {
  info: null,
  token: null,
  user: null,
  conn: null,
  conversations: new Map(), // id -> Conversation meta (the sidebar)
  transcripts: new Map(), // id -> Transcript (conversations this tab has opened)
  active: null, // the conversation on screen
  outbox: new Map(), // message id -> {conversation, text}: turns not yet acknowledged
  model: "",
  simulated: false,
  refreshTimer: null,
  reauthorizing: false,
  failedAuths: 0,
  stick: true, // keep the newest message in view
  rateLimitedUntil: 0,
  everOnline: false,
};
window.parley = state; // for the console

// ------------------------------------------------------------------ start-up and sign-in

async function boot() {
  adoptUrlToken();
  wireUi();
  try {
    state.info = await api.info();
  } catch (error) {
    showSignIn(`The Parley server cannot be reached (${error.message}) — reload to try again.`);
    return;
  }
  state.model = state.info.model;
  state.simulated = state.info.simulated;
  let token = storedToken();
  let note = "";
  if (token && secondsLeft(token) < 5) {
    forgetToken();
    token = null;
    note = "Your session has ended — sign in again.";
  }
  if (!token && state.info.dev_login && devUser()) {
    token = await devSignIn(devUser()).catch(() => null);
  }
  if (token) startChat(token);
  else showSignIn(note);
}

function showSignIn(message = "") {
  $("app").hidden = true;
  $("signin").hidden = false;
  const dev = Boolean(state.info && state.info.dev_login);
  $("dev-form").hidden = !dev;
  $("token-form").hidden = dev || !state.info;
  const error = $("signin-error");
  error.textContent = message;
  error.hidden = !message;
  if (dev) {
    $("dev-name").value = devUser() || "";
    $("dev-name").focus();
  } else if (state.info) {
    $("token-input").focus();
  }
}

async function devSignIn(name) {
  const issued = await api.devToken(name);
  storeToken(issued.token);
  rememberDevUser(issued.user);
  return issued.token;
}

function signOut(message = "") {
  state.conn?.stop();
  state.conn = null;
  clearTimeout(state.refreshTimer);
  forgetToken();
  if (!message) rememberDevUser(null);
  state.token = null;
  state.conversations.clear();
  state.transcripts.clear();
  state.outbox.clear();
  state.active = null;
  renderTranscript(null);
  showSignIn(message);
}

function startChat(token) {
  state.token = token;
  state.user = claims(token)?.sub || "";
  state.failedAuths = 0;
  $("signin").hidden = true;
  $("app").hidden = false;
  $("user-name").textContent = state.user;
  $("user-avatar").textContent = (state.user[0] || "?").toUpperCase();
  state.conn?.stop();
  const conn = new Connection(wsUrl(), () => state.token);
  state.conn = conn;
  conn.addEventListener("status", (e) => showStatus(e.detail));
  conn.addEventListener("ready", (e) => onReady(e.detail.frame));
  conn.addEventListener("frame", (e) => onFrame(e.detail.frame));
  conn.addEventListener("unauthorized", () => onUnauthorized());
  conn.addEventListener("fatal", (e) => {
    banner(`The server refused this page (${e.detail.code} ${e.detail.reason}).`);
  });
  conn.start();
  loadConversations();
  route();
  render();
}

// ------------------------------------------------------------------ the session

function onReady(frame) {
  const reconnected = state.everOnline;
  state.everOnline = true;
  state.failedAuths = 0;
  state.user = frame.user;
  state.model = frame.model || state.model;
  state.simulated = Boolean(frame.simulated);
  planRefresh(frame.expires_at);
  if (reconnected) loadConversations(); // conversation_changed frames may have been missed
  for (const t of state.transcripts.values()) t.joined = "no";
  const active = state.transcripts.get(state.active);
  if (active) join(active);
  for (const id of state.outbox.keys()) say(id);
  if (reconnected) notify("Connected again.", { kind: "ok", key: "conn", ms: 2500 });
  render();
}

async function onUnauthorized() {
  if (state.reauthorizing) return;
  state.failedAuths += 1;
  if (state.info.dev_login && state.user && state.failedAuths <= 2) {
    // A development sign-in can get a fresh token by itself.
    state.reauthorizing = true;
    try {
      state.token = await devSignIn(state.user);
      state.conn?.reconnect();
      return;
    } catch (error) {
      if (error instanceof ApiError && error.status === 0) {
        setTimeout(() => state.conn?.reconnect(), 3000);
        return;
      }
    } finally {
      state.reauthorizing = false;
    }
  }
  signOut("Your session has expired or was not accepted — sign in again.");
}

/** Renew the token before it expires: silently with development sign-in, else warn. */
function planRefresh(expiresAt) {
  clearTimeout(state.refreshTimer);
  if (!expiresAt) return;
  const left = expiresAt - Date.now() / 1000;
  const lead = Math.min(120, Math.max(15, left * 0.2));
  const wait = Math.max(0, left - lead) * 1000;
  if (state.info.dev_login) {
    state.refreshTimer = setTimeout(refreshSession, wait);
  } else {
    state.refreshTimer = setTimeout(() => {
      const minutes = Math.max(1, Math.round(lead / 60));
      notify(
        `Your session ends in about ${minutes} minute${minutes > 1 ? "s" : ""}. ` +
          "Open Parley again from your app to continue.",
        { kind: "info", key: "expiry", sticky: true },
      );
    }, wait);
  }
}

async function refreshSession() {
  try {
    const token = await devSignIn(state.user);
    state.token = token;
    let expiresAt = claims(token)?.exp;
    if (state.conn?.online) {
      const ack = await state.conn.request({ type: "auth", token });
      expiresAt = ack.expires_at || expiresAt;
    }
    planRefresh(expiresAt);
  } catch {
    // Try again shortly; if the token runs out first the socket closes with 4401 and
    // onUnauthorized signs in again.
    state.refreshTimer = setTimeout(refreshSession, 15_000);
  }
}

// ------------------------------------------------------------------ conversations

async function loadConversations() {
  try {
    const list = await api.list(state.token);
    state.conversations = new Map(list.map((meta) => [meta.id, meta]));
    for (const t of state.transcripts.values()) {
      if (t.meta && !state.conversations.has(t.id) && t.joined === "yes") {
        state.conversations.set(t.id, t.meta);
      }
    }
    renderSidebar();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return; // the socket says so too
    notify(`Could not load your conversations: ${error.message}`, { key: "list" });
  }
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

function route() {
  const match = /^#\/c\/([0-9a-f-]{36})$/i.exec(location.hash);
  select(match ? match[1].toLowerCase() : null);
}

function go(id) {
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
function join(t) {
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
  state.conversations.delete(id);
  state.transcripts.delete(id);
  if (state.active === id) go(null);
  renderSidebar();
}

async function createConversation(fields) {
  const body = {};
  for (const [key, value] of Object.entries(fields)) if (value) body[key] = value;
  let meta;
  if (state.conn?.online) {
    meta = (await state.conn.request({ type: "create", ...body })).meta;
  } else {
    meta = await api.create(state.token, body);
  }
  state.conversations.set(meta.id, meta);
  go(meta.id);
  return meta;
}

async function renameConversation(id, title) {
  const meta = await api.change(state.token, id, { title });
  state.conversations.set(meta.id, meta);
  const t = state.transcripts.get(id);
  if (t) t.meta = meta;
  renderSidebar();
  render();
}

async function deleteConversation(id) {
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

// ------------------------------------------------------------------ frames

function onFrame(frame) {
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
        if (frame.reset && hadMessages) {
          notify("This conversation was reloaded from the server.", { kind: "info", key: "reset" });
        }
      } else {
        t.lastSeq = frame.last_seq;
      }
      t.joined = "yes";
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
  if (known && Date.parse(known.updated_at) > Date.parse(meta.updated_at)) return;
  state.conversations.set(meta.id, meta);
  const t = state.transcripts.get(meta.id);
  if (t) t.meta = meta;
  renderSidebar();
  if (meta.id === state.active) scheduleRender();
}

// ------------------------------------------------------------------ chat actions

function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16)); // not a secure context (plain http)
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

async function submit(text) {
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
  if (state.conn?.online) say(id);
  else notify("You're offline — the message is sent when the connection is back.", { kind: "info", key: "conn" });
  return true;
}

/** Send (or send again, with the same id: never a second turn) an unacknowledged `say`. */
function say(id) {
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

function stop() {
  if (!state.active) return;
  if (!state.conn?.online) {
    notify("Can't stop the reply while offline.", { key: "conn" });
    return;
  }
  state.conn.request({ type: "cancel", conversation: state.active }).catch(explain);
}

function regenerate() {
  const t = state.active && state.transcripts.get(state.active);
  if (!t || t.generating) return;
  state.stick = true;
  state.conn?.request({ type: "regenerate", conversation: t.id }).catch(explain);
}

// ------------------------------------------------------------------ errors a person understands

const CLOSE_REASONS = {
  1001: "The server is going away.",
  1006: "The connection was lost.",
  1009: "A message was too large for the server.",
  1011: "The server hit an internal error.",
  1012: "The server is restarting.",
  1013: "The server is busy.",
  4400: "The server did not understand this page.",
  4408: "Signing in took too long.",
  4429: "Too many connections for your account — close some Parley tabs.",
};

function explain(error) {
  if (error instanceof Disconnected) {
    notify(error.message, { key: "conn" });
    return;
  }
  if (error instanceof ApiError) {
    const byStatus = {
      0: "The server cannot be reached. Check your connection and try again.",
      401: "Your session has expired — sign in again.",
      404: "That conversation does not exist any more.",
      409: "A reply is still being written. Wait for it, or press Stop.",
      429: "You're going too fast — wait a moment and try again.",
      503: "Parley can't reach one of its services right now. Try again in a moment.",
    };
    notify(byStatus[error.status] || `The server refused that: ${error.message}`);
    if (error.status === 401) onUnauthorized();
    return;
  }
  const frame = error.frame || error;
  const limit = state.info?.limits?.max_text_chars;
  switch (frame.code) {
    case "busy":
      notify("A reply is still being written in this conversation. Wait for it, or press Stop.", {
        kind: "info",
        key: "busy",
      });
      break;
    case "rate_limited": {
      const seconds = Math.max(1, Math.ceil(frame.retry_after ?? 10));
      state.rateLimitedUntil = Date.now() + seconds * 1000;
      notify(`You're sending messages too quickly — try again in ${seconds} s.`, {
        key: "rate",
        ms: Math.max(4000, seconds * 1000),
      });
      break;
    }
    case "too_large":
      notify(
        limit
          ? `That message is too long — the limit is ${limit.toLocaleString()} characters.`
          : "That message is too long for the server.",
        { key: "large" },
      );
      break;
    case "unavailable":
      notify(
        "Parley can't reach one of its services right now, so that was not accepted. " +
          "Try again in a moment.",
        { key: "unavailable" },
      );
      break;
    case "not_found":
      notify("That conversation does not exist any more.", { key: "nf" });
      break;
    case "unauthorized":
      notify("Your session is not valid any more — signing in again.", { key: "auth" });
      break;
    case "invalid":
      notify(`The server refused that: ${frame.message}`);
      break;
    default:
      notify(`Something went wrong on the server${frame.message ? ` (${frame.message})` : ""}.`);
  }
}

// ------------------------------------------------------------------ connection status

let countdown = null;

function showStatus({ state: s, code, retryIn }) {
  const pill = $("status");
  pill.dataset.state = s;
  const text = {
    connecting: state.everOnline ? "Reconnecting…" : "Connecting…",
    online: "Connected",
    waiting: "Reconnecting…",
    offline: "Offline",
    closed: "Disconnected",
  }[s];
  $("status-text").textContent = text;
  clearInterval(countdown);
  if (s === "online") {
    hideBanner();
  } else if (s === "waiting") {
    const why = CLOSE_REASONS[code] || "The connection was lost.";
    const tick = () => {
      const left = Math.max(0, Math.ceil((state.conn.retryAt - Date.now()) / 1000));
      banner(`${why} Reconnecting${left ? ` in ${left} s` : ""}…`, true);
    };
    tick();
    if (retryIn > 1000) countdown = setInterval(tick, 1000);
  } else if (s === "connecting" && state.everOnline) {
    banner("Reconnecting…");
  } else if (s === "offline") {
    banner("You're offline. Parley reconnects as soon as the network is back.");
  }
}

function banner(text, retry = false) {
  $("banner").hidden = false;
  $("banner-text").textContent = text;
  $("banner-action").hidden = !retry;
}

function hideBanner() {
  $("banner").hidden = true;
}

// ------------------------------------------------------------------ rendering

let renderQueued = false;

function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  const run = () => {
    renderQueued = false;
    render();
  };
  if (document.hidden) setTimeout(run, 250);
  else requestAnimationFrame(run);
}

function renderSidebar() {
  const generating = new Set();
  for (const t of state.transcripts.values()) if (t.generating) generating.add(t.id);
  renderConversations(state.conversations, state.active, generating);
}

function render() {
  const t = state.active ? state.transcripts.get(state.active) : null;
  const meta = t?.meta || (state.active && state.conversations.get(state.active)) || null;
  const title = meta?.title || "Parley";
  $("title").textContent = title;
  document.title = meta ? `${title} — Parley` : "Parley";
  $("model-name").textContent = meta?.model || state.model || "";
  $("sim-badge").hidden = !state.simulated;
  $("chat-actions").hidden = !meta;
  const system = meta?.system || "";
  $("system-card").hidden = !system;
  $("system-text").textContent = system;

  const loaded = !t || t.lastSeq !== null;
  const empty = loaded && (!t || t.messages.length === 0);
  $("welcome").hidden = !empty;
  $("welcome-title").textContent = t ? "Say hello" : "What shall we talk about?";
  renderTranscript(t);

  const generating = Boolean(t?.generating);
  $("stop").hidden = !generating;
  $("send").hidden = generating;
  const pending = $("pending");
  if (t && t.queued.size) {
    const position = Math.min(...t.queued.values());
    pending.hidden = false;
    $("pending-text").textContent = `Waiting for a free model slot (position ${position})…`;
  } else if (t && t.live) {
    pending.hidden = false;
    $("pending-text").textContent = "";
  } else {
    pending.hidden = true;
  }
  if (state.stick) scrollToEnd();
}

function scrollToEnd() {
  const scroller = $("scroller");
  scroller.scrollTop = scroller.scrollHeight;
  $("jump").hidden = true;
}

// ------------------------------------------------------------------ the page's controls

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 220)}px`;
}

function openSidebar() {
  $("app").classList.add("sidebar-open");
  $("scrim").hidden = false;
  $("sidebar").querySelector(".conv.active, .conv, #new-chat")?.focus();
}

function closeSidebar() {
  if (!$("app").classList.contains("sidebar-open")) return;
  $("app").classList.remove("sidebar-open");
  $("scrim").hidden = true;
}

async function copyText(text, button) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
    } else {
      const area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.style.position = "fixed";
      area.style.opacity = "0";
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    const label = button.textContent;
    button.textContent = "Copied";
    button.classList.add("copied");
    setTimeout(() => {
      button.textContent = label;
      button.classList.remove("copied");
    }, 1500);
  } catch {
    notify("Copying was not allowed by the browser.", { kind: "info" });
  }
}

function wireUi() {
  $("dev-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = $("dev-name").value.trim();
    try {
      startChat(await devSignIn(name));
    } catch (error) {
      showSignIn(
        error.status === 400
          ? "Use letters, digits and . _ @ - only (at most 64)."
          : `Signing in failed: ${error.message}`,
      );
    }
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token-input").value.trim();
    if (token.split(".").length !== 3 || !claims(token)) {
      showSignIn("That does not look like a token (a JWT has three parts separated by dots).");
      return;
    }
    storeToken(token);
    $("token-input").value = "";
    startChat(token);
  });
  $("sign-out").addEventListener("click", () => signOut());

  const input = $("input");
  $("composer").addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value;
    input.value = "";
    autosize();
    if (!(await submit(text)) && !input.value) {
      input.value = text;
      autosize();
    }
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !event.altKey) {
      event.preventDefault();
      const t = state.active && state.transcripts.get(state.active);
      if (t?.generating && input.value.trim()) {
        notify("A reply is still being written. Wait for it, or press Stop (Esc).", {
          kind: "info",
          key: "busy",
        });
        return;
      }
      $("composer").requestSubmit();
    } else if (event.key === "Escape") {
      const t = state.active && state.transcripts.get(state.active);
      if (t?.generating) stop();
    }
  });
  input.addEventListener("input", autosize);
  $("stop").addEventListener("click", stop);

  $("messages").addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    if (button.hasAttribute("data-copy-code")) {
      const code = button.closest(".code-block")?.querySelector("code");
      if (code) copyText(code.textContent, button);
    } else if (button.dataset.action === "copy") {
      const id = button.closest(".msg")?.dataset.id;
      const message = state.transcripts.get(state.active)?.find(id);
      if (message) copyText(message.content, button);
    } else if (button.dataset.action === "regenerate") {
      regenerate();
    }
  });
  $("suggestions").addEventListener("click", (event) => {
    const chip = event.target.closest(".chip");
    if (chip) submit(chip.textContent.trim());
  });

  const scroller = $("scroller");
  scroller.addEventListener("scroll", () => {
    const gap = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight;
    state.stick = gap < 48;
    $("jump").hidden = state.stick;
  });
  $("jump").addEventListener("click", () => {
    state.stick = true;
    scrollToEnd();
  });

  $("open-sidebar").addEventListener("click", openSidebar);
  $("close-sidebar").addEventListener("click", closeSidebar);
  $("scrim").addEventListener("click", closeSidebar);
  $("conv-list").addEventListener("click", (event) => {
    const link = event.target.closest("a.conv");
    if (link && link.dataset.id === state.active) closeSidebar();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && $("app").classList.contains("sidebar-open")) closeSidebar();
  });
  window.addEventListener("hashchange", route);
  $("banner-action").addEventListener("click", () => {
    state.conn?.reconnect();
  });

  // dialogs
  for (const button of document.querySelectorAll("dialog [data-close]")) {
    button.addEventListener("click", () => button.closest("dialog").close());
  }
  $("new-chat").addEventListener("click", () => {
    $("new-form").reset();
    $("new-model").placeholder = state.model;
    const models = $("models");
    models.replaceChildren();
    if (state.model) models.append(new Option(state.model));
    $("new-dialog").showModal();
  });
  $("new-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("new-dialog").close();
    try {
      await createConversation({
        title: $("new-title").value.trim(),
        system: $("new-system").value.trim(),
        model: $("new-model").value.trim(),
      });
      input.focus();
    } catch (error) {
      explain(error);
    }
  });
  $("rename").addEventListener("click", () => {
    const meta = state.conversations.get(state.active);
    if (!meta) return;
    $("rename-title").value = meta.title;
    $("rename-dialog").showModal();
    $("rename-title").select();
  });
  $("rename-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("rename-dialog").close();
    const title = $("rename-title").value.trim();
    if (!title || !state.active) return;
    renameConversation(state.active, title).catch(explain);
  });
  $("delete").addEventListener("click", () => {
    const meta = state.conversations.get(state.active);
    if (!meta) return;
    $("delete-name").textContent = meta.title;
    $("delete-dialog").showModal();
  });
  $("delete-form").addEventListener("submit", (event) => {
    event.preventDefault();
    $("delete-dialog").close();
    if (state.active) deleteConversation(state.active).catch(explain);
  });

  // the relative times in the list
  setInterval(() => state.token && renderSidebar(), 60_000);
}

boot();
