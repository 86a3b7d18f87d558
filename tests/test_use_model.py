"""Using a trained model: personal models rebuilt from disk, exports, bad input.

A run-shaped output dir (config.json + adapter/ + clients/<id>/) is written by the real
client task functions (the ones the ClientApp calls) on the builtin tiny Llama, so these
tests need no engine; tests/test_registry_e2e.py covers a real run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedslm.client.task import evaluate, fit
from fedslm.adapters import save_adapter
from fedslm.config import ExperimentConfig
from fedslm.inference import InferenceError, Sampling, generate
from fedslm.runconfig import PROJECT_ROOT
from fedslm.runtime import model_path
from fedslm.server.experiment import initial_adapter
from fedslm.simulations import export as export_cli
from fedslm.simulations import generate as generate_cli
from fedslm.simulations.model_source import eval_texts, resolve, score

NUM_CLIENTS = 2
LOGITS_ATOL = 1e-5  # merged fp32 vs base + LoRA: the same sums in another order


def experiment(method: str, out: Path, task: str = "causal_lm") -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "task": {"name": task},
        "personalization": {"method": method, "finetune_steps": 3},
        "federation": {"num_clients": NUM_CLIENTS, "num_rounds": 1},
        "data": {"heterogeneity": 1.0, "docs_per_client": 24},
        "training": {"local_steps": 4, "eval_max_batches": 2 if task != "classify" else 0},
        "output_dir": str(out),
    })


def make_run(method: str, out: Path, task: str = "causal_lm") -> tuple[ExperimentConfig, dict[int, dict]]:
    """One round of every client (fit, mean, evaluate) as the engine does it; the run's
    output dir as ``run_experiment`` writes it. Returns each client's evaluate metrics."""
    cfg = experiment(method, out, task)
    start = initial_adapter(cfg)
    updates = [fit(cfg, start, partition_id=p, server_round=1) for p in range(NUM_CLIENTS)]
    final = {n: np.mean([u[0][n] for u in updates], axis=0) for n in start}
    metrics = {p: evaluate(cfg, final, partition_id=p, server_round=1) for p in range(NUM_CLIENTS)}
    save_adapter(final, cfg.peft, base_model=model_path(cfg.model, cfg.data.seed), out_dir=out / "adapter")
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    return cfg, metrics


@pytest.fixture(scope="module")
def none_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run-none")
    make_run("none", out)
    return out


@pytest.mark.parametrize("method", ["split", "dual", "finetune", "local_only"])
def test_personal_model_reproduces_the_clients_own_evaluation(tmp_path, method):
    _, metrics = make_run(method, tmp_path)
    for partition in range(NUM_CLIENTS):
        spec = resolve(run=str(tmp_path), client=partition)
        model, tokenizer = spec.build()
        got = score(spec, model, tokenizer, eval_texts(spec))
        assert got["loss"] == pytest.approx(metrics[partition]["personal_loss"], abs=1e-6)
        assert got["accuracy"] == metrics[partition]["personal_accuracy"]
        glob = resolve(run=str(tmp_path))
        model, tokenizer = glob.build()
        texts = eval_texts(spec)  # the global model on the same client's split
        assert score(glob, model, tokenizer, texts)["loss"] == pytest.approx(
            metrics[partition]["loss"], abs=1e-6)
    if method == "split":  # the export bench's per-client gains are the ones clients reported
        from fedslm.simulations.bench.export import client_gains

        gains = client_gains(str(tmp_path))
        assert [g["client"] for g in gains] == list(range(NUM_CLIENTS))
        assert [g["gain_pct"] for g in gains] == pytest.approx(
            [metrics[p]["personal_gain"] for p in range(NUM_CLIENTS)], abs=1e-6)


