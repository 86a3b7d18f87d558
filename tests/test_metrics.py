"""Per-round summaries: weighted means and spread over clients, exact numbers."""

from __future__ import annotations

import math

from fedslm.server.metrics import summarize


def test_summary_weights_by_examples_and_reports_spread() -> None:
    rows = [{"round": 1, "node_id": 7, "loss": 1.0, "accuracy": 0.5, "num-examples": 1, "partition-id": 0},
            {"round": 1, "node_id": 8, "loss": 2.0, "accuracy": 0.2, "num-examples": 3, "partition-id": 1},
            {"round": 1, "node_id": 9, "loss": 4.0, "accuracy": 0.1, "num-examples": 4, "partition-id": 2}]
    out = summarize(rows, "eval_")
    assert out["eval_loss"] == (1.0 + 6.0 + 16.0) / 8
    assert out["eval_accuracy"] == (0.5 + 0.6 + 0.4) / 8
    assert (out["eval_loss_min"], out["eval_loss_median"], out["eval_loss_max"]) == (1.0, 2.0, 4.0)
    assert out["eval_perplexity"] == math.exp(23.0 / 8)
    assert out["eval_clients"] == 3.0 and out["eval_examples"] == 8.0
    assert "eval_partition-id" not in out and "eval_node_id" not in out


def test_empty_round_has_no_metrics() -> None:
    assert summarize([], "train_") == {}


def test_dropped_clients_get_a_row_each_with_why() -> None:
    from fedslm.server.metrics import dropped_rows

    rows = dropped_rows("train", 2, failed={9: "Error: Node Unavailable\nmore"},
                        timed_out=[4, 3], rejected={5: "tensor x has non-finite values"})
    assert rows == [
        {"round": 2, "phase": "train", "node_id": 9, "status": "failed", "error": "Error: Node Unavailable"},
        {"round": 2, "phase": "train", "node_id": 3, "status": "timed_out", "error": ""},
        {"round": 2, "phase": "train", "node_id": 4, "status": "timed_out", "error": ""},
        {"round": 2, "phase": "train", "node_id": 5, "status": "rejected",
         "error": "tensor x has non-finite values"},
    ]
    assert summarize([{"loss": 1.0, "num-examples": 2, "status": "ok"}], "train_")["train_clients"] == 1.0
