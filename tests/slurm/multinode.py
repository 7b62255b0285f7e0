"""A real two-node SLURM cluster on this one machine: each node a set of Linux namespaces.

    controller (root namespace)            node mn1                      node mn2
    munged, slurmctld on 10.231.0.1  <-->  slurmd on 10.231.0.11   <-->  slurmd on 10.231.0.12
              bridge meltmn-br  ---------- veth meltmn-mn1 -------------- veth meltmn-mn2

Each node is a network namespace (`ip netns`, /run/netns/meltmn-<node>) joined to a bridge in
the root namespace by a veth pair, plus its own UTS (its host name is the node's name), IPC
and mount namespace; the file system is shared, as NFS would be. Its slurmd starts as

    nsenter --net=/run/netns/NS unshare --uts --ipc --mount --propagation private \\
        sh -c 'hostname NODE; mount --bind HOSTS /etc/hosts; mount -t tmpfs tmpfs /dev/shm; exec slurmd -D ...'

(not `ip netns exec`: that remounts /sys and hides the cgroup tree slurmd needs). Every job
step slurmd starts inherits the node's namespaces, so a task sees its node's host name, its own
/dev/shm and System V IPC (two "nodes" would otherwise collide on mosaicml-streaming's
shared-memory names, which real nodes never do), and reaches the other node over the bridge.

Names: a hosts file (localhost, mn1, mn2) is bind-mounted over /etc/hosts inside the nodes, and
the nodes' lines, tagged with MARKER, are added to the root namespace's /etc/hosts (removed at
stop), so no lookup leaves the machine. munge has its own key and socket under the cluster's
folder; ports are picked free, the cluster name, state and spool differ from the single-node
cluster's (`cluster.py`), so the two can be up at the same time.

Only one two-node cluster runs on the machine at a time: `start` takes an exclusive lock
(LOCK, released by `stop` or when the process dies), then cleans what an earlier run that died
left behind (its daemons by their pid files, every process still inside the node namespaces,
the namespaces, links, bridge and hosts lines), so set-up is idempotent. Needs root, `ip`
(iproute2), `nsenter` and `unshare` (util-linux) and the SLURM packages.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional, TextIO

from tests.slurm.cluster import SlurmCluster, _pid_alive, _sbin, common_conf, memory_mb, missing_binaries

NODES = ("mn1", "mn2")
SUBNET = "10.231.0"  # /24; the controller on .1, node i on .(10 + i)
PREFIX = "meltmn"  # namespaces meltmn-mn1, links meltmn-mn1 / meltmn-br
BRIDGE = f"{PREFIX}-br"
MARKER = "# melt-two-node-test-cluster"  # tags this cluster's lines in /etc/hosts
LOCK = Path("/run/lock/melt-two-node-cluster.lock")
REGISTRY = Path("/run/melt-two-node-cluster.json")  # the folder of the cluster last started (for clean-up)
HOSTS = Path("/etc/hosts")
TOOLS = ("ip", "nsenter", "unshare", "mount", "hostname")


def why_not_available() -> Optional[str]:
    """None when a two-node cluster can start here, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "the two-node SLURM cluster needs root (network namespaces, bind mounts, slurmd)"
    missing = [
        t
        for t in TOOLS
        if shutil.which(t) is None and not Path("/usr/sbin", t).exists() and not Path("/sbin", t).exists()
    ]
    if missing:
        return f"the two-node SLURM cluster needs {', '.join(missing)} (iproute2, util-linux)"
    if missing_binaries():
        return f"SLURM binaries missing: {', '.join(missing_binaries())}"
    if not Path("/proc/self/ns/net").exists():
        return "no network namespaces on this kernel"
    return None


def _tool(name: str) -> str:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin", name), Path("/sbin", name)) if p.exists()), name
    )


