"""Fixtures of the SLURM tests: a real single-node cluster started once per session."""

from __future__ import annotations

import os

import pytest

from tests.slurm.cluster import SlurmCluster, ensure_packages


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """munged + slurmctld + slurmd on this machine, SLURM_CONF exported for the session.

    Installs the Debian packages when missing (scripts/install_debian_deps.sh); skips only if
    they cannot be installed, or when not root (slurmd must launch the jobs).
    """
    if os.geteuid() != 0:
        pytest.skip("the single-node SLURM cluster needs root (slurmd launches the jobs as their user)")
    why = ensure_packages()
    if why is not None:
        pytest.skip(why)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm", numbered=True))
    saved = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        cluster.stop()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A real two-node cluster on this machine (nodes mn1, mn2: network, UTS, IPC and mount namespaces;
    `tests/slurm/multinode.py`), up for the module's tests and torn down after them, failed or not.

    Its client configuration is `two_node_cluster.env` (SLURM_CONF): pass it to the commands that must
    reach it (os.environ keeps the single-node cluster's, which may be up at the same time). Skips when
    not root, or when ip / nsenter / unshare or the SLURM packages are missing and cannot be installed.
    """
    from tests.slurm.multinode import NamespacesUnavailable, TwoNodeCluster, why_not_available

    if os.geteuid() == 0:
        why = ensure_packages()
        if why is not None:
            pytest.skip(why)
    why = why_not_available()
    if why is not None:
        pytest.skip(why)
    cluster = TwoNodeCluster(tmp_path_factory.mktemp("slurm2n", numbered=True))
    try:
        try:
            cluster.start()
        except NamespacesUnavailable as err:
            pytest.skip(f"the two-node SLURM cluster needs network namespaces and a bridge: {err}")
        yield cluster
    finally:
        cluster.stop()
