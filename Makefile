# `make run` runs the main job, `make test` the tests; both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test bench clean-venv

# The install also puts distac-torchvision.pth into site-packages (build_support.py), so plain transformers /
# peft / open_clip scripts work in this venv without `import distac`; the last line fails loudly if it did not.
$(STAMP): pyproject.toml constraints.txt build_support.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[all,test]"
	env -u DISTAC_NO_TORCHVISION_HOOK $(BIN)/python -c "import sys; \
	  assert any(getattr(f, '_distac_torchvision_hook', 0) for f in sys.meta_path), 'distac-torchvision.pth did not run'"
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
