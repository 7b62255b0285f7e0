"""Small builders shared by the unit tests."""

from typing import Any

import torch

from pipeline.models import LoopLMConfig, LoopLMForCausalLM

FIXTURE = (
    __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "ouro_reference_tiny"
)


def tiny_looplm(seed=0, perturb_norms=True, **overrides) -> LoopLMForCausalLM:
    """A random tiny LoopLM; norm weights perturbed so every sandwich norm matters."""
    kw: dict[str, Any] = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        total_ut_steps=3,
        max_position_embeddings=128,
        rope_theta=10000.0,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LoopLMForCausalLM(LoopLMConfig(**kw)).eval()
    if perturb_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.3 * torch.randn_like(p))
                if "early_exit_gate" in name:
                    p.normal_(0, 0.5)
    return model


def random_gates(melt, seed=1):
    """Gates away from their overwrite-like init, so that every gate variant really mixes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in melt.model.layers:
            if layer.kv_gate.proj is not None:
                layer.kv_gate.proj.weight.normal_(0, 0.3)
                layer.kv_gate.proj.bias.normal_(0, 1.0)
    return melt


def write_eval_split(out_dir, split, compression=None):
    """Write an EvalSplit as an MDS dataset in the data_prep contract (index.json, manifest.json)."""
    import json

    import numpy as np
    from streaming import MDSWriter

    seq = split.input_ids.shape[1]
    columns = {
        "input_ids": "ndarray:uint16",
        "labels": "ndarray:int16",
        "difficulty": "int32",
        "prompt_length": "int32",
    }
    with MDSWriter(out=str(out_dir), columns=columns, compression=compression) as writer:
        for i in range(len(split)):
            writer.write(
                {
                    "input_ids": split.input_ids[i].numpy().astype(np.uint16),
                    "labels": split.labels[i].numpy().astype(np.int16),
                    "difficulty": int(split.difficulty[i]),
                    "prompt_length": int(split.prompt_length[i]),
                }
            )
    (out_dir / "manifest.json").write_text(json.dumps({"seq_len": seq, "kind": "synthetic"}))
    return out_dir
