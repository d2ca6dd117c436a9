// Errors a person understands: `error` frames, failed HTTP calls and close codes.

import { ApiError } from "./api.js";
import { Disconnected } from "./connection.js";
import { CLOSE_CODE } from "./protocol.js";
import { state } from "./state.js";
import { notify } from "./view.js";

export const CLOSE_REASONS = {
  [CLOSE_CODE.GOING_AWAY]: "The server is going away.",
  1006: "The connection was lost.",
  [CLOSE_CODE.TOO_LARGE]: "A message was too large for the server.",
  [CLOSE_CODE.INTERNAL]: "The server hit an internal error.",
  [CLOSE_CODE.RESTART]: "The server is restarting.",
  [CLOSE_CODE.TRY_AGAIN_LATER]: "The server is busy.",
  [CLOSE_CODE.PROTOCOL]: "The server did not understand this page.",
  [CLOSE_CODE.AUTH_TIMEOUT]: "Signing in took too long.",
  [CLOSE_CODE.TOO_MANY]: "Too many connections for your account — close some Parley tabs.",
};

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
      429: "You're going too fast — wait a moment and try again.",
      503: "Parley can't reach one of its services right now. Try again in a moment.",
    };
    notify(byStatus[error.status] || `The server refused that: ${error.message}`);
    if (error.status === 401) state.onUnauthorized();
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
