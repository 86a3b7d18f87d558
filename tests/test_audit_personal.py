"""Membership inference against personal adapters: real personal adapters made by the
client's own fit/evaluate on the builtin tiny Llama (no engine), attacked by the audit,
and checked against scikit-learn on scores of the personal model assembled the way a
device assembles it (``fedslm.client.local_model`` + ``fedslm.inference``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from fedslm.audit.attack import mean_nll
from fedslm.audit.run import client_mia_texts, run_audit
from fedslm.client.local_model import personal_parts
from fedslm.client.task import evaluate, fit
from fedslm.config import ExperimentConfig
from fedslm.inference import assemble_model
from fedslm.personal_state import load_personal, save_personal
from fedslm.runtime import model_path
from fedslm.server.experiment import initial_adapter

DELTA = 1e-3


def experiment(method: str, out: Path, **privacy) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "personalization": {"method": method, "finetune_steps": 2, "finetune_learning_rate": 0.05},
            "federation": {"num_clients": 2, "num_rounds": 1},
            "data": {"heterogeneity": 1.0, "docs_per_client": 10, "test_fraction": 0.4},
            "training": {"local_steps": 3, "learning_rate": 0.05},
            "privacy": privacy,
            "output_dir": str(out),
        }
    )


def _expected(cfg: ExperimentConfig, client_dir: Path, members, non_members) -> dict[str, float]:
    """Both attacks' AUC and TPR at 1% FPR by scikit-learn, on the personal model as the
    device would rebuild it from its state dir."""
    parts = personal_parts(client_dir, method=cfg.personalization.method)
    model, tokenizer = assemble_model(
        parts.base_path,
        parts.peft_cfg,
        method=parts.method,
        shared=parts.shared,
        personal=parts.personal,
        seed=cfg.training.seed,
    )
    texts = [*members, *non_members]
    max_tokens = model.config.max_position_embeddings
    nll = mean_nll(model, tokenizer, texts, max_tokens=max_tokens)
    with model.disable_adapter():
        ref = mean_nll(model, tokenizer, texts, max_tokens=max_tokens)
    labels = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    out = {}
    for name, scores in (("loss", -nll), ("calibrated", ref - nll)):
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        out[f"audit_mia_personal_{name}_auc"] = roc_auc_score(labels, scores)
        out[f"audit_mia_personal_{name}_tpr_at_1pct_fpr"] = float(tpr[fpr <= 0.01].max())
    return out


@pytest.mark.parametrize(
    ("method", "privacy"),
    [
        ("split", {}),
        ("dual", {}),
        ("local_only", {}),
        ("finetune", {}),
        ("split", {"mode": "dp_sgd", "noise_multiplier": 1.0, "delta": DELTA}),
    ],
)
def test_personal_adapters_are_attacked_as_the_device_uses_them(method, privacy, tmp_path):
    """Client 0 trains (and is evaluated: split/dual keep the global they received, finetune
    makes its copy); client 1 never trains, so only client 0's personal model is attacked.
    The audit is handed a *different* final global adapter: a split/dual personal model
    must still be built on the one the client received."""
    cfg = experiment(method, tmp_path, **privacy)
    start = initial_adapter(cfg)
    received, _ = fit(cfg, start, partition_id=0, server_round=1)
    evaluate(cfg, received, partition_id=0, server_round=1)
    client_dir = tmp_path / "clients" / "0"
    assert load_personal(client_dir, method=method) is not None
    final = start  # not what client 0 received (for local_only both are empty)

    audit = run_audit(cfg, final, delta=DELTA, canaries_inserted=False, clients_dir=tmp_path / "clients")

    _, members, non_members = client_mia_texts(cfg)[0]
    assert (len(members), len(non_members)) == (6, 4)
    assert audit["audit_mia_personal_clients"] == 1
    assert (audit["audit_mia_personal_members"], audit["audit_mia_personal_non_members"]) == (6, 4)
    expected = _expected(cfg, client_dir, members, non_members)
    assert {k: audit[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert 0.0 <= audit["audit_eps_lower_bound_personal"] <= audit["audit_eps_lower_bound_personal_ceiling"]
    assert "audit_mia_loss_auc" in audit  # the global model's attack still runs beside it


def test_a_personal_model_equal_to_the_base_gives_the_calibrated_attack_nothing(tmp_path):
    """split with personal B = 0: the personal model *is* the reference, so every calibrated
    score is 0: AUC exactly 0.5, TPR at 1% FPR exactly 0, no epsilon certified."""
    cfg = experiment("split", tmp_path)
    fit(cfg, initial_adapter(cfg), partition_id=1, server_round=1)
    client_dir = tmp_path / "clients" / "1"
    zeros = {k: np.zeros_like(v) for k, v in load_personal(client_dir, method="split").arrays.items()}
    save_personal(
        client_dir,
        zeros,
        method="split",
        server_round=1,
        updates=1,
        peft_cfg=cfg.peft,
        base_model=model_path(cfg.model),
    )
    audit = run_audit(cfg, initial_adapter(cfg), delta=DELTA, canaries_inserted=False, clients_dir=tmp_path / "clients")
    assert audit["audit_mia_personal_clients"] == 1
    assert audit["audit_mia_personal_calibrated_auc"] == 0.5
    assert audit["audit_mia_personal_calibrated_tpr_at_1pct_fpr"] == 0.0
    assert audit["audit_eps_lower_bound_personal"] == 0.0


def test_no_personal_adapter_yet_and_no_personalization(tmp_path):
    cfg = experiment("dual", tmp_path)
    audit = run_audit(cfg, initial_adapter(cfg), delta=DELTA, canaries_inserted=False, clients_dir=tmp_path / "clients")
    assert audit["audit_mia_personal_clients"] == 0
    assert not any(k.startswith("audit_mia_personal_") and k != "audit_mia_personal_clients" for k in audit)
    plain = experiment("none", tmp_path)
    audit = run_audit(
        plain, initial_adapter(plain), delta=DELTA, canaries_inserted=False, clients_dir=tmp_path / "clients"
    )
    assert not any("personal" in k for k in audit)
