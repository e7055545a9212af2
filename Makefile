# make test: the linter and the test suite; make lint: the linter alone; make demo: train, sample and evaluate the digits model under runs/demo/.
# Both set themselves up: a .venv (seeing a torch you installed yourself, e.g. a CUDA build),
# and the CPU build of torch when no torch and no GPU are present.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export OMP_WAIT_POLICY := PASSIVE

.PHONY: test lint demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	    echo "A GPU is present and no torch is installed: installing the default torch build"; \
	    $(BIN)/pip install "torch>=2.3"; \
	  else \
	    echo "No torch and no GPU: installing the CPU build torch==2.13.0"; \
	    $(BIN)/pip install torch==2.13.0; \
	  fi; \
	fi
	$(BIN)/pip install -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m ruff check .

demo: $(STAMP)
	$(BIN)/python -m unifuse.cli demo --out runs/demo

bench: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
