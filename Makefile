# The two entry points a newcomer needs: `make demo` and `make test`.
# Both create .venv and install everything on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m terra bench --quick --json out/bench.json --plot out/bench.png

test: $(STAMP)
	TERRA_STRICT=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m terra bench --json out/bench.json --plot out/bench.png
	$(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) build *.egg-info
