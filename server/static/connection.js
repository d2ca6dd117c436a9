// One WebSocket to Parley that keeps itself open.
//
// The token travels in Sec-WebSocket-Protocol (['parley.v1', 'bearer.<JWT>']), never in the
// URL. A lost connection is retried with exponential back-off and jitter (capped at 10 s);
// a silent dead link is found by a `ping` every 25 s. Events (EventTarget):
//   status  {state, code, reason, retryIn}  state: connecting | online | waiting | offline | closed
//   ready   {frame}                          the server accepted the token
//   frame   {frame}                          every frame from the server, in order
//   unauthorized {code, reason}              closed with 4401 (token missing/invalid/expired)
//   fatal   {code, reason}                   closed for good (4403: origin not allowed)

import { CLOSE, Disconnected, ProtocolError } from "./errors.js";

const SUBPROTOCOL = "parley.v1";
const MAX_DELAY_MS = 10_000;
const PING_EVERY_MS = 25_000;
const PONG_WITHIN_MS = 10_000;
const REQUEST_TIMEOUT_MS = 15_000;

let refCounter = 0;

export class Connection extends EventTarget {
  constructor(url, getToken) {
    super();
    this.url = url;
    this.getToken = getToken;
    this.ws = null;
    this.state = "closed";
    this.ready = null;
    this.attempt = 0;
    this.pending = new Map();
    this.timer = null;
    this.pingTimer = null;
    this.pongTimer = null;
    this.stopped = true;
    this.lastClose = null;
    this.retryAt = 0;
    window.addEventListener("online", () => this.#online());
    window.addEventListener("offline", () => this.#offline());
  }

  get online() {
    return this.state === "online";
  }

  start() {
    this.stopped = false;
    this.#open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.#drop(CLOSE.NORMAL, "signed out");
    this.#setState("closed");
  }

  /** Reconnect now (after a fresh token, or when the person asks). */
  reconnect() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    this.#drop(CLOSE.NORMAL, "reconnecting");
    this.#open();
  }

  send(frame) {
    if (!this.ws || this.state !== "online") return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Send a frame with a fresh `ref`; resolves with the reply, rejects with ProtocolError. */
  request(frame, timeout = REQUEST_TIMEOUT_MS) {
    const ref = `r${++refCounter}`;
    return new Promise((resolve, reject) => {
      if (!this.send({ ...frame, ref })) {
        reject(new Disconnected());
        return;
      }
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        reject(new Disconnected("The server did not answer in time."));
      }, timeout);
      this.pending.set(ref, { resolve, reject, timer });
    });
  }

  #open() {
    clearTimeout(this.timer);
    if (!navigator.onLine) {
      this.#setState("offline");
      return;
    }
    const token = this.getToken();
    const protocols = token ? [SUBPROTOCOL, `bearer.${token}`] : [SUBPROTOCOL];
    let ws;
    try {
      ws = new WebSocket(this.url, protocols);
    } catch {
      this.#retry();
      return;
    }
    this.ws = ws;
    this.ready = null;
    this.#setState("connecting");
    ws.onmessage = (event) => this.#message(ws, event);
    ws.onclose = (event) => this.#closed(ws, event.code, event.reason);
    ws.onerror = () => {};
  }

  #message(ws, event) {
    if (ws !== this.ws) return;
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    this.#alive();
    if (frame.type === "ready" && !this.ready) {
      this.ready = frame;
      this.attempt = 0;
      this.lastClose = null;
      this.#setState("online");
      this.dispatchEvent(new CustomEvent("ready", { detail: { frame } }));
      return;
    }
    this.dispatchEvent(new CustomEvent("frame", { detail: { frame } }));
    const waiting = frame.ref ? this.pending.get(frame.ref) : undefined;
    if (waiting) {
      this.pending.delete(frame.ref);
      clearTimeout(waiting.timer);
      if (frame.type === "error") waiting.reject(new ProtocolError(frame));
      else waiting.resolve(frame);
    }
  }

  #alive() {
    clearTimeout(this.pongTimer);
    clearTimeout(this.pingTimer);
    this.pingTimer = setTimeout(() => this.#probe(PONG_WITHIN_MS), PING_EVERY_MS);
  }

  /** Send a ping; no frame at all within `within` ms means the link is dead. */
  #probe(within) {
    clearTimeout(this.pongTimer);
    if (!this.send({ type: "ping" })) return;
    this.pongTimer = setTimeout(() => {
      const ws = this.ws;
      if (!ws) return;
      ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(CLOSE.NO_ANSWER, "no answer");
      } catch {
        /* already closed */
      }
      this.#closed(ws, CLOSE.LOST, "no answer from the server");
    }, within);
  }

  #closed(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.ready = null;
    clearTimeout(this.pingTimer);
    clearTimeout(this.pongTimer);
    for (const { reject, timer } of this.pending.values()) {
      clearTimeout(timer);
      reject(new Disconnected());
    }
    this.pending.clear();
    this.lastClose = { code, reason };
    if (this.stopped) return;
    if (code === CLOSE.UNAUTHORIZED) {
      this.#setState("closed", code, reason);
      this.dispatchEvent(new CustomEvent("unauthorized", { detail: { code, reason } }));
      return;
    }
    if (code === CLOSE.FORBIDDEN_ORIGIN) {
      this.stopped = true;
      this.#setState("closed", code, reason);
      this.dispatchEvent(new CustomEvent("fatal", { detail: { code, reason } }));
      return;
    }
    this.#retry(code, reason);
  }

  #retry(code = CLOSE.LOST, reason = "") {
    if (this.stopped) return;
    if (!navigator.onLine) {
      this.#setState("offline", code, reason);
      return;
    }
    // Full back-off doubles from 0.5 s to 10 s; the wait is a random 50-100 % of it so that
    // every tab of every user does not come back at the same instant after a restart.
    const base = Math.min(MAX_DELAY_MS, 500 * 2 ** this.attempt);
    const floor = code === CLOSE.TOO_MANY || code === CLOSE.TRY_AGAIN_LATER ? 3000 : 0;
    const delay = Math.max(floor, Math.round(base / 2 + (Math.random() * base) / 2));
    this.attempt += 1;
    this.retryAt = Date.now() + delay;
    this.#setState("waiting", code, reason, delay);
    this.timer = setTimeout(() => this.#open(), delay);
  }

  #drop(code, reason) {
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(code, reason);
      } catch {
        /* already closed */
      }
    }
  }

  #online() {
    if (!this.stopped && (this.state === "offline" || this.state === "waiting")) {
      this.attempt = 0;
      this.#open();
    }
  }

  #offline() {
    if (this.stopped) return;
    if (this.state === "online") {
      // The socket may linger half-open: ask now instead of waiting for the next ping.
      this.#probe(2000);
      return;
    }
    clearTimeout(this.timer);
    this.#setState("offline");
  }

  #setState(state, code = null, reason = "", retryIn = 0) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("status", { detail: { state, code, reason, retryIn } }));
  }
}
