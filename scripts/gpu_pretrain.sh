#!/usr/bin/env bash
# GPU pre-training on the lent device machine with the project's own stages (ingest -> synthesize
# -> smoke train -> train), planned for the 15 minutes of device time a task gets (machine start
# included) in at most two calls of at most 10 minutes. Not yet run on a device.
#
#   here:    (once) the wheels the device lacks, 21 of them, 16.3 MB: MLflow's tracking client (mlflow-skinny,
#            no server/UI) with the SQLite store's needs, pydantic, pytorch-msssim. Not
#            ../shared/tools/device-wheels.sh: it takes every package with all its needs (gitpython,
#            google-auth, uvicorn, the compiled sqlalchemy), ~4 MB more. Without any one of these,
#            `import mlflow` or the SQLite store fails (checked on Python 3.12). sqlalchemy is its
#            pure-Python wheel (2.1 MB instead of 4.7; its speed does not matter for a few metrics):
#              rm -rf .whl; w=(-q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl)
#              python3 -m pip download "${w[@]}" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#                --platform manylinux2014_x86_64 --platform any mlflow-skinny==3.17.2 alembic==1.20.1 mako==1.4.3 \
#                sqlparse==0.6.1 cryptography==50.0.2 cffi==2.1.1 databricks-sdk==0.162.0 fastapi==0.165.0 \
#                starlette==1.10.0 importlib-metadata==9.1.0 cachetools==7.3.3 opentelemetry-api==1.45.2 \
#                opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2 \
#                pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#                pytorch-msssim==1.0.0
#              python3 -m pip download "${w[@]}" --platform any sqlalchemy==2.1.9
#            (once) scripts/fetch_pretrain_photos.sh data/pretrain_photos; scripts/gpu_carry_photos.sh
#              -> data/pretrain_photos_512 (9.6 MB: downscaled to 512 as ingest does, JPEG quality 92, not
#              pixel-exact; configs/pretrain-gpu.yaml ingests it; the originals, 26 MB, do not fit)
#            what travels must stay under 64 MiB: on 2026-12-02 tracked files 29.9 MB (15.3 MB of it
#            checkpoints/cpu-shake/last.pt) + untracked 0.1 MB + .whl 16.3 MB + photos 9.6 MB = 55.9 MB = 53.3 MiB
#            (`git ls-files | xargs du -cb | tail -1`; `du -sb .whl data/pretrain_photos_512`)
#   call 1:  run(command="BUDGET_S=540 bash scripts/gpu_pretrain.sh", timeout_s=570,
#                carry=[".whl", "data/pretrain_photos_512"])
#   call 2:  only if call 1 failed early (the smoke stage fails within ~2 minutes): fix it here, then
#            the same call with BUDGET_S = status's budget_left_s - 240 (a fresh start if it went cold).
#   here:    cat $files_at/best.pt.* > best.pt; sha256sum -c best.pt.sha256;
#            deblur.tracking.runs.import_run($files_at/run.json, "deblur"); bench/bench_quality_speed.py.
#
# Time of call 1 (device time 900 s): start ~180 s, then BUDGET_S=540 s of command: wheels ~20 s,
# ingest + synthesize ~40 s, a smoke run (10 steps, validation, checkpoint, MLflow export; no
# torch.compile) ~40 s that stops the call early when the GPU path is broken, then the profile's
# run until BUDGET_S - RESERVE_S (SIGTERM: the trainer saves last.pt), then the export. ~150 s stay
# for transfers and a short retry. The profile's max_steps is sized to end inside that window.
#
# What comes back ($OUT, flat: at most 8 files of 16 MiB): run.json (the MLflow run: params, tags,
# metric histories; also for a run stopped at the budget), curve.csv and train_run.json (a finished
# run), best.pt in 15 MiB parts + best.pt.sha256, train.log. last.pt (with optimiser state) is too
# big to come back: it stays in WORK on the device, where a second call made while the machine is
# warm resumes it; a later session starts afresh.
#
# DRY_RUN=1 runs the same steps on CPU for tests (no wheels, no nvidia-smi, PYTHON, SMOKE_STEPS):
#   DRY_RUN=1 PARAMS=tiny.yaml OUT=/tmp/o WORK=/tmp/w BUDGET_S=120 scripts/gpu_pretrain.sh
# Environment: PARAMS (configs/pretrain-gpu.yaml), WORK (data/gpu: relative to the caller's directory,
# like the paths inside PARAMS), OUT, BUDGET_S (540), RESERVE_S (45), SMOKE_STEPS (10), PYTHON (python3).
set -euo pipefail
start=$SECONDS
root=$(cd "$(dirname "$0")/.." && pwd)
params=$(realpath "${PARAMS:-$root/configs/pretrain-gpu.yaml}")
budget_s=${BUDGET_S:-540}
reserve_s=${RESERVE_S:-45}
smoke_steps=${SMOKE_STEPS:-10}
out=${OUT:?run on the device machine, where \$OUT is set (or DRY_RUN=1 OUT=some/dir)}
work=$(mkdir -p "${WORK:-data/gpu}" && realpath "${WORK:-data/gpu}")
py=${PYTHON:-python3}
mkdir -p "$out"
exec > >(tee -a "$out/train.log") 2>&1
say() { echo "[gpu-pretrain +$((SECONDS - start))s] $*"; }

