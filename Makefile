PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := zoo,onnx,search,report,prune

.PHONY: demo test clean

# torch first, pinned: this exact version is a CPU wheel available offline; anything looser pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[$(EXTRAS),dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/slimkit demo --task mnist --out runs/demo

test: $(VENV)/.installed-dev
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
