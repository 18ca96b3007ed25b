#!/usr/bin/env bash
# Issue 15 GPU check: Colossal-AI's Gemini and LowLevelZero (the seed's engine) on one GPU, against our
# fsdp, DeepSpeed ZeRO-2/3 with offload and the diffusers-default loop; loss match against our
# single-process path; the seed's command with configs/train_colossalai.yaml, and its resume.
# One command, under 9 minutes on an H100 (BUDGET seconds; steps that no longer fit are skipped and
# recorded). Under $OUT, each result as soon as it exists (the device tool returns at most 8 files):
#   env.json       versions and the GPU             results.jsonl  every JSON line of bench/engines.py
#   steps.jsonl    each step: exit code, seconds    steps.log      all output, step by step
#   kernels.log    the HybridAdam kernel build      summary.md     the table, rewritten after every step
#
# Wheels. The GPU image has torch 2.11, transformers, peft, triton, accelerate; not diffusers, omegaconf,
# Colossal-AI (sdist only, pins torch<=2.5.1: installed with --no-deps), its imports galore-torch and
# bitsandbytes (colossalai.nn.optimizer imports both), or DeepSpeed and its pydantic/hjson. Prepare them
# once, in the repository root, where pip works (about 56 MB, 43 of it bitsandbytes; the device tool
# carries at most 64 MiB with the tree, so carry only this folder):
#   W=.whl/engines; mkdir -p $W
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d $W diffusers==0.42.1 omegaconf==2.3.0 galore-torch==1.0 \
#     bitsandbytes==0.50.2 hjson==3.1.0 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 \
#     typing-inspection==0.4.2 typing_extensions==4.16.0
#   python3 -m pip wheel --no-deps -w $W antlr4-python3-runtime==4.9.3        # omegaconf's; sdist only
#   python3 -m pip wheel --no-deps --no-build-isolation -w $W colossalai==0.5.0  # sdist only; BUILD_EXT unset:
#                                                                             # pure Python, kernels JIT-built there
#   DS_BUILD_OPS=0 python3 -m pip wheel --no-deps --no-build-isolation -w $W deepspeed==0.19.8
# Then, on the GPU machine (device tool: carry=[".whl/engines"], timeout_s=600):
#   bash bench/engines_gpu.sh
# Anywhere, without a GPU: `bash bench/engines_gpu.sh --dry-run` prints the plan with each step's time
# limit, checks the wheels and parses every bench/engines.py command line.
#
# Order. Colossal-AI's HybridAdam (Gemini's only optimizer) JIT-compiles two kernels on first use; that
# build starts first, in the background (niced, MAX_JOBS=6), while LowLevelZero (torch's AdamW, no
# kernels) and our fsdp are measured; their lines carry a "note" saying so. Then, by value: the
# baseline, Gemini with cuda and cpu placement, the 50-step loss match (batch 8, lr 1e-4, bf16) of
# llz-2 and gemini-cuda against the single-process path, the seed's command and resume (gemini), DeepSpeed ZeRO-2/3 with offload,
# gemini auto placement, the seed's 5.6 GB claim (gemini cpu + activation checkpointing at batch 1),
# `colodiffusion train` with low_level_zero and resume. Estimated ~9-11 minutes if every step ran its
# course: the budget skips the tail, which is why it is the tail.
#
# Knobs (environment): OUT, WHEELS, BUDGET (530 s), WORK (scratch, ~25 GB at most), STEPS="a b" (run only
# these steps, e.g. to redo one). For a CPU rehearsal of the seed-command and cli-llz-2 steps (the test
# suite runs one): PRESET=tiny RESOLUTION=32 SEED_PLUGIN=torch_ddp CLI_PLUGIN=torch_ddp
# SEED_EXTRA="precision=32 trainer.accelerator=auto ...".
set -u
cd "$(dirname "$0")/.." || exit 1
DRY_RUN=0
[[ ${1:-} == --dry-run ]] && DRY_RUN=1
OUT=${OUT:-$PWD/gpu_out_engines}
WHEELS=${WHEELS:-.whl/engines}
BUDGET=${BUDGET:-530}       # seconds for the whole script
MIN_STEP_S=${MIN_STEP_S:-25} # a step with less left than this is skipped
WORK=${WORK:-/tmp/engines_work}
STEPS=${STEPS:-}
PRESET=${PRESET:-sd15} RESOLUTION=${RESOLUTION:-512}
SEED_PLUGIN=${SEED_PLUGIN:-gemini} CLI_PLUGIN=${CLI_PLUGIN:-low_level_zero} SEED_EXTRA=${SEED_EXTRA:-}
R=$OUT/results.jsonl
TR=(torchrun --standalone --nproc_per_node 1)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
if (( DRY_RUN )); then
  ARGS_FILE=$(mktemp)
  echo "dry run: the plan (limits are the most each step may take; BUDGET=${BUDGET}s in all)"
fi

record() { echo "$1" >> "$OUT/steps.jsonl"; }
want() { [[ -z $STEPS || " $STEPS " == *" $1 "* ]]; }
summarize() { python3 bench/engines_summary.py "$R" --steps-file "$OUT/steps.jsonl" --md "$OUT/summary.md" 2>> "$OUT/steps.log"; }

