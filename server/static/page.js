// Putting the store on the page: the header and chat column (render, scheduleRender), the
// connection status and banner, the composer's size and count. It subscribes to the store, so
// an update anywhere is shown without its module knowing how.

import { $ } from "./dom.js";
import { CLOSE, CLOSE_REASONS } from "./errors.js";
import { grammars } from "./markdown.js";
import { invalidateMessages, renderTranscript } from "./messages.js";
import { notify } from "./notices.js";
import { renderBudget, renderSidebar } from "./sidebar.js";
import { store, subscribe } from "./store.js";

subscribe((topic, detail) => {
  if (topic === "selection") {
    renderSidebar();
    render();
  } else if (topic === "conversations") {
    renderSidebar();
    scheduleRender();
  } else if (topic === "transcript") {
    if (detail.type !== "token") renderSidebar(); // whether it is replying shows in the list
    scheduleRender();
    // a transcript just joined waits for its backlog at most a second (see render)
    if (detail.type === "joined") setTimeout(scheduleRender, 1050);
  } else {
    if (topic === "session") renderBudget();
    scheduleRender();
  }
});

grammars.addEventListener("change", () => {
  invalidateMessages();
  scheduleRender();
});

let countdown = null;
let dropCode = null; // the close code that ended the last working connection

export function showStatus({ state: s, code, retryIn, transport }) {
  const pill = $("status");
  pill.dataset.state = s;
  pill.dataset.transport = transport;
  pill.title = transport === "sse" ? "Over Server-Sent Events (no WebSocket)" : "";
  const text = {
    connecting: store.everOnline ? "Reconnecting…" : "Connecting…",
    online: "Connected",
    waiting: "Reconnecting…",
    offline: "Offline",
    closed: "Disconnected",
  }[s];
  $("status-text").textContent = text;
  clearInterval(countdown);
  if (s === "online") {
    dropCode = null;
    hideBanner();
  } else if (s === "waiting") {
    // Say why the working connection ended, not why the retries since have failed.
    if (dropCode === null) dropCode = code;
    const why = CLOSE_REASONS[dropCode] || CLOSE_REASONS[CLOSE.LOST];
    const tick = () => {
      const left = Math.max(0, Math.ceil((store.connection.retryAt - Date.now()) / 1000));
      banner(`${why} Reconnecting${left ? ` in ${left} s` : ""}…`, true);
    };
    tick();
    if (retryIn > 1000) countdown = setInterval(tick, 1000);
  } else if (s === "connecting" && store.everOnline) {
    // While retrying, keep saying why the working connection ended.
    const why = dropCode === null ? "" : `${CLOSE_REASONS[dropCode] || CLOSE_REASONS[CLOSE.LOST]} `;
    banner(`${why}Reconnecting…`);
  } else if (s === "offline") {
    banner("You're offline. Parley reconnects as soon as the network is back.");
  }
}

export function banner(text, retry = false) {
  $("banner").hidden = false;
  $("banner-text").textContent = text;
  $("banner-action").hidden = !retry;
}

export function hideBanner() {
  $("banner").hidden = true;
}

let renderQueued = false;

export function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  const run = () => {
    renderQueued = false;
    render();
  };
  if (document.hidden) setTimeout(run, 250);
  else requestAnimationFrame(run);
}

function caughtUp(t) {
  return t.lastSeq === null || t.lastSeq >= t.catchUpTo || Date.now() >= t.catchUpDeadline;
}

export function render() {
  const t = store.activeTranscript() || null;
  if (t && !caughtUp(t)) return; // the rest of the backlog is on its way
  const meta = t?.meta || (store.active && store.conversation(store.active)) || null;
  const title = meta?.title || "Parley";
  $("title").textContent = title;
  document.title = meta ? `${title} — Parley` : "Parley";
  $("model-name").textContent = meta?.model || store.model || "";
  $("sim-badge").hidden = !store.simulated;
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
    const place = position ? `${position} ahead` : "next"; // 0: the next turn to start
    $("pending-text").textContent = `Waiting for a free model slot (${place})…`;
  } else if (t && t.live) {
    pending.hidden = false;
    $("pending-text").textContent = "";
  } else {
    pending.hidden = true;
  }
  if (store.stick) scrollToEnd();
}

export function scrollToEnd() {
  const scroller = $("scroller");
  scroller.scrollTop = scroller.scrollHeight;
  $("jump").hidden = true;
}

/** Put a refused turn's text back in the composer, unless the person has typed anew. */
export function restoreDraft(text) {
  const input = $("input");
  if (input.value) return;
  input.value = text;
  autosize();
}

export function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 220)}px`;
  // near the server's limit, show how much is left
  const limit = store.info?.limits?.max_text_chars;
  const count = $("count");
  const used = input.value.length;
  count.hidden = !limit || used < limit * 0.8;
  if (!count.hidden) {
    count.textContent = `${used.toLocaleString()} / ${limit.toLocaleString()} characters`;
    count.classList.toggle("over", used > limit);
  }
}

export async function copyText(text, button) {
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
