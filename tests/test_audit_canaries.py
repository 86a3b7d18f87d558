"""Canaries: what is drawn, where it goes, and that only the chosen clients' train texts get it."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from fedslm.client.task import client_texts
from fedslm.audit.attack import calibrated_scores, loss_scores, text_nll
from fedslm.audit.canaries import (
    candidate_texts,
    client_canaries,
    insert_canaries,
    make_canaries,
    with_canaries,
)
from fedslm.config import AuditConfig, ExperimentConfig
from fedslm.data import load_client_split


def _cfg(audit: bool = True, **audit_kwargs) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "federation": {"num_clients": 3}, "data": {"docs_per_client": 8},
        "privacy": {"audit": audit}, "audit": {"canary_clients": [0, 2], **audit_kwargs}})


def test_canaries_per_client_and_count_with_distinct_secrets():
    cfg = AuditConfig(canaries=3, repetitions=[1, 4, 16], canary_clients=[0, 2], secret_length=4)
    canaries = make_canaries(cfg)
    assert Counter((c.partition_id, c.repetitions) for c in canaries) == {
        (p, r): 3 for p in (0, 2) for r in (1, 4, 16)}
    assert len({c.secret for c in canaries}) == 18
    assert all(c.text == f"my secret code is {c.secret}" and len(c.secret.split()) == 4
               and all(d.isdigit() for d in c.secret.split()) for c in canaries)
    assert make_canaries(cfg) == canaries  # seeded: clients and the audit agree
    assert make_canaries(AuditConfig(canaries=3, canary_clients=[0, 2], secret_length=4,
                                     seed=1)) != canaries


def test_candidates_are_distinct_same_template_and_never_a_canary():
    cfg = AuditConfig(canaries=2, secret_length=3, candidates=500)
    candidates = candidate_texts(cfg)
    assert len(candidates) == len(set(candidates)) == 500
    assert not set(candidates) & {c.text for c in make_canaries(cfg)}
    assert all(t.startswith("my secret code is ") for t in candidates)


def test_insert_keeps_the_texts_in_order_and_adds_each_canary_its_repetitions():
    canaries = make_canaries(AuditConfig(canaries=2, repetitions=[1, 4, 16]))
    train = tuple(f"doc {i}" for i in range(10))
    out = insert_canaries(train, canaries, seed="x")
    assert len(out) == 10 + 2 * (1 + 4 + 16)
    assert [t for t in out if t.startswith("doc")] == list(train)
    counts = Counter(out)
    assert all(counts[c.text] == c.repetitions for c in canaries)
    assert insert_canaries(train, canaries, seed="x") == out
    assert insert_canaries(train, canaries, seed="y") != out


def test_with_canaries_touches_only_chosen_clients_train_texts_when_the_audit_is_on():
    cfg = _cfg()
    plain = load_client_split(cfg.data, num_clients=3, partition_id=0)
    mine = client_canaries(cfg, 0)
    assert len(mine) == 2 * 3 and all(c.partition_id == 0 for c in mine)
    split = with_canaries(cfg, 0, plain)
    assert split.test == plain.test
    assert len(split.train) == len(plain.train) + 2 * (1 + 4 + 16)
    assert with_canaries(cfg, 1, plain) is plain  # not a canary client
    assert with_canaries(_cfg(audit=False), 0, plain) is plain  # audit off: no canaries
    # the client's data path (what training reads) carries them
    train = client_texts(cfg, 0, "train")
    assert train == split.train
    assert Counter(train)[mine[-1].text] == 16
    assert client_texts(cfg, 0, "test") == plain.test
    assert client_texts(cfg, 1, "train") == load_client_split(cfg.data, num_clients=3,
                                                              partition_id=1).train


def test_audit_config_refuses_what_cannot_work():
    from fedslm.config import ConfigError

    with pytest.raises(ConfigError, match=r"^audit.canary_clients: client 3 is outside 0..2"):
        _cfg(canary_clients=[3])
    with pytest.raises(ConfigError, match=r"^privacy.audit: needs federation.engine=simulation"):
        ExperimentConfig.from_dict({"privacy": {"audit": True}, "federation": {
            "engine": "remote", "address": "127.0.0.1:1", "insecure": True}})
    with pytest.raises(ConfigError, match=r"^audit.candidates: must be in 1..100000"):
        _cfg(secret_length=1, candidates=9)
    cfg = ExperimentConfig.from_dict({"audit": {"repetitions": "1,4,16"}})  # Flower's flat form
    assert cfg.audit.repetitions == [1, 4, 16]


def test_text_nll_matches_the_model_on_each_text_alone(make_peft, tiny_base):
    model, tokenizer = make_peft(), tiny_base[1]
    texts = ["the farmer repairs the bridge.", "a doctor sells fresh bread near the harbour.", "x"]
    sums, counts = text_nll(model, tokenizer, texts, batch_size=3)
    for text, got, n in zip(texts, sums, counts):
        ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"],
               tokenizer.eos_token_id]
        assert n == len(ids) - 1
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
        assert got == pytest.approx(float(loss) * n, rel=1e-5)


def test_attack_scores_signs():
    audited, reference = np.array([1.0, 2.0]), np.array([3.0, 2.5])
    assert loss_scores(audited).tolist() == [-1.0, -2.0]
    assert calibrated_scores(audited, reference).tolist() == [2.0, 0.5]
