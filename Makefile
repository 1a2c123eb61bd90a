# `make run` runs the main job, `make test` the tests; both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[all,test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/distac run --params params.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_bench.py
	$(BIN)/python benchmarks/distac_bench.py

clean-venv:
	rm -rf $(VENV)
