# shellcheck shell=bash
# The step runner both GPU scripts share: bench/gpu_check.sh and bench/engines_gpu.sh source it.
#
# A step is one command under its own time limit, all of them under one deadline: BUDGET seconds from
# the script's start, setup included. Each step's record goes to $OUT/steps.jsonl the moment it ends
# ({"step", "rc", "wall_s", "limit_s"}, or {"step", "skipped": why}), then after_step runs (the caller's:
# it rewrites the summary). A step names its needs: the wheel groups of bench/wheels.py it imports, or a
# background job (Colossal-AI's kernel build). A need that failed skips its steps with one line, so no
# step runs into minutes of import errors.
#
# Sourced first, with the script's arguments: --dry-run (DRY_RUN=1: print the plan, run nothing) and --cpu
# (CPU=1: the rehearsal), and EXTRA (PART: which call of several, 0, 1, ...). Then the caller sets OUT,
# LOG, BUDGET, SETUP_S and FINISH_S (the seconds reserved before the first step and after the last),
# LIMIT_SCALE (1; a CPU rehearsal gives its slower compiles more), STEPS ("a b": only those steps, from
# any part), and defines after_step; SCRATCH is a fresh folder for the run, removed at exit. A dry run
# prints each step as "  NAME (LIMITs) [needs: ...]: CMD"; tests/test_gpu_scripts.py adds the limits up
# against BUDGET.
# No variable a compiler or build tool reads is assigned here or in the scripts (that test parses them):
# the compile cache is BENCH_CACHE, never CC.

T0=$SECONDS
DRY_RUN=0 CPU=0
# shellcheck disable=SC2034  # CPU is read by the sourcing script
for arg; do  # the sourcing script's own arguments
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    --cpu) CPU=1 ;;
    *) echo "usage: bash $0 [--dry-run] [--cpu]" >&2; exit 2 ;;
  esac
done
PART=${EXTRA:-0}  # which call of the script's several
GRACE_S=10     # a step gets SIGTERM GRACE_S before its limit (torchrun passes it on to its workers), then SIGKILL
MIN_STEP_S=25  # a step with less time left than this is skipped
declare -A HAVE=() WHY=() JOB_PID=() JOB_T0=() RAN=()
SCRATCH=/tmp/colodiffusion_scratch.DRY  # steps_begin makes a fresh one; the dry run prints this name
SITE=$SCRATCH/site

