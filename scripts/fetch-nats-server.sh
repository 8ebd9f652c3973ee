#!/usr/bin/env bash
# Puts a nats-server 2.10+ binary at .cache/nats-server/nats-server and prints its path.
#
# Why: the machine's Debian (bookworm) packages nats-server 2.9.10, which lacks
# `sync_interval`, multi-filter consumers and other features the design relies on.
# Debian trixie packages 2.10.x and its static Go binary runs here. We derive a
# trixie source from the machine's own apt source (same mirror URI), fetch the
# .deb with a private lists folder so the machine's apt state is untouched, and
# unpack it with dpkg -x into a git-ignored cache.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache="$root/.cache/nats-server"
bin="$cache/nats-server"
if [ -n "${FEDRELAY_NATS_SERVER:-}" ]; then echo "$FEDRELAY_NATS_SERVER"; exit 0; fi
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi

mkdir -p "$cache/apt/lists/partial" "$cache/apt/archives/partial" "$cache/deb"
src=/etc/apt/sources.list.d/debian.sources
uri=$(awk '/^URIs:/ {print $2; exit}' "$src" 2>/dev/null || true)
[ -n "$uri" ] || uri=http://deb.debian.org/debian
cat > "$cache/apt/trixie.sources" <<SRC
Types: deb
URIs: $uri
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$cache/apt/none"
      -o "Dir::Etc::sourcelist=$cache/apt/trixie.sources"
      -o "Dir::State::Lists=$cache/apt/lists" -o "Dir::Cache::Archives=$cache/apt/archives"
      -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" -o "Debug::NoLocking=1"
      -o "APT::Architecture=$(dpkg --print-architecture)")
mkdir -p "$cache/apt/none"
apt-get "${opts[@]}" -qq update >&2
(cd "$cache/deb" && apt-get "${opts[@]}" -qq download nats-server >&2)
deb=$(ls "$cache"/deb/nats-server_*.deb | head -1)
rm -rf "$cache/root" && dpkg -x "$deb" "$cache/root"
cp "$cache/root/usr/sbin/nats-server" "$bin"
rm -rf "$cache/root" "$cache/apt/lists"
"$bin" --version >&2
echo "$bin"
