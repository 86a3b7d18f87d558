"""aggregation.* and peft.ranks: the registry names what exists; combinations that cannot
work are refused with one line naming both keys."""

from __future__ import annotations

import pytest

from fedslm.aggregation import AGGREGATIONS, AggregationRule, register_aggregation
from fedslm.config import ConfigError, ExperimentConfig


def test_registry_holds_the_four_rules_and_refuses_a_second_registration() -> None:
    assert list(AGGREGATIONS) == ["fedavg", "ffa", "flora", "flexlora"]
    with pytest.raises(ValueError, match="registered twice"):
        register_aggregation(AggregationRule("ffa", "again"))


@pytest.mark.parametrize("data, first_key, other_key", [
    ({"aggregation": {"name": "flora"}, "strategy": {"name": "fedadam"}}, "strategy.name", "aggregation.name=flora"),
    ({"aggregation": {"name": "flexlora"}, "strategy": {"name": "fedavgm"}}, "strategy.name",
     "aggregation.name=flexlora"),
    ({"aggregation": {"name": "flora"}, "privacy": {"mode": "dp_fedavg", "clip_side": "client"}},
     "privacy.clip_side", "aggregation.name=flora"),
    ({"aggregation": {"name": "ffa"}, "personalization": {"method": "split"}}, "personalization.method",
     "aggregation.name=ffa"),
    ({"aggregation": {"name": "ffa"}, "peft": {"ranks": "50% r=4, 50% r=8"}}, "peft.ranks", "aggregation.name=ffa"),
    ({"peft": {"ranks": "* r=4"}, "personalization": {"method": "split"}}, "peft.ranks",
     "personalization.method=split"),
    ({"peft": {"ranks": "* r=4"}, "personalization": {"method": "local_only"}}, "peft.ranks",
     "personalization.method=local_only"),
    ({"aggregation": {"name": "ffa"}, "personalization": {"method": "local_only"}}, "personalization.method",
     "aggregation.name=ffa"),
    ({"aggregation": {"name": "flora"}, "personalization": {"method": "split"}}, "personalization.method",
     "aggregation.name=flora"),
    ({"aggregation": {"name": "flexlora"}, "personalization": {"method": "local_only"}}, "personalization.method",
     "aggregation.name=flexlora"),
    ({"peft": {"r": 8, "ranks": "* r=16"}}, "peft.ranks", "peft.r=8"),
])
def test_combinations_that_cannot_work_are_refused_naming_both_keys(data, first_key, other_key) -> None:
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict(data)
    message = str(err.value)
    assert message.startswith(first_key + ":") and other_key in message and "\n" not in message


@pytest.mark.parametrize("data", [
    {"aggregation": {"name": "ffa"}, "strategy": {"name": "fedadam"}},  # B-only: optimizer is fine
    {"aggregation": {"name": "ffa"}, "privacy": {"mode": "dp_fedavg"}},
    {"aggregation": {"name": "flora"}, "privacy": {"mode": "dp_fedavg"}},  # product deltas clipped
    {"aggregation": {"name": "flexlora"}, "privacy": {"mode": "dp_sgd+dp_fedavg"}, "peft": {"ranks": "* r=4"}},
    {"peft": {"ranks": "* r=4"}, "privacy": {"mode": "dp_fedavg", "clip_side": "client"}},
    {"aggregation": {"name": "flora"}, "strategy": {"name": "fedprox", "proximal_mu": 0.1},
     "peft": {"ranks": "0-4 r=2, * r=8"}},
    {"aggregation": {"name": "flexlora"}, "privacy": {"mode": "dp_sgd"}, "compression": {"method": "int8"}},
])
def test_combinations_that_work_are_accepted(data) -> None:
    ExperimentConfig.from_dict(data)


@pytest.mark.parametrize("rule", ["fedavg", "ffa", "flora", "flexlora"])
@pytest.mark.parametrize("method", ["finetune", "dual"])
def test_finetune_and_dual_compose_with_every_rule_and_with_ranks(rule, method) -> None:
    """Both send a whole LoRA adapter (dual: the global one of two), so every rule
    aggregates it; ranks slice it (ffa excepted: its A is fixed at peft.r)."""
    data = {"aggregation": {"name": rule}, "personalization": {"method": method}}
    ExperimentConfig.from_dict(data)
    if rule != "ffa":
        ExperimentConfig.from_dict({**data, "peft": {"ranks": "0 r=4, * r=8"}})
    ExperimentConfig.from_dict(data)


def test_unknown_rule_and_bad_rank_spec_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^aggregation.name: unknown value 'fedsvd'; expected one of "
                                          r"fedavg, ffa, flora, flexlora$"):
        ExperimentConfig.from_dict({"aggregation": {"name": "fedsvd"}})
    with pytest.raises(ConfigError, match=r"^peft.ranks: shares sum to 90%, not 100%$"):
        ExperimentConfig.from_dict({"peft": {"ranks": "40% r=4, 50% r=8"}})
