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
from tests.stores import sqlite_store


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
    uri = sqlite_store(tmp_path / "mlflow.db")
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
    uri = f"sqlite:///{tmp_path}/mlflow.db"  # no store there yet
    assert compare.main(["--experiment", "cmp", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err == f"error: --tracking-uri: no MLflow database at {tmp_path}/mlflow.db\n"
    assert not (tmp_path / "mlflow.db").exists()
    _log_run(uri, "none", personal=None, global_=[3.0], improved=None, bytes_up=0, bytes_down=0)
    capsys.readouterr()
    assert compare.main(["--experiment", "nope", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err == f"error: --experiment: no MLflow experiment named 'nope' at {uri}\n"


def _log_privacy_run(uri: str, params: dict, metrics: dict) -> None:
    tracker = Tracker(TrackingConfig(experiment="cmp-dp"), default_uri=uri)
    tracker.start(params)
    tracker.log_metrics({"global_perplexity_mean": 9.0, "bytes_up": 1024, "bytes_down": 1024, **metrics}, step=1)
    tracker.end("FINISHED")


AUDIT = {"audit_mia_loss_auc": 0.61, "audit_mia_calibrated_auc": 0.64,
         "audit_mia_loss_tpr_at_1pct_fpr": 0.05, "audit_mia_calibrated_tpr_at_1pct_fpr": 0.02,
         "audit_exposure_rep1": 1.5, "audit_exposure_rep16": 3.25, "audit_exposure_rep16_max": 7.0,
         "audit_eps_lower_bound": 0.15}
PERSONAL_AUDIT = {"audit_mia_personal_loss_auc": 0.71, "audit_mia_personal_calibrated_auc": 0.68,
                  "audit_mia_personal_loss_tpr_at_1pct_fpr": 0.1,
                  "audit_mia_personal_calibrated_tpr_at_1pct_fpr": 0.2,
                  "audit_eps_lower_bound_personal": 0.8}


def test_compare_summarizes_each_runs_privacy_report(tmp_path, capsys):
    """One row per method and privacy setting; the privacy table has both levels' epsilon
    and delta, the unit, and the stronger attack's figures, global and personal."""
    uri = sqlite_store(tmp_path / "mlflow.db")
    _log_privacy_run(uri, {"personalization.method": "split", "privacy.mode": "none"},
                     {**AUDIT, **PERSONAL_AUDIT, "personal_perplexity_mean": 8.0})
    _log_privacy_run(uri, {"personalization.method": "split", "privacy.mode": "dp_sgd",
                           "privacy.noise_multiplier": "1.2", "privacy.unit": "document"},
                     {"dp_epsilon_sample_max": 8.04, "dp_delta": 0.002, **AUDIT, **PERSONAL_AUDIT,
                      "audit_eps_lower_bound": 0.0, "audit_eps_lower_bound_personal": 0.0})
    _log_privacy_run(uri, {"personalization.method": "none", "privacy.mode": "dp_sgd+dp_fedavg",
                           "privacy.noise_multiplier": "1.2", "privacy.user_noise_multiplier": "1.0",
                           "privacy.unit": "block"},
                     {"dp_epsilon_sample_max": 3.0, "dp_delta_sample": 0.001, "dp_epsilon_user": 11.8,
                      "dp_delta": 1e-5})
    assert compare.main(["--experiment", "cmp-dp", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    table, privacy = out.split("\n\nPrivacy report (docs/privacy.md)\n")
    assert [line.split()[:2] for line in table.splitlines()[2:]] == [
        ["none", "dp_sgd+dp_fedavg"], ["split", "dp_sgd"], ["split", "none"]]  # newest first per method
    lines = privacy.strip().splitlines()
    assert lines[0].split() == ["method", "privacy", "unit", "eps", "sample", "eps", "user", "delta", "sample",
                                "delta", "user", "MIA", "AUC", "TPR@1%", "personal", "AUC", "personal",
                                "TPR@1%", "exposure", "eps", "lb", "eps", "lb", "personal"]
    assert lines[2].split() == ["none", "dp_sgd+dp_fedavg", "z=1.2/1", "block+client", "3.000", "11.800",
                                "0.001", "1e-05", "-", "-", "-", "-", "-", "-", "-"]
    assert lines[3].split() == ["split", "dp_sgd", "z=1.2", "document", "8.040", "-", "0.002", "-",
                                "0.640", "0.050", "0.710", "0.200", "3.25@16", "0.00", "0.00"]
    assert lines[4].split() == ["split", "none", "-", "-", "-", "-", "-", "0.640", "0.050", "0.710",
                                "0.200", "3.25@16", "0.15", "0.80"]


def test_compare_without_dp_or_audit_prints_no_privacy_table(tmp_path, capsys):
    uri = sqlite_store(tmp_path / "mlflow.db")
    _log_privacy_run(uri, {"personalization.method": "dual"}, {})
    assert compare.main(["--experiment", "cmp-dp", "--tracking-uri", uri]) == 0
    assert "Privacy report" not in capsys.readouterr().out
