"""The audit on the real builtin tiny model and the privacy report it writes (no engine)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import pytest

from fedslm.audit.canaries import make_canaries
from fedslm.audit.metrics import epsilon_lower_bound_ci
from fedslm.config import ExperimentConfig
from fedslm.server.audit import REPORT_JSON, REPORT_MD, REPORT_PLOT, audit_and_report
from fedslm.server.experiment import initial_adapter
from fedslm.server.tracking import Tracker
from fedslm.simulations.audit import main as audit_main
from tests.stores import sqlite_store


def _cfg(tmp_path: Path) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "federation": {"num_clients": 2}, "data": {"docs_per_client": 6},
        "privacy": {"audit": True},
        "audit": {"canaries": 1, "repetitions": [1, 4], "candidates": 31},
        "tracking": {"uri": sqlite_store(tmp_path / "mlflow.db"), "experiment": "audit"},
        "output_dir": str(tmp_path / "run")})


def _write_run(cfg: ExperimentConfig, rows: list[dict]) -> Path:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    with open(out / "rounds.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    return out


ROWS = [{"round": 1, "eval_perplexity": 9.0, "dp_epsilon_sample_max": 1.5, "dp_delta": 1e-3},
        {"round": 2, "eval_perplexity": 8.5, "dp_epsilon_sample_max": 2.25, "dp_delta": 1e-3}]


def test_untrained_adapter_audit_and_report(tmp_path: Path):
    """LoRA B = 0: the audited model *is* the reference, so the calibrated attack has
    nothing to go on (AUC exactly 0.5, no TPR at 1% FPR); the report carries the run's
    last epsilon and delta, and MLflow gets metrics named ``auc`` and ``exposure``."""
    cfg = _cfg(tmp_path)
    out = _write_run(cfg, ROWS)
    tracker = Tracker(cfg.tracking, default_uri="")
    run_id = tracker.start({}, default_name="audit")
    report = audit_and_report(cfg, out, initial_adapter(cfg), tracker)
    audit = report["audit"]
    assert audit["audit_mia_calibrated_auc"] == 0.5
    assert audit["audit_mia_calibrated_tpr_at_1pct_fpr"] == 0.0
    assert audit["audit_mia_members"] == 2 * 5 and audit["audit_mia_non_members"] == 2 * 1
    assert audit["audit_delta"] == 1e-3
    assert audit["audit_eps_lower_bound"] == 0.0  # neither attack beats chance with certainty
    assert audit["audit_eps_lower_bound_ceiling"] == pytest.approx(epsilon_lower_bound_ci(
        false_negatives=0, members=10, false_positives=0, non_members=2, delta=1e-3))
    assert audit["audit_exposure_ceiling"] == 5.0  # log2(31 + 1)
    for reps in (1, 4):
        assert 0.0 <= audit[f"audit_exposure_rep{reps}"] <= 5.0
    assert (report["mode"], report["epsilon_sample_level"], report["delta"]) == ("none", 2.25, 1e-3)
    assert report["utility"] == {"eval_perplexity": 8.5, "eval_perplexity_initial": 9.0}
    assert json.loads((out / REPORT_JSON).read_text())["audit"] == audit
    assert "| audit_mia_loss_auc |" in (out / REPORT_MD).read_text()
    assert (out / REPORT_PLOT).stat().st_size > 0
    logged = mlflow.MlflowClient(tracking_uri=tracker.uri).get_run(run_id).data.metrics
    assert {"audit_mia_loss_auc", "audit_mia_calibrated_auc", "audit_exposure_rep1",
            "audit_exposure_rep4"} <= set(logged)
    artifacts = mlflow.MlflowClient(tracking_uri=tracker.uri).list_artifacts(run_id, "privacy")
    assert sorted(Path(a.path).name for a in artifacts) == sorted([REPORT_JSON, REPORT_MD,
                                                                   REPORT_PLOT])


def test_offline_audit_of_a_run_without_canaries_reports_membership_only(tmp_path: Path, capsys):
    cfg = _cfg(tmp_path)
    data = cfg.to_dict()
    data["privacy"]["audit"] = False
    out = _write_run(cfg, ROWS)
    (out / "config.json").write_text(json.dumps(data))
    from fedslm.adapters import save_adapter

    save_adapter(initial_adapter(cfg), cfg.peft, base_model="x", out_dir=out / "adapter")
    assert audit_main(["--run", str(out), "--no-tracking"]) == 0
    audit = json.loads((out / REPORT_JSON).read_text())["audit"]
    assert "audit_mia_loss_auc" in audit and not any("exposure" in k for k in audit)
    assert "Report:" in capsys.readouterr().out


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: None, "has no config.json"),
    (lambda d: (d / "config.json").write_text("{"), "has no adapter/adapter_model.safetensors"),
])
def test_offline_audit_bad_input_is_one_line_exit_2(tmp_path: Path, capsys, setup, message):
    run = tmp_path / "run"
    run.mkdir()
    setup(run)
    assert audit_main(["--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_offline_audit_names_a_broken_config(tmp_path: Path, capsys):
    cfg = _cfg(tmp_path)
    out = _write_run(cfg, ROWS)
    from fedslm.adapters import save_adapter

    save_adapter(initial_adapter(cfg), cfg.peft, base_model="x", out_dir=out / "adapter")
    (out / "config.json").write_text(json.dumps({"peft": {"r": 0}}))
    assert audit_main(["--run", str(out)]) == 2
    err = capsys.readouterr().err
    assert "peft.r: must be > 0, got 0" in err and err.count("\n") == 1


def test_canaries_of_the_audit_are_the_ones_the_clients_trained_on(tmp_path: Path):
    from fedslm.client.task import client_texts

    cfg = _cfg(tmp_path)
    train = client_texts(cfg, 0, "train")
    assert all(train.count(c.text) == c.repetitions for c in make_canaries(cfg.audit))


def test_report_plot_has_one_utility_curve_per_dp_level():
    """dp_sgd+dp_fedavg: perplexity against each epsilon (round 0, before any release, has
    none); without DP: against the round."""
    from fedslm.server.audit import CURVE_LABELS, NO_DP_CURVE, utility_curves

    both = [{"round": 0, "eval_perplexity": 9.0},
            {"round": 1, "eval_perplexity": 8.5, "dp_epsilon_sample_max": 1.5, "dp_epsilon_user": 6.0},
            {"round": 2, "eval_perplexity": 8.25, "dp_epsilon_sample_max": 2.0, "dp_epsilon_user": 9.5}]
    assert utility_curves(both) == {
        CURVE_LABELS["dp_epsilon_sample_max"]: [(1.5, 8.5), (2.0, 8.25)],
        CURVE_LABELS["dp_epsilon_user"]: [(6.0, 8.5), (9.5, 8.25)]}
    assert utility_curves(ROWS) == {CURVE_LABELS["dp_epsilon_sample_max"]: [(1.5, 9.0), (2.25, 8.5)]}
    plain = [{k: v for k, v in r.items() if not k.startswith("dp_")} for r in both]
    assert utility_curves(plain) == {NO_DP_CURVE: [(0, 9.0), (1, 8.5), (2, 8.25)]}
