#!/usr/bin/env bash
# Installs what the tests need, checks the generated stubs and docker-compose.yml, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh server,dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
scripts/check_protos.sh
scripts/check_compose.sh
exec .venv/bin/python -m pytest -q "$@"