if [[ -z ${DRY_RUN:-} ]]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$root"/.whl/*.whl
  export PYTHONPATH=/tmp/site:$root/src
  nvidia-smi --query-gpu=name,memory.total --format=csv
else
  export PYTHONPATH=$root/src
fi
export MLFLOW_TRACKING_URI=sqlite:///$work/mlflow.db PYTHONUNBUFFERED=1

stage() { "$py" "$root/pipelines/$1.py" "${@:2}"; }
export_latest_run() {   # the newest train run in the store (finished, or KILLED at the budget) to $1
  "$py" - "$1" <<'EOF'
import sys
import mlflow
from deblur.tracking import runs as tracking
client = mlflow.MlflowClient(tracking.tracking_uri())
experiments = [e.experiment_id for e in client.search_experiments()]
run, = client.search_runs(experiments, "tags.stage = 'train'", order_by=["attributes.start_time DESC"], max_results=1)
tracking.export_run(run.info.run_id, sys.argv[1])
EOF
}

# data: kept in WORK, so a second call on the warm machine skips it
digest=$(sha256sum "$params" | cut -c1-16)
if [[ $(cat "$work/prepared" 2>/dev/null) != "$digest" ]]; then
  say "ingest + synthesize ($params)"
  rm -rf "$work/ingested" "$work/pairs"
  stage ingest --params "$params" --out "$work/ingested"
  stage synthesize --params "$params" --manifest "$work/ingested/manifest.jsonl" --out "$work/pairs"
  echo "$digest" >"$work/prepared"
fi

# smoke: the profile for a few steps with a validation, a checkpoint and the export; a broken GPU
# path ends the call here, minutes before the budget
say "smoke run: $smoke_steps steps"
printf 'extends: %s\ntrain: {max_steps: %d, val_every: %d, val_max_images: 2, compile: false, log_every: 1}\n' \
  "$params" "$smoke_steps" "$(( (smoke_steps + 1) / 2 ))" >"$work/smoke.yaml"
rm -rf "$work/smoke"
stage train --params "$work/smoke.yaml" --pairs "$work/pairs" --checkpoints "$work/smoke/checkpoints" \
  --curve "$work/smoke/curve.csv" --run-info "$work/smoke/train_run.json"
export_latest_run "$work/smoke/run.json"

train_s=$(( budget_s - (SECONDS - start) - reserve_s ))
(( train_s > 0 )) || { say "no time left to train (BUDGET_S=$budget_s)"; exit 1; }
say "train for at most ${train_s}s"
state=$work/state   # checkpoints, curve: a second call on the warm machine resumes last.pt
rc=0
timeout --signal=TERM "$train_s" "$py" "$root/pipelines/train.py" --params "$params" --pairs "$work/pairs" \
  --checkpoints "$state/checkpoints" --curve "$state/curve.csv" --run-info "$state/train_run.json" || rc=$?
if (( rc == 0 )); then cp "$state/curve.csv" "$state/train_run.json" "$out/"; fi
export_latest_run "$out/run.json"
if [[ -f $state/checkpoints/best.pt ]]; then
  (cd "$state/checkpoints" && sha256sum best.pt) >"$out/best.pt.sha256"
  split -b 15M -d "$state/checkpoints/best.pt" "$out/best.pt."
fi
case $rc in
  0) say "done" ;;
  124) say "stopped at the time budget: run.json and best.pt so far are in \$OUT; a call while warm resumes last.pt" ;;
  *) say "train failed (exit $rc): see train.log"; exit "$rc" ;;
esac
