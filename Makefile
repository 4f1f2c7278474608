# Set-up and the two commands the README names. PYTHON may point at a venv's interpreter.
PYTHON ?= python3
PRESET ?= tiny

.PHONY: install demo test

# torch first and pinned: 2.13.0 is the CPU build on this disk; an unpinned torch may pull a multi-GB CUDA build.
install:
	$(PYTHON) -m pip install --quiet "torch==2.13.0"
	$(PYTHON) -m pip install --quiet -e ".[dev,eval]"

demo: install
	$(PYTHON) -m modeling_looped_moe.main_job --preset $(PRESET) $(ARGS)

# Tests never download: the Hub is unreachable here and tests build everything locally.
test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q
