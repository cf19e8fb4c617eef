#!/usr/bin/env bash
# Long, low-priority, resumable CPU pre-training weighted to camera shake (issue #11, part 3):
# the project's own stages (ingest -> synthesize -> train) with configs/pretrain-cpu-shake.yaml,
# continuing from checkpoints/pretrained/nafnet16.pt, on 1 thread at nice 19.
#
#   scripts/fetch_pretrain_photos.sh data/pretrain_photos   # once: the photo folder the profile ingests
#   scripts/cpu_pretrain_shake.sh bg       # start or resume in the background (nohup), log: data/pretrain_shake/train.log
#   scripts/cpu_pretrain_shake.sh status   # alive?, last progress line, last validation
#   scripts/cpu_pretrain_shake.sh stop     # SIGTERM: the trainer ends the step, writes last.pt; then `save` runs
#   scripts/cpu_pretrain_shake.sh save     # copy last.pt / best.pt to checkpoints/cpu-shake/ (git ignores it: keep it on disk or `dvc add` + `dvc push` it)
#   scripts/cpu_pretrain_shake.sh [run]    # the same as bg, in the foreground
#
# Everything it writes lives in data/pretrain_shake/ (WORK): ingested/, pairs/, checkpoints/, train.log,
# train_curve.csv and train_run.json (at the end of the schedule), code/ (see below). Ingest and
# synthesize are skipped when their output exists and was made with the same params (a stamp file
# beside each). Resume: the trainer continues from WORK/checkpoints/last.pt when its params digest
# matches; when WORK has no last.pt, checkpoints/cpu-shake/last.pt (saved earlier on this machine, or `dvc pull`ed) (and best.pt) is
# copied in first, so a fresh clone resumes too. `save` refuses to replace a saved checkpoint with
# one of an earlier step (a run that started fresh) unless FORCE=1.
#
# Code: the run imports a snapshot of the committed src/, pipelines/, params.yaml and configs/
# (git archive HEAD, or CODE_COMMIT, taken on the first start into WORK/code/ and reused on every
# resume), not the working tree, so a run of hours or days neither breaks nor changes behaviour while
# others edit the source or params.yaml; the profile (PARAMS) is copied in afresh on every start.
# The trainer's resume check covers params, not code, so resume a committed last.pt with the commit
# it was trained with (CODE_COMMIT=<the COMMIT that `save` prints>). CODE=. runs the working tree
# instead; delete WORK/code to take a new snapshot.
#
# Environment: PARAMS (profile), WORK, KEEP (checkpoints/cpu-shake), CODE, CODE_COMMIT, PYTHON (.venv/bin/python),
# MAX_MB (25), FORCE, MLFLOW_TRACKING_URI (default: sqlite:///mlflow.db in the repo root).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
params=${PARAMS:-configs/pretrain-cpu-shake.yaml}
work=${WORK:-data/pretrain_shake}
keep=${KEEP:-checkpoints/cpu-shake}
py=${PYTHON:-$root/.venv/bin/python}
max_bytes=$(( ${MAX_MB:-25} * 1024 * 1024 ))
ckpt=$work/checkpoints
log=$work/train.log

say() { echo "[cpu-shake $(date '+%F %T')] $*"; }

code_dir() { if [[ -n ${CODE:-} ]]; then echo "$CODE"; else echo "$work/code"; fi; }

snapshot_code() {
  if [[ -n ${CODE:-} ]]; then prof=$params; return 0; fi
  if [[ ! -f $work/code/COMMIT ]]; then
    local commit; commit=$(git rev-parse "${CODE_COMMIT:-HEAD}")
    rm -rf "$work/code" && mkdir -p "$work/code"
    git archive "$commit" src pipelines params.yaml configs | tar -x -C "$work/code"
    echo "$commit" > "$work/code/COMMIT"
    say "code and params.yaml: snapshot of commit $commit in $work/code"
  fi
  # the profile itself is read afresh from the working tree on every start (over the snapshot's base files)
  cp configs/pretrain-cpu-shake.yaml "$work/code/configs/"
  [[ $(realpath "$params") == $(realpath configs/pretrain-cpu-shake.yaml) ]] || cp "$params" "$work/code/configs/"
  prof=$work/code/configs/$(basename "$params")
}

pyrun() { PYTHONPATH="$(code_dir)/src" "$py" "$@"; }

