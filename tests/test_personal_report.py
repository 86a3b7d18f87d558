"""Server-side personalization statistics and the comparison command, on hand-built numbers."""

from __future__ import annotations

import csv
import math
import statistics

import pytest

from fedslm.config import TrackingConfig
from fedslm.server.personalization import PersonalizationReport, round_stats, spread
from fedslm.server.tracking import NoTracker, Tracker
from fedslm.simulations import compare


def _row(pid: int, ppl: float, personal_ppl: float | None) -> dict:
    has = personal_ppl is not None
    personal_ppl = personal_ppl if has else ppl
    return {"round": 3, "phase": "evaluate", "node_id": 100 + pid, "partition-id": pid,
            "loss": math.log(ppl), "perplexity": ppl, "accuracy": 0.5,
            "personal_loss": math.log(personal_ppl), "personal_perplexity": personal_ppl,
            "personal_accuracy": 0.6 if has else 0.5,
            "personal_gain": 100.0 * (1 - personal_ppl / ppl), "has_personal": int(has),
            "personal_round": 3 if has else -1, "num-examples": 10, "num-tokens": 600}


def test_spread_is_mean_median_and_linear_percentiles():
    assert spread([1.0, 2.0, 3.0, 4.0]) == pytest.approx(
        {"mean": 2.5, "median": 2.5, "p10": 1.3, "p90": 3.7})


def test_round_stats_counts_each_client_once_and_gain_only_with_a_personal_adapter():
    rows = [_row(0, 10.0, 8.0), _row(1, 10.0, 9.0), _row(2, 20.0, 22.0), _row(3, 40.0, None)]
    stats = round_stats(rows)
    assert stats["global_perplexity_mean"] == pytest.approx(20.0)  # all four clients
    assert stats["global_perplexity_median"] == pytest.approx(15.0)
    assert stats["personal_perplexity_mean"] == pytest.approx(13.0)  # the three with one
    assert stats["personal_clients"] == 3.0
    assert stats["gain_mean"] == pytest.approx((20.0 + 10.0 - 10.0) / 3)
    assert stats["gain_median"] == pytest.approx(10.0)
    assert stats["gain_p10"] == pytest.approx(-10.0 + 0.2 * 20.0)
    assert stats["gain_p90"] == pytest.approx(10.0 + 0.8 * 10.0)
    assert stats["clients_improved_pct"] == pytest.approx(200 / 3)
    assert stats["gain_sem"] == pytest.approx(statistics.stdev([20.0, 10.0, -10.0]) / math.sqrt(3))
    assert stats["personal_accuracy_mean"] == pytest.approx(0.6)


def test_round_stats_without_personalization_has_only_global():
    rows = [{k: v for k, v in _row(i, 10.0 + i, None).items() if not k.startswith(("personal", "has"))}
            for i in range(3)]
    stats = round_stats(rows)
    assert stats["personal_clients"] == 0.0
    assert stats["global_perplexity_mean"] == pytest.approx(11.0)
    assert not any(k.startswith(("personal_perplexity", "gain", "clients_improved")) for k in stats)


def test_report_writes_a_table_per_round_and_the_plots(tmp_path):
    report = PersonalizationReport(tmp_path, NoTracker())
    assert report.round_metrics(0, [_row(0, 10.0, None), _row(1, 12.0, None)])["personal_clients"] == 0
    stats = report.round_metrics(1, [_row(1, 12.0, 9.0), _row(0, 10.0, 8.0),
                                     {**_row(2, 1.0, 1.0), "phase": "train"}])
    assert stats["personal_clients"] == 2.0  # train rows are not evaluation
    with open(tmp_path / "personalization" / "clients_round_001.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["partition-id"] for r in table] == ["0", "1"]
    assert float(table[0]["personal_perplexity"]) == 8.0 and table[0]["has_personal"] == "1"
    paths = report.finish()
    assert [p.name for p in paths] == ["quality_over_rounds.png", "gain_histogram.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def _log_run(uri: str, method: str, *, personal: list[float] | None, global_: list[float],
             improved: float | None, bytes_up: float, bytes_down: float) -> None:
    tracker = Tracker(TrackingConfig(experiment="cmp"), default_uri=uri)
    tracker.start({"personalization.method": method, "federation.num_rounds": len(global_) - 1})
    for step, g in enumerate(global_):
        metrics = {"global_perplexity_mean": g}
        if personal is not None and step > 0:
            metrics.update(personal_perplexity_mean=personal[step - 1], clients_improved_pct=improved,
                           gain_mean=100 * (1 - personal[step - 1] / global_[step]), gain_sem=1.5)
        if step > 0:
            metrics.update(bytes_up=bytes_up, bytes_down=bytes_down)
        tracker.log_metrics(metrics, step=step)
    tracker.end("FINISHED")


def test_compare_prints_one_row_per_method(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _log_run(uri, "dual", personal=[9.0, 8.0], global_=[12.0, 10.0, 9.5], improved=75.0,
             bytes_up=1024, bytes_down=2048)
    _log_run(uri, "none", personal=None, global_=[12.0, 10.0, 9.0], improved=None,
             bytes_up=2048, bytes_down=2048)
    _log_run(uri, "dual", personal=[9.5, 7.5], global_=[12.0, 10.0, 9.4], improved=100.0,
             bytes_up=1024, bytes_down=2048)  # the newer dual run wins
    assert compare.main(["--experiment", "cmp", "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["method", "personal", "ppl", "global", "ppl", "improved", "%",
                                "gain", "%", "±sem", "bytes", "sent", "wall", "s"]
    assert lines[2].split()[:7] == ["none", "-", "9.000", "-", "-", "8.0", "KiB"]
    assert lines[3].split()[:8] == ["dual", "7.500", "9.400", "100", "+20.21", "±1.50", "6.0", "KiB"]
    assert len(lines) == 4
    assert compare.main(["--experiment", "cmp", "--tracking-uri", uri, "--all"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 5


def test_compare_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert compare.main(["--experiment", "cmp", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err == f"error: --tracking-uri: no MLflow database at {tmp_path}/mlflow.db\n"
    assert not (tmp_path / "mlflow.db").exists()
    _log_run(uri, "none", personal=None, global_=[3.0], improved=None, bytes_up=0, bytes_down=0)
    capsys.readouterr()
    assert compare.main(["--experiment", "nope", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err == f"error: --experiment: no MLflow experiment named 'nope' at {uri}\n"
