// The same conversation over Server-Sent Events, for when the WebSocket cannot be opened
// (transport.js decides). It has connection.js's interface: start/stop/reconnect, send and
// request with the socket's frames, and the same events (status, ready, frame, unauthorized),
// plus `resync`: the user's stream came back after a short gap, so changes to the
// conversation list may have been missed.
//
// What a socket does in one place is spread over HTTP (docs/sse.md):
//   the session          GET /api/events (the user's conversation_changed); `ready` is made
//                        here from the token and GET /api/info once that stream is open
//   join / leave         GET /api/conversations/{id}/events?after=<seq> / closing it
//   say, cancel, regenerate, create   POST …/messages (idempotent by id), …/cancel,
//                        …/regenerate, POST /api/conversations
// EventSource cannot send a header, so every stream is opened with a fresh single-use stream
// ticket (POST /api/stream-tickets with the bearer token). EventSource's own reconnection
// would reuse a spent ticket, so on any error the stream is closed here and opened again
// with a new ticket and `after` = the last seq it delivered: the server resumes exactly.

import { ApiError, api, claims, streamUrl } from "./api.js";
import { Disconnected, ProtocolError } from "./errors.js";

const MAX_DELAY_MS = 10_000;
/** A stream that had been open this long and ends is opened again at once, without a word
 * (the server ends every response after `server.sse_max_lifetime`); one that ends sooner,
 * or whose new opening fails, backs off (and the page says it is reconnecting). */
const QUIET_REOPEN_AFTER_MS = 1_000;
/** The event types a stream carries (the server frames of docs/protocol.md). */
const EVENT_TYPES = [
  "joined",
  "message",
  "start",
  "token",
  "part_start",
  "part_delta",
  "part_end",
  "done",
  "queued",
  "updated",
  "approval_request",
  "approval_resolved",
  "notice",
  "error",
  "conversation_changed",
  "usage_warning",
  "refresh",
];
const CODE_BY_STATUS = {
  400: "invalid",
  403: "forbidden_model",
  404: "not_found",
  409: "busy",
  413: "too_large",
  422: "invalid",
  429: "rate_limited",
  503: "unavailable",
};

/** Wait before retry `attempt` (0-based): doubling from 0.5 s to 10 s, 50-100 % of it. */
function backoff(attempt) {
  const base = Math.min(MAX_DELAY_MS, 500 * 2 ** attempt);
  return Math.round(base / 2 + (Math.random() * base) / 2);
}

/** One EventSource, ignored (and closed) once it is not the one in use any more. */
function listen(source, onFrame) {
  for (const type of EVENT_TYPES) {
    source.addEventListener(type, (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      onFrame(frame);
    });
  }
}

export class SseConnection extends EventTarget {
  constructor(getToken) {
    super();
    this.kind = "sse";
    this.getToken = getToken;
    this.state = "closed";
    this.ready = null;
    this.retryAt = 0;
    this.stopped = true;
    this.attempt = 0;
    this.timer = null;
    this.source = null; // GET /api/events
    this.openedAt = 0;
    this.info = null; // GET /api/info, for the `ready` frame
    this.streams = new Map(); // conversation id -> its stream
    window.addEventListener("online", () => {
      if (!this.stopped && this.state === "waiting") this.#open();
    });
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
    this.#closeAll();
    this.#setState("closed");
  }

  reconnect() {
    if (this.stopped) return;
    this.#closeAll();
    this.#open();
  }

  send(frame) {
    if (!this.online) return false;
    this.request(frame).catch(() => {});
    return true;
  }

