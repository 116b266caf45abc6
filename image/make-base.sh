#!/usr/bin/env bash
# Build the local test base image (no registry needed):
#   debootstrap a minimal Debian bookworm (python3 3.11, python3-venv, tini,
#   ca-certificates) and import it as localhost/job-base:bookworm (vfs storage).
# Skips if the image already exists (FORCE=1 rebuilds). The rootfs tarball is
# cached under $JOB_IMAGE_CACHE (default ~/.cache/job-image) so a fresh storage
# only needs the import (seconds).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
INCLUDE="python3,python3-venv,tini,ca-certificates"
ARCH="$(dpkg --print-architecture)"
KEY="$(printf '%s|%s|%s|v1' "$SUITE" "$INCLUDE" "$ARCH" | sha256sum | cut -c1-12)"
TARBALL="$JOB_IMAGE_CACHE/rootfs-$SUITE-$ARCH-$KEY.tar.gz"

if [[ -z "${FORCE:-}" ]] && image_exists "$BASE_IMAGE"; then
  log "base $BASE_IMAGE exists (FORCE=1 to rebuild)"
  exit 0
fi

"$IMAGE_DIR/deps.sh" >/dev/null

if [[ -n "${FORCE:-}" || ! -s "$TARBALL" ]]; then
  mkdir -p "$JOB_IMAGE_CACHE"
  work="$(mktemp -d "$JOB_IMAGE_CACHE/rootfs.XXXXXX")"
  cleanup() {
    local m
    for m in dev/pts dev proc sys; do umount -l "$work/rootfs/$m" 2>/dev/null || true; done
    rm -rf --one-file-system "$work"
  }
  trap cleanup EXIT
  log "debootstrap $SUITE ($INCLUDE) from $MIRROR"
  t0=$SECONDS
  debootstrap --variant=minbase --include="$INCLUDE" --arch "$ARCH" \
    "$SUITE" "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
      tail -40 "$work/debootstrap.log" >&2
      tail -40 "$work/rootfs/debootstrap/debootstrap.log" >&2 2>/dev/null || true
      exit 1; }
  r="$work/rootfs"
  # Slim it down: apt caches, package lists, docs, man pages.
  rm -rf "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb \
         "$r"/var/lib/apt/lists/* "$r"/usr/share/doc/* "$r"/usr/share/man/* \
         "$r"/usr/share/info/* "$r"/var/log/*.log "$r"/var/log/apt/* "$r"/tmp/*
  # resolv.conf/hosts are provided by the runtime.
  : >"$r/etc/resolv.conf"
  [[ -x "$r/usr/bin/tini" && -x "$r/usr/bin/python3" ]] || { log "rootfs incomplete"; exit 1; }
  tar --numeric-owner --xattrs -C "$r" -czf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
  log "rootfs cached: $TARBALL ($(du -h "$TARBALL" | cut -f1), $((SECONDS - t0))s)"
fi

old_id="$(bah inspect --type image --format '{{.FromImageID}}' "$BASE_IMAGE" 2>/dev/null || true)"
log "importing $TARBALL as $BASE_IMAGE"
pod import --quiet \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  "$TARBALL" "$BASE_IMAGE" >/dev/null
# A replaced base (FORCE=1) is dropped unless an image built on it still holds it.
new_id="$(bah inspect --type image --format '{{.FromImageID}}' "$BASE_IMAGE")"
[[ -n "$old_id" && "$old_id" != "$new_id" ]] && { bah rmi "$old_id" >/dev/null 2>&1 || true; }
bah images "$BASE_IMAGE"
