# Two commands matter: `make run` (set up, then the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# PyTorch training on CPU spends a third of its time in page faults with glibc's default allocator settings;
# these keep freed memory in the process, which suits batch jobs (make models) but not the long-running service.
BATCH_ENV := GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736

.PHONY: setup run test models demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[service,train,dev]'
	touch $@

run: setup
	$(PY) -m service

test: setup
	$(PY) -m pytest -q

# Segment fresh synthetic cases with the shipped models, without the service.
demo: setup
	$(PY) -m training synth data/demo --cases 2 --seed 999 --start-index 901
	$(PY) -m training evaluate --model models/unet.onnx --data data/demo --out runs/demo/unet
	$(PY) -m training evaluate --model models/resunet.onnx --data data/demo --out runs/demo/resunet

# Demo models: synthetic data, both networks, export and evaluation on unseen cases (see README).
DEMO_TRAIN := --channels 8,16,32,64,128 --patch-size 64,64,64 --batch-size 2 --epochs 14 --iterations 200 \
              --val-interval 14 --val-max-cases 3 --schedule cosine --lr 3e-3 --seed 0
models: setup
	$(BATCH_ENV) $(PY) -m training synth data/synth-train --cases 40 --seed 1 --start-index 1 & train=$$!; \
	$(BATCH_ENV) $(PY) -m training synth data/synth-test --cases 10 --seed 2 --start-index 401 && wait $$train
	$(BATCH_ENV) $(PY) -m training preprocess data/synth-train data/cache/synth-train --workers 2
	for arch in unet resunet; do \
	  rm -rf runs/$$arch && \
	  $(BATCH_ENV) $(PY) -m training train --cache data/cache/synth-train --out runs/$$arch --arch $$arch $(DEMO_TRAIN) && \
	  $(BATCH_ENV) $(PY) -m training export --checkpoint runs/$$arch/checkpoint_best.pt --name $$arch --models-dir models && \
	  $(BATCH_ENV) $(PY) -m training evaluate --model models/$$arch.onnx --data data/synth-test --out runs/$$arch/eval --update-card \
	  || exit 1; \
	done
