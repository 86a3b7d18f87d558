"""The staged app dir handed to ``flwr run`` yields the FAB the project root would."""

from __future__ import annotations

import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedslm.runconfig import PROJECT_ROOT
from fedslm.simulations.app_dir import app_files, stage_app


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


TREE = ["pyproject.toml", "README.md", "pkg/mod.py", "build/keep.py", "build/drop.py",
        "gen/keep.py", "gen/x.py", "data1/a.json", "tmp/t.py", "nested/tmp/u.py",
        ".venv/lib/site.py", "run.log"]


@pytest.mark.parametrize("gitignore", [
    "build/\n!build/keep.py\n",
    "gen\n!gen/keep.py\n",
    "*\n!*.py\n!*/\n!pyproject.toml\n",
    "/build\n**/tmp\ndata*/\n",
    ".venv/\n*.log\n",
    "",
])
def test_the_same_files_as_flowers_own_filter(tmp_path: Path, gitignore: str) -> None:
    """Including negations, which can bring files back out of an ignored directory."""
    from flwr.cli.utils import collect_files, filter_paths_for_publish

    root = tmp_path / "proj"
    for rel in TREE:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    (root / ".gitignore").write_text(gitignore)
    assert sorted(app_files(root)) == sorted(filter_paths_for_publish(collect_files(root)))


def test_a_symlinked_gitignore_is_not_read_as_flower_does_not(tmp_path: Path) -> None:
    from flwr.cli.utils import collect_files, filter_paths_for_publish

    root = tmp_path / "proj"
    (root / "gen").mkdir(parents=True)
    (root / "gen" / "x.py").write_text("x = 1\n")
    (tmp_path / "real.gitignore").write_text("gen/\n")
    (root / ".gitignore").symlink_to(tmp_path / "real.gitignore")
    assert sorted(app_files(root)) == sorted(filter_paths_for_publish(collect_files(root))) == ["gen/x.py"]


def test_staging_refuses_a_dir_that_exists(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        stage_app(PROJECT_ROOT, tmp_path / "out")
