#!/usr/bin/env bash
# The GPU acceptance runs of issues 4 / 5 / 7 in as few device calls as possible (each call <= 10 min, the
# machine warm for 30 s after it). Run from the repo root on the lent machine; results go to $OUT (they come
# back with the call) named after the GPU, e.g. kernels_h100.json. Nothing needs carrying: the models are built
# on the device with random weights. Steps (SUITE, space-separated; default "ab kernels decode"):
#   ab       gemv_ab.py: the decode GEMV of this tree vs the files in $GEMV_B (default .ab/int4_gemv_old.py and
#            .ab/gemv_variants/*.py: kernel variants kept out of the tree until measured; carry .ab), ~1-2 min
#   kernels  kernel_bench.py, both models, batch 1/4/16, rates 0-0.35, prefill, ~1 min (KERNELS_SWEEP=1: also
#            every candidate config at batch 1, rate 0: pick_config was tuned on the H200)
#   decode   decode_gpu.py, Llama-3.1-8B shape, engine + dense bf16 + transformers eager (compiled skipped:
#            SKIP_COMPILED=0 adds it, several minutes), ~3 min
#   longctx  bound_ab.py: batch-1 TPOT with the graphs sized for the prompt (1288) and for a server's default
#            context (131072), two rounds; ATTENTION_B=FILE (a carried decode_attention.py, e.g. stop 42's from
#            `git show 6dc6675:kernels/decode_attention.py`) times that file's attention in the same run, ~2 min
#   ssm      ssm_decode_gpu.py, Mamba2-8B / Nemotron-H-8B shapes with the transformers anchor, ~3 min
#   profile  profile_decode.py: per-kernel time of a decode step at rates 0, 0.15, 0.25, 0.35, Llama-3.1-8B and
#            Mamba2-8B shapes (what does not shrink with the rate; why 0.25 decodes no faster than 0.15), ~2 min
#   prefill  profile_prefill.py: a 1024-token prefill's TTFT on INT4 and dense bf16 weights at rates 0 / 0.35 and its
#            GPU time by kind of kernel (dequantize, cuBLAS, attention, INT4 Triton, rest) against the wall time
#            and the host's Python functions (stop 45: host-bound; the fixes took INT4 from 63-72 to 33-36 ms), ~1 min
#   prefillgraphs  prefill_graphs.py: TTFT with and without the prefill CUDA graphs at 16-2048 tokens, ~1 min
#   envab    decode_gpu.py at batch 1, the default tree against each variant in $ENV_AB (space-separated; a
#            variant is VAR=VALUE, several joined by +; default: UNIQL_NARROW_SPLIT=deep and UNIQL_EARLY_LOADS=0,
#            the stop-28 behaviours; UNIQL_WIDE_COLS=128 tries 128-column blocks on the wide batch-1 GEMVs (lost),
#            UNIQL_WIDE_COLS=256 never takes them (the default, auto, where a program reads <= 0.8 of the bytes);
#            UNIQL_PDL=1+UNIQL_GEMV_PER_SM=4: PDL with GEMV waves of 4 programs an SM, room for early starts (lost,
#            with the L2 prefetch since removed; lost again at stop 44 with UNIQL_GEMV_PRELOAD=2, x1.15-1.44);
#            UNIQL_GEMV_PER_SM=regs: waves of what the register file holds (10 an SM on 128 columns; mixed);
#            UNIQL_GEMV_BLOCK_K=32: half-size batch-1 GEMV tiles, a finer rounding of the tiles per program;
#            UNIQL_PDL=0 / 1: without PDL / every kernel releasing the next right after its wait (default late);
#            UNIQL_GEMV_PRELOAD=1 / UNIQL_ATTN_PREWAIT=1: the GEMV's first tile / attention's cache loads before the
#            PDL wait (stop 40); UNIQL_WIDE_COLS=128+UNIQL_GLU_PAIRED=1: gate and up of the same channels in one
#            program, silu(gate) * up its own epilogue (queued, stop 41; 70 registers at 256 columns)), two
#            alternating rounds on the same machine, ~25 s a run (ENVAB_BATCHES="1 4": those batches in each run) ->
#            decode_envab_<gpu>.txt and decode_envab_<gpu>_<round>_<variant>.json
#   envabssm the same with ssm_decode_gpu.py, variants in $ENV_AB_SSM if set (else $ENV_AB: one call can run both
#            steps with different lists) (Mamba2-8B shape, no transformers anchor; ENVAB_SSM_MODELS="mamba2-8b-shape
#            nemotron-h-8b-shape" adds the hybrid (~2x the time); UNIQL_SSM_BLOCK_P=R caps the
#            state update's head channels a program, UNIQL_SSM_CONV_FOLD=0 runs the causal conv as its own kernel (the
#            fold is the default since stop 33); UNIQL_PDL_SSM=1 puts the state update and the group norm in the
#            PDL chain (the default since stop 40); the state loaded before the PDL wait was even, stop 42 (removed);
#            UNIQL_SSM_GEMV_PRELOAD=1: a Mamba block's GEMVs preload a tile (0, the default since stop 42, won)), ~35 s a run ->
#            ssm_envab_<gpu>*
#   splits   split_sweep.py: batch-1 GEMV time against every K split (Llama shapes, g128, rates 0 / 0.35) with
#            the compiled kernels' registers, ~2 min
#   ksweep   kernel_bench.py's launch-config sweep at batch 4 and 16 (Llama q|k|v, o, gate|up, down at rate 0: the
#            CUDA-core GEMV and 16-row tensor-core GEMM tiles), to tune pick_config for the server's batches (stop 47: ~100 s)
#   downsweep kernel_bench.py's batch-1 launch-config sweep on the down projections of both models (rate 0; rates 0 and
#            0.35 timed at the default): Qwen's down is the one issue-4 miss the stage-latency model leaves room for
#            (ratio_bound.py: ~1.6 us a launch); stop 38: the default config is the fastest on both ->
#            kernels_down_sweep_<gpu>.json
#   prunedsweep kernel_bench.py's batch-1 config sweep on the PRUNED (rate 0.35) shapes of Llama's q|k|v, o and down:
#            step_residual.py puts o's and down's residual a launch higher at 0.35 than at 0 (+0.2 / +0.7 us), and
#            pick_config was tuned on full shapes; g128 as the engine builds; not yet run -> kernels_pruned_sweep_<gpu>.json
#   ssmprobe ssm_update_probe.py: the Mamba2-8B state update alone, per layer, for several launch configs, ~1 min
#   floor    gemv_floor.py: copy four ways, an empty graph node, load-only kernels over the Llama layers' packed
#            bytes (the floor of one launch that only streams them) next to our GEMV (run on the H200 only so far)
#   attnprobe attention_probe.py: batch-1 decode attention alone per layer, Llama shape, several split sizes, ~1 min
#   chain    persistent_probe.py: chains of dependent INT4 GEMVs (32 o-sized, 16 Llama MLP up/down pairs) in one persistent launch
#            vs the production GEMV a layer vs the same kernel launched per layer (tickets, then static grids one tile ahead), ~1-2 min
#   loop     layer_loop_probe.py: the same chains in one persistent launch whose tasks run the production GEMV's body
#            and split-K finish, incl. the 129 GEMVs of a Llama-8B step at rates 0 and 0.35 (stop 37, three runs; ~2 min)
#   short    short_path_probe.py: the shortest dependent path (weights loaded before the wait, split partials summed
#            by the next layer, one release add a task; its sync-only path; whole-K tasks) on the 32 x 512, o-sized,
#            MLP and Llama-step chains, then its GPU tests (stop 38: ran three times, ~2 min)
#   staged   staged_probe.py: a GEMV stage whose weights TMA stages in shared memory before its PDL wait (Gluon), on
#            the 512-wide, o- and q|k|v-sized chains against the production GEMV a layer, ~1 min
#   stagedtests  tests/kernels/test_int4_staged.py on the GPU (kernels/int4_staged.py against its reference and
#            the production epilogue / prologue), <1 min; then e.g. ENV_AB="UNIQL_GEMV_STAGED=1" SUITE=envab
#   tests    the GPU tests of the kernels (real shapes, bf16), ~6 min (stop 48: 351 s, 579 tests)
#   tests1   the GPU tests of the runner / SSM graphs / graph reset, ~4 min (both were one step: 461 s of 600)
#   tests2   the whole pipeline on cuda, the server on CUDA, residency, SSM engine, ~3 min; both test steps need
#            .gpuwhl carried, built by `bash benchmarks/gpu_wheels.sh eval` (the server's wheels for the device's
#            Python and lm_eval, which the pipeline test imports: without it that file fails to collect and the
#            step stops there, stop 49); tests that need the SmolLM2 tokenizer error unless its GGUF is staged
# e.g. a call with command `SUITE="ab kernels decode" bash benchmarks/device_suite.sh`, then one with SUITE=ssm.
: "${OUT:?run on the device machine: \$OUT is where results go}"
# this tree into /tmp/uniql (anew), plus the wheels of whatever .whl / .gpuwhl the call carried (carry .gpuwhl for
# the tests step only: the others need none, and each wheel costs install time)
source benchmarks/device_setup.sh || exit 1
gpu=$(python3 -c "import torch; n = torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
variants=()
for f in ${GEMV_B:-.ab/int4_gemv_old.py .ab/gemv_variants/*.py}; do  # absolute, as the steps run in benchmarks/
    [ -f "$f" ] && { [[ $f == /* ]] && variants+=("$f") || variants+=("$PWD/$f"); }
done
cd benchmarks || exit 1

envab() {  # envab NAME VARIANTS SCRIPT ARGS...: SCRIPT at the default tree and under each variant, two rounds
    local name=$1 list=$2 script=$3 round variant
    shift 3
    for round in 1 2; do
        for variant in default $list; do
            echo "== round $round: $variant"
            env $([ "$variant" = default ] || echo "${variant//+/ }") python3 "$script" "$@" \
                --json "$OUT/${name}_envab_${gpu}_${round}_$(echo "$variant" | tr '=+' '__').json" | grep "uniql "
        done
    done > "$OUT/${name}_envab_$gpu.txt"
}
for step in ${SUITE:-ab kernels decode}; do
    start=$SECONDS
    case $step in
        ab) if [ ${#variants[@]} -eq 0 ]; then echo "ab: no variant file (carry .ab, or set GEMV_B)"; continue; fi
            python3 gemv_ab.py --b-file "${variants[@]}" --out "$OUT/gemv_ab_$gpu.json" ;;
        kernels) python3 kernel_bench.py $([ "${KERNELS_SWEEP:-0}" = 1 ] && echo --sweep) --out "$OUT/kernels_$gpu.json" \
                     > "$OUT/kernels_$gpu.txt" ;;
        decode) python3 decode_gpu.py $([ "${SKIP_COMPILED:-1}" = 1 ] && echo --skip-compiled) \
                    --json "$OUT/decode_$gpu.json" > "$OUT/decode_$gpu.txt" ;;
        longctx) python3 bound_ab.py ${ATTENTION_B:+--attention-b "$(cd .. && realpath "$ATTENTION_B")"} \
                     --json "$OUT/bound_ab_$gpu.json" > "$OUT/bound_ab_$gpu.txt" ;;
        ssm) python3 ssm_decode_gpu.py --json "$OUT/ssm_decode_$gpu.json" > "$OUT/ssm_decode_$gpu.txt" ;;
        envab) envab decode "${ENV_AB:-UNIQL_NARROW_SPLIT=deep UNIQL_EARLY_LOADS=0}" decode_gpu.py --batches ${ENVAB_BATCHES:-1} \
                   --skip-dense --skip-hf --skip-compiled ;;
        envabssm) envab ssm "${ENV_AB_SSM:-${ENV_AB:-UNIQL_NARROW_SPLIT=deep UNIQL_EARLY_LOADS=0}}" ssm_decode_gpu.py \
                      --models ${ENVAB_SSM_MODELS:-mamba2-8b-shape} --skip-hf ;;
        splits) python3 split_sweep.py --mamba --json "$OUT/split_sweep_$gpu.json" 2> "$OUT/split_sweep_$gpu.txt" ;;
        ksweep) python3 kernel_bench.py --quick --batches 4 16 --rates 0 --layers qkv o gate_up down --repeats 3 --sweep \
                    --sweep-batches 4 16 --prefill-m 0 --out "$OUT/kernels_smallbatch_sweep_$gpu.json" \
                    > "$OUT/kernels_smallbatch_sweep_$gpu.txt" 2>&1 ;;
        downsweep) timeout 420 python3 kernel_bench.py --layers down --rates 0 0.35 --batches 1 --prefill-m 0 --sweep \
                       --out "$OUT/kernels_down_sweep_$gpu.json" > "$OUT/kernels_down_sweep_$gpu.txt" 2>&1 ;;
        prunedsweep) timeout 420 python3 kernel_bench.py --models llama-3.1-8b --layers qkv o down --rates 0 0.35 \
                         --batches 1 --group-size 128 --prefill-m 0 --sweep --sweep-rates 0.35 \
                         --out "$OUT/kernels_pruned_sweep_$gpu.json" > "$OUT/kernels_pruned_sweep_$gpu.txt" 2>&1 ;;
        ssmprobe) python3 ssm_update_probe.py --json "$OUT/ssm_update_probe_$gpu.json" > "$OUT/ssm_update_probe_$gpu.txt" ;;
        floor) python3 gemv_floor.py --json "$OUT/gemv_floor_$gpu.json" > "$OUT/gemv_floor_$gpu.txt" ;;
        attnprobe) python3 attention_probe.py --json "$OUT/attention_probe_$gpu.json" > "$OUT/attention_probe_$gpu.txt" ;;
        # the persistent probes spin on each other's programs: a grid that did not fit would hang, so a time limit
        loop) timeout 420 python3 layer_loop_probe.py --json "$OUT/layer_loop_probe_$gpu.json" \
                  > "$OUT/layer_loop_probe_$gpu.txt" ;;
        short) { timeout 420 python3 short_path_probe.py --json "$OUT/short_path_probe_$gpu.json"
                 (cd .. && timeout 150 python3 -m pytest -q -p no:cacheprovider tests/benchmarks/test_short_path_probe.py)
               } > "$OUT/short_path_probe_$gpu.txt" 2>&1 ;;
        stagedtests) (cd .. && python3 -m pytest -q -p no:cacheprovider tests/kernels/test_int4_staged.py) \
                         > "$OUT/stagedtests_$gpu.txt" 2>&1 ;;
        staged) timeout 300 python3 staged_probe.py --json "$OUT/staged_probe_$gpu.json" > "$OUT/staged_probe_$gpu.txt" 2>&1 ;;
        chain) timeout 420 python3 persistent_probe.py --json "$OUT/persistent_probe_$gpu.json" > "$OUT/persistent_probe_$gpu.txt" ;;
        profile) for m in llama-3.1-8b mamba2-8b-shape; do
                     python3 profile_decode.py --model $m --rates 0,0.15,0.25,0.35 --json "$OUT/profile_${m}_$gpu.json"
                 done > "$OUT/profile_$gpu.txt" ;;
        prefill) python3 profile_prefill.py --json "$OUT/prefill_profile_$gpu.json" > "$OUT/prefill_profile_$gpu.txt" 2>&1 ;;
        prefillgraphs) python3 prefill_graphs.py --json "$OUT/prefill_graphs_$gpu.json" > "$OUT/prefill_graphs_$gpu.txt" 2>&1 ;;
        tests) (cd .. && python3 -m pytest -q --maxfail=25 -p no:cacheprovider tests/kernels) > "$OUT/tests_$gpu.txt" 2>&1 ;;
        tests1) (cd .. && python3 -m pytest -q --maxfail=25 -p no:cacheprovider tests/runtime/test_runner.py \
                     tests/runtime/test_ssm_graphs.py tests/runtime/test_graph_reset.py tests/runtime/test_ssm_folds.py) > "$OUT/tests1_$gpu.txt" 2>&1 ;;
        tests2) (cd .. && python3 -m pytest -q --maxfail=25 -p no:cacheprovider tests/test_pipeline_devices.py \
                     tests/server/test_serve_cuda.py tests/server/test_residency_engine.py tests/runtime/test_ssm_engine.py) \
                    > "$OUT/tests2_$gpu.txt" 2>&1 ;;
        *) echo "unknown step $step (ab, kernels, decode, ssm, envab, envabssm, splits, ksweep, downsweep, prunedsweep, ssmprobe, attnprobe, staged, stagedtests, chain, loop, short, floor, profile, prefill, prefillgraphs, tests, tests1, tests2)"; continue ;;
    esac
    echo "$step: exit $? after $((SECONDS - start)) s"
done
# a call returns a limited number of files: the A/B steps' per-run JSONs go back as one archive, which
# envab_summary.py reads as it is (their logs, *_envab_<gpu>.txt, stay beside it)
shopt -s nullglob
runs=("$OUT"/*_envab_*_[0-9]*_*.json)
if [ ${#runs[@]} -gt 0 ]; then
    tar czf "$OUT/envab_runs_$gpu.tgz" -C "$OUT" "${runs[@]##*/}" && rm -f "${runs[@]}"
fi
