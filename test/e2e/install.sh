#!/usr/bin/env bash
# Installs what the end-to-end test needs, outside the project's node_modules:
# Debian's chromium, and code-server 4.100.3 (VS Code 1.100.3, the last one on Node 20),
# playwright-core and @vscode/vsce 3 under $E2E_TOOLS (default .cache/e2e-tools).
# Why: code-server 4.100.3 is the last release on Node 20; its native modules build from source (no prebuilt downloads).
set -euo pipefail
cd "$(dirname "$0")/../.."
TOOLS="${E2E_TOOLS:-$PWD/.cache/e2e-tools}"
if command -v apt-get >/dev/null && ! { command -v chromium && command -v rg && command -v make && command -v pkg-config; } >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # chromium drives the editor; the rest builds code-server's native modules (node-pty, argon2, kerberos).
  $SUDO apt-get install -y -qq chromium libkrb5-dev ripgrep build-essential pkg-config >/dev/null
fi
if [ -x "$TOOLS/node_modules/.bin/code-server" ] && [ -d "$TOOLS/node_modules/playwright-core" ] \
  && [ -x "$TOOLS/node_modules/.bin/vsce" ]; then
  echo "e2e tools: already in $TOOLS"
  exit 0
fi
# @vscode/ripgrep's postinstall downloads rg from GitHub: seed its cache with Debian's rg.
RGCACHE="${TMPDIR:-/tmp}/vscode-ripgrep-cache-1.15.11"
if [ ! -f "$RGCACHE/ripgrep-v13.0.0-10-x86_64-unknown-linux-musl.tar.gz" ]; then
  RGTMP="$(mktemp -d)"
  mkdir -p "$RGCACHE" && cp "$(command -v rg)" "$RGTMP/rg"
  tar czf "$RGCACHE/ripgrep-v13.0.0-10-x86_64-unknown-linux-musl.tar.gz" -C "$RGTMP" rg
  rm -rf "$RGTMP"
fi
mkdir -p "$TOOLS"
[ -f "$TOOLS/package.json" ] || echo '{"name":"influence-lens-e2e-tools","private":true}' >"$TOOLS/package.json"
# yes: node-pty runs `npx node-gyp`; unsafe_perm: its postinstall refuses root;
# build_from_source: argon2/kerberos would download prebuilt binaries from GitHub.
(cd "$TOOLS" && npm_config_nodedir=/usr npm_config_yes=true npm_config_unsafe_perm=true \
  npm_config_build_from_source=true npm install --no-audit --no-fund --loglevel=error \
  code-server@4.100.3 playwright-core@1.65.1 @vscode/vsce@3.9.2)
echo "e2e tools: installed in $TOOLS"
