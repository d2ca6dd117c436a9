// The conversation list in the sidebar, and opening and closing the sidebar on narrow screens.

import { $, el } from "./dom.js";
import { store } from "./store.js";

const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

/** "just now", "5 minutes ago", "yesterday"… or the date for anything older than a week. */
function ago(iso) {
  const then = Date.parse(iso);
  if (Number.isNaN(then)) return "";
  const seconds = Math.round((then - Date.now()) / 1000);
  const abs = Math.abs(seconds);
  if (abs < 45) return "just now";
  if (abs < 3600) return relative.format(Math.round(seconds / 60), "minute");
  if (abs < 86400) return relative.format(Math.round(seconds / 3600), "hour");
  if (abs < 7 * 86400) return relative.format(Math.round(seconds / 86400), "day");
  return new Date(then).toLocaleDateString();
}

/** The list as the store has it: newest first, the active one marked, "replying" where a
 * reply is being written. */
export function renderSidebar() {
  const generating = new Set();
  for (const t of store.transcripts()) if (t.generating) generating.add(t.id);
  const activeId = store.active;
  const list = $("conv-list");
  const items = store
    .conversations()
    .sort((a, b) => Date.parse(b.updated_at) - Date.parse(a.updated_at) || (a.id < b.id ? -1 : 1));
  list.replaceChildren(
    ...items.map((meta) => {
      const active = meta.id === activeId;
      return el(
        "li",
        {},
        el(
          "a",
          {
            class: `conv${active ? " active" : ""}`,
            href: `#/c/${meta.id}`,
            "data-id": meta.id,
            "aria-current": active ? "page" : null,
          },
          el("span", { class: "conv-title", text: meta.title || "Untitled" }),
          el(
            "span",
            { class: "conv-time" },
            generating.has(meta.id) ? el("span", { class: "conv-live", text: "replying" }) : null,
            ago(meta.updated_at),
          ),
        ),
      );
    }),
  );
  $("conv-empty").hidden = items.length > 0;
}

const clock = new Intl.DateTimeFormat(undefined, { weekday: "short", hour: "2-digit", minute: "2-digit" });

/** What remains of the user's token budget and when it resets (nothing without a budget). */
export function renderBudget() {
  const budget = store.budget;
  const box = $("budget");
  if (!budget || !(budget.limit > 0)) {
    box.hidden = true;
    return;
  }
  const left = Math.max(budget.remaining ?? budget.limit - budget.used, 0);
  box.hidden = false;
  box.dataset.remaining = String(left);
  box.classList.toggle("budget-low", left < budget.limit * 0.2);
  box.textContent = `${left.toLocaleString()} of ${budget.limit.toLocaleString()} tokens left · resets ${clock.format(new Date(budget.resets_at))}`;
  box.title = "Your token budget: what the model may still read and write for you until it resets.";
}

export function openSidebar() {
  $("app").classList.add("sidebar-open");
  $("scrim").hidden = false;
  $("sidebar").querySelector(".conv.active, .conv, #new-chat")?.focus();
}

export function closeSidebar() {
  if (!$("app").classList.contains("sidebar-open")) return;
  $("app").classList.remove("sidebar-open");
  $("scrim").hidden = true;
}
