# Sourced by the GPU scripts: the carried wheels (.whl, bench/gpu/carry.sh) installed once per
# machine under /tmp/site with ${PY:-python3}, and the MiniLM tokenizer stand-in copied to
# /tmp/minilm when .devcarry/minilm-tok was carried. Exits 3 when the wheels are neither installed
# nor carried.
if [ ! -f /tmp/site/.done ]; then
  [ -d .whl ] || { echo "no wheels under /tmp/site and none carried (.whl)"; exit 3; }
  ${PY:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && touch /tmp/site/.done || exit 3
fi
if [ -d .devcarry/minilm-tok ]; then mkdir -p /tmp/minilm && cp -r .devcarry/minilm-tok/. /tmp/minilm/; fi
