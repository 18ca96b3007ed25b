#!/usr/bin/env bash
# The performance issue's GPU check (issues 11 and 21): its headline figures in one device call of at most
# 9 minutes on one H100/H200, cold compile and the wheel install included.
#
#   here, once:     bash bench/prepare_wheels.sh gpu_check      (.whl/gpu_check, ~9.8 MB, ignored by git)
#   on the GPU:     device run: command "bash bench/gpu_check.sh", carry [".whl/gpu_check"], timeout_s 600
#   later calls:    EXTRA=1 bash bench/gpu_check.sh             (trainer vs bench, offload step)
#                   EXTRA=2 LEVERS="b64 cudagraphs" bash bench/gpu_check.sh     (the levers)
#   anywhere:       bash bench/gpu_check.sh --dry-run           (the plan: steps, limits, needs; runs nothing)
#   CPU rehearsal:  bash bench/gpu_check.sh --cpu               (see below)
#
# Steps run in order of value, each in its own process under its own limit, all under BUDGET (530 s from
# the start, install included; the limits add up to less, tests/test_gpu_scripts.py checks). Every bench
# line goes to $OUT/results.jsonl the moment it exists; after each step the summary table is rewritten
# ($OUT/summary.txt, bench/gpu_summary.py) and printed at the end.
#   speed_b32    the diffusers-default loop (same work: clip 1.0 + fp32 EMA) and configs/sd15_gpu.yaml in one
#                process, batch 32, fresh compile cache: ratio >= 1.6, >= 150 img/s, cold first step <= 150 s,
#                peak memory, host syncs
#   loss_match   50 steps of the recipe against the eager fp32-master path, batch 32, in a second process on
#                that cache: ok, and its first step is the warm-compile figure (<= 45 s)
#   memory       configs/sd15_memory.yaml at batch 1 and 8: peak incl. warm-up <= 6 GiB, > 0.71 img/s at batch 1
#   sdpa         each SDPA kernel on each attention shape: the SDPA= value for the sdpa lever
# EXTRA=1, a second call: recipe_b32 (the recipe alone, cold: this call's reference), trainer (`colodiffusion
#   train -c configs/sd15_gpu.yaml` from a synthetic latent cache, EMA on, on the warm cache: samples/s >=
#   95% of recipe_b32's img/s), offload (the offloaded optimizer step alone, sd15 size).
# EXTRA=2: recipe_b32, then each lever of LEVERS (b64 cudagraphs sdpa inductor nhwc_off fp8) in its own
#   process on the same compile cache (what the lever leaves unchanged compiles once), against recipe_b32 of
#   the same call; no baseline. sdpa needs SDPA="40:cudnn,80:flash,160:flash" from the first call's summary.
# STEPS="speed_b32 memory" runs only those steps (from any part). Files under $OUT (the device tool
# returns at most 8): env.json, results.jsonl, steps.jsonl, trainer_metrics.jsonl, log.txt, summary.txt,
# summary.json.
#
# --cpu: the rehearsal on a machine without a GPU. The same code path: the same wheel handling, steps,
# order and files, compile on (CPU Inductor); only the sizes differ (tiny preset at 32 px, batch 4, 5
# loss-match steps) and each limit is 4x (a CPU compiles slower).
set -u
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=bench/steps.sh
source bench/steps.sh  # the step runner; reads --dry-run, --cpu and EXTRA
LEVERS=${LEVERS:-b64 cudagraphs}
SDPA=${SDPA:-}
WHEELS=${WHEELS:-.whl/gpu_check}
OUT=${OUT:-$PWD/gpu_out}
LOG=$OUT/log.txt R=$OUT/results.jsonl
PRESET=sd15 BATCH=32 LOSS_STEPS=50 OFFLOAD_PARAMS=859.5e6 LIMIT_SCALE=1
XS=()  # overrides after the recipe's
if ((CPU)); then
  PRESET=tiny BATCH=4 LOSS_STEPS=5 OFFLOAD_PARAMS=2e6 LIMIT_SCALE=4
  XS=(model.preset=tiny data.resolution=32 data.num_workers=0)
fi
BUDGET=${BUDGET:-$((530 * LIMIT_SCALE))}
SETUP_S=30 FINISH_S=5
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src

for lever in $LEVERS; do
  case $lever in
    b64 | cudagraphs | sdpa | inductor | nhwc_off | fp8) ;;
    *) echo "unknown lever '$lever' in LEVERS; known: b64 cudagraphs sdpa inductor nhwc_off fp8" >&2; exit 2 ;;
  esac
done
if ((DRY_RUN)); then
  echo "dry run (EXTRA=$PART): the plan; limits are the most each step may take"
  PLAN_MARK=bench/train_step.py PLAN_ARGS=$(mktemp)
fi
steps_begin
BENCH_CACHE=$SCRATCH/compile_cache  # fresh: speed_b32's (or recipe_b32's) first step is a cold compile

# -- setup: the wheels (no diffusers, no step), the machine -------------------------------------------
install_needs gpu_check "$WHEELS" core
if in_part 2 && [[ " $LEVERS " == *" fp8 "* ]]; then install_needs gpu_check "$WHEELS" torchao; fi
if ((!DRY_RUN)); then
  if [[ -z ${HAVE[core]:-} ]]; then
    record "{\"step\": \"install\", \"rc\": 1, \"error\": \"${WHY[core]}\"}"
    echo "stopped: no step can run without diffusers and omegaconf"
    exit 1
  fi
  python3 - << 'EOF' > "$OUT/env.json" 2>> "$LOG"
