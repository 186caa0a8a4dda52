#!/usr/bin/env bash
# Install the Debian packages that tests/slurm_cluster.py needs for its throwaway
# single-node cluster: munge, slurmctld, slurmd and the client commands (sbatch, squeue,
# srun, ...). No slurmdbd or database: the test cluster keeps no accounting.
# Idempotent: returns at once when every package is already installed.
set -euo pipefail

packages=(munge slurmctld slurmd slurm-client)

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
        missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-slurm: ${packages[*]} already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-slurm: run as root to apt-get install ${missing[*]}" >&2
    exit 1
fi

# Keep apt from starting system-wide munged/slurm services: the tests start their own
# daemons with private sockets, and a machine without an init system cannot run them anyway.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