def _quiet(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([_tool(cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=30)


def namespace(node: str) -> str:
    return f"{PREFIX}-{node}"


def address(node: str) -> str:
    return f"{SUBNET}.{10 + NODES.index(node) + 1}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_pids(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is still there after `grace` seconds (children are reaped by their owner)."""
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    """Alive and not a zombie."""
    if not _pid_alive(pid):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def namespace_pids(node: str) -> list[int]:
    """Every process inside the node's network namespace (slurmd, slurmstepd, the tasks)."""
    out = _quiet("ip", "netns", "pids", namespace(node))
    return [int(p) for p in out.stdout.split() if p.strip().isdigit()] if out.returncode == 0 else []


def remove_hosts_lines() -> None:
    text = HOSTS.read_text()
    kept = [line for line in text.splitlines(keepends=True) if MARKER not in line]
    if len(kept) != len(text.splitlines(keepends=True)):
        with open(HOSTS, "r+") as f:  # in place: /etc/hosts may be a bind mount (no rename over it)
            f.write("".join(kept))
            f.truncate()


def clean_leftovers() -> None:
    """What an earlier two-node cluster left behind (a test process that died): daemons, namespaces,
    links, hosts lines. Only ours: pids from its pid files whose command line names its folder, and
    the processes inside our namespaces."""
    try:
        root = Path(json.loads(REGISTRY.read_text())["root"])
    except (OSError, ValueError, KeyError, TypeError):
        root = None
    for node in NODES:
        _kill_pids(namespace_pids(node), grace=2.0)
    if root is not None:
        pid_files = [root / "slurmctld.pid", root / "munge" / "munged.pid", *root.glob("slurmd-*.pid")]
        pids = []
        for path in pid_files:
            try:
                pid = int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if _alive(pid) and str(root) in _cmdline(pid):
                pids.append(pid)
        _kill_pids(pids)
    for node in NODES:
        _quiet("ip", "netns", "delete", namespace(node))
        _quiet("ip", "link", "delete", f"{PREFIX}-{node}")
    _quiet("ip", "link", "delete", BRIDGE)
    remove_hosts_lines()
    REGISTRY.unlink(missing_ok=True)


class NamespacesUnavailable(RuntimeError):
    """This machine does not let even root create the bridge or a network namespace (a skip, not a failure)."""


class TwoNodeCluster(SlurmCluster):
    """munged + slurmctld in the root namespace, one slurmd per node namespace; `env` has SLURM_CONF."""

    def __init__(self, root: Path, partition: str = "debug"):
        super().__init__(root, partition)
        self.nodes = NODES
        self.controller = self.node  # slurmctld checks that it runs on SlurmctldHost: this machine's name
        self.hosts = self.root / "hosts"
        self._slurmd: dict[str, subprocess.Popen] = {}
        self._lock: Optional[TextIO] = None

    # -- lifecycle -----------------------------------------------------------------
    def start(self, timeout: float = 60.0, lock_timeout: float = 1800.0) -> None:
        self._take_lock(lock_timeout)
        clean_leftovers()
        self.root.mkdir(parents=True, exist_ok=True)
        REGISTRY.write_text(json.dumps({"root": str(self.root), "pid": os.getpid()}))
        self._network()
        self._names()
        self._start_munge()
        self._write_conf()
        (self.root / "state").mkdir(exist_ok=True)
        self._run([_sbin("slurmctld"), "-f", str(self.conf)])
        self.pids["slurmctld"] = self.root / "slurmctld.pid"
        self._wait(lambda: "UP" in self.call("scontrol", "ping").stdout, timeout, "slurmctld to answer")
        for node in self.nodes:
            self.start_node(node)
        self._wait(self._nodes_idle, timeout, f"nodes {', '.join(self.nodes)} to be idle")

    def stop(self) -> None:
        try:
            jobs = self.queued_jobs() if self.conf.is_file() and self._pid("slurmctld") else []
            if jobs:
                self.call("scancel", "--quiet", *jobs)
                deadline = time.time() + 15
                while self.queued_jobs(jobs) and time.time() < deadline:
                    time.sleep(0.2)
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            try:
                for node in self.nodes:
                    self.kill_node(node)
                _kill_pids([p for p in (self._pid("slurmctld"), self._pid("munged")) if p])
                clean_leftovers()
            finally:
                self._release_lock()

    def start_node(self, node: str) -> None:
        """Start (or restart) the node's slurmd inside its namespaces; returns once it runs (not yet idle)."""
        (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        script = (
            f"hostname {node} && mount --bind {self.hosts} /etc/hosts && "
            f"mount -t tmpfs -o size=50% tmpfs /dev/shm && exec {_sbin('slurmd')} -D -N {node} -f {self.conf}"
        )
        log = open(self.root / f"slurmd-{node}.out", "ab")
        try:
            self._slurmd[node] = subprocess.Popen(
                [
                    _tool("nsenter"),
                    f"--net=/run/netns/{namespace(node)}",
                    _tool("unshare"),
                    "--uts",
                    "--ipc",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    script,
                ],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        (self.root / f"slurmd-{node}.pid").write_text(f"{self._slurmd[node].pid}\n")

    def kill_node(self, node: str, sig: int = signal.SIGKILL) -> list[int]:
        """Kill every process of the node (slurmd, slurmstepd, the tasks) by pid: a node failure. The pids."""
        pids = namespace_pids(node)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig != signal.SIGKILL:
            _kill_pids(pids)
        proc = self._slurmd.pop(node, None)
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        deadline = time.time() + 10
        while namespace_pids(node) and time.time() < deadline:
            time.sleep(0.05)
        return pids

    # -- pieces --------------------------------------------------------------------
    def _take_lock(self, timeout: float) -> None:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        self._lock = lock = open(LOCK, "a+")
        deadline = time.time() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.time() > deadline:
                    lock.close()
                    self._lock = None
                    raise RuntimeError(f"another two-node test cluster holds {LOCK} for over {timeout:.0f}s")
                time.sleep(1.0)

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _network(self) -> None:
        taken = _quiet("ip", "-4", "route", "show", f"{SUBNET}.0/24").stdout.strip()
        if taken:
            raise RuntimeError(
                f"{SUBNET}.0/24 is already routed on this machine ({taken}): change SUBNET in {__file__}"
            )
        steps = [
            ("ip", "link", "add", BRIDGE, "type", "bridge"),
            ("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE),
            ("ip", "link", "set", BRIDGE, "up"),
        ]
        for node in self.nodes:
            ns, host_end = namespace(node), f"{PREFIX}-{node}"
            steps += [
                ("ip", "netns", "add", ns),
                ("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns),
                ("ip", "link", "set", host_end, "master", BRIDGE, "up"),
                ("ip", "-n", ns, "addr", "add", f"{address(node)}/24", "dev", "eth0"),
                ("ip", "-n", ns, "link", "set", "eth0", "up"),
                ("ip", "-n", ns, "link", "set", "lo", "up"),
            ]
        for i, cmd in enumerate(steps):
            out = _quiet(*cmd)
            if out.returncode != 0 and i in (0, 3) and "not permitted" in out.stderr.lower():
                raise NamespacesUnavailable(f"{' '.join(cmd)}: {out.stderr.strip()}")
            if out.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")

    def _names(self) -> None:
        lines = [f"{address(node)} {node}" for node in self.nodes]
        self.hosts.write_text(
            "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
            f"{SUBNET}.1 {self.controller}\n" + "\n".join(lines) + "\n"
        )
        remove_hosts_lines()
        text = HOSTS.read_text()
        with open(HOSTS, "a") as f:
            f.write(
                ("" if not text or text.endswith("\n") else "\n") + "".join(f"{line}  {MARKER}\n" for line in lines)
            )

    def _write_conf(self) -> None:
        cpus = len(os.sched_getaffinity(0))
        mem = memory_mb(0.9 / len(self.nodes))
        nodes = "".join(
            f"NodeName={n} NodeAddr={address(n)} CPUs={cpus} RealMemory={mem} State=UNKNOWN\n" for n in self.nodes
        )
        self.conf.write_text(
            common_conf(self.root, self.socket, "meltmulti", self.controller, f"{SUBNET}.1")
            + f"""\
SlurmdSpoolDir={self.root / "spool" / "%n"}
SlurmdPidFile={self.root / "slurmd-%n.daemon.pid"}
SlurmdLogFile={self.root / "slurmd-%n.log"}
# a killed node is "not responding" after ~SlurmdTimeout, DOWN after about twice that
SlurmdTimeout=10
{nodes}PartitionName={self.partition} Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP \
OverSubscribe=FORCE:4
"""
        )

    def _nodes_idle(self) -> bool:
        out = self.call("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        for node in self.nodes:
            state = states.get(node, "")
            if state.rstrip("*") in ("drain", "drng", "down") and not state.endswith("*"):
                self.call("scontrol", "update", f"nodename={node}", "state=resume")
        return all(states.get(n) == "idle" for n in self.nodes)

    def wait_nodes_idle(self, timeout: float = 60.0) -> None:
        self._wait(self._nodes_idle, timeout, f"nodes {', '.join(self.nodes)} to be idle", poll=0.2)

    def log_files(self) -> list[Path]:
        return (
            [self.root / "slurmctld.log"]
            + [self.root / f"slurmd-{n}.log" for n in self.nodes]
            + [self.root / f"slurmd-{n}.out" for n in self.nodes]
            + [self.munge_dir / "munged.log"]
        )
