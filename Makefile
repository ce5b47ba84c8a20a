# Two commands matter: `make run` (set up, then the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
LOCK         := requirements/lock.txt
SERVICE_LOCK := requirements/service.txt
# The PyTorch release the lock pins. PyPI serves it for Linux as a multi-GB CUDA build; PyTorch's own index
# serves the CPU-only build of the same release, which the pin accepts:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make setup
TORCH_PIN    := torch==2.13.0
# PyTorch training on CPU spends a third of its time in page faults with glibc's default allocator settings;
# these keep freed memory in the process, which suits batch jobs (make models) but not the long-running service.
BATCH_ENV := GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736

.PHONY: setup service-setup run test audit lock models demo

setup: $(VENV)/.installed
service-setup: $(VENV)/.installed-service

# Exact versions from requirements/lock.txt (regenerate it with `make lock`). The service needs only its
# extra (no torch); tests, training and benchmarks get everything.
$(VENV)/.installed-service: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[service]'
	touch $@

$(VENV)/.installed: $(VENV)/.installed-service pyproject.toml $(LOCK)
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[service,train,dev,bench]'
	touch $@

run: service-setup
	$(PY) -m service

test: setup
	$(PY) -m pytest -q

# Known vulnerabilities in the locked versions (pip-audit against PyPI's vulnerability data). Fails on one
# that has a fix; reports, without failing, packages it could not check (AUDIT_FLAGS=--strict fails then too).
AUDIT_FLAGS ?=
audit: setup
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	{ $(VENV)/bin/pip-audit --no-deps --disable-pip --format json --progress-spinner off \
	    -r $(LOCK) -r $(SERVICE_LOCK) -o "$$tmp/report.json" 2> "$$tmp/pip-audit.log" \
	  || cat "$$tmp/pip-audit.log" >&2; } && \
	$(PY) scripts/audit.py $(AUDIT_FLAGS) "$$tmp/report.json"

# Regenerate both lock files, each resolved afresh from pyproject.toml in a throw-away venv:
# requirements/lock.txt what `make setup` installs, requirements/service.txt what the service image installs
# (`--all` keeps pip and setuptools in the first: pip_api and torch need them at run time).
comma := ,
lock:
	$(call freeze,service$(comma)train$(comma)dev$(comma)bench,--all,$(LOCK))
	$(call freeze,service,,$(SERVICE_LOCK))

# The Pythons the lock resolves for from PyPI alone (the README names them; requires-python in pyproject.toml):
# a dry run of each lock for each version, wheels only, without this machine's pip configuration.
LOCK_PYTHONS := 3.11 3.12 3.13
.PHONY: lock-check
lock-check: setup
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	for v in $(LOCK_PYTHONS); do for f in $(LOCK) $(SERVICE_LOCK); do \
	  grep -vE '^(pip|setuptools)==' $$f > "$$tmp/req.txt" && \
	  PIP_CONFIG_FILE=/dev/null $(PY) -m pip install --isolated --quiet --dry-run --ignore-installed --no-deps \
	    --only-binary=:all: --python-version $$v --target "$$tmp/t" -r "$$tmp/req.txt" \
	  && echo "Python $$v: $$f resolves from PyPI" || { echo "Python $$v: $$f does NOT resolve" >&2; exit 1; }; \
	done; done

# $(call freeze,EXTRAS,FREEZE_FLAGS,OUTPUT): install .[EXTRAS] in a throw-away venv, write its pins to OUTPUT
# (installed editable, which leaves no build/ folder behind and which --exclude-editable leaves out).
define freeze
@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
echo '$(TORCH_PIN)' > "$$tmp/torch.txt" && \
$(PYTHON) -m venv "$$tmp/venv" && \
"$$tmp/venv/bin/python" -m pip install --quiet --upgrade pip && \
"$$tmp/venv/bin/python" -m pip install --quiet -c "$$tmp/torch.txt" -e '.[$(1)]' && \
{ echo '# Exact versions of what `pip install ".[$(1)]"` installs. Regenerate with `make lock`, which runs'; \
  echo '# that install in a throw-away venv (torch constrained to $(TORCH_PIN)), then'; \
  echo '# `pip freeze $(if $(2),$(2) )--exclude-editable` without the project itself, local version labels'; \
  echo '# (+cpu) dropped so that PyPI can serve every pin. Do not edit by hand.'; \
  "$$tmp/venv/bin/python" -m pip freeze $(2) --exclude-editable | grep -viE '^brats[-_.]seg( |=|@|$$)' \
    | sed -E 's/^([A-Za-z0-9._-]+==[^+ ;]+)\+[A-Za-z0-9.]+/\1/'; \
} > "$$tmp/out" && \
mkdir -p $(dir $(3)) && mv "$$tmp/out" $(3) && echo "wrote $(3)"
endef

