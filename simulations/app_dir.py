"""A clean copy of the Flower App for ``flwr run``: only the files its FAB will hold.

``flwr run <dir>`` builds the FAB by walking every file under ``<dir>`` and resolving
each path before it applies ``.gitignore`` — including ``.venv/`` (tens of thousands of
files) and ``outputs/`` (which grows with every run). In this repository that walk took
≈5 s of the ≈6 s between ``flwr run`` starting and the simulation starting, and it grows
with the outputs. Here the walk skips ignored directories instead of visiting them
(unless a negated pattern could bring a file back from one), the
files are chosen by Flower's own filter (``filter_paths_for_publish``: its include and
exclude patterns plus ``.gitignore``), and ``flwr run`` gets a directory holding just
those files. ``flwr run`` then applies its FAB rules to that directory as it would to
the project root, so the FAB has the same files and contents either way (a test checks).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flwr.cli.utils import build_pathspec, filter_paths_for_publish, load_gitignore_patterns

GITIGNORE = ".gitignore"


def app_files(root: Path) -> dict[str, Path]:
    """Relative POSIX path -> file, for every file of ``root`` that Flower's publish filter
    keeps (a superset of the FAB's files: the FAB rules also drop tests)."""
    gitignore = root / GITIGNORE
    # Flower reads the root .gitignore only, and not through a link (it skips links)
    patterns = [] if gitignore.is_symlink() else load_gitignore_patterns(gitignore)
    ignored = build_pathspec(patterns)
    # Flower matches each file against the patterns, so a later "!pattern" can bring
    # back a file inside an ignored directory (git itself would not): then walk it all.
    prune = not any(p.startswith("!") for p in patterns)
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames
                       if not (prune and ignored.match_file((rel_dir / d).as_posix() + "/"))
                       and not (Path(dirpath) / d).is_symlink()]
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():  # Flower skips symlinked files too
                found[(rel_dir / name).as_posix()] = path
    chosen = filter_paths_for_publish(found)
    return {rel: found[rel] for rel in chosen}


def stage_app(root: Path, dest: Path) -> Path:
    """Copy ``root``'s app files (``app_files``) to ``dest``, which must not exist yet (a
    reused dir would keep stale files in the FAB); returns ``dest``."""
    files = app_files(root)
    dest.mkdir(parents=True)
    for rel, src in files.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return dest
