"""The end-of-run lines that tell a user where the run went."""

from __future__ import annotations

from fedslm.simulations.report import where_to_look

SUMMARY = {"output_dir": "/o", "adapter_dir": "/o/adapter", "mlflow_run_id": "abc", "mlflow_experiment_id": "7"}


def test_sqlite_store_is_opened_with_mlflow_ui() -> None:
    text = where_to_look({**SUMMARY, "mlflow_uri": "sqlite:////x/mlflow.db"})
    assert text.splitlines()[-1] == "Open it with: mlflow ui --backend-store-uri sqlite:////x/mlflow.db"


def test_tracking_server_is_opened_at_its_own_address() -> None:
    text = where_to_look({**SUMMARY, "mlflow_uri": "http://10.0.0.5:5000/"})
    assert text.splitlines()[-1] == "Open it at:   http://10.0.0.5:5000/#/experiments/7/runs/abc"
    assert "mlflow ui" not in text


def test_no_tracking_no_mlflow_lines() -> None:
    assert "MLflow" not in where_to_look({**SUMMARY, "mlflow_uri": ""})


def test_the_table_shows_the_servers_own_evaluation_when_the_clients_evaluate_nothing() -> None:
    from fedslm.simulations.report import summary_table

    central = [
        {"round": 0, "central_loss": 2.2243, "central_perplexity": 9.2467},
        {
            "round": 1,
            "train_loss": 2.1,
            "central_loss": 2.1783,
            "central_perplexity": 8.8313,
            "bytes_up": 52224,
            "bytes_down": 52224,
            "round_seconds": 4.4,
        },
    ]
    assert summary_table(central).splitlines() == [
        "round train loss central loss       ppl         up       down seconds",
        "-" * 69,
        "    0          -       2.2243      9.25          -          -       -",
        "    1     2.1000       2.1783      8.83   51.0 KiB   51.0 KiB     4.4",
    ]
    # the clients' evaluation, when there is one, is what the table shows
    both = [{**r, "eval_loss": 3.0, "eval_perplexity": 20.0855} for r in central]
    assert summary_table(both).splitlines()[0] == "round train loss eval loss       ppl         up       down seconds"
    assert summary_table(both).splitlines()[3] == "    1     2.1000    3.0000     20.09   51.0 KiB   51.0 KiB     4.4"
