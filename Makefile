# The two commands of README.md: `make demo` and `make test`. Both install what they use.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch: the CPU wheel lying on this disk, installed only when torch is missing (a bare `torch`
# requirement would pull a CUDA build of several GB).
TORCH_CPU := torch==2.13.0

.PHONY: install install-ui chromium demo test bench ui ui-screens tiny-model clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet $(TORCH_CPU)
	$(PIP) install --quiet --disable-pip-version-check -e ".[dev]"
	@$(MAKE) --no-print-directory chromium

# Debian's Chromium for the web UI's browser test (Playwright's own browser download cannot run here).
# Never fails: without apt-get or root the browser test is skipped and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium could not be installed: the web UI's browser test will be skipped"

install-ui:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet $(TORCH_CPU)
	$(PIP) install --quiet --disable-pip-version-check -e ".[ui]"

# The web UI: `make ui` opens the pretrained tiny model (tiny-world) and make demo's adapters (outputs/demo), with
# tiny-world's trained example adapters when none of those fits it; UI_ARGS="--model PATH --adapters DIR --device cuda --dtype bfloat16 …"
ui: install-ui
	$(PYTHON) ui/app.py $(UI_ARGS)

# Screenshots of the web UI's main states in outputs/ui-screens/, for a person to look at (Chromium, Playwright).
ui-screens: install-ui chromium
	$(PIP) install --quiet --disable-pip-version-check -e ".[ui,screens]"
	$(PYTHON) ui/screens.py --out outputs/ui-screens

# Rebuild the embedded pretrained models from their recipes and seeds: tiny-world (lycoris_lite/models/tiny_world,
# about 30 min on 2 CPU cores), its Flux-shaped counterpart tiny-world-flux (lycoris_lite/models/tiny_world_flux,
# from tiny-world's VAE and CLIP, about 55 min on one core), then the web UI's example adapters trained on
# tiny-world (ui/example_adapters.py, about 3 min); prints what each model draws correctly and what each example changes.
tiny-model: install
	$(PYTHON) -m lycoris_lite.models.world_model --out lycoris_lite/models/tiny_world
	$(PYTHON) -m lycoris_lite.models.world_flux --out lycoris_lite/models/tiny_world_flux
	$(PYTHON) ui/example_adapters.py --out lycoris_lite/integrations/webui/examples

demo: install
	$(PYTHON) samples/demo.py --out outputs/demo

test: install
	lint-imports
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --durations=15

bench: install
	$(PYTHON) benchmarks/bench_train_step.py

clean:
	rm -rf outputs .pytest_cache build *.egg-info