  /** What the socket answers to `frame`, from the matching HTTP request. */
  request(frame) {
    if (!this.online) return Promise.reject(new Disconnected());
    const token = this.getToken();
    const id = frame.conversation;
    switch (frame.type) {
      case "join":
        return this.#join(id, frame.after ?? null);
      case "leave":
        this.#leave(id);
        return Promise.resolve({ type: "ack" });
      case "say":
        return this.#answer(api.say(token, id, { text: frame.text, id: frame.id }), "ack");
      case "cancel":
        return this.#answer(api.cancel(token, id), "ack");
      case "regenerate":
        return this.#answer(api.regenerate(token, id), "ack");
      case "approve":
      case "deny": {
        const body = { decision: frame.type, ...(frame.reason ? { reason: frame.reason } : {}) };
        const answer = api.answer(token, id, frame.call_id, body);
        return this.#answer(answer, "ack", (approval) => ({ approval }));
      }
      case "create": {
        const fields = { ...frame };
        delete fields.type;
        delete fields.ref;
        return this.#answer(api.create(token, fields), "created", (meta) => ({ meta }));
      }
      case "auth": // every request carries the current token: nothing to renew here
        return Promise.resolve({ type: "ack", expires_at: claims(frame.token)?.exp ?? null });
      case "ping":
        return Promise.resolve({ type: "pong" });
      default:
        return Promise.reject(new ProtocolError({ code: "bad_frame", message: frame.type }));
    }
  }

  // ---------------------------------------------------------------- the user's stream

  async #open() {
    clearTimeout(this.timer);
    if (this.stopped) return;
    if (!navigator.onLine) {
      this.#setState("offline");
      return;
    }
    const quiet = this.online;
    if (!quiet) this.#setState("connecting");
    const ticket = await this.#ticket();
    if (ticket === null || this.stopped) return;
    const source = new EventSource(streamUrl("api/events", ticket));
    this.source = source;
    let opened = false;
    listen(source, (frame) => source === this.source && this.#frame(frame));
    source.onopen = () => {
      opened = true;
      if (source === this.source) this.#opened(quiet);
    };
    source.onerror = () => source === this.source && this.#lost(opened);
  }

