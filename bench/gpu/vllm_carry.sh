#!/usr/bin/env bash
# Builds .vllmcarry/ (git ignores it): vLLM 0.26.0, the last release pinned to torch 2.11.0
# (the GPU image's; 0.27.0 moves to torch 2.13.0), for that image's Python 3.12, cut down to
# what serving a dense fp16 model on an H100 or H200 loads, and the Python packages it imports
# that the image lacks (pinned: the releases before 2026-07-26, vLLM 0.26.0's date).
#   .vllmcarry/vllm-py.tar.xz  vllm's Python files
#   .vllmcarry/vllm-so.tar.xz  its kernels: _C_stable_libtorch (cubins for sm_90 only, the rest of
#                              its fatbin replaced: bench/gpu/peer_fatbin.py) and FlashAttention 3
#   .vllmcarry/deps.tar.xz     fastapi, uvicorn, pydantic, openai, pyzmq, msgspec, xgrammar, ...
# Left out of the wheel: FlashAttention 2 (pre-Hopper), the MoE, FlashMLA, QuTLASS and
# Rust tool-parser libraries, the vllm-rs front end (off unless VLLM_USE_RUST_FRONTEND=1),
# DeepGEMM and the Blackwell FMHA sources (fp8 and sm_100 paths); each is an optional import.
# No flashinfer: run with VLLM_USE_FLASHINFER_SAMPLER=0. bench/gpu/peer_vllm.sh unpacks the
# three into /tmp/vllm-site on the GPU machine (PYTHONPATH).
#   bench/gpu/vllm_carry.sh                 # build (~300 MB downloaded once, cached)
#   bench/gpu/vllm_carry.sh check PYTHON    # import it with PYTHON: a python3.12 with torch 2.11.0
#                                           # and the image's packages (no CUDA needed)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=$ROOT/.vllmcarry
CACHE=${VLLM_CARRY_CACHE:-$HOME/.cache/alise-vllm-carry}
PY=${PY:-$ROOT/.venv/bin/python}
VLLM=vllm==0.26.0
# What vLLM 0.26.0 imports on the serving and benchmark paths that the image does not hold.
DEPS=(annotated-types==0.8.0 apache-tvm-ffi==0.1.10 astor==0.8.1 blake3==1.0.9 cachetools==7.2.0
      cbor2==6.1.3 depyf==0.20.0 dill==0.4.1 fastapi==0.136.3 httptools==0.8.0 httpx2==2.13.1
      jmespath==1.1.0 llguidance==1.7.6 model-hosting-container-standards==0.1.16 msgspec==0.21.1
      openai==3.22.1 openai-harmony==0.0.8 partial-json-parser==0.2.1.1.post7
      prometheus-fastapi-instrumentator==8.0.2 pybase64==1.4.3 pydantic==2.12.5 pydantic-core==2.41.5
      python-json-logger==4.2.0 python-multipart==0.0.32 pyzmq==27.1.0 setproctitle==1.3.7
      sniffio==1.3.1 starlette==1.7.0 typing-extensions==4.16.0 typing-inspection==0.4.4
      uvicorn==0.54.0 watchfiles==1.2.0 xgrammar==0.2.3)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp)
for n in 39 35 34 31 28 27 26 24 17 5; do PLATFORM+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORM+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

