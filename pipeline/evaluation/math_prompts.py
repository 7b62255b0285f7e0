"""Prompts for math problems: the tokenizer's chat template when it has one (a user turn with
the question and an instruction, then the assistant's turn opened), a plain template otherwise.
The same text goes to our evaluator and to lm-evaluation-harness, encoded the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .math_data import END_OF_TURN, MathDataError, MathTask

PROMPT_FORMATS = ("auto", "chat", "plain")


@dataclass(frozen=True)
class PromptConfig:
    format: str = "auto"  # auto: chat when the tokenizer has a chat template
    instruction: Optional[str] = None  # chat only; None: the kind's default, "": none
    template: Optional[str] = None  # plain only, with {question}; None: the kind's default

    def __post_init__(self):
        if self.format not in PROMPT_FORMATS:
            raise ValueError(f"prompt format {self.format!r} is not one of {PROMPT_FORMATS}")
        if self.template is not None and "{question}" not in self.template:
            raise ValueError(f"prompt template {self.template!r} has no {{question}}")


def render_prompts(tokenizer, task: MathTask, config: PromptConfig) -> tuple[list[str], dict]:
    """The prompt text of every problem, and a record of how it was made (for the results), with
    the stop strings that end a completion (a plain prompt's also end where a base model goes on
    with the next question, as lm-evaluation-harness's gsm8k does)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if config.format == "chat" and not has_template:
        raise MathDataError("--math-prompt chat: the tokenizer has no chat template")
    if config.format == "chat" or (config.format == "auto" and has_template):
        instruction = task.kind.instruction if config.instruction is None else config.instruction
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{p.question}\n\n{instruction}" if instruction else p.question}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for p in task.problems
        ]
        return texts, {"format": "chat", "instruction": instruction, "stop": list(END_OF_TURN)}
    template = task.kind.plain_template if config.template is None else config.template
    return [template.replace("{question}", p.question) for p in task.problems], {
        "format": "plain",
        "template": template,
        "stop": list(task.kind.stop),
    }


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids as lm-evaluation-harness makes them: the tokenizer's special tokens, unless the
    text already starts with the BOS token (a rendered chat template does)."""
    bos = tokenizer.bos_token
    return [tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"] for text in texts]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [B, longest], padded on the left so every row ends where generation starts."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask


def add_prompt_arguments(parser) -> None:
    """The prompt flags, shared by `python -m pipeline.evaluate` and the harness, so both render alike."""
    parser.add_argument(
        "--math-prompt",
        choices=PROMPT_FORMATS,
        default="auto",
        help="chat: the tokenizer's chat template; plain: a text template; "
        "auto (default): chat when the tokenizer has a template",
    )
    parser.add_argument(
        "--math-instruction",
        default=None,
        help="end of the chat user turn (default: the task kind's, asking for '#### <number>' "
        "or \\boxed{}; '' for none)",
    )
    parser.add_argument(
        "--math-template",
        default=None,
        help="plain prompt with {question} (default: 'Question: {question}\\nAnswer:' for gsm8k, "
        "'Problem: {question}\\nSolution:' for math)",
    )


def prompt_config(args) -> PromptConfig:
    return PromptConfig(args.math_prompt, args.math_instruction, args.math_template)
