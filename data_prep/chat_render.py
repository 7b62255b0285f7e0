"""Conversations -> token ids and a loss mask on the assistant tokens, for any chat template.

The ids are those of ``apply_chat_template(messages, tokenize=True)``: the template's text,
tokenized without added special tokens. The mask comes from growing prefixes of the
conversation, so it needs nothing from the template (no ``{% generation %}``): for each
assistant message i,
- ``before`` = render(messages[:i], add_generation_prompt=True): everything up to and
  including the assistant header (``<|im_start|>assistant\\n`` in ChatML);
- ``after`` = render(messages[:i + 1]): the same plus the message as the template ends it.
The mask is 1 on tokens [len(before), len(after)) of the whole conversation's: the assistant
content and its end of turn, i.e. all the template writes after the content before the next
message begins (``<|im_end|>\\n`` in ChatML, the newline included); 0 on the header, on
system, user and tool messages. Both prefixes' tokens must be a prefix of the whole
conversation's tokens, else the spans would be wrong: such a conversation (a template that
rewrites earlier turns, or a token merging across a turn boundary) is an error naming it.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from .conversations import Conversation
from .errors import DataPrepError
from .tokenizer import encode_batch


def _render(
    tok: Any, template: str, conversations: list[list[dict[str, Any]]], generation_prompt: bool, origin: str
) -> list[str]:
    from transformers.utils.chat_template_utils import render_jinja_template

    try:  # what apply_chat_template does, also for the empty prefix of a leading assistant message
        # (rendered texts, generation indices); transformers annotates the function `-> str`
        texts, _ = cast(
            tuple[list[str], list],
            render_jinja_template(
                conversations, chat_template=template, add_generation_prompt=generation_prompt, **tok.special_tokens_map
            ),
        )
    except Exception as err:  # jinja2 errors, raise_exception() in the template, bad keys
        raise DataPrepError(
            f"{origin}: the chat template failed on this conversation: {type(err).__name__}: {err}"
        ) from None
    return texts


def _texts(tok: Any, template: str, conversation: Conversation) -> tuple[list[str], list[int]]:
    """The whole conversation's text, then (before, after) per assistant message; their indices."""
    messages = conversation.messages
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    whole_and_after = _render(
        tok, template, [messages] + [messages[: i + 1] for i in assistant], False, conversation.origin
    )
    before = _render(tok, template, [messages[:i] for i in assistant], True, conversation.origin)
    pairs = [text for pair in zip(before, whole_and_after[1:]) for text in pair]
    return [whole_and_after[0], *pairs], assistant


def render_masked(tok: Any, template: str, conversations: list[Conversation]) -> list[tuple[list[int], np.ndarray]]:
    """Each conversation's ids and loss mask (uint8), all texts tokenized in one batch call."""
    rendered = [_texts(tok, template, c) for c in conversations]
    ids = iter(encode_batch(tok, [text for texts, _ in rendered for text in texts]))
    out = []
    for conversation, (_, assistant) in zip(conversations, rendered):
        whole = next(ids)
        mask = np.zeros(len(whole), dtype=np.uint8)
        for i in assistant:
            before, after = next(ids), next(ids)
            for name, prefix in (("before", before), ("through", after)):
                if whole[: len(prefix)] != prefix:
                    raise DataPrepError(
                        f"{conversation.origin}: the chat template's rendering of the messages {name} "
                        f"assistant message {i} does not tokenize as a prefix of the whole conversation, "
                        "so its tokens cannot be located (does the template rewrite earlier turns?)"
                    )
            mask[len(before) : len(after)] = 1
        out.append((whole, mask))
    return out
