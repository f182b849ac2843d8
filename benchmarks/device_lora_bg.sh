#!/bin/bash
# On the lent GPU machine, from the repo root, once /tmp/st holds .stage/piece.00..04 (stage_device.sh; one piece
# carried per call): copies the repo to /tmp/repo (later calls re-lay the repo copy), unpacks the staged wheels,
# data and GGUF, and starts the masked-LoRA run detached (setsid: it outlives the call while the machine stays
# warm). Later calls poll `tail /tmp/lora/log` and copy /tmp/lora/lora_smollm2.json to $OUT; calls that do not
# time anything (GPU tests) can share the GPU meanwhile. STEPS=N changes the step count (default 1000), TASKS the
# zero-shot tasks (default piqa,arc_easy,lambada), ZS_FULL the tasks scored on their full sets (default piqa; the
# others on their first 1000 documents).
rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/lora && cp -r . /tmp/repo && cd /tmp/repo || exit 1
cat /tmp/st/piece.* | tar xz || exit 1
source benchmarks/device_setup.sh
cd benchmarks
ARGS="--device cuda --steps ${STEPS:-1000} --batch-size 16 --seqlen 512 --data alpaca,wikitext2 \
  --zero-shot-tasks ${TASKS:-piqa,arc_easy,lambada} --zero-shot-full ${ZS_FULL:-piqa} --zero-shot-limit 1000 \
  --stash /tmp/lora/stash --out /tmp/lora/lora_smollm2.json"
setsid nohup python3 lora_smollm2.py $ARGS > /tmp/lora/log 2>&1 < /dev/null &
sleep 5; cat /tmp/lora/log
