#!/usr/bin/env bash
# Build the GPU image users pull (`make image`): the Dockerfile with its defaults (CUDA base,
# torch==2.13.0 CUDA wheel from PyPI), OCI labels from git. Uses docker (BuildKit) when there is a
# daemon, else buildah (vfs storage, chroot isolation, as in the tests).
# Env: IMAGE (tag, default job:gpu), BASE_IMAGE / TORCH_SPEC / APP_UID overrides, VERSION, SOURCE.
# Extra arguments go to `docker build` / `buildah bud` (e.g. --push is not one: push separately).
set -euo pipefail
# Only what the caller set overrides the Dockerfile's defaults; read before common.sh, which gives
# BASE_IMAGE the CPU test build's Debian base.
overrides=()
for v in BASE_IMAGE TORCH_SPEC APP_UID; do
  [[ -n "${!v:-}" ]] && overrides+=(--build-arg "$v=${!v}")
done
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

IMAGE="${IMAGE:-job:gpu}"
# LAYERS=true: the labels also as --label, which buildah's layer cache needs (label_args); docker takes them too
mapfile -t args < <(LAYERS=true label_args; pip_cert_args; index_args)
args+=(${overrides[@]+"${overrides[@]}"})

cd "$REPO_ROOT"
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  log "docker build -t $IMAGE"
  DOCKER_BUILDKIT=1 exec docker build "${args[@]}" "$@" -t "$IMAGE" .
fi

"$IMAGE_DIR/deps.sh" >/dev/null
log "buildah bud -t $IMAGE (storage $STORAGE_DRIVER)"
bah bud --layers --isolation chroot "${args[@]}" "$@" -t "$IMAGE" .
bah images "$IMAGE"
