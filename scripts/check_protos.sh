#!/usr/bin/env bash
# Regenerates the stubs into a temp dir and fails if the committed ones differ.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m grpc_tools.protoc -I protos --python_out="$tmp" --pyi_out="$tmp" \
  --grpc_python_out="$tmp" protos/alise/v1/*.proto
for f in "$tmp"/alise/v1/*; do
  name=$(basename "$f")
  if ! cmp -s "$f" "src/alise/v1/$name"; then
    echo "stale generated stub: src/alise/v1/$name (run: make protos)" >&2
    exit 1
  fi
done
echo "protos: generated stubs are up to date"
