"""Personalization with the LoRA-aware rules: FFA with a personal adapter (dual), and a
product rule with dual at a client's own rank, through the real ClientApp."""

from __future__ import annotations

import numpy as np

from fedslm.adapters import adapter_arrays, from_array_record, parameter_role, to_array_record
from fedslm.aggregation.lora_factors import rank_of, truncate
from fedslm.client.app import app
from fedslm.personal_state import load_personal
from fedslm.rundir import resolve_state_dir
from fedslm.runtime import experiment_model
from fedslm.server.experiment import fixed_adapter, initial_adapter
from tests.test_aggregation_wiring import _cfg, _context, _message

LAYER = "base_model.model.model.layers.0.self_attn.q_proj"


def test_roles_of_ffa_with_dual() -> None:
    role = {
        n: parameter_role(f"{LAYER}.{n}.weight", personalization="dual", fixed_lora_a=True)
        for n in ("lora_A.default", "lora_B.default", "lora_A.personal", "lora_B.personal")
    }
    assert role == {
        "lora_A.default": "fixed",
        "lora_B.default": "shared",
        "lora_A.personal": "personal",
        "lora_B.personal": "personal",
    }


def test_ffa_with_a_personal_adapter_sends_b_keeps_its_own_and_never_moves_a(tmp_path) -> None:
    cfg = _cfg(tmp_path, aggregation={"name": "ffa"}, personalization={"method": "dual"})
    sent = initial_adapter(cfg)
    assert sent and all("lora_B" in n for n in sent)  # the global holds B alone
    a_before = fixed_adapter(cfg)
    assert len(a_before) == 4 and all("lora_A" in n for n in a_before)
    reply = app(_message("train", to_array_record(sent)), _context(cfg, partition=0))
    back = from_array_record(reply.content["arrays"])
    assert set(back) == set(sent) and any(not np.array_equal(back[n], sent[n]) for n in sent)
    state = load_personal(resolve_state_dir(cfg, run_id=1) / "0", method="dual")
    assert state is not None and len(state.arrays) == 8  # the personal adapter: its A and B
    assert any(np.abs(v).sum() > 0 for n, v in state.arrays.items() if "lora_B" in n)  # trained
    model, _ = experiment_model(cfg)
    a_after = adapter_arrays(model, "fixed")
    assert all(np.array_equal(a_after[n], a_before[n]) for n in a_before)
    evaluated = app(_message("evaluate", reply.content["arrays"]), _context(cfg, partition=0))
    assert evaluated.content["metrics"]["has_personal"] == 1


def test_a_product_rule_with_dual_trains_the_sent_rank_and_a_full_personal_adapter(tmp_path) -> None:
    cfg = _cfg(
        tmp_path,
        aggregation={"name": "flexlora"},
        personalization={"method": "dual"},
        peft={"r": 8, "ranks": "0 r=2, * r=8"},
    )
    sent = truncate(initial_adapter(cfg), 2)
    reply = app(_message("train", to_array_record(sent)), _context(cfg, partition=0))
    back = from_array_record(reply.content["arrays"])
    assert {n: v.shape for n, v in back.items()} == {n: v.shape for n, v in sent.items()} and rank_of(back) == 2
    state = load_personal(resolve_state_dir(cfg, run_id=1) / "0", method="dual")
    assert state is not None and rank_of(state.arrays) == 8
