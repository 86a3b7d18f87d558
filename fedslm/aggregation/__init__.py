"""Aggregation rules for LoRA adapters, registered by name (``aggregation.name``).

A rule is one module here with its math as plain numpy functions, registered below with
what it needs from the rest of the system and what it cannot be combined with. The
config check (``fedslm.config``) asks this registry which names exist and which
combinations to refuse; the server's strategy wrapper (``fedslm.server.lora_aggregation``)
asks it how to aggregate; the role rule (``fedslm.adapters``) asks whether LoRA A is
fixed after init.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# cfg -> None, or one line "dotted.key: problem naming the other key"
Incompatibility = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class AggregationRule:
    name: str
    summary: str
    # LoRA A keeps its seeded init on every client and never travels (FFA-LoRA)
    fixed_lora_a: bool = False
    # aggregates in product space (B @ A) and re-factors: the server's wrapper does it,
    # not Flower's FedAvg on the factors
    product_space: bool = False
    incompatible: tuple[Incompatibility, ...] = ()
    # (replies, num_examples, *, rank) -> (global arrays, truncation residual); product rules only
    product_aggregate: Callable[..., Any] | None = None


AGGREGATIONS: dict[str, AggregationRule] = {}


def register_aggregation(rule: AggregationRule) -> AggregationRule:
    if rule.name in AGGREGATIONS:
        raise ValueError(f"aggregation {rule.name!r} is registered twice")
    AGGREGATIONS[rule.name] = rule
    return rule


def aggregation_rule(name: str) -> AggregationRule:
    return AGGREGATIONS[name]


def check_combination(cfg: Any) -> str | None:
    """The first reason ``cfg``'s aggregation rule cannot run with the rest of ``cfg``."""
    for why in AGGREGATIONS[cfg.aggregation.name].incompatible:
        if (problem := why(cfg)) is not None:
            return problem
    return None


# --- compatibility rules shared by several aggregations ---------------------------
FACTOR_OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")


def _no_factor_optimizer(cfg: Any) -> str | None:
    if cfg.strategy.name in FACTOR_OPTIMIZERS:
        return (f"strategy.name: {cfg.strategy.name} cannot follow aggregation.name="
                f"{cfg.aggregation.name}: the global factors are re-factored by SVD every round, "
                "so a server optimizer's momentum on A and B refers to a basis that no longer "
                "exists; use fedavg or fedprox")
    return None


def _no_client_side_clipping(cfg: Any) -> str | None:
    if cfg.privacy.user_level and cfg.privacy.clip_side == "client":
        return (f"privacy.clip_side: client clips factor updates on the device, which does not "
                f"bound the product that aggregation.name={cfg.aggregation.name} aggregates "
                "(the server clips product deltas); use privacy.clip_side=server")
    return None


# Personalization methods that compose with a LoRA-aware rule or per-client ranks: those
# whose travelling set is a whole LoRA adapter (finetune: the adapter; dual: the global
# one of two). local_only sends nothing to aggregate; split sends only A (no B to pair
# with, and ffa fixes A, so nothing at all would travel).
PERSONAL_WITH_LORA_RULES = ("none", "finetune", "dual")
_PERSONAL_WHY = {
    "local_only": "it sends nothing to aggregate",
    "split": "it shares only LoRA A ({why_split})",
}


def _no_personalization(cfg: Any) -> str | None:
    method, rule = cfg.personalization.method, cfg.aggregation.name
    if method in PERSONAL_WITH_LORA_RULES:
        return None
    why = _PERSONAL_WHY.get(method, "not supported").format(
        why_split="which ffa fixes at its seeded init: nothing would travel" if rule == "ffa"
        else "a product rule needs A and B from every client")
    return (f"personalization.method: {method} cannot run with aggregation.name={rule}: {why}; "
            f"use one of {', '.join(PERSONAL_WITH_LORA_RULES)}")


def _no_ranks(cfg: Any) -> str | None:
    if cfg.peft.ranks.strip():
        return (f"peft.ranks: per-client ranks are not supported with aggregation.name="
                f"{cfg.aggregation.name} (its A is fixed at rank peft.r on every client)")
    return None


def _ranks_without_personalization(cfg: Any) -> str | None:
    if cfg.peft.ranks.strip() and cfg.personalization.method not in PERSONAL_WITH_LORA_RULES:
        return (f"peft.ranks: per-client ranks cannot run with personalization.method="
                f"{cfg.personalization.method} (only {', '.join(PERSONAL_WITH_LORA_RULES)}: a whole "
                "LoRA adapter must travel to be sliced by rank)")
    return None


from fedslm.aggregation import flexlora, flora  # noqa: E402  (the rules' math)

register_aggregation(AggregationRule(
    "fedavg", "A and B averaged separately (HetLoRA zero-padding for mixed ranks)",
    incompatible=(_ranks_without_personalization,)))  # any personalization at one rank
register_aggregation(AggregationRule(
    "ffa", "FFA-LoRA: A fixed at its seeded init, only B trains and travels",
    fixed_lora_a=True, incompatible=(_no_personalization, _no_ranks)))  # dual: FFA global + personal adapter
register_aggregation(AggregationRule(
    "flora", "FLoRA: stacked factors, exact weighted mean of B @ A, re-factored by thin SVD",
    product_space=True, incompatible=(_no_factor_optimizer, _no_client_side_clipping, _no_personalization),
    product_aggregate=flora.aggregate))
register_aggregation(AggregationRule(
    "flexlora", "FlexLoRA: dense mean of B @ A, SVD, each client its top-r components",
    product_space=True, incompatible=(_no_factor_optimizer, _no_client_side_clipping, _no_personalization),
    product_aggregate=flexlora.aggregate))
