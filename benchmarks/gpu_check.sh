#!/usr/bin/env bash
# One prepared, unattended check of everything that needs a GPU on one H100: its stages' time limits add up to
# 8 minutes, and a stage that reaches its limit keeps what it measured:
#   1. the environment (python, torch, GPU), with carried wheels installed if the machine lacks packages;
#   2. the gpu-marked tests (tests/test_gpu.py: CUDA equals CPU, bf16, attention kernels, no host sync,
#      fused (compiled) equals plain in bf16, fp8 equals its emulation and tracks bf16);
#   3. kernels (issue #21): benchmarks/compile_speed.py on the ~1B preset (hidden 2048, 16 layers, seq 2048),
#      micro-batch 8: eager bf16 vs compiled bf16 (inductor's fused kernels) vs fp8 (compiled), MDLM and MemDLM,
#      recomputation none, selective and full: step times, speed-ups, mfu_model, MemDLM/MDLM, peak memory;
#   4. fp8 drift (issue #21): benchmarks/fp8_drift.py, 200 MemDLM steps (2 sequences each) of the ~1B shape in bf16
#      and in fp8 on the bundled corpus (both at once): the loss difference and the held-out losses;
#   with --all also (measured before, 2026-11-26): the default job for 100 steps in bf16, benchmarks/step_cost.py
#   (largest micro-batch), and long context (issue #22: step_cost at 16,384 and 32,768 tokens, long_context.py).
# Results go to OUT_DIR (default: $OUT, else ./gpu_check_out): results.json and results.md (every figure beside
# its target), check.log (every stage's output), gpu_tests*.xml, kernels.json, fp8_drift.json (and both runs'
# metrics), environment.json. Each stage has a time limit and keeps what it measured when it hits it.
# `--device cpu` runs the CPU-safe parts (the gpu tests skip; the small preset without fp8; the drift script on
# the default model in fp32 twice) in about 2 minutes.
#
# usage: benchmarks/gpu_check.sh [--device cuda|cpu] [--all] [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
ALL=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --all) ALL=1; shift ;;
        *) break ;;
    esac
done
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="${PYTHON:-python3}"; fi
# Packages the GPU machine lacks travel as wheels in .whl (see README, GPU check).
if [ -d .whl ] && ! $PY -c "import megatron.core, streaming, webdataset, torchao" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUT_DIR/check.log" 2>&1 || echo "wheel install failed (see check.log)"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
CACHE="${MEMDLM_CHECK_CACHE:-/tmp/memdlm-check-cache}"
started=$(date +%s)
LOG="$OUT_DIR/check.log"
stage() { echo "== $1 ($(($(date +%s) - started)) s)" | tee -a "$LOG"; }

stage "environment"
$PY - "$OUT_DIR/environment.json" >> "$LOG" 2>&1 <<'PY'
import json, platform, sys
import torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "platform": platform.platform()}
for name in ("megatron.core", "streaming", "webdataset", "torchao", "transformers", "deepspeed"):
    try:
        module = __import__(name, fromlist=["__version__"])
        info[name] = getattr(module, "__version__", "present")
    except Exception as err:
        info[name] = f"missing ({type(err).__name__})"
open(sys.argv[1], "w").write(json.dumps(info, indent=2))
PY
cat "$OUT_DIR/environment.json"

stage "gpu tests"
# Two calls, so the compiled (fused) and fp8 tests cannot starve the others of time; SIGINT on time-out makes
# pytest stop as on Ctrl-C and still write its XML.
timeout -s INT 60 $PY -m pytest -q -p no:xdist -p no:cacheprovider -m gpu -o addopts="" tests/test_gpu.py \
    -k "not fused and not fp8" --junitxml="$OUT_DIR/gpu_tests.xml" > "$OUT_DIR/stage.log" 2>&1
echo "exit $?" >> "$OUT_DIR/stage.log"
tail -3 "$OUT_DIR/stage.log"; cat "$OUT_DIR/stage.log" >> "$LOG"
timeout -s INT 80 $PY -m pytest -q -p no:xdist -p no:cacheprovider -m gpu -o addopts="" tests/test_gpu.py \
    -k "fused or fp8" --junitxml="$OUT_DIR/gpu_tests_kernels.xml" > "$OUT_DIR/stage.log" 2>&1
echo "exit $?" >> "$OUT_DIR/stage.log"
tail -3 "$OUT_DIR/stage.log"; cat "$OUT_DIR/stage.log" >> "$LOG"

