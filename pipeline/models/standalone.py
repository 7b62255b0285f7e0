"""The standalone modelling files of an export: pipeline/models concatenated into one module.

A checkpoint whose config.json has an `auto_map` naming `modeling_melt.MeltForCausalLM` (or
`modeling_looplm.LoopLMForCausalLM`) loads with `trust_remote_code=True` wherever transformers
runs, without this package. The file is generated from the package's own source at export time
(never kept by hand, so it cannot drift): the model module and every module it imports
relatively, in dependency order, with their relative imports dropped and their top-level imports
merged at the top. Only torch, transformers, safetensors and the standard library may be
imported (transformers' dynamic-module loader checks the imports before running the file).
"""

from __future__ import annotations

import ast
import hashlib
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import transformers

MODELS_DIR = Path(__file__).resolve().parent
REPO_ROOT = MODELS_DIR.parents[1]
THIRD_PARTY = ("torch", "transformers", "safetensors")
LINE_WIDTH = 110


@dataclass(frozen=True)
class Standalone:
    module: str  # the pipeline/models module that defines the model
    filename: str  # the generated file's name in the export
    config_class: str
    model_class: str

    def auto_map(self) -> dict:
        stem = self.filename.removesuffix(".py")
        return {"AutoConfig": f"{stem}.{self.config_class}", "AutoModelForCausalLM": f"{stem}.{self.model_class}"}


BY_MODEL_TYPE = {
    "melt": Standalone("melt", "modeling_melt.py", "MeltConfig", "MeltForCausalLM"),
    "ouro": Standalone("looplm", "modeling_looplm.py", "LoopLMConfig", "LoopLMForCausalLM"),
}


def standalone_for(model_type: str) -> Standalone:
    if model_type not in BY_MODEL_TYPE:
        raise ValueError(f"no standalone modelling file for model_type {model_type!r} (known: {sorted(BY_MODEL_TYPE)})")
    return BY_MODEL_TYPE[model_type]


@dataclass
class ParsedModule:
    name: str
    docstring: str
    body: str  # the source without its docstring and top-level imports
    imports: list[ast.Import | ast.ImportFrom]  # top-level imports (level 0)
    relative: dict[str, list[str]]  # module of pipeline/models -> the names imported from it
    defines: set[str]


def _module_path(name: str) -> Path:
    path = MODELS_DIR / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} (imported relatively in pipeline/models) does not exist")
    return path


