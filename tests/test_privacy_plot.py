"""The privacy-utility plot reads a real MLflow store and logs its PNG back to it."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest

from fedslm.simulations.privacy_plot import PLOT_KIND, PLOT_TAG, curves, main, plot_experiment
from tests.stores import sqlite_store


def _run(client, exp_id, name, params, metrics, status="FINISHED"):
    run = client.create_run(exp_id, run_name=name)
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    for key, values in metrics.items():
        for step, value in enumerate(values, start=1):
            client.log_metric(run.info.run_id, key, value, step=step)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_plot_collects_final_epsilon_and_perplexity_and_logs_the_png(tmp_path: Path, capsys):
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("dp", artifact_location=(tmp_path / "artifacts").as_uri())
    _run(client, exp, "sgd-1", {"privacy.mode": "dp_sgd", "privacy.noise_multiplier": "1.0"},
         {"dp_epsilon_sample_max": [1.0, 2.5], "dp_delta": [1e-3, 1e-3], "central_perplexity": [9.0, 8.5]})
    _run(client, exp, "sgd-2", {"privacy.mode": "dp_sgd", "privacy.noise_multiplier": "0.5"},
         {"dp_epsilon_sample_max": [4.0, 9.0], "central_perplexity": [8.8, 8.1],
          "audit_mia_loss_auc": [0.52], "audit_mia_calibrated_auc": [0.55],
          "audit_exposure_rep4": [2.0], "audit_exposure_rep16": [1.25],
          "audit_exposure_rep16_max": [3.0], "audit_eps_lower_bound": [0.0]})
    _run(client, exp, "fedavg", {"privacy.mode": "dp_fedavg", "privacy.noise_multiplier": "1.0"},
         {"dp_epsilon_user": [6.0, 9.5], "eval_perplexity": [9.5, 9.2]})
    _run(client, exp, "base", {"privacy.mode": "none"}, {"central_perplexity": [8.0, 7.5]})
    _run(client, exp, "broken", {"privacy.mode": "dp_sgd"}, {"central_perplexity": [1.0]}, status="FAILED")
    _run(client, exp, "no-release", {"privacy.mode": "dp_sgd"}, {"central_perplexity": [9.9]})

    out = tmp_path / "plot" / "pu.png"
    points, run_id = plot_experiment("dp", uri, out)
    got = {p.run_name: (p.mode, p.noise_multiplier, p.epsilon, p.perplexity, p.perplexity_metric,
                        p.initial_perplexity) for p in points}
    assert got == {
        "sgd-1": ("dp_sgd", 1.0, 2.5, 8.5, "central_perplexity", 9.0),
        "sgd-2": ("dp_sgd", 0.5, 9.0, 8.1, "central_perplexity", 8.8),
        "fedavg": ("dp_fedavg", 1.0, 9.5, 9.2, "eval_perplexity", 9.5),
        "base": ("none", 0.0, math.inf, 7.5, "central_perplexity", 8.0),
    }
    audited = {p.run_name: (p.audit_mia_auc, p.audit_exposure, p.audit_exposure_reps,
                            p.audit_eps_lower_bound) for p in points if p.audit_exposure_reps}
    assert audited == {"sgd-2": (0.55, 1.25, 16, 0.0)}  # the stronger attack, the most repeated canary
    assert out.stat().st_size > 10_000 and out.with_suffix(".csv").exists()
    plot_run = client.get_run(run_id)
    assert plot_run.data.tags[PLOT_TAG] == PLOT_KIND
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["pu.csv", "pu.png"]
    # running it again does not plot its own earlier plot run
    main(["--experiment", "dp", "--tracking-uri", uri, "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.count("dp_sgd") == 2 and "privacy-utility" not in printed.split("Plot:")[0]
    assert "0.550     1.25@16  0.000" in printed


def test_plot_names_a_missing_experiment(tmp_path: Path):
    with pytest.raises(SystemExit, match="no MLflow experiment named 'nope'"):
        plot_experiment("nope", sqlite_store(tmp_path / "mlflow.db"), tmp_path / "x.png")


def test_both_levels_in_one_run_give_a_sample_and_a_user_level_point(tmp_path: Path, capsys):
    """dp_sgd+dp_fedavg: two curves, one per epsilon, each point with its own noise and delta."""
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("both", artifact_location=(tmp_path / "artifacts").as_uri())
    _run(client, exp, "both-1", {"privacy.mode": "dp_sgd+dp_fedavg", "privacy.noise_multiplier": "1.2",
                                 "privacy.user_noise_multiplier": "1.0"},
         {"dp_epsilon_sample_max": [1.0, 2.5], "dp_delta_sample": [1e-3, 1e-3], "dp_epsilon_user": [6.0, 11.8],
          "dp_delta": [1e-5, 1e-5], "eval_perplexity": [9.0, 8.6]})
    _run(client, exp, "both-2", {"privacy.mode": "dp_sgd+dp_fedavg", "privacy.noise_multiplier": "2.0",
                                 "privacy.user_noise_multiplier": "2.0"},
         {"dp_epsilon_sample_max": [0.5, 0.9], "dp_delta_sample": [1e-3, 1e-3], "dp_epsilon_user": [2.0, 3.5],
          "dp_delta": [1e-5, 1e-5], "eval_perplexity": [9.0, 8.9]})
    out = tmp_path / "both.png"
    points, _ = plot_experiment("both", uri, out)
    got = [(p.run_name, p.level, p.noise_multiplier, p.epsilon, p.delta, p.perplexity) for p in points]
    assert got == [("both-2", "sample", 2.0, 0.9, 1e-3, 8.9), ("both-1", "sample", 1.2, 2.5, 1e-3, 8.6),
                   ("both-2", "user", 2.0, 3.5, 1e-5, 8.9), ("both-1", "user", 1.0, 11.8, 1e-5, 8.6)]
    assert out.stat().st_size > 10_000
    lines = {label: [(p.run_name, p.epsilon) for p in pts] for label, (_, pts) in curves(points).items()}
    assert lines == {"both levels: sample-level ε (DP-SGD)": [("both-2", 0.9), ("both-1", 2.5)],
                     "both levels: user-level ε (DP-FedAvg)": [("both-2", 3.5), ("both-1", 11.8)]}
    main(["--experiment", "both", "--tracking-uri", uri, "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.count("dp_sgd+dp_fedavg sample") == 2 and printed.count("dp_sgd+dp_fedavg user") == 2
