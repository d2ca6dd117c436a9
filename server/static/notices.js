// Short notices above the composer: what went wrong, or what happened, in a person's words.

import { $, el } from "./dom.js";

const NOTICE_MS = 8000;

/** A short message above the composer; `key` replaces an earlier notice of the same kind. */
export function notify(text, options = {}) {
  const { kind = "error", key = null, sticky = false, ms = NOTICE_MS } = options;
  const box = $("notices");
  if (key) box.querySelector(`[data-key="${key}"]`)?.remove();
  const close = el("button", {
    type: "button",
    class: "notice-close",
    "aria-label": "Dismiss",
    text: "×",
  });
  const notice = el(
    "div",
    {
      class: `notice notice-${kind}`,
      role: kind === "error" ? "alert" : "status",
      "data-key": key,
    },
    el("span", { class: "notice-text", text }),
    close,
  );
  close.addEventListener("click", () => notice.remove());
  box.append(notice);
  while (box.children.length > 3) box.firstElementChild.remove();
  if (!sticky) setTimeout(() => notice.remove(), ms);
  return notice;
}
