"""``data_prep train-tokenizer``: byte-level BPE on local documents, saved for AutoTokenizer."""

from __future__ import annotations

from itertools import chain
from typing import Any

from .chat_template import CHATML, CHATML_SPECIALS, read_template
from .config import TrainTokenizerConfig
from .errors import DataPrepError
from .output import LocalTarget
from .sources import SkipCounter, expand_inputs, good_documents, read_files
from .tokenizer import train_bpe


def train_tokenizer(cfg: TrainTokenizerConfig) -> Any:
    files = expand_inputs(cfg.input)
    template = read_template(cfg.chat_template) if cfg.chat_template is not None else None
    specials = CHATML_SPECIALS if cfg.chat_template == CHATML else ()
    target = LocalTarget(cfg.out)
    if not target.is_empty() and not cfg.overwrite:
        raise DataPrepError(f"{target} is not empty; pass --overwrite to replace it")
    location = target.stage(cfg.overwrite)
    try:
        docs = good_documents(read_files(files, cfg.text_field), cfg.on_bad_doc, SkipCounter(), cfg.max_docs)
        first = next(docs, None)
        if first is None:
            raise DataPrepError(f"no documents in {', '.join(cfg.input)} to train the tokenizer on")
        tok = train_bpe(
            (d.text for d in chain([first], docs)),
            cfg.vocab_size,
            cfg.min_frequency,
            location.local,
            template,
            specials,
        )
        target.publish([])
        return tok
    finally:
        target.discard()
