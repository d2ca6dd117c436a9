// The page's link to Parley: a WebSocket (connection.js) or, where one cannot be opened,
// Server-Sent Events plus REST (sse.js). Both have the same interface and events, so the rest
// of the page never asks which one it has.
//
// `?transport=` in the page's address chooses: `sse` uses Server-Sent Events from the start,
// `websocket` never leaves the socket, anything else (the default) starts with the socket and
// falls back to Server-Sent Events when it cannot be opened: when it ends before the server
// ever said `ready` FALLBACK_AFTER times in a row, or is not ready within OPEN_WITHIN_MS (a
// proxy that holds the upgrade). A socket that has worked once is never given up for this
// page (a server restart is not a reason); the fallback lasts until the page is reloaded.
//
// The `status` event's detail also says `transport`: "websocket" or "sse".

import { wsUrl } from "./api.js";
import { Connection } from "./connection.js";
import { SseConnection } from "./sse.js";

const EVENTS = ["status", "ready", "frame", "unauthorized", "fatal", "resync"];
const FALLBACK_AFTER = 2;
const OPEN_WITHIN_MS = 10_000;

/** "sse", "websocket" or "auto", from `?transport=`. */
export function chosenTransport() {
  const value = new URL(location.href).searchParams.get("transport");
  return value === "sse" || value === "websocket" ? value : "auto";
}

export class Transport extends EventTarget {
  constructor(getToken, choice = chosenTransport()) {
    super();
    this.getToken = getToken;
    this.mayFallBack = choice === "auto";
    this.failedOpens = 0;
    this.openTimer = null;
    this.inner = null;
    this.#use(choice === "sse" ? new SseConnection(getToken) : new Connection(wsUrl(), getToken));
  }

  get kind() {
    return this.inner.kind || "websocket";
  }

  get online() {
    return this.inner.online;
  }

  get state() {
    return this.inner.state;
  }

  get ready() {
    return this.inner.ready;
  }

  get retryAt() {
    return this.inner.retryAt;
  }

  start() {
    if (this.mayFallBack) {
      this.openTimer = setTimeout(() => this.#fallBack(), OPEN_WITHIN_MS);
    }
    this.inner.start();
  }

  stop() {
    clearTimeout(this.openTimer);
    this.inner.stop();
  }

  reconnect() {
    this.inner.reconnect();
  }

  send(frame) {
    return this.inner.send(frame);
  }

  request(frame, timeout) {
    return this.inner.request(frame, timeout);
  }

  #use(inner) {
    this.inner = inner;
    for (const type of EVENTS) {
      inner.addEventListener(type, (event) => this.#relay(inner, type, event.detail));
    }
  }

  #relay(inner, type, detail) {
    if (inner !== this.inner) return; // the socket given up
    if (this.mayFallBack && this.#watch(type, detail)) return;
    const shown = type === "status" ? { ...detail, transport: this.kind } : detail;
    this.dispatchEvent(new CustomEvent(type, { detail: shown }));
  }

  /** Follows the socket while it may still be given up; true when it just was. */
  #watch(type, detail) {
    if (type === "ready") {
      this.mayFallBack = false;
      clearTimeout(this.openTimer);
    } else if (type === "status" && detail.state === "waiting") {
      this.failedOpens += 1;
      if (this.failedOpens >= FALLBACK_AFTER) {
        this.#fallBack();
        return true;
      }
    }
    return false;
  }

  #fallBack() {
    if (!this.mayFallBack) return;
    this.mayFallBack = false;
    clearTimeout(this.openTimer);
    console.info("parley: the WebSocket cannot be opened; using Server-Sent Events");
    const socket = this.inner;
    this.#use(new SseConnection(this.getToken));
    socket.stop();
    this.inner.start();
  }
}
