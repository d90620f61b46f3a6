# Two commands do all the set-up on a fresh machine:
#   make demo   set up, train the demo with 2 processes, evaluate before/after
#   make test   set up, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
ACCELERATE := $(VENV)/bin/accelerate
# torch is installed first, when the venv has none. PyPI's Linux wheel of torch is the CUDA build
# (several GB); on a machine without an NVIDIA driver we also offer PyTorch's CPU wheel index,
# whose `2.13.0+cpu` pip then prefers (about 200 MB). Where that index can't be reached, pip
# warns and takes PyPI's wheel. Override either: `make setup TORCH_SPEC=torch TORCH_INDEX=`.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi),,https://download.pytorch.org/whl/cpu)
DEMO_DIR ?= runs/demo
DEMO_ARGS ?=

.PHONY: setup demo test test-fast test-latest
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --timeout 20 --retries 3 "$(TORCH_SPEC)" \
		$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	# NVMe offload (zero3_nvme) needs DeepSpeed's async_io op, which builds against libaio; the Slurm
	# tests start a 2-node cluster on this host from Debian's slurm-wlm and munge (run as root);
	# jemalloc is the allocator a launch on CPU may preload (docs/strategies.md).
	dpkg -s libaio-dev slurm-wlm munge libjemalloc2 >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev slurm-wlm munge libjemalloc2 >/dev/null; } || \
		echo "note: not root: libaio-dev (NVMe offload), slurm-wlm and munge (tests/test_slurm.py), libjemalloc2 not installed"
	# (setuptools warns about any editable install: nothing to act on)
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e ".[dev]" -c constraints.txt
	touch $@

demo: setup
	rm -rf $(DEMO_DIR)
	$(ACCELERATE) launch --config_file accelerate_configs/ddp.yaml --mixed_precision no -m toolkit.train \
		--config examples/demo.yaml output_dir=$(DEMO_DIR) $(DEMO_ARGS)
	$(PY) -m toolkit.evaluate --checkpoint $(DEMO_DIR)/final --report $(DEMO_DIR)/eval_final.json

test: setup
	$(PY) -m pytest -q tests

# The fast tier: one process only (no 2-process launches), a few minutes.
test-fast: setup
	$(PY) -m pytest -q tests -m "not distributed"

# The fast tier against the newest releases inside pyproject's ranges, as `pip install` gives them
# to a user (no constraints.txt), in a venv of its own: tests/test_patches.py checks there that
# every library internal the toolkit relies on is still in place.
LATEST_VENV ?= .venv-latest
test-latest: $(LATEST_VENV)/.installed
	$(LATEST_VENV)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|accelerate|transformers|deepspeed|peft|bitsandbytes|datasets) "
	$(LATEST_VENV)/bin/python -m pytest -q tests -m "not distributed"

$(LATEST_VENV)/.installed: pyproject.toml
	test -x $(LATEST_VENV)/bin/python || python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -c "import torch" 2>/dev/null || $(LATEST_VENV)/bin/python -m pip install -q --timeout 20 \
		--retries 3 "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	PYTHONWARNINGS="ignore:Editable installation" $(LATEST_VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $@
