#!/usr/bin/env bash
# The JS client package's checks (scripts/test.sh runs them after the cargo tests, which build
# target/debug/switchboard): type-check the module, check that switchboard.d.ts is what its
# JSDoc generates, run the Node.js tests against the real server, then pack the tarball and
# install it into an empty project to prove it imports.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund --loglevel=error
npx tsc -p tsconfig.json
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
npx tsc -p tsconfig.types.json --outDir "$tmp/types"
if ! diff -u switchboard.d.ts "$tmp/types/switchboard.d.ts"; then
  echo "clients/js: switchboard.d.ts is stale; run: npx tsc -p tsconfig.types.json" >&2
  exit 1
fi
node --experimental-websocket --test test/
npm pack --pack-destination "$tmp" --loglevel=error >/dev/null
mkdir "$tmp/app"
(cd "$tmp/app" && npm init -y >/dev/null && npm install --no-audit --no-fund --loglevel=error "$tmp"/switchboard-client-*.tgz \
  && node --input-type=module -e "import { Switchboard, SwitchboardError } from 'switchboard-client';
if (typeof Switchboard !== 'function' || typeof SwitchboardError !== 'function') process.exit(1);
console.log('clients/js: the packed tarball installs and imports');")
test -f "$tmp/app/node_modules/switchboard-client/switchboard.d.ts"
