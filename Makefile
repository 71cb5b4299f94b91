# The two commands a new user needs (see README.md):
#   make demo   set up, then run the CLI on the built-in Hunyuan3D-2 reference model
#   make test   set up, then run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-gpu

setup:
	@VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(VENV)/bin/fusion-pass inspect hunyuan3d-2
	@echo "fusion-pass and the examples run in $(VENV): 'source $(VENV)/bin/activate', then 'fusion-pass --help' or"
	@echo "'python examples/optimize_hunyuan3d.py' (or call $(VENV)/bin/fusion-pass, $(VENV)/bin/python directly)"

test: setup
	$(PY) -m pytest -q

test-gpu:
	python3 -m pytest -q -m gpu tests
