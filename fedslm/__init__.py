"""FedSLM: privacy-preserving federated LoRA fine-tuning of small language models.

Everything imports under ``fedslm``: the shared package (this directory) and the
``fedslm.client``, ``fedslm.server`` and ``fedslm.simulations`` layers, which the
repository keeps in its top-level ``client/``, ``server/`` and ``simulations/`` folders
(and the Hydra configs in ``conf/`` as ``fedslm.conf``). An installed wheel maps them by
setuptools' ``package-dir``; in a source tree (a checkout, an editable install, or the app
bundle Flower unpacks for ``flwr run``) the small finder below maps them to the folders
beside this package, so the same imports work everywhere.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parent.parent
SOURCE_LAYERS = {"fedslm.client": "client", "fedslm.server": "server",
                 "fedslm.simulations": "simulations", "fedslm.conf": "conf"}


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``fedslm.client`` & co. in the source tree this package was loaded from."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib protocol
        folder = SOURCE_LAYERS.get(fullname)
        if folder is None:
            return None
        init = _SOURCE_ROOT / folder / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(init.parent)])


def _in_source_tree() -> bool:
    """A checkout or Flower's app bundle: the project's pyproject.toml sits beside us."""
    pyproject = _SOURCE_ROOT / "pyproject.toml"
    return pyproject.is_file() and 'name = "fedslm"' in pyproject.read_text(errors="replace")


if _in_source_tree() and not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _SourceTreeFinder())
