"""The null check of the personal-adapter audit (``bench audit --null``): which clients are
twins, how the null and reference attacks are derived from the scores, and the rows."""

from __future__ import annotations

import numpy as np
import pytest

from fedslm.simulations.bench.audit_null import attack_rows, combine, twins


def test_twins_share_topic_and_style():
    # h=1: client i has topic i % 7 and style i % 7 (7 styles), so i and i + 7 are twins
    assert twins(num_clients=14, num_topics=7, heterogeneity=1.0) == {i: (i + 7) % 14 for i in range(14)}
    # 8 topics: the pair (topic, style) repeats only after 56 clients
    assert twins(num_clients=14, num_topics=8, heterogeneity=1.0) == {}
    # 15 clients: 0, 7 and 14 share topic and style, each names the next one, cyclically
    got = twins(num_clients=15, num_topics=7, heterogeneity=1.0)
    assert (got[0], got[7], got[14], got[1], got[8]) == (7, 14, 0, 8, 1)
    # h=0: every client has the uniform mixtures, so all are one group
    assert twins(num_clients=3, num_topics=7, heterogeneity=0.0) == {0: 1, 1: 2, 2: 0}


def test_combine_derives_the_base_and_twin_reference_scores():
    """loss = -nll and calibrated = ref_nll - nll: own nll 1, 2; base nll 4, 3; twin nll 1.5, 2.5."""
    own = {"loss": np.array([-1.0, -2.0]), "calibrated": np.array([3.0, 1.0])}
    null = {"loss": np.array([-1.5, -2.5]), "calibrated": np.array([2.5, 0.5])}
    got = combine(own, null)
    assert list(got) == ["own loss", "own calibrated", "null loss", "null calibrated", "base loss", "twin-calibrated"]
    np.testing.assert_array_equal(got["base loss"], [-4.0, -3.0])  # minus the base model's nll
    np.testing.assert_array_equal(got["twin-calibrated"], [0.5, 0.5])  # twin nll minus own nll


def test_attack_rows_on_hand_built_scores():
    """members 0.9 0.8 0.4, non-members 0.7 0.3 0.2 0.1: 11 of 12 pairs won (AUC 11/12);
    U = 11 or more in 2 of the C(7, 3) = 35 equally likely orders (p = 2/35); the member at
    0.9 and 0.8 both sit above every non-member (TPR 2/3 at FPR 0)."""
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1])
    is_member = np.array([True, True, True, False, False, False, False])
    (row,) = attack_rows({"own loss": scores}, is_member)
    assert (row["attack"], row["members"], row["non_members"]) == ("own loss", 3, 4)
    assert row["auc"] == pytest.approx(11 / 12, abs=1e-15)
    assert row["p"] == pytest.approx(2 / 35, abs=1e-15)
    assert row["tpr1%"] == pytest.approx(2 / 3, abs=1e-15)
    assert row["auc_low"] <= row["auc"] <= row["auc_high"] == 1.0


def test_null_attacks_score_each_clients_texts_with_its_twins_model(tmp_path):
    """Two IID clients (h=0: twins of each other) each train a real local_only adapter on
    the builtin tiny Llama. The own attacks are the audit's own figures; the null scores
    client 0's texts under client 1's model (and back); the base score is minus the base
    model's loss; the twin-calibrated score is the twin's loss minus the own one."""
    from fedslm.audit.attack import mean_nll
    from fedslm.audit.metrics import roc_auc
    from fedslm.audit.personal import load_personal_model
    from fedslm.audit.run import client_mia_texts, run_audit
    from fedslm.client.task import fit
    from fedslm.config import ExperimentConfig
    from fedslm.personal_state import load_personal
    from fedslm.runtime import experiment_model
    from fedslm.server.experiment import initial_adapter
    from fedslm.simulations.bench.audit_null import null_attacks

    cfg = ExperimentConfig.from_dict(
        {
            "personalization": {"method": "local_only"},
            "federation": {"num_clients": 2, "num_rounds": 1},
            "data": {"heterogeneity": 0.0, "docs_per_client": 10, "test_fraction": 0.4},
            "training": {"local_steps": 3, "learning_rate": 0.05},
            "output_dir": str(tmp_path),
        }
    )
    start = initial_adapter(cfg)
    for pid in (0, 1):
        fit(cfg, start, partition_id=pid, server_round=1)
    clients = tmp_path / "clients"

    attacks, is_member, n = null_attacks(cfg, start, clients)

    assert n == 2 and is_member.tolist() == ([True] * 6 + [False] * 4) * 2
    audit = run_audit(cfg, start, delta=1e-3, canaries_inserted=False, clients_dir=clients)
    for name in ("loss", "calibrated"):
        scores = attacks[f"own {name}"]
        assert roc_auc(scores[is_member], scores[~is_member]) == audit[f"audit_mia_personal_{name}_auc"]
    # client 0's texts under client 1's personal model, and the base model, by hand
    model, tokenizer = experiment_model(cfg)
    _, members, non_members = client_mia_texts(cfg)[0]
    texts, max_tokens = [*members, *non_members], model.config.max_position_embeddings
    load_personal_model(model, "local_only", load_personal(clients / "1", method="local_only").arrays, start)
    twin_nll = mean_nll(model, tokenizer, texts, max_tokens=max_tokens)
    with model.disable_adapter():
        base_nll = mean_nll(model, tokenizer, texts, max_tokens=max_tokens)
    np.testing.assert_allclose(attacks["null loss"][:10], -twin_nll, rtol=0, atol=1e-12)
    np.testing.assert_allclose(attacks["base loss"][:10], -base_nll, rtol=0, atol=1e-12)
    own_nll = -attacks["own loss"][:10]
    np.testing.assert_allclose(attacks["twin-calibrated"][:10], twin_nll - own_nll, rtol=0, atol=1e-12)
    assert not np.allclose(twin_nll, own_nll)  # the two personal models differ
