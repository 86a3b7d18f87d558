"""Where the project's shared, read-only data sets live (SST-2, Alpaca, Shakespeare).

``conf/data/{sst2,alpaca,shakespeare}.yaml`` name their files as
``${fedslm.shared_data:sst2/train.tsv}``: relative to ``$FEDSLM_SHARED_DATA`` when set,
else to ``shared/data`` beside the project root (the source tree this package is
imported from: a checkout or an editable install), so the path is the same whatever
directory a command runs from. An installed wheel has no project root: there the
default is ``../shared/data`` from the current directory, and the variable is the way
to point at the data.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "FEDSLM_SHARED_DATA"
RESOLVER = "fedslm.shared_data"


def project_root() -> Path | None:
    """The source tree ``fedslm`` was imported from (its pyproject.toml beside us), or None."""
    from fedslm import _SOURCE_ROOT, _in_source_tree

    return _SOURCE_ROOT if _in_source_tree() else None


def shared_data_dir() -> Path:
    """``$FEDSLM_SHARED_DATA``, else ``<project root>/../shared/data`` (absolute)."""
    if env := os.environ.get(ENV, "").strip():
        return Path(env).expanduser().resolve()
    root = project_root()
    return ((root if root is not None else Path.cwd()).parent / "shared" / "data").resolve()


def shared_data_path(relative: str) -> str:
    """``relative`` under the shared data dir, as an absolute path string."""
    return str(shared_data_dir() / relative)


def register_resolver() -> None:
    """Make ``${fedslm.shared_data:REL}`` resolvable in OmegaConf/Hydra configs (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, shared_data_path)


def missing_path_hint(path: str | Path) -> str:
    """What to add to a "does not exist" error for a file under the shared data dir."""
    shared = shared_data_dir()
    if Path(path).resolve().is_relative_to(shared):
        return f" (shared data dir {shared}: set {ENV} to the directory holding the shared data sets)"
    return ""
