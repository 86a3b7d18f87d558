"""Bad input caught before any engine starts: one line naming the key or the file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedslm.config import ConfigError, DataConfig, ExperimentConfig
from fedslm.data.core import DataError
from fedslm.data.sources import load_text_files
from fedslm.simulations.preflight import check_machine
from tests.proc_util import run_cli


def test_gpus_per_client_on_a_machine_without_one(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cfg = ExperimentConfig.from_dict({"federation": {"client_num_gpus": 1}})
    with pytest.raises(ConfigError) as err:
        check_machine(cfg)
    assert str(err.value) == ("federation.client_num_gpus: 1 per client, but this machine has "
                              "no GPU torch can use; set it to 0")
    check_machine(ExperimentConfig.from_dict({}))


def test_an_output_dir_that_cannot_be_written(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    cfg = ExperimentConfig.from_dict({"output_dir": str(tmp_path / "a-file" / "run")})
    with pytest.raises(ConfigError) as err:
        check_machine(cfg)
    assert str(err.value) == f"output_dir: cannot write to {tmp_path / 'a-file' / 'run'} (Not a directory)"


def _load(path: Path) -> None:
    load_text_files(DataConfig(source="text_files", path=str(path)))


def test_text_that_is_mostly_control_characters_is_rejected_with_file_and_line(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("A line of text.\n\nAnother paragraph, with a tab\there.\n")
    _load(good)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine first line\n" + bytes(range(1, 9)) * 40 + b"\n")
    with pytest.raises(DataError) as err:
        _load(bad)
    assert str(err.value) == f"data.path: {bad}:2: mostly control characters (96% of the file); not text"


@pytest.mark.parametrize(("content", "line", "what"), [
    ('text,label\n"abc,1\ndef,2\nghi",3\n', 2,
     "a quote opened here runs to line 4 over lines that look like rows (unterminated quote?)"),
    ("text,label\nok,1\n\"unterminated\n", 3, "malformed CSV (unterminated quote)"),
    ('text,label\n"abc"x,1\n', 2, "malformed CSV (',' expected after '\"')"),
])
def test_a_csv_with_broken_quoting_is_rejected_with_file_and_line(tmp_path: Path, content: str,
                                                                   line: int, what: str) -> None:
    path = tmp_path / "data.csv"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        _load(path)
    assert str(err.value) == f"data.path: {path}:{line}: {what}"


def test_a_multiline_quoted_field_is_still_fine(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('text,label\n"first line\nsecond line of the same text",1\nplain,2\n')
    _load(path)


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(bytes(range(1, 9)) * 40)
    proc, _ = run_cli(["data=text_files", f"data.path={bad}"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: data.path: {bad}:1: mostly control characters (100% of the file); not text")


def test_a_truncated_checkpoint_to_resume_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.npz").write_bytes(b"PK\x03\x04 half a zip")
    proc, _ = run_cli([f"federation.resume_from={tmp_path}"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: federation.resume_from: {tmp_path / 'checkpoint.npz'} is not a readable "
        "checkpoint (BadZipFile)"]


@pytest.mark.e2e
def test_a_deadline_no_client_can_meet_fails_the_run(tmp_path: Path) -> None:
    proc, _ = run_cli(["federation.num_clients=2", "federation.num_rounds=2",
                       "federation.round_timeout=0.001", "data.docs_per_client=16",
                       "tracking.enabled=false", f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: the run failed: NoTrainingError: federation.round_timeout: all 2 clients of "
        "round 1 missed the 0.001s deadline and none has trained yet")


LIGHT_PREFLIGHT = """
import sys
from fedslm.config import ExperimentConfig
from fedslm.simulations.preflight import preflight
cfg = ExperimentConfig.from_dict({"federation": {"num_clients": 3}, "data": {"docs_per_client": 16}})
path = preflight(cfg)
heavy = sorted(m for m in ("torch", "transformers.modeling_utils", "peft", "fedslm.model", "fedslm.runtime")
               if m in sys.modules)
print(path)
print(heavy)
bad = ExperimentConfig.from_dict({"peft": {"target_modules": "q_proj,qq_proj"}})
try:
    preflight(bad)
except Exception as err:
    print(type(err).__name__, err)
"""


def test_preflight_of_the_builtin_model_skips_transformers_and_still_checks_explicit_targets() -> None:
    """The launcher's check of the default (builtin, auto targets, training.device auto in
    fp32) imports neither torch nor transformers' modelling code nor PEFT, and finds the same model dir as the engine;
    explicit targets on the builtin are still checked against its architecture."""
    import subprocess
    import sys

    from fedslm.config import ModelConfig
    from fedslm.runtime import model_path

    out = subprocess.run([sys.executable, "-c", LIGHT_PREFLIGHT], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    path, heavy, error = out.stdout.splitlines()[-3:]
    assert path == model_path(ModelConfig())
    assert heavy == "[]"
    assert error == ("ModelError peft.target_modules: 'qq_proj' matches no module of the base "
                     "model (targetable: down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, "
                     "q_proj, up_proj, v_proj)")
