// Parley's browser UI: sign-in, the session and its token, and wiring the page up.
//
// Modules: api.js (REST + the token), connection.js (the socket that keeps itself open),
// transcript.js (one conversation, applied in seq order), chat.js (conversations, frames and
// chat actions), errors.js (messages a person understands), screen.js + view.js +
// markdown.js (the page). The protocol is docs' PROTOCOL / AsyncAPI document.

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
import {
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
import { Connection } from "./connection.js";
import { explain } from "./errors.js";
import {
  autosize,
  banner,
  closeSidebar,
  copyText,
  openSidebar,
  render,
  renderSidebar,
  scheduleRender,
  scrollToEnd,
  showStatus,
} from "./screen.js";
import { $, state } from "./state.js";
import { notify, renderTranscript } from "./view.js";

window.parley = state; // for the console
state.onUnauthorized = () => onUnauthorized();

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
  if (state.info.dev_login && devUser()) {
    token = await devSignIn(devUser()).catch(() => null);
  }
  if (token) startChat(token);
  else showSignIn(note);
}

/** GET /api/info once (again after a failure); resolves to the info or null. */
function loadInfo() {
  if (!state.infoLoading) {
    state.infoLoading = api
      .info()
      .then((info) => {
        state.info = info;
        state.model = state.model || info.model;
        state.simulated = state.simulated || info.simulated;
        scheduleRender();
        return info;
      })
      .catch(() => {
        state.infoLoading = null;
        return null;
      });
  }
  return state.infoLoading;
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
  state.everOnline = false;
  history.replaceState(null, "", location.pathname);
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

function onReady(frame) {
  const reconnected = state.everOnline;
  state.everOnline = true;
  state.failedAuths = 0;
  state.user = frame.user;
  state.model = frame.model || state.model;
  state.simulated = Boolean(frame.simulated);
  loadInfo().then(() => planRefresh(frame.expires_at));
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
  if (state.info?.dev_login && state.user && state.failedAuths <= 2) {
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
  if (state.info?.dev_login) {
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
