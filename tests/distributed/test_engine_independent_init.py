"""Same seed, same start, whatever the engine and the number of ranks (issue 15, item 4).

The smoke pretrain (a LoopLM from scratch) for one step under DeepSpeed ZeRO-3 on 2 ranks and on
1 rank, and under FSDP2 on 2 ranks, launched concurrently (the launches are mostly process
start-up). The learning rate is 1e-12, so the export written after that step holds the
initial weights (to 1e-12): they must equal each other and the seeded initialisation computed
here without any engine, and the first-step loss and gradient norm must agree.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from .launch import REPO, metrics, ok, train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PRETRAIN = "configs/smoke/pretrain.yaml"
ONE_STEP = ("schedule.total_steps=1", "schedule.warmup_steps=0", "schedule.min_lr=0", "optimizer.lr=1e-12",
            "logging.tensorboard=false")
RUNS = {  # name -> (ranks, extra overrides); 2 ranks under torchrun, 1 rank as a plain process
    "deepspeed x2": (2, ()),
    "deepspeed x1": (1, ()),
    "fsdp x2": (2, ("engine=fsdp",)),
}  # FSDP on 1 rank: tests/unit/test_fsdp_engine.py (a gloo group of 1, against the same reference)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, token_dataset):
    """name -> run directory, one step each, all from the same config, seed and data."""
    root = tmp_path_factory.mktemp("init")
    data = token_dataset(root / "data", num_samples=64, seq_len=32, vocab_size=64)

    def launch(name):
        ranks, extra = RUNS[name]
        run_dir = root / name.replace(" ", "_")
        ok(train(PRETRAIN, run_dir, f"data.path={data}", *ONE_STEP, *extra, ranks=ranks, torchrun=True,
                 launcher=ranks > 1, timeout=240))
        return name, run_dir

    with ThreadPoolExecutor(len(RUNS)) as pool:
        return dict(pool.map(launch, RUNS))


def seeded_reference() -> dict[str, torch.Tensor]:
    """The smoke model's initial weights from the config's seed, computed in this process."""
    from pipeline.models import LoopLMConfig, LoopLMForCausalLM
    from pipeline.training.config import load_run_config
    from pipeline.training.initialization import initialize
    cfg = load_run_config(REPO / PRETRAIN, ["run_dir=/unused", "data.path=/unused"])
    model = LoopLMForCausalLM(LoopLMConfig(**cfg.model.config))
    initialize(model, model._init_weights, cfg.seed)
    return model.state_dict()


def test_initial_weights_are_the_seeded_ones_under_every_engine(runs):
    reference = seeded_reference()
    for name, run_dir in runs.items():
        exported = load_file(run_dir / "export" / "model.safetensors")
        assert set(exported) == set(reference), name
        for key, value in reference.items():
            torch.testing.assert_close(exported[key], value, rtol=0, atol=1e-9, msg=f"{name}: {key}")


def test_first_step_loss_and_gradient_agree_across_engines_and_ranks(runs):
    first = {name: metrics(run_dir)[0] for name, run_dir in runs.items()}
    want = first["deepspeed x2"]
    for name, got in first.items():
        assert got["step"] == 1
        assert got["train/loss"] == pytest.approx(want["train/loss"], rel=1e-6), name
        assert got["train/grad_norm"] == pytest.approx(want["train/grad_norm"], rel=1e-5), name
