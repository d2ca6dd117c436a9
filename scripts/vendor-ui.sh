#!/usr/bin/env bash
# Refresh the browser UI's third-party code in server/static/vendor/ from the npm registry.
#
#   scripts/vendor-ui.sh            # the pinned versions below
#   MARKED=18.2.1 scripts/vendor-ui.sh   # try another version, then update the pins here
#
# Only prebuilt ES module builds and their licence files are copied: the UI has no build step.
# Needs node/npm; works in a temporary directory and leaves nothing else behind.
set -euo pipefail

MARKED="${MARKED:-18.2.1}"
DOMPURIFY="${DOMPURIFY:-3.4.18}"
HLJS="${HLJS:-11.12.0}"
# highlight.js grammars bundled with the UI, loaded on first use (keep in step with GRAMMARS in
# server/static/markdown.js; a fenced block in another language is shown plain)
LANGUAGES=(bash c cpp css diff go java javascript json markdown plaintext python rust shell sql
           typescript xml yaml)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/server/static/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cd "$work"
npm pack --silent "marked@$MARKED" "dompurify@$DOMPURIFY" "@highlightjs/cdn-assets@$HLJS" >/dev/null
for pkg in marked dompurify hljs; do mkdir -p "$pkg"; done
tar xzf "marked-$MARKED.tgz" -C marked
tar xzf "dompurify-$DOMPURIFY.tgz" -C dompurify
tar xzf "highlightjs-cdn-assets-$HLJS.tgz" -C hljs

# Drop source map references: the maps are not vendored.
strip_maps() { sed -e '/^\/\/# sourceMappingURL=/d' "$1" > "$2"; }

rm -rf "$dest"
mkdir -p "$dest/marked" "$dest/dompurify" "$dest/highlight/languages" "$dest/highlight/styles"

strip_maps marked/package/lib/marked.esm.js "$dest/marked/marked.esm.js"
cp marked/package/LICENSE* "$dest/marked/"

strip_maps dompurify/package/dist/purify.es.mjs "$dest/dompurify/purify.es.mjs"
cp dompurify/package/LICENSE* "$dest/dompurify/"

cp hljs/package/es/core.min.js "$dest/highlight/core.min.js"
for lang in "${LANGUAGES[@]}"; do
  cp "hljs/package/es/languages/$lang.min.js" "$dest/highlight/languages/"
done
cp hljs/package/styles/github.min.css hljs/package/styles/github-dark.min.css "$dest/highlight/styles/"
cp hljs/package/LICENSE "$dest/highlight/"

cat > "$dest/VERSIONS" <<VERSIONS
# Written by scripts/vendor-ui.sh; do not edit by hand.
marked $MARKED (MIT) lib/marked.esm.js
dompurify $DOMPURIFY (MPL-2.0 OR Apache-2.0) dist/purify.es.mjs
@highlightjs/cdn-assets $HLJS (BSD-3-Clause) es/core.min.js, es/languages/{$(IFS=,; echo "${LANGUAGES[*]}")}.min.js, styles/github{,-dark}.min.css
VERSIONS

echo "vendored into ${dest#"$root"/}:"
sed -n '2,$p' "$dest/VERSIONS"
