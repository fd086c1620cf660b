# The two commands a fresh machine needs: `make run` (whole pipeline, embedded default) and `make test`.
.PHONY: setup run test test-fast lint compile bench images images-gpu compile-local test-images screenshots

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

# Every CPU image built here with podman (private storage in .images/; images/build.sh local), digests in
# .images/images.yaml; `make compile-local` compiles the pipeline against them, `rlhf run --runner docker` runs them.
images: setup
	bash scripts/setup.sh images
	bash images/build.sh local

# The GPU step images (CUDA torch wheels from PyPI, several GB): on demand, never in CI.
images-gpu: setup
	bash scripts/setup.sh images
	bash images/build.sh local-gpu

compile-local: images
	RLHF_IMAGES_FILE=.images/images.yaml .venv/bin/rlhf compile --output .images/rlhf_pipeline.yaml

# The tests that run the images, failing (not skipping) when the images are missing.
test-images: images
	RLHF_REQUIRE_IMAGES=1 .venv/bin/python -m pytest -q tests/deploy/test_images_run.py tests/deploy/test_docker_runner.py

# The MLflow UI of the last `make run` (outputs/mlflow.db) as PNGs in outputs/screenshots/: headless Chromium from
# Debian's packages against a real `mlflow server` on 127.0.0.1 (docs/pipeline.md "Screenshots").
screenshots: setup
	bash scripts/setup.sh screenshots
	.venv/bin/python scripts/mlflow_screenshots.py --backend-store-uri sqlite:///outputs/mlflow.db \
		--artifacts-destination outputs/mlartifacts --out outputs/screenshots
