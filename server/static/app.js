// Parley's browser UI, its entry point: sign-in, the session and its token, and wiring the
// page's controls to what they do.
//
// Modules: store.js (the one store of what this tab knows: named updates + subscribers),
// api.js (REST + the token), transport.js (the link to the server: connection.js, the socket
// that keeps itself open, or sse.js, Server-Sent Events where a socket cannot go), transcript.js
// (one conversation, applied in seq order), chat.js (conversations, frames and chat actions),
// errors.js (close codes, error kinds, messages a person understands). The page: page.js
// (renders the store: header, chat column, status), messages.js (the messages' DOM),
// sidebar.js (the conversation list), notices.js, markdown.js, dom.js (`$`, `el`).
// The protocol is docs/protocol.md (and its AsyncAPI document).

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
} from "./api.js";
import {
  answerApproval,
  createConversation,
  deleteConversation,
  join,
  loadConversations,
  onFrame,
  regenerate,
  renameConversation,
  route,
  say,
  stop,
  submit,
} from "./chat.js";
import { $ } from "./dom.js";
import { explain, onUnauthorized } from "./errors.js";
import { notify } from "./notices.js";
import { autosize, banner, copyText, render, scrollToEnd, showStatus } from "./page.js";
import { closeSidebar, openSidebar, renderSidebar } from "./sidebar.js";
import {
  connectionReady,
  setConnection,
  setInfo,
  setStick,
  setToken,
  signIn,
  signOut as forgetSession,
  store,
} from "./store.js";
import { Transport } from "./transport.js";

// The session's own bookkeeping, which no other module reads.
let infoLoading = null; // the GET /api/info under way or done
let refreshTimer = null;
let reauthorizing = false;
let failedAuths = 0;
const TOKEN_URL = tokenUrl();

/** `?token_url=` names where this page gets a fresh token; only a same-origin path. */
function tokenUrl() {
  const value = new URL(location.href).searchParams.get("token_url");
  if (!value) return "";
  const url = new URL(value, location.href);
  return url.origin === location.origin ? url.href : "";
}

onUnauthorized(() => reauthorize());

async function boot() {
  adoptUrlToken();
  wireUi();
  let token = storedToken();
  let note = "";
  if (token && secondsLeft(token) < 2) {
    forgetToken();
    token = null;
    note = "Your session has ended — sign in again.";
  }
  // With a token in hand the socket opens at once, while /api/info is on its way.
  const info = loadInfo();
  if (token) startChat(token);
  if (!(await info)) {
    if (!token) showSignIn("The Parley server cannot be reached — reload to try again.");
    return;
  }
  if (token) return;
  if (store.info.dev_login && devUser()) {
    token = await devSignIn(devUser()).catch(() => null);
  }
  if (token) startChat(token);
  else showSignIn(note);
}

/** GET /api/info once (again after a failure); resolves to the info or null. */
function loadInfo() {
  if (!infoLoading) {
    infoLoading = api
      .info()
      .then((info) => {
        setInfo(info);
        return info;
      })
      .catch(() => {
        infoLoading = null;
        return null;
      });
  }
  return infoLoading;
}

