"""Export a trained model (global or personal) for use outside FedSLM, with a report.

    python -m fedslm.simulations.export --run outputs/runs/<date>/<time> --format hf   --out exports/hf
    python -m fedslm.simulations.export --run <run> --client 3 --format int8 --out exports/c3-int8
    python -m fedslm.simulations.export --run <run> --format gguf --gguf-type q8_0 --out exports/gguf
    python -m fedslm.simulations.export --run <run> --format onnx --out exports/onnx   # pip install 'fedslm[export]'

The adapter(s) are merged into the base (``merge_and_unload``), the model is written in
the format, read back from what was written, and ``report.json`` + ``report.md`` in
``--out`` state: file size, parameters, loss/perplexity/accuracy on the central test
split (global) or the client's own test split (personal) before export (base + adapter)
and after (the exported files), CPU latency per generated token (median of
``--latency-runs``, prompt length and threads stated) of the export and of the fp32
merged model measured in the same process, and a warning when perplexity rises by more
than ``--max-quality-loss`` percent. ``--device cuda`` builds, scores and times the
model before export (and the ``hf`` export) on the GPU; int8, gguf and onnx are CPU
formats, written, scored and timed on the CPU. Bad input: one line on stderr, exit 2.

A classification model (``task=classify``: LoRA plus the head, which travels as PEFT
``modules_to_save``) exports as a merged sequence-classification model (``hf``: plain
``AutoModelForSequenceClassification.from_pretrained``; ``int8``; ``onnx``), with the
run's class names in its config; its report gives accuracy and macro precision, recall
and F1 (scikit-learn) before and after, the largest logit difference, how many
predictions changed, and CPU latency per text (``--latency-text-tokens``). ``gguf``
refuses it: llama.cpp's GGUF conventions have no place for such a head in a Llama model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

from fedslm.classifier import GGUF_NO_HEAD, classifier_place
from fedslm.export_formats import dir_bytes, load_hf, load_int8, save_hf, save_int8
from fedslm.gguf_export import GGUF_TYPES, GGUFError, read_back, write_gguf
from fedslm.inference import InferenceError, check_device, latency_per_token, merged_model
from fedslm.model import ModelError, count_parameters
from fedslm.generate_cli import EXIT_BAD_INPUT, add_device_arg, quiet
from fedslm.onnx_export import OnnxError, load_onnx, missing_packages, write_onnx
from fedslm.simulations.generate import add_model_args

FORMATS = ("hf", "int8", "gguf", "onnx")
DEFAULT_MAX_QUALITY_LOSS = 2.0  # percent perplexity increase that earns a warning


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedslm export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--format", required=True,
                        help=" | ".join(FORMATS) + " (a classify model: not gguf)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--gguf-type", default="q8_0", help=f"{' | '.join(GGUF_TYPES)} (gguf only)")
    parser.add_argument("--max-quality-loss", type=float, default=DEFAULT_MAX_QUALITY_LOSS,
                        help="warn when perplexity rises (classify: macro-F1 falls) by more "
                             "than this many percent")
    parser.add_argument("--latency-runs", type=int, default=5, help="0 skips the latency measurement")
    parser.add_argument("--latency-prompt-tokens", type=int, default=32)
    parser.add_argument("--latency-new-tokens", type=int, default=32)
    parser.add_argument("--latency-text-tokens", type=int, default=32,
                        help="classify models: tokens of the text each latency run classifies")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the latency runs")
    add_device_arg(parser)
    return parser.parse_args(argv)


def check_format(args: argparse.Namespace) -> None:
    if args.format not in FORMATS:
        raise InferenceError(f"--format: unknown value {args.format!r}; expected one of {', '.join(FORMATS)}")
    if args.format == "onnx" and missing_packages():
        raise InferenceError(f"--format onnx: needs {missing_packages()}, not installed here "
                             "(pip install 'fedslm[export]'; hf, int8 and gguf work without)")
    if args.gguf_type not in GGUF_TYPES:
        raise InferenceError(f"--gguf-type: unknown value {args.gguf_type!r}; expected one of {', '.join(GGUF_TYPES)}")


def export(args: argparse.Namespace) -> dict:
    from fedslm.simulations.model_source import eval_texts, resolve, score

    check_format(args)
    device = check_device(args.device)
    spec = resolve(run=args.run, client=args.client, personal=args.personal,
                   tracking_uri=args.tracking_uri)
    classify = spec.task == "classify"
    if classify and args.format == "gguf" and not classifier_place("llama"):
        raise InferenceError(GGUF_NO_HEAD.format(arch="llama"))
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise InferenceError(f"--out: {out} exists and is not empty")
    model, tokenizer = spec.build(device)
    texts = eval_texts(spec)
    if classify:
        return _export_classifier(args, spec, model, tokenizer, texts, out, device)
    before = score(spec, model, tokenizer, texts)
    merged = merged_model(model)
    params = count_parameters(merged)[1]
    latency = {}
    if args.latency_runs:
        latency["fp32_merged"] = _latency(args, merged, tokenizer)
    merged = merged.cpu()  # every format is written from CPU tensors
    if args.format == "gguf":
        files = write_gguf(merged, tokenizer, out / "model.gguf", qtype=args.gguf_type)
        tokenizer.save_pretrained(str(out / "tokenizer"))  # for reading the file back
        exported = read_back(files, copy.deepcopy(merged))
    else:
        files, exported = _write_and_load(args, merged, tokenizer, out, device, task=spec.task)
    after = score(spec, exported, tokenizer, texts)
    if args.latency_runs:
        if args.format == "gguf":
            latency["export"] = _gguf_latency(args, files)
        elif args.format == "onnx":
            from fedslm.onnx_export import latency_per_token as onnx_latency

            latency["export"] = onnx_latency(exported, tokenizer, prompt_tokens=args.latency_prompt_tokens,
                                             new_tokens=args.latency_new_tokens,
                                             runs=args.latency_runs, threads=args.threads)
        else:
            latency["export"] = _latency(args, exported, tokenizer)
    report = _report(args, spec, files, params, before, after, latency, len(texts))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report))
    return report


def _write_and_load(args, merged, tokenizer, out: Path, device: str, *, task: str):
    """Write ``merged`` as hf, int8 or onnx and read it back: (files, the model read back)."""
    if args.format == "hf":
        save_hf(merged, tokenizer, out, task=task)
        return out, load_hf(out)[0].to(device)
    if args.format == "onnx":
        files = write_onnx(copy.deepcopy(merged), tokenizer, out, task=task)
        return files, load_onnx(out, threads=args.threads)[0]
    save_int8(copy.deepcopy(merged), tokenizer, out, task=task)
    return out, load_int8(out)[0]


def _export_classifier(args, spec, model, tokenizer, texts, out: Path, device: str) -> dict:
    """A classify model: the same formats (not gguf), scored by its predictions."""
    import numpy as np

    from fedslm.classifier import latency_per_text, name_labels, quality
    from fedslm.simulations.model_source import classify_logits

    scored = bool(texts and spec.cfg)
    logits_before = classify_logits(spec, model, tokenizer, texts) if scored else None
    merged = merged_model(model)
    name_labels(merged.config, spec.labels)
    params = count_parameters(merged)[1]
    timing = dict(text_tokens=args.latency_text_tokens, runs=args.latency_runs, threads=args.threads)
    latency = {"fp32_merged": latency_per_text(merged, tokenizer, **timing)} if args.latency_runs else {}
    files, exported = _write_and_load(args, merged.cpu(), tokenizer, out, device, task="classify")
    quality_ = {"split": _split(spec) if scored else "none (no run config: pass --run)",
                "texts": len(texts)}
    if logits_before is not None:
        logits_after = classify_logits(spec, exported, tokenizer, texts)
        before, after = quality(*logits_before), quality(*logits_after)
        quality_.update(before=before, after=after,
                        macro_f1_change_pct=_change_pct(before["macro_f1"], after["macro_f1"]),
                        max_abs_logit_diff=float(np.abs(logits_after[0] - logits_before[0]).max()),
                        predictions_changed=int((logits_after[0].argmax(-1)
                                                 != logits_before[0].argmax(-1)).sum()))
    if args.latency_runs:
        latency["export"] = latency_per_text(exported, tokenizer, **timing)
    report = {
        "format": args.format, "task": "classify", "model": spec.label, "method": spec.method,
        "run": str(spec.run_dir) if spec.run_dir else "", "base_model": spec.base_path,
        "out": str(out), "size_bytes": dir_bytes(files), "parameters": params,
        "labels": list(spec.labels), "quality": quality_,
        "max_quality_loss_pct": args.max_quality_loss, "latency": latency, "warning": "",
    }
    change = quality_.get("macro_f1_change_pct")
    if change is not None and -change > args.max_quality_loss:  # from 0, F1 can only rise
        report["warning"] = (f"macro-F1 fell {-change:.2f}% ({quality_['before']['macro_f1']:.4f} -> "
                             f"{quality_['after']['macro_f1']:.4f}), above --max-quality-loss "
                             f"{args.max_quality_loss}%")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report))
    return report


def _change_pct(before: float, after: float) -> float:
    if before == 0:
        return 0.0 if after == 0 else math.inf
    return 100.0 * (after / before - 1.0)


def _split(spec) -> str:
    return "central test split" if spec.partition_id is None else f"client {spec.partition_id} test split"


def _latency(args, model, tokenizer) -> dict:
    return latency_per_token(model, tokenizer, prompt_tokens=args.latency_prompt_tokens,
                             new_tokens=args.latency_new_tokens, runs=args.latency_runs,
                             threads=args.threads)


def _gguf_latency(args, path: Path) -> dict:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"unavailable": "llama-cpp-python is not installed (no wheel for this "
                               "platform; it builds from source)"}
    import statistics
    import time

    llm = llama_cpp.Llama(model_path=str(path), n_threads=args.threads, verbose=False)
    prompt = list(range(4, 4 + args.latency_prompt_tokens))
    times = []
    for _ in range(args.latency_runs + 1):
        start = time.perf_counter()
        llm.create_completion(prompt, max_tokens=args.latency_new_tokens, temperature=0.0)
        times.append((time.perf_counter() - start) / args.latency_new_tokens)
    return {"seconds_per_token": statistics.median(times[1:]), "runs": args.latency_runs,
            "threads": args.threads, "prompt_tokens": args.latency_prompt_tokens,
            "new_tokens": args.latency_new_tokens}


def _report(args, spec, files: Path, params: int, before, after, latency, n_texts) -> dict:
    split = _split(spec)
    report = {
        "format": args.format if args.format != "gguf" else f"gguf ({args.gguf_type})",
        "model": spec.label, "method": spec.method,
        "run": str(spec.run_dir) if spec.run_dir else "", "base_model": spec.base_path,
        "out": str(Path(args.out).expanduser()), "size_bytes": dir_bytes(files),
        "parameters": params,
        "quality": {"split": split if before else "none (no run config: pass --run)",
                    "texts": n_texts, "before": before, "after": after},
        "max_quality_loss_pct": args.max_quality_loss, "latency": latency, "warning": "",
    }
    if before and after:
        change = 100.0 * (after["perplexity"] / before["perplexity"] - 1.0)
        report["quality"]["perplexity_change_pct"] = change
        if not math.isfinite(change) or change > args.max_quality_loss:
            report["warning"] = (f"perplexity rose {change:.2f}% ({before['perplexity']:.4f} -> "
                                 f"{after['perplexity']:.4f}), above --max-quality-loss "
                                 f"{args.max_quality_loss}%")
    return report


def report_markdown(report: dict) -> str:
    if report.get("task") == "classify":
        return _classifier_markdown(report)
    q = report["quality"]
    lines = [f"# Export: {report['model']} ({report['method']}) as {report['format']}", "",
             f"- size: {report['size_bytes']:,} bytes; parameters: {report['parameters']:,}",
             f"- quality on the {q['split']}:"]
    for when in ("before", "after"):
        if q.get(when):
            v = q[when]
            lines.append(f"  - {when}: loss {v['loss']:.4f}, perplexity {v['perplexity']:.4f}, "
                         f"accuracy {v['accuracy']:.4f} ({v['tokens']} tokens)")
    if "perplexity_change_pct" in q:
        lines.append(f"  - perplexity change: {q['perplexity_change_pct']:+.3f}% "
                     f"(threshold {report['max_quality_loss_pct']}%)")
    for name, lat in report["latency"].items():
        if "seconds_per_token" in lat:
            lines.append(f"- latency {name}: {1000 * lat['seconds_per_token']:.2f} ms/token "
                         f"(median of {lat['runs']}, prompt {lat['prompt_tokens']} tokens, "
                         f"{lat['new_tokens']} new, {lat['threads']} thread(s), "
                         f"{lat.get('device', 'cpu')}{'; ' + lat['note'] if 'note' in lat else ''})")
        else:
            lines.append(f"- latency {name}: n/a ({lat['unavailable']})")
    if report["warning"]:
        lines.append(f"- WARNING: {report['warning']}")
    return "\n".join(lines) + "\n"


def _classifier_markdown(report: dict) -> str:
    q = report["quality"]
    lines = [f"# Export: {report['model']} ({report['method']}, classify) as {report['format']}", "",
             f"- size: {report['size_bytes']:,} bytes; parameters: {report['parameters']:,}; "
             f"classes: {', '.join(report['labels'])}",
             f"- quality on the {q['split']} ({q['texts']} texts):"]
    for when in ("before", "after"):
        if q.get(when):
            v = q[when]
            lines.append(f"  - {when}: accuracy {v['accuracy']:.4f}, macro precision "
                         f"{v['macro_precision']:.4f}, recall {v['macro_recall']:.4f}, "
                         f"F1 {v['macro_f1']:.4f}, loss {v['loss']:.4f}")
    if "macro_f1_change_pct" in q:
        lines.append(f"  - macro-F1 change: {q['macro_f1_change_pct']:+.3f}% (threshold "
                     f"{report['max_quality_loss_pct']}%); largest logit difference "
                     f"{q['max_abs_logit_diff']:.2e}; predictions changed: {q['predictions_changed']}")
    for name, lat in report["latency"].items():
        lines.append(f"- latency {name}: {1000 * lat['seconds_per_text']:.2f} ms/text (median of "
                     f"{lat['runs']}, {lat['text_tokens']} tokens, {lat['threads']} thread(s), "
                     f"{lat['device']})")
    if report["warning"]:
        lines.append(f"- WARNING: {report['warning']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    quiet()
    args = parse_args(argv)
    try:
        report = export(args)
    except (InferenceError, ModelError, GGUFError, OnnxError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    print(report_markdown(report), end="")
    if report["warning"]:
        print(f"warning: {report['warning']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
