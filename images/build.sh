#!/usr/bin/env bash
# Build and push every image under one tag and record the pushed digests in images/images.yaml.
#
#   images/build.sh push [TAG]     build + push all images, rewrite images/images.yaml (default TAG: git short sha)
#   images/build.sh pin-bases      resolve the base tags in images/bases.env to digests and write them back
#   images/build.sh list           print the images that would be built
#   images/build.sh local [TAG]    build every CPU image here with podman, no registry needed (see below)
#   images/build.sh local-gpu [TAG]  build the GPU step images here (CUDA torch wheels from PyPI; on demand)
#
# Environment: REGISTRY (default: the registry in images/images.yaml), DOCKER (default: docker),
# ALLOW_UNPINNED_BASE=1 to build from a base that has no digest in bases.env yet (not for production).
#
# `local` builds into podman's private storage under $RLHF_IMAGES_WORKDIR (default .images/, images/podman-env.sh).
# Its base is the pinned public slim image when that can be pulled, else a Debian rootfs bootstrapped from the
# machine's apt sources with mmdebstrap. Every step image is built on the CPU base (the GPU steps too: this is
# the machine-local pipeline), and the digests go to $RLHF_IMAGES_WORKDIR/images.yaml, the file
# `RLHF_IMAGES_FILE=.images/images.yaml rlhf compile` and `rlhf run --runner docker` read (images/images.yaml
# stays the registry's). The machine's CA bundle is bind-mounted into each build (TLS-intercepting proxies),
# never copied into a layer.#
# Images are built from `git archive HEAD`, not from the working tree: what is tagged is exactly the
# commit named by the tag, and untracked files (.venv, credentials) can never enter a build context.
# Needs docker with BuildKit (Docker >= 23) and a prior `docker login` to the registry.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
images_yaml="$here/images.yaml"
DOCKER=${DOCKER:-docker}

# The pipeline steps' images, each built from images/step/Dockerfile: images.yaml key : shared base
# (python = slim CPU, cuda = GPU) : pip extras of the project wheel. A GPU stage of the registry
# (rlhf_pipeline/stages.py) gets cuda and gpu; tests/deploy/test_images.py checks this table against it.
# Order matters: ops (its own Dockerfile) is built after these so that it carries their digests.
STEP_IMAGES="prepare_data:python: sft:cuda:gpu reward:cuda:gpu ppo:cuda:gpu dpo:cuda:gpu evaluate:cuda:gpu report:python:"

die() { echo "build.sh: error: $*" >&2; exit 2; }

# shellcheck source=images/bases.env
. "$here/bases.env"

yaml_value() {  # top-level scalar from images.yaml (flat "key: value" lines; no YAML parser needed)
  sed -n "s/^$1:[[:space:]]*//p" "$images_yaml" | head -n1
}

image_name() {  # images.yaml key -> repository name (rlhf-prepare-data for prepare_data)
  echo "rlhf-$(echo "$1" | tr '_' '-')"
}

pinned() {  # "image@digest" or, with ALLOW_UNPINNED_BASE=1, the bare tag
  local ref=$1 digest=$2 var=$3
  if [ -n "$digest" ]; then echo "$ref@$digest"; return; fi
  [ "${ALLOW_UNPINNED_BASE:-0}" = 1 ] || die "$var has no digest in images/bases.env; run 'images/build.sh pin-bases' (or ALLOW_UNPINNED_BASE=1)"
  echo "build.sh: warning: building from unpinned base $ref" >&2
  echo "$ref"
}

write_images_yaml() {  # registry tag, then "key name digest" lines on stdin
  local registry=$1 tag=$2 tmp
  tmp=$(mktemp)
  {
    sed -n '/^#/p' "$images_yaml"   # keep the file's header comment
    echo "registry: $registry"
    echo "tag: $tag"
    echo "images:"
    while read -r key name digest; do
      echo "  $key: {name: $name, digest: ${digest:-null}}"
    done
  } > "$tmp"
  mv "$tmp" "$images_yaml"
}

push_one() {  # dir dockerfile ref [build args...] -> prints the pushed digest
  local dir=$1 file=$2 ref=$3; shift 3
  "$DOCKER" build --file "$file" --tag "$ref" "$@" "$dir" >&2
  "$DOCKER" push "$ref" >&2
  # RepoDigests is filled in by the push: "<repo>@sha256:...".
  "$DOCKER" image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$ref" \
    | sed -n "s|^${ref%:*}@||p" | head -n1
}

cmd_list() {
  local entry key base extras
  for entry in $STEP_IMAGES; do
    IFS=: read -r key base extras <<< "$entry"
    echo "$key $(image_name "$key") ($base${extras:+, extras $extras}; images/step/Dockerfile)"
  done
  echo "ops $(image_name ops) (python; images/ops/Dockerfile)"
  echo "mlflow-server rlhf-mlflow-server (python; images/mlflow-server/Dockerfile)"
}

