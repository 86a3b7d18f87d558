"""``bench secagg``: which rows the protocol table has, and a tiny in-process run of it
(no engine; smoke, never timed)."""

from __future__ import annotations

import json
from pathlib import Path

from fedslm.simulations.bench.__main__ import main
from fedslm.simulations.bench.secagg import protocol_settings


def test_each_graph_is_a_row_per_count_and_dropout_and_a_complete_one_is_listed_once() -> None:
    rows = protocol_settings([10, 50], [20, 0], [0.0, 0.3])
    assert rows == [
        (10, 0, 0.0),
        (10, 0, 0.3),  # k = 20 >= 9 neighbours: the complete graph
        (50, 20, 0.0),
        (50, 20, 0.3),
        (50, 0, 0.0),
        (50, 0, 0.3),
    ]


def test_tiny_run_unmasks_exactly_and_counts_the_overhead(tmp_path: Path) -> None:
    out = tmp_path / "secagg.json"
    assert main(["secagg", "--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["protocol"]
    assert [(r["clients"], r["dropout"], r["neighbours"], r["threshold"], r["survivors"]) for r in rows] == [
        (5, 0.0, 4, 3, 5),
        (5, 0.2, 4, 3, 4),
    ]
    for r in rows:
        assert r["abandoned"] == "no" and r["max_abs_error"] < 2**-19  # 20-bit rounding over [-1, 1]
        assert r["plain_up_bytes"] == 64 * 4 and r["up_overhead"] == r["up_bytes_per_survivor"] / 256 - 1
        assert r["server_cpu_s"] > 0 and r["client_cpu_s"] > 0
    assert result["quality"] == [] and result["deployment"] == []
