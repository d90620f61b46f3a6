# Two commands do all the set-up on a fresh machine:
#   make demo   set up, train the demo with 2 processes, evaluate before/after
#   make test   set up, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
ACCELERATE := $(VENV)/bin/accelerate
# The CPU wheel of torch on machines without a GPU (an unpinned `torch` pulls a multi-GB CUDA
# build). Override for a GPU machine, e.g. `make setup TORCH_SPEC='torch'`.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	# NVMe offload (zero3_nvme) needs DeepSpeed's async_io op, which builds against libaio.
	dpkg -s libaio-dev >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		apt-get install -y -qq libaio-dev >/dev/null; } || echo "note: libaio-dev missing: NVMe offload unavailable"
	$(PY) -m pip install -q -e ".[dev]" -c constraints.txt
	touch $@

demo: setup
	rm -rf $(DEMO_DIR)
	$(ACCELERATE) launch --config_file accelerate_configs/ddp.yaml --mixed_precision no -m toolkit.train \
		--config examples/demo.yaml output_dir=$(DEMO_DIR)
	$(PY) -m toolkit.evaluate --checkpoint $(DEMO_DIR)/final --report $(DEMO_DIR)/eval_final.json

test: setup
	$(PY) -m pytest -q tests
