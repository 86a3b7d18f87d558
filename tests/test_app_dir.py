"""The staged app dir handed to ``flwr run`` yields the FAB the project root would."""

from __future__ import annotations

import zipfile
from io import BytesIO
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from fedslm.runconfig import PROJECT_ROOT
from simulations.app_dir import app_files, stage_app


def _fab_members(fab: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(BytesIO(fab)) as z:
        return {name: z.read(name) for name in z.namelist()}


def test_staged_project_builds_the_same_fab_as_the_root(tmp_path: Path) -> None:
    staged = stage_app(PROJECT_ROOT, tmp_path / "app")
    from_root = build_fab_from_disk(PROJECT_ROOT)
    from_stage = build_fab_from_disk(staged)
    assert from_stage == from_root  # same files, same bytes, same manifest
    members = _fab_members(from_stage)
    assert "server/app.py" in members and "client/app.py" in members
    assert not any(m.startswith((".venv/", "outputs/")) for m in members)
    assert not any(Path(m).name.startswith("test_") for m in members)


def test_ignored_directories_and_symlinks_are_left_out(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "pyproject.toml").write_text("[project]\nname = 'p'\n")
    (root / ".gitignore").write_text("big/\n*.log\n")
    (root / "big" / "deep").mkdir(parents=True)
    (root / "big" / "deep" / "huge.py").write_text("y = 2\n")
    (root / "pkg" / "run.log").write_text("noise\n")
    (root / "pkg" / "link.py").symlink_to(root / "pkg" / "mod.py")
    assert sorted(app_files(root)) == [".gitignore", "pkg/mod.py", "pyproject.toml"]
    staged = stage_app(root, tmp_path / "out")
    assert (staged / "pkg" / "mod.py").read_text() == "x = 1\n"
    assert not (staged / "big").exists() and not (staged / "pkg" / "link.py").exists()
