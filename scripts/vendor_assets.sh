#!/usr/bin/env bash
# Refresh the vendored front-end assets:   make vendor   (the same as: bash scripts/vendor_assets.sh)
#
# The service serves /docs (Swagger UI) and its viewer (NiiVue) from service/static/vendor/ so that both work
# inside a closed network, with no CDN. This script downloads the exact versions pinned below with `npm pack`
# (needs npm and the npm registry, nothing else), copies only the files the pages need, with their licences,
# into service/static/vendor/swagger-ui/ and service/static/vendor/niivue/, and writes
# service/static/vendor/VERSIONS (package, version, sha256 of each copied file). To upgrade, change a version
# here, run it, look at the pages (tests/service/test_docs_offline.py loads /docs in Chromium) and commit the
# result.
set -eu

SWAGGER_UI_VERSION=5.35.0   # npm swagger-ui-dist (Apache-2.0)
NIIVUE_VERSION=0.69.0       # npm @niivue/niivue (BSD-2-Clause)

cd "$(dirname "$0")/.."
DEST=service/static/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

command -v npm >/dev/null 2>&1 || { echo "vendor_assets.sh: npm is needed (Debian: apt-get install npm)" >&2; exit 1; }
command -v node >/dev/null 2>&1 || { echo "vendor_assets.sh: node is needed" >&2; exit 1; }
if command -v sha256sum >/dev/null 2>&1; then sha256() { sha256sum "$1" | cut -d' ' -f1; }
else sha256() { shasum -a 256 "$1" | cut -d' ' -f1; }
fi

# pack PACKAGE VERSION: download the package's tarball (npm checks it against the registry's integrity) and
# unpack it; sets PACKAGE_DIR (the unpacked package/ folder) and INTEGRITY (the tarball's sha512 integrity).
# Globals rather than $(...), which would run it in a subshell where bash does not honour set -e.
pack() {
    dir="$tmp/$(printf '%s' "$1" | tr '/@' '__')"
    mkdir -p "$dir"
    npm pack --silent --json --pack-destination "$dir" "$1@$2" > "$dir.json"
    node -e '
        const [info] = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
        if (info.version !== process.argv[2]) throw new Error(`npm packed ${info.name}@${info.version}`);
        console.log(info.filename + " " + info.integrity);
    ' "$dir.json" "$2" > "$dir.meta"
    read -r tarball INTEGRITY < "$dir.meta"
    tar -xzf "$dir/$tarball" -C "$dir"
    PACKAGE_DIR="$dir/package"
}

stage="$tmp/stage"
mkdir -p "$stage/swagger-ui" "$stage/niivue"
versions="$tmp/VERSIONS"
{
    echo "# Vendored front-end assets served under /static/vendor/. Written by scripts/vendor_assets.sh"
    echo "# (refresh with \`make vendor\`); do not edit by hand. Tarballs (npm integrity):"
} > "$versions"
files="$tmp/files"
: > "$files"

# copy PACKAGE VERSION SOURCE TARGET: one file into the staging folder, recorded for VERSIONS.
copy() {
    cp "$3" "$stage/$4"
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$(sha256 "$stage/$4")" "$4" >> "$files"
}

# --- Swagger UI: what fastapi.openapi.docs.get_swagger_ui_html loads, a favicon, the licences.
pack swagger-ui-dist "$SWAGGER_UI_VERSION"
swagger=$PACKAGE_DIR
echo "#   swagger-ui-dist@$SWAGGER_UI_VERSION $INTEGRITY" >> "$versions"
for f in swagger-ui-bundle.js swagger-ui-bundle.js.LICENSE.txt swagger-ui.css favicon-32x32.png LICENSE NOTICE; do
    [ -f "$swagger/$f" ] || { echo "vendor_assets.sh: swagger-ui-dist@$SWAGGER_UI_VERSION has no $f" >&2; exit 1; }
    copy swagger-ui-dist "$SWAGGER_UI_VERSION" "$swagger/$f" "swagger-ui/$f"
