"""A real single-node SLURM cluster for the tests: munged, slurmctld and slurmd on this machine.

Everything lives in one directory (munge key and socket, slurm.conf, state, spool, logs);
ports are picked free, so it neither needs nor disturbs a system SLURM or munge. Needs
root (slurmd launches the jobs) and the Debian packages slurmctld, slurmd, slurm-client,
munge (`scripts/install_debian_deps.sh`). Finished jobs stay visible to `scontrol show
job` for an hour (MinJobAge): there is no accounting database, so that is where the tests
read final states.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
BINARIES = ("sbatch", "squeue", "scontrol", "sinfo", "scancel", "srun", "slurmctld", "slurmd", "munged")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_packages() -> Optional[str]:
    """Install the Debian packages when missing; None when ready, else why not."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        return f"SLURM binaries missing ({', '.join(missing_binaries())}) and not root to install them"
    try:
        out = subprocess.run(
            ["bash", str(REPO / "scripts" / "install_debian_deps.sh")], capture_output=True, text=True, timeout=900
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"scripts/install_debian_deps.sh did not finish: {err}"
    if missing_binaries():
        tail = (out.stdout + out.stderr).strip().splitlines()[-5:]
        return f"SLURM packages could not be installed (still missing {', '.join(missing_binaries())}): " + " | ".join(
            tail
        )
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def memory_mb(fraction: float = 0.9) -> int:
    """This machine's memory in MB, times `fraction` (a node's RealMemory)."""
    found = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    if found is None:
        raise RuntimeError("/proc/meminfo has no MemTotal line")
    return int(int(found.group(1)) / 1024 * fraction)


def common_conf(root: Path, munge_socket: Path, cluster_name: str, ctld_host: str, ctld_addr: str) -> str:
    """The slurm.conf lines every test cluster shares: its own ports (picked free), munge socket,
    state and logs under `root`; the slurmd lines (spool, pid, log), nodes and partition follow."""
    return f"""\
ClusterName={cluster_name}
SlurmctldHost={ctld_host}({ctld_addr})
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={munge_socket},cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root / "state"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmctldLogFile={root / "slurmctld.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=5
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
"""


class SlurmCluster:
    def __init__(self, root: Path, partition: str = "debug"):
        self.root = Path(root)
        self.partition = partition
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.socket = self.munge_dir / "munge.socket"
        self.pids: dict[str, Path] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- lifecycle -----------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        self._run([_sbin("slurmctld"), "-f", str(self.conf)])
        self.pids["slurmctld"] = self.root / "slurmctld.pid"
        self._wait(lambda: self.call("scontrol", "ping").stdout.find("UP") >= 0, timeout, "slurmctld to answer")
        self._run([_sbin("slurmd"), "-f", str(self.conf)])
        self.pids["slurmd"] = self.root / "slurmd.pid"
        self._wait(self._node_idle, timeout, f"node {self.node} to be idle")

    def stop(self) -> None:
        try:
            jobs = self.queued_jobs() if self.pids.get("slurmctld") else []
            if jobs:
                self.call("scancel", "--quiet", *jobs)
                deadline = time.time() + 30
                while self.queued_jobs(jobs) and time.time() < deadline:
                    time.sleep(0.5)
        finally:
            pids = [pid for pid in (self._pid(name) for name in ("slurmd", "slurmctld", "munged")) if pid]
            for pid in pids:  # only the daemons this object started, by their pid files
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 15
            while any(_pid_alive(p) for p in pids) and time.time() < deadline:
                time.sleep(0.1)
            for pid in pids:
                if _pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)

    def _pid(self, name: str) -> Optional[int]:
        path = self.pids.get(name)
        try:
            return int(path.read_text().split()[0]) if path is not None else None
        except (OSError, ValueError, IndexError):
            return None

    # -- pieces --------------------------------------------------------------------
    def _start_munge(self) -> None:
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.munge_dir, 0o755)
        key = self.munge_dir / "munge.key"
        if shutil.which("mungekey") or Path("/usr/sbin/mungekey").exists():
            self._run([_sbin("mungekey"), "--create", "--bits", "1024", "--keyfile", str(key), "--force"])
        else:
            key.write_bytes(os.urandom(128))
        os.chown(key, os.geteuid(), os.getegid())  # owned by the user munged runs as (root here)
        os.chmod(key, 0o600)
        pid = self.munge_dir / "munged.pid"
        self._run(
            [
                _sbin("munged"),
                "--force",
                f"--key-file={key}",
                f"--socket={self.socket}",
                f"--pid-file={pid}",
                f"--log-file={self.munge_dir / 'munged.log'}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
            ]
        )
        self.pids["munged"] = pid
        self._wait(self.socket.exists, 20, "munged's socket")

    def _write_conf(self) -> None:
        cpus = len(os.sched_getaffinity(0))
        self.conf.write_text(
            common_conf(self.root, self.socket, "melttest", self.node, "127.0.0.1")
            + f"""\
SlurmdSpoolDir={self.root / "spool"}
SlurmdPidFile={self.root / "slurmd.pid"}
SlurmdLogFile={self.root / "slurmd.log"}
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb()} State=UNKNOWN
# OverSubscribe: several jobs may share the cores (2-task jobs and the tests' own processes)
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""
        )

    def _node_idle(self) -> bool:
        state = self.call("sinfo", "-h", "-n", self.node, "-o", "%t").stdout.strip()
        if state.rstrip("*") in ("drain", "drng", "down") and not state.endswith("*"):
            self.call("scontrol", "update", f"nodename={self.node}", "state=resume")
        return state == "idle"

    def _wait(self, ready, timeout: float, what: str, poll: float = 0.1) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            time.sleep(poll)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.log_tails()}")

    def _run(self, cmd: list[str]) -> None:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}\n{self.log_tails()}")

    # -- queries -------------------------------------------------------------------
    def call(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def queued_jobs(self, ids: Optional[list[str]] = None) -> list[str]:
        cmd = ["squeue", "-h", "-o", "%i"] + (["-j", ",".join(ids)] if ids else [])
        out = self.call(*cmd)
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Reason, Restarts, ExitCode, Dependency, ...)."""
        out = self.call("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w[\w:/]*)=(\S*)", out.stdout))

    def wait_jobs(self, ids: list[str], timeout: float) -> dict[str, dict[str, str]]:
        """Poll until none of `ids` is pending or running; their final `scontrol show job` records."""
        deadline = time.time() + timeout
        while self.queued_jobs(ids):
            if time.time() > deadline:
                states = {i: self.job(i).get("JobState") for i in ids}
                raise TimeoutError(f"jobs still queued after {timeout:.0f}s: {states}\n{self.log_tails()}")
            time.sleep(1.0)
        return {i: self.job(i) for i in ids}

    def log_files(self) -> list[Path]:
        return [self.root / "slurmctld.log", self.root / "slurmd.log", self.munge_dir / "munged.log"]

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for path in self.log_files():
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)
