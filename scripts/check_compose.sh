#!/usr/bin/env bash
# Validates docker-compose.yml without a Docker engine (Debian's docker-compose parses it).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v docker-compose >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -q docker-compose >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q docker-compose >/dev/null 2>&1; }) || true
  fi
fi
if command -v docker-compose >/dev/null 2>&1; then
  docker-compose -f docker-compose.yml config -q
  echo "compose: docker-compose.yml is valid"
else
  echo "compose: docker-compose not installable here; the cluster test still runs its commands" >&2
fi
