"""The pretrained models `make demo` and `make reproduce` start from (assets/demo/, assets/reproduce/):
what their PROVENANCE.md says they are, and the experiments that use and remake them."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.models import LoopLMForCausalLM

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {
    # folder: (model config, {model: loops}, parameters)
    "demo": ("looplm-s3-64.yaml", {"looplm": 4, "standard": 1}, 133_761),
    "reproduce": ("looplm-s3-128.yaml", {"standard": 1, "looplm_t2": 2, "looplm_t4": 4, "looplm_t8": 8}, 529_665),
}


def model_shape(name: str) -> dict:
    shape = yaml.safe_load((REPO / "configs" / "model" / name).read_text())
    base = shape.pop("_base_", None)
    return {**(model_shape(base) if base else {}), **shape}


@pytest.mark.parametrize("folder", sorted(SHIPPED))
def test_the_shipped_models_are_what_their_provenance_says(folder):
    assets = REPO / "assets" / folder
    config_file, models, parameters = SHIPPED[folder]
    provenance = (assets / "PROVENANCE.md").read_text()
    shape = model_shape(config_file)
    for name, loops in models.items():
        weights = (assets / name / "model.safetensors").read_bytes()
        digest = hashlib.sha256(weights).hexdigest()
        assert re.search(rf"`{name}/`.*`{digest}`", provenance), f"{folder}/{name}: weights differ from PROVENANCE.md"
        model = LoopLMForCausalLM.from_pretrained(assets / name).eval()  # safetensors, no remote code
        config = model.config
        assert config.total_ut_steps == loops
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            assert getattr(config, key) == shape[key], (name, key)
        assert sum(p.numel() for p in model.parameters()) == parameters
        with torch.no_grad():  # trained weights: not the initialisation's scale
            assert model.lm_head.weight.std() > 2 * config.initializer_range


def _experiment(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / "experiments" / f"{name}.yaml").read_text())


def test_the_demo_starts_from_the_shipped_models_and_the_full_demo_makes_them():
    demo, full = _experiment("demo"), _experiment("demo-from-scratch")
    assert "pretrain" not in demo["stages"] and {"pretrain", "pretrain_standard"} <= set(full["stages"])
    assert demo["stages"]["transition"]["overrides"]["model.init_from"] == "assets/demo/looplm"
    assert demo["stages"]["distill"]["overrides"]["teacher.init_from"] == "assets/demo/looplm"
    assert "standard=assets/demo/standard" in demo["stages"]["evaluate"]["args"]
    # everything after the pretraining is the same in both
    for stage in ("data", "transition", "distill"):
        assert demo["stages"][stage].get("config") == full["stages"][stage].get("config"), stage


def test_the_reproduction_starts_from_the_shipped_models_and_the_full_one_makes_them():
    repro, full = _experiment("reproduce"), _experiment("reproduce-from-scratch")
    assert not [s for s in repro["stages"] if s.startswith("pretrain")]
    for t in (2, 4, 8):
        assert full["stages"][f"pretrain_t{t}"]["overrides"]["model.config.total_ut_steps"] == t
        asset = f"assets/reproduce/looplm_t{t}"
        assert repro["stages"][f"transition_t{t}"]["overrides"]["model.init_from"] == asset
        assert repro["stages"][f"distill_t{t}"]["overrides"]["teacher.init_from"] == asset
        assert f"looplm={asset}" in repro["stages"][f"evaluate_t{t}"]["args"]
        assert full["stages"][f"transition_t{t}"]["inputs"]["model.init_from"] == f"pretrain_t{t}/export"
    assert "standard=assets/reproduce/standard" in repro["stages"]["evaluate_standard"]["args"]
    assert full["stages"]["pretrain_standard"]["overrides"]["model.config.total_ut_steps"] == 1
    # everything after the pretraining is the same in both
    for stage, spec in repro["stages"].items():
        assert spec.get("config") == full["stages"][stage].get("config"), stage
        assert spec.get("per_seed") == full["stages"][stage].get("per_seed"), stage
    assert repro.get("seeds") == full.get("seeds")
