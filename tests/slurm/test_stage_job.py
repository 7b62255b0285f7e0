"""launchers/job.py's StageJob in one process, without a cluster: what happens around the entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# submitit installs a USR2 handler that checkpoints and requeues; this stands in for it only to see
# whether it is reached (the real one runs in the SLURM tests).
_LATE_SIGNAL = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from launchers.job import StageJob
signal.signal(signal.SIGUSR2, lambda *a: print("requeue requested", flush=True))
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")  # as torchrun would set them
result = StageJob("exp", "a", "train", {entry!r}, [], {workdir!r}, {repo!r}, {{}})()
print("stage returned", result["rank"], flush=True)
os.kill(os.getpid(), signal.SIGUSR2)  # the time-limit warning arrives just after the stage finished
print("still alive", flush=True)
"""


def test_a_signal_after_the_stage_finished_neither_requeues_nor_kills(tmp_path):
    entry = tmp_path / "entry.py"
    entry.write_text("print('stage ran', flush=True)\n")
    code = _LATE_SIGNAL.format(repo=str(REPO), entry=str(entry), workdir=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "stage ran" in out.stdout and "stage returned 0" in out.stdout and "still alive" in out.stdout
    assert "requeue requested" not in out.stdout, out.stdout
