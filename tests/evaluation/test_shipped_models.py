"""The pretrained models `make demo` starts from (assets/demo/): what PROVENANCE.md says they are."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
import yaml

from pipeline.models import LoopLMForCausalLM

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets" / "demo"


def test_the_shipped_models_are_the_demos_pretrained_looplm_and_standard_transformer():
    provenance = (ASSETS / "PROVENANCE.md").read_text()
    shape = yaml.safe_load((REPO / "configs" / "model" / "looplm-s3-64.yaml").read_text())
    counts = {}
    for name, loops in (("looplm", shape["total_ut_steps"]), ("standard", 1)):
        weights = (ASSETS / name / "model.safetensors").read_bytes()
        digest = hashlib.sha256(weights).hexdigest()
        assert re.search(rf"`{name}/`.*`{digest}`", provenance), f"{name}: weights differ from PROVENANCE.md"
        model = LoopLMForCausalLM.from_pretrained(ASSETS / name).eval()  # safetensors, no remote code
        config = model.config
        assert config.total_ut_steps == loops
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            assert getattr(config, key) == shape[key], (name, key)
        counts[name] = sum(p.numel() for p in model.parameters())
        with torch.no_grad():  # trained weights: not the initialisation's scale
            assert model.lm_head.weight.std() > 2 * config.initializer_range
    assert counts["looplm"] == counts["standard"] == 133_761


def test_the_demo_starts_from_the_shipped_models_and_the_full_demo_makes_them():
    demo = yaml.safe_load((REPO / "configs" / "experiments" / "demo.yaml").read_text())
    full = yaml.safe_load((REPO / "configs" / "experiments" / "demo-from-scratch.yaml").read_text())
    assert "pretrain" not in demo["stages"] and {"pretrain", "pretrain_standard"} <= set(full["stages"])
    assert demo["stages"]["transition"]["overrides"]["model.init_from"] == "assets/demo/looplm"
    assert demo["stages"]["distill"]["overrides"]["teacher.init_from"] == "assets/demo/looplm"
    assert "standard=assets/demo/standard" in demo["stages"]["evaluate"]["args"]
    # everything after the pretraining is the same in both
    for phase in ("data", "transition", "distill"):
        assert demo["stages"][phase].get("config") == full["stages"][phase].get("config"), phase
