#!/usr/bin/env bash
# One prepared, unattended check of everything that needs a GPU (at most about 8 minutes on one H100):
#   1. the environment (python, torch, GPU), with carried wheels installed if the machine lacks packages;
#   2. the gpu-marked tests (tests/test_gpu.py);
#   3. the default job for 100 steps on CUDA in bf16;
#   4. benchmarks/step_cost.py on a ~1B Llama-shaped model (hidden 2048, 16 layers, seq 2048, bf16,
#      recomputation, the largest micro-batch that fits): MemDLM/MDLM time ratio, mfu_model, tokens/s,
#      peak memory with memory on and off;
#   5. benchmarks/compile_speed.py on the same model: compiled (--train.compile) against eager;
#   6. long context (issue #22): step_cost.py on the ~1B model at 16,384 and 32,768 tokens, one sequence, full
#      recomputation (MFU, peak memory; a length that does not fit says so), and benchmarks/long_context.py at
#      S = 1, 2, 4 sequence-parallel ranks when the machine has that many GPUs.
# Results go to OUT_DIR (default: $OUT, else ./gpu_check_out): results.json and results.md, check.log (every
# stage's output), gpu_tests.xml, default_job_metrics.jsonl, step_cost.json, environment.json. `--device cpu` runs the CPU-safe parts (the gpu tests skip; a short default job; the
# small step_cost preset) in under 2 minutes.
#
# usage: benchmarks/gpu_check.sh [--device cuda|cpu] [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE="$2"; shift 2; fi
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="${PYTHON:-python3}"; fi
# Packages the GPU machine lacks travel as wheels in .whl (see README, GPU check).
if [ -d .whl ] && ! $PY -c "import megatron.core, streaming, webdataset" 2>/dev/null; then
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
for name in ("megatron.core", "streaming", "webdataset", "transformers", "deepspeed"):
    try:
        module = __import__(name, fromlist=["__version__"])
        info[name] = getattr(module, "__version__", "present")
    except Exception as err:
        info[name] = f"missing ({type(err).__name__})"
open(sys.argv[1], "w").write(json.dumps(info, indent=2))
PY
cat "$OUT_DIR/environment.json"

stage "gpu tests"
timeout 180 $PY -m pytest -q -p no:xdist -p no:cacheprovider -m gpu -o addopts="" tests/test_gpu.py \
    --junitxml="$OUT_DIR/gpu_tests.xml" > "$OUT_DIR/stage.log" 2>&1
echo "exit $?" >> "$OUT_DIR/stage.log"
tail -5 "$OUT_DIR/stage.log"; cat "$OUT_DIR/stage.log" >> "$LOG"

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

stage "compiled vs eager"
# --train.compile's regional compilation on the same model as step_cost (issue #21: MDLM mfu_model and the
# MemDLM/MDLM ratio, compiled). Its figures are printed into check.log; gpu_report.py does not parse them yet.
if [ "$DEVICE" = cuda ]; then COMPILED=(--device cuda --preset 1b --batch 8 --rounds 4)
else COMPILED=(--device cpu --preset small --rounds 2); fi
timeout 240 $PY benchmarks/compile_speed.py "${COMPILED[@]}" 2>&1 | grep -v -E "USDT|gpuGetDeviceCount" \
    > "$OUT_DIR/stage.log"
echo "exit ${PIPESTATUS[0]}" >> "$OUT_DIR/stage.log"
tail -10 "$OUT_DIR/stage.log"; cat "$OUT_DIR/stage.log" >> "$LOG"; rm -f "$OUT_DIR/stage.log"

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

stage "report"
$PY benchmarks/gpu_report.py "$OUT_DIR"
stage "done"
