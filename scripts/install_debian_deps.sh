#!/usr/bin/env bash
# Debian packages the tests (and, with --demo, the demo) need, installed only when missing
# (root or sudo). The SLURM tests (tests/slurm) start a single-node cluster from these: slurmctld,
# slurmd, the client commands (sbatch, squeue, scontrol, sinfo, scancel, srun) and munge; the
# two-node cluster (tests/slurm/multinode.py) also needs ip (iproute2) and nsenter / unshare (util-linux).
#   scripts/install_debian_deps.sh          # everything the tests need
#   scripts/install_debian_deps.sh --demo   # g++ only (DeepSpeed's CPU comm op compiles once)
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
need=()
have g++ || need+=(g++)
if [ "${1:-}" != "--demo" ]; then
  for cmd in sbatch squeue scontrol sinfo scancel srun; do
    have "$cmd" || { need+=(slurm-client); break; }
  done
  have slurmctld || need+=(slurmctld)
  have slurmd || need+=(slurmd)
  { have munged && have mungekey; } || need+=(munge)
  have ip || need+=(iproute2)
  { have nsenter && have unshare; } || need+=(util-linux)
fi
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${need[*]}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
