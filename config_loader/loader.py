"""Reading, `_base_` includes, deep merge, dotted overrides and validation messages (see the package)."""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import ValidationError

ErrorType = type[Exception]


class ConfigLoadError(ValueError):
    """A configuration problem phrased for the user (raised when the caller names no error type)."""


def read_yaml(path: Union[str, Path], *, what: str = "config file", error: ErrorType = ConfigLoadError) -> Any:
    """The YAML document of `path` (None for an empty file); `what` names the file in the message
    when it cannot be read. Invalid YAML is reported as ``<path>:<line>: invalid YAML: <problem>``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise error(f"{path}{line}: invalid YAML: {getattr(err, 'problem', err)}") from None


def deep_merge(base: dict, top: dict) -> dict:
    """`top` merged onto `base`: mappings key by key (recursively), anything else replaced by top's."""
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _expand_named_sections(node: dict, named_sections: Collection[str]) -> dict:
    """``section: name`` -> ``section: {name: name}`` for the sections that may be given by their name alone."""
    return {k: {"name": v} if k in named_sections and isinstance(v, str) else v for k, v in node.items()}


def resolve_includes(
    node: Any,
    base_dir: Path,
    *,
    named_sections: Collection[str] = (),
    error: ErrorType = ConfigLoadError,
    _stack: tuple = (),
) -> Any:
    """Replace every mapping's ``_base_: path`` by that file's content, merged under the mapping's own
    keys (paths relative to `base_dir`). In every mapping, a key of `named_sections` whose value is a
    string is read as that section's ``name`` (``engine: fsdp`` -> ``engine: {name: fsdp}``)."""
    if isinstance(node, list):
        return [resolve_includes(v, base_dir, named_sections=named_sections, error=error, _stack=_stack) for v in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    base = node.pop("_base_", None)
    node = _expand_named_sections(
        {
            k: resolve_includes(v, base_dir, named_sections=named_sections, error=error, _stack=_stack)
            for k, v in node.items()
        },
        named_sections,
    )
    if base is None:
        return node
    path = (base_dir / str(base)).resolve()
    if path in _stack:
        raise error(f"circular _base_ include of {path}")
    included = resolve_includes(
        read_yaml(path, error=error) or {},
        path.parent,
        named_sections=named_sections,
        error=error,
        _stack=_stack + (path,),
    )
    if not isinstance(included, dict):
        raise error(f"_base_ file {path} must hold a mapping")
    return deep_merge(included, node)


def load_yaml_with_includes(
    path: Union[str, Path], *, named_sections: Collection[str] = (), error: ErrorType = ConfigLoadError
) -> Any:
    """A YAML file with its ``_base_`` includes resolved (`resolve_includes`); an empty file is ``{}``."""
    path = Path(path).resolve()
    return resolve_includes(
        read_yaml(path, error=error) or {}, path.parent, named_sections=named_sections, error=error, _stack=(path,)
    )


def apply_overrides(
    raw: dict, overrides: list[str], *, named_sections: Collection[str] = (), error: ErrorType = ConfigLoadError
) -> dict:
    """A copy of `raw` with each ``dotted.key=value`` item set (the value parsed as YAML; missing
    mappings on the way are created). A key of `named_sections` given a string sets its ``name``."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise error(f"override {item!r} must look like dotted.key=value")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        if key in named_sections and isinstance(value, str):
            key = f"{key}.name"
        node, parts = raw, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise error(f"override {item!r}: config key {'.'.join(parts[: depth + 1])!r} is not a mapping")
            node = child
        node[parts[-1]] = value
    return raw


def format_validation_errors(
    err: ValidationError,
    *,
    key_label: str = "{}",
    prefix: str = "",
    tags: Optional[Mapping[str, Collection[str]]] = None,
    hidden_inputs: tuple[type, ...] = (dict, list),
    bare_model_errors: bool = True,
) -> list[str]:
    """One line per problem of `err`, naming the key: ``<key>: unknown key``, ``<key>: required but
    missing``, else ``<key>: <message> (got <input>)``.

    - `key_label`: how a dotted key is written (``"config key {!r}"`` -> ``config key 'a.b'``);
      ``<top>`` stands for the model itself;
    - `prefix`: a dotted location put before every key;
    - `tags`: discriminated unions, section -> its tag values: the tag pydantic puts after the
      section in an error's location is left out (``phase.distill.w_kd`` -> ``phase.w_kd``);
    - `hidden_inputs`: inputs of these types are not shown after the message;
    - `bare_model_errors`: a model validator's error (no location) is its message alone.
    """
    lines = []
    for e in err.errors():
        parts = list(e["loc"])
        if tags and len(parts) > 1 and parts[1] in tags.get(str(parts[0]), ()):
            del parts[1]
        loc = ".".join(str(p) for p in ([prefix] if prefix else []) + parts)
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{key_label.format(loc)}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"{key_label.format(loc)}: required but missing")
        elif bare_model_errors and e["type"] == "value_error" and not e["loc"]:
            lines.append(msg)
        else:
            shown = e.get("input")
            shown = "" if isinstance(shown, hidden_inputs) else f" (got {shown!r})"
            lines.append(f"{key_label.format(loc or '<top>')}: {msg}{shown}")
    return lines
