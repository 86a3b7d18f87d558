"""Using a finished run's models: each export format's size, quality and CPU latency, and
the best-gaining client's personal model against the global one on that client's split.

    python -m fedslm.simulations.bench export --run outputs/runs/<date>/<time> \\
        --formats hf,int8,gguf,onnx --latency-runs 9
    python -m fedslm.simulations.bench export --run <a personalized run> --best-client --formats ""
    python -m fedslm.simulations.bench export --run <a task=classify run> --formats hf,int8,onnx
    python -m fedslm.simulations.bench export --fresh-model builtin:shape:smollm2-135m \\
        --eval-max-batches 2 --formats hf,int8,gguf --latency-runs 3

Every row is ``fedslm.simulations.export`` run into a temporary dir (the same code and
report as the CLI). ``--best-client`` scores every client's personal model and the
global model on that client's own test split (``fedslm.simulations.model_source``, as the
clients score), picks the client whose personal model gains most, and exports both of
its models in each format (causal-LM runs: its gain is in perplexity). A classify run's
rows give accuracy and macro-F1 before and after, and milliseconds per text.
Prints a table; writes JSON (default outputs/bench/export.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fedslm.inference import InferenceError


def export_row(run: str, fmt: str, *, client: int | None, args: argparse.Namespace) -> dict:
    from fedslm.simulations import export as export_cli

    with tempfile.TemporaryDirectory(prefix="fedslm-bench-export-") as tmp:
        argv = [
            "--run",
            run,
            "--format",
            fmt,
            "--out",
            str(Path(tmp) / fmt),
            "--latency-runs",
            str(args.latency_runs),
            "--threads",
            str(args.threads),
        ]
        argv += ["--client", str(client)] if client is not None else []
        report = export_cli.export(export_cli.parse_args(argv))
    q, lat = report["quality"], report["latency"]
    if report.get("task") == "classify":
        return classify_row(report)
    return {
        "model": report["model"],
        "format": report["format"],
        "size_bytes": report["size_bytes"],
        "parameters": report["parameters"],
        "split": q["split"],
        "ppl_before": q["before"]["perplexity"],
        "ppl_after": q["after"]["perplexity"],
        "change_pct": q["perplexity_change_pct"],
        "accuracy_after": q["after"]["accuracy"],
        "ms_per_token": {
            k: (1000 * v["seconds_per_token"] if "seconds_per_token" in v else None) for k, v in lat.items()
        },
        "warning": report["warning"],
    }


def classify_row(report: dict) -> dict:
    """A classify model's row: accuracy / macro-F1 before and after, ms per text."""
    q, lat = report["quality"], report["latency"]
    return {
        "model": report["model"],
        "task": "classify",
        "format": report["format"],
        "size_bytes": report["size_bytes"],
        "parameters": report["parameters"],
        "split": q["split"],
        "texts": q["texts"],
        "before": q["before"],
        "after": q["after"],
        "f1_change_pct": q["macro_f1_change_pct"],
        "max_abs_logit_diff": q["max_abs_logit_diff"],
        "predictions_changed": q["predictions_changed"],
        "ms_per_text": {k: 1000 * v["seconds_per_text"] for k, v in lat.items()},
        "text_tokens": next(iter(lat.values()))["text_tokens"] if lat else None,
        "warning": report["warning"],
    }


def fresh_run(model: str, out: Path, *, eval_max_batches: int) -> Path:
    """A run-shaped dir (``config.json`` + a fresh adapter, LoRA B = 0) for ``model``:
    measures the formats on a base nobody trained (e.g. the realsize shapes) without an
    engine run."""
    from fedslm.adapters import save_adapter
    from fedslm.config import ExperimentConfig
    from fedslm.runtime import model_path
    from fedslm.server.experiment import initial_adapter

    cfg = ExperimentConfig.from_dict(
        {
            "model": {"name_or_path": model},
            "training": {"eval_max_batches": eval_max_batches},
            "output_dir": str(out),
        }
    )
    base = model_path(cfg.model, cfg.data.seed)
    save_adapter(initial_adapter(cfg), cfg.peft, base_model=base, out_dir=out / "adapter")
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    return out