function showSignIn(message = "") {
  $("app").hidden = true;
  $("signin").hidden = false;
  const dev = Boolean(store.info && store.info.dev_login);
  $("dev-form").hidden = !dev;
  $("token-form").hidden = dev || !store.info;
  const error = $("signin-error");
  error.textContent = message;
  error.hidden = !message;
  if (dev) {
    $("dev-name").value = devUser() || "";
    $("dev-name").focus();
  } else if (store.info) {
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
  store.connection?.stop();
  clearTimeout(refreshTimer);
  forgetToken();
  if (!message) rememberDevUser(null);
  forgetSession();
  history.replaceState(null, "", location.pathname);
  showSignIn(message);
}

function startChat(token) {
  const user = claims(token)?.sub || "";
  signIn(token, user);
  failedAuths = 0;
  $("signin").hidden = true;
  $("app").hidden = false;
  $("user-name").textContent = user;
  $("user-avatar").textContent = (user[0] || "?").toUpperCase();
  store.connection?.stop();
  const conn = new Transport(() => store.token);
  setConnection(conn);
  conn.addEventListener("status", (e) => showStatus(e.detail));
  conn.addEventListener("ready", (e) => onReady(e.detail.frame));
  // Server-Sent Events only: the list's stream came back after a gap that may have hidden
  // conversation_changed events.
  conn.addEventListener("resync", () => loadConversations());
  conn.addEventListener("frame", (e) => {
    // The server's hint that the token nears expiry: renew it now if this page can.
    if (e.detail.frame.type === "refresh" && canRenew()) refreshSession();
    else onFrame(e.detail.frame);
  });
  conn.addEventListener("unauthorized", () => reauthorize());
  conn.addEventListener("fatal", (e) => {
    banner(`The server refused this page (${e.detail.code} ${e.detail.reason}).`);
  });
  conn.start();
  loadConversations();
  route();
  render();
}

function onReady(frame) {
  const reconnected = connectionReady(frame); // every transcript needs joining again
  failedAuths = 0;
  loadInfo().then(() => planRefresh(frame.expires_at));
  if (reconnected) loadConversations(); // conversation_changed frames may have been missed
  const active = store.activeTranscript();
  if (active) join(active);
  for (const id of store.unacknowledged()) say(id);
  if (reconnected) notify("Connected again.", { kind: "ok", key: "conn", ms: 2500 });
  render();
}

/** The token was refused: a development sign-in gets a fresh one, anyone else signs in. */
async function reauthorize() {
  if (reauthorizing) return;
  failedAuths += 1;
  if (store.info?.dev_login && store.user && failedAuths <= 2) {
    reauthorizing = true;
    try {
      setToken(await devSignIn(store.user));
      store.connection?.reconnect();
      return;
    } catch (error) {
      if (error instanceof ApiError && error.status === 0) {
        setTimeout(() => store.connection?.reconnect(), 3000);
        return;
      }
    } finally {
      reauthorizing = false;
    }
  }
  signOut("Your session has expired or was not accepted — sign in again.");
}

/** Renew the token before it expires: silently with development sign-in, else warn. */
function planRefresh(expiresAt) {
  clearTimeout(refreshTimer);
  if (!expiresAt) return;
  const left = expiresAt - Date.now() / 1000;
  const lead = Math.min(120, Math.max(15, left * 0.2));
  const wait = Math.max(0, left - lead) * 1000;
  if (canRenew()) {
    refreshTimer = setTimeout(refreshSession, wait);
  } else {
    refreshTimer = setTimeout(() => {
      const minutes = Math.max(1, Math.round(lead / 60));
      notify(
        `Your session ends in about ${minutes} minute${minutes > 1 ? "s" : ""}. ` +
          "Open Parley again from your app to continue.",
        { kind: "info", key: "expiry", sticky: true },
      );
    }, wait);
  }
}

/** A token can be renewed without the person: the app gave `?token_url=` (a same-origin
 * URL of the app's that answers a fresh token for its signed-in user), or development
 * sign-in re-mints one. */
function canRenew() {
  return Boolean(TOKEN_URL || store.info?.dev_login);
}

async function freshToken() {
  if (!TOKEN_URL) return devSignIn(store.user);
  const response = await fetch(TOKEN_URL, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`token_url answered ${response.status}`);
  const body = await response.text();
  const token = body.trim().startsWith("{") ? JSON.parse(body).token : body.trim();
  storeToken(token);
  return token;
}

async function refreshSession() {
  clearTimeout(refreshTimer);
  try {
    const token = await freshToken();
    setToken(token);
    let expiresAt = claims(token)?.exp;
    const conn = store.connection;
    if (conn?.online) {
      const ack = await conn.request({ type: "auth", token });
      expiresAt = ack.expires_at || expiresAt;
    }
    planRefresh(expiresAt);
  } catch {
    // Try again shortly; if the token runs out first the socket closes with 4401 and
    // reauthorize signs in again.
    refreshTimer = setTimeout(refreshSession, 15_000);
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
      const t = store.activeTranscript();
      if (t?.generating && input.value.trim()) {
        notify("A reply is still being written. Wait for it, or press Stop (Esc).", {
          kind: "info",
          key: "busy",
        });
        return;
      }
      $("composer").requestSubmit();
    } else if (event.key === "Escape") {
      const t = store.activeTranscript();
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
      const message = store.activeTranscript()?.find(id);
      if (message) copyText(message.content, button);
    } else if (button.dataset.action === "regenerate") {
      regenerate();
    } else if (button.dataset.action === "approve" || button.dataset.action === "deny") {
      const buttons = [...button.parentElement.querySelectorAll("button")];
      for (const b of buttons) b.disabled = true;
      answerApproval(button.dataset.callId, button.dataset.action).then((answer) => {
        if (!answer) for (const b of buttons) b.disabled = false; // refused: answer again
      });
    }
  });
  $("suggestions").addEventListener("click", (event) => {
    const chip = event.target.closest(".chip");
    if (chip) submit(chip.textContent.trim());
  });

  const scroller = $("scroller");
  scroller.addEventListener("scroll", () => {
    const gap = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight;
    setStick(gap < 48);
    $("jump").hidden = store.stick;
  });
  $("jump").addEventListener("click", () => {
    setStick(true);
    scrollToEnd();
  });

  $("open-sidebar").addEventListener("click", openSidebar);
  $("close-sidebar").addEventListener("click", closeSidebar);
  $("scrim").addEventListener("click", closeSidebar);
  $("conv-list").addEventListener("click", (event) => {
    const link = event.target.closest("a.conv");
    if (link && link.dataset.id === store.active) closeSidebar();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && $("app").classList.contains("sidebar-open")) closeSidebar();
  });
  window.addEventListener("hashchange", route);
  $("banner-action").addEventListener("click", () => {
    store.connection?.reconnect();
  });

  // dialogs
  for (const button of document.querySelectorAll("dialog [data-close]")) {
    button.addEventListener("click", () => button.closest("dialog").close());
  }
  $("new-chat").addEventListener("click", () => {
    $("new-form").reset();
    $("new-model").placeholder = store.model;
    const models = $("models");
    models.replaceChildren();
    if (store.model) models.append(new Option(store.model));
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
    const meta = store.conversation(store.active);
    if (!meta) return;
    $("rename-title").value = meta.title;
    $("rename-dialog").showModal();
    $("rename-title").select();
  });
  $("rename-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("rename-dialog").close();
    const title = $("rename-title").value.trim();
    if (!title || !store.active) return;
    renameConversation(store.active, title).catch(explain);
  });
  $("delete").addEventListener("click", () => {
    const meta = store.conversation(store.active);
    if (!meta) return;
    $("delete-name").textContent = meta.title;
    $("delete-dialog").showModal();
  });
  $("delete-form").addEventListener("submit", (event) => {
    event.preventDefault();
    $("delete-dialog").close();
    if (store.active) deleteConversation(store.active).catch(explain);
  });

  // the relative times in the list
  setInterval(() => store.token && renderSidebar(), 60_000);
}

boot();
