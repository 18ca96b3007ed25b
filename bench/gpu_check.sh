#!/usr/bin/env bash
# Issue 6 GPU check: the fast SD training step against the diffusers-default baseline, full-UNet memory at
# batch 1, and the fast path's loss against the eager fp32-master path. One command, ~8 minutes, JSON lines
# under $OUT (results.jsonl, one <step>.log per step, steps.jsonl with each step's exit code).
#
# The GPU machine has torch 2.11 + transformers (Python 3.12) but no diffusers/omegaconf and no internet, so
# the wheels travel in .whl/ (ignored by git). Prepare them once, in the repository root, where pip works:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 omegaconf==2.3.0 importlib_metadata torchao==0.17.0
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3     # sdist only on PyPI: build it here
# then run it on the GPU machine (device tool: carry=[".whl"], timeout_s=600):
#   bash bench/gpu_check.sh
# EXTRA=1 adds optional variants (fp8 linears, cuDNN attention, CUDA graphs, compile=full) after the targets.
#
# Targets (issue 6): >= 180 img/s at batch <= 64 and >= 2.0x the baseline in the same run; full sd15 UNet
# training at batch 1 with peak GPU memory <= 6 GiB; loss_match ok=true.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
if ! python3 -c "import diffusers, omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: prepare .whl/ as the header says" | tee "$OUT/steps.jsonl"; exit 1; }
  export PYTHONPATH=$PWD/src:/tmp/site
fi
python3 - <<'EOF' | tee "$OUT/env.json"
import json, torch, diffusers
print(json.dumps({"torch": torch.__version__, "diffusers": diffusers.__version__,
                  "gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability()}))
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv >> "$OUT/env.json" 2>&1

# step NAME SECONDS ARGS...: one bench run under its own time limit; failures are recorded, the script goes on.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" python3 bench/train_step.py --out "$OUT/results.jsonl" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - t0)), \"args\": \"$*\"}" | tee -a "$OUT/steps.jsonl"
  tail -n 3 "$OUT/$name.log"
}

# 1. Speed at batch 32: baseline and fast path in one process (the ratio is only meaningful there).
step speed_b32 190 --batch 32 --baseline --fast --warmup 3 --steps 12
# 2. Memory: full sd15 UNet training, bf16 weights + CPU-offloaded fp32 masters/AdamW + checkpointing, batch 1 and 8.
step memory 100 --memory --warmup 2 --steps 3 perf.param_dtype=bf16 perf.optimizer_offload=true \
  perf.activation_checkpointing=full
# 3. Loss: 50 steps of the fast path against the eager fp32-master path (same data, noise, timesteps).
step loss_match 110 --batch 8 --loss-match 50 --fast train.lr=1e-4
# 4. Speed at batch 64 (fast path only: the fp32 baseline does not fit at 64 on an 80 GB card).
step speed_b64 90 --batch 64 --fast --warmup 3 --steps 8

if [ "${EXTRA:-0}" = 1 ]; then
  step fp8_b64 150 --batch 64 --fast --warmup 3 --steps 8 perf.fp8=true
  step cudnn_b64 120 --batch 64 --fast --warmup 3 --steps 8 perf.sdpa_backend=cudnn
  step cudagraphs_b64 200 --batch 64 --fast --warmup 3 --steps 8 perf.compile_mode=reduce-overhead
  step full_compile_b64 240 --batch 64 --fast --warmup 3 --steps 8 perf.compile=full
  step memory_8bit 120 --memory --warmup 2 --steps 3 perf.optimizer=adamw8bit perf.activation_checkpointing=full
fi
echo "results: $OUT/results.jsonl"
