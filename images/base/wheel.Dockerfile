# syntax=docker/dockerfile:1
# Builds the project wheel once per tag; every component image copies it from here, so source trees,
# tests and build tools never reach a runtime image. The build context is a `git archive` of the
# commit being built (images/build.sh), so untracked files (.venv, local secrets) cannot leak in.
ARG PYTHON_BASE
FROM ${PYTHON_BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . /src
# A throw-away venv: a Debian-bootstrapped base has python3 + venv but no pip of its own.
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel --no-deps --wheel-dir /dist /src \
 && cp /src/constraints.txt /dist/constraints.txt

FROM scratch
COPY --from=build /dist /dist
