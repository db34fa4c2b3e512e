# The CPU image: the whole cluster under `alise up`, or one service each (docker-compose.yml,
# k8s/). Dockerfile.gpu is the same on a CUDA base.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# CPU build of torch, pinned as scripts/bootstrap.sh pins it; a layer of its own, so a change
# of ALISE's code does not fetch it again.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY src ./src
# ALISE from this checkout (its dependencies pinned in pyproject.toml), then the predictor's
# encoder graph, exported and quantized once here (~/.cache/alise), not at every start.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[server]" \
    && python -c "from alise.predictor.encoder import Encoder; Encoder()"
# Every listener of the command below (--host 0.0.0.0 puts them all on the container's
# interfaces): clients' gRPC 50051 and HTTP 8000; the worker listener 50052 and the
# predictor 50053 (internal, behind the cluster's secret); health 50060 (worker) and 8001
# (HTTP door); Prometheus metrics 9400 (scheduler), 9401 (predictor), 9402 (worker).
EXPOSE 50051 50052 50053 50060 8000 8001 9400 9401 9402
# One container, the whole cluster under `alise up`'s supervision; docker-compose.yml and
# k8s/ run each service in its own container instead.
CMD ["alise", "up", "--host", "0.0.0.0", "--metrics-port", "9400"]
