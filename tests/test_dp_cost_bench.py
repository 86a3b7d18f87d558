"""The DP cost benchmark runs and reports what its table needs (figures are not asserted)."""

from __future__ import annotations

import pytest

from fedslm.simulations.bench.dp_cost import combine, measure, table


@pytest.mark.parametrize("mode", ["none", "hooks", "ghost"])
def test_measure_reports_one_configuration(mode):
    result = measure("tiny", mode, batch_size=2, seq_len=16, steps=1, warmup=1, repeats=1, threads=1,
                     device="cpu")
    assert (result["trainable_params"], result["total_params"]) == (4096, 168_768)
    assert result["step_seconds"] > 0 and result["cpu_step_seconds"] > 0
    assert result["peak_memory_bytes"] >= 0 and result["steps"] == 1
    # DP trains on the plain run's fixed batches unless asked for Poisson sampling
    assert (result["largest_batch"], result["poisson"]) == (2, False)


def test_poisson_sampling_is_measured_when_asked():
    result = measure("tiny", "hooks", batch_size=2, seq_len=16, steps=3, warmup=1, repeats=1,
                     threads=1, device="cpu", poisson=True)
    assert result["poisson"] is True and isinstance(result["largest_batch"], int)
    row = table([combine([result])]).splitlines()[1]
    assert row.endswith("(Poisson)") and row.split()[:2] == ["tiny", "hooks"]


def test_table_compares_each_mode_with_plain_training():
    base = {"size": "tiny", "mode": "none", "step_seconds": 0.02, "cpu_step_seconds": 0.01,
            "peak_memory_bytes": 2**20, "examples_per_step": 8, "trainable_params": 4096, "total_params": 9}
    dp = {**base, "mode": "hooks", "cpu_step_seconds": 0.015, "peak_memory_bytes": 3 * 2**20}
    rows = table([combine([base]), combine([dp]), {"size": "tiny", "mode": "ghost", "error": "boom"}]).splitlines()
    assert rows[2].split()[:7] == ["tiny", "hooks", "20.0", "15.0", "1.50", "3.0", "3.00"]
    assert rows[3] == "tiny    ghost  failed: boom"


def test_the_bench_dispatcher_runs_dp_and_exits_zero(tmp_path):
    """``python -m fedslm.simulations.bench dp`` (one fresh process on the tiny setting)."""
    import json
    import subprocess
    import sys

    from fedslm.runconfig import PROJECT_ROOT

    out = tmp_path / "dp.json"
    proc = subprocess.run([sys.executable, "-m", "fedslm.simulations.bench", "dp", "--sizes", "tiny",
                           "--modes", "none", "--steps", "1", "--repeats", "1", "--warmup", "0",
                           "--passes", "1", "--batch-size", "2", "--seq-len", "16", "--json", str(out)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-800:]
    [result] = json.loads(out.read_text())["results"]
    assert (result["size"], result["mode"], result["trainable_params"]) == ("tiny", "none", 4096)
