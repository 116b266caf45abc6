# Sourced by the image/*.sh scripts. Daemonless build settings used everywhere:
# vfs storage (works inside VMs/containers without overlay or fuse) and chroot
# isolation (no user namespaces, no network namespace setup).
export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"
export BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"

IMAGE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$IMAGE_DIR/.." && pwd)"
JOB_IMAGE_CACHE="${JOB_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/job-image}"

BASE_IMAGE="${BASE_IMAGE:-localhost/job-base:bookworm}"
TEST_IMAGE="${TEST_IMAGE:-localhost/job:test}"
TORCH_CPU_WHEEL="${TORCH_CPU_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"

bah() { buildah --storage-driver "$STORAGE_DRIVER" "$@"; }
pod() { podman --storage-driver "$STORAGE_DRIVER" "$@"; }
image_exists() { bah inspect --type image "$1" >/dev/null 2>&1; }
log() { printf '[image] %s\n' "$*" >&2; }

# OCI label build args from git (empty repo / no git -> placeholders).
label_args() {
  local rev ver src created
  rev="$(git -C "$REPO_ROOT" rev-parse --verify -q HEAD 2>/dev/null)" || rev=unknown
  # version: $VERSION, else a tag on HEAD, else the version in pyproject.toml
  ver="${VERSION:-$(git -C "$REPO_ROOT" describe --tags --exact-match 2>/dev/null || true)}"
  if [[ -z "$ver" ]]; then
    ver="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO_ROOT/pyproject.toml" 2>/dev/null | head -1)"
  fi
  src="${SOURCE:-$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null || echo unknown)}"
  created="${CREATED:-$(date -u +%Y-%m-%dT%H:%M:%SZ)}"
  ver="${ver:-dev}"; rev="${REVISION:-$rev}"
  printf '%s\n' --build-arg "VERSION=$ver" --build-arg "REVISION=$rev" \
    --build-arg "SOURCE=$src" --build-arg "CREATED=$created"
  # With --layers, buildah 1.28 reuses a cached LABEL step even when the build args in it
  # changed (stale revision/created): then also pass them as --label, applied on top.
  if [[ "${LAYERS:-false}" == true ]]; then
    printf '%s\n' --label "org.opencontainers.image.version=$ver" \
      --label "org.opencontainers.image.revision=$rev" \
      --label "org.opencontainers.image.source=$src" \
      --label "org.opencontainers.image.created=$created"
  fi
}

# CA bundle for pip inside the build (TLS-intercepting proxies): passed as a build secret, never
# stored in a layer. PIP_CERT / REQUESTS_CA_BUNDLE / the Debian bundle, first that exists.
pip_cert_args() {
  local c
  for c in "${PIP_CERT:-}" "${REQUESTS_CA_BUNDLE:-}" /etc/ssl/certs/ca-certificates.crt; do
    if [[ -n "$c" && -s "$c" ]]; then printf '%s\n' --secret "id=pip_cert,src=$c"; return; fi
  done
}

# Package index overrides, if the caller set them (the build container cannot see file:// indexes).
index_args() {
  local v
  for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
    [[ -n "${!v:-}" && "${!v}" != *file://* ]] && printf '%s\n' --build-arg "$v=${!v}"
  done
  return 0
}
