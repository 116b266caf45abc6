#!/usr/bin/env bash
# Idempotent installer for the local two-node Slurm test harness (tests/cluster).
# Installs slurm-wlm (slurmctld, slurmd, client tools), munge and iproute2 when missing,
# and creates a munge key when none exists. Fast no-op when everything is already there.
# Must run as root (CI: a clean machine). Non-interactive.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "slurm-deps.sh: must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd    >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch    >/dev/null 2>&1 || need+=(slurm-client)
command -v munged    >/dev/null 2>&1 || need+=(munge)
command -v ip        >/dev/null 2>&1 || need+=(iproute2)
command -v nsenter   >/dev/null 2>&1 || need+=(util-linux)

if ((${#need[@]})); then
    # slurm-wlm pulls slurmctld + slurmd + slurm-client; add it whenever any slurm part is missing.
    pkgs=()
    for p in "${need[@]}"; do
        case $p in
            slurmctld|slurmd|slurm-client) pkgs+=(slurm-wlm) ;;
            *) pkgs+=("$p") ;;
        esac
    done
    # de-duplicate
    mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
    echo "slurm-deps.sh: installing ${pkgs[*]}" >&2
    apt_opts=(-y -q -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    # Refresh lists only when an install from the current lists fails (fast path for warm caches).
    if ! apt-get install "${apt_opts[@]}" --no-install-recommends "${pkgs[@]}" >/tmp/slurm-deps-apt.log 2>&1; then
        apt-get update -q >>/tmp/slurm-deps-apt.log 2>&1
        apt-get install "${apt_opts[@]}" --no-install-recommends "${pkgs[@]}" >>/tmp/slurm-deps-apt.log 2>&1 || {
            tail -n 40 /tmp/slurm-deps-apt.log >&2
            exit 1
        }
    fi
fi

# munge key: the Debian package normally creates one; make sure it exists with the right owner.
key=/etc/munge/munge.key
if [[ ! -s $key ]]; then
    install -d -m 0700 -o munge -g munge /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="$key" --force >/dev/null
    else
        dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
    fi
fi
chown munge:munge "$key"
chmod 0400 "$key"
install -d -m 0755 -o munge -g munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true

echo "slurm-deps.sh: ok ($(slurmctld -V 2>/dev/null || echo 'slurm ?'), $(munged --version 2>/dev/null | head -n1 || echo 'munge ?'))" >&2
