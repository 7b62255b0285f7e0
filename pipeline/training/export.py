"""Hugging Face export of the trained model under <run_dir>/export/ (written atomically).

The weights are the engine's consolidated full state dict (for DeepSpeed: the fp32
master weights, exactly what `zero_to_fp32` recovers from the final checkpoint), saved
with the model class's own `save_pretrained` (safetensors), with its config and the
dataset's tokenizer when the manifest names one. Every export is standalone (no switch): the
generated modelling file and config.json's auto_map let transformers load it with
trust_remote_code=True where this package is not installed, and README.md is its model card.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
import yaml

from pipeline.model_card import write_model_card
from pipeline.training import comm
from pipeline.training.engines.base import Engine

log = logging.getLogger("melt.train")


def copy_tokenizer(source: str, out_dir: Path) -> None:
    """A tokenizer directory's files, or a tokenizer by hub name (from the local cache), into out_dir.
    Files the model already wrote there are kept (a model directory used as the tokenizer source must not
    replace the exported config.json or weights)."""
    if Path(source).is_dir():
        for item in Path(source).iterdir():
            if item.is_file() and not (out_dir / item.name).exists():
                shutil.copy2(item, out_dir / item.name)
        return
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(str(out_dir))
    except (OSError, ValueError) as err:
        log.warning(f"export without a tokenizer: cannot load {source!r} ({err})")


@contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """A temp dir beside out_dir to fill; on success it replaces out_dir whole, on failure it is removed."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def save_hf(
    model_cls,
    config,
    state: dict[str, torch.Tensor],
    out_dir: Path,
    dtype: torch.dtype,
    tokenizer: Optional[str] = None,
    info: Optional[dict] = None,
    run_dir: Optional[Path] = None,
) -> None:
    """Write a standalone Hugging Face checkpoint directory atomically (temp dir, then rename over out_dir).
    run_dir: the training run whose files the model card reads (phases, steps, data hashes)."""
    config = copy.deepcopy(config)
    config.dtype = dtype
    with torch.device("meta"):
        model = model_cls(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, standalone=True)
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp)
        if info is not None:
            (tmp / "export_info.json").write_text(json.dumps(info, indent=1, sort_keys=True))
        try:
            write_model_card(tmp, run_dir, source=out_dir)
        except (OSError, ValueError, yaml.YAMLError) as err:  # the card must not cost the trained weights
            log.error(
                f"export {out_dir} written without its model card README.md ({err}); write it with "
                f"`python -m pipeline.export_hub {run_dir or out_dir} --out DIR`"
            )


def intermediate_export_dir(run_dir: Path, step: int) -> Path:
    """Where `checkpointing.export_every` puts the export of step `step`."""
    return Path(run_dir) / "exports" / f"step_{step:08d}"


def export_model(
    engine: Engine,
    out_dir: Path,
    dtype: torch.dtype,
    tokenizer: Optional[str] = None,
    info: Optional[dict] = None,
    run_dir: Optional[Path] = None,
) -> None:
    """Collective: gather the full weights, rank 0 writes out_dir (the trainer's <run_dir>/export, or an
    intermediate export). run_dir: the training run (default out_dir's parent), for the model card."""
    state = engine.full_state_dict()
    if comm.rank() == 0:
        assert state is not None  # the consolidated state dict is rank 0's
        module = engine.module
        card_run = Path(run_dir) if run_dir is not None else Path(out_dir).parent
        save_hf(type(module), module.config, state, out_dir, dtype, tokenizer, info, run_dir=card_run)
    comm.barrier()
