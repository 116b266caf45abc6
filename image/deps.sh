#!/usr/bin/env bash
# Host tools for building/running the image without a Docker daemon:
# buildah (build + run, chroot isolation, vfs storage), podman (import),
# debootstrap (local Debian base). Idempotent and non-interactive; run as root.
set -euo pipefail

PKGS=(buildah podman debootstrap)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "deps.sh: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends keeps out slirp4netns/crun alternatives etc. we do
  # not use; buildah still pulls runc + containers-common it needs.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Storage/isolation we always use (no overlay, no user namespaces needed).
mkdir -p /etc/containers
if [[ ! -s /etc/containers/policy.json ]]; then
  cat >/etc/containers/policy.json <<'JSON'
{ "default": [ { "type": "insecureAcceptAnything" } ] }
JSON
fi

buildah --version