stage "kernels: eager vs compiled vs fp8"
if [ "$DEVICE" = cuda ]; then KERNELS=(--device cuda --preset 1b --batch 8 --rounds 3 --warmup 1)
else KERNELS=(--device cpu --preset small --rounds 1 --warmup 1 --recompute none,selective); fi
timeout 180 $PY benchmarks/compile_speed.py "${KERNELS[@]}" --json "$OUT_DIR/kernels.json" 2>&1 \
    | grep -v -E "USDT|gpuGetDeviceCount" > "$OUT_DIR/stage.log"
echo "exit ${PIPESTATUS[0]}" >> "$OUT_DIR/stage.log"
tail -24 "$OUT_DIR/stage.log"; cat "$OUT_DIR/stage.log" >> "$LOG"; rm -f "$OUT_DIR/stage.log"

stage "fp8 drift"
if [ "$DEVICE" = cuda ]; then DRIFT=(--device cuda --steps 200 --batch 2)
else DRIFT=(--device cpu --small --precisions fp32,fp32 --steps 4 --eval-every 2); fi
timeout 170 $PY benchmarks/fp8_drift.py "${DRIFT[@]}" --out /tmp/memdlm-fp8-drift --cache "$CACHE" \
    --json "$OUT_DIR/fp8_drift.json" > "$OUT_DIR/stage.log" 2>&1
echo "exit $?" >> "$OUT_DIR/stage.log"
tail -4 "$OUT_DIR/stage.log"; cat "$OUT_DIR/stage.log" >> "$LOG"; rm -f "$OUT_DIR/stage.log"
tail -20 /tmp/memdlm-fp8-drift/*.log >> "$LOG" 2>/dev/null
rm -rf /tmp/memdlm-fp8-drift

if [ "$ALL" = 1 ]; then
stage "default job"
if [ "$DEVICE" = cuda ]; then JOB=(--train.steps 100 --train.device cuda --train.precision bf16 --logging.every 10)
else JOB=(--train.steps 5 --train.device cpu); fi
rm -rf "$OUT_DIR/default_job"
timeout 90 $PY -m launch.pretrain_cli "${JOB[@]}" --train.out_dir "$OUT_DIR/default_job" \
    --data.cache_dir "$CACHE" --logging.progress_bar false > "$OUT_DIR/stage.log" 2>&1
echo "exit $?" >> "$OUT_DIR/stage.log"
tail -3 "$OUT_DIR/stage.log"; cat "$OUT_DIR/stage.log" >> "$LOG"
cp "$OUT_DIR/default_job/metrics.jsonl" "$OUT_DIR/default_job_metrics.jsonl" 2>/dev/null
rm -rf "$OUT_DIR/default_job"

stage "step cost"
if [ "$DEVICE" = cuda ]; then COST=(--device cuda --preset 1b --rounds 6 --warmup 2 --memory-batch 2 --memory-rounds 2)
else COST=(--device cpu --preset small --rounds 2 --warmup 1 --memory-rounds 1); fi
timeout 180 $PY benchmarks/step_cost.py "${COST[@]}" --json "$OUT_DIR/step_cost.json" 2>&1 \
    | grep -v -E "USDT|gpuGetDeviceCount" > "$OUT_DIR/stage.log"
echo "exit ${PIPESTATUS[0]}" >> "$OUT_DIR/stage.log"
tail -22 "$OUT_DIR/stage.log"; cat "$OUT_DIR/stage.log" >> "$LOG"; rm -f "$OUT_DIR/stage.log"

stage "long context"
if [ "$DEVICE" = cuda ]; then
    for LENGTH in 16384 32768; do
        timeout 120 $PY benchmarks/step_cost.py --device cuda --preset 1b --seq-len "$LENGTH" --batch 1 \
            --recompute full --rounds 2 --warmup 1 --memory-batch 1 --memory-rounds 1 \
            --json "$OUT_DIR/long_context_$LENGTH.json" 2>&1 | grep -v -E "USDT|gpuGetDeviceCount" > "$OUT_DIR/stage.log"
        echo "exit ${PIPESTATUS[0]} (seq $LENGTH)" >> "$OUT_DIR/stage.log"
        tail -8 "$OUT_DIR/stage.log"; cat "$OUT_DIR/stage.log" >> "$LOG"
    done
    timeout 120 $PY benchmarks/long_context.py --device cuda --length 16384 --skip-longest > "$OUT_DIR/stage.log" 2>&1
else
    timeout 120 $PY benchmarks/long_context.py --device cpu --length 1024 --sizes 1,2 --skip-longest \
        > "$OUT_DIR/stage.log" 2>&1
fi
echo "exit $?" >> "$OUT_DIR/stage.log"
tail -8 "$OUT_DIR/stage.log"; cat "$OUT_DIR/stage.log" >> "$LOG"; rm -f "$OUT_DIR/stage.log"

fi

stage "report"
$PY benchmarks/gpu_report.py "$OUT_DIR"
stage "done"
