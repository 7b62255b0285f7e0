"""Initial weights from the run's seed alone, whatever the engine and the number of ranks.

Why: the engines used to draw from-scratch weights from the global torch RNG at different
moments (DeepSpeed's `zero.Init` runs the modules' constructors, which draw; FSDP builds on the
meta device, which draws nothing), so one seed gave two different models. Here a module's
initial values are a function of (run seed, the module's qualified name, its parameters'
shapes) only: the model's own `init_fn` (`_init_weights`, which defines the distribution) runs
on full-size fp32 CPU stand-ins with the CPU generator seeded for that module, so the values
depend neither on the traversal, nor on the partitioning, nor on the device (CPU and CUDA
generators differ), nor on what the global RNG did before. Each engine then writes the values
into its own storage.

Memory: the model is initialised one unit at a time, a unit being one block that the model names
in `_no_split_modules` (a decoder layer), or the rest of the model (embeddings, final norm, exit
gate, lm_head). Only one unit's full fp32 values exist at once, on CPU: for Ouro-1.4B the largest
unit is the rest (2 x 49152 x 2048 ~ 201M values, ~0.8 GB), a decoder layer ~51M values
(~0.2 GB), against ~5.6 GB for the whole model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from pipeline.training.weights import plain_shape

InitFn = Callable[[nn.Module], None]
ShapeFn = Callable[[nn.Parameter], tuple[int, ...]]  # a parameter's whole shape (Engine.full_shape)


def module_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed for the module `name` (stable across processes, unlike hash())."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class InitUnit:
    """Modules initialised together (post-order, children first as Hugging Face does) and the
    parameters their init_fn may set: those owned by these modules, by qualified name."""

    modules: list[tuple[str, nn.Module]]
    params: dict[str, nn.Parameter]


def qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def is_block(module: nn.Module, block_names: set[str]) -> bool:
    return any(cls.__name__ in block_names for cls in type(module).__mro__)


def post_order_named(module: nn.Module, name: str, stop: Callable[[nn.Module], bool]):
    """(qualified name, module) children before parents; does not enter modules for which stop() holds."""
    for child_name, child in module.named_children():
        if not stop(child):
            yield from post_order_named(child, qualified(name, child_name), stop)
    yield name, module


def init_units(root: nn.Module, prefix: str = "") -> list[InitUnit]:
    """The blocks under `root` that it names in `_no_split_modules` (e.g. decoder layers), one unit
    each, then the rest of `root`. An init_fn of a module outside a block must not set the block's
    parameters (Hugging Face's _init_weights and ours set a module's own and its children's)."""
    block_names = set(getattr(root, "_no_split_modules", None) or [])
    blocks: list[tuple[str, nn.Module]] = []
    if block_names:
        blocks = [
            (qualified(prefix, n), m) for n, m in root.named_modules() if m is not root and is_block(m, block_names)
        ]
        inner = {id(m) for _, b in blocks for m in b.modules() if m is not b}
        blocks = [(n, b) for n, b in blocks if id(b) not in inner]  # blocks inside blocks belong to theirs
    block_ids = {id(b) for _, b in blocks}
    roots = blocks + [(prefix, root)]
    units: list[InitUnit] = []
    owner: dict[int, int] = {}  # parameter id -> index of the unit that owns it
    for name, top in roots:

        def stop(m, top=top):
            return m is not top and id(m) in block_ids

        modules = list(post_order_named(top, name, stop))
        params: dict[str, nn.Parameter] = {}
        for module_name, module in modules:
            for leaf, param in module._parameters.items():
                if param is None:
                    continue
                if owner.setdefault(id(param), len(units)) != len(units):
                    raise ValueError(
                        f"parameter {qualified(module_name, leaf)} is shared between a "
                        f"{'/'.join(sorted(block_names))} block and another part of the model"
                    )
                params.setdefault(qualified(module_name, leaf), param)
        units.append(InitUnit(modules, params))
    return units


def stand_in(param: nn.Parameter, full_shape: ShapeFn = plain_shape) -> nn.Parameter:
    """A full-size CPU tensor in place of `param`; NaN, so a value init_fn leaves alone shows."""
    if param.is_floating_point():
        value = torch.full(full_shape(param), float("nan"), dtype=torch.float32)
    else:
        value = torch.zeros(full_shape(param), dtype=param.dtype)
    return nn.Parameter(value, requires_grad=False)


def run_seeded(init_fn: InitFn, module: nn.Module, seed: int) -> None:
    """init_fn(module) drawing from the CPU generator seeded with `seed`; the global RNG state is
    restored afterwards (initialisation does not move the run's random stream)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        with torch.no_grad():
            init_fn(module)


def unit_values(
    unit: InitUnit, init_fn: InitFn, seed: int, full_shape: ShapeFn = plain_shape
) -> dict[str, torch.Tensor]:
    """The full initial value (fp32 on CPU for floating parameters) of every parameter of `unit`;
    `full_shape` reads the whole shape of a parameter partitioned in place (Engine.full_shape)."""
    by_id = {id(p): stand_in(p, full_shape) for p in unit.params.values()}
    swapped = []
    for _, module in unit.modules:
        for leaf, param in module._parameters.items():
            if param is not None and id(param) in by_id:
                swapped.append((module, leaf, param))
                module._parameters[leaf] = by_id[id(param)]
    try:
        for name, module in unit.modules:
            run_seeded(init_fn, module, module_seed(seed, name))
    finally:
        for module, leaf, param in swapped:
            module._parameters[leaf] = param
    values = {name: by_id[id(p)].data for name, p in unit.params.items()}
    unset = [name for name, value in values.items() if value.is_floating_point() and bool(value.isnan().any())]
    if unset:
        raise RuntimeError(f"initialisation left parameters unset (NaN): {sorted(unset)}")
    return values


def initial_values(
    root: nn.Module, init_fn: InitFn, seed: int, prefix: str = ""
) -> Iterator[tuple[InitUnit, dict[str, torch.Tensor]]]:
    """Each unit of `root` with its parameters' initial values, one unit at a time."""
    for unit in init_units(root, prefix):
        yield unit, unit_values(unit, init_fn, seed)


def initialize(root: nn.Module, init_fn: InitFn, seed: int, prefix: str = "") -> None:
    """Set a plain (not partitioned) model's parameters to their seeded initial values in place."""
    for unit, values in initial_values(root, init_fn, seed, prefix):
        with torch.no_grad():
            for name, param in unit.params.items():
                param.copy_(values[name])
