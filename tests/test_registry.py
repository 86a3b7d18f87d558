"""Model Registry: which round is registered, and a registered version that generates."""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import pytest

from fedslm.adapters import save_adapter
from fedslm.config import ConfigError, ExperimentConfig
from fedslm.inference import Sampling, assemble_model, generate, merged_model
from fedslm.runtime import model_path
from fedslm.server.experiment import initial_adapter
from fedslm.server.registry import BEST_DIR, BEST_FILE, BestRound, register_run
from fedslm.server.tracking import Tracker
from tests.stores import sqlite_store


def config(tmp_path, **tracking) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "tracking": {"uri": sqlite_store(tmp_path / "mlflow.db"), "register": True,
                     "model_name": "tiny", **tracking},
        "output_dir": str(tmp_path / "run"),
    })


def arrays_for(value: float) -> dict[str, np.ndarray]:
    return {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
            np.full((8, 64), value, dtype=np.float32)}


@pytest.mark.parametrize(("metric", "values", "best"), [
    ("central_loss", [2.5, 2.1, 2.3], 2),          # lower is better for losses
    ("eval_perplexity", [9.0, 9.0, 8.9], 3),
    ("central_accuracy", [0.41, 0.45, 0.44], 2),   # higher otherwise
    ("central_accuracy", [0.4, 0.4, 0.4], 1),      # ties keep the earlier round
])
def test_best_round_keeps_only_the_best_adapter(tmp_path, metric, values, best):
    cfg = config(tmp_path, register_best_by=metric)
    keep = BestRound(cfg, tmp_path, base_model="base")
    for rnd, value in enumerate(values, start=1):
        keep(rnd, arrays_for(float(rnd)), {metric: value, "other": 0.0})
    meta = json.loads((tmp_path / BEST_DIR / BEST_FILE).read_text())
    assert meta == {"round": best, "metric": metric, "value": values[best - 1]}
    from safetensors.numpy import load_file

    saved = load_file(str(tmp_path / BEST_DIR / "adapter_model.safetensors"))
    assert np.array_equal(saved[next(iter(saved))], arrays_for(float(best))[next(iter(saved))])
    again = BestRound(cfg, tmp_path, base_model="base")  # a resumed server continues it
    assert again.best == meta


def test_an_unknown_best_by_metric_names_the_key(tmp_path):
    keep = BestRound(config(tmp_path, register_best_by="nope"), tmp_path, base_model="base")
    with pytest.raises(ConfigError, match=r"^tracking.register_best_by: round 1 has no metric 'nope'; "
                                          r"round metrics are: a, b$"):
        keep(1, arrays_for(1.0), {"b": 1.0, "a": 2.0})


@pytest.mark.parametrize(("tracking", "message"), [
    ({"register": True, "model_name": ""}, "tracking.model_name: must name the registered model"),
    ({"register_best_by": "central_loss"}, "tracking.register_best_by: is only used with"),
    ({"enabled": False, "register": True, "model_name": "m"}, "tracking.register: needs tracking.enabled"),
])
def test_registry_settings_are_checked(tracking, message):
    with pytest.raises(ConfigError, match="^" + message):
        ExperimentConfig.from_dict({"tracking": tracking})


