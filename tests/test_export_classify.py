"""Exporting a classification run (task=classify: LoRA + the head as PEFT modules_to_save).

The run-shaped output dir is written by the real client task functions on the builtin
tiny Llama (``tests.test_use_model.make_run``), no engine. Expected predictions come from
another path than the report's: ``classify_text`` one text at a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from fedslm.data.synthetic import TOPIC_NAMES
from fedslm.inference import classify_text
from fedslm.runconfig import PROJECT_ROOT
from fedslm.simulations import export as export_cli
from fedslm.simulations.model_source import eval_texts, resolve
from tests.test_use_model import make_run

LOGITS_ATOL = 1e-5  # merged fp32 vs base + LoRA + head: the same sums in another order
ONNX_LOGITS_ATOL = 1e-4  # onnxruntime's fp32 kernels vs torch's
# two texts of different lengths: the shorter is right-padded, the head reads its last real token
TEXTS = ["the team won the match in the final minute", "the chef"]


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run-classify")
    make_run("none", out, task="classify")
    return out


def batch(tokenizer):
    rows = [tokenizer(t + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for t in TEXTS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def expected_quality(model, tokenizer, spec) -> dict[str, float]:
    """scikit-learn on predictions made one text at a time."""
    records = [json.loads(r) for r in eval_texts(spec)]
    pred = [classify_text(model, tokenizer, r["text"], spec.labels, seq_len=spec.seq_len)["index"] for r in records]
    truth = [r["label"] for r in records]
    p, r, f, _ = precision_recall_fscore_support(truth, pred, average="macro", zero_division=0)
    return {
        "accuracy": accuracy_score(truth, pred),
        "macro_precision": p,
        "macro_recall": r,
        "macro_f1": f,
        "examples": len(records),
    }


def check_quality(report_quality: dict, want: dict) -> None:
    assert {k: report_quality[k] for k in want} == pytest.approx(want, abs=1e-12)


def export(run: Path, fmt: str, out: Path, *extra: str) -> dict:
    assert export_cli.main(["--run", str(run), "--format", fmt, "--out", str(out), *extra]) == 0
    return json.loads((out / "report.json").read_text())


def test_hf_export_of_a_classifier_loads_with_plain_transformers(classify_run, tmp_path):
    spec = resolve(run=str(classify_run))
    peft_model, tokenizer = spec.build()
    ids, mask = batch(tokenizer)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    report = export(classify_run, "hf", tmp_path / "hf", "--latency-runs", "2", "--latency-text-tokens", "12")
    code = (
        "import sys, json; sys.modules['peft'] = None\n"  # importing peft is made impossible
        "import torch; from transformers import AutoModelForSequenceClassification\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'hf')!r})\n"
        f"out = m(input_ids=torch.tensor({ids.tolist()}), attention_mask=torch.tensor({mask.tolist()}))\n"
        f"torch.save(out.logits.detach(), {str(tmp_path / 'logits.pt')!r})\n"
        "print(json.dumps(m.config.id2label))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=PROJECT_ROOT, timeout=120, capture_output=True, text=True
    )
    got = torch.load(tmp_path / "logits.pt")
    assert got.shape == (2, 8)
    assert torch.allclose(got, expected, atol=LOGITS_ATOL, rtol=0)
    from fedslm.model import load_base_model
    from transformers import AutoModelForSequenceClassification

    base, _ = load_base_model(
        spec.base_path, dtype="float32", auto_model=AutoModelForSequenceClassification, num_labels=8
    )
    with torch.no_grad():  # the adapter and the trained head matter
        assert (base(input_ids=ids, attention_mask=mask).logits - expected).abs().max() > 1e-2
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {str(i): n for i, n in enumerate(TOPIC_NAMES[:8])}

    q = report["quality"]
    assert report["task"] == "classify" and report["format"] == "hf" and report["warning"] == ""
    assert report["labels"] == list(TOPIC_NAMES[:8])
    assert q["split"] == "central test split" and q["texts"] == 64
    want = expected_quality(peft_model, tokenizer, spec)
    check_quality(q["before"], want)
    check_quality(q["after"], want)
    assert q["max_abs_logit_diff"] <= LOGITS_ATOL and q["predictions_changed"] == 0
    assert q["macro_f1_change_pct"] == 0.0
    for which in ("fp32_merged", "export"):
        lat = report["latency"][which]
        assert (lat["runs"], lat["threads"], lat["text_tokens"], lat["device"]) == (2, 1, 12, "cpu")
        assert lat["seconds_per_text"] > 0
    md = (tmp_path / "hf" / "report.md").read_text()
    assert f"F1 {want['macro_f1']:.4f}" in md and "ms/text (median of 2, 12 tokens, 1 thread(s), cpu)" in md


def test_int8_export_of_a_classifier_reports_what_the_file_predicts(classify_run, tmp_path):
    from fedslm.export_formats import load_int8

    # a threshold below any change: the report warns, naming the two F1 figures
    report = export(classify_run, "int8", tmp_path / "int8", "--latency-runs", "0", "--max-quality-loss", "-100")
    model, tokenizer = load_int8(tmp_path / "int8")
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert type(model.score).__module__.startswith("torch.ao.nn.quantized")  # the head is int8 too
    spec = resolve(run=str(classify_run))
    q = report["quality"]
    check_quality(q["after"], expected_quality(model, tokenizer, spec))
    check_quality(q["before"], expected_quality(spec.build()[0], tokenizer, spec))
    assert 0 < q["max_abs_logit_diff"] < 0.5  # really quantized, still close
    assert q["macro_f1_change_pct"] == pytest.approx(
        100 * (q["after"]["macro_f1"] / q["before"]["macro_f1"] - 1), abs=1e-12
    )
    assert report["latency"] == {}
    before, after = q["before"]["macro_f1"], q["after"]["macro_f1"]
    assert report["warning"] == (
        f"macro-F1 fell {-q['macro_f1_change_pct']:.2f}% ({before:.4f} -> {after:.4f}), "
        "above --max-quality-loss -100.0%"
    )


def test_onnx_export_of_a_classifier_has_the_logits_of_the_merged_model(classify_run, tmp_path):
    from fedslm.onnx_export import load_onnx

    report = export(classify_run, "onnx", tmp_path / "onnx", "--latency-runs", "1")
    spec = resolve(run=str(classify_run))
    peft_model, tokenizer = spec.build()
    onnx_model, _ = load_onnx(tmp_path / "onnx")
    ids, mask = batch(tokenizer)  # batch 2, a padded row: neither is the traced example
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    got = onnx_model(input_ids=ids, attention_mask=mask).logits
    assert got.shape == expected.shape == (2, 8)
    assert torch.allclose(got, expected, atol=ONNX_LOGITS_ATOL, rtol=0)
    q = report["quality"]
    check_quality(q["after"], expected_quality(onnx_model, tokenizer, spec))
    assert q["max_abs_logit_diff"] <= ONNX_LOGITS_ATOL and q["predictions_changed"] == 0
    assert report["latency"]["export"]["runs"] == 1


def test_a_clients_personal_classifier_is_scored_on_its_own_split(tmp_path):
    """Before export, the report gives exactly what the client reported for its personal model."""
    _, metrics = make_run("split", tmp_path / "run", task="classify")
    report = export(tmp_path / "run", "hf", tmp_path / "c1", "--client", "1", "--latency-runs", "0")
    q = report["quality"]
    assert report["model"] == "client 1" and q["split"] == "client 1 test split"
    assert q["before"]["accuracy"] == metrics[1]["personal_accuracy"]
    assert q["before"]["macro_f1"] == pytest.approx(metrics[1]["personal_macro_f1"], abs=1e-12)
    assert q["before"]["loss"] == pytest.approx(metrics[1]["personal_loss"], abs=1e-5)
    assert q["after"]["accuracy"] == q["before"]["accuracy"] and q["predictions_changed"] == 0


def test_gguf_refuses_a_classifier_in_one_line(classify_run, tmp_path, capsys):
    assert export_cli.main(["--run", str(classify_run), "--format", "gguf", "--out", str(tmp_path / "g")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --format gguf: a classify model has a sequence-classification head, and llama.cpp's "
        "GGUF conventions have no place for it in a 'llama' model (classifier tensors cls/cls.output "
        "exist only for BERT-family architectures); use hf, int8 or onnx"
    ]
    assert not (tmp_path / "g").exists()


def test_the_gguf_refusal_states_what_gguf_defines():
    """The reason is gguf's own per-architecture tensor lists (fails when they change)."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS

    from fedslm.classifier import classifier_place

    with_head = sorted(MODEL_ARCH_NAMES[a] for a, ts in MODEL_TENSORS.items() if MODEL_TENSOR.CLS_OUT in ts)
    assert with_head and all("bert" in name for name in with_head)
    assert not classifier_place("llama") and classifier_place("bert")


def test_quality_is_scikit_learns_on_the_argmax():
    from fedslm.classifier import quality

    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    labels = np.array([0, 1, 2, 2])  # predictions 0, 1, 1, 2
    got = quality(logits, labels)
    # class 0: P 1, R 1; class 1: P 1/2, R 1; class 2: P 1, R 1/2
    assert got["accuracy"] == 0.75 and got["examples"] == 4
    assert got["macro_precision"] == pytest.approx((1 + 0.5 + 1) / 3, abs=1e-12)
    assert got["macro_recall"] == pytest.approx((1 + 1 + 0.5) / 3, abs=1e-12)
    assert got["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3, abs=1e-12)
    log_p = torch.log_softmax(torch.from_numpy(logits), -1)
    assert got["loss"] == pytest.approx(float(-log_p[[0, 1, 2, 3], [0, 1, 2, 2]].mean()), abs=1e-6)
