"""conf/data/{sst2,alpaca,shakespeare}.yaml find the shared data from the project root (or
``$FEDSLM_SHARED_DATA``), whatever directory the command runs from; a missing file is one
line naming ``data.path`` and the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from fedslm.config import DataConfig
from fedslm.data import DataError
from fedslm.data.shakespeare import parse_speeches
from fedslm.data.sources import load_text_files
from fedslm.shared_data import ENV, shared_data_dir, shared_data_path
from fedslm.simulations.run import experiment_from_hydra
from tests.hydra_util import CONF_DIR

REPO = CONF_DIR.parent
FILES = {"sst2": "sst2/train.tsv", "alpaca": "alpaca/alpaca_5000.json", "shakespeare": "tinyshakespeare.txt"}
TASKS = {"sst2": "classify", "alpaca": "instruct", "shakespeare": "causal_lm"}


def _data_path_from(cwd: Path, data: str) -> str:
    """Compose as the Hydra entry does when started in ``cwd`` (its runtime.cwd)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"data={data}", f"task={TASKS[data]}"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(cwd / "out")
            cfg.hydra.runtime.cwd = str(cwd)
        HydraConfig.instance().set_config(cfg)
        OmegaConf.set_readonly(cfg, False)
        with open_dict(cfg):
            del cfg["hydra"]
        return experiment_from_hydra(cfg).data.path


@pytest.mark.parametrize("data", sorted(FILES))
def test_the_shared_data_path_is_the_same_from_any_directory(tmp_path, monkeypatch, data) -> None:
    monkeypatch.delenv(ENV, raising=False)
    expected = str((REPO.parent / "shared" / "data" / FILES[data]).resolve())
    assert _data_path_from(REPO, data) == expected
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert _data_path_from(elsewhere, data) == expected
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))  # the variable wins
    assert _data_path_from(elsewhere, data) == str(tmp_path / "mine" / FILES[data])


def test_the_default_is_beside_the_project_root_and_the_variable_overrides_it(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert shared_data_dir() == (REPO.parent / "shared" / "data").resolve()
    monkeypatch.setenv(ENV, f"{tmp_path}/x/../d ")
    assert shared_data_path("sst2/dev.tsv") == f"{tmp_path}/d/sst2/dev.tsv"


def test_a_missing_shared_file_is_one_line_naming_the_key_and_the_variable(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV, str(tmp_path))
    hint = f" (shared data dir {tmp_path}: set {ENV} to the directory holding the shared data sets)"
    sst2 = shared_data_path("sst2/train.tsv")
    with pytest.raises(DataError) as err:
        load_text_files(DataConfig(source="text_files", path=sst2))
    assert str(err.value) == f"data.path: {sst2} does not exist{hint}"
    with pytest.raises(DataError) as err:
        parse_speeches(shared_data_path("tinyshakespeare.txt"))
    assert str(err.value) == f"data.path: {tmp_path / 'tinyshakespeare.txt'} does not exist{hint}"
    other = tmp_path.parent / "not-shared.tsv"  # a path of the user's own: no hint
    with pytest.raises(DataError) as err:
        load_text_files(DataConfig(source="text_files", path=str(other)))
    assert str(err.value) == f"data.path: {other} does not exist"


def test_the_cli_from_another_directory_says_which_file_is_missing_and_exits_2(tmp_path) -> None:
    """The real entry point, started outside the repository (as an installed console script
    would be): the data dir comes from the variable, the error is one line, exit code 2."""
    env = {**os.environ, ENV: str(tmp_path / "data"), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedslm.simulations.run",
            "data=sst2",
            "task=classify",
            "tracking.enabled=false",
            f"output_dir={tmp_path / 'out'}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    missing = tmp_path / "data" / "sst2" / "train.tsv"
    assert proc.stderr.strip().splitlines() == [
        f"error: data.path: {missing} does not exist (shared data dir {tmp_path / 'data'}: "
        f"set {ENV} to the directory holding the shared data sets)"
    ]
