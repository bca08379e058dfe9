# The two commands of README.md: `make demo` and `make test`. Both install what they use.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch: the CPU wheel lying on this disk, installed only when torch is missing (a bare `torch`
# requirement would pull a CUDA build of several GB).
TORCH_CPU := torch==2.13.0

.PHONY: install install-ui demo test bench ui clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet $(TORCH_CPU)
	$(PIP) install --quiet --disable-pip-version-check -e ".[dev]"

demo: install
	$(PYTHON) samples/demo.py --out outputs/demo

test: install
	$(PYTHON) -m pytest -q --durations=15

bench: install
	$(PYTHON) benchmarks/bench_train_step.py

clean:
	rm -rf outputs .pytest_cache build *.egg-info
