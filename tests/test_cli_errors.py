"""Bad input ends the command with one line naming the problem and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.proc_util import REPO, run_cli, survivors


def _one_line_error(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "expected"), [
    (["peft.r=0"], "error: peft.r: must be > 0, got 0"),
    (["strategy.fraction_train=1.5"], "error: strategy.fraction_train: must be in (0, 1], got 1.5"),
    (["data=text_files", "data.path=/no/such/dir"], "error: data.path: /no/such/dir does not exist"),
    (["training.seq_len=4096"], "error: training.seq_len: 4096 exceeds the maximum sequence length 256"),
    (["model.name_or_path=/no/such/model"], "error: model.name_or_path: cannot load '/no/such/model'"),
    (["strategy.name=fedbogus"], "error: strategy.name: unknown value 'fedbogus'"),
    pytest.param(["training.device=cuda"], "error: training.device: cuda was requested but torch "
                 "sees no CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
    pytest.param(["model.quantization=4bit"], "error: model.quantization: 4bit needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
    (["tracking.uri=http://127.0.0.1:1"],
     "error: tracking.uri: cannot reach the MLflow server at http://127.0.0.1:1 (ConnectError"),
])
def test_bad_values_fail_fast_with_one_line(args: list[str], expected: str) -> None:
    proc, marker = run_cli(args, timeout=120)
    assert _one_line_error(proc).startswith(expected)
    assert survivors(marker, wait=0) == []


def test_empty_client_partition_is_named(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("one paragraph only.\n\nand a second one.\n")
    proc, _ = run_cli(["data=text_files", f"data.path={tmp_path}"], timeout=120)
    line = _one_line_error(proc)
    assert line.startswith("error: ") and "client" in line


def test_unknown_strategy_group_lists_the_options() -> None:
    proc, _ = run_cli(["strategy=bogus"], timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'strategy/bogus'" in proc.stderr
    assert "fedadam" in proc.stderr


def test_the_cli_checks_its_config_before_loading_torch_or_flower() -> None:
    """A bad value fails in about a second: the entry module imports neither stack."""
    import subprocess
    import sys

    probe = ("import sys, fedslm.simulations.run; "
             "print(sorted(m for m in ('torch', 'transformers', 'peft', 'flwr', 'ray') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_launcher_stays_interruptible_whatever_it_inherits() -> None:
    """A parent that ignores or blocks SIGINT (kept across exec) cannot make Ctrl-C a no-op."""
    import signal

    def ignore_and_block() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def child(prepare: str) -> subprocess.CompletedProcess:
        code = (f"import os, signal, time; {prepare}; os.kill(os.getpid(), signal.SIGINT); "
                "time.sleep(0.5); print('survived')")
        return subprocess.run([sys.executable, "-c", code], preexec_fn=ignore_and_block, cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    inherited = child("pass")  # what it inherits alone: the signal is lost
    assert inherited.returncode == 0 and "survived" in inherited.stdout
    fixed = child("from fedslm.simulations.run import interruptible; interruptible()")
    assert fixed.returncode != 0 and "survived" not in fixed.stdout
    assert "KeyboardInterrupt" in fixed.stderr
