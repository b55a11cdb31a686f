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
	$(PY) -m pytest -q -ra --durations=15 tests

test-unit: setup
	$(PY) -m pytest -q -ra tests/unit

clean:
	rm -rf $(VENV) build *.egg-info

# Backbone-free indexer training for the embedded models, from scratch: dump (one teacher-forced
# pass per document) -> train (query side only, from the dump alone) -> eval (held-out documents).
# `make train-indexer INDEXER_MODELS=smollm2-135m` picks models; FRESH=0 resumes a killed run.
# One torch thread: on these shared 2-core hosts a second thread that has to wait for a busy core
# made a 4K-token document 2.2x slower (48 s vs 21.5 s), and it leaves a core to the others.
INDEXER_MODELS  ?= smollm2-135m qwen2.5-0.5b
INDEXER_WORK    ?= build/indexer
INDEXER_THREADS ?= 1
FRESH           ?= 1
DUMP_ARGS_smollm2-135m ?= --doc-tokens 4096 --positions 32 --train-docs 16 --val-docs 3 --test-docs 5
DUMP_ARGS_qwen2.5-0.5b ?= --doc-tokens 3072 --min-position 1024 --positions 32 --train-docs 10 --val-docs 2 --test-docs 3
TRAIN_ARGS      ?=

.PHONY: train-indexer
train-indexer: $(addprefix train-indexer-,$(INDEXER_MODELS))

train-indexer-%: setup
	@if [ "$(FRESH)" = 1 ]; then rm -rf $(INDEXER_WORK)/$*; fi
	$(VENV)/bin/lsa-sglang dump --model-path $* --out $(INDEXER_WORK)/$*/dump --threads $(INDEXER_THREADS) \
		--no-progress $(DUMP_ARGS_$*)
	$(VENV)/bin/lsa-sglang train --data $(INDEXER_WORK)/$*/dump --out checkpoints/$*.safetensors \
		--threads $(INDEXER_THREADS) $(TRAIN_ARGS)
	$(VENV)/bin/lsa-sglang eval --data $(INDEXER_WORK)/$*/dump --ckpt checkpoints/$*.safetensors \
		--threads $(INDEXER_THREADS) --json bench/results/indexer-eval-$*.json
