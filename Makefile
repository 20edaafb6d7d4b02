# Two commands on a fresh machine:  `make demo`  (the main job)  and  `make test`  (the test suite).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test test-slow compare bench llamagen-check clean-runs gpu-check
setup: $(VENV)/.installed /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $@

demo: setup
	$(PY) -m pipeline.main --config configs/main/fmnist.yaml $(ARGS)

test: setup
	$(PY) -m pytest -q tests $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow tests $(ARGS)

# the generation verdict (issue 23); COMPARE=configs/main/compare_fmnist.yaml runs the 512-bit comparison
COMPARE ?= configs/main/compare_verdict_fmnist.yaml
compare: setup
	$(PY) -m pipeline.compare --config $(COMPARE) $(ARGS)

# LlamaGen is never vendored: check it out elsewhere and pass LLAMAGEN=/path/to/LlamaGen.
# Each script takes its own flags: AR_ARGS (ar_vs_llamagen.py), STORE_ARGS (token_store.py),
# TOK_ARGS (tokenizer_speed.py), e.g. make bench LLAMAGEN=../LlamaGen AR_ARGS=--quick STORE_ARGS=--quick
bench: llamagen-check setup
	$(PY) bench/ar_vs_llamagen.py --llamagen "$(LLAMAGEN)" $(AR_ARGS)
	$(PY) bench/token_store.py $(STORE_ARGS)
	$(PY) bench/tokenizer_speed.py $(TOK_ARGS)

# before setup, so a missing LLAMAGEN fails at once
llamagen-check:
	@if [ ! -d "$(LLAMAGEN)" ]; then \
	  echo "make bench: LLAMAGEN='$(LLAMAGEN)' is not a LlamaGen checkout. Clone it outside this repo and pass it:" >&2; \
	  echo "  git clone https://github.com/FoundationVision/LlamaGen ../LlamaGen && make bench LLAMAGEN=../LlamaGen" >&2; \
	  exit 2; fi

# README's ImageNet commands at reduced size on one CUDA GPU (real launchers, NCCL); exits 3 without CUDA.
# No setup step: a GPU image brings its own CUDA PyTorch (GPU_PY=python3); else the venv's python.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) bench/cluster_check.py $(ARGS)
