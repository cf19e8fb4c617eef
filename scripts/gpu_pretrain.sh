#!/usr/bin/env bash
# GPU pre-training on the lent device machine with the project's own stages (ingest ->
# synthesize -> train), resumable across the device's 10-minute calls. Not yet run on a device:
# no session of this project has had one. Plan:
#   here:    ../shared/tools/device-wheels.sh mlflow==3.17.2 pytorch-msssim==1.0.0 pydantic==2.* pydantic-core
#            scripts/fetch_pretrain_photos.sh data/pretrain_photos
#   device:  run(command="bash scripts/gpu_pretrain.sh", carry=[".whl", "data/pretrain_photos"])
#            then again with carry [".whl", "data/pretrain_photos", "data/gpu"] (the previous $OUT/gpu,
#            copied to data/gpu) until it prints "done"; SIGTERM from `timeout` saves last.pt.
#   here:    import $OUT/gpu/run.json with deblur.tracking.import_run, check with bench/bench_quality_speed.py.
set -euo pipefail
params=${PARAMS:-configs/pretrain-gpu.yaml}
budget_s=${BUDGET_S:-520}
out=${OUT:?run on the device machine, where \$OUT is set}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
state=$out/gpu   # checkpoints, curve and the MLflow store: carried back in to resume
mkdir -p "$state"
if [[ -d data/gpu ]]; then cp -r data/gpu/. "$state/"; fi
export PYTHONPATH=/tmp/site:$PWD/src MLFLOW_TRACKING_URI=sqlite:///$state/mlflow.db
python3 pipelines/ingest.py --params "$params" --out data/pretrain/ingested
python3 pipelines/synthesize.py --params "$params" --manifest data/pretrain/ingested/manifest.jsonl --out data/pretrain/pairs
nvidia-smi --query-gpu=name,memory.total --format=csv
if timeout --signal=TERM "$budget_s" python3 pipelines/train.py --params "$params" --pairs data/pretrain/pairs \
     --checkpoints "$state/checkpoints" --curve "$state/curve.csv" --run-info "$state/train_run.json"; then
  python3 -c "import json,sys; from deblur import tracking; i=json.load(open('$state/train_run.json')); tracking.export_run(i['run_id'], '$state/run.json')"
  echo done
else
  echo "stopped at the time budget; call again carrying data/gpu to resume"
fi
