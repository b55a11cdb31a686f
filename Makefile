# Two commands for a newcomer: `make serve` and `make test` (both set everything up first).
VENV    := .venv
PY      := $(VENV)/bin/python
MODEL   ?= smollm2-135m
CONFIG  ?= server_configs/cpu-smollm2.yaml
HOST    ?= 127.0.0.1
PORT    ?= 30000
STAMP   := $(VENV)/.setup-stamp
export SGLANG_USE_CPU_ENGINE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo 1)
export TRITON_INTERPRET ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo 1)

.PHONY: setup fetch-model serve test test-unit clean

setup: $(STAMP)

$(STAMP): scripts/setup.sh requirements/cpu.lock pyproject.toml
	bash scripts/setup.sh
	touch $@

fetch-model: setup
	$(VENV)/bin/lsa-sglang fetch-model $(MODEL)

serve: setup
	$(PY) -m lsa_sglang.launch_server --model-path "$$($(VENV)/bin/lsa-sglang fetch-model $(MODEL))" \
		--lsa-config $(CONFIG) --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest -q -ra tests

test-unit: setup
	$(PY) -m pytest -q -ra tests/unit

clean:
	rm -rf $(VENV) build *.egg-info
