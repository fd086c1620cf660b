# The two commands a fresh machine needs: `make run` (whole pipeline, embedded default) and `make test`.
.PHONY: setup run test test-fast lint compile bench

setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/rlhf run

# Lint first (seconds): a broken import contract or style fails before the minutes of tests.
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports

test: lint
	.venv/bin/python -m pytest -q

test-fast: lint
	.venv/bin/python -m pytest -q -m "not slow"

compile: setup
	.venv/bin/rlhf compile