# A string fit for a JSON value and one line.
oneline() {
  local s=${1//$'\n'/ }
  s=${s//$'\r'/ }
  s=${s//$'\t'/ }
  s=${s//\\//}
  s=${s//\"/\'}
  printf '%s' "${s:0:300}"
}
record() { echo "$1" >> "$OUT/steps.jsonl"; }
# STEPS="a b" picks steps from every part of the plan, each once.
want() { [[ -z ${RAN[$1]:-} ]] && [[ -z ${STEPS:-} || " $STEPS " == *" $1 "* ]]; }
in_part() { [[ -n ${STEPS:-} ]] || (($1 == PART)); }
left() { echo $((BUDGET - $(scaled "$FINISH_S") - (SECONDS - T0))); }  # the finish (summary) keeps its reserve
scaled() { echo $(($1 * LIMIT_SCALE)); }

skip() {  # skip NAME WHY
  local why
  why=$(oneline "$2")
  record "{\"step\": \"$1\", \"skipped\": \"$why\"}"
  echo "$1: skipped ($why)"
}

missing_need() {  # the first need in "$1" that is not there, with why; nothing if all are
  local n
  for n in $1; do
    if [[ -z ${HAVE[$n]:-} ]]; then
      echo "$n: ${WHY[$n]:-not set up}"
      return
    fi
  done
}

# planned NAME WHAT NEEDS CMD...: a dry run's line for a step; what follows PLAN_MARK (a program, e.g.
# bench/engines.py) in CMD goes to the file PLAN_ARGS, one line per command, for the caller to parse
# with that program's own parser.
planned() {
  local i
  echo "  $1 ($2) [needs: $3]: ${*:4}"
  shift 3
  [[ -n ${PLAN_MARK:-} ]] || return 0
  for ((i = 1; i <= $#; i++)); do
    if [[ ${!i} == "$PLAN_MARK" ]]; then
      printf '%q ' "${@:i+1}" >> "$PLAN_ARGS"
      echo >> "$PLAN_ARGS"
    fi
  done
}

steps_begin() {  # after OUT, LOG, BUDGET, SETUP_S, FINISH_S are set
  mkdir -p "$OUT"
  if ((DRY_RUN)); then
    echo "  [setup: $(scaled "$SETUP_S")s reserved]"
    return
  fi
  SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/colodiffusion_scratch.XXXXXX")  # wheels' installs, caches, runs
  SITE=$SCRATCH/site
  trap 'rm -rf "$SCRATCH"' EXIT
}

steps_end() {
  if ((DRY_RUN)); then
    echo "  [finish: $(scaled "$FINISH_S")s reserved]"
    echo "budget ${BUDGET}s"
  fi
}

# install_needs TARGET DIR NEED...: each need's wheels from DIR into its own folder under SITE, then
# imported once (bench/wheels.py install); the folders go on PYTHONPATH. A need that fails gets one
# line in WHY (and on the screen); its steps are skipped.
install_needs() {
  local target=$1 dir=$2 need said
  shift 2
  for need; do
    if ((DRY_RUN)); then
      echo "  install $need ($target wheels from $dir)"
      HAVE[$need]=1
      continue
    fi
    if said=$(python3 bench/wheels.py install "$target" "$need" --dir "$dir" --site "$SITE" 2>> "$LOG"); then
      echo "install $need: ${said:-imports without wheels}" >> "$LOG"
      HAVE[$need]=1
      [[ -n $said ]] && PYTHONPATH=$PYTHONPATH:$said
    else
      WHY[$need]=$(oneline "${said:-bench/wheels.py failed (see the log)}")
      echo "$need: ${WHY[$need]}" | tee -a "$LOG"
    fi
  done
}

# step NAME LIMIT NEEDS CMD...: CMD under min(LIMIT x LIMIT_SCALE, time left), its output in LOG, if
# every need in NEEDS ("core colossalai") is there.
step() {
  local name=$1 limit needs=$3 why remaining rc t
  limit=$(scaled "$2")
  shift 3
  want "$name" || return 0
  RAN[$name]=1
  if ((DRY_RUN)); then
    planned "$name" "${limit}s" "$needs" "$@"
    return 0
  fi
  why=$(missing_need "$needs")
  if [[ -n $why ]]; then
    skip "$name" "needs $why"
    return 0
  fi
  remaining=$(left)
  if ((remaining < MIN_STEP_S)); then
    skip "$name" "deadline: ${remaining}s left"
    return 0
  fi
  ((limit > remaining)) && limit=$remaining
  echo "=== $name (limit ${limit}s, t=$((SECONDS - T0))s): $*" >> "$LOG"
  beside
  t=$SECONDS
  timeout -k "$GRACE_S" "$((limit - GRACE_S))" "$@" >> "$LOG" 2>&1
  rc=$?
  record "{\"step\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - t)), \"limit_s\": $limit}"
  echo "$name: rc=$rc, $((SECONDS - t))s"
  after_step
}

# background NAME LIMIT NEEDS CMD...: start CMD now, niced, output in $OUT/NAME.log; the steps that
# need NAME come after `await_job NAME`.
background() {
  local name=$1 limit needs=$3 why
  limit=$(scaled "$2")
  shift 3
  if ((DRY_RUN)); then
    planned "$name" "${limit}s, background" "$needs" "$@"
    return 0
  fi
  why=$(missing_need "$needs")
  if [[ -n $why ]]; then
    WHY[$name]="needs $why"
    return 0
  fi
  JOB_T0[$name]=$SECONDS
  (
    timeout -k "$GRACE_S" "$((limit - GRACE_S))" nice -n 19 "$@" > "$OUT/$name.log" 2>&1
    echo "$? $((SECONDS - JOB_T0[$name]))" > "$OUT/$name.rc"  # exit code, seconds it ran
  ) &
  JOB_PID[$name]=$!
}

# The background jobs running now, for the step about to start (exported as STEP_BESIDE: a bench line
# measured beside a compile says so).
beside() {
  local name running=()
  for name in "${!JOB_PID[@]}"; do
    if [[ ! -s $OUT/$name.rc ]] && kill -0 "${JOB_PID[$name]}" 2> /dev/null; then running+=("$name"); fi
  done
  if ((${#running[@]})); then export STEP_BESIDE="${running[*]}"; else unset STEP_BESIDE; fi
}

await_job() {  # await_job NAME: wait for the background job; its exit code decides the need NAME
  local name=$1 rc wall t
  if ((DRY_RUN)); then
    echo "  await $name"
    HAVE[$name]=1
    return 0
  fi
  [[ -n ${JOB_PID[$name]:-} ]] || return 0  # never started: WHY says why
  t=$SECONDS
  wait "${JOB_PID[$name]}"
  unset "JOB_PID[$name]"  # a second await (another part's) finds HAVE or WHY already set
  read -r rc wall < "$OUT/$name.rc" 2> /dev/null
  rm -f "$OUT/$name.rc"
  rc=${rc:-1} wall=${wall:-$((SECONDS - JOB_T0[$name]))}
  record "{\"step\": \"$name\", \"rc\": $rc, \"wall_s\": $wall, \"waited_s\": $((SECONDS - t))}"
  echo "$name: rc=$rc, ${wall}s (waited $((SECONDS - t))s)"
  if ((rc == 0)); then
    HAVE[$name]=1
  else
    WHY[$name]="$name failed with exit code $rc ($name.log)"
  fi
}
