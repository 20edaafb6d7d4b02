# Two commands on a fresh machine:  `make demo`  (the main job)  and  `make test`  (the test suite).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test test-slow compare bench clean-runs
setup: $(VENV)/.installed /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	touch $@

demo: setup
	$(PY) -m groupgen.main --config configs/main/fmnist.yaml $(ARGS)

test: setup
	$(PY) -m pytest -q tests $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow tests $(ARGS)

compare: setup
	$(PY) -m eval.compare --config configs/main/compare_fmnist.yaml $(ARGS)

# LlamaGen is never vendored: check it out elsewhere and pass LLAMAGEN=/path/to/LlamaGen
bench: setup
	$(PY) bench/ar_vs_llamagen.py --llamagen $(LLAMAGEN) $(ARGS)
	$(PY) bench/token_store.py $(ARGS)
	$(PY) bench/tokenizer_speed.py $(ARGS)