done

# --- NiiVue: dist/index.js, the self-contained ES module build (load it with <script type="module">
# import { Niivue } from "/static/vendor/niivue/index.js"), with any chunk it imports by a relative path.
pack @niivue/niivue "$NIIVUE_VERSION"
niivue=$PACKAGE_DIR
echo "#   @niivue/niivue@$NIIVUE_VERSION $INTEGRITY" >> "$versions"
node -e '
    // The files an ES module imports by relative path, recursively (static and dynamic imports); each must
    // exist in the package, else the bundle is not usable as is and this fails.
    const fs = require("fs"), path = require("path");
    const root = process.argv[1], seen = new Set(), todo = [process.argv[2]];
    const spec = /(?:\bfrom\s*|\bimport\s*\(?\s*)[\x22\x27](\.\.?\/[^\x22\x27]+)[\x22\x27]/g;
    while (todo.length) {
        const file = todo.pop();
        if (seen.has(file)) continue;
        const full = path.join(root, file);
        if (!fs.existsSync(full)) throw new Error(`${file} is imported but not in the package`);
        seen.add(file);
        for (const m of fs.readFileSync(full, "utf8").matchAll(spec))
            todo.push(path.posix.normalize(path.posix.join(path.posix.dirname(file), m[1])));
    }
    for (const file of [...seen].sort()) console.log(file);
' "$niivue/dist" index.js > "$tmp/niivue-files"
while read -r f; do
    case "$f" in ../*|/*) echo "vendor_assets.sh: NiiVue imports $f, outside dist/" >&2; exit 1 ;; esac
    mkdir -p "$(dirname "$stage/niivue/$f")"
    copy @niivue/niivue "$NIIVUE_VERSION" "$niivue/dist/$f" "niivue/$f"
done < "$tmp/niivue-files"
# The npm tarball holds no licence file: use the package's own if a release ships one, else the text of
# LICENSE in the NiiVue repository (github.com/niivue/niivue), kept below, as long as package.json still
# declares that licence.
licence=$(ls "$niivue" | grep -iE '^(licen[cs]e|copying)(\.md|\.txt)?$' | head -n 1 || true)
if [ -n "$licence" ]; then
    copy @niivue/niivue "$NIIVUE_VERSION" "$niivue/$licence" niivue/LICENSE
else
    declared=$(node -p 'require(process.argv[1]).license' "$niivue/package.json")
    [ "$declared" = BSD-2-Clause ] || {
        echo "vendor_assets.sh: @niivue/niivue@$NIIVUE_VERSION declares $declared, not BSD-2-Clause:" \
            "update the licence text here" >&2
        exit 1
    }
    cat > "$tmp/niivue-LICENSE" <<'EOF'
BSD 2-Clause License

Copyright (c) 2021, Niivue
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
EOF
    copy @niivue/niivue "$NIIVUE_VERSION" "$tmp/niivue-LICENSE" niivue/LICENSE
    echo "# niivue/LICENSE: not in the npm tarball; the LICENSE of github.com/niivue/niivue (BSD-2-Clause)." \
        >> "$versions"
fi

{
    printf '# package\tversion\tsha256\tfile\n'
    cat "$files"
} >> "$versions"
cp "$versions" "$stage/VERSIONS"

# Replace what was there (only these two folders and VERSIONS: anything else under $DEST is left alone).
mkdir -p "$DEST"
rm -rf "$DEST/swagger-ui" "$DEST/niivue"
cp -R "$stage/swagger-ui" "$stage/niivue" "$stage/VERSIONS" "$DEST/"
echo "vendored swagger-ui-dist $SWAGGER_UI_VERSION and @niivue/niivue $NIIVUE_VERSION into $DEST:"
sed -n '/^# package/,$p' "$DEST/VERSIONS" | tail -n +2 | cut -f4 | sed 's/^/  /'
