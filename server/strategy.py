"""Flower strategies selected by name.

We wrap Flower's strategies rather than copy them: the round loop calls their
``configure_*``/``aggregate_*`` methods; this module only maps config to constructors.
What keeps malformed or hostile replies away from them is ``fedslm.server.screening``.
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedslm.config import ExperimentConfig, sampled_train_clients
from fedslm.keys import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY
from fedslm.server.fltrust import FLTrust, root_update
from fedslm.server.screening import Screened, screen_train_replies

__all__ = ["ARRAYS_KEY", "METRICS_KEY", "WEIGHT_KEY", "Screened", "build_strategy",
           "screen_train_replies"]


def build_strategy(cfg: ExperimentConfig) -> Strategy:
    """The Flower strategy named by ``strategy.name`` with its configured knobs."""
    s, fed = cfg.strategy, cfg.federation
    common = dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=min(s.min_train_clients, fed.num_clients),
        min_evaluate_nodes=min(s.min_evaluate_clients, fed.num_clients),
        # fraction_evaluate=0: Flower skips federated evaluation (and its minimum)
        min_available_nodes=min(max(s.min_train_clients, s.min_evaluate_clients if s.fraction_evaluate else 0),
                                fed.num_clients),
        weighted_by_key=WEIGHT_KEY,
        arrayrecord_key=ARRAYS_KEY,
    )
    fedopt = dict(eta=s.eta, eta_l=cfg.training.learning_rate, tau=s.tau)
    if s.name == "fedavg":
        return FedAvg(**common)
    if s.name == "fedavgm":
        return FedAvgM(**common, server_learning_rate=s.server_learning_rate,
                       server_momentum=s.server_momentum)
    if s.name == "fedprox":
        return FedProx(**common, proximal_mu=s.proximal_mu)
    if s.name == "fedadam":
        return FedAdam(**common, **fedopt, beta_1=s.beta_1, beta_2=s.beta_2)
    if s.name == "fedyogi":
        return FedYogi(**common, **fedopt, beta_1=s.beta_1, beta_2=s.beta_2)
    if s.name == "fedadagrad":
        return FedAdagrad(**common, **fedopt)
    if s.name == "fedmedian":
        return FedMedian(**common)
    if s.name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=s.trim_beta)
    if s.name == "krum":
        return Krum(**common, num_malicious_nodes=s.num_malicious)
    if s.name == "multikrum":
        selected = s.num_selected or sampled_train_clients(s, fed.num_clients) - s.num_malicious
        return MultiKrum(**common, num_malicious_nodes=s.num_malicious,
                         num_nodes_to_select=max(1, selected))
    if s.name == "bulyan":
        return Bulyan(**common, num_malicious_nodes=s.num_malicious)
    if s.name == "fltrust":  # Flower has none: ours, on Flower's FedAvg
        return FLTrust(**common, server_update=root_update(cfg))
    raise ValueError(f"strategy.name: unknown strategy {s.name!r}")  # config already checked
