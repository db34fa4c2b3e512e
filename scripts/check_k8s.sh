#!/usr/bin/env bash
# Validates the Kubernetes manifests in k8s/ against the API schemas that the PyPI package
# kubernetes-validate ships (the dev extra installs it), strictly (an unknown field fails),
# for the oldest release they need (1.27: gRPC probes) and the newest the package knows.
set -euo pipefail
cd "$(dirname "$0")/.."
for version in 1.27.0 1.37.0; do
  .venv/bin/kubernetes-validate --strict --quiet -k "$version" k8s/*.yaml
done
echo "k8s: manifests valid against the Kubernetes 1.27 and 1.37 schemas"
