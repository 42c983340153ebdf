# The two commands of the README: `make demo` (main job) and `make test`.
.PHONY: setup demo test quick lint bench

DEMO_CONFIG ?= configs/fashion_mnist_demo.yaml
DEMO_ARGS ?=

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/simclrv2 pipeline --config $(DEMO_CONFIG) $(DEMO_ARGS)

lint: setup
	.venv/bin/ruff check src tests benchmarks

test: setup lint
	.venv/bin/python -m pytest  # -q comes from pyproject's addopts; -qq would hide the summary line

# every test but the end-to-end ones marked slow (SIGKILL loops, torchrun, whole pipelines): make test
# and CI run those too
quick: setup
	.venv/bin/python -m pytest -m "not slow"

bench: setup
	.venv/bin/python benchmarks/augment.py
	.venv/bin/python benchmarks/throughput.py
