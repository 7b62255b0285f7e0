#!/usr/bin/env bash
# Debian packages the tests need, installed only when missing (root or sudo).
set -euo pipefail
need=()
command -v g++ >/dev/null || need+=(g++)           # DeepSpeed's CPU comm op compiles once
command -v sbatch >/dev/null || need+=(slurm-client)
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v munged >/dev/null || need+=(munge)
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${need[*]}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
