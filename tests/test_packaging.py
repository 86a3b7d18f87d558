"""One import namespace: the distribution installs only ``fedslm`` (client, server,
simulations and the Hydra configs inside it), and every console script runs from the
installed package, not from the source tree or the working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_source_package_is_listed_for_the_wheel():
    """A new sub-package that is not listed would be missing from an installed FedSLM."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    found = {
        ".".join((name, *init.parent.relative_to(ROOT / folder).parts))
        for name, folder in mapping.items()
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert found == listed


def test_the_apps_load_under_the_namespace():
    components = PYPROJECT["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedslm.server.app:app", "clientapp": "fedslm.client.app:app"}
    scripts = PYPROJECT["project"]["scripts"]
    assert all(target.startswith("fedslm.") for target in scripts.values())


@pytest.mark.e2e
def test_the_wheel_installs_only_fedslm_and_its_scripts_run(tmp_path):
    source = tmp_path / "src"  # a clean copy: setuptools writes build/ into the tree it builds
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("fedslm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fedslm", wheel.name.split("-py3")[0] + ".dist-info"}
    for expected in (
        "fedslm/client/task.py",
        "fedslm/server/rounds.py",
        "fedslm/simulations/run.py",
        "fedslm/tasks/classify.py",
        "fedslm/conf/config.yaml",
        "fedslm/conf/task/instruct.yaml",
    ):
        assert expected in names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    for script in PYPROJECT["project"]["scripts"]:
        done = subprocess.run(
            [str(target / "bin" / script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, (script, done.stderr[-2000:])
    where = subprocess.run(
        [sys.executable, "-c", "import fedslm.client.task as t; print(t.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip() == str(target / "fedslm" / "client" / "task.py")


def test_ci_installs_the_export_extra_with_the_test_extra():
    """CI installs .[test]: the ONNX export test must find onnx and onnxruntime there."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "fedslm[export]" in extras["test"]
    assert {d.split(">")[0] for d in extras["export"]} == {"onnx", "onnxruntime"}
