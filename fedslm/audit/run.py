"""The audit of one final global adapter: canary exposure and membership inference.

Needs the clients' texts, so it runs where they can be regenerated: in simulation the
server (or ``fedslm.simulations.audit`` afterwards) rebuilds every client's partition from the
config, exactly as the clients built it. Members are each client's train texts (without
the canaries), non-members its held-out test texts: same distribution, never trained on.
With personalization the same attacks run against each client's personal model
(``fedslm.audit.personal``).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedslm.adapters import load_adapter_arrays, reset_to_init
from fedslm.audit.attack import calibrated_scores, loss_scores, mean_nll, text_nll
from fedslm.audit.canaries import candidate_texts, make_canaries
from fedslm.audit.metrics import exposure, mia_figures
from fedslm.audit.personal import personal_membership_inference
from fedslm.config import ExperimentConfig
from fedslm.data import load_client_split
from fedslm.runtime import experiment_model

DEFAULT_DELTA = 1e-5  # for runs without DP, which report no delta of their own


def run_audit(cfg: ExperimentConfig, arrays: Mapping[str, np.ndarray], *, delta: float,
              canaries_inserted: bool | None = None,
              clients_dir: Path | None = None) -> dict[str, float]:
    """Audit metrics (names hold ``exposure`` or ``auc`` as MLflow metric names).

    ``canaries_inserted`` defaults to ``privacy.audit`` (only then did clients train on
    canaries); without canaries only membership inference is reported. With
    personalization and ``clients_dir`` (the simulated clients' state dirs), the personal
    adapters found there are attacked too (``audit_mia_personal_*``).
    """
    model, tokenizer = experiment_model(cfg)
    load_adapter_arrays(model, arrays)
    reset_to_init(model, "personal", seed=cfg.training.seed)  # the global model alone
    max_tokens = int(getattr(model.config, "max_position_embeddings", 256) or 256)
    out: dict[str, float] = {"audit_delta": delta}
    inserted = cfg.privacy.audit if canaries_inserted is None else canaries_inserted
    if inserted and cfg.audit.canaries > 0 and cfg.audit.canary_clients:
        out.update(canary_exposure(cfg, model, tokenizer, max_tokens=max_tokens))
    texts = client_mia_texts(cfg)
    out.update(membership_inference(cfg, model, tokenizer, delta=delta, max_tokens=max_tokens,
                                    texts=texts))
    if cfg.personalization.method != "none" and clients_dir is not None:
        out.update(personal_membership_inference(cfg, model, tokenizer, arrays, texts,
                                                 clients_dir=clients_dir, delta=delta,
                                                 max_tokens=max_tokens))
    return out


def canary_exposure(cfg: ExperimentConfig, model, tokenizer, *, max_tokens: int) -> dict[str, float]:
    """Mean and max exposure of the canaries inserted ``r`` times, for each ``r``."""
    canaries = make_canaries(cfg.audit)
    candidate_nll, _ = text_nll(model, tokenizer, candidate_texts(cfg.audit), max_tokens=max_tokens)
    canary_nll, _ = text_nll(model, tokenizer, [c.text for c in canaries], max_tokens=max_tokens)
    out: dict[str, float] = {"audit_exposure_ceiling": float(np.log2(len(candidate_nll) + 1))}
    for reps in cfg.audit.repetitions:
        values = [exposure(nll, candidate_nll)
                  for c, nll in zip(canaries, canary_nll) if c.repetitions == reps]
        out[f"audit_exposure_rep{reps}"] = statistics.fmean(values)
        out[f"audit_exposure_rep{reps}_max"] = max(values)
    return out


def client_mia_texts(cfg: ExperimentConfig) -> list[tuple[int, list[str], list[str]]]:
    """(partition id, members, non-members) per client: its train texts (without the
    canaries) and its held-out test texts, at most ``audit.mia_records`` of each."""
    cap = cfg.audit.mia_records or None
    out = []
    for pid in range(cfg.federation.num_clients):
        split = load_client_split(cfg.data, num_clients=cfg.federation.num_clients,
                                  partition_id=pid)
        out.append((pid, list(split.train[:cap]), list(split.test[:cap])))
    return out


def membership_inference(cfg: ExperimentConfig, model, tokenizer, *, delta: float,
                         max_tokens: int, texts: list[tuple[int, list[str], list[str]]] | None = None
                         ) -> dict[str, float]:
    """Both attacks over every client's train (member) and test (non-member) texts."""
    texts = client_mia_texts(cfg) if texts is None else texts
    members = [t for _, m, _ in texts for t in m]
    non_members = [t for _, _, nm in texts for t in nm]
    audited = mean_nll(model, tokenizer, members + non_members, max_tokens=max_tokens)
    with model.disable_adapter():
        reference = mean_nll(model, tokenizer, members + non_members, max_tokens=max_tokens)
    n = len(members)
    out: dict[str, float] = {"audit_mia_members": n, "audit_mia_non_members": len(non_members)}
    attacks = {"loss": loss_scores(audited), "calibrated": calibrated_scores(audited, reference)}
    out.update(mia_figures({k: (v[:n], v[n:]) for k, v in attacks.items()}, delta=delta))
    return out
