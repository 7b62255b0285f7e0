"""Teacher-forced metrics (perplexity per loop, exit distribution) and generation accuracy."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Optional

import torch
from tqdm import tqdm

from pipeline.data.padding import leading_pad_mask
from pipeline.models import MeltForCausalLM
from pipeline.models.exits import exit_probabilities, q_exit_loop
from pipeline.training.losses import IGNORE_INDEX, shift_labels, token_cross_entropy

from .contenders import Contender
from .data import EvalSplit

# How a MELT row is chunked for teacher-forced scoring:
# - "decode": the prompt as prefill chunks it, then one chunk per answer token, as cached decoding runs
#   it: the scores are those of the answers the decoder itself would produce or be fed (the default
#   when the split knows its prompts);
# - "forward": the whole row re-chunked with the model's training chunk size (prompt and answer alike):
#   text splits without prompts, or on request.
# A LoopLM has no chunks ("unchunked").
SCORING_CHUNKINGS = ("decode", "forward")


def resolve_scoring_chunking(model: torch.nn.Module, split: EvalSplit, requested: Optional[str] = None) -> str:
    if requested is not None and requested not in SCORING_CHUNKINGS:
        raise ValueError(f"scoring_chunking={requested!r} is not one of {SCORING_CHUNKINGS}")
    if requested == "decode" and split.prompt_length is None:
        raise ValueError("scoring_chunking='decode' needs an eval split with prompt_length (a synthetic task)")
    if not isinstance(model, MeltForCausalLM):
        return "unchunked"
    if requested is not None:
        return requested
    return "decode" if split.prompt_length is not None else "forward"


def _scoring_groups(split: EvalSplit, start: int, end: int, chunking: str):
    """(row indices, decode_from) of rows [start, end): one forward per prompt length when decoding
    (the chunk plan is the batch's), else the rows in one."""
    rows = list(range(start, end))
    if chunking != "decode":
        return [(rows, None)]
    assert split.prompt_length is not None  # "decode" is resolved only for a split with prompts
    by_length = defaultdict(list)
    for i in rows:
        by_length[int(split.prompt_length[i])].append(i)
    return [(r, length) for length, r in by_length.items()]


@torch.no_grad()
def teacher_forced(
    contender: Contender,
    split: EvalSplit,
    batch_size: int,
    exit_threshold: float,
    pad_id: int = 0,
    chunking: Optional[str] = None,
) -> dict:
    """Per-loop perplexity of the labelled tokens, exit distribution and Q-exit histogram. chunking:
    see SCORING_CHUNKINGS (default: "decode" for MELT on a split with prompts)."""
    model = contender.model
    chunking = resolve_scoring_chunking(model, split, chunking)
    loops = contender.loops
    ce_sum = torch.zeros(loops, dtype=torch.float64)
    exit_sum = torch.zeros(loops, dtype=torch.float64)
    histogram = torch.zeros(loops, dtype=torch.long)
    tokens = 0
    padded = split.prompt_length is not None
    for start in tqdm(range(0, len(split), batch_size), desc=f"{contender.name}: perplexity", leave=False):
        for rows, decode_from in _scoring_groups(split, start, min(start + batch_size, len(split)), chunking):
            ids, labels = split.input_ids[rows].to(contender.device), split.labels[rows].to(contender.device)
            mask = leading_pad_mask(ids, pad_id) if padded else None
            extra = {} if decode_from is None else {"decode_from": decode_from}
            out = model(ids, attention_mask=mask, output_loop_logits=True, use_cache=False, **extra)
            targets = shift_labels(labels)
            valid = targets != IGNORE_INDEX
            for t, logits in enumerate(out.loop_logits):
                ce_sum[t] += token_cross_entropy(logits, targets)[valid].double().sum().cpu()
            probs = exit_probabilities(out.exit_logits)
            exit_sum += probs[:, valid].double().sum(-1).cpu()
            histogram += torch.bincount(q_exit_loop(probs, exit_threshold)[valid], minlength=loops).cpu()
            tokens += int(valid.sum())
    ce = (ce_sum / max(tokens, 1)).tolist()
    return {
        "perplexity": math.exp(ce[-1]),
        "loop_perplexity": [math.exp(c) for c in ce],
        "exit_distribution": (exit_sum / max(tokens, 1)).tolist(),
        "exit_histogram": {"threshold": exit_threshold, "counts": histogram.tolist()},
        "scored_tokens": tokens,
        "scoring_chunking": chunking,
    }


@torch.no_grad()
def generation_accuracy(contender: Contender, split: EvalSplit, batch_size: int, pad_id: int = 0) -> dict:
    """Greedy exact match of the whole answer (every token after prompt_length), per difficulty."""
    prompt_length = split.prompt_length
    if prompt_length is None:
        raise ValueError("generation accuracy needs an eval split with prompt_length (a synthetic task)")
    correct: defaultdict[int, int] = defaultdict(int)
    total: defaultdict[int, int] = defaultdict(int)
    generated, seconds = 0, 0.0
    order = sorted(range(len(split)), key=lambda i: int(prompt_length[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=f"{contender.name}: generation", leave=False):
        by_length = defaultdict(list)
        for i in batch:
            by_length[int(prompt_length[i])].append(i)
        for length, rows in by_length.items():
            ids = split.input_ids[rows].to(contender.device)
            prompt, answer = ids[:, :length], ids[:, length:]
            clock = time.perf_counter()
            tokens, _ = contender.generate(prompt, leading_pad_mask(prompt, pad_id), answer.shape[1])
            seconds += time.perf_counter() - clock
            generated += tokens.numel()
            hits = (tokens == answer).all(-1)
            for row, hit in zip(rows, hits.tolist()):
                k = int(split.difficulty[row]) if split.difficulty is not None else 0
                total[k] += 1
                correct[k] += int(hit)
    by_difficulty = {k: correct[k] / total[k] for k in sorted(total)}
    return {
        "accuracy": sum(correct.values()) / max(sum(total.values()), 1),
        "accuracy_by_difficulty": by_difficulty,
        "samples_by_difficulty": {k: total[k] for k in sorted(total)},
        "decode_tokens_per_s": generated / max(seconds, 1e-9),
    }


@torch.no_grad()
def cache_footprint(contender: Contender, split: EvalSplit, pad_id: int = 0) -> dict:
    """KV-cache bytes after generating one eval answer (batch 1), read from the cache object."""
    length = int(split.prompt_length[0]) if split.prompt_length is not None else split.input_ids.shape[1] // 2
    prompt = split.input_ids[:1, :length].to(contender.device)
    new_tokens = split.input_ids.shape[1] - length
    _, cache = contender.generate(prompt, leading_pad_mask(prompt, pad_id), new_tokens)
    cached = cache.get_seq_length()
    return {
        "kv_cache_bytes": cache.nbytes,
        "kv_cached_tokens": cached,
        "kv_bytes_per_token": cache.nbytes / max(cached, 1),
    }


def evaluate(
    contender: Contender,
    split: EvalSplit,
    batch_size: int = 64,
    exit_threshold: float = 0.9,
    generation: Optional[bool] = None,
    scoring_chunking: Optional[str] = None,
    perplexity: bool = True,
) -> dict:
    """scoring_chunking: how MELT rows are chunked for perplexity (SCORING_CHUNKINGS; default "decode"
    on splits with prompts); the result says which was used. perplexity=False skips the teacher-forced
    metrics (half the time of a synthetic task's evaluation) when only accuracy is wanted."""
    result = {
        "contender": contender.name,
        "loops": contender.loops,
        "parameters": contender.parameters,
        "samples": len(split),
    }
    if perplexity and contender.lastkv_from is None:
        result.update(teacher_forced(contender, split, batch_size, exit_threshold, chunking=scoring_chunking))
    if generation is None:
        generation = split.prompt_length is not None
    if generation:
        result.update(generation_accuracy(contender, split, batch_size))
    result.update(cache_footprint(contender, split))
    return result
