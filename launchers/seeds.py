"""Seeds in an experiment: stages marked ``per_seed: true`` run once per seed of ``seeds``.

A result worth trusting holds on every seed, not on one lucky run, so an experiment can post-train
the same model with several seeds side by side::

    seeds: 3                       # seeds 0, 1, 2 (or a list: [0, 7, 11]); default 1 (seed 0)
    stages:
      transition:
        kind: train
        per_seed: true             # -> transition_seed0, transition_seed1, transition_seed2
        ...
      evaluate_melt:
        kind: evaluate
        per_seed: true
        args: [--model, "melt={distill/export}", ...]   # -> {distill_seed<s>/export}

The copy of a stage for seed s is named ``<stage>_seed<s>`` (its output directory too). In a copy,
an input or ``{stage/...}`` placeholder naming another per-seed stage names that stage's copy for
the same seed, ``{seed}`` in an argument or an override's value is s, and a train stage gets the override ``seed: s`` (the
run config's seed: data order, and any random initialisation). A stage that is not per seed cannot
read a per-seed stage's output (it would not know which seed's). ``--stages NAME`` with the name
of a per-seed stage selects all its copies.
"""

from __future__ import annotations

import copy
import re
from typing import Any

SEED_SUFFIX = "_seed"
_SEED_PLACEHOLDER = "{seed}"


class SeedError(ValueError):
    pass


def seed_list(value: Any) -> list[int]:
    """`seeds`: a count N (seeds 0..N-1) or a list of distinct non-negative ints."""
    if isinstance(value, bool):
        raise SeedError(f"seeds: {value!r} is neither a count nor a list of seeds")
    if isinstance(value, int):
        if value < 1:
            raise SeedError(f"seeds: {value} must be at least 1")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        if any(s < 0 for s in value) or len(set(value)) != len(value):
            raise SeedError(f"seeds: {value} must be distinct non-negative integers")
        return list(value)
    raise SeedError(f"seeds: {value!r} is neither a count (e.g. 3) nor a non-empty list of integers")


def seeded_name(stage: str, seed: int) -> str:
    return f"{stage}{SEED_SUFFIX}{seed}"


def base_name(stage: str) -> str:
    """A per-seed copy's stage name without its seed ('distill_seed2' -> 'distill'); others as they are."""
    return re.sub(SEED_SUFFIX + r"\d+$", "", stage)


def _rename_ref(ref: str, per_seed: set[str], seed: int) -> str:
    """'distill/export' -> 'distill_seed1/export' when distill is per seed."""
    head, sep, rest = ref.strip().strip("/").partition("/")
    return seeded_name(head, seed) + sep + rest if head in per_seed else ref


def _rename_arg(arg: Any, per_seed: set[str], seed: int) -> Any:
    if not isinstance(arg, str):
        return arg
    arg = arg.replace(_SEED_PLACEHOLDER, str(seed))
    return re.sub(r"(?<!\{)\{([^{}]+)\}(?!\})", lambda m: "{" + _rename_ref(m.group(1), per_seed, seed) + "}", arg)


def _references(stage: dict) -> list[str]:
    refs = [str(v) for v in (stage.get("inputs") or {}).values() if isinstance(v, str)]
    for arg in stage.get("args") or []:
        if isinstance(arg, str):
            refs += re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", arg)
    return refs + [str(a) for a in stage.get("after") or []]


def _flat(mapping: dict, prefix: str = "") -> dict:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flat(value, full) if isinstance(value, dict) and value else {full: value})
    return out


def expand_seeds(raw: dict) -> dict:
    """The raw experiment with its per-seed stages replaced by one copy per seed (in place of the
    stage, seeds in order); `seeds` normalised to a list. Raises SeedError naming the key."""
    seeds = seed_list(raw.get("seeds", 1))
    stages = raw.get("stages")
    if not isinstance(stages, dict):
        return {**raw, "seeds": seeds}
    per_seed = {name for name, s in stages.items() if isinstance(s, dict) and s.get("per_seed")}
    out: dict[str, Any] = {}
    for name, stage in stages.items():
        if not isinstance(stage, dict):
            out[name] = stage
            continue
        if "seed" in stage and name in per_seed:
            raise SeedError(f"stages.{name}.seed is set by per_seed: true (one copy per seed), not by hand")
        if name not in per_seed:  # a stage that runs once (or an expanded copy, as a saved experiment has them)
            seeded = sorted({r.split("/")[0] for r in _references(stage)} & per_seed)
            if seeded:
                raise SeedError(
                    f"stages.{name} reads the per-seed stage(s) {', '.join(seeded)}, but is not per seed "
                    f"itself: set stages.{name}.per_seed: true (one copy per seed)"
                )
            out[name] = {k: v for k, v in stage.items() if k != "per_seed"}
            continue
        for seed in seeds:
            copy_ = {k: copy.deepcopy(v) for k, v in stage.items() if k != "per_seed"}
            if copy_.get("inputs"):
                copy_["inputs"] = {
                    k: _rename_ref(v, per_seed, seed) if isinstance(v, str) else v
                    for k, v in _flat(copy_["inputs"]).items()
                }
            if copy_.get("args"):
                copy_["args"] = [_rename_arg(a, per_seed, seed) for a in copy_["args"]]
            if copy_.get("after"):
                copy_["after"] = [_rename_ref(str(a), per_seed, seed) for a in copy_["after"]]
            if copy_.get("output"):
                copy_["output"] = f"{str(copy_['output']).rstrip('/')}{SEED_SUFFIX}{seed}"
            if copy_.get("overrides"):
                copy_["overrides"] = {
                    k: v.replace(_SEED_PLACEHOLDER, str(seed)) if isinstance(v, str) else v
                    for k, v in _flat(copy_["overrides"]).items()
                }
            if stage.get("kind") == "train" and "seed" not in _flat(copy_.get("overrides") or {}):
                copy_["overrides"] = {**(copy_.get("overrides") or {}), "seed": seed}
            copy_["seed"] = seed
            out[seeded_name(name, seed)] = copy_
    return {**raw, "seeds": seeds, "stages": out}


def select_with_seeds(names: list[str], stages: dict) -> list[str]:
    """--stages names: a per-seed stage's base name stands for all its copies."""
    out: list[str] = []
    for name in names:
        copies = [s for s, spec in stages.items() if spec.seed is not None and s == seeded_name(name, spec.seed)]
        out += copies if name not in stages and copies else [name]
    return out