def parse_module(name: str) -> ParsedModule:
    path = _module_path(name)
    source = path.read_text()
    tree = ast.parse(source, str(path))
    drop: set[int] = set()  # 1-based line numbers taken out of the body
    docstring = ""
    imports: list[ast.Import | ast.ImportFrom] = []
    relative: dict[str, list[str]] = {}
    defines: set[str] = set()
    for index, node in enumerate(tree.body):
        assert node.end_lineno is not None  # ast.parse sets it on every node it makes
        span = range(node.lineno, node.end_lineno + 1)
        if (
            index == 0
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docstring = node.value.value
            drop.update(span)
        elif isinstance(node, ast.ImportFrom) and node.level:
            if node.level != 1 or not node.module or any(a.asname for a in node.names):
                raise ValueError(
                    f"{path}:{node.lineno}: only `from .module import name` (no alias) can be merged "
                    "into the standalone file"
                )
            relative.setdefault(node.module, []).extend(a.name for a in node.names)
            drop.update(span)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
            drop.update(span)
        else:
            defines.update(_top_level_names(node))
    lines = source.splitlines()
    body = "\n".join(line for number, line in enumerate(lines, 1) if number not in drop)
    return ParsedModule(name, docstring, body.strip("\n"), imports, relative, defines)


def _top_level_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = (
        node.targets
        if isinstance(node, ast.Assign)
        else [node.target]
        if isinstance(node, (ast.AnnAssign, ast.AugAssign))
        else []
    )
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def dependency_order(root: str) -> list[ParsedModule]:
    """root and every module it imports relatively, each after the modules it imports."""
    order: list[ParsedModule] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ValueError(f"circular relative imports in pipeline/models: {' -> '.join(chain + (name,))}")
        state[name] = "visiting"
        module = parse_module(name)
        for dependency in module.relative:
            visit(dependency, chain + (name,))
        state[name] = "done"
        order.append(module)

    visit(root, ())
    return order


def check_namespace(modules: list[ParsedModule], bound: dict[str, str]) -> None:
    """One namespace for all: no name defined twice or both defined and imported, and every relatively
    imported name defined by its module."""
    owner: dict[str, str] = {}
    for module in modules:
        for name in sorted(module.defines):
            if name in owner or name in bound:
                where = f"pipeline/models/{owner[name]}.py" if name in owner else f"the import of {bound[name]}"
                raise ValueError(
                    f"pipeline/models/{module.name}.py defines {name!r}, as does {where}: the "
                    "standalone file has one namespace"
                )
            owner[name] = module.name
        for dependency, names in module.relative.items():
            missing = [n for n in names if owner.get(n) != dependency]
            if missing:
                raise ValueError(
                    f"pipeline/models/{module.name}.py imports {missing} from .{dependency}, which "
                    "does not define them at top level"
                )


def merged_imports(modules: list[ParsedModule]) -> tuple[str, dict[str, str]]:
    """One import block (__future__ first, then the standard library, then torch/transformers/safetensors)
    and the names it binds, with where each comes from."""
    plain: set[tuple[str, str | None]] = set()
    names: dict[str, set[tuple[str, str | None]]] = {}
    bound: dict[str, str] = {}  # name in the module namespace -> where it comes from (clashes are errors)
    for module in modules:
        for node in module.imports:
            source = node.module if isinstance(node, ast.ImportFrom) else None
            for alias in node.names:
                full = alias.name if source is None else f"{source}.{alias.name}"
                top = full.split(".")[0]
                if top != "__future__" and top not in sys.stdlib_module_names and top not in THIRD_PARTY:
                    raise ValueError(
                        f"pipeline/models/{module.name}.py imports {top!r}: the standalone file may "
                        f"only import {', '.join(THIRD_PARTY)} and the standard library"
                    )
                if source is None:  # `import a.b` binds a; `import a.b as c` binds c to a.b
                    local, origin = (alias.asname, full) if alias.asname else (top, top)
                    plain.add((alias.name, alias.asname))
                else:
                    local, origin = alias.asname or alias.name, full
                    names.setdefault(source, set()).add((alias.name, alias.asname))
                if bound.setdefault(local, origin) != origin:
                    raise ValueError(
                        f"pipeline/models/{module.name}.py binds {local!r} to {origin}, another module "
                        f"to {bound[local]}: they cannot share one namespace"
                    )
    future = names.pop("__future__", set())
    sections = []
    for in_section in (lambda m: m.split(".")[0] in sys.stdlib_module_names, lambda m: m.split(".")[0] in THIRD_PARTY):
        lines = [_alias("import " + n, a) for n, a in sorted(plain, key=lambda e: e[0]) if in_section(n)]
        lines += [_from_line(m, names[m]) for m in sorted(names) if in_section(m)]
        sections.append("\n".join(sorted(lines, key=lambda line: line.split()[1])))
    head = [_from_line("__future__", future)] if future else []
    return "\n\n".join(head + [s for s in sections if s]), bound


def _alias(text: str, asname: str | None) -> str:
    return f"{text} as {asname}" if asname else text


def _from_line(module: str, entries: set) -> str:
    parts = [_alias(n, a) for n, a in sorted(entries)]
    line = f"from {module} import {', '.join(parts)}"
    if len(line) <= LINE_WIDTH:
        return line
    return f"from {module} import (\n" + "".join(f"    {p},\n" for p in parts) + ")"


def source_provenance(modules: list[ParsedModule]) -> list[str]:
    """Header lines: the package version, git commit and a hash of the source files used."""
    files = [f"pipeline/models/{m.name}.py" for m in modules]
    digest = hashlib.sha256()
    for module in modules:
        digest.update(_module_path(module.name).read_bytes())
    try:
        version = metadata.version("melt-pipeline")
    except metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    return [
        f"from pipeline/models: {', '.join(Path(f).name for f in files)}",
        f"of melt-pipeline {version}, {_git_state(files)};",
        f"sha256 of those files: {digest.hexdigest()}.",
    ]


def _git_state(files: list[str]) -> str:
    def git(*args) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    if not (REPO_ROOT / ".git").exists():  # an installed copy: a git repository around it is another's
        return "git commit unknown (not a git checkout)"
    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--", *files)
    except (OSError, subprocess.CalledProcessError) as err:
        return f"git commit unknown ({err})"
    return f"git commit {commit}" + (" with uncommitted changes to these files" if changed else "")


def generate_source(model_type: str) -> str:
    """The standalone modelling file of model_type ("melt" or "ouro"), as text."""
    spec = standalone_for(model_type)
    modules = dependency_order(spec.module)
    imports, bound = merged_imports(modules)
    check_namespace(modules, bound)
    header = [
        f"# {spec.filename}: {spec.model_class} and {spec.config_class} for transformers' "
        "AutoModelForCausalLM with trust_remote_code=True.",
        "# GENERATED FILE: DO NOT EDIT. Generated by pipeline.models.standalone",
        *(f"# {line}" for line in source_provenance(modules)),
        f"# Written with transformers {transformers.__version__}; imports only torch, transformers, "
        "safetensors and the standard library.",
    ]
    parts = ["\n".join(header), imports]
    for module in modules:
        doc = "\n".join(f"# {line}".rstrip() for line in module.docstring.strip().splitlines())
        parts.append(f"# {'-' * 98}\n# pipeline/models/{module.name}.py\n{doc}\n# {'-' * 98}\n\n{module.body}")
    return "\n\n\n".join(parts) + "\n"


def write_standalone(directory: str | Path, model_type: str) -> dict:
    """Write the generated modelling file into directory; returns the auto_map that names it."""
    spec = standalone_for(model_type)
    (Path(directory) / spec.filename).write_text(generate_source(model_type))
    return spec.auto_map()
