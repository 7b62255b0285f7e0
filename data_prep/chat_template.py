"""Chat templates: a ChatML template built in-process (tokenizers trained here have none), and
the choice between a tokenizer's own template and a ``--chat-template`` override.

ChatML renders each message as ``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`` and the generation
prompt as ``<|im_start|>assistant\\n``. Assistant content and its ``<|im_end|>\\n`` are wrapped
in ``{% generation %}`` so transformers' ``return_assistant_tokens_mask`` can cross-check the
masks of chat_render.py (which do not rely on it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .errors import DataPrepError

CHATML = "chatml"
CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def read_template(option: str) -> str:
    """``chatml`` or the text of a Jinja file."""
    if option == CHATML:
        return CHATML_TEMPLATE
    try:
        return Path(option).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataPrepError(f"--chat-template {option}: cannot read the Jinja file: {err}") from None


def resolve_template(tok: Any, option: str | None, tokenizer_name: str) -> tuple[str, dict[str, str]]:
    """The template to render with (``option`` overrides the tokenizer's) and its description
    for the manifest: where it came from and its sha256 (it decides the ids as much as the
    tokenizer does)."""
    if option is not None:
        template, source = read_template(option), option if option == CHATML else str(Path(option).resolve())
    else:
        try:
            template = tok.get_chat_template()
        except ValueError as err:  # none set, or several without a default
            raise DataPrepError(
                f"tokenizer {tokenizer_name!r} has no usable chat template ({err}); give one "
                "with --chat-template FILE.jinja (or chatml), or store one in the tokenizer "
                "(train-tokenizer --chat-template)"
            ) from None
        source = "tokenizer"
    return template, {"source": source, "sha256": hashlib.sha256(template.encode()).hexdigest()}
