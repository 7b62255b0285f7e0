"""One loader for the project's YAML configs, shared by `pipeline` (run configs), `launchers`
(experiment files) and `data_prep` (the subcommands' ``--config`` files).

- `read_yaml`: one file's YAML document;
- `load_yaml_with_includes`: a file whose mappings may say ``_base_: <path>`` (merged under them,
  `deep_merge`), paths relative to the including file;
- `apply_overrides`: command-line ``dotted.key=value`` items (values parsed as YAML);
- `format_validation_errors`: a pydantic ValidationError as one line per problem, naming the key.

Neutral: it imports none of the packages that use it. A problem raises the error type the caller
passes as ``error`` (default `ConfigLoadError`), so each caller keeps its own (pipeline's
ConfigError, launchers' ExperimentError, data_prep's DataPrepError).
"""

from config_loader.loader import (
    ConfigLoadError,
    apply_overrides,
    deep_merge,
    format_validation_errors,
    load_yaml_with_includes,
    read_yaml,
    resolve_includes,
)

__all__ = [
    "ConfigLoadError",
    "apply_overrides",
    "deep_merge",
    "format_validation_errors",
    "load_yaml_with_includes",
    "read_yaml",
    "resolve_includes",
]
