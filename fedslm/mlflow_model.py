"""The MLflow pyfunc model a registered FedSLM version is: a merged transformers model that
generates. ``mlflow.pyfunc.load_model("models:/<name>/<version>").predict(["The river"],
params={"max_new_tokens": 20})`` returns one completion per prompt (a list, a string or a
DataFrame with a ``prompt`` column are accepted). A classify run's version is a
``ClassifierModel``: ``predict(["the team won"])`` returns a DataFrame with one row per
text, ``label`` (the run's class name) and ``probability`` (softmax of the head's logits).

Loading it needs this package importable (the class is pickled by reference), torch,
transformers and mlflow; not PEFT: the adapter is already merged.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd

MODEL_ARTIFACT = "model"  # the merged model (save_pretrained) inside the MLflow model
DEFAULT_PARAMS = {"max_new_tokens": 48, "temperature": 0.0, "top_p": 1.0, "seed": 0}


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[column]]
    return [str(v) for v in model_input]


class GenerativeModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: prompts in, completions (``fedslm.inference.generate``) out."""

    def __init__(self, task: str = "causal_lm") -> None:
        self.task = task

    def load_context(self, context) -> None:
        from fedslm.export_formats import load_hf

        self.model, self.tokenizer = load_hf(Path(context.artifacts[MODEL_ARTIFACT]))

    # pd.DataFrame is what pyfunc hands over (it converts a list or a string by the model's
    # signature); MLflow infers no schema from this hint, so it neither re-validates nor
    # warns "Add type hints to the `predict` method" at every registration
    def predict(self, context, model_input: pd.DataFrame, params=None):
        from fedslm.inference import Sampling, describe_output, generate

        p = {**DEFAULT_PARAMS, **(params or {})}
        sampling = Sampling(max_new_tokens=int(p["max_new_tokens"]), temperature=float(p["temperature"]),
                            top_p=float(p["top_p"]), seed=int(p["seed"]))
        return [describe_output(generate(self.model, self.tokenizer, prompt, sampling, task=self.task),
                                task=self.task)["text"] for prompt in _prompts(model_input)]


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a classify model: texts in, (label, probability) per text out,
    each text encoded as evaluation encodes it (``fedslm.inference.classify_text``)."""

    def __init__(self, labels: list[str], seq_len: int) -> None:
        self.labels, self.seq_len = list(labels), int(seq_len)

    def load_context(self, context) -> None:
        from fedslm.export_formats import load_hf

        self.model, self.tokenizer = load_hf(Path(context.artifacts[MODEL_ARTIFACT]))

    def predict(self, context, model_input: pd.DataFrame, params=None):  # the hint: see GenerativeModel
        from fedslm.inference import classify_text

        rows = [classify_text(self.model, self.tokenizer, text, self.labels, seq_len=self.seq_len)
                for text in _prompts(model_input)]
        return pd.DataFrame({"label": [r["label"] for r in rows],
                             "probability": [r["probability"] for r in rows]})


def save_classifier_model(path: Path, merged_dir: Path, *, labels: list[str], seq_len: int) -> Path:
    """Write an MLflow model dir at ``path`` wrapping the merged classify model in ``merged_dir``."""
    from mlflow.models import infer_signature

    signature = infer_signature(["a text"], pd.DataFrame({"label": [labels[0]], "probability": [0.5]}))
    mlflow.pyfunc.save_model(str(path), python_model=ClassifierModel(labels, seq_len),
                             artifacts={MODEL_ARTIFACT: str(merged_dir)}, signature=signature,
                             pip_requirements=_requirements())
    return path


def _requirements() -> list[str]:
    """Stated, not inferred: inference would import-trace the model in a subprocess."""
    import torch
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"mlflow=={mlflow.__version__}"]


def save_generative_model(path: Path, merged_dir: Path, *, task: str = "causal_lm") -> Path:
    """Write an MLflow model dir at ``path`` wrapping the merged model in ``merged_dir``."""
    from mlflow.models import infer_signature

    signature = infer_signature(["a prompt"], ["a completion"], params=DEFAULT_PARAMS)
    mlflow.pyfunc.save_model(
        str(path), python_model=GenerativeModel(task), artifacts={MODEL_ARTIFACT: str(merged_dir)},
        signature=signature, pip_requirements=_requirements())
    return path