# digest of some sections of the resolved profile (what an ingest or synthesize output depends on)
params_digest() {
  pyrun - "$prof" "$@" <<'PY'
import hashlib, json, sys
from deblur.core.config import load_params
dump = load_params(sys.argv[1]).model_dump(mode="json", by_alias=True)
print(hashlib.sha256(json.dumps({k: dump[k] for k in sys.argv[2:]}, sort_keys=True).encode()).hexdigest()[:12])
PY
}

# "step=N best_psnr=X best_step=M" of a checkpoint
ckpt_info() {
  "$py" - "$1" <<'PY'
import sys, torch
c = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
print(f"step={int(c.get('step', -1))} best_psnr={float(c.get('best_psnr', float('nan'))):.3f} "
      f"best_step={c.get('best_step')} digest={c.get('params_digest')}")
PY
}
ckpt_step() { ckpt_info "$1" | sed -E 's/^step=(-?[0-9]+).*/\1/'; }

copy_ckpt() {  # copy_ckpt SRC DST: atomic, size-capped, never to an earlier step unless FORCE=1
  local src=$1 dst=$2 size new old
  if [[ ! -f $src ]]; then say "no $src: nothing to save"; return 0; fi
  size=$(stat -c %s "$src")
  if (( size > max_bytes )) && [[ $(basename "$src") == last.pt ]]; then
    compact "$src" "$work/last.compact.pt"
    src=$work/last.compact.pt; size=$(stat -c %s "$src")
  fi
  if (( size > max_bytes )); then
    say "$src is $(( size / 1024 / 1024 )) MB, over ${MAX_MB:-25} MB: not copied to $dst"; return 0
  fi
  new=$(ckpt_step "$src")
  if [[ -f $dst && -z ${FORCE:-} ]]; then
    old=$(ckpt_step "$dst")
    if (( new < old )); then
      say "not replacing $dst (step $old) with $src (step $new): an earlier step, FORCE=1 to do it anyway"; return 0
    fi
  fi
  mkdir -p "$(dirname "$dst")"
  cp "$src" "$dst.tmp.$$" && mv -f "$dst.tmp.$$" "$dst"
  say "saved $src -> $dst (code: $(cat "$work/code/COMMIT" 2>/dev/null || echo "${CODE:-?}"))"
  say "   ($(( size / 1024 )) KiB, $(ckpt_info "$dst"))"
}

# A last.pt over MAX_MB (a larger model) is committed compact: Adam's moments in bf16 (torch casts
# them back to fp32 on load; relative error ~0.4 %) and without the copy of the best checkpoint,
# which best.pt holds anyway. Resuming from it continues the same schedule, step and RNG state.
compact() {
  "$py" - "$1" "$2" <<'PY'
import sys, torch
c = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
c.pop("best_checkpoint", None)
for state in c["optimizer"]["state"].values():
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key] = state[key].to(torch.bfloat16)
torch.save(c, sys.argv[2])
PY
  say "$1 is over ${MAX_MB:-25} MB: compacted to $2 ($(( $(stat -c %s "$2") / 1024 / 1024 )) MB)"
}

ckpt_digest() { ckpt_info "$1" | sed -E 's/.*digest=//'; }

save() {
  copy_ckpt "$ckpt/last.pt" "$keep/last.pt"
  # a run that started fresh (other params) leaves the old run's best.pt until its first validation
  if [[ -f $ckpt/best.pt && -f $ckpt/last.pt && $(ckpt_digest "$ckpt/best.pt") != "$(ckpt_digest "$ckpt/last.pt")" ]]; then
    say "$ckpt/best.pt is from another run (params digest differs from last.pt's): not saved"
  else
    copy_ckpt "$ckpt/best.pt" "$keep/best.pt"
  fi
}

restore() {
  [[ -f $ckpt/last.pt || ! -f $keep/last.pt ]] && return 0
  mkdir -p "$ckpt"
  cp "$keep/last.pt" "$ckpt/last.pt"
  [[ -f $keep/best.pt && ! -f $ckpt/best.pt ]] && cp "$keep/best.pt" "$ckpt/best.pt"
  say "no $ckpt/last.pt: copied $keep/last.pt ($(ckpt_info "$ckpt/last.pt")) to resume from"
}

