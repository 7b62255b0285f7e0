"""launchers/requeue.py: which failed steps the batch script requeues (the cluster test is
tests/slurm/test_multinode.py::test_node_failure_mid_distill_requeues_and_resumes)."""

from __future__ import annotations

import pytest

from launchers.requeue import FAILED, PREEMPTED, REQUEUED, decide, mark, marker


@pytest.fixture
def job(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    return tmp_path


def test_a_lost_node_is_requeued_until_the_bound(job):
    requeue, why = decide(job, 137, max_failure_requeues=2, state="RUNNING")
    assert requeue and "requeue 1 of at most 2" in why
    marker(job, REQUEUED, attempt="0").write_text("")
    requeue, why = decide(job, 137, max_failure_requeues=2, state="RUNNING")
    assert requeue and "requeue 2 of at most 2" in why
    marker(job, REQUEUED).write_text("")
    requeue, why = decide(job, 1, max_failure_requeues=2, state="RUNNING")
    assert not requeue and "already requeued 2 time(s)" in why and "max_failure_requeues=2" in why


def test_own_errors_preemption_success_and_cancelled_jobs_are_not_requeued(job):
    assert decide(job, 0, 3, "RUNNING") == (False, "the step succeeded")
    assert not decide(job, 143, 3, "CANCELLED")[0]
    mark(job, PREEMPTED, "USR2")
    assert "time limit or preemption" in decide(job, 255, 3, "RUNNING")[1]
    marker(job, PREEMPTED).unlink()
    mark(job, f"{FAILED}1", "exit code 3")
    requeue, why = decide(job, 1, 3, "RUNNING")
    assert not requeue and "rank(s) 1 failed with their own error" in why
    # markers of another job or of an earlier attempt do not count
    marker(job, f"{FAILED}1").rename(job / f"41_0_{FAILED}1")
    (job / f"42_1_{FAILED}0").write_text("")
    assert decide(job, 1, 3, "RUNNING")[0]
