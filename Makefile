PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := zoo,onnx,search,report,prune

.PHONY: demo test test-fast clean system-packages

# Test workers: one per core of the 2-core machines the suite is sized for (each runs torch on one thread).
JOBS ?= 2

# torch first, pinned: this exact version is a CPU wheel available offline; anything looser pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[$(EXTRAS),dev]"
	touch $@

# System packages the tests drive for real (report in Chromium, a search shared over PostgreSQL):
# installed once, only what is missing, waiting for another dpkg rather than failing; without root
# or apt-get the tests that need them skip with the reason.
APT := apt-get -o DPkg::Lock::Timeout=600 -q
system-packages:
	@missing=""; \
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "not installing$$missing (needs apt-get as root): the tests using them skip"; exit 0; fi; \
	$(APT) update && DEBIAN_FRONTEND=noninteractive $(APT) install -y --no-install-recommends $$missing

demo: $(VENV)/.installed
	$(BIN)/slimkit demo --task mnist --out runs/demo

test: $(VENV)/.installed-dev system-packages
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n $(JOBS) --durations=30

# The unmarked tests only (no real model training, no pre-trained encoder): a quick check while editing.
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -n $(JOBS) -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
