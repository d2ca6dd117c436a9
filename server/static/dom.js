// DOM helpers shared by every module that touches the page: `$` and `el`.

/** The element with this id. */
export const $ = (id) => document.getElementById(id);

/**
 * A new element: `props` sets `class`, `text` (textContent), `data-*`, `aria-*` and `role`
 * as attributes and anything else as a property; null, undefined and false are left out.
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-") || key.startsWith("aria-") || key === "role") {
      node.setAttribute(key, value === true ? "" : value);
    } else node[key] = value;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}