# step NAME LIMIT CMD...: one step under its own time limit (cut to what the budget has left);
# a failure is recorded and the script goes on.
step() {
  local name=$1 limit=$2; shift 2
  want "$name" || return 0
  local left=$((BUDGET - SECONDS))
  if (( DRY_RUN )); then
    echo "  $name (${limit}s): $*"
    local i
    for ((i = 1; i <= $#; i++)); do
      if [[ ${!i} == bench/engines.py ]]; then printf '%q ' "${@:i+1}" >> "$ARGS_FILE"; echo >> "$ARGS_FILE"; fi
    done
    return 0
  fi
  if (( left < MIN_STEP_S )); then
    record "{\"step\": \"$name\", \"skipped\": \"budget: ${left}s left\"}"
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s, t=${SECONDS}s): $*" >> "$OUT/steps.log"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/steps.log" 2>&1
  local rc=$?
  record "{\"step\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - t0)), \"limit_s\": $limit}"
  summarize
  echo "$name: rc=$rc, $((SECONDS - t0))s"
}

# -- setup ----------------------------------------------------------------------------------------
if (( ! DRY_RUN )); then
  if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHEELS"/*.whl >> "$OUT/steps.log" 2>&1 || echo "wheel install failed (see steps.log)" | tee -a "$OUT/steps.log"
    export PYTHONPATH=$PWD/src:/tmp/site
  else
    echo "no wheels in $WHEELS: prepare them as the header says; going on with what is installed" | tee -a "$OUT/steps.log"
  fi
  python3 - > "$OUT/env.json" 2>> "$OUT/steps.log" <<'EOF'
import json, subprocess
from importlib import metadata
import torch
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
def nvcc():
    try:
        return subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except OSError:
        return None
env = {"event": "env", "torch": torch.__version__, "cuda": torch.version.cuda, "nvcc": nvcc(),
       "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
       **{n: version(n) for n in ("colossalai", "deepspeed", "diffusers", "transformers", "bitsandbytes", "galore-torch")}}
print(json.dumps(env))
EOF
  cat "$OUT/env.json" >> "$R"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv >> "$OUT/steps.log" 2>&1
fi
NEEDS_KERNELS=0  # Gemini's HybridAdam kernels: built once into ~/.cache/colossalai, reused by every later step
for s in gemini-cuda gemini-cpu gemini-auto gemini-cpu-ckpt loss-match; do want "$s" && NEEDS_KERNELS=1; done
want seed-command && [[ $SEED_PLUGIN == gemini ]] && NEEDS_KERNELS=1
if (( ! DRY_RUN && NEEDS_KERNELS )); then
  (MAX_JOBS=6 timeout 300 nice -n 19 python3 bench/engines.py kernels --out "$R" > "$OUT/kernels.log" 2>&1
   echo $? > "$OUT/kernels.rc") &
  KERNELS=$!
  export ENGINES_NOTE="kernel build running beside this step"
fi

# -- while the kernels build: LowLevelZero (ZeRO-1/2 with torch's AdamW) and our fsdp ----------------
step llz-2 75 "${TR[@]}" bench/engines.py speed --engine llz-2 --out "$R"
step llz-1 75 "${TR[@]}" bench/engines.py speed --engine llz-1 --out "$R"
step fsdp 75 "${TR[@]}" bench/engines.py speed --engine fsdp --out "$R"

if (( ! DRY_RUN && NEEDS_KERNELS )); then
  t0=$SECONDS
  wait "$KERNELS"
  unset ENGINES_NOTE
  KRC=$(cat "$OUT/kernels.rc" 2>/dev/null || echo 1)
  record "{\"step\": \"kernels\", \"rc\": $KRC, \"waited_s\": $((SECONDS - t0))}"
  rm -f "$OUT/kernels.rc"
elif (( DRY_RUN )); then
  echo "  kernels (300s, in the background from the start): python3 bench/engines.py kernels"
  echo "kernels --out x" >> "$ARGS_FILE"
  KRC=0
else
  KRC=0
fi
GEMINI_OK=$([[ $KRC == 0 ]] && echo 1 || echo 0)
if (( ! GEMINI_OK )); then
  for s in gemini-cuda gemini-cpu gemini-auto gemini-cpu-ckpt; do
    want "$s" && record "{\"step\": \"$s\", \"skipped\": \"HybridAdam kernels did not build (kernels.log)\"}"
  done
fi

# -- the table and the loss match ------------------------------------------------------------------
step baseline 60 python3 bench/engines.py speed --engine diffusers-default --out "$R"
(( GEMINI_OK )) && step gemini-cuda 75 "${TR[@]}" bench/engines.py speed --engine gemini-cuda --out "$R"
(( GEMINI_OK )) && step gemini-cpu 120 "${TR[@]}" bench/engines.py speed --engine gemini-cpu --out "$R"
LOSS=(llz-2)
(( GEMINI_OK )) && LOSS+=(gemini-cuda)
step loss-match 100 "${TR[@]}" bench/engines.py loss-match --engine "${LOSS[@]}" --steps 50 --batch 8 --out "$R" train.lr=1e-4

# -- the seed's command: sd15 from a latent cache with the recipe, then its resume ------------------
# (functions, so that `step` can run them under `timeout bash -c NAME`)
tr1() { torchrun --standalone --nproc_per_node 1 "$@"; }
fixture_overrides() {
  local extra
  read -r -a extra <<< "$SEED_EXTRA"
  FIXTURE=(trainer.devices=1 "model.preset=$PRESET" "data.resolution=$RESOLUTION" "model.pretrained=$WORK/model"
           "data.path=$WORK/cache" train.batch_size=8 train.max_epochs=0 train.sample_every=0 train.log_every=5
           train.checkpoint_every=0 "${extra[@]}")
}
prepare_data() {  # random-weight model folder of the preset (no download) and a 64-image latent cache
  rm -rf "$WORK" && mkdir -p "$WORK" &&
  python3 bench/engines.py fixture --preset "$PRESET" --out "$WORK/model" --results "$R" &&
  python3 -m colodiffusion cache --out "$WORK/cache" --batch-size 16 "model.preset=$PRESET" "model.pretrained=$WORK/model" \
    data.source=shapes "data.resolution=$RESOLUTION" data.num_samples=64 "run.dir=$WORK/cache_run"
}
seed_command() {  # the seed's line with the recipe (gemini, fp16), 10 steps; then -r to 15
  fixture_overrides
  prepare_data &&
  FIXTURE+=("parallel.plugin=$SEED_PLUGIN")
  python3 main.py --logdir "$WORK/logs" -t --postfix gpu -b configs/train_colossalai.yaml "${FIXTURE[@]}" train.max_steps=10 &&
  local run && run=$(ls -d "$WORK"/logs/*_train_colossalai_gpu) &&
  python3 main.py -t -r "$run" -b configs/train_colossalai.yaml "${FIXTURE[@]}" train.max_steps=15 &&
  python3 bench/engines.py check-run "$run" --steps 15 --resumed-from 10 --name "seed-command-$SEED_PLUGIN" --out "$R"
  local rc=$?
  rm -rf "$WORK/logs"  # ~10 GB a checkpoint: the disk holds 64 GB
  return $rc
}
cli_llz() {  # `colodiffusion train` with the recipe on low_level_zero stage 2, 10 steps; then resume to 15
  fixture_overrides
  [[ -d $WORK/cache ]] || prepare_data || return 1
  local run=$WORK/cli_llz
  tr1 -m colodiffusion train -c configs/train_colossalai.yaml "parallel.plugin=$CLI_PLUGIN" parallel.zero=2 \
    "run.dir=$run" "${FIXTURE[@]}" train.max_steps=10 &&
  tr1 -m colodiffusion train -c configs/train_colossalai.yaml "parallel.plugin=$CLI_PLUGIN" parallel.zero=2 \
    "run.dir=$run" "${FIXTURE[@]}" train.max_steps=15 train.resume=auto &&
  python3 bench/engines.py check-run "$run" --steps 15 --resumed-from 10 --name "cli-$CLI_PLUGIN" --out "$R"
}
export -f tr1 fixture_overrides prepare_data seed_command cli_llz
export WORK R PRESET RESOLUTION SEED_PLUGIN CLI_PLUGIN SEED_EXTRA
if [[ $SEED_PLUGIN != gemini ]] || (( GEMINI_OK )); then
  step seed-command 200 bash -c seed_command
else
  want seed-command && record '{"step": "seed-command", "skipped": "HybridAdam kernels did not build (kernels.log)"}'
fi

# -- DeepSpeed, the rest ---------------------------------------------------------------------------
step ds-zero2-offload 120 "${TR[@]}" bench/engines.py speed --engine ds-zero2-offload --out "$R"
step ds-zero3-offload 120 "${TR[@]}" bench/engines.py speed --engine ds-zero3-offload --out "$R"
(( GEMINI_OK )) && step gemini-auto 75 "${TR[@]}" bench/engines.py speed --engine gemini-auto --out "$R"
(( GEMINI_OK )) && step gemini-cpu-ckpt 60 "${TR[@]}" bench/engines.py speed --engine gemini-cpu-ckpt --batches 1 --out "$R"
step cli-llz-2 150 bash -c cli_llz

if (( DRY_RUN )); then
  echo "wheels in $WHEELS:"
  if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    du -ch "$WHEELS"/*.whl | sed 's/^/  /'
  else
    echo "  none: prepare them as the header says"
  fi
  # the Python command lines inside seed_command and cli_llz
  echo "fixture --out x --results y" >> "$ARGS_FILE"
  echo "check-run x --steps 15 --resumed-from 10 --name n --out y" >> "$ARGS_FILE"
  python3 bench/engines.py check-args "$ARGS_FILE"
  rc=$?
  rm -f "$ARGS_FILE"
  exit $rc
fi
summarize
cat "$OUT/summary.md"
echo "results: $R (${SECONDS}s)"