run() {
  if (( $(nice) < 19 )); then exec nice -n 19 "$0" run; fi
  # A session of its own (bg) is a scheduler autogroup of its own, and autogroups share the CPU
  # equally whatever the nice value inside them: the "nice 19" run took a full core from 2-thread
  # jobs (5-16x slower tests). Autogroup nice 19 leaves it only what others do not use.
  if [[ -n ${OWN_SESSION:-} ]]; then
    echo 19 > /proc/self/autogroup 2>/dev/null || say "could not lower the autogroup priority (/proc/self/autogroup)"
  fi
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
  export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$root/mlflow.db}
  export DEBLUR_PIPELINE_ID=${DEBLUR_PIPELINE_ID:-$(basename "$work")}   # else it would share the main pipeline's id (params.yaml hash)
  mkdir -p "$work"
  echo $$ > "$work/run.pid"
  snapshot_code
  local code; code=$(code_dir)
  [[ -d ${PHOTOS:-data/pretrain_photos} ]] || say "warning: no data/pretrain_photos; run scripts/fetch_pretrain_photos.sh data/pretrain_photos"

  local stamp; stamp=$(params_digest seed ingest)
  if [[ -f $work/ingested/manifest.jsonl && $(cat "$work/ingested.params" 2>/dev/null) == "$stamp" ]]; then
    say "ingest: $work/ingested is up to date, skipped"
  else
    say "ingest -> $work/ingested"
    pyrun "$code/pipelines/ingest.py" --params "$prof" --out "$work/ingested"
    echo "$stamp" > "$work/ingested.params"
  fi
  stamp="$(params_digest seed synthesize)-$(sha256sum "$work/ingested/manifest.jsonl" | cut -c1-12)"
  if [[ -f $work/pairs/val/blur_types.json && $(cat "$work/pairs.params" 2>/dev/null) == "$stamp" ]]; then
    say "synthesize: $work/pairs is up to date, skipped"
  else
    say "synthesize -> $work/pairs"
    pyrun "$code/pipelines/synthesize.py" --params "$prof" --manifest "$work/ingested/manifest.jsonl" --out "$work/pairs"
    echo "$stamp" > "$work/pairs.params"
  fi

  restore
  local extra=()
  if [[ -f $ckpt/last.pt ]] && pyrun "$code/pipelines/train.py" --help 2>/dev/null | grep -q -- --resume-from; then
    extra=(--resume-from "$ckpt/last.pt")   # newer trainers: resume although the code changed (params, data must match)
  fi
  say "train ($prof, $(nproc --all) cores here, OMP_NUM_THREADS=1, nice $(nice)) -> $ckpt"
  # python itself in the background (not a shell function: its subshell would take the SIGTERM, not python)
  # SCHED_IDLE as well: even at nice 19 a CPU-bound neighbour slows 2-thread torch jobs 5-10x
  # (OpenMP barriers wait for the thread that shares its core); with it they lose about one core.
  local idle=(); command -v chrt >/dev/null && idle=(chrt --idle 0)
  PYTHONPATH="$code/src" "${idle[@]}" "$py" "$code/pipelines/train.py" --params "$prof" --pairs "$work/pairs" --checkpoints "$ckpt" \
    --curve "$work/train_curve.csv" --run-info "$work/train_run.json" "${extra[@]}" &
  local pid=$! rc=0 stopping=0
  echo "$pid" > "$work/train.pid"
  trap 'stopping=1; kill -TERM "$pid" 2>/dev/null || true' TERM INT
  wait "$pid" || rc=$?
  if (( stopping )); then rc=0; wait "$pid" || rc=$?; fi
  trap - TERM INT
  rm -f "$work/train.pid"
  if (( rc == 0 )); then say "train finished"; else say "train stopped (exit $rc); run again to resume"; fi
  save
  rm -f "$work/run.pid"
  return "$rc"
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

case ${1:-run} in
  run) run ;;
  bg)
    if alive "$work/run.pid"; then say "already running (pid $(cat "$work/run.pid"))"; exit 1; fi
    mkdir -p "$work"
    OWN_SESSION=1 setsid nohup nice -n 19 "$0" run >> "$log" 2>&1 < /dev/null &
    say "started in the background (pid $!), log: $log" ;;
  stop)
    if ! alive "$work/run.pid"; then say "not running"; exit 0; fi
    kill -TERM "$(cat "$work/run.pid")"
    say "SIGTERM sent; waiting for the current step (or validation) to end and last.pt to be saved"
    while alive "$work/run.pid"; do sleep 2; done
    tail -n 4 "$log" ;;
  save) save ;;
  status)
    if alive "$work/train.pid"; then say "training (pid $(cat "$work/train.pid"))"; else say "not training"; fi
    grep -E "^train: |\[train\]" "$log" 2>/dev/null | tail -n 2 || true
    [[ -f $ckpt/last.pt ]] && say "$ckpt/last.pt: $(ckpt_info "$ckpt/last.pt")" || true ;;
  *) echo "usage: $0 [run|bg|stop|save|status]" >&2; exit 2 ;;
esac
