FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# CPU build of torch, pinned as scripts/bootstrap.sh pins it; for GPUs start from a CUDA
# image and install its torch instead.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY clients ./clients
COPY services ./services
RUN pip install ".[server]"
# The predictor's encoder graph, exported and quantized once here (~/.cache/alise), not at
# every container start.
RUN python -c "from alise.predictor.encoder import Encoder; Encoder()"
# scheduler, predictor, worker health; Prometheus metrics of the three
EXPOSE 50051 50053 50060 9400 9401 9402
# One container, the whole cluster under `alise up`'s supervision; docker-compose.yml and
# k8s/ run each service in its own container instead.
CMD ["alise", "up", "--address", "0.0.0.0:50051"]