@pytest.mark.parametrize("method", ["split", "dual"])
def test_a_device_state_dir_alone_gives_the_same_personal_model(tmp_path, method):
    """split/dual keep the last global adapter beside the personal one (offline use)."""
    make_run(method, tmp_path)
    with_run = resolve(run=str(tmp_path), client=1)
    alone = resolve(personal=str(tmp_path / "clients" / "1"))
    assert alone.method == method and alone.cfg is None
    ids = torch.tensor([[5, 17, 40, 3, 9, 120]])
    a, _ = with_run.build()
    b, _ = alone.build()
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_merged_hf_export_has_the_logits_of_base_plus_adapter(none_run, tmp_path):
    spec = resolve(run=str(none_run))
    peft_model, _ = spec.build()
    ids = torch.tensor([[5, 17, 40, 3, 9, 120, 77, 2]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    assert export_cli.main(["--run", str(none_run), "--format", "hf", "--out", str(tmp_path / "hf"),
                            "--latency-runs", "0"]) == 0
    # plain transformers in a fresh interpreter where importing peft is made impossible
    code = ("import sys; sys.modules['peft'] = None\n"
            "import torch; from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r})\n"
            f"torch.save(m(input_ids=torch.tensor({ids.tolist()})).logits.detach(), "
            f"{str(tmp_path / 'logits.pt')!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PROJECT_ROOT, timeout=120)
    got = torch.load(tmp_path / "logits.pt")
    assert torch.allclose(got, expected, atol=LOGITS_ATOL, rtol=0)
    assert not torch.equal(expected, resolve_base_logits(spec, ids))  # the adapter matters


def resolve_base_logits(spec, ids):
    from fedslm.model import load_base_model

    base, _ = load_base_model(spec.base_path, dtype="float32")
    with torch.no_grad():
        return base(input_ids=ids).logits


def test_int8_export_stays_within_the_threshold_and_reports_what_it_measured(none_run, tmp_path):
    out = tmp_path / "int8"
    assert export_cli.main(["--run", str(none_run), "--format", "int8", "--out", str(out),
                            "--latency-runs", "1", "--latency-new-tokens", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    q = report["quality"]
    assert report["warning"] == "" and q["perplexity_change_pct"] <= export_cli.DEFAULT_MAX_QUALITY_LOSS
    from fedslm.export_formats import load_int8

    spec = resolve(run=str(none_run))
    model, tokenizer = load_int8(out)
    assert score(spec, model, tokenizer, eval_texts(spec)) == q["after"]
    assert q["after"] != q["before"]  # really quantized
    assert q["split"] == "central test split"
    assert report["size_bytes"] == sum(p.stat().st_size for p in out.iterdir()
                                       if p.name not in ("report.json", "report.md"))
    assert set(report["latency"]) == {"fp32_merged", "export"}
    assert report["latency"]["export"]["runs"] == 1 and report["latency"]["export"]["threads"] == 1


def test_a_threshold_below_the_measured_loss_warns(none_run, tmp_path, capsys):
    assert export_cli.main(["--run", str(none_run), "--format", "int8", "--out", str(tmp_path / "q"),
                            "--latency-runs", "0", "--max-quality-loss", "-100"]) == 0
    assert "warning: perplexity rose" in capsys.readouterr().err


def test_gguf_file_reads_back_with_llama_names_and_shapes(none_run, tmp_path):
    from fedslm.gguf_export import read_fields, read_tensors

    out = tmp_path / "gguf"
    assert export_cli.main(["--run", str(none_run), "--format", "gguf", "--out", str(out),
                            "--latency-runs", "0"]) == 0
    tensors = read_tensors(out / "model.gguf")
    per_block = {"attn_norm": (64,), "attn_q": (64, 64), "attn_k": (64, 64), "attn_v": (64, 64),
                 "attn_output": (64, 64), "ffn_norm": (64,), "ffn_gate": (172, 64),
                 "ffn_up": (172, 64), "ffn_down": (64, 172)}
    expected = {"token_embd.weight": (1024, 64), "output_norm.weight": (64,)}
    expected.update({f"blk.{b}.{n}.weight": s for b in range(2) for n, s in per_block.items()})
    assert {n: t.shape for n, t in tensors.items()} == expected
    fields = read_fields(out / "model.gguf")
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.tokens"] == 1024
    # v_proj is not permuted: the file holds the merged weight up to q8_0 rounding
    spec = resolve(run=str(none_run))
    merged = spec.build()[0].merge_and_unload()
    v = merged.model.layers[1].self_attn.v_proj.weight.detach().numpy()
    assert np.abs(tensors["blk.1.attn_v.weight"] - v).max() < np.abs(v).max() / 100
    report = json.loads((out / "report.json").read_text())
    assert abs(report["quality"]["perplexity_change_pct"]) < export_cli.DEFAULT_MAX_QUALITY_LOSS


ONNX_LOGITS_ATOL = 1e-4  # onnxruntime's fp32 kernels vs torch's: measured 5e-6 on the tiny model


def test_onnx_export_has_the_logits_of_the_merged_model(none_run, tmp_path):
    from fedslm.onnx_export import greedy, load_onnx

    out = tmp_path / "onnx"
    assert export_cli.main(["--run", str(none_run), "--format", "onnx", "--out", str(out),
                            "--latency-runs", "1", "--latency-new-tokens", "3"]) == 0
    spec = resolve(run=str(none_run))
    peft_model, tokenizer = spec.build()
    onnx_model, _ = load_onnx(out)
    ids = torch.tensor([[5, 17, 40, 3, 9, 120, 77, 2, 11, 12, 13], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    got = onnx_model(input_ids=ids).logits  # batch and length differ from the traced example
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=ONNX_LOGITS_ATOL, rtol=0)
    prompt = ids[:1, :6]
    with torch.no_grad():
        want = peft_model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id)[:, 6:]
    assert torch.equal(greedy(onnx_model, prompt, 5), want)
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "onnx" and report["warning"] == ""
    assert report["quality"]["after"] == score(spec, onnx_model, tokenizer, eval_texts(spec))
    assert abs(report["quality"]["perplexity_change_pct"]) < 0.01
    assert report["size_bytes"] == sum(p.stat().st_size for p in out.iterdir()
                                       if p.name not in ("report.json", "report.md"))
    assert report["latency"]["export"]["runs"] == 1 and "no key/value cache" in report["latency"]["export"]["note"]


def test_onnx_without_its_packages_is_one_line(none_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_cli, "missing_packages", lambda: "onnxruntime")
    assert export_cli.main(["--run", str(none_run), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --format onnx: needs onnxruntime, not installed here (pip install 'fedslm[export]'; "
        "hf, int8 and gguf work without)"]


def test_gguf_generates_through_llama_cpp(none_run, tmp_path):
    """Only where llama-cpp-python installs from a wheel (not here: it builds from source)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "gguf"
    assert export_cli.main(["--run", str(none_run), "--format", "gguf", "--gguf-type", "f32",
                            "--out", str(out), "--latency-runs", "0"]) == 0
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), verbose=False)
    assert llm.create_completion("the river", max_tokens=4, temperature=0.0)["choices"][0]["text"]


def test_generate_is_greedy_by_default_and_seeded_when_sampling(none_run):
    model, tokenizer = resolve(run=str(none_run)).build()
    greedy = generate(model, tokenizer, "the river", Sampling(max_new_tokens=8))
    assert greedy == generate(model, tokenizer, "the river", Sampling(max_new_tokens=8, seed=5))
    hot = Sampling(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=1)
    assert generate(model, tokenizer, "the river", hot) == generate(model, tokenizer, "the river", hot)


def test_generate_cli_streams_the_completion(none_run, capsys):
    model, tokenizer = resolve(run=str(none_run)).build()
    expected = generate(model, tokenizer, "the river", Sampling(max_new_tokens=6))
    assert generate_cli.main(["--run", str(none_run), "--prompt", "the river",
                              "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()


def test_bad_input_is_one_line_and_exit_2(none_run, tmp_path, capsys):
    (tmp_path / "no-adapter").mkdir()
    (tmp_path / "no-adapter" / "config.json").write_text((none_run / "config.json").read_text())
    dual = tmp_path / "dual"
    make_run("dual", dual)
    split_cfg = json.loads((dual / "config.json").read_text())
    split_cfg["personalization"]["method"] = "split"
    other = tmp_path / "split-run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(split_cfg))
    (other / "adapter").symlink_to(dual / "adapter")
    cases = [
        (generate_cli, ["--run", str(tmp_path / "missing"), "--prompt", "x"],
         f"error: --run: {tmp_path / 'missing'} is neither an output dir nor an MLflow run id"),
        (generate_cli, ["--run", str(tmp_path / "no-adapter"), "--prompt", "x"],
         f"error: --run: {tmp_path / 'no-adapter'} has no adapter/ (the run did not finish)"),
        (generate_cli, ["--run", str(other), "--personal", str(dual / "clients" / "0"), "--prompt", "x"],
         f"error: --personal: {dual / 'clients' / '0' / 'personal'} holds a 'dual' personal adapter, "
         "this run uses 'split'; use another output_dir or personalization.state_dir"),
        (export_cli, ["--run", str(none_run), "--format", "tflite", "--out", str(tmp_path / "o")],
         "error: --format: unknown value 'tflite'; expected one of hf, int8, gguf, onnx"),
        (generate_cli, ["--run", str(none_run), "--client", "0", "--prompt", "x"],
         f"error: --run: {none_run} was trained without personalization; it has only the global model"),
        (export_cli, ["--run", str(tmp_path / "missing"), "--format", "hf", "--out", str(tmp_path / "o")],
         f"error: --run: {tmp_path / 'missing'} is neither an output dir nor an MLflow run id"),
        (export_cli, ["--run", str(tmp_path / "no-adapter"), "--format", "int8", "--out", str(tmp_path / "o")],
         f"error: --run: {tmp_path / 'no-adapter'} has no adapter/ (the run did not finish)"),
        (generate_cli, ["--run", str(none_run), "--prompt", "x", "--device", "tpu"],
         "error: --device: unknown value 'tpu'; expected cpu or cuda"),
    ]
    if not torch.cuda.is_available():
        cases.append((export_cli, ["--run", str(none_run), "--format", "hf", "--out", str(tmp_path / "o"),
                                   "--device", "cuda"],
                      "error: --device: cuda was requested but torch sees no CUDA GPU on this machine"))
    for module, argv, line in cases:
        assert module.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [line]


def test_sampling_settings_are_checked():
    with pytest.raises(InferenceError, match=r"^--top-p: must be in \(0, 1\], got 0.0$"):
        Sampling(top_p=0.0).check()


def test_agent_generate_uses_the_devices_personal_model_offline(tmp_path, capsys):
    from fedslm.client import agent

    make_run("dual", tmp_path)
    spec = resolve(personal=str(tmp_path / "clients" / "0"))
    model, tokenizer = spec.build()
    expected = generate(model, tokenizer, "a doctor", Sampling(max_new_tokens=5))
    assert agent.main(["generate", "--state-dir", str(tmp_path / "clients" / "0"),
                       "--prompt", "a doctor", "--max-new-tokens", "5", "--no-stream"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert agent.main(["generate", "--state-dir", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --personal: {tmp_path / 'nothing'} is not a directory"]


def test_fedslm_cli_dispatches_and_names_a_bad_command(none_run, capsys):
    from fedslm.simulations import cli

    assert cli.main(["export", "--run", str(none_run), "--format", "tflite", "--out", "/tmp/none"]) == 2
    assert "error: --format: unknown value 'tflite'" in capsys.readouterr().err
    assert cli.main(["serve"]) == 2
    assert capsys.readouterr().err.strip() == "error: command: expected one of generate, export, engine, got serve"


# ---------------------------------------------------------------- classification runs

def test_classify_generate_prints_the_heads_label_and_probability(tmp_path, capsys):
    """Global and personal models of a classify run, and a device's state dir alone: the
    label printed is the head's argmax with its softmax probability, and over a client's
    test split those labels give exactly the accuracy the client reported."""
    from fedslm.client import agent
    from fedslm.data.synthetic import TOPIC_NAMES
    from fedslm.inference import classify_text

    cfg, metrics = make_run("split", tmp_path, task="classify")
    text = "the team won the match in the final minute"
    for flags, prefix in (([], ""), (["--client", "1"], "personal_")):
        spec = resolve(run=str(tmp_path), client=1 if flags else None)
        assert spec.task == "classify" and spec.labels == tuple(TOPIC_NAMES[: cfg.data.num_topics])
        model, tokenizer = spec.build()
        records = eval_texts(resolve(run=str(tmp_path), client=1))  # client 1's test split
        predicted = [classify_text(model, tokenizer, json.loads(r)["text"], spec.labels,
                                   seq_len=spec.seq_len) for r in records]
        hits = sum(p["index"] == json.loads(r)["label"] for p, r in zip(predicted, records))
        assert hits / len(records) == metrics[1][f"{prefix}accuracy"]
        want = classify_text(model, tokenizer, text, spec.labels, seq_len=spec.seq_len)
        with torch.no_grad():
            probs = torch.softmax(model(**tokenizer(text + tokenizer.eos_token, return_tensors="pt",
                                                    add_special_tokens=False)).logits[0], -1)
        assert want["probability"] == pytest.approx(float(probs.max()), abs=1e-6)
        assert want["label"] == spec.labels[int(probs.argmax())]
        assert generate_cli.main(["--run", str(tmp_path), *flags, "--prompt", text]) == 0
        assert capsys.readouterr().out == f"{want['label']}\t{want['probability']:.4f}\n"
    # the device's state dir alone: task and class names are kept with the personal adapter
    assert agent.main(["generate", "--state-dir", str(tmp_path / "clients" / "1"), "--prompt", text]) == 0
    assert capsys.readouterr().out == f"{want['label']}\t{want['probability']:.4f}\n"
    assert generate_cli.main(["--run", str(tmp_path), "--prompt", text, "--task", "instruct"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --task: instruct does not fit this model, trained for task classify"]


def test_bench_export_measures_a_fresh_model_as_a_run(tmp_path, capsys):
    """``bench export --fresh-model``: a run-shaped dir with a fresh adapter (no engine)."""
    from fedslm.simulations.bench import export as bench_export

    run = bench_export.fresh_run("builtin:tiny-llama", tmp_path / "fresh", eval_max_batches=1)
    spec = resolve(run=str(run))
    assert spec.cfg.training.eval_max_batches == 1 and spec.method == "none"
    b = [v for k, v in spec.shared.items() if "lora_B" in k]
    assert b and all(not v.any() for v in b)  # fresh: merging changes nothing
    assert bench_export.main(["--run", str(run), "--fresh-model", "builtin:tiny-llama"]) == 2
    assert capsys.readouterr().err.strip() == "error: --run or --fresh-model: give exactly one"
