#!/usr/bin/env bash
# Issue 15 (and 21) GPU check: Colossal-AI's Gemini and LowLevelZero (the seed's engine) on one GPU, against
# DeepSpeed ZeRO-2/3 with offload, our fsdp and the diffusers-default loop; the seed's 5.6 GB claim; the
# loss match against our single-process path; the seed's command and `colodiffusion train`, each resumed.
#
#   here, once:     bash bench/prepare_wheels.sh engines   (.whl/engines, ~56 MB: diffusers, omegaconf,
#                   Colossal-AI + galore-torch + bitsandbytes, DeepSpeed + pydantic + hjson; bench/wheels.py)
#   on the GPU:     device run: command "bash bench/engines_gpu.sh", carry [".whl/engines"], timeout_s 600
#   later calls:    EXTRA=1 bash bench/engines_gpu.sh      (cli-llz-2, llz-1, the seed's command)
#                   EXTRA=2 bash bench/engines_gpu.sh      (fsdp, gemini-cpu, gemini-auto)
#   anywhere:       bash bench/engines_gpu.sh --dry-run    (the plan, the wheels, every engines.py command line parsed)
#   CPU rehearsal:  bash bench/engines_gpu.sh --cpu        (see below)
#
# One call is at most BUDGET (530 s) from the start, wheel install included; the step limits add up to
# less (tests/test_gpu_scripts.py checks). Steps in order of value; a step whose wheels did not install
# (or whose kernels did not build) is skipped with one line, never run into import errors. Under $OUT,
# each result as soon as it exists (the device tool returns at most 8 files):
#   env.json       versions and the GPU             results.jsonl  every JSON line of bench/engines.py
#   steps.jsonl    each step: exit code, seconds    steps.log      all output, step by step
#   kernels.log    the HybridAdam kernel build      summary.md     the table, rewritten after every step
#
# Order. Colossal-AI's HybridAdam (Gemini's only optimizer) JIT-compiles two kernels on first use; that
# build starts in the background (nice 19) as soon as Colossal-AI is installed, while the steps that need
# no kernels run (a line measured while it still ran carries a "note" saying so). The first call, by value: the baseline,
# LowLevelZero stage 2, DeepSpeed ZeRO-2 and ZeRO-3 with offload, then (kernels built) Gemini with cpu
# placement and activation checkpointing at batch 1 (the seed's 5.6 GB claim), Gemini cuda, and the 50-step
# loss match (batch 8, lr 1e-4, bf16) of llz-2 and gemini-cuda against the single-process path.
# EXTRA=1: `colodiffusion train` with low_level_zero and its resume (while the kernels build), llz-1, then
# the seed's command with configs/train_colossalai.yaml (gemini) and its -r resume.
# EXTRA=2: fsdp, then gemini with cpu and auto placement.
#
# Knobs (environment): OUT, WHEELS, BUDGET, WORK (scratch of the seed steps, ~25 GB at most), STEPS="a b"
# (only those steps, from any part), PRESET, RESOLUTION, SEED_PLUGIN, CLI_PLUGIN, SEED_EXTRA.
# --cpu: the rehearsal without a GPU, the same code path (wheel handling, steps, order, files): tiny preset
# at 32 px, torch_ddp in place of gemini/low_level_zero for the seed steps (the CUDA-only engines record
# their one-sentence refusal), limits 3x.
set -u
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=bench/steps.sh
source bench/steps.sh  # the step runner; reads --dry-run, --cpu and EXTRA
OUT=${OUT:-$PWD/gpu_out_engines}
WHEELS=${WHEELS:-.whl/engines}
LOG=$OUT/steps.log R=$OUT/results.jsonl
if ((CPU)); then
  LIMIT_SCALE=3
  PRESET=${PRESET:-tiny} RESOLUTION=${RESOLUTION:-32} SEED_PLUGIN=${SEED_PLUGIN:-torch_ddp}
  CLI_PLUGIN=${CLI_PLUGIN:-torch_ddp}
  SEED_EXTRA=${SEED_EXTRA:-precision=32 trainer.accelerator=auto model.gradient_checkpointing=false data.num_workers=0}
else
  LIMIT_SCALE=1
  PRESET=${PRESET:-sd15} RESOLUTION=${RESOLUTION:-512} SEED_PLUGIN=${SEED_PLUGIN:-gemini}
  CLI_PLUGIN=${CLI_PLUGIN:-low_level_zero} SEED_EXTRA=${SEED_EXTRA:-}
fi
BUDGET=${BUDGET:-$((530 * LIMIT_SCALE))}
SETUP_S=45 FINISH_S=5
EP=(--preset "$PRESET")
TR=(python3 -m torch.distributed.run --standalone --nproc_per_node 1)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src TOKENIZERS_PARALLELISM=false

if ((DRY_RUN)); then
  echo "dry run (EXTRA=$PART): the plan; limits are the most each step may take"
  PLAN_MARK=bench/engines.py PLAN_ARGS=$(mktemp)
fi
steps_begin
WORK=${WORK:-$SCRATCH/work}
after_step() { python3 bench/engines_summary.py "$R" --steps-file "$OUT/steps.jsonl" --md "$OUT/summary.md" 2>> "$LOG"; }

# -- setup: the wheels, the kernel build, the machine ------------------------------------------------
install_needs engines "$WHEELS" core colossalai
if ((!DRY_RUN)) && [[ -z ${HAVE[core]:-} ]]; then
  record "{\"step\": \"install\", \"rc\": 1, \"error\": \"${WHY[core]}\"}"
  echo "stopped: no step can run without diffusers and omegaconf"
  exit 1