  /** A fresh stream ticket, or null after saying why there is none (and what happens). */
  async #ticket() {
    try {
      return (await api.ticket(this.getToken())).ticket;
    } catch (error) {
      if (this.stopped) return null;
      if (error instanceof ApiError && error.status === 401) {
        this.#closeAll();
        this.#setState("closed", 4401, error.message);
        this.dispatchEvent(new CustomEvent("unauthorized", { detail: { code: 4401 } }));
      } else {
        this.#retry();
      }
      return null;
    }
  }

  async #opened(quiet) {
    this.attempt = 0;
    this.openedAt = Date.now();
    if (quiet) {
      this.dispatchEvent(new CustomEvent("resync"));
      return;
    }
    if (!this.info) this.info = await api.info().catch(() => null);
    if (this.stopped || this.online) return;
    const token = this.getToken();
    const claimed = claims(token) || {};
    const info = this.info || {};
    this.ready = {
      type: "ready",
      user: claimed.sub || "",
      model: info.model || "",
      simulated: Boolean(info.simulated),
      limits: info.limits || {},
      expires_at: claimed.exp ?? null,
    };
    this.#setState("online");
    this.dispatchEvent(new CustomEvent("ready", { detail: { frame: this.ready } }));
  }

  #frame(frame) {
    this.dispatchEvent(new CustomEvent("frame", { detail: { frame } }));
  }

  /** The user's stream ended: at once again when it had been open a while, else back off
   * (also when it was refused before opening: 429, 401 for a ticket, a server going away). */
  #lost(opened) {
    this.source?.close();
    this.source = null;
    if (opened && this.online && Date.now() - this.openedAt > QUIET_REOPEN_AFTER_MS) {
      this.#open();
      return;
    }
    this.#retry();
  }

  #retry() {
    if (this.stopped) return;
    this.#closeAll(); // the page joins again once `ready` comes back
    if (!navigator.onLine) {
      this.#setState("offline");
      return;
    }
    const delay = backoff(this.attempt);
    this.attempt += 1;
    this.retryAt = Date.now() + delay;
    this.#setState("waiting", 1006, "", delay);
    this.timer = setTimeout(() => this.#open(), delay);
  }

  #closeAll() {
    clearTimeout(this.timer);
    this.source?.close();
    this.source = null;
    this.ready = null;
    for (const id of [...this.streams.keys()]) this.#leave(id);
  }

  #setState(state, code = null, reason = "", retryIn = 0) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("status", { detail: { state, code, reason, retryIn } }));
  }

  // ---------------------------------------------------------------- conversations

  /** Follow a conversation after `after`; resolves with its `joined` frame. */
  #join(id, after) {
    const previous = this.streams.get(id);
    if (previous) previous.resolve = previous.reject = null; // superseded, not failed
    this.#leave(id);
    return new Promise((resolve, reject) => {
      const stream = {
        id,
        after, // the last seq delivered: where a reopened stream resumes
        source: null,
        attempt: 0,
        joinedAt: 0,
        timer: null,
        resolve, // the join's answer, until its `joined` arrives
        reject,
      };
      this.streams.set(id, stream);
      this.#follow(stream);
    });
  }

  async #follow(stream) {
    let ticket;
    try {
      ticket = (await api.ticket(this.getToken())).ticket;
    } catch (error) {
      if (this.streams.get(stream.id) !== stream) return;
      if (error instanceof ApiError && error.status === 401) {
        this.#lostFor(stream, new Disconnected());
        this.dispatchEvent(new CustomEvent("unauthorized", { detail: { code: 4401 } }));
      } else {
        this.#again(stream);
      }
      return;
    }
    if (this.streams.get(stream.id) !== stream) return;
    const path = `api/conversations/${stream.id}/events`;
    const source = new EventSource(streamUrl(path, ticket, stream.after));
    stream.source = source;
    let delivered = false;
    listen(source, (frame) => {
      if (stream.source !== source) return;
      delivered = true;
      if (frame.type === "joined") stream.after = frame.last_seq;
      else if (typeof frame.seq === "number") stream.after = frame.seq;
      this.#frame(frame);
      if (frame.type === "joined") {
        stream.joinedAt = Date.now();
        stream.resolve?.(frame);
        stream.resolve = stream.reject = null;
      }
    });
    source.onerror = () => {
      if (stream.source !== source) return;
      source.close();
      stream.source = null;
      if (delivered && Date.now() - stream.joinedAt > QUIET_REOPEN_AFTER_MS) stream.attempt = 0;
      if (delivered) this.#again(stream);
      else this.#refused(stream);
    };
  }

  /** A stream that delivered nothing: EventSource does not say why, GET the conversation. */
  async #refused(stream) {
    let status = 0;
    try {
      await api.get(this.getToken(), stream.id);
    } catch (error) {
      status = error instanceof ApiError ? error.status : 0;
    }
    if (this.streams.get(stream.id) !== stream) return;
    if (status === 404) {
      this.#lostFor(stream, new ProtocolError({ code: "not_found" }));
    } else if (status === 401) {
      this.#lostFor(stream, new Disconnected());
      this.dispatchEvent(new CustomEvent("unauthorized", { detail: { code: 4401 } }));
    } else {
      this.#again(stream);
    }
  }

  /** Open the stream again after `after` (at once the first time). */
  #again(stream) {
    const delay = stream.attempt === 0 ? 0 : backoff(stream.attempt);
    stream.attempt += 1;
    stream.timer = setTimeout(() => {
      if (this.streams.get(stream.id) === stream) this.#follow(stream);
    }, delay);
  }

  #lostFor(stream, error) {
    const reject = stream.reject;
    stream.resolve = stream.reject = null;
    this.#leave(stream.id);
    reject?.(error);
  }

  #leave(id) {
    const stream = this.streams.get(id);
    if (!stream) return;
    this.streams.delete(id);
    clearTimeout(stream.timer);
    stream.source?.close();
    stream.source = null;
    stream.reject?.(new Disconnected());
    stream.resolve = stream.reject = null;
  }

  // ---------------------------------------------------------------- requests over REST

  /** The socket's reply to a request answered over REST; an HTTP refusal as its error. */
  async #answer(call, type, shape = (body) => body || {}) {
    try {
      return { type, ...shape(await call) };
    } catch (error) {
      throw this.#asProtocolError(error);
    }
  }

  #asProtocolError(error) {
    if (!(error instanceof ApiError) || error.status === 0) {
      if (this.online) this.#retry(); // the turns not acknowledged are sent again on `ready`
      return new Disconnected();
    }
    if (error.status === 401) {
      this.dispatchEvent(new CustomEvent("unauthorized", { detail: { code: 4401 } }));
      return new Disconnected();
    }
    const code = CODE_BY_STATUS[error.status] || "internal";
    return new ProtocolError({ code, message: error.message });
  }
}
