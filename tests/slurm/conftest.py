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