fi
SEED_KERNELS=$([[ $SEED_PLUGIN == gemini ]] && echo kernels)
NEEDS_KERNELS=0  # HybridAdam's kernels: built once into ~/.cache/colossalai, reused by every later step
for s in gemini-cpu-ckpt gemini-cuda gemini-cpu gemini-auto; do
  if want "$s" && { [[ -n ${STEPS:-} ]] || ((PART != 1)); }; then NEEDS_KERNELS=1; fi
done
if want seed-command && [[ -n $SEED_KERNELS ]] && in_part 1; then NEEDS_KERNELS=1; fi
if ((NEEDS_KERNELS)); then
  background kernels 240 "core colossalai" python3 bench/engines.py kernels --out "$R"
fi
install_needs engines "$WHEELS" deepspeed
if ((!DRY_RUN)); then
  python3 - > "$OUT/env.json" 2>> "$LOG" << 'EOF'
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
    except (OSError, IndexError):
        return None
env = {"event": "env", "torch": torch.__version__, "cuda": torch.version.cuda, "nvcc": nvcc(),
       "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
       **{n: version(n) for n in ("colossalai", "deepspeed", "diffusers", "transformers", "bitsandbytes", "galore-torch")}}
print(json.dumps(env))
EOF
  cat "$OUT/env.json" >> "$R"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv >> "$LOG" 2>&1
fi

speed() {  # speed STEP LIMIT NEEDS ENGINE [ARGS...]: one engine's img/s and peak memory at batch 1, 8, 32
  local name=$1 limit=$2 needs=$3 engine=$4 launch=("${TR[@]}")
  shift 4
  [[ $engine == diffusers-default ]] && launch=(python3)  # a plain process, as a diffusers user runs it
  step "$name" "$limit" "$needs" "${launch[@]}" bench/engines.py speed --engine "$engine" "${EP[@]}" --out "$R" "$@"
}

# -- the seed's command and `colodiffusion train`: functions, so that `step` can run them under timeout
tr1() { python3 -m torch.distributed.run --standalone --nproc_per_node 1 "$@"; }
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
  FIXTURE+=("parallel.colossalai.plugin=$SEED_PLUGIN")
  prepare_data &&
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
  tr1 -m colodiffusion train -c configs/train_colossalai.yaml "parallel.colossalai.plugin=$CLI_PLUGIN" parallel.zero=2 \
    "run.dir=$run" "${FIXTURE[@]}" train.max_steps=10 &&
    tr1 -m colodiffusion train -c configs/train_colossalai.yaml "parallel.colossalai.plugin=$CLI_PLUGIN" parallel.zero=2 \
      "run.dir=$run" "${FIXTURE[@]}" train.max_steps=15 train.resume=auto &&
    python3 bench/engines.py check-run "$run" --steps 15 --resumed-from 10 --name "cli-$CLI_PLUGIN" --out "$R"
}
export -f tr1 fixture_overrides prepare_data seed_command cli_llz
export WORK R PRESET RESOLUTION SEED_PLUGIN CLI_PLUGIN SEED_EXTRA

# -- the steps, by value ------------------------------------------------------------------------------
if in_part 0; then
  speed baseline 45 core diffusers-default
  speed llz-2 60 "core colossalai" llz-2
  speed ds-zero2-offload 75 "core deepspeed" ds-zero2-offload
  speed ds-zero3-offload 75 "core deepspeed" ds-zero3-offload
  await_job kernels
  speed gemini-cpu-ckpt 45 "core colossalai kernels" gemini-cpu-ckpt --batches 1  # the seed's 5.6 GB claim
  speed gemini-cuda 60 "core colossalai kernels" gemini-cuda
  LOSS=(llz-2) LOSS_NEEDS="core colossalai"
  if [[ -n ${HAVE[kernels]:-} ]]; then LOSS+=(gemini-cuda) LOSS_NEEDS+=" kernels"; fi
  step loss-match 90 "$LOSS_NEEDS" "${TR[@]}" bench/engines.py loss-match --engine "${LOSS[@]}" --steps 50 --batch 8 \
    "${EP[@]}" --out "$R" train.lr=1e-4
fi
if in_part 1; then
  step cli-llz-2 150 "core colossalai" bash -c cli_llz
  speed llz-1 60 "core colossalai" llz-1
  await_job kernels
  step seed-command 200 "core colossalai $SEED_KERNELS" bash -c seed_command
fi
if in_part 2; then
  speed fsdp 60 core fsdp
  await_job kernels
  speed gemini-cpu 90 "core colossalai kernels" gemini-cpu
  speed gemini-auto 60 "core colossalai kernels" gemini-auto
fi
steps_end

if ((DRY_RUN)); then
  echo "wheels in $WHEELS:"
  python3 bench/wheels.py plan engines | sed 's/^/  /'
  # the Python command lines inside seed_command and cli_llz
  echo "fixture --out x --results y" >> "$PLAN_ARGS"
  echo "check-run x --steps 15 --resumed-from 10 --name n --out y" >> "$PLAN_ARGS"
  python3 bench/engines.py check-args "$PLAN_ARGS"
  rc=$?
  rm -f "$PLAN_ARGS"
  exit $rc
fi
after_step
cat "$OUT/summary.md"
echo "results: $R (${SECONDS}s)"
