#!/usr/bin/env bash
# Validates docker-compose.yml, alone and with the GPU workers of docker-compose.gpu.yml,
# without a Docker engine (Debian's docker-compose parses them).
# Where docker-compose is missing it is installed with apt-get (as root only, and it says
# so); where it cannot be, the check is skipped with a message (the cluster tests still run
# the compose file's commands, and tests/cluster/test_manifests.py reads the file).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v docker-compose >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "compose: installing Debian's docker-compose package (apt-get install docker-compose) to validate docker-compose.yml" >&2
    (apt-get install -y -q docker-compose >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q docker-compose >/dev/null 2>&1; }) ||
      echo "compose: apt-get could not install docker-compose" >&2
  fi
fi
if command -v docker-compose >/dev/null 2>&1; then
  # The file requires ALISE_INTERNAL_SECRET at `up`; a placeholder is enough to validate it.
  export ALISE_INTERNAL_SECRET="${ALISE_INTERNAL_SECRET:-validation-only}"
  docker-compose -f docker-compose.yml config -q
  docker-compose -f docker-compose.yml -f docker-compose.gpu.yml config -q
  echo "compose: docker-compose.yml is valid, alone and with docker-compose.gpu.yml"
else
  echo "compose: SKIPPED: docker-compose is not installed (installing it needs root and apt-get); the cluster tests still run its commands" >&2
fi