cmd_pin_bases() {
  local var digest tmp
  tmp=$(mktemp)
  cp "$here/bases.env" "$tmp"
  for var in PYTHON_BASE CUDA_BASE; do
    digest=$("$DOCKER" buildx imagetools inspect --format '{{.Manifest.Digest}}' "${!var}")
    [[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]] || die "could not resolve a digest for ${!var} (got '$digest')"
    sed -i "s|^${var}_DIGEST=.*|${var}_DIGEST=$digest|" "$tmp"
    echo "$var=${!var}@$digest"
  done
  mv "$tmp" "$here/bases.env"
}

cmd_push() {
  local tag=${1:-$(git -C "$root" rev-parse --short=12 HEAD)}
  local registry=${REGISTRY:-$(yaml_value registry)}
  [[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "invalid tag '$tag'"
  [ -n "$registry" ] || die "no registry (set REGISTRY or 'registry:' in images/images.yaml)"
  if [ -n "$(git -C "$root" status --porcelain)" ]; then
    echo "build.sh: warning: uncommitted changes are NOT in the images (they are built from HEAD)" >&2
  fi

  local python_base cuda_base
  python_base=$(pinned "$PYTHON_BASE" "$PYTHON_BASE_DIGEST" PYTHON_BASE)
  cuda_base=$(pinned "$CUDA_BASE" "$CUDA_BASE_DIGEST" CUDA_BASE)
  ctx=$(mktemp -d)
  trap 'rm -rf "$ctx"' EXIT  # ctx is global: the trap runs after cmd_push returns
  git -C "$root" archive --format=tar HEAD | tar -x -C "$ctx"
  requirements > "$ctx/requirements.txt"
  local common=(--build-arg "RLHF_UID=$RLHF_UID" --build-arg "TORCH_VERSION=$TORCH_VERSION")

  # Shared layers, kept local (they are only FROM-ed by the images below).
  "$DOCKER" build --file "$ctx/images/base/python.Dockerfile" --tag "rlhf-base-python:$tag" "${common[@]}" \
    --build-arg "PYTHON_BASE=$python_base" --build-arg "TORCH_CPU_INDEX=$TORCH_CPU_INDEX" "$ctx" >&2
  "$DOCKER" build --file "$ctx/images/base/cuda.Dockerfile" --tag "rlhf-base-cuda:$tag" "${common[@]}" \
    --build-arg "CUDA_BASE=$cuda_base" "$ctx" >&2
  "$DOCKER" build --file "$ctx/images/base/wheel.Dockerfile" --tag "rlhf-wheel:$tag" \
    --build-arg "PYTHON_BASE=$python_base" "$ctx" >&2

  local records=() entry key base extras name digest
  build_component() {  # key base dockerfile [build args...]
    key=$1 base=$2 name=$(image_name "$1")
    local file=$3; shift 3
    digest=$(push_one "$ctx" "$file" "$registry/$name:$tag" "${common[@]}" \
      --build-arg "BASE_IMAGE=rlhf-base-$base:$tag" --build-arg "WHEEL_IMAGE=rlhf-wheel:$tag" "$@")
    [[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]] || die "no digest recorded for $registry/$name:$tag"
    records+=("$key $name $digest")
    echo "build.sh: pushed $registry/$name:$tag@$digest" >&2
  }
  for entry in $STEP_IMAGES; do
    IFS=: read -r key base extras <<< "$entry"
    build_component "$key" "$base" "$ctx/images/step/Dockerfile" \
      --build-arg "EXTRAS=$extras" --build-arg "IMAGE_TITLE=$(image_name "$key")"
  done

  # Record the pipeline images first: the ops image copies images.yaml and must see these digests.
  printf '%s\n' "${records[@]}" "ops $(image_name ops)" "mlflow-server rlhf-mlflow-server" \
    | write_images_yaml "$registry" "$tag"
  cp "$images_yaml" "$ctx/images/images.yaml"
  build_component ops python "$ctx/images/ops/Dockerfile"

  digest=$(push_one "$ctx" "$ctx/images/mlflow-server/Dockerfile" "$registry/rlhf-mlflow-server:$tag" \
    --build-arg "PYTHON_BASE=$python_base" --build-arg "RLHF_UID=$RLHF_UID")
  [[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]] || die "no digest recorded for $registry/rlhf-mlflow-server:$tag"
  records+=("mlflow-server rlhf-mlflow-server $digest")
  printf '%s\n' "${records[@]}" | write_images_yaml "$registry" "$tag"
  echo "build.sh: recorded ${#records[@]} images in images/images.yaml (tag $tag); commit it." >&2
}

# ----------------------------------------------------------------------------------------------------------------
# local: podman, private storage, no registry
# ----------------------------------------------------------------------------------------------------------------

DEBIAN_BASE=localhost/rlhf-debian-base

# A build from empty storage peaks at ~6.3 GiB on the disk (2.3 GiB of images once done: a layer's container and
# its committed copy coexist while podman commits it); layers already in the storage are reused, not rewritten.
# Checked up front: a full disk otherwise surfaces minutes later as podman's "no space left on device".
check_free_disk() {
  local need_mb=$((${RLHF_IMAGES_MIN_FREE_GB:-7} * 1024)) free_mb have_mb
  free_mb=$(df -Pm "$RLHF_IMAGES_WORKDIR" | awk 'NR == 2 {print $4}')
  have_mb=$(du -sm "$RLHF_IMAGES_WORKDIR/storage" 2> /dev/null | cut -f1)
  [ $((free_mb + ${have_mb:-0})) -ge "$need_mb" ] \
    || die "$RLHF_IMAGES_WORKDIR: ${free_mb} MiB free, a build from empty storage needs ~$need_mb MiB (free some disk, point RLHF_IMAGES_WORKDIR elsewhere, or set RLHF_IMAGES_MIN_FREE_GB)"
}

local_setup() {  # podman env, build context (HEAD + the extracted requirements), common podman build args
  # shellcheck source=images/podman-env.sh
  . "$here/podman-env.sh"
  command -v podman > /dev/null || die "podman is not installed (scripts/setup.sh images installs it)"
  check_free_disk
  ctx="$RLHF_IMAGES_WORKDIR/context"
  rm -rf "$ctx" && mkdir -p "$ctx"
  git -C "$root" archive --format=tar HEAD | tar -x -C "$ctx"
  requirements > "$ctx/requirements.txt"
  local_args=(--layers --build-arg "RLHF_UID=$RLHF_UID" --build-arg "TORCH_VERSION=$TORCH_VERSION")
  # Wheels this machine keeps on disk (pip's find-links, e.g. the CPU torch wheel where the PyTorch index is
  # unreachable) are offered to pip in the build, read-only, exactly as the host's own pip sees them.
  local dir bundle
  pip_links=${PIP_FIND_LINKS:-$(pip3 config get global.find-links 2> /dev/null || true)}
  for dir in $pip_links; do
    [ -d "$dir" ] && local_args+=(--volume "$dir:$dir:ro")
  done
  local_args+=(--build-arg "PIP_FIND_LINKS=$pip_links")
  for bundle in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    if [ -f "$bundle" ]; then local_args+=(--volume "$bundle:/etc/ssl/certs/ca-certificates.crt:ro"); break; fi
  done
}

requirements() {  # the project's own requirements, one a line, from pyproject.toml (the deps layer installs them)
  python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
    "$ctx/pyproject.toml"
}

local_base() {  # prints the base image reference to build FROM
  if [ -n "$PYTHON_BASE_DIGEST" ] && podman pull -q "$PYTHON_BASE@$PYTHON_BASE_DIGEST" > /dev/null 2>&1; then
    echo "$PYTHON_BASE@$PYTHON_BASE_DIGEST"; return
  fi
  local suite
  suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  if ! podman image exists "$DEBIAN_BASE:$suite"; then
    command -v mmdebstrap > /dev/null || die "no registry base and no mmdebstrap (scripts/setup.sh images)"
    echo "build.sh: bootstrapping $DEBIAN_BASE:$suite from Debian packages" >&2
    local t0=$SECONDS
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      "$suite" "$RLHF_IMAGES_WORKDIR/rootfs.tar" >&2
    podman import --change 'CMD ["/bin/bash"]' "$RLHF_IMAGES_WORKDIR/rootfs.tar" "$DEBIAN_BASE:$suite" > /dev/null
    rm -f "$RLHF_IMAGES_WORKDIR/rootfs.tar"
    echo "build.sh: timing base $((SECONDS - t0)) s" >&2
  fi
  echo "$DEBIAN_BASE:$suite"
}

local_build() {  # name dockerfile [build args...]: builds localhost/<name>:<tag>, prints its digest
  local name=$1 file=$2 t0=$SECONDS; shift 2
  podman build "${local_args[@]}" --file "$file" --tag "localhost/$name:$tag" "$@" "$ctx" >&2 \
    || die "podman build of $name failed"
  echo "build.sh: timing $name $((SECONDS - t0)) s" >&2
  podman image inspect --format '{{.Digest}}' "localhost/$name:$tag"
}

cmd_local() {
  local tag=${1:-$(git -C "$root" rev-parse --short=12 HEAD)} flavour=${2:-cpu}
  [[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "invalid tag '$tag'"
  if [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
    echo "build.sh: warning: uncommitted changes are NOT in the images (they are built from HEAD)" >&2
  fi
  local_setup
  local base t0=$SECONDS
  base=$(local_base)
  # CPU: the CPU torch wheel. GPU: the default PyPI torch wheel, which brings the CUDA runtime as nvidia-* wheels
  # (the driver comes from the NVIDIA container runtime), on the same base: the CUDA base of bases.env needs a
  # registry. The gpu extra (bitsandbytes) goes into the GPU step images, as in `push`.
  local index=$TORCH_CPU_INDEX suffix="" records=() entry key kind extras digest
  if [ "$flavour" = gpu ]; then
    index=https://pypi.org/simple suffix=-gpu
  elif ! getent hosts "$(echo "$TORCH_CPU_INDEX" | cut -d/ -f3)" > /dev/null; then
    # No PyTorch index: PyPI, where pip prefers the local "+cpu" wheel of find-links (it sorts above "2.13.0").
    compgen -G "$(echo "${pip_links:-/nonexistent}" | cut -d' ' -f1)/torch-$TORCH_VERSION+cpu-*.whl" > /dev/null \
      || die "$TORCH_CPU_INDEX is unreachable and no torch-$TORCH_VERSION+cpu wheel is in pip's find-links"
    index=https://pypi.org/simple
  fi
  local base_args=(--build-arg "PYTHON_BASE=$base" --build-arg "TORCH_CPU_INDEX=$index")
  # GPU: no find-links, whose "+cpu" torch pip would prefer to PyPI's CUDA one.
  [ "$flavour" = gpu ] && base_args+=(--build-arg "PIP_FIND_LINKS=")
  local_build "rlhf-base$suffix" "$ctx/images/base/python.Dockerfile" "${base_args[@]}" > /dev/null
  local_build rlhf-wheel "$ctx/images/base/wheel.Dockerfile" --build-arg "PYTHON_BASE=$base" > /dev/null
  local step_args=(--build-arg "BASE_IMAGE=localhost/rlhf-base$suffix:$tag" --build-arg "WHEEL_IMAGE=localhost/rlhf-wheel:$tag")
  for entry in $STEP_IMAGES; do
    IFS=: read -r key kind extras <<< "$entry"
    if [ "$flavour" = gpu ]; then
      [ "$kind" = cuda ] || continue
    else
      extras=""  # the CPU pipeline: no CUDA library in any image
    fi
    digest=$(local_build "$(image_name "$key")$suffix" "$ctx/images/step/Dockerfile" "${step_args[@]}" \
      --build-arg "EXTRAS=$extras" --build-arg "IMAGE_TITLE=$(image_name "$key")")
    records+=("$key $(image_name "$key")$suffix $digest")
  done
  if [ "$flavour" = gpu ]; then
    echo "build.sh: built the GPU step images in $((SECONDS - t0)) s (not recorded: the local pipeline is CPU)" >&2
    podman images --filter "reference=localhost/rlhf-*$suffix:$tag" --format '{{.Repository}}:{{.Tag}} {{.Size}}' >&2
    return
  fi
  images_yaml="$RLHF_IMAGES_WORKDIR/images.yaml"
  {
    echo "# Written by images/build.sh local: the images built on this machine (podman storage in $RLHF_IMAGES_WORKDIR)."
    echo "# Read with RLHF_IMAGES_FILE=$images_yaml (rlhf compile) or by rlhf run --runner docker."
  } > "$images_yaml"
  printf '%s\n' "${records[@]}" "ops $(image_name ops)" | write_images_yaml localhost "$tag"
  cp "$images_yaml" "$ctx/images/images.yaml"
  digest=$(local_build "$(image_name ops)" "$ctx/images/ops/Dockerfile" "${step_args[@]}")
  records+=("ops $(image_name ops) $digest")
  printf '%s\n' "${records[@]}" | write_images_yaml localhost "$tag"
  rm -rf "$ctx"
  echo "build.sh: built ${#records[@]} images in $((SECONDS - t0)) s; digests in $images_yaml" >&2
  podman images --filter "reference=localhost/rlhf-*:$tag" --format '{{.Repository}}:{{.Tag}} {{.Size}}' >&2
}

case "${1:-}" in
  push) shift; cmd_push "$@" ;;
  local) shift; cmd_local "${1:-}" cpu ;;
  local-gpu) shift; cmd_local "${1:-}" gpu ;;
  pin-bases) cmd_pin_bases ;;
  list) cmd_list ;;
  *) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
