"""Checkpoint bookkeeping (complete tags, atomic `latest`, rotation) and the metrics file, without
any process group (the collectives are no-ops in a single process)."""

import json

import pytest
import torch

from pipeline.training.checkpointing import COMPLETE, CheckpointManager, tag_for
from pipeline.training.losses import LossOutput
from pipeline.training.metrics import RunLogger, StepMetrics, read_jsonl
from pipeline.training.phases.base import MicroStepOutput


def fake_save(manager, step):
    tag = tag_for(step)
    root = manager.begin_save(tag)
    (manager.root / tag).mkdir()
    (manager.root / tag / "engine_part.pt").write_text("weights")  # what the engine would write
    manager.finish_save(tag, {"step": step, "fingerprint": {"seed": 1}})
    return root


def test_latest_is_the_newest_complete_tag_and_rotation_keeps_the_last_ones(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest_tag() is None
    for step in (4, 8, 12):
        fake_save(manager, step)
    assert manager.latest_tag() == "step_00000012"
    assert manager.complete_tags() == ["step_00000008", "step_00000012"]
    assert (manager.root / "latest").read_text() == "step_00000012"
    assert manager.trainer_state("step_00000012")["step"] == 12

    # an interrupted save of step 16: files but no COMPLETE marker, `latest` untouched
    (manager.root / "step_00000016").mkdir()
    (manager.root / "step_00000016" / "engine_part.pt").write_text("half")
    assert manager.latest_tag() == "step_00000012"
    # the rerun redoes step 16 from scratch and then drops the oldest
    fake_save(manager, 16)
    assert sorted(p.name for p in (manager.root / "step_00000016").iterdir()) == [
        COMPLETE,
        "engine_part.pt",
        "trainer_state.json",
    ]
    assert manager.complete_tags() == ["step_00000012", "step_00000016"]
    assert not list(manager.root.glob(".*tmp*"))  # temp files renamed away


def test_latest_naming_an_incomplete_tag_falls_back_to_the_newest_complete(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    fake_save(manager, 4)
    fake_save(manager, 8)
    (manager.root / "step_00000008" / COMPLETE).unlink()
    assert manager.latest_tag() == "step_00000004"


def test_run_logger_drops_records_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in range(1, 8)) + '{"step": 8, "train/lo'
    )  # a line cut by a kill
    logger = RunLogger(tmp_path, rank=0, phase="pretrain", total_steps=10, start_step=4, tensorboard=False)
    logger.log(5, {"train/loss": 0.5})
    logger.close()
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5]
    assert RunLogger(tmp_path, rank=1, phase="x", total_steps=1, start_step=0).enabled is False


def test_step_metrics_weight_by_tokens_and_reduce_min_max():
    metrics = StepMetrics()
    for loss, n, ce, gate in [(0.3, 10, 1.0, 0.2), (0.1, 30, 2.0, 0.6)]:
        metrics.add(
            MicroStepOutput(
                LossOutput(torch.tensor(loss), torch.tensor(n), {"ce": torch.tensor(ce)}),
                {"g/mean": (gate, "mean"), "g/min": (gate, "min"), "g/max": (gate, "max")},
            )
        )
    out = metrics.reduce()
    assert out["train/loss"] == pytest.approx(0.4) and out["train/tokens"] == 40.0
    assert out["train/ce"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert out["g/mean"] == pytest.approx(0.4) and out["g/min"] == 0.2 and out["g/max"] == 0.6
