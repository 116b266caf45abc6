#!/usr/bin/env bash
# Build the CPU test image localhost/job:test from the repo's Dockerfile, daemonless:
#   buildah bud --layers, chroot isolation, vfs storage,
#   FROM the local Debian base (image/make-base.sh) with the CPU torch wheel from the context.
# Env: TORCH_CPU_WHEEL (default /opt/wheels/torch-2.13.0+cpu-...whl), CONTEXT (default repo root),
#      TEST_IMAGE, BASE_IMAGE, NO_CACHE=1 (cold build). Extra args go to `buildah bud`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONTEXT="${CONTEXT:-$REPO_ROOT}"
"$IMAGE_DIR/deps.sh" >/dev/null
"$IMAGE_DIR/make-base.sh"

[[ -s "$TORCH_CPU_WHEEL" ]] || { log "torch CPU wheel not found: $TORCH_CPU_WHEEL"; exit 1; }
wheel="$(basename "$TORCH_CPU_WHEEL")"
dest="$CONTEXT/image/wheels/$wheel"
mkdir -p "$CONTEXT/image/wheels"
if ! cmp -s "$TORCH_CPU_WHEEL" "$dest" 2>/dev/null; then
  rm -f "$dest"
  cp -l "$TORCH_CPU_WHEEL" "$dest" 2>/dev/null || cp "$TORCH_CPU_WHEEL" "$dest"
fi

mapfile -t extra < <(label_args; pip_cert_args; index_args)
[[ -n "${NO_CACHE:-}" ]] && extra+=(--no-cache)

log "building $TEST_IMAGE from $CONTEXT (base $BASE_IMAGE, torch $wheel)"
t0=$SECONDS
bah bud --layers="${LAYERS:-true}" --isolation chroot \
  -f "$REPO_ROOT/Dockerfile" \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  --build-arg "TORCH_SPEC=/wheels/$wheel" \
  "${extra[@]}" "$@" \
  -t "$TEST_IMAGE" "$CONTEXT"
log "built $TEST_IMAGE in $((SECONDS - t0))s"
# Intermediate images of earlier builds are kept by --layers for caching; drop dangling ones
# that no tag or cache uses any more (vfs stores every layer as a full copy).
bah images "$TEST_IMAGE"
