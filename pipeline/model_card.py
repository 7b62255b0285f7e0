"""The model card (README.md) of a standalone export: what the model is, its KV-cache bytes per
token against the LoopLM's, how it was trained (pipeline/run_history.py), its evaluation when
given, and how to load it with transformers alone. Written offline, from the export's files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import AutoConfig

import pipeline.models  # noqa: F401  (registers model types "ouro" and "melt" with AutoConfig)
from pipeline.models.checkpoint_io import checkpoint_files, checkpoint_shapes
from pipeline.models.standalone import standalone_for
from pipeline.run_history import PhaseRecord, phase_history, read_json, rows_of

CARD = "README.md"


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _table(head: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows])


def _dtype(config) -> tuple[torch.dtype, str]:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if value is None:
        return torch.float32, "float32 (config.json names no dtype)"
    dtype = getattr(torch, value) if isinstance(value, str) else value
    return dtype, str(dtype).removeprefix("torch.")


def _short(path: Optional[str]) -> Optional[str]:
    """A local path as its last two parts (a card leaves the machine); a hub name as it is."""
    if path is None or not (Path(path).is_absolute() or Path(path).exists()):
        return path
    return "/".join(Path(path).resolve().parts[-2:])


def model_section(config, parameters: int) -> tuple[str, str]:
    """(title, markdown) of what the model is and its shape."""
    loops = config.total_ut_steps
    rows = [
        ("architecture", f"{standalone_for(config.model_type).model_class} (model_type `{config.model_type}`)"),
        ("loops (total_ut_steps)", loops),
    ]
    if config.model_type == "melt":
        title = "MELT"
        text = (
            "A looped language model whose KV cache stays the size of a standard transformer's: each layer keeps "
            f"one gated key/value slot per token, updated at each of its {loops} loops (`g * slot + (1 - g) * "
            "new`), where the LoopLM it comes from keeps one per loop."
        )
        prompt = f" (prompt: {config.prompt_chunk_size})" if config.prompt_chunk_size else ""
        rows += [("gate", config.gate), ("chunk size", f"{config.chunk_size}{prompt}")]
        if config.chunk_sizes:
            rows.append(("chunk sizes (fixed-length rows)", config.chunk_sizes))
        rows.append(("alpha (1 = pure MELT)", config.alpha))
    else:
        title = "LoopLM" if loops > 1 else "standard transformer (LoopLM, one loop)"
        text = (
            f"An Ouro-compatible looped language model: the same {config.num_hidden_layers} layers run "
            f"{loops} times per token, with an early-exit gate after each loop; its KV cache holds every loop's "
            "keys and values."
            if loops > 1
            else "A standard transformer in the LoopLM's code (one loop)."
        )
    rows += [
        (
            "layers / hidden / heads / KV heads / head dim",
            f"{config.num_hidden_layers} / {config.hidden_size} / {config.num_attention_heads} / "
            f"{config.num_key_value_heads} / {config.head_dim}",
        ),
        ("vocabulary", config.vocab_size),
        ("max positions", config.max_position_embeddings),
        ("parameters", parameters),
        ("weights dtype", _dtype(config)[1]),
    ]
    return title, text + "\n\n" + _table(("", ""), rows)


def kv_section(config) -> str:
    """KV-cache bytes per token from the config: layers x KV heads x head dim x 2 (K, V) x dtype bytes."""
    dtype, name = _dtype(config)
    size = torch.empty((), dtype=dtype).element_size()
    one = config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * size
    loops = config.total_ut_steps
    formula = (
        f"{config.num_hidden_layers} layers x {config.num_key_value_heads} KV heads x {config.head_dim} x 2 x {size} B"
    )
    melt = config.model_type == "melt"
    rows = [
        ("standard transformer of this shape", f"{one:,}", "1", formula),
        (
            "this MELT" if melt else "MELT made from this LoopLM",
            f"{one:,}",
            "1",
            "one gated slot per token per layer, whatever the loops",
        ),
    ]
    if melt and config.alpha < 1:
        rows.append(
            (
                f"this MELT at alpha = {config.alpha}",
                f"{one * (1 + loops):,}",
                f"{1 + loops}",
                "while alpha < 1 the cache also keeps each loop's keys/values",
            )
        )
    rows.append(
        (
            f"{'the' if melt else 'this'} LoopLM, {loops} loops",
            f"{one * loops:,}",
            f"{loops}",
            f"x {loops} loops (one K/V set per loop)",
        )
    )
    return f"Bytes of keys and values cached per token in {name} (the activations' dtype):\n\n" + _table(
        ("model", "bytes / token", "x standard", "why"), rows
    )


def training_section(history: list[PhaseRecord]) -> str:
    if not history:
        return "No training run was found beside this export (no `<run_dir>/config.yaml`)."
    rows = [
        (
            r.phase,
            f"{_fmt(r.step)} / {_fmt(r.total_steps)}",
            _short(r.init_from),
            _short(r.teacher),
            _short(r.data),
            f"`{r.index_sha256}`" if r.index_sha256 else "-",
            r.global_batch_size,
            r.lr,
        )
        for r in history
    ]
    sources = "; ".join(f"{r.phase}: {r.index_source}" for r in history)
    return (
        _table(
            (
                "phase",
                "steps (done / scheduled)",
                "initialised from",
                "teacher",
                "data",
                "data index_sha256",
                "global batch",
                "lr",
            ),
            rows,
        )
        + f"\n\n`index_sha256` is the sha256 of the dataset's MDS index.json (read from {sources})."
    )


def eval_section(path: Path, export_dir: Path) -> str:
    """pipeline.evaluate's results JSON or pipeline.evaluation.harness's lm_eval JSON, as a table."""
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("results"), dict):
        from pipeline.evaluation.report import markdown_table

        ours = rows_of(data, export_dir)
        note = f" This model is the row `{', '.join(ours)}`." if ours else ""
        return f"From `{path.name}` (`python -m pipeline.evaluate`).{note}\n\n" + markdown_table(data["results"])
    if isinstance(data, dict) and {"task", "exact_match"} <= set(data):
        return f"From `{path.name}` (lm-evaluation-harness):\n\n" + _table(
            ("task", "samples", "exact_match"), [(data["task"], data.get("samples"), data["exact_match"])]
        )
    raise ValueError(
        f"{path}: not an evaluation result this card can read (expected pipeline.evaluate's JSON with "
        "a 'results' mapping, or pipeline.evaluation.harness's with 'task' and 'exact_match')"
    )


def usage_section() -> str:
    return """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "path/to/this/folder"  # or its Hugging Face Hub id
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
batch = tokenizer(["first prompt", "a longer second prompt"], return_tensors="pt", padding=True)
out = model.generate(**batch, max_new_tokens=16, do_sample=False)
print(tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:]))
```

```bash
lm_eval --model hf --model_args pretrained=path/to/this/folder,trust_remote_code=True --tasks TASK
```"""


def render_card(
    export_dir: Path, run_dir: Optional[Path] = None, eval_files: Sequence[Path] = (), source: Optional[Path] = None
) -> str:
    """export_dir: the files to describe (possibly a temp dir being filled); source: the export they come
    from, which names the model and its rows in evaluation results (default export_dir)."""
    export_dir = Path(export_dir)
    source = Path(source) if source is not None else export_dir
    config = AutoConfig.from_pretrained(export_dir)
    files = checkpoint_files(export_dir)
    if files is None:
        raise FileNotFoundError(f"{export_dir} has no model.safetensors (or model.safetensors.index.json)")
    parameters = sum(int(torch.Size(s).numel()) for s in checkpoint_shapes(files).values())
    title, model = model_section(config, parameters)
    code = standalone_for(config.model_type).filename
    tags = ["melt", "looped-language-model"] if config.model_type == "melt" else ["looplm", "looped-language-model"]
    sections = [
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n"
        + "".join(f"- {t}\n" for t in tags + ["custom_code"])
        + "---",
        f"# {title}: {(Path(run_dir) if run_dir is not None else source).resolve().name}",
        model,
        "## KV cache\n\n" + kv_section(config),
        "## Training\n\n" + training_section(phase_history(run_dir, export_dir)),
    ]
    if eval_files:
        sections.append("## Evaluation\n\n" + "\n\n".join(eval_section(Path(f), source) for f in eval_files))
    sections += [
        "## Usage\n\nLoads with transformers alone (torch, transformers and safetensors; no other package):\n\n"
        + usage_section(),
        f"## Files\n\n`{code}` holds the modelling code (`auto_map` in config.json names it). It is generated "
        "from the MELT training pipeline's `pipeline/models` (its header names the version and commit): do not "
        "edit it; regenerate it with `python -m pipeline.export_hub`.",
    ]
    return "\n\n".join(sections) + "\n"


def write_model_card(
    export_dir: Path, run_dir: Optional[Path] = None, eval_files: Sequence[Path] = (), source: Optional[Path] = None
) -> Path:
    path = Path(export_dir) / CARD
    path.write_text(render_card(export_dir, run_dir, eval_files, source))
    return path