# The front-end assets the service serves from service/static/vendor/ (Swagger UI for /docs, NiiVue), at the
# versions pinned in scripts/vendor_assets.sh, fetched with `npm pack` (needs npm and the npm registry).
.PHONY: vendor
vendor:
	bash scripts/vendor_assets.sh

# Segment fresh synthetic cases with the shipped models, without the service.
demo: setup
	$(PY) -m training synth data/demo --cases 2 --seed 999 --start-index 901
	$(PY) -m training evaluate --model models/unet.onnx --data data/demo --out runs/demo/unet
	$(PY) -m training evaluate --model models/resunet.onnx --data data/demo --out runs/demo/resunet

# Demo models: a synthetic cohort (every case kind, tumour-free brains included), both networks trained side by
# side (one thread each), then for each: export, postprocessing learned on its validation cases, evaluation on
# 40 unseen cases written into its card (see docs/models.md).
DEMO_EPOCHS ?= 18
DEMO_TRAIN := --channels 8,16,32,64,128 --patch-size 64,64,64 --batch-size 2 --epochs $(DEMO_EPOCHS) --iterations 200 \
              --val-fraction 0.125 --val-interval 10 --schedule cosine --lr 3e-3 --seed 0
.PHONY: models-data models-train
models: models-data models-train

# The cohort: 80 training cases (cached for training) and 40 unseen test cases.
models-data: setup
	$(BATCH_ENV) $(PY) -m training synth data/synth-train --cases 80 --seed 1 --start-index 1 & train=$$!; \
	$(BATCH_ENV) $(PY) -m training synth data/synth-test --cases 40 --seed 2 --start-index 401 && wait $$train
	$(BATCH_ENV) $(PY) -m training preprocess data/synth-train data/cache/synth-train --workers 2

# Both networks from that cache, side by side on one thread each, each going on alone as soon as it has trained:
# train, export, learn postprocessing on its validation cases, evaluate on the test cases into its card.
models-train: setup
	pids=; for arch in unet resunet; do \
	  rm -rf runs/$$arch && mkdir -p runs && \
	  { ( export OMP_NUM_THREADS=1 $(BATCH_ENV) && \
	      $(PY) -m training train --cache data/cache/synth-train --out runs/$$arch --arch $$arch $(DEMO_TRAIN) && \
	      $(PY) -m training export --checkpoint runs/$$arch/checkpoint_best.pt --name $$arch --models-dir models && \
	      $(PY) -m training learn-postprocessing --model models/$$arch.onnx --data data/synth-train \
	        --split runs/$$arch/split.json --threads 1 && \
	      $(PY) -m training evaluate --model models/$$arch.onnx --data data/synth-test --out runs/$$arch/eval \
	        --update-card --threads 1 ) > runs/$$arch.log 2>&1 & pids="$$pids $$!"; } ; \
	done; for pid in $$pids; do wait $$pid || { echo "make models failed: see runs/unet.log, runs/resunet.log" >&2; exit 1; }; done
	$(PY) scripts/models_table.py unet=runs/unet/eval resunet=runs/resunet/eval

# Load and soak test of the service on the shipped models: 3 minutes, results in runs/soak/ (README, Robustness).
.PHONY: soak
soak: setup
	$(PY) -m benchmarks.soak

# Benchmark suite: peak, engine vs PyTorch and MONAI, FLOPs, end to end, memory, load, scaling; results in
# runs/bench/ (bench.json, bench.md). `$(PY) -m benchmarks --quick` is the one-minute smoke run.
.PHONY: bench
bench: setup
	$(PY) -m benchmarks
