#!/usr/bin/env bash
# Build the CPU test image localhost/job:test from the repo's Dockerfile, daemonless:
#   buildah bud, chroot isolation, vfs storage,
#   FROM the local Debian base (image/make-base.sh) with the CPU torch wheel from the context.
# Env: TORCH_CPU_WHEEL (default /opt/wheels/torch-2.13.0+cpu-...whl), CONTEXT (default repo root),
#      TEST_IMAGE, BASE_IMAGE, LAYERS=true (cache every step; off by default, see below).
# Extra arguments go to `buildah bud`.
#
# Why no layer cache by default: vfs stores every layer as a full copy of the filesystem, so with
# --layers each cached step still costs a ~2 GB copy and the build gets slower (measured ~3-6 min
# warm vs ~3 min without) and the storage grows by GBs per rebuild.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONTEXT="${CONTEXT:-$REPO_ROOT}"
LAYERS="${LAYERS:-false}"
"$IMAGE_DIR/deps.sh" >/dev/null
"$IMAGE_DIR/make-base.sh"

[[ -s "$TORCH_CPU_WHEEL" ]] || { log "torch CPU wheel not found: $TORCH_CPU_WHEEL"; exit 1; }
wheel="$(basename "$TORCH_CPU_WHEEL")"
dest="$CONTEXT/image/wheels/$wheel"
mkdir -p "$CONTEXT/image/wheels"
# Hard link (or copy) the wheel into the context for this build only, so a later GPU build does not
# send it along (.dockerignore lets image/wheels/*.whl through on purpose).
rm -f "$dest"
cp -l "$TORCH_CPU_WHEEL" "$dest" 2>/dev/null || cp "$TORCH_CPU_WHEEL" "$dest"
trap 'rm -f "$dest"' EXIT

mapfile -t extra < <(label_args; pip_cert_args; index_args)
old_id="$(bah inspect --type image --format '{{.FromImageID}}' "$TEST_IMAGE" 2>/dev/null || true)"

log "building $TEST_IMAGE from $CONTEXT (base $BASE_IMAGE, torch $wheel, layers=$LAYERS)"
t0=$SECONDS
bah bud --layers="$LAYERS" --isolation chroot \
  -f "$REPO_ROOT/Dockerfile" \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  --build-arg "TORCH_SPEC=/wheels/$wheel" \
  --build-arg "EXTRA_REQUIREMENTS=" \
  "${extra[@]}" "$@" \
  -t "$TEST_IMAGE" "$CONTEXT"
log "built $TEST_IMAGE in $((SECONDS - t0))s"

# The previous build of this tag is now untagged: drop it (vfs keeps full copies). Without the
# layer cache nothing else refers to it.
new_id="$(bah inspect --type image --format '{{.FromImageID}}' "$TEST_IMAGE")"
if [[ -n "$old_id" && "$old_id" != "$new_id" && "$LAYERS" != true ]]; then
  bah rmi "$old_id" >/dev/null 2>&1 || true
fi
bah images "$TEST_IMAGE"
