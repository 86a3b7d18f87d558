"""DP-SGD with personalization: every step on a client's records is in its ledger.

The real task functions on the builtin tiny Llama and the built-in synthetic corpus;
the reference is Opacus's accountant called directly on the (noise, sample rate, steps)
the client actually trained under (as in tests/test_dp_sgd.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedslm.personal_state import load_personal
from fedslm.client.privacy import BudgetExhausted, ledger_path, load_ledger
from fedslm.client.task import evaluate, fit
from fedslm.config import ConfigError, ExperimentConfig
from fedslm.server.experiment import initial_adapter

NOISE, DELTA, BATCH, STEPS, FINETUNE_STEPS = 1.2, 1e-3, 4, 2, 3


def experiment(method: str, out: Path, *, mode: str = "dp_sgd", **privacy) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "personalization": {"method": method, "finetune_steps": FINETUNE_STEPS},
        "federation": {"num_clients": 3, "num_rounds": 2},
        "data": {"heterogeneity": 1.0, "docs_per_client": 20},
        "training": {"local_steps": STEPS, "batch_size": BATCH},
        "privacy": {"mode": mode, "noise_multiplier": NOISE, "delta": DELTA, **privacy},
        "output_dir": str(out),
    })


def _reference_epsilon(history, delta: float = DELTA) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism="prv")
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def _rate(num_records: int) -> float:
    return 1.0 / math.ceil(num_records / BATCH)


@pytest.mark.parametrize(("method", "mode"), [("local_only", "dp_sgd"), ("split", "dp_sgd"),
                                              ("dual", "dp_sgd"), ("split", "dp_sgd+dp_fedavg")])
def test_personal_training_in_fit_spends_the_clients_epsilon(method, mode, tmp_path):
    cfg = experiment(method, tmp_path, mode=mode)
    sent, client_dir = initial_adapter(cfg), tmp_path / "c0"
    steps_taken = 0
    for rnd in (1, 2):
        _, metrics = fit(cfg, sent, partition_id=0, server_round=rnd, client_dir=client_dir)
        steps_taken += metrics["steps"]
    history = [(NOISE, _rate(metrics["num-examples"]), 2 * STEPS)]
    ledger = load_ledger(client_dir)
    assert steps_taken == 2 * STEPS == metrics["dp-steps-total"]
    assert ledger.history == history and ledger.rounds == [1, 2]
    assert metrics["dp-epsilon"] == pytest.approx(_reference_epsilon(history), abs=1e-6)
    assert load_personal(client_dir, method=method).updates == 2  # the personal part trained under it


def test_finetune_steps_at_evaluation_are_in_the_ledger(tmp_path):
    cfg = experiment("finetune", tmp_path)
    sent, client_dir = initial_adapter(cfg), tmp_path / "c1"
    _, trained = fit(cfg, sent, partition_id=1, server_round=1, client_dir=client_dir)
    evaluated = evaluate(cfg, sent, partition_id=1, server_round=1, client_dir=client_dir)
    history = [(NOISE, _rate(trained["num-examples"]), STEPS + FINETUNE_STEPS)]
    assert load_ledger(client_dir).history == history
    assert load_ledger(client_dir).rounds == [1, 1]  # one entry per DP training: fit, fine-tune
    assert evaluated["dp-steps-total"] == STEPS + FINETUNE_STEPS
    assert evaluated["dp-epsilon"] == pytest.approx(_reference_epsilon(history), abs=1e-6)
    assert evaluated["dp-epsilon"] > trained["dp-epsilon"]
    assert (evaluated["dp-finetune-refused"], evaluated["has_personal"]) == (0, 1)
    # the next round's train reply carries the fine-tune's steps too (the server's floor holds)
    _, again = fit(cfg, sent, partition_id=1, server_round=2, client_dir=client_dir)
    assert again["dp-steps-total"] == 2 * STEPS + FINETUNE_STEPS


def test_a_finetune_over_budget_is_refused_and_the_ledger_kept(tmp_path):
    first = experiment("finetune", tmp_path)
    sent, client_dir = initial_adapter(first), tmp_path / "c2"
    _, trained = fit(first, sent, partition_id=2, server_round=1, client_dir=client_dir)
    capped = experiment("finetune", tmp_path, max_epsilon=trained["dp-epsilon"] * 1.01)
    before = ledger_path(client_dir).read_text()
    evaluated = evaluate(capped, sent, partition_id=2, server_round=1, client_dir=client_dir)
    assert ledger_path(client_dir).read_text() == before
    assert (evaluated["dp-finetune-refused"], evaluated["has_personal"], evaluated["personal_round"]) == (1, 0, -1)
    assert evaluated["dp-epsilon"] == pytest.approx(trained["dp-epsilon"])
    assert evaluated["dp-steps-total"] == STEPS
    assert evaluated["personal_gain"] == 0.0  # the global model stands in for the personal one
    assert load_personal(client_dir, method="finetune") is None


def test_a_personal_fit_over_budget_refuses_before_training(tmp_path):
    cfg = experiment("split", tmp_path, max_epsilon=0.01)
    client_dir = tmp_path / "c0"
    with pytest.raises(BudgetExhausted, match="budget exhausted") as refused:
        fit(cfg, initial_adapter(cfg), partition_id=0, server_round=1, client_dir=client_dir)
    assert refused.value.metrics["partition-id"] == 0
    assert not ledger_path(client_dir).exists()
    assert load_personal(client_dir, method="split") is None


@pytest.mark.parametrize(("method", "mode", "message"), [
    ("split", "dp_fedavg", "personalization.method: split cannot run with privacy.mode=dp_fedavg: "
     "the personal part"),
    ("finetune", "dp_fedavg", "personalization.method: finetune cannot run with privacy.mode=dp_fedavg"),
    ("local_only", "dp_sgd+dp_fedavg", "personalization.method: local_only cannot run with "
     "privacy.mode=dp_sgd+dp_fedavg: it releases no update"),
])
def test_combinations_that_still_cannot_work_are_refused(method, mode, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        experiment(method, tmp_path, mode=mode)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["local_only", "finetune", "split", "dual"])
def test_every_method_is_accepted_with_dp_sgd(method, tmp_path):
    assert experiment(method, tmp_path).privacy.sample_level
