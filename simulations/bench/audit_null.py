"""Is a personal adapter's membership-inference AUC leakage, noise, or a split shift?

Run by ``python -m fedslm.simulations.bench audit --personalization ... --null`` on a
synthetic federation in which every client has a *twin*: another client with the same
topic and style mixtures (``data.heterogeneity=1``, ``data.num_topics=7`` and 14
clients: client i and i+7 share topic i % 7 and style i % 7). A twin's personal model
was fitted to the same distribution but to neither of the client's splits, so the same
attack on the client's own texts scored by its twin's model (**null**) measures what
the attack sees without memorisation: an AUC above 0.5 there is a member/non-member
shift (train and test splits differing), not leakage. Every AUC gets a 95% bootstrap
interval and a one-sided p-value against chance (``fedslm.audit.metrics.auc_summary``).

Attacks per run, all on the same texts (each client's train = members, test =
non-members, pooled over clients):

- ``own``: the audit's two attacks (loss, calibrated against the base model) on each
  client's own personal model, as ``audit_mia_personal_*``;
- ``null``: the same two attacks, each text scored by the twin's personal model;
- ``base``: the loss attack on the base model (it saw nothing: a pure shift check);
- ``twin-calibrated``: the own model's loss drop against the twin's model (the
  reference is a model of the same distribution without the text: the offline
  reference-model attack of Carlini et al. 2022).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedslm.audit.metrics import auc_summary, tpr_at_fpr
from fedslm.config import ExperimentConfig


def twins(*, num_clients: int, num_topics: int, heterogeneity: float) -> dict[int, int]:
    """Client -> the next client (cyclically, by index) with identical synthetic mixtures;
    clients with no such partner are left out."""
    from fedslm.data.synthetic import client_mixtures

    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in range(num_clients):
        topic_w, style_w = client_mixtures(i, num_topics, heterogeneity)
        groups[(tuple(topic_w), tuple(style_w))].append(i)
    return {g[k]: g[(k + 1) % len(g)] for g in groups.values() if len(g) > 1 for k in range(len(g))}


def attack_rows(attacks: Mapping[str, np.ndarray], is_member: np.ndarray, *, seed: int = 0) -> list[dict[str, Any]]:
    """One row per named score array: AUC with its 95% interval, p-value, TPR at 1% FPR."""
    rows = []
    for name, scores in attacks.items():
        member, non_member = scores[is_member], scores[~is_member]
        rows.append(
            {
                "attack": name,
                **auc_summary(member, non_member, seed=seed),
                "tpr1%": tpr_at_fpr(member, non_member, max_fpr=0.01),
                "members": int(is_member.sum()),
                "non_members": int((~is_member).sum()),
            }
        )
    return rows


def null_attacks(
    cfg: ExperimentConfig, arrays: Mapping[str, np.ndarray], clients_dir: Path
) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Every attack's scores on the twinned clients' texts of a finished run: ``arrays``
    its final global adapter, ``clients_dir`` the clients' state dirs."""
    from fedslm.adapters import load_adapter_arrays, reset_to_init
    from fedslm.audit.personal import personal_scores
    from fedslm.audit.run import client_mia_texts
    from fedslm.runtime import experiment_model

    d = cfg.data
    twin = twins(num_clients=cfg.federation.num_clients, num_topics=d.num_topics, heterogeneity=d.heterogeneity)
    if d.source != "synthetic" or not twin:
        raise ValueError(
            "--null needs synthetic clients with twins (data.heterogeneity=1, "
            "data.num_topics=7, federation.num_clients=14)"
        )
    model, tokenizer = experiment_model(cfg)
    load_adapter_arrays(model, arrays)
    reset_to_init(model, "personal", seed=cfg.training.seed)
    max_tokens = int(getattr(model.config, "max_position_embeddings", 256) or 256)
    texts = [t for t in client_mia_texts(cfg) if t[0] in twin]
    kwargs = {"clients_dir": Path(clients_dir), "max_tokens": max_tokens}
    own, is_member, clients = personal_scores(cfg, model, tokenizer, arrays, texts, **kwargs)
    null, null_member, _ = personal_scores(
        cfg, model, tokenizer, arrays, [(twin[pid], m, nm) for pid, m, nm in texts], **kwargs
    )
    if clients != len(texts) or not np.array_equal(is_member, null_member):
        raise ValueError(f"only {clients} of {len(texts)} twinned clients have a personal adapter")
    return combine(own, null), is_member, clients


def combine(own: Mapping[str, np.ndarray], null: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The attacks of the module docstring from the own and null scores of the same texts.

    loss = -nll, calibrated = ref_nll - nll, so the base model's loss score is
    loss - calibrated and the twin-calibrated score nll_twin - nll_own = own loss - null loss.
    """
    return {
        "own loss": own["loss"],
        "own calibrated": own["calibrated"],
        "null loss": null["loss"],
        "null calibrated": null["calibrated"],
        "base loss": own["loss"] - own["calibrated"],
        "twin-calibrated": own["loss"] - null["loss"],
    }
