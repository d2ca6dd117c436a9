// Errors: the socket's close codes (the one place in the UI that lists them), the errors a
// request can end with, and what a person reads about any of them (`explain`).

import { ApiError } from "./api.js";
import { notify } from "./notices.js";
import { CLOSE_CODE } from "./protocol.js";
import { rateLimit, setBudget, store } from "./store.js";

/** The close codes of docs/protocol.md (generated into protocol.js from protocol/session.py),
 * plus the two that only a browser sees: LOST (1006, no close frame) and NO_ANSWER (this page
 * gave up on a silent link). */
export const CLOSE = Object.freeze({ ...CLOSE_CODE, LOST: 1006, NO_ANSWER: 4000 });

export const CLOSE_REASONS = {
  [CLOSE.GOING_AWAY]: "The server is going away.",
  [CLOSE.LOST]: "The connection was lost.",
  [CLOSE.TOO_LARGE]: "A message was too large for the server.",
  [CLOSE.INTERNAL]: "The server hit an internal error.",
  [CLOSE.RESTART]: "The server is restarting.",
  [CLOSE.TRY_AGAIN_LATER]: "The server is busy.",
  [CLOSE.PROTOCOL]: "The server did not understand this page.",
  [CLOSE.AUTH_TIMEOUT]: "Signing in took too long.",
  [CLOSE.TOO_MANY]: "Too many connections for your account — close some Parley tabs.",
};

/** An `error` frame in answer to a request. */
export class ProtocolError extends Error {
  constructor(frame) {
    super(frame.message || frame.code);
    this.code = frame.code;
    this.frame = frame;
  }
}

/** A request that cannot be answered: the socket is down, or the answer did not come. */
export class Disconnected extends Error {
  constructor(message = "The connection to the server was lost.") {
    super(message);
    this.code = "disconnected";
  }
}

const moment = new Intl.DateTimeFormat(undefined, {
  weekday: "long",
  hour: "2-digit",
  minute: "2-digit",
});

/** "on Tuesday 14:00": when a budget resets, in the reader's time zone. */
export function when(iso) {
  return `on ${moment.format(new Date(iso))}`;
}

let unauthorized = () => {};

/** What to do when a request says the session is not valid (app.js signs in again). */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

export function explain(error) {
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
      429: "You're going too fast, or your token budget is used up — try again later.",
      403: "That is not available on your plan.",
      503: "Parley can't reach one of its services right now. Try again in a moment.",
    };
    notify(byStatus[error.status] || `The server refused that: ${error.message}`);
    if (error.status === 401) unauthorized();
    return;
  }
  const frame = error.frame || error;
  const limit = store.info?.limits?.max_text_chars;
  switch (frame.code) {
    case "busy":
      notify("A reply is still being written in this conversation. Wait for it, or press Stop.", {
        kind: "info",
        key: "busy",
      });
      break;
    case "rate_limited": {
      const seconds = Math.max(1, Math.ceil(frame.retry_after ?? 10));
      rateLimit(seconds);
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
    case "quota_exceeded":
      if (frame.resets_at) setBudget({ resets_at: frame.resets_at });
      notify(
        "Your token budget has no room left for another reply" +
          (frame.resets_at ? ` — it resets ${when(frame.resets_at)}.` : "."),
        { key: "quota", ms: 15000 },
      );
      break;
    case "forbidden_model":
      notify("That model is not available on your plan.", { key: "model" });
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
