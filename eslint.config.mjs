// The JavaScript linter for Parley's browser UI (server/static/: plain ES modules, no build
// step). `python3 dev.py test` runs it after ruff and mypy; `npx eslint .` runs it alone.
import js from "@eslint/js";
import globals from "globals";

export default [
  // Third-party code vendored at pinned versions (scripts/vendor-ui.sh): not ours to lint.
  { ignores: ["server/static/vendor/", ".venv/", ".parley/", "test-artifacts/"] },
  js.configs.recommended,
  {
    files: ["server/static/**/*.js"],
    languageOptions: {
      ecmaVersion: 2023,
      sourceType: "module",
      globals: globals.browser,
    },
    linterOptions: { reportUnusedDisableDirectives: "error" },
    rules: {
      eqeqeq: "error",
      "no-shadow": "error",
      "no-var": "error",
      "object-shorthand": "error",
      "prefer-const": "error",
    },
  },
  {
    // The Vercel AI SDK client the e2e tests run in Node (tests/node/, its own package.json).
    files: ["tests/node/**/*.mjs"],
    languageOptions: { ecmaVersion: 2023, sourceType: "module", globals: globals.node },
  },
  {
    files: ["eslint.config.mjs"],
    languageOptions: { sourceType: "module", globals: globals.node },
  },
];
