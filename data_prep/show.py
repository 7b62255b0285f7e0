"""``data_prep inspect DIR``: counts, a few decoded samples and the manifest of a dataset
(or of each split of a synthetic root). Chat rows show each conversation of the row whole,
the trained (assistant) tokens between « and »."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataPrepError
from .manifest import INDEX, MANIFEST, read_manifest, tokenizer_location

IGNORE = -100
TRAINED = "«{}»"


def _decoder(directory: Path, manifest: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_location(directory, manifest))
    except Exception:  # tokenizer moved or not cached: show ids instead
        return None


def _render(tok: Any, ids: np.ndarray) -> str:
    tokens = [int(i) for i in ids]
    return repr(tok.decode(tokens)) if tok is not None else str(tokens)


def _marked(tok: Any, ids: np.ndarray, mask: np.ndarray) -> str:
    """The tokens decoded run by run, the runs with mask 1 marked."""
    cuts = np.flatnonzero(np.diff(mask)) + 1
    runs = zip(np.split(ids, cuts), np.split(mask, cuts))
    return "".join(
        TRAINED.format(tok.decode([int(i) for i in run])) if m[0] else tok.decode([int(i) for i in run])
        for run, m in runs
    )


def _chat_lines(tok: Any, sample: dict[str, Any]) -> list[str]:
    segments = sample["segment_ids"]
    lines = []
    for number in range(1, int(segments.max()) + 1):
        at = segments == number
        ids, mask = sample["input_ids"][at], sample["loss_mask"][at]
        text = _marked(tok, ids, mask) if tok is not None else f"ids {ids.tolist()}, mask {mask.tolist()}"
        lines.append(
            f"conversation {number} ({len(ids)} tokens, {int(mask.sum())} trained): {text[:600]!r}"
            + ("..." if len(text) > 600 else "")
        )
    return lines + [f"padding: {int((segments == 0).sum())} tokens"]


def _sample_lines(tok: Any, sample: dict[str, Any]) -> list[str]:
    ids = sample["input_ids"]
    if "segment_ids" in sample:
        return _chat_lines(tok, sample)
    if "prompt_length" in sample:  # synthetic: prompt | answer, and every trained target
        cut = int(sample["prompt_length"])
        labels = sample["labels"]
        targets = ", ".join(f"{i - 1}->{_render(tok, labels[i : i + 1])}" for i in np.flatnonzero(labels != IGNORE))
        return [
            f"k={int(sample['difficulty'])}: {_render(tok, ids[:cut])} | {_render(tok, ids[cut:])}",
            f"    targets (position->token): {targets}",
        ]
    if "loss_mask" in sample:
        ids = ids[sample["loss_mask"].astype(bool)]
    text = _render(tok, ids)
    return [text[:300] + ("..." if len(text) > 300 else "")]


def _one(directory: Path, samples: int) -> list[str]:
    from streaming import LocalDataset

    manifest = read_manifest(directory)
    index = json.loads((directory / INDEX).read_text())
    nbytes = sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in index["shards"])
    lines = [
        f"== {directory} ({manifest['kind']}{', ' + manifest['split'] if 'split' in manifest else ''})",
        f"samples {sum(s['samples'] for s in index['shards']):,} in {len(index['shards'])} shards "
        f"({nbytes / 1e6:.1f} MB); documents {manifest['documents']:,}, tokens {manifest['tokens']:,}, "
        f"windows {manifest['windows']:,} of {manifest['seq_len']}, dropped tokens "
        f"{manifest['dropped_tokens']:,}; index sha256 {manifest['index_sha256'][:12]} (verified)",
    ]
    if manifest["kind"] == "chat":
        dropped = manifest["dropped_conversations"]
        lines.append(
            f"conversations {manifest['documents']:,} ({manifest['pack']}): assistant tokens "
            f"{manifest['assistant_tokens']:,}, padding {manifest['padding_tokens']:,}, truncated "
            f"{manifest['truncated_conversations']:,}, dropped {dropped['total']:,} {dropped['by_reason']}; "
            f"template: {manifest['chat_template']['source']}"
        )
    dataset = LocalDataset(str(directory))
    tok = _decoder(directory, manifest)
    for i in range(min(samples, len(dataset))):
        lines += [f"[{i}] " + line for line in _sample_lines(tok, dataset[i])]
    lines.append(f"{MANIFEST}: " + json.dumps(manifest, indent=2, sort_keys=True))
    return lines


def inspect_dataset(path: str, samples: int) -> str:
    root = Path(path)
    splits = sorted(p.parent for p in root.glob(f"*/{MANIFEST}")) if not (root / MANIFEST).exists() else []
    if not (root / MANIFEST).exists() and not splits:
        raise DataPrepError(
            f"{root}: no {MANIFEST} here or in its subfolders; not a prepared dataset (or an interrupted run)"
        )
    return "\n".join(line for d in (splits or [root]) for line in _one(d, samples))
