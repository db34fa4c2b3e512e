#!/usr/bin/env bash
# Installs what the tests need into .venv, checks the generated stubs, docker-compose.yml, the
# Kubernetes manifests and the Dockerfiles (hadolint), lints (ruff) and type-checks the core
# (mypy), then runs pytest in two lanes: fast (unit and in-process service tests) and slow
# (the cluster tests, which start real processes). Arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh server,tools,dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
scripts/check_protos.sh
scripts/check_compose.sh
scripts/check_k8s.sh
scripts/check_dockerfiles.sh
.venv/bin/ruff check --quiet .
.venv/bin/python -m mypy

lane() {  # NAME MARKER ARGS...: one pytest run; "no tests selected" (exit 5) is a pass
  local name=$1 marker=$2 start=$SECONDS rc=0
  shift 2
  echo "== $name lane (-m \"$marker\")"
  .venv/bin/python -m pytest -q -m "$marker" "$@" || rc=$?
  echo "== $name lane: exit $rc in $((SECONDS - start)) s"
  [ "$rc" = 0 ] || [ "$rc" = 5 ]
}
lane fast "not cluster" "$@"
lane slow "cluster" "$@"
