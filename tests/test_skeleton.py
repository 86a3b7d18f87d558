"""The server's initial adapter without the base in memory: same values as the full model."""

from __future__ import annotations

import numpy as np
import pytest

from fedslm.adapters import adapter_arrays, reset_lora
from fedslm.config import ExperimentConfig
from fedslm.runtime import experiment_model
from fedslm.server.experiment import fixed_adapter, initial_adapter
from fedslm.skeleton import has_skeleton, skeleton_model


def config(**sections: dict) -> ExperimentConfig:
    return ExperimentConfig.from_dict({"training": {"seed": 7, "central_eval": False}, **sections})


def full_model_arrays(cfg: ExperimentConfig, role: str = "shared") -> dict[str, np.ndarray]:
    model, _ = experiment_model(cfg)
    reset_lora(model, seed=cfg.training.seed)
    return adapter_arrays(model, role)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"peft": {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
        {"personalization": {"method": "dual"}},
        {"aggregation": {"name": "ffa"}},
    ],
    ids=["default", "r4-all-attention", "dual", "ffa"],
)
def test_skeleton_gives_the_full_models_initial_adapter_exactly(sections: dict) -> None:
    cfg = config(**sections)
    assert has_skeleton(cfg)
    expected = full_model_arrays(cfg)
    got = initial_adapter(cfg)
    assert sorted(got) == sorted(expected) and got
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)
    assert all(np.abs(v).max() == 0 for n, v in got.items() if "lora_B" in n)
    fixed = fixed_adapter(cfg)
    assert any(np.abs(v).max() > 0 for n, v in {**got, **fixed}.items() if "lora_A" in n)
    if sections.get("aggregation"):  # FFA-LoRA: A is fixed, never travels, same seeded init
        assert fixed and all("lora_A" in n for n in fixed) and not any("lora_A" in n for n in got)
        for name, value in full_model_arrays(cfg, "fixed").items():
            np.testing.assert_array_equal(fixed[name], value)
    else:
        assert fixed == {}


def test_the_skeleton_holds_no_base_weight() -> None:
    model = skeleton_model(config())
    real = {n for n, p in model.named_parameters() if p.device.type != "meta"}
    assert real and all("lora_" in n for n in real)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert base and all(p.device.type == "meta" for p in base)


def test_a_task_head_or_a_quantized_base_builds_the_full_model() -> None:
    assert not has_skeleton(config(task={"name": "classify"}))
    with pytest.raises(ValueError, match="task.name='classify'"):
        skeleton_model(config(task={"name": "classify"}))