check() {  # unpack into a temporary site and import what the server, engine and client import
  local py=${1:?a python3.12 with torch 2.11.0}; local site; site=$(mktemp -d)
  for f in "$OUT"/*.tar.xz; do tar -xJf "$f" -C "$site"; done
  (cd /tmp && PYTHONPATH=$site "$py" - <<'PY'
import importlib, sys
mods = ["vllm", "vllm.entrypoints.cli.main", "vllm.entrypoints.openai.api_server", "vllm.benchmarks.serve",
        "vllm.v1.engine.core", "vllm.v1.engine.async_llm", "vllm.v1.worker.gpu_model_runner",
        "vllm.model_executor.models.opt", "vllm.v1.attention.backends.flash_attn", "vllm.compilation.backends",
        "vllm.entrypoints.llm", "vllm.v1.executor.multiproc_executor", "vllm.v1.sample.sampler", "xgrammar"]
bad = 0
for m in mods:
    try:
        importlib.import_module(m)
        print("import ok  ", m)
    except Exception as exc:  # noqa: BLE001 - a report line per module
        bad += 1
        print("import FAIL", m, type(exc).__name__, str(exc)[:200])
import vllm
from vllm import platforms
from vllm.platforms.cpu import CpuPlatform
platforms.current_platform = CpuPlatform()  # no GPU here: the app is built as on a CPU
from vllm.entrypoints.openai.api_server import build_app
from vllm.entrypoints.openai.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
app = build_app(make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m"]), supported_tasks=("generate",))
paths = {getattr(r, "path", "") for r in app.routes}
print(f"vllm {vllm.__version__}: OpenAI app with {len(paths)} routes, /v1/completions "
      f"{'present' if '/v1/completions' in paths else 'MISSING'}")
sys.exit(1 if bad or "/v1/completions" not in paths else 0)
PY
  ) 2>&1 | grep -v "^INFO\|^WARNING\|UserWarning\|warnings.warn\|cpp_extension"
  local rc=${PIPESTATUS[0]}
  rm -rf "$site"
  return "$rc"
}

if [ "${1:-}" = check ]; then check "${2:-}"; exit; fi

grep -qx '/.vllmcarry/' .git/info/exclude 2>/dev/null || echo '/.vllmcarry/' >> .git/info/exclude
mkdir -p "$CACHE" "$OUT"
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$CACHE" "$VLLM" 2>&1 | grep -v "^WARNING" || true
"$PY" -m pip install -q --no-deps "${PLATFORM[@]}" --target "$STAGE/deps" "${DEPS[@]}" 2>&1 \
  | grep -v "^WARNING" || true
# xgrammar ships a static library and its headers (for building against it) and debug info.
rm -rf "$STAGE/deps/xgrammar/lib" "$STAGE/deps/xgrammar/include" "$STAGE/deps/bin"
find "$STAGE/deps/xgrammar" -name '*.so' -exec strip --strip-debug {} +
find "$STAGE/deps" -name __pycache__ -prune -exec rm -rf {} +

WHEEL=$(ls "$CACHE"/vllm-0.26.0-*manylinux*x86_64.whl)
mkdir -p "$STAGE/vllm"
unzip -q "$WHEEL" -d "$STAGE/vllm" -x 'vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so' 'vllm/_moe_C_stable_libtorch.abi3.so' \
  'vllm/_flashmla_C.abi3.so' 'vllm/_flashmla_extension_C.abi3.so' 'vllm/_qutlass_C.abi3.so' \
  'vllm/_rust_tool_parser.abi3.so' 'vllm/vllm-rs' 'vllm/third_party/deep_gemm/*' 'vllm/third_party/fmha_sm100/*'
C=vllm/_C_stable_libtorch.abi3.so
mv "$STAGE/vllm/$C" "$STAGE/C.so"
"$PY" bench/gpu/peer_fatbin.py "$STAGE/C.so" "$STAGE/vllm/$C" --arch 90
cd "$STAGE/vllm"
SO=$(find vllm -name '*.so')
XZ_OPT="-9 -T2" tar -cJf "$OUT/vllm-py.tar.xz" --exclude='*.so' vllm vllm-0.26.0.dist-info
XZ_OPT="-9 -T2" tar -cJf "$OUT/vllm-so.tar.xz" $SO
cd "$STAGE/deps"
XZ_OPT="-9 -T2" tar -cJf "$OUT/deps.tar.xz" .
cd "$ROOT"
echo "$VLLM for cp312 manylinux x86_64, sm_90; $(echo $SO | wc -w) libraries: $(echo $SO)"
du -b "$OUT"/*.tar.xz
echo "total $(du -cb "$OUT"/*.tar.xz | tail -1 | cut -f1) bytes in .vllmcarry"
