"""Batched completions of math prompts through a contender's own generate (MELT keeps its
constant cache), ended by EOS, by a stop string, or by the token budget."""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .contenders import Contender, Decoding
from .math_prompts import left_pad


class StopOnText(StoppingCriteria):
    """Ends a row once its completion's last tokens hold a stop string (cheap: a short tail is
    decoded per step; the final text is cut at the stop string anyway)."""

    def __init__(self, tokenizer, stops: list[str], start: int):
        self.tokenizer, self.stops, self.start = tokenizer, stops, start
        self.window = max(len(s) for s in stops) + 2

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tails = self.tokenizer.batch_decode(input_ids[:, self.start :][:, -self.window :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in tails], device=input_ids.device)


def eos_ids(tokenizer, model) -> list[int] | None:
    """The tokenizer's EOS and the model's generation EOS ids (a chat model's end of turn)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    return sorted(ids) or None


def completion_text(tokenizer, tokens: list[int], eos: list[int] | None, stops: list[str]) -> str:
    """Tokens up to the first EOS, decoded without special tokens, cut at the first stop string."""
    ends = [i for i, t in enumerate(tokens) if eos and t in eos]
    text = tokenizer.decode(tokens[: ends[0]] if ends else tokens, skip_special_tokens=True)
    for stop in stops:
        text = text.split(stop)[0]
    return text


@torch.no_grad()
def complete(
    contender: Contender,
    tokenizer,
    prompts: list[list[int]],
    decoding: Decoding,
    new_tokens: int,
    stops: list[str],
    batch_size: int,
    desc: str,
) -> tuple[list[str], dict]:
    """One completion per prompt (repeat a prompt for several samples), in the prompts' order;
    longest prompts first, so that a batch too large for memory fails at once."""
    device = contender.device
    pad = next((t for t in (tokenizer.pad_token_id, *(decoding.eos_token_id or [])) if t is not None), 0)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    generated, seconds = 0, 0.0
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        rows = order[start : start + batch_size]
        ids, mask = (t.to(device) for t in left_pad([prompts[i] for i in rows], pad))
        stopping = StoppingCriteriaList([StopOnText(tokenizer, stops, ids.shape[1])]) if stops else None
        clock = time.perf_counter()
        tokens, _ = contender.generate(
            ids, mask, new_tokens, replace(decoding, pad_token_id=pad, stopping_criteria=stopping)
        )
        seconds += time.perf_counter() - clock
        generated += tokens.numel()
        for row, out in zip(rows, tokens.tolist()):
            texts[row] = completion_text(tokenizer, out, decoding.eos_token_id, stops)
    return texts, {"decode_tokens_per_s": generated / max(seconds, 1e-9)}
