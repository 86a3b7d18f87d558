"""What the round loop asks of the privacy layer: who refused, what to log, when to stop.

With ``privacy.mode=dp_sgd+dp_fedavg`` both levels run and both are reported each
round: the user-level figures under their usual names, the sample-level ones too, with
the four names both levels use (``dp_delta``, ``dp_clip_norm``, ``dp_noise_multiplier``,
``dp_clipped_fraction``) suffixed ``_sample``. Either budget stops what it covers: a
client at ``max_epsilon`` refuses (the run stops when too few are left), the server
stops the run before a release that would exceed it.

Sample-level DP (dp_sgd) lives on the clients; the server only reads their replies: the
cumulative epsilon each reports, and "budget exhausted" refusals, which are counted and
kept out of aggregation (they are not failures). User-level DP (dp_fedavg) lives in the
``UserLevelDp`` strategy wrapper; its ledger gives the user-level epsilon. Either way
the per-round figures go to MLflow through the loop's ``log_metrics`` (only the server
writes there), and the run stops cleanly, with a reason, when privacy leaves too few
clients or the next release would exceed the budget.

A client's DP-SGD ledger lives on the client, so the server cannot stop a client from
deleting or lowering it; it can notice. It keeps, per client (partition in simulation,
node in deployment), the highest cumulative epsilon and step count the client has
reported, checkpoints them, and rejects (and logs) an update whose ledger went
backwards: a lowered or deleted ``privacy.json`` costs that client its update, and
the run's reported epsilon never drops.
"""

from __future__ import annotations

import statistics
from logging import WARNING
from pathlib import Path

from flwr.app import Message
from flwr.common import log
from flwr.serverapp.strategy import FedAvg, Strategy

from fedslm.config import ExperimentConfig, sampled_train_clients
from fedslm.keys import BUDGET_EXHAUSTED, STATUS_KEY, STATUS_RECORD
from fedslm.server.checkpoint import StateHook
from fedslm.server.dp_fedavg import UserLevelDp
from fedslm.server.lora_aggregation import LoraAggregation
from fedslm.server.privacy import expected_release, restore_or_new, server_privacy_path
from fedslm.server.strategy import METRICS_KEY


SHARED_NAMES = ("dp_delta", "dp_clip_norm", "dp_noise_multiplier", "dp_clipped_fraction")


def is_refusal(reply: Message) -> bool:
    status = reply.content.config_records.get(STATUS_RECORD)
    return status is not None and status.get(STATUS_KEY) == BUDGET_EXHAUSTED


