"""``data_prep chat``: conversations -> chat template -> rows with an assistant-only loss mask.

Input rows: see conversations.py; rendering and the mask: chat_render.py; rows: chat_layout.py.
The passes, scratch folder, resumable output (local or s3://) and manifest are text's
(passes.py). The manifest adds the chat template's source and sha256 (part of the tokenizer
hash, so a changed template is a different dataset) and the counts of the layout: assistant,
padding and dropped tokens, truncated and dropped conversations by reason.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from .chat_layout import ChatLayout
from .chat_render import render_masked
from .chat_template import resolve_template
from .config import ChatConfig
from .conversations import Conversation, parse_conversation
from .passes import WORKER, Prepared, Stage, load_for, prepare_rows
from .sources import JSONL_SUFFIXES, open_source, read_jsonl
from .tokenizer import pad_id, tokenizer_sha256
from .windows import TokenPart, save_part


def _render(task: tuple[int, list[Conversation], str]) -> TokenPart:
    index, conversations, scratch = task
    rendered = render_masked(WORKER["tok"], WORKER["template"], conversations)
    lengths = np.fromiter((len(ids) for ids, _ in rendered), dtype=np.int64, count=len(rendered))
    flat = np.fromiter((t for ids, _ in rendered for t in ids), dtype=WORKER["dtype"], count=int(lengths.sum()))
    mask = np.concatenate([m for _, m in rendered])
    return save_part(scratch, index, flat, np.cumsum(lengths), mask)


CHAT = Stage("chat", "conversations", _render, lambda conversation: conversation.chars)


def prepare_chat(cfg: ChatConfig) -> Prepared:
    tok, dtype = load_for(cfg)
    template, template_info = resolve_template(tok, cfg.chat_template, cfg.tokenizer)
    inputs, items = open_source(cfg, parse_conversation, partial(read_jsonl, parse=parse_conversation), JSONL_SUFFIXES)
    layout = ChatLayout(cfg.pack, cfg.long, cfg.seq_len, dtype.name, pad_id(tok))
    return prepare_rows(
        cfg,
        CHAT,
        tok,
        tokenizer_sha256(tok, template),
        layout,
        inputs,
        items,
        {"tok": tok, "dtype": dtype, "template": template},
        {"chat_template": template_info, "loss_mask": "assistant tokens and their end of turn"},
    )
