"""``data_prep text``: documents -> tokens -> fixed windows -> MDS shards + manifest.

The two passes (tokenize into a scratch folder, then write the windows, see windows.py) and
the publishing rules are those of passes.py; this module says how documents are read and
encoded: batch-encoded per task, each document followed by EOS.
"""

from __future__ import annotations

from functools import partial

from .config import TextConfig
from .passes import WORKER, Prepared, Stage, load_for, prepare_rows
from .sources import Document, open_source, read_files, text_rows
from .tokenizer import encode_documents, pad_id, tokenizer_sha256
from .windows import Packing, TokenPart, save_part


def _tokenize(task: tuple[int, list[Document], str]) -> TokenPart:
    index, docs, scratch = task
    flat, ends = encode_documents(WORKER["tok"], [d.text for d in docs], WORKER["dtype"])
    return save_part(scratch, index, flat, ends)


TEXT = Stage("text", "documents", _tokenize, lambda doc: len(doc.text))


def prepare_text(cfg: TextConfig) -> Prepared:
    tok, dtype = load_for(cfg)
    inputs, items = open_source(cfg, text_rows(cfg.text_field), partial(read_files, text_field=cfg.text_field))
    packing = Packing(cfg.pack, cfg.seq_len, dtype.name, pad_id(tok))
    return prepare_rows(cfg, TEXT, tok, tokenizer_sha256(tok), packing, inputs, items, {"tok": tok, "dtype": dtype})