import json, os, shutil, subprocess, torch, diffusers
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version",
                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else None
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "diffusers": diffusers.__version__,
                  "gpu": torch.cuda.get_device_name() if cuda else None,
                  "capability": torch.cuda.get_device_capability() if cuda else None, "nvidia_smi": smi,
                  "cpus": os.cpu_count()}))
EOF
  cat "$OUT/env.json"
fi
after_step() { python3 bench/gpu_summary.py "$OUT" > "$OUT/summary.txt" 2>> "$LOG"; }

bench_step() {  # bench_step NAME LIMIT ARGS...: bench/train_step.py, its lines tagged NAME
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" core python3 bench/train_step.py --tag "$name" --out "$R" "$@" "${XS[@]}"
}
recipe_b32() {
  bench_step recipe_b32 220 -c configs/sd15_gpu.yaml --batch "$BATCH" --warmup 3 --steps 12 perf.compile_cache="$BENCH_CACHE"
}

# The trainer for six log intervals (log_every=10) from a synthetic latent cache, then SIGKILL: no final
# checkpoint or export to wait for. metrics.jsonl is copied to $OUT as it grows.
trainer() {
  local cache=$SCRATCH/latents run=$SCRATCH/run pid n=0
  [[ -f $cache/manifest.json ]] || python3 bench/latent_cache.py --preset "$PRESET" --out "$cache" --samples 2048 || return 1
  python3 -m colodiffusion train -c configs/sd15_gpu.yaml data.path="$cache" run.dir="$run" train.max_steps=100000 \
    train.batch_size="$BATCH" train.log_every=10 train.checkpoint_every=0 train.sample_every=0 \
    perf.compile_cache="$BENCH_CACHE" "$@" &
  pid=$!
  while kill -0 "$pid" 2> /dev/null; do
    cp "$run/metrics.jsonl" "$OUT/trainer_metrics.jsonl" 2> /dev/null
    n=$(grep -c samples_per_s "$run/metrics.jsonl" 2> /dev/null)
    ((${n:-0} >= 6)) && break
    sleep 1
  done
  kill -9 "$pid" 2> /dev/null
  wait "$pid" 2> /dev/null
  cp "$run/metrics.jsonl" "$OUT/trainer_metrics.jsonl" 2> /dev/null
  ((${n:-0} >= 2))  # at least one interval after the compile's
}
export -f trainer
export OUT R SCRATCH BENCH_CACHE PRESET BATCH

lever() {  # lever NAME: the recipe with one lever, on this call's compile cache, no baseline
  local batch=$BATCH needs=core limit=110 over=()
  case $1 in
    b64) batch=$((BATCH * 2)) limit=150 ;;  # batch 64 compiles its own shapes
    cudagraphs) over=(perf.compile_mode=reduce-overhead) ;;
    inductor) over=(perf.conv_1x1_as_mm=true perf.coordinate_descent_tuning=true) ;;
    nhwc_off) over=(perf.channels_last=false) ;;
    fp8) over=(perf.fp8=true) needs="core torchao" ;;
    sdpa)
      if [[ -z $SDPA ]] && ((!DRY_RUN)); then
        want lever_sdpa && skip lever_sdpa "SDPA is unset: give the sdpa step's sdpa_by_head_dim (summary.txt)"
        return 0
      fi
      over=(perf.sdpa_by_head_dim="${SDPA:-40:flash,80:flash,160:flash}") ;;
  esac
  step "lever_$1" "$limit" "$needs" python3 bench/train_step.py --tag "lever_$1" --out "$R" -c configs/sd15_gpu.yaml \
    --batch "$batch" --warmup 3 --steps 12 perf.compile_cache="$BENCH_CACHE" "${XS[@]}" "${over[@]}"
}

# -- the steps, by value ------------------------------------------------------------------------------
if in_part 0; then
  bench_step speed_b32 220 -c configs/sd15_gpu.yaml --baseline --batch "$BATCH" --warmup 3 --steps 12 \
    perf.compile_cache="$BENCH_CACHE"
  bench_step loss_match 130 -c configs/sd15_gpu.yaml --batch "$BATCH" --loss-match "$LOSS_STEPS" \
    perf.compile_cache="$BENCH_CACHE"
  bench_step memory 90 -c configs/sd15_memory.yaml --memory --warmup 2 --steps 4
  step sdpa 40 core python3 bench/sdpa_shapes.py --preset "$PRESET" --batch "$BATCH" --out "$R"
fi
if in_part 1; then
  recipe_b32
  step trainer 130 core bash -c 'trainer "$@"' trainer "${XS[@]}"
  step offload 60 core python3 bench/offload_step.py --params "$OFFLOAD_PARAMS" --out "$R"
fi
if in_part 2; then
  recipe_b32
  for lever in $LEVERS; do lever "$lever"; done
fi
steps_end

if ((DRY_RUN)); then
  python3 - "$PLAN_ARGS" << 'EOF'
import shlex, sys
from colodiffusion.bench_args import build_parser
from colodiffusion.config import load_config
lines = [line for line in open(sys.argv[1]).read().splitlines() if line.strip()]
for line in lines:  # what the bench does with its arguments, short of running
    args = build_parser().parse_args(shlex.split(line))
    load_config(args.config, ["data.source=shapes", *args.overrides])
print(f"{len(lines)} bench command lines parse and load")
EOF
  rc=$?
  rm -f "$PLAN_ARGS"
  exit $rc
fi
after_step
cat "$OUT/summary.txt"
echo "results: $OUT (${SECONDS}s)"
