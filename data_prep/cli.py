"""``python -m data_prep {text,chat,synthetic,synthetic-chat,train-tokenizer,inspect,bench}``.

The flags of each subcommand are generated from its config model (config.py), so a YAML
``--config`` and the command line accept the same keys; flags given override the file.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from typing import Any, Callable, Literal

from pydantic import BaseModel

from .config import (
    BenchConfig,
    ChatConfig,
    InspectConfig,
    PrepConfig,
    SyntheticChatConfig,
    SyntheticConfig,
    TextConfig,
    TrainTokenizerConfig,
    load_config,
)
from .errors import DataPrepError


def _run_text(cfg: TextConfig) -> str:
    from .text import prepare_text

    return _rows_summary(
        cfg.out,
        prepare_text(cfg),
        lambda m: (
            f"{m['documents']:,} documents, {m['tokens']:,} tokens -> {m['windows']:,} windows of "
            f"{m['seq_len']} ({m['dropped_tokens']:,} tokens dropped, "
            f"{m['skipped_documents']['total']:,} documents skipped)"
        ),
    )


def _run_chat(cfg: ChatConfig) -> str:
    from .chat import prepare_chat

    return _rows_summary(
        cfg.out,
        prepare_chat(cfg),
        lambda m: (
            f"{m['documents']:,} conversations, {m['tokens']:,} tokens ({m['assistant_tokens']:,} assistant) "
            f"-> {m['windows']:,} rows of {m['seq_len']} ({m['pack']}; {m['padding_tokens']:,} padding tokens, "
            f"{m['truncated_conversations']:,} conversations truncated, {m['dropped_conversations']['total']:,} "
            f"dropped, {m['skipped_documents']['total']:,} skipped)"
        ),
    )


def _run_synthetic_chat(cfg: SyntheticChatConfig) -> str:
    from .synthetic.chat import prepare_synthetic_chat

    r = prepare_synthetic_chat(cfg)
    held_out = f"; eval: {r.eval:,} -> {cfg.eval_out}" if cfg.eval_out is not None else ""
    return f"done: task {cfg.task}, train: {r.train:,} conversations -> {cfg.out}{held_out}"


def _run_synthetic(cfg: SyntheticConfig) -> str:
    from .synthetic.build import prepare_synthetic

    r = prepare_synthetic(cfg)
    tokens = sum(m.get("tokens", 0) for m in r.manifests.values())
    counts = ", ".join(f"{split}: {m['windows']:,} samples" for split, m in r.manifests.items()) if r.built else ""
    return _summary(
        cfg.out, r.built, f"task {cfg.task}, seq_len {r.manifests['train']['seq_len']}, {counts}", tokens, r.seconds
    )


def _rows_summary(out: str, r: Any, counts: Callable[[dict[str, Any]], str]) -> str:
    """The summary of a text or chat run (passes.Prepared); ``counts`` phrases its manifest."""
    return _summary(out, r.built, counts(r.manifest) if r.built else "", r.manifest.get("tokens", 0), r.seconds)


def _summary(out: str, built: bool, counts: str, tokens: int, seconds: float) -> str:
    if not built:
        return f"{out} is up to date (same inputs and arguments); nothing to do"
    return f"done: {counts} in {seconds:.1f}s ({tokens / max(seconds, 1e-9):,.0f} tokens/s) -> {out}"


def _run_train_tokenizer(cfg: TrainTokenizerConfig) -> str:
    from .train_tokenizer import train_tokenizer

    tok = train_tokenizer(cfg)
    template = f", chat template {cfg.chat_template}" if cfg.chat_template is not None else ""
    return f"done: byte-level BPE, {len(tok):,} tokens (EOS {tok.eos_token!r}{template}) -> {cfg.out}"


def _run_inspect(cfg: InspectConfig) -> str:
    from .show import inspect_dataset

    return inspect_dataset(cfg.path, cfg.samples)


def _run_bench(cfg: BenchConfig) -> str:
    from .throughput import run_bench

    return run_bench(cfg)


COMMANDS: dict[str, tuple[type[PrepConfig], Callable[[Any], str], str]] = {
    "text": (TextConfig, _run_text, "tokenize documents into fixed windows (MDS shards)"),
    "chat": (ChatConfig, _run_chat, "render conversations with a chat template; loss on assistant tokens"),
    "synthetic": (SyntheticConfig, _run_synthetic, "generate a reasoning task (train/eval/tokenizer)"),
    "synthetic-chat": (SyntheticChatConfig, _run_synthetic_chat, "a reasoning task as conversations (JSONL)"),
    "train-tokenizer": (TrainTokenizerConfig, _run_train_tokenizer, "train a byte-level BPE tokenizer"),
    "inspect": (InspectConfig, _run_inspect, "show a prepared dataset: counts, samples, manifest"),
    "bench": (BenchConfig, _run_bench, "throughput of the text stage against the raw tokenizer"),
}
POSITIONAL = {"inspect": ("path",)}


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _add_fields(parser: argparse.ArgumentParser, model: type[BaseModel], positional: tuple[str, ...]) -> None:
    for name, info in model.model_fields.items():
        kind = info.annotation
        args = typing.get_args(kind)
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in args if a is not type(None))  # X | None -> X
            args = typing.get_args(kind)
        origin = typing.get_origin(kind)
        options: dict[str, Any] = {"help": info.description, "default": argparse.SUPPRESS}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            options.update(nargs="+", type=args[0])
        elif origin is dict:
            options.update(action="append", type=_key_value, metavar="KEY=VALUE")
        elif origin is Literal:
            options["choices"] = args
        else:
            options["type"] = kind
        if name in positional:  # optional on the command line: it may come from --config
            parser.add_argument(name, nargs="?", **options)
        else:
            parser.add_argument("--" + name.replace("_", "-"), dest=name, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (model, _, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=model.__doc__)
        command.add_argument("--config", help="YAML file with the same keys as the flags")
        _add_fields(command, model, POSITIONAL.get(name, ()))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command, config_file = args.pop("command"), args.pop("config")
    model, run, _ = COMMANDS[command]
    flags = {k: dict(v) if isinstance(v, list) and v and isinstance(v[0], tuple) else v for k, v in args.items()}
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger("data_prep")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        print(run(load_config(model, config_file, flags)))
        return 0
    except DataPrepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(handler)
