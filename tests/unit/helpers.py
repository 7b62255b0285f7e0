"""Small builders shared by the unit tests."""

import torch

from pipeline.models import LoopLMConfig, LoopLMForCausalLM

FIXTURE = __import__("pathlib").Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "ouro_reference_tiny"


def tiny_looplm(seed=0, perturb_norms=True, **overrides) -> LoopLMForCausalLM:
    """A random tiny LoopLM; norm weights perturbed so every sandwich norm matters."""
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, total_ut_steps=3, max_position_embeddings=128, rope_theta=10000.0)
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
