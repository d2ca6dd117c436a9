// The HTTP side of Parley (same JWT as the socket, as `Authorization: Bearer`) and the
// token this tab signs in with.
//
// Tokens: with development sign-in on (`/api/info` says `dev_login`), a name is exchanged for
// a token at POST /api/dev/token. Otherwise the page is opened once as `/?token=<JWT>` by
// whatever signs people in; the token is moved to sessionStorage (this tab only) and removed
// from the address bar with history.replaceState, so it is not bookmarked, shared or logged.

const TOKEN_KEY = "parley.token";
const DEV_USER_KEY = "parley.devUser";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function url(path) {
  return new URL(path, document.baseURI).href;
}

async function call(method, path, { token, body } = {}) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url(path), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "The server cannot be reached.");
  }
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(response.status, (data && data.detail) || response.statusText);
  }
  return data;
}

export const api = {
  info: () => call("GET", "api/info"),
  devToken: (user) => call("POST", "api/dev/token", { body: { user } }),
  list: (token) => call("GET", "api/conversations", { token }),
  get: (token, id) => call("GET", `api/conversations/${id}`, { token }),
  create: (token, fields) => call("POST", "api/conversations", { token, body: fields }),
  change: (token, id, fields) => call("PATCH", `api/conversations/${id}`, { token, body: fields }),
  remove: (token, id) => call("DELETE", `api/conversations/${id}`, { token }),
  // What a socket sends as frames, for pages on Server-Sent Events (sse.js).
  ticket: (token) => call("POST", "api/stream-tickets", { token }),
  say: (token, id, body) => call("POST", `api/conversations/${id}/messages`, { token, body }),
  cancel: (token, id) => call("POST", `api/conversations/${id}/cancel`, { token }),
  regenerate: (token, id) => call("POST", `api/conversations/${id}/regenerate`, { token }),
  answer: (token, id, callId, body) =>
    call("POST", `api/conversations/${id}/approvals/${encodeURIComponent(callId)}`, { token, body }),
  usage: (token) => call("GET", "api/usage", { token }),
};

/** The URL of an SSE stream (`path` relative to the page), opened with a stream ticket. */
export function streamUrl(path, ticket, after = null) {
  const u = new URL(path, document.baseURI);
  u.searchParams.set("ticket", ticket);
  if (after !== null) u.searchParams.set("after", String(after));
  return u.href;
}

export function wsUrl() {
  const u = new URL("ws", document.baseURI);
  u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
  u.search = "";
  u.hash = "";
  return u.href;
}

/** The claims of a JWT (not verified: only to show the name and plan a refresh). */
export function claims(token) {
  try {
    const part = token.split(".")[1].replaceAll("-", "+").replaceAll("_", "/");
    const json = atob(part + "=".repeat((4 - (part.length % 4)) % 4));
    const data = JSON.parse(json);
    return typeof data === "object" && data ? data : null;
  } catch {
    return null;
  }
}

/** Move `?token=` from the address bar into this tab's sessionStorage. */
export function adoptUrlToken() {
  const here = new URL(location.href);
  if (!here.searchParams.has("token")) return;
  const token = here.searchParams.get("token");
  here.searchParams.delete("token");
  history.replaceState(history.state, "", here.pathname + here.search + here.hash);
  if (token) storeToken(token);
}

export function storedToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function storeToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

/** The name a development sign-in used last (so new tabs sign in by themselves). */
export function devUser() {
  return localStorage.getItem(DEV_USER_KEY);
}

export function rememberDevUser(user) {
  if (user) localStorage.setItem(DEV_USER_KEY, user);
  else localStorage.removeItem(DEV_USER_KEY);
}

/** Seconds until a token expires (Infinity without `exp`, <= 0 when expired). */
export function secondsLeft(token) {
  const exp = claims(token)?.exp;
  return typeof exp === "number" ? exp - Date.now() / 1000 : Infinity;
}
