FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# CPU build of torch; for GPUs start from a CUDA image and install its torch instead.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY clients ./clients
COPY services ./services
RUN pip install ".[server]"
EXPOSE 50051 50053 50060
CMD ["alise", "up", "--address", "0.0.0.0:50051"]
