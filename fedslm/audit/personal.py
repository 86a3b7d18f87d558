"""Membership inference against the personal adapters the simulated clients keep.

A personal model is trained on one client's records and used on its device: whoever
gets it (an exported adapter, a lost device) can attack it, and under DP-SGD its
training is in the client's ledger (docs/privacy.md). For every client whose state dir
holds a personal adapter, the personal model is assembled as the client uses it: the
global tensors it last received (``last_global/``, else the run's final global adapter)
plus its personal tensors; under ``finetune`` the fine-tuned copy alone. Its members are
that client's train texts, its non-members the client's held-out test texts, and the
two attacks of the global audit score them (the reference is the base model, which
never saw a client's text). Each text is scored by its own client's personal model and
all audited clients are pooled into one ROC curve (``audit_mia_personal_*``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fedslm.adapters import load_adapter_arrays
from fedslm.audit.attack import calibrated_scores, loss_scores, mean_nll
from fedslm.audit.metrics import mia_figures
from fedslm.config import ExperimentConfig
from fedslm.inference import NEEDS_GLOBAL, read_adapter
from fedslm.personal_state import LAST_GLOBAL_DIR, load_personal

ClientTexts = Sequence[tuple[int, Sequence[str], Sequence[str]]]


def load_personal_model(
    model,
    method: str,
    personal: Mapping[str, np.ndarray],
    shared: Mapping[str, np.ndarray],
) -> None:
    """Put one client's personal model into the (process-shared) PEFT model, as
    ``fedslm.inference.assemble_model`` builds it: ``finetune`` keeps a whole copy of the
    adapter; the other methods are ``shared`` plus their personal tensors."""
    if method == "finetune":
        load_adapter_arrays(model, personal, "shared")
        return
    load_adapter_arrays(model, shared, "shared")
    load_adapter_arrays(model, personal, "personal")


def received_global(client_dir: Path, method: str, final: Mapping[str, np.ndarray]):
    """The global tensors a ``split``/``dual`` client's personal model uses."""
    last = client_dir / LAST_GLOBAL_DIR
    if method in NEEDS_GLOBAL and last.is_dir():
        return read_adapter(last)[0]
    return final


def personal_scores(
    cfg: ExperimentConfig,
    model,
    tokenizer,
    global_arrays: Mapping[str, np.ndarray],
    texts: ClientTexts,
    *,
    clients_dir: Path,
    max_tokens: int,
) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Both attacks' scores of every text under its client's personal model, pooled.

    ``texts``: (partition id, members, non-members); the partition id names the personal
    model that scores them, so pairing one client's texts with another client's id scores
    them under a model that saw neither set (the null of ``bench audit --null``). Returns
    (attack name -> scores, is-member mask, clients scored); clients without a personal
    adapter (never trained) are skipped.
    """
    method = cfg.personalization.method
    audited: list[np.ndarray] = []
    reference: list[np.ndarray] = []
    members: list[bool] = []
    clients = 0
    for pid, member_texts, non_member_texts in texts:
        client_dir = Path(clients_dir) / str(pid)
        state = load_personal(client_dir, method=method)
        if state is None or not member_texts or not non_member_texts:
            continue
        batch = [*member_texts, *non_member_texts]
        load_personal_model(model, method, state.arrays, received_global(client_dir, method, global_arrays))
        audited.append(mean_nll(model, tokenizer, batch, max_tokens=max_tokens))
        with model.disable_adapter():
            reference.append(mean_nll(model, tokenizer, batch, max_tokens=max_tokens))
        members += [True] * len(member_texts) + [False] * len(non_member_texts)
        clients += 1
    if not clients:
        return {}, np.zeros(0, dtype=bool), 0
    nll, ref = np.concatenate(audited), np.concatenate(reference)
    attacks = {"loss": loss_scores(nll), "calibrated": calibrated_scores(nll, ref)}
    return attacks, np.array(members), clients


def personal_membership_inference(
    cfg: ExperimentConfig,
    model,
    tokenizer,
    global_arrays: Mapping[str, np.ndarray],
    texts: ClientTexts,
    *,
    clients_dir: Path,
    delta: float,
    max_tokens: int,
) -> dict[str, float]:
    """Pooled ROC figures of both attacks against every personal model in ``clients_dir``.

    ``texts``: (partition id, members, non-members) per client. Clients without a
    personal adapter (never trained) are skipped; ``audit_mia_personal_clients`` says how
    many were attacked (0: nothing else is reported).
    """
    attacks, is_member, clients = personal_scores(
        cfg, model, tokenizer, global_arrays, texts, clients_dir=clients_dir, max_tokens=max_tokens
    )
    out: dict[str, float] = {"audit_mia_personal_clients": clients}
    if not clients:
        return out
    out["audit_mia_personal_members"] = int(is_member.sum())
    out["audit_mia_personal_non_members"] = int((~is_member).sum())
    split = {k: (v[is_member], v[~is_member]) for k, v in attacks.items()}
    out.update(mia_figures(split, delta=delta, tag="_personal"))
    return out
