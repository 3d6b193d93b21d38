# One command sets everything up and runs: `make run` (the main job), `make test` (the suite).
# Setup makes .venv with the pinned dependencies of requirements.lock; it reruns only when
# pyproject.toml or requirements.lock change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Tests run on CPU with 8 simulated devices (tests/conftest.py sets the XLA flag).
PYTEST_ARGS ?= -q -n 2 --durations=15

.PHONY: setup run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $@

# The demo: SmolLM2-135M-Instruct distilled into a pruned student on this machine's CPU/GPU.
run: setup
	$(PY) -m jkd.main --config configs/demo.py

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