class RoundPrivacy:
    """Per-run privacy bookkeeping on the server, consulted by ``fedslm.server.rounds``."""

    def __init__(self, cfg: ExperimentConfig, user_level: UserLevelDp | None = None) -> None:
        self.cfg = cfg
        self.user_level = user_level
        # Keyed by the node id Flower stamps on a reply, never by what a reply says it is:
        # a client reporting another partition's epsilon overwrites nothing but its own.
        self.client_epsilon: dict[int, tuple[float, float]] = {}  # node -> (epsilon, delta)
        self.exhausted: set[int] = set()  # nodes
        self.refused_total = 0
        self.stopped: str | None = None
        self._population = cfg.federation.num_clients
        self.ledgers: dict[str, tuple[float, int]] = {}  # client -> highest (epsilon, total steps)

    def client_key(self, reply: Message) -> str:
        """Whose ledger: the partition in simulation (a virtual node serves many), the
        authenticated node in deployment (a device could claim any partition id)."""
        metrics = reply.content.metric_records.get(METRICS_KEY, {})
        if self.cfg.federation.engine == "simulation" and "partition-id" in metrics:
            return f"partition {int(metrics['partition-id'])}"
        return f"node {reply.metadata.src_node_id}"

    def check_ledgers(self, replies: list[Message]) -> tuple[list[Message], dict[int, str]]:
        """(replies whose DP-SGD ledger only grew, {node id: why rejected}); the highest
        figures seen are kept. Only with sample-level DP; a no-op otherwise."""
        if not self.cfg.privacy.sample_level:
            return replies, {}
        kept, rejected = [], {}
        for reply in replies:
            metrics = reply.content.metric_records.get(METRICS_KEY, {})
            key = self.client_key(reply)
            if "dp-epsilon" not in metrics or "dp-steps-total" not in metrics:
                why = "no DP-SGD ledger figures (dp-epsilon, dp-steps-total) in the reply"
            else:
                why = self._ledger_went_back(key, float(metrics["dp-epsilon"]),
                                             int(metrics["dp-steps-total"]),
                                             int(metrics.get("dp-steps", 0)))
            if why is None:
                kept.append(reply)
            else:
                rejected[reply.metadata.src_node_id] = f"privacy ledger: {why}"
                log(WARNING, "%s: privacy ledger rejected: %s", key, why)
        return kept, rejected

    def _ledger_went_back(self, key: str, epsilon: float, total: int, this_round: int) -> str | None:
        best_eps, best_total = self.ledgers.get(key, (0.0, 0))
        if total < best_total + this_round or epsilon < best_eps * (1 - 1e-9):
            return (f"went backwards: epsilon {epsilon:.4g} after {total} steps, but it had "
                    f"reported epsilon {best_eps:.4g} after {best_total} steps (privacy.json "
                    "deleted or lowered?)")
        self.ledgers[key] = (max(best_eps, epsilon), max(best_total, total))
        return None

    def state_hook(self) -> StateHook:
        """The highest ledgers and the reported epsilons, so a resumed server neither
        forgets what a client spent nor reports a smaller epsilon than before."""
        def save() -> dict:
            return {"ledgers": {k: list(v) for k, v in self.ledgers.items()},
                    "client_epsilon": {str(k): list(v) for k, v in self.client_epsilon.items()},
                    "exhausted": sorted(self.exhausted), "refused_total": self.refused_total}

        def load(data: dict) -> None:
            self.ledgers = {k: (float(e), int(s)) for k, (e, s) in data["ledgers"].items()}
            self.client_epsilon = {int(k): (float(e), float(d))
                                   for k, (e, d) in data["client_epsilon"].items()}
            self.exhausted = {int(p) for p in data["exhausted"]}
            self.refused_total = int(data["refused_total"])

        return StateHook("client_ledgers", save, load)

    def split_refusals(self, replies: list[Message]) -> tuple[list[Message], list[Message]]:
        """(replies to aggregate, budget-exhausted refusals)."""
        kept, refused = [], []
        for reply in replies:
            (refused if is_refusal(reply) else kept).append(reply)
        for reply in refused:
            # screened already (fedslm.server.screening.screen_status_replies): values are valid
            metrics = reply.content.metric_records.get(METRICS_KEY, {})
            node = reply.metadata.src_node_id
            self.exhausted.add(node)
            if "dp-epsilon" in metrics:
                self.client_epsilon[node] = (float(metrics["dp-epsilon"]), float(metrics.get("dp-delta", 0.0)))
            log(WARNING, "client %s (node %s) refused to train: %s", metrics.get("partition-id", "?"), node,
                reply.content.config_records[STATUS_RECORD].get("message", BUDGET_EXHAUSTED))
        self.refused_total += len(refused)
        return kept, refused

    def round_metrics(self, server_round: int, rows: list[dict], refused: list[Message]) -> dict[str, float]:
        """The privacy figures of a round, for MLflow and rounds.csv."""
        p = self.cfg.privacy
        user: dict[str, float] = {}
        if p.user_level and self.user_level is not None:
            state = self.user_level.state  # epsilon even for a round that released nothing
            user = {"dp_epsilon_user": state.epsilon(), "dp_delta": state.delta,
                    **self.user_level.last_round}
        if not p.sample_level:
            return user
        sample = self._sample_metrics(rows, refused)
        if p.user_level:
            sample = {(f"{k}_sample" if k in SHARED_NAMES else k): v for k, v in sample.items()}
        return {**sample, **user}

    def evaluate_metrics(self, rows: list[dict]) -> dict[str, float]:
        """The sample-level epsilon after evaluation: ``finetune`` clients under DP-SGD
        fine-tune on their records there, and report their ledger. {} when none did."""
        seen = [r for r in rows if "dp-epsilon" in r and r.get("status", "ok") == "ok"]
        if not self.cfg.privacy.sample_level or not seen:
            return {}
        for row in seen:  # a ledger only grows: keep the larger of train's and evaluate's
            old = self.client_epsilon.get(row["node_id"], (0.0, 0.0))
            self.client_epsilon[row["node_id"]] = max(old, (float(row["dp-epsilon"]), float(row.get("dp-delta", 0.0))))
        eps = [e for e, _ in self.client_epsilon.values()]
        return {"dp_epsilon_sample_max": max(eps), "dp_epsilon_sample_mean": statistics.fmean(eps),
                "dp_finetunes_refused": float(sum(int(r.get("dp-finetune-refused", 0)) for r in seen))}

    def _sample_metrics(self, rows: list[dict], refused: list[Message]) -> dict[str, float]:
        for row in rows:
            if "dp-epsilon" in row and row.get("status", "ok") == "ok":
                self.client_epsilon[row["node_id"]] = (float(row["dp-epsilon"]), float(row.get("dp-delta", 0.0)))
        out: dict[str, float] = {"dp_clients_refused": float(len(refused)),
                                 "dp_clients_exhausted": float(len(self.exhausted)),
                                 "dp_clip_norm": self.cfg.privacy.max_grad_norm}
        if self.client_epsilon:  # every client seen so far: the run's guarantee only grows
            eps = [e for e, _ in self.client_epsilon.values()]
            out.update(dp_epsilon_sample_max=max(eps), dp_epsilon_sample_mean=statistics.fmean(eps),
                       dp_delta=max(d for _, d in self.client_epsilon.values()))
        for key, name in (("dp-noise-multiplier", "dp_noise_multiplier"),
                          ("dp-clipped-fraction", "dp_clipped_fraction")):
            values = [float(r[key]) for r in rows if key in r]
            if values:
                out[name] = statistics.fmean(values)
        return out

    def stop_reason(self, next_round: int) -> str | None:
        """Why round ``next_round`` must not run (None: it may)."""
        p = self.cfg.privacy
        if p.max_epsilon <= 0:
            return None
        if p.sample_level:
            left = self.cfg.federation.num_clients - len(self.exhausted)
            needed = min(self.cfg.strategy.min_train_clients, self.cfg.federation.num_clients)
            if left < needed:
                self.stopped = (f"privacy budget exhausted: {len(self.exhausted)} of "
                                f"{self.cfg.federation.num_clients} clients reached "
                                f"privacy.max_epsilon={p.max_epsilon:g}; {left} left, "
                                f"strategy.min_train_clients={needed}")
        if self.stopped is None and p.user_level and self.user_level is not None:
            state = self.user_level.state
            release = expected_release(self.cfg, next_round, population=self._population)
            projected = state.epsilon(release)
            if projected > p.max_epsilon:
                self.stopped = (f"privacy budget exhausted: round {next_round} would take user-level "
                                f"epsilon from {state.epsilon():.4g} to {projected:.4g} > "
                                f"privacy.max_epsilon={p.max_epsilon:g}")
        return self.stopped

    def summary(self) -> dict:
        out: dict = {"mode": self.cfg.privacy.mode, "stopped_early": self.stopped}
        both = self.cfg.privacy.user_level
        if self.cfg.privacy.sample_level and self.client_epsilon:
            out.update(epsilon_sample_max=max(e for e, _ in self.client_epsilon.values()),
                       **{"delta_sample" if both else "delta":
                          max(d for _, d in self.client_epsilon.values())},
                       clients_exhausted=sorted(self.exhausted), refusals=self.refused_total)
        if self.user_level is not None:
            state = self.user_level.state
            out.update(epsilon_user=state.epsilon(), delta=state.delta,
                       releases=len(state.releases), clipping_norm=state.clipping_norm)
        return out


def setup_privacy(cfg: ExperimentConfig, strategy: Strategy, output_dir: Path
                  ) -> tuple[Strategy, RoundPrivacy | None]:
    """The strategy to run (wrapped for dp_fedavg) and the loop's privacy hooks."""
    if cfg.privacy.mode == "none":
        return strategy, None
    if not cfg.privacy.user_level:
        return strategy, RoundPrivacy(cfg)
    if not isinstance(strategy.strategy if isinstance(strategy, LoraAggregation) else strategy, FedAvg):
        raise ValueError(f"strategy.name: dp_fedavg cannot wrap {type(strategy).__name__}")
    path = server_privacy_path(output_dir)
    state = restore_or_new(cfg, path)
    wrapped = UserLevelDp(strategy, state, privacy=cfg.privacy, state_path=path,
                          expected_sampled=sampled_train_clients(cfg.strategy, cfg.federation.num_clients))
    return wrapped, RoundPrivacy(cfg, wrapped)
