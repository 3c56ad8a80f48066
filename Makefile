# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The pin keeps pip on the CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/islands demo --out runs/main --overwrite

# -n auto: one test process per core (pytest-xdist); most integration tests wait on their
# worker processes, so two at a time use both cores
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n auto

bench: $(STAMP)
	$(BIN)/python benchmarks/diloco_vs_ddp.py

clean:
	rm -rf $(VENV) runs
