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
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList, TemperatureLogitsWarper, TopPLogitsWarper

from pipeline.models import LoopLMForCausalLM, MeltCache, MeltForCausalLM

if TYPE_CHECKING:
    from transformers.generation import GenerateDecoderOnlyOutput

CONTENDERS = ("standard", "looplm", "looplm_lastkv", "looplm_lastkv_chunked", "melt")


@dataclass(frozen=True)
class Decoding:
    """How tokens are picked (greedy at temperature 0, else sampled with temperature and top-p,
    no top-k) and what ends generation: exactly new_tokens tokens (fixed-width synthetic answers)
    unless eos ids or stopping criteria are given."""

    temperature: float = 0.0
    top_p: float = 1.0
    eos_token_id: Optional[list[int]] = None
    pad_token_id: int = 0
    stopping_criteria: Optional[StoppingCriteriaList] = None

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self, new_tokens: int) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            max_new_tokens=new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            return_dict_in_generate=True,
            do_sample=self.sampled,
        )
        if self.eos_token_id is None and self.stopping_criteria is None:
            kwargs["min_new_tokens"] = new_tokens
        if self.stopping_criteria is not None:
            kwargs["stopping_criteria"] = self.stopping_criteria
        if self.sampled:  # top_k=0: a model's generation_config must not add its own top-k
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        return kwargs

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token [B, 1] from last-position logits [B, V], as generate would pick it."""
        if not self.sampled:
            return logits.argmax(-1, keepdim=True)
        warp = LogitsProcessorList([TemperatureLogitsWarper(self.temperature), TopPLogitsWarper(self.top_p)])
        # the two warpers never read input_ids; transformers annotates scores as FloatTensor, which no tensor is
        return torch.multinomial(torch.softmax(warp(None, logits.float()), -1), 1)  # type: ignore[arg-type]


GREEDY = Decoding()


@dataclass
class Contender:
    name: str
    model: LoopLMForCausalLM | MeltForCausalLM  # what runs the teacher-forced forward (perplexity)
    loops: int
    parameters: int
    lastkv_from: Optional[LoopLMForCausalLM] = None  # Ouro setting: the LoopLM that runs the prompt

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(
        self, prompt: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int, decoding: Decoding = GREEDY
    ):
        """Decoding of new_tokens tokens (greedy by default; fewer where decoding stops early);
        returns (tokens [B, <= new_tokens], cache)."""
        if self.lastkv_from is None:
            out = cast(
                "GenerateDecoderOnlyOutput",  # return_dict_in_generate, no beams
                self.model.generate(prompt, attention_mask=attention_mask, **decoding.generate_kwargs(new_tokens)),
            )
            return out.sequences[:, prompt.shape[1] :], out.past_key_values
        return self._generate_lastkv(prompt, attention_mask, new_tokens, decoding)

    @torch.no_grad()
    def _generate_lastkv(self, prompt, attention_mask, new_tokens, decoding):
        looplm = self.lastkv_from
        prefill = looplm(prompt, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        first = decoding.pick(prefill.logits[:, -1])
        cache = last_loop_cache(prefill.past_key_values)
        if new_tokens == 1:
            return first, cache
        ids = torch.cat([prompt, first], dim=1)
        mask = torch.cat([attention_mask, torch.ones_like(first)], dim=1)
        out = self.model.generate(
            ids, attention_mask=mask, past_key_values=cache, **decoding.generate_kwargs(new_tokens - 1)
        )
        return out.sequences[:, prompt.shape[1] :], out.past_key_values


def last_loop_cache(looplm_cache) -> MeltCache:
    """Keep only the last loop's keys/values of a LoopLM cache: one slot per layer."""
    cache = MeltCache(looplm_cache.num_layers, looplm_cache.num_loops)
    for layer in range(looplm_cache.num_layers):
        entry = looplm_cache.layers[looplm_cache.slot(looplm_cache.num_loops - 1, layer)]
        cache.append(layer, entry.keys, entry.values)
    return cache


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """auto: the GPU when there is one (in bfloat16), else the CPU (in float32)."""
    where = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    if dtype == "auto":
        return where, torch.bfloat16 if where.type == "cuda" else torch.float32
    return where, getattr(torch, dtype)


def load_contender(
    name: str,
    path: str | Path,
    chunk_size: Optional[int] = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Contender:
    """name: one of CONTENDERS; path: the export directory (a LoopLM export for standard, looplm and
    the lastkv baselines, a MELT export for melt). chunk_size: MELT's (and the chunked baseline's)
    prefill chunk size; default: the model's own. The model is loaded in dtype onto device."""
    if name not in CONTENDERS:
        raise ValueError(f"unknown contender {name!r}; choose from {CONTENDERS}")
    if name == "melt":
        model = MeltForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        if chunk_size is not None:
            model.config.prompt_chunk_size = chunk_size
        return Contender(name, model, model.config.total_ut_steps, count_parameters(model))
    looplm = LoopLMForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if name == "standard" and looplm.config.total_ut_steps != 1:
        raise ValueError(f"{path} has total_ut_steps={looplm.config.total_ut_steps}; the standard contender is T=1")
    if name in ("standard", "looplm"):
        return Contender(name, looplm, looplm.config.total_ut_steps, count_parameters(looplm))
    baseline = MeltForCausalLM.from_looplm(looplm, gate="overwrite", alpha=1.0, chunk_size=chunk_size or 1)
    # PreTrainedModel.to is functools.wraps(nn.Module.to): its stub type wants self once more (the ignore)
    baseline = baseline.to(device=device, dtype=dtype).eval()  # type: ignore[call-arg]
    return Contender(
        name,
        baseline,
        looplm.config.total_ut_steps,
        count_parameters(looplm),
        lastkv_from=looplm if name == "looplm_lastkv" else None,
    )
