#!/usr/bin/env bash
# Build the GPU image users pull (`make image`): the Dockerfile with its defaults (CUDA base,
# torch==2.13.0 CUDA wheel from PyPI), OCI labels from git. Uses docker (BuildKit) when there is a
# daemon, else buildah (vfs storage, chroot isolation, as in the tests).
# Env: IMAGE (tag, default job:gpu), BASE_IMAGE / TORCH_SPEC / APP_UID overrides, VERSION, SOURCE.
# Extra arguments go to `docker build` / `buildah bud` (e.g. --push is not one: push separately).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

IMAGE="${IMAGE:-job:gpu}"
args=()
mapfile -t args < <(LAYERS=true label_args; pip_cert_args; index_args)
for v in BASE_IMAGE TORCH_SPEC APP_UID; do
  # BASE_IMAGE has a test default in common.sh; only pass what the caller set explicitly.
  [[ -n "${!v:-}" && "${!v}" != localhost/job-base:* ]] && args+=(--build-arg "$v=${!v}")
done

cd "$REPO_ROOT"
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  log "docker build -t $IMAGE"
  # --label duplicates are for buildah's cache quirk only; docker caches LABEL correctly.
  filtered=(); skip=0
  for a in "${args[@]}"; do
    if ((skip)); then skip=0; continue; fi
    if [[ "$a" == --label ]]; then skip=1; continue; fi
    filtered+=("$a")
  done
  DOCKER_BUILDKIT=1 exec docker build "${filtered[@]}" "$@" -t "$IMAGE" .
fi

"$IMAGE_DIR/deps.sh" >/dev/null
log "buildah bud -t $IMAGE (storage $STORAGE_DRIVER)"
bah bud --layers --isolation chroot "${args[@]}" "$@" -t "$IMAGE" .
bah images "$IMAGE"
