// Markdown to safe DOM: marked parses, highlight.js colours code, DOMPurify sanitises.
//
// Model output is untrusted (a prompt can make a model write anything), so:
// - raw HTML in the Markdown is shown as text, never interpreted;
// - the result goes through DOMPurify (no scripts, no event handlers, no javascript: URLs);
// - images become plain links (a remote image would load by itself and can leak data);
// - links open in a new tab without a referrer.

import { Marked } from "./vendor/marked/marked.esm.js";
import DOMPurify from "./vendor/dompurify/purify.es.mjs";
import hljs from "./vendor/highlight/core.min.js";

// The highlight.js grammars vendored (scripts/vendor-ui.sh); each loads the first time a code
// block needs it, and `grammars` then fires "change" so the page can render the block again.
const GRAMMARS = new Set([
  "bash", "c", "cpp", "css", "diff", "go", "java", "javascript", "json", "markdown",
  "plaintext", "python", "rust", "shell", "sql", "typescript", "xml", "yaml",
]);
const ALIASES = {
  sh: "bash", zsh: "bash", console: "shell", py: "python", python3: "python",
  js: "javascript", jsx: "javascript", mjs: "javascript", ts: "typescript", tsx: "typescript",
  html: "xml", svg: "xml", yml: "yaml", md: "markdown", "c++": "cpp", h: "c", hpp: "cpp",
  golang: "go", rs: "rust", text: "plaintext", txt: "plaintext", jsonc: "json", patch: "diff",
};
const loading = new Set();
export const grammars = new EventTarget();

/** The registered grammar for a fence's language, or "" (and start loading it). */
function grammar(language) {
  if (!language) return "";
  if (hljs.getLanguage(language)) return language;
  const name = ALIASES[language] || language;
  if (hljs.getLanguage(name)) return name;
  if (GRAMMARS.has(name) && !loading.has(name)) {
    loading.add(name);
    import(`./vendor/highlight/languages/${name}.min.js`)
      .then((module) => {
        hljs.registerLanguage(name, module.default);
        grammars.dispatchEvent(new Event("change"));
      })
      .catch(() => loading.delete(name));
  }
  return "";
}

export function escapeHtml(text) {
  return String(text)
    .replaceAll("&", "&amp;")
    .replaceAll("<", "&lt;")
    .replaceAll(">", "&gt;")
    .replaceAll('"', "&quot;")
    .replaceAll("'", "&#39;");
}

const marked = new Marked({ gfm: true, breaks: false, async: false });
marked.use({
  renderer: {
    html({ text }) {
      return escapeHtml(text);
    },
    image({ href, text }) {
      const label = text || href;
      return `<a href="${escapeHtml(href)}">${escapeHtml(label)}</a>`;
    },
    code({ text, lang }) {
      const language = (lang || "").trim().split(/\s+/)[0].toLowerCase();
      const known = grammar(language);
      const body = known
        ? hljs.highlight(text, { language: known, ignoreIllegals: true }).value
        : escapeHtml(text);
      const label = escapeHtml(language || "text");
      return (
        `<div class="code-block"><div class="code-bar"><span class="code-lang">${label}</span>` +
        `<button type="button" class="copy-code" data-copy-code>Copy</button></div>` +
        `<pre><code class="hljs${known ? ` language-${known}` : ""}">${body}</code></pre></div>\n`
      );
    },
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    if (node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    } else {
      node.removeAttribute("target");
    }
  }
});

const PURIFY = {
  RETURN_DOM_FRAGMENT: true,
  FORBID_TAGS: ["style", "form", "img", "svg", "math", "iframe", "object", "embed"],
  FORBID_ATTR: ["style", "srcset"],
};

/** Markdown source -> sanitised DocumentFragment. */
export function renderMarkdown(source) {
  const html = marked.parse(source || "");
  return DOMPurify.sanitize(html, PURIFY);
}
