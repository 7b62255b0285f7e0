"""The models compared by the evaluation, loaded from exports, each with one way to decode.

- `standard`, `looplm`: a LoopLM export (T = 1 or T loops), per-(loop, layer) KV cache.
- `melt`: a MELT export.
- `looplm_lastkv`: the zero-shot baseline in Ouro's own setting: the prompt runs through the
  LoopLM with its full per-loop cache, then only the last loop's KV is kept and every decoded
  token sees earlier tokens through their last loop (a MELT `overwrite` gate at alpha = 1).
- `looplm_lastkv_chunked`: the same baseline run like MELT, chunk-wise from the first token
  with MELT's chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pipeline.models import LoopLMForCausalLM, MeltCache, MeltForCausalLM

CONTENDERS = ("standard", "looplm", "looplm_lastkv", "looplm_lastkv_chunked", "melt")


@dataclass
class Contender:
    name: str
    model: torch.nn.Module           # what runs the teacher-forced forward (perplexity)
    loops: int
    parameters: int
    lastkv_from: Optional[LoopLMForCausalLM] = None  # Ouro setting: the LoopLM that runs the prompt

    def generate(self, prompt: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int):
        """Greedy decoding of exactly new_tokens tokens; returns (tokens [B, new_tokens], cache)."""
        if self.lastkv_from is None:
            out = self.model.generate(prompt, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                      eos_token_id=None, return_dict_in_generate=True)
            return out.sequences[:, prompt.shape[1]:], out.past_key_values
        return self._generate_lastkv(prompt, attention_mask, new_tokens)

    @torch.no_grad()
    def _generate_lastkv(self, prompt, attention_mask, new_tokens):
        looplm = self.lastkv_from
        prefill = looplm(prompt, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        first = prefill.logits[:, -1].argmax(-1, keepdim=True)
        cache = last_loop_cache(prefill.past_key_values)
        if new_tokens == 1:
            return first, cache
        ids = torch.cat([prompt, first], dim=1)
        mask = torch.cat([attention_mask, torch.ones_like(first)], dim=1)
        out = self.model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens - 1,
                                  min_new_tokens=new_tokens - 1, do_sample=False, pad_token_id=0,
                                  eos_token_id=None, return_dict_in_generate=True)
        return out.sequences[:, prompt.shape[1]:], out.past_key_values


def last_loop_cache(looplm_cache) -> MeltCache:
    """Keep only the last loop's keys/values of a LoopLM cache: one slot per layer."""
    cache = MeltCache(looplm_cache.num_layers, looplm_cache.num_loops)
    for layer in range(looplm_cache.num_layers):
        entry = looplm_cache.layers[looplm_cache.slot(looplm_cache.num_loops - 1, layer)]
        cache.append(layer, entry.keys, entry.values)
    return cache


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_contender(name: str, path: str | Path, chunk_size: Optional[int] = None) -> Contender:
    """name: one of CONTENDERS; path: the export directory (a LoopLM export for standard, looplm and
    the lastkv baselines, a MELT export for melt). chunk_size: MELT's (and the chunked baseline's)
    prefill chunk size; default: the model's own."""
    if name not in CONTENDERS:
        raise ValueError(f"unknown contender {name!r}; choose from {CONTENDERS}")
    if name == "melt":
        model = MeltForCausalLM.from_pretrained(path).eval()
        if chunk_size is not None:
            model.config.prompt_chunk_size = chunk_size
        return Contender(name, model, model.config.total_ut_steps, count_parameters(model))
    looplm = LoopLMForCausalLM.from_pretrained(path).eval()
    if name == "standard" and looplm.config.total_ut_steps != 1:
        raise ValueError(f"{path} has total_ut_steps={looplm.config.total_ut_steps}; the standard contender is T=1")
    if name in ("standard", "looplm"):
        return Contender(name, looplm, looplm.config.total_ut_steps, count_parameters(looplm))
    baseline = MeltForCausalLM.from_looplm(looplm, gate="overwrite", alpha=1.0,
                                           chunk_size=chunk_size or 1).eval()
    return Contender(name, baseline, looplm.config.total_ut_steps, count_parameters(looplm),
                     lastkv_from=looplm if name == "looplm_lastkv" else None)
