#!/usr/bin/env bash
# Installs what the tests need into .venv, checks the generated stubs, docker-compose.yml, the
# Kubernetes manifests and the Dockerfiles (hadolint), runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh server,tools,dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
scripts/check_protos.sh
scripts/check_compose.sh
scripts/check_k8s.sh
scripts/check_dockerfiles.sh
exec .venv/bin/python -m pytest -q "$@"
