"""``python -m fedslm.simulations.audit --run <output dir>``: audit a finished run's global adapter.

Reads the run's ``config.json``, ``adapter/`` and ``rounds.csv``, regenerates every
client's texts from the config (simulation only), attacks the personal adapters the
clients left in ``clients/`` (runs with personalization), and writes the same privacy report as
``privacy.audit=true`` does at the end of a run (``fedslm.server.audit``): into the output dir
and, when the run was tracked, into its MLflow run (``summary.json`` names it). Only a
run trained with ``privacy.audit=true`` has canaries; for any other run the audit
reports membership inference alone. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class AuditInputError(ValueError):
    pass


def load_run(run_dir: Path):
    """(config, final global adapter arrays) of a finished run, or AuditInputError."""
    from safetensors.numpy import load_file

    from fedslm.adapters import ADAPTER_WEIGHTS_FILE
    from fedslm.config import ConfigError, ExperimentConfig

    for needed in ("config.json", f"adapter/{ADAPTER_WEIGHTS_FILE}", "rounds.csv"):
        if not (run_dir / needed).is_file():
            raise AuditInputError(f"--run: {run_dir} has no {needed} (give the output dir of a "
                                  "finished run)")
    try:
        data = json.loads((run_dir / "config.json").read_text())
        data["output_dir"] = str(run_dir.resolve())
        cfg = ExperimentConfig.from_dict(data)
    except (json.JSONDecodeError, ConfigError) as err:
        raise AuditInputError(f"--run: {run_dir / 'config.json'}: {err}") from err
    if cfg.federation.engine != "simulation":
        raise AuditInputError("--run: the audit needs a simulation run (it regenerates the "
                              "clients' texts, which on real devices never leave them)")
    try:
        arrays = load_file(str(run_dir / "adapter" / ADAPTER_WEIGHTS_FILE))
    except Exception as err:  # safetensors raises its own error types
        raise AuditInputError(f"--run: cannot read {run_dir / 'adapter'}: {err}") from err
    return cfg, arrays


def tracker_for(run_dir: Path, cfg):
    """The run's own MLflow run, reopened, or None if it was not tracked."""
    summary_path = run_dir / "summary.json"
    if not cfg.tracking.enabled or not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    if not summary.get("mlflow_run_id") or not summary.get("mlflow_uri"):
        return None
    import dataclasses

    from fedslm.server.tracking import Tracker

    uri = summary["mlflow_uri"]
    tracker = Tracker(dataclasses.replace(cfg.tracking, uri=uri), default_uri=uri)
    tracker.run_id = summary["mlflow_run_id"]
    return tracker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="output dir of a finished run")
    parser.add_argument("--no-tracking", action="store_true", help="write files only")
    args = parser.parse_args(argv)
    from fedslm.adapters import AdapterError
    from fedslm.server.audit import audit_and_report, report_markdown

    try:
        cfg, arrays = load_run(args.run)

        tracker = None if args.no_tracking else tracker_for(args.run, cfg)
        report = audit_and_report(cfg, args.run, arrays, tracker)
    except (AuditInputError, AdapterError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report_markdown(report))
    print(f"Report: {args.run / 'privacy_report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
