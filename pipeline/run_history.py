"""What a training run records about how its export was made, read back from its files.

A phase's run dir holds `config.yaml` (the run config), `export/export_info.json` (phase, step,
checkpoint) and `checkpoints/<tag>/trainer_state.json` (the data fingerprint, whose index_sha256
is the dataset index the run verified). `model.init_from` names the previous phase's export, so
the phases are followed back from export to export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

MAX_PHASES = 16  # a guard against an init_from cycle
EVAL_FILES = ("eval.json", "results.json")


@dataclass
class PhaseRecord:
    phase: str
    run_dir: Path
    step: Optional[int]
    total_steps: Optional[int]
    init_from: Optional[str]
    teacher: Optional[str]
    data: Optional[str]
    index_sha256: Optional[str]
    index_source: str  # where index_sha256 was read
    global_batch_size: Optional[int]
    lr: Optional[float]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def run_dir_of(export_dir: Path) -> Optional[Path]:
    """The run dir whose trainer wrote export_dir (<run_dir>/export with <run_dir>/config.yaml), if any."""
    export_dir = Path(export_dir)
    parent = export_dir.resolve().parent
    return parent if export_dir.resolve().name == "export" and (parent / "config.yaml").is_file() else None


def phase_record(run_dir: Path, export_dir: Optional[Path] = None) -> PhaseRecord:
    """export_dir: the export being written (default <run_dir>/export), whose export_info.json names the step."""
    config_path = Path(run_dir) / "config.yaml"
    cfg = yaml.safe_load(config_path.read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"{config_path} is not a run config (a YAML mapping)")
    section = lambda key: cfg.get(key) or {}  # noqa: E731
    info_path = Path(export_dir if export_dir is not None else Path(run_dir) / "export") / "export_info.json"
    info = read_json(info_path) if info_path.is_file() else {}
    data_path = section("data").get("path")
    index, source = recorded_index(Path(run_dir), info.get("checkpoint"), data_path)
    return PhaseRecord(
        phase=section("phase").get("name") or info.get("phase") or "?",
        run_dir=Path(run_dir),
        step=info.get("step"),
        total_steps=section("schedule").get("total_steps"),
        init_from=section("model").get("init_from"),
        teacher=section("teacher").get("init_from"),
        data=data_path,
        index_sha256=index,
        index_source=source,
        global_batch_size=section("data").get("global_batch_size"),
        lr=section("optimizer").get("lr"),
    )


def recorded_index(run_dir: Path, checkpoint: Optional[str], data_path: Optional[str]) -> tuple[Optional[str], str]:
    """The dataset index_sha256 the run verified (its checkpoint's fingerprint), else its manifest's."""
    if checkpoint:
        state = run_dir / "checkpoints" / checkpoint / "trainer_state.json"
        if state.is_file():
            index = (read_json(state).get("fingerprint") or {}).get("index_sha256")
            if index:
                return index, f"checkpoints/{checkpoint}/trainer_state.json"
    if data_path and (Path(data_path) / "manifest.json").is_file():
        index = read_json(Path(data_path) / "manifest.json").get("index_sha256")
        if index:
            return index, "the dataset's manifest.json (the run's checkpoint records none)"
    return None, "not recorded"


def phase_history(run_dir: Optional[Path], export_dir: Optional[Path] = None) -> list[PhaseRecord]:
    """The phases that made run_dir's export (export_dir when it is still being written), oldest first,
    following model.init_from back."""
    records: list[PhaseRecord] = []
    while run_dir is not None and len(records) < MAX_PHASES:
        record = phase_record(run_dir, export_dir if not records else None)
        records.append(record)
        source = Path(record.init_from) if record.init_from else None
        run_dir = run_dir_of(source) if source is not None and source.is_dir() else None
    return records[::-1]


def rows_of(results, export_dir: Path) -> list[str]:
    """The contenders of pipeline.evaluate's results JSON (loaded) that evaluated export_dir."""
    rows = (results.get("results") or {}) if isinstance(results, dict) else {}
    target = Path(export_dir).resolve()
    return [
        name
        for name, r in rows.items()
        if isinstance(r, dict) and r.get("model_path") and Path(r["model_path"]).resolve() == target
    ]


def find_eval_results(export_dir: Path, run_dir: Optional[Path]) -> Optional[Path]:
    """eval.json / results.json beside the run (the run dir, its experiment dir, or the experiment's
    evaluate/) that has a row for this export; None when there is none."""
    base = Path(run_dir) if run_dir is not None else Path(export_dir)
    for folder in (base, base.parent, base.parent / "evaluate"):
        for name in EVAL_FILES:
            candidate = folder / name
            if candidate.is_file() and rows_of(read_json(candidate), export_dir):
                return candidate
    return None
