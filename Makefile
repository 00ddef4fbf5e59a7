# Two entry points for a fresh machine; each makes its own virtual environment.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo

.PHONY: demo test test-all venv venv-dev clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

demo: venv  ## the whole job on the synthetic default
	$(PY) -m tsfd_jax demo --out $(OUT)

test: venv-dev  ## the default suite (minutes)
	$(PY) -m pytest -q -m "not slow"

test-all: venv-dev  ## including the slow end-to-end tests
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
