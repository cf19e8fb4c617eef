# Fresh machine: `make demo` (install + whole pipeline on the embedded data), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV)/bin)
PORT ?= 7071
export PATH := $(BIN):$(PATH)

DVC_REMOTE ?= $(abspath ../deblur-dvc-store)

SHELL := /bin/bash

.PHONY: compare install demo repro test test-fast serve function-package bench clean-pipeline dvc-remote tracking-server tracking-server-stop

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "installing the pinned dependencies into $(VENV) (CPU torch, MLflow, DVC, ...: a few minutes on a fresh machine)"
	set -o pipefail; $(PY) -m pip install -r requirements.txt -e . | { grep -E --line-buffered "^(Collecting|Successfully)" || true; }
	touch $@

demo: install
	@test -d .dvc || dvc init -q
	dvc repro synthesize
	$(PY) -m deblur.cli.import_pretrained --register checkpoints/pretrained/nafnet16.pt
	DEBLUR_PIPELINE_ID=demo-$$(date +%Y%m%d-%H%M%S) dvc repro
	$(PY) -m deblur.cli.summary

repro: install
	dvc repro

# Experiments at a glance: only the params and metrics that differ between experiments, no bookkeeping columns.
compare: install
	dvc exp show --only-changed --drop 'Created|State|Executor' --precision 3

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

serve: install
	$(PY) -m deblur.service --host 127.0.0.1 --port $(PORT) --model-dir function_app/model

# FUNCTION_RUNTIME=onnx: model.onnx on ONNX Runtime, no torch in the package (exported here if the
# artifact has none); torch: model.pt and torch. Why onnx: bench/results/runtimes.md, documentation/serving.md.
FUNCTION_RUNTIME ?= onnx
function-package: install
	$(PY) scripts/build_function_package.py --out build/function_app --model-dir function_app/model --runtime $(FUNCTION_RUNTIME)

bench: install
	$(PY) bench/bench_train.py
	$(PY) bench/bench_serving.py --model-dir function_app/model
	$(PY) bench/bench_runtimes.py

# A default DVC remote in a local folder (a shared disk for a team): `make dvc-remote [DVC_REMOTE=/srv/dvc]`,
# then `dvc push`; a fresh clone runs `dvc pull`. Azure Blob / S3: documentation/pipeline.md.
dvc-remote:
	@test -d .dvc || $(BIN)/dvc init -q
	mkdir -p $(DVC_REMOTE)
	$(BIN)/dvc remote add --default --force local $(DVC_REMOTE)
	@echo "DVC remote 'local' -> $(DVC_REMOTE) (.dvc/config); now: dvc push"

# A shared MLflow tracking server: PostgreSQL + artifacts in ../deblur-tracking, on 127.0.0.1:5000
# (TRACKING_DIR, TRACKING_HOST, TRACKING_PORT, ...: documentation/deploy.md). make demo never needs it.
# It starts with a champion: the shipped checkpoint through the gate, as make demo does locally, unless the
# store has one already. REGISTER_PRETRAINED=0: an empty store (the first pipeline run that passes the gate wins).
REGISTER_PRETRAINED ?= 1
tracking-server: install
	bash scripts/tracking_server.sh start
	@if [ "$(REGISTER_PRETRAINED)" != 0 ]; then bash scripts/tracking_server.sh register; fi

tracking-server-stop:
	bash scripts/tracking_server.sh stop
