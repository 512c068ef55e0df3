# The two entry points a newcomer needs: `make demo` and `make test`.
# Both create .venv and install everything on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard proto/*.proto)
# Generated modules land in runtime/_proto/ and import as runtime._proto.X_pb2.
PROTO_PY := $(patsubst proto/%.proto,runtime/_proto/%_pb2.py,$(PROTOS))

.PHONY: demo test bench bench-sharded fuzz proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

runtime/_proto/%_pb2.py: proto/%.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -Iruntime/_proto=proto --python_out=. --grpc_python_out=. --pyi_out=. $<

proto: $(PROTO_PY)

demo: $(STAMP) proto
	$(PY) -m terra bench --quick --json out/bench.json --plot out/bench.png

test: $(STAMP) proto
	TERRA_STRICT=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

# The long fuzzing profile and the reliability figures (faults survived, RSS growth).
fuzz: $(STAMP) proto
	TERRA_STRICT=1 $(PY) tests/fuzz.py --programs 2000
	TERRA_STRICT=1 $(PY) benchmarks/reliability.py

bench: $(STAMP) proto
	$(PY) -m terra bench --json out/bench.json --plot out/bench.png
	$(PY) benchmarks/step_time.py

bench-sharded: $(STAMP) proto
	$(PY) benchmarks/sharded.py --json out/sharded.json

clean:
	rm -rf $(VENV) build *.egg-info runtime/_proto/*_pb2*
