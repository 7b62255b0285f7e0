"""A shareable copy of an already-trained export, loadable wherever transformers runs.

    python -m pipeline.export_hub runs/demo/distill --out hub/melt-demo [--eval runs/demo/eval.json] [--force]

RUN_DIR is a phase's run dir (with export/) or an export dir itself. DIR gets the weights and
the tokenizer (copied as they are), the standalone modelling file generated from this package's
pipeline/models, config.json with its auto_map, and the model card README.md (phases, steps and
data hashes from the run's files; the evaluation table of --eval, or of an eval.json /
results.json beside the run that names this export). Written atomically (temp dir, then rename);
a non-empty DIR is refused unless --force.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

from transformers import AutoConfig

import pipeline.models
from pipeline.model_card import CARD, write_model_card
from pipeline.models.checkpoint_io import INDEX_FILE, check_checkpoint_fits, checkpoint_files
from pipeline.models.standalone import standalone_for, write_standalone
from pipeline.run_history import find_eval_results, run_dir_of
from pipeline.training.export import atomic_directory

TOKENIZER_CONFIG = "tokenizer_config.json"
REWRITTEN = ("config.json", CARD)  # written anew; generated *.py files are regenerated too


def locate(run_dir: Path) -> tuple[Path, Optional[Path]]:
    """(export dir, the run dir that wrote it or None) for a phase's run dir or an export dir."""
    if (run_dir / "export" / "config.json").is_file():
        return run_dir / "export", run_dir_of(run_dir / "export")
    if (run_dir / "config.json").is_file():
        return run_dir, run_dir_of(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist")
    raise FileNotFoundError(
        f"neither {run_dir / 'export' / 'config.json'} (a phase's run dir) nor "
        f"{run_dir / 'config.json'} (an export dir) exists"
    )


def check_export(export_dir: Path):
    """The export's config, after checking that its weights and tokenizer are there and fit."""
    config = AutoConfig.from_pretrained(export_dir)
    spec = standalone_for(config.model_type)
    if checkpoint_files(export_dir) is None:
        raise FileNotFoundError(f"{export_dir / 'model.safetensors'} (or {INDEX_FILE}) is missing")
    check_checkpoint_fits(getattr(pipeline.models, spec.model_class), config, export_dir)
    if not (export_dir / TOKENIZER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{export_dir / TOKENIZER_CONFIG} is missing: transformers and lm_eval users need "
            "the tokenizer beside the weights"
        )
    return config


def check_out(out: Path, export_dir: Path, force: bool) -> None:
    out, source = out.resolve(), export_dir.resolve()
    if out == source or source in out.parents:
        raise ValueError(f"--out {out} lies in the export {source} it copies")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out {out} is not empty; pass --force to replace it")


def export_hub(run_dir: Path, out: Path, eval_files: list[Path], force: bool = False) -> list[Path]:
    """Write the standalone copy; returns the evaluation files its card shows."""
    export_dir, trained_by = locate(Path(run_dir))
    config = check_export(export_dir)
    check_out(Path(out), export_dir, force)
    for path in eval_files:
        if not path.is_file():
            raise FileNotFoundError(f"--eval {path} does not exist")
    if not eval_files:
        found = find_eval_results(export_dir, trained_by)
        eval_files = [found] if found is not None else []
    with atomic_directory(Path(out)) as tmp:
        for item in sorted(export_dir.iterdir()):
            if item.is_file() and item.name not in REWRITTEN and item.suffix != ".py":
                shutil.copy2(item, tmp / item.name)
        config_dict = json.loads((export_dir / "config.json").read_text())
        config_dict["auto_map"] = write_standalone(tmp, config.model_type)
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        write_model_card(tmp, trained_by, eval_files, source=export_dir)
    return eval_files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.export_hub", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="a phase's run dir (with export/) or an export dir"
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    parser.add_argument(
        "--eval",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="evaluation JSON for the card (pipeline.evaluate's or pipeline.evaluation.harness's); "
        "repeatable. Default: eval.json / results.json beside the run naming this export",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    args = parser.parse_args(argv)
    try:
        shown = export_hub(args.run_dir, args.out, args.eval, args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"export_hub: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (evaluation in the card: {', '.join(map(str, shown)) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
