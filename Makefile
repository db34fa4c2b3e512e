PY ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip

.PHONY: protos check-protos

# Regenerate the committed gRPC/protobuf stubs from protos/.
protos:
	$(VENV)/bin/python -m grpc_tools.protoc -I protos --python_out=src --pyi_out=src --grpc_python_out=src protos/alise/v1/*.proto

check-protos:
	scripts/check_protos.sh

.PHONY: demo test
demo:
	scripts/demo.sh

test:
	scripts/test.sh
