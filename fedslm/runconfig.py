"""The one place where an experiment config becomes Flower's flat run config and back.

Flower run-config values are ``bool | int | float | str`` under dotted keys, and every
key must be declared in ``[tool.flwr.app.config]`` of pyproject.toml. Lists become
comma-joined strings. ``python -m fedslm.runconfig --write-pyproject`` regenerates that
table from the schema's defaults; a test keeps the two equal.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from fedslm.config import ExperimentConfig

FlatConfig = dict[str, bool | int | float | str]
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def to_run_config(cfg: ExperimentConfig) -> FlatConfig:
    """Flatten a checked config into Flower's run config (dotted keys, scalars)."""
    flat: FlatConfig = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, dotted + ".")
            elif isinstance(value, list):
                flat[dotted] = ",".join(str(v) for v in value)
            else:
                flat[dotted] = value

    walk(cfg.to_dict(), "")
    return flat


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``: dotted keys as the schema's nested groups."""
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def from_run_config(flat: dict[str, Any]) -> ExperimentConfig:
    """Rebuild and re-check the config from Flower's run config (inverse of to_run_config)."""
    return ExperimentConfig.from_dict(nest(flat))


def pyproject_table(cfg: ExperimentConfig | None = None) -> str:
    """The ``[tool.flwr.app.config]`` TOML body for the schema defaults."""
    lines = []
    for key, value in to_run_config(cfg or ExperimentConfig.from_dict({})).items():
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, str):
            rendered = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            rendered = repr(value)
        lines.append(f'"{key}" = {rendered}')
    return "\n".join(lines) + "\n"


_TABLE = re.compile(r"(\[tool\.flwr\.app\.config\]\n)(.*?)(?=\n\[|\Z)", re.S)


def write_pyproject(path: Path = PROJECT_ROOT / "pyproject.toml") -> None:
    text = path.read_text()
    new, count = _TABLE.subn(lambda m: m.group(1) + pyproject_table(), text)
    if count != 1:
        raise SystemExit(f"error: no [tool.flwr.app.config] table in {path}")
    path.write_text(new)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write-pyproject", action="store_true")
    args = parser.parse_args(argv)
    if args.write_pyproject:
        write_pyproject()
    else:
        sys.stdout.write(pyproject_table())


if __name__ == "__main__":
    main()