def client_gains(run: str) -> list[dict]:
    """Every client's personal and global perplexity on its own test split, and the gain."""
    from fedslm.simulations.model_source import eval_texts, resolve, score

    glob = resolve(run=run)
    global_model, tokenizer = glob.build()
    rows = []
    for partition in range(glob.cfg.federation.num_clients):
        try:
            spec = resolve(run=run, client=partition)
        except InferenceError:  # never sampled: no personal model
            continue
        texts = eval_texts(spec)
        personal_model, _ = spec.build()
        g = score(spec, global_model, tokenizer, texts)
        p = score(spec, personal_model, tokenizer, texts)
        rows.append(
            {
                "client": partition,
                "global_ppl": g["perplexity"],
                "personal_ppl": p["perplexity"],
                "gain_pct": 100.0 * (1.0 - p["perplexity"] / g["perplexity"]),
                "tokens": g["tokens"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="", help="a finished run's output dir or MLflow run id")
    parser.add_argument(
        "--fresh-model", default="", help="instead of --run: this base with a fresh adapter (no training)"
    )
    parser.add_argument("--eval-max-batches", type=int, default=2, help="--fresh-model: batches scored")
    parser.add_argument("--formats", default="hf,int8,gguf,onnx", help="comma-separated; '' for none")
    parser.add_argument(
        "--best-client", action="store_true", help="also the best-gaining client's personal vs global model"
    )
    parser.add_argument("--latency-runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="outputs/bench/export.json")
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    if bool(args.run) == bool(args.fresh_model):
        print("error: --run or --fresh-model: give exactly one", file=sys.stderr)
        return 2
    if args.fresh_model:
        fresh_dir = tempfile.mkdtemp(prefix="fedslm-bench-fresh-")
        args.run = str(fresh_run(args.fresh_model, Path(fresh_dir), eval_max_batches=args.eval_max_batches))
    result: dict = {"run": args.run, "threads": args.threads, "latency_runs": args.latency_runs}
    if args.fresh_model:
        result["fresh_model"] = args.fresh_model
    try:
        from fedslm.classifier import GGUF_NO_HEAD
        from fedslm.simulations.model_source import resolve

        if resolve(run=args.run).task == "classify":
            if args.best_client:
                raise InferenceError("--best-client: ranks clients by perplexity gain; not for a classify run")
            if "gguf" in formats:  # refused by export: no place for the head in llama's GGUF
                formats.remove("gguf")
                result["not_exported"] = {"gguf": GGUF_NO_HEAD.format(arch="llama")}
        result["global"] = [export_row(args.run, f, client=None, args=args) for f in formats]
        if args.best_client:
            gains = client_gains(args.run)
            if not gains:
                raise InferenceError(f"--best-client: {args.run} has no personal models")
            best = max(gains, key=lambda r: r["gain_pct"])
            result["clients"], result["best_client"] = gains, best
            result["best_client_exports"] = [export_row(args.run, f, client=best["client"], args=args) for f in formats]
    except InferenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


def table(result: dict) -> str:
    lines = []
    rows = result.get("global", []) + result.get("best_client_exports", [])
    if rows and rows[0].get("task") == "classify":
        lines.append(classify_table(rows))
        rows = []
    if rows:
        lines.append(
            f"{'model':<10} {'format':<12} {'bytes':>12} {'ppl before':>10} {'ppl after':>10} "
            f"{'change %':>9} {'ms/tok fp32':>11} {'ms/tok export':>13}"
        )
        for r in rows:
            ms = r["ms_per_token"]
            fp32 = f"{ms['fp32_merged']:.2f}" if ms.get("fp32_merged") is not None else "n/a"
            exp = f"{ms['export']:.2f}" if ms.get("export") is not None else "n/a"
            lines.append(
                f"{r['model']:<10} {r['format']:<12} {r['size_bytes']:>12,} {r['ppl_before']:>10.4f} "
                f"{r['ppl_after']:>10.4f} {r['change_pct']:>+9.3f} {fp32:>11} {exp:>13}"
            )
    if "clients" in result:
        lines.append("")
        lines.append(f"{'client':>6} {'global ppl':>10} {'personal ppl':>12} {'gain %':>8}")
        for r in result["clients"]:
            mark = "  <- best" if r["client"] == result["best_client"]["client"] else ""
            lines.append(
                f"{r['client']:>6} {r['global_ppl']:>10.4f} {r['personal_ppl']:>12.4f} {r['gain_pct']:>+8.2f}{mark}"
            )
    return "\n".join(lines)


def classify_table(rows: list[dict]) -> str:
    lines = [
        f"{'model':<10} {'format':<6} {'bytes':>10} {'acc before':>10} {'acc after':>9} {'F1 before':>9} "
        f"{'F1 after':>8} {'max |dlogit|':>12} {'changed':>7} {'ms/text fp32':>12} {'ms/text export':>14}"
    ]
    for r in rows:
        ms = r["ms_per_text"]
        fp32 = f"{ms['fp32_merged']:.2f}" if "fp32_merged" in ms else "n/a"
        exp = f"{ms['export']:.2f}" if "export" in ms else "n/a"
        lines.append(
            f"{r['model']:<10} {r['format']:<6} {r['size_bytes']:>10,} {r['before']['accuracy']:>10.4f} "
            f"{r['after']['accuracy']:>9.4f} {r['before']['macro_f1']:>9.4f} {r['after']['macro_f1']:>8.4f} "
            f"{r['max_abs_logit_diff']:>12.2e} {r['predictions_changed']:>7} {fp32:>12} {exp:>14}"
        )
    return "\n".join(lines)
