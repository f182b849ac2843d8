#!/usr/bin/env bash
# The server's and the tests' wheels the lent GPU machine's image lacks, for ITS Python (3.12; the image brings torch,
# triton, transformers, numpy, httpx, anyio, pytest), into .gpuwhl/ (ignored; carry it: `carry: [".gpuwhl"]`).
# The versions are this venv's, so the device runs what CI runs. device_setup.sh installs them there.
# `DEST=DIR NAMES="a b" bash benchmarks/gpu_wheels.sh`: those packages into DIR instead (stage_device.sh does).
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.gpuwhl}
NAMES=${NAMES:-"fastapi starlette uvicorn pydantic pydantic_core annotated_types annotated_doc typing_inspection
opentelemetry-api openai httpx2 httpcore2 truststore jiter distro sniffio gguf"}
# `bash benchmarks/gpu_wheels.sh eval`: also what importing lm_eval needs there (tests/test_pipeline_devices.py imports
# it through uniql.compressor.evaluate; running its tasks needs `datasets` too, which stage_device.sh stages)
[ "${1:-}" = eval ] && NAMES="$NAMES lm_eval requests urllib3 certifi charset_normalizer chardet"
mkdir -p "$DEST"
for name in $NAMES; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) \
        || { echo "skipped $name (not in this venv)"; continue; }
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any -d "$DEST" "$name==$version" \
        2>/dev/null || "$PY" -m pip wheel -q --no-deps -w "$DEST" "$name==$version" 2>/dev/null \
        || echo "no wheel for $name==$version"
done
du -sh "$DEST"
