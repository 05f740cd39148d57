#!/usr/bin/env bash
# The independent verifiers the tests check buildcell's provenance with: @sigstore/verify,
# installed with npm (from npm's configured registry) into DIR/node_modules, where DIR is
# the first argument, else $BUILDCELL_VERIFIERS_DIR, else .verifiers/ at the top of the
# checkout. DIR gets a .gitignore of its own, so nothing in it is ever committed.
# Idempotent: with the pinned version already there, it says so and does nothing.
# Prints one line; exits 0 when @sigstore/verify is usable, else non-zero with the reason.
set -euo pipefail

# 3.x runs on Node 20.17 and later (4.x needs Node 22); bump both together.
SIGSTORE_VERIFY_VERSION=3.1.1

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-${BUILDCELL_VERIFIERS_DIR:-$top/.verifiers}}

if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  echo "verifiers: npm and node are needed to install @sigstore/verify; not installed" >&2
  exit 2
fi

mkdir -p "$dir"
[ -e "$dir/.gitignore" ] || printf '*\n' >"$dir/.gitignore"
dir=$(cd "$dir" && pwd)
installed="$dir/node_modules/@sigstore/verify/package.json"

have() {
  [ -f "$installed" ] &&
    [ "$(node -p 'require(process.argv[1]).version' "$installed" 2>/dev/null)" = "$SIGSTORE_VERIFY_VERSION" ]
}

# One installer at a time: test sessions running side by side share the directory.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$dir/.lock"
  flock 9
fi

if have; then
  echo "verifiers: @sigstore/verify $SIGSTORE_VERIFY_VERSION already in $dir/node_modules"
  exit 0
fi

echo "verifiers: installing @sigstore/verify $SIGSTORE_VERIFY_VERSION into $dir/node_modules"
[ -f "$dir/package.json" ] || printf '{"private": true}\n' >"$dir/package.json"
log="$dir/npm-install.log"
if ! npm install --prefix "$dir" --no-audit --no-fund --loglevel=error \
  --save-exact "@sigstore/verify@$SIGSTORE_VERIFY_VERSION" >"$log" 2>&1; then
  echo "verifiers: npm install failed; see $log: $(tail -n 1 "$log")" >&2
  exit 1
fi
have || { echo "verifiers: @sigstore/verify $SIGSTORE_VERIFY_VERSION missing after npm install" >&2; exit 1; }