def test_registered_version_loads_by_models_uri_and_generates(tmp_path):
    import mlflow

    cfg = config(tmp_path, register_best_by="central_loss")
    run_dir = tmp_path / "run"
    base = model_path(cfg.model, cfg.data.seed)
    final = initial_adapter(cfg)
    better = {k: v * 0.5 for k, v in final.items()}
    final_dir = save_adapter(final, cfg.peft, base_model=base, out_dir=run_dir / "adapter")
    keep = BestRound(cfg, run_dir, base_model=base)
    keep(1, better, {"central_loss": 2.0})
    keep(2, final, {"central_loss": 2.2})  # the last round is not the best
    tracker = Tracker(cfg.tracking, default_uri="")
    run_id = tracker.start({}, default_name="t")
    rounds = [{"round": 1, "central_loss": 2.0}, {"round": 2, "central_loss": 2.2, "eval_loss": 2.4}]
    registered = register_run(cfg, tracker, run_dir, final_dir, rounds)
    tracker.end()
    assert registered["name"] == "tiny" and registered["version"] == 1 and registered["round"] == 1
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    version = client.get_model_version("tiny", "1")
    assert version.tags == {"central_loss": "2.2", "eval_loss": "2.4", "fedslm.round": "1",
                            "fedslm.register_best_by": "central_loss"}
    assert version.run_id == run_id

    mlflow.set_tracking_uri(cfg.tracking.uri)
    try:
        loaded = mlflow.pyfunc.load_model("models:/tiny/1")
    finally:
        mlflow.set_tracking_uri("")
    got = loaded.predict(["the river", "a doctor"], params={"max_new_tokens": 6})
    model, tokenizer = assemble_model(base, cfg.peft, method="none", shared=better, seed=cfg.training.seed)
    merged = merged_model(model)
    assert got == [generate(merged, tokenizer, p, Sampling(max_new_tokens=6)) for p in ("the river", "a doctor")]
    assert all(got)


def test_a_classify_run_registers_a_model_that_returns_label_and_probability(tmp_path):
    import mlflow

    from fedslm.data.synthetic import TOPIC_NAMES
    from fedslm.inference import classify_text

    cfg = ExperimentConfig.from_dict({
        "task": {"name": "classify"},
        "tracking": {"uri": sqlite_store(tmp_path / "mlflow.db"), "register": True, "model_name": "topics"},
        "output_dir": str(tmp_path / "run"),
    })
    base = model_path(cfg.model, cfg.data.seed)
    rng = np.random.default_rng(0)  # a trained-looking adapter: LoRA B and the head away from init
    final = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in initial_adapter(cfg).items()}
    assert any("score" in k for k in final)  # the head travels with the adapter
    final_dir = save_adapter(final, cfg.peft, base_model=base, out_dir=tmp_path / "run" / "adapter")
    tracker = Tracker(cfg.tracking, default_uri="")
    tracker.start({}, default_name="t")
    registered = register_run(cfg, tracker, tmp_path / "run", final_dir,
                              [{"round": 1, "central_accuracy": 0.5, "central_macro_f1": 0.25}])
    tracker.end()
    assert registered["name"] == "topics" and registered["version"] == 1 and registered["round"] == 1

    mlflow.set_tracking_uri(cfg.tracking.uri)
    try:
        loaded = mlflow.pyfunc.load_model("models:/topics/1")
    finally:
        mlflow.set_tracking_uri("")
    texts = ["the team won the match in the final minute", "the chef", "a doctor"]
    got = loaded.predict(texts)
    assert list(got.columns) == ["label", "probability"] and len(got) == 3
    model, tokenizer = assemble_model(base, cfg.peft, method="none", shared=final, seed=cfg.training.seed,
                                      task="classify", num_labels=cfg.data.num_topics)
    labels = TOPIC_NAMES[: cfg.data.num_topics]
    want = [classify_text(model, tokenizer, t, labels, seq_len=cfg.training.seq_len) for t in texts]
    assert list(got["label"]) == [w["label"] for w in want]
    assert list(got["probability"]) == pytest.approx([w["probability"] for w in want], abs=1e-5)
    assert all(0 < p <= 1 for p in got["probability"])


def test_the_pyfunc_wrappers_declare_their_input_so_mlflow_does_not_warn():
    """MLflow checks a PythonModel's ``predict`` when the class is defined and, without a type
    hint, warns "Add type hints to the `predict` method" at every registration. Ours declare
    the DataFrame pyfunc passes them (a hint MLflow infers no schema from, so the model's
    signature stays the one that validates)."""
    import fedslm.mlflow_model

    spec = importlib.util.spec_from_file_location("mlflow_model_defined_again", fedslm.mlflow_model.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec.loader.exec_module(module)
    assert [str(w.message) for w in caught if "type hint" in str(w.message).lower()] == []
    for model in (module.GenerativeModel, module.ClassifierModel):
        assert model.predict.__wrapped__.__annotations__["model_input"] == "pd.DataFrame"
