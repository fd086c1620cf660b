# Sourced (not run) by images/build.sh and the scripts that run containers: podman with private storage and
# configuration under $RLHF_IMAGES_WORKDIR (default: .images/ in the repository, git-ignored), so nothing
# depends on the machine's global podman state. The settings are the ones ../shared/containers.md measured:
#   - default_ulimits within the hard limits (podman asks for nofile=1048576, which needs CAP_SYS_RESOURCE)
#   - runtime runc + cgroupfs + file events (crun 1.8 fails on the hybrid cgroup layout; no systemd here)
# Defines: podman_service_start / podman_service_stop (the Docker-compatible API for kfp's DockerRunner).
# shellcheck shell=bash

_podman_env_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RLHF_IMAGES_WORKDIR=$(mkdir -p "${RLHF_IMAGES_WORKDIR:-$_podman_env_root/.images}" && cd "${RLHF_IMAGES_WORKDIR:-$_podman_env_root/.images}" && pwd)
export RLHF_IMAGES_WORKDIR

_podman_write_config() {
  local nofile nproc
  nofile=$(ulimit -Hn)
  [ "$nofile" = unlimited ] && nofile=1048576
  nproc=$(ulimit -Hu)
  { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
  mkdir -p "$RLHF_IMAGES_WORKDIR/storage" "$RLHF_IMAGES_WORKDIR/run" "$RLHF_IMAGES_WORKDIR/tmp"
  cat > "$RLHF_IMAGES_WORKDIR/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$RLHF_IMAGES_WORKDIR/run/libpod"
EOF
  cat > "$RLHF_IMAGES_WORKDIR/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$RLHF_IMAGES_WORKDIR/storage"
runroot = "$RLHF_IMAGES_WORKDIR/run"
EOF
}
_podman_write_config

export CONTAINERS_CONF="$RLHF_IMAGES_WORKDIR/containers.conf"
export CONTAINERS_STORAGE_CONF="$RLHF_IMAGES_WORKDIR/storage.conf"
export TMPDIR="$RLHF_IMAGES_WORKDIR/tmp"
PODMAN_SOCKET="$RLHF_IMAGES_WORKDIR/run/podman.sock"

podman_service_start() {  # starts the Docker-compatible API; exports DOCKER_HOST and PODMAN_SERVICE_PID
  command -v podman > /dev/null || { echo "podman not installed (scripts/setup.sh images)" >&2; return 2; }
  rm -f "$PODMAN_SOCKET"
  podman system service --time=0 "unix://$PODMAN_SOCKET" > "$RLHF_IMAGES_WORKDIR/service.log" 2>&1 &
  PODMAN_SERVICE_PID=$!
  export PODMAN_SERVICE_PID DOCKER_HOST="unix://$PODMAN_SOCKET"
  local _
  for _ in $(seq 100); do [ -S "$PODMAN_SOCKET" ] && return 0; sleep 0.1; done
  echo "podman API did not start; see $RLHF_IMAGES_WORKDIR/service.log" >&2
  return 1
}

podman_service_stop() {
  [ -n "${PODMAN_SERVICE_PID:-}" ] && kill "$PODMAN_SERVICE_PID" 2> /dev/null && wait "$PODMAN_SERVICE_PID" 2> /dev/null
  PODMAN_SERVICE_PID=
  return 0
}
