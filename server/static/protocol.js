// The protocol's close codes and error codes. Generated from protocol/session.py and
// protocol/frames.py by `parley protocol-js > server/static/protocol.js`: change those, not
// this file (tests/protocol/test_reference.py fails when the two differ). What each close
// code means: docs/protocol.md, "Close codes".

export const CLOSE_CODE = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  TOO_LARGE: 1009,
  INTERNAL: 1011,
  RESTART: 1012,
  TRY_AGAIN_LATER: 1013,
  PROTOCOL: 4400,
  UNAUTHORIZED: 4401,
  FORBIDDEN_ORIGIN: 4403,
  AUTH_TIMEOUT: 4408,
  TOO_MANY: 4429,
});

export const ERROR_CODE = Object.freeze({
  BAD_FRAME: "bad_frame",
  INVALID: "invalid",
  TOO_LARGE: "too_large",
  UNAUTHORIZED: "unauthorized",
  NOT_FOUND: "not_found",
  BUSY: "busy",
  RATE_LIMITED: "rate_limited",
  UNAVAILABLE: "unavailable",
  INTERNAL: "internal",
  REFUSED: "refused",
  QUOTA_EXCEEDED: "quota_exceeded",
  FORBIDDEN_MODEL: "forbidden_model",
});
