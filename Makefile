# The two commands a fresh machine needs: `make run` (whole pipeline, embedded default) and `make test`.
.PHONY: setup run test test-fast compile bench

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/rlhf run

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"

compile: setup
	.venv/bin/rlhf compile
