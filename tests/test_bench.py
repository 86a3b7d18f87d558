"""Every benchmark runs on a tiny setting and writes the figures it promises.

Smoke tests, not timed tests: they check what was measured (exact byte counts, the
sampled clients, the engine's own byte accounting), never how fast it was.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedslm.compression import RESIDUAL_FILE

from fedslm.simulations.bench.__main__ import BENCHMARKS, main


def run(name: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert main([name, *args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_cli_lists_every_benchmark_and_rejects_an_unknown_one(capsys) -> None:
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in BENCHMARKS)
    assert set(BENCHMARKS) == {"overhead", "dp", "comm", "scale", "throughput", "tasks", "audit",
                               "aggregation", "secagg", "fuzz", "robustness", "geometry", "realsize",
                               "export", "sweep"}
    assert main(["latency"]) == 2
    assert "unknown benchmark 'latency'" in capsys.readouterr().err


def test_throughput_tiny_measures_both_loops(tmp_path: Path) -> None:
    result = run("throughput", tmp_path, "--tiny")
    assert result["setting"]["steps"] == 3 and result["setting"]["reps"] == 2
    for per_second in (result["tokens_per_second"], result["tokens_per_cpu_second"]):
        assert len(per_second["ours"]) == len(per_second["hand_written"]) == 2
        assert all(v > 0 for v in per_second["ours"] + per_second["hand_written"])
    assert result["ratio"] > 0 and result["target"] == 0.95


def test_comm_counts_exact_bytes_for_full_lora_and_compressed_updates(tmp_path: Path) -> None:
    result = run("comm", tmp_path, "--quality", "")
    up = {row["update"]: row["up_bytes"] for row in result["bytes"]}
    params = {row["update"]: row["params"] for row in result["bytes"]}
    header = 128  # one npy header per tensor
    # builtin tiny Llama: 164,672 parameters in 20 tensors (embeddings tied: counted once)
    assert params["full fine-tuning"] == 164_672
    assert up["full fine-tuning"] == 164_672 * 4 + 20 * header
    for r in (4, 8, 16):
        n = 2 * 2 * (64 * r + r * 64)  # q_proj and v_proj, 2 layers, A and B
        assert params[f"LoRA r={r}"] == n
        assert up[f"LoRA r={r}"] == 4 * n + 8 * header
        assert up[f"LoRA r={r} fp16 delta"] == 2 * n + header
        assert up[f"LoRA r={r} int8 delta"] == n + header + 8 * 4 + header
        assert up[f"LoRA r={r} int4 delta"] == n // 2 + header + 8 * 4 + header
    assert result["quality"] == []


@pytest.mark.e2e
def test_comm_tiny_measures_the_compressed_uplink_on_the_engine(tmp_path: Path) -> None:
    result = run("comm", tmp_path, "--tiny")
    static = {row["update"]: row["up_bytes"] for row in result["bytes"]}
    (int4,) = result["quality"]
    assert int4["compression"] == "int4" and math.isfinite(int4["eval_perplexity"])
    # the round loop's own accounting of the compressed uplink equals the static count
    assert int4["engine_up_bytes_per_client"] == static["LoRA r=8 int4 delta"] == 2336
    assert "ppl_cost" not in int4  # no uncompressed run to compare with in --tiny
    clients = Path(int4["output_dir"]) / "clients"
    residuals = sorted(str(p.relative_to(clients)) for p in clients.glob(f"*/{RESIDUAL_FILE}"))
    assert residuals == [f"0/{RESIDUAL_FILE}", f"1/{RESIDUAL_FILE}"]  # error feedback, one per client


@pytest.mark.e2e
def test_overhead_tiny_compares_engine_and_baseline(tmp_path: Path) -> None:
    result = run("overhead", tmp_path, "--tiny")
    assert result["setting"] == {"clients": 2, "rounds": 2, "local_steps": 2, "client_num_cpus": 1,
                                 "engine_workers": 1, "warm_engine": False}
    ratios = result["ratios"]
    assert set(ratios) == {"total", "steady", "cpu_total", "cpu_steady", "cpu_steady_clients",
                           "cpu_steady_server"}
    # a tiny round lasts ~0.3 s, about one CPU sample: only whole-run and wall ratios are
    # reliably positive here; the per-round CPU split needs the default setting
    assert ratios["total"] > 0 and ratios["steady"] > 0 and ratios["cpu_total"] > 0
    assert sorted(result["engine"]["round_seconds"]) == ["1", "2"]
    (baseline,) = result["baseline_runs"]
    assert sorted(baseline["round_seconds"]) == ["0", "1", "2"]
    # same training on both sides: final losses agree up to dropout draws
    assert abs(result["engine"]["final"]["eval_loss"] - baseline["final"]["eval_loss"]) < 0.05


@pytest.mark.e2e
def test_scale_tiny_samples_ten_of_a_hundred_clients_on_ten_supernodes(tmp_path: Path) -> None:
    result = run("scale", tmp_path, "--tiny")
    (row,) = result["rows"]
    assert (row["clients"], row["supernodes"], row["sampled"]) == (100, 10, 10)
    assert row["peak_rss_mib"] > 0 and row["s_per_round"] > 0
    assert {"superlink", "simulation", "ray workers"} <= set(row["peak_rss_by_component_mib"])


def _engine_run(round_end: dict[int, float], round_seconds: dict[int, float]):
    from fedslm.simulations.bench.common import EngineRun, TreeSample

    rows = [{"round": r, "round_seconds": s} for r, s in round_seconds.items()]
    return EngineRun({"rounds": rows}, wall=20.0, engine_ready=1.0, rounds_start=5.0,
                     round_end=round_end, finished=19.0, tree=TreeSample())


def test_steady_window_spans_the_streamed_round_lines_after_round_one() -> None:
    run = _engine_run({0: 8.0, 1: 10.0, 2: 12.5, 3: 15.0}, {1: 1.8, 2: 2.0, 3: 2.1})
    assert run.steady_window() == (10.0, 15.0, 2)  # bookkeeping between rounds included


def test_steady_window_is_never_shorter_than_the_servers_own_round_timings() -> None:
    # rounds 1-3 streamed in one chunk: the server's 2.0 + 2.1 s say how long they took
    run = _engine_run({0: 8.0, 1: 15.0, 2: 15.0, 3: 15.0}, {1: 1.8, 2: 2.0, 3: 2.1})
    start, end, rounds = run.steady_window()
    assert (round(start, 6), end, rounds) == (10.9, 15.0, 2)


def test_no_steady_window_when_a_round_timing_is_missing() -> None:
    run = _engine_run({0: 8.0, 1: 10.0, 2: 12.5, 3: 15.0}, {1: 1.8, 3: 2.1})
    assert run.steady_window() == (0.0, 0.0, 0)


def test_audit_bench_settings_are_valid_experiments_and_rows_read_the_report() -> None:
    import argparse

    from fedslm.simulations.bench.audit import personal_row_of, row_of, setting_overrides
    from fedslm.simulations.bench.common import experiment

    args = argparse.Namespace(clients=3, rounds=2, steps=4, docs=8, test_fraction=0.5, canaries=1,
                              candidates=63, shakespeare="", mia_records=100, heterogeneity=None,
                              num_topics=None, mode="dp_sgd")
    cfg = experiment(setting_overrides(args, 2.0), run_name="audit-test")
    assert (cfg.privacy.mode, cfg.privacy.noise_multiplier, cfg.privacy.audit) == ("dp_sgd", 2.0, True)
    assert cfg.audit.canary_clients == [0, 1, 2] and cfg.audit.candidates == 63
    assert cfg.data.test_fraction == 0.5
    assert experiment(setting_overrides(args, None), run_name="audit-test").privacy.mode == "none"
    audit = {"audit_mia_loss_auc": 0.5, "audit_mia_calibrated_auc": 0.6,
             "audit_mia_loss_tpr_at_1pct_fpr": 0.0, "audit_mia_calibrated_tpr_at_1pct_fpr": 0.1,
             "audit_eps_lower_bound": 0.0, "audit_exposure_rep16": 3.0}
    row = row_of({"audit": audit, "utility": {"eval_perplexity": 8.0}, "delta": 1e-3,
                  "epsilon_sample_level": 4.0}, "z=2")
    assert (row["epsilon"], row["exp@16"], row["auc_cal"], row["ppl"]) == (4.0, 3.0, 0.6, 8.0)
    assert row_of({"audit": audit, "utility": {}, "delta": 1e-5}, "none")["epsilon"] == math.inf
    # --mode dp_fedavg: user-level noise, and the row reads the user-level epsilon
    args.mode = "dp_fedavg"
    cfg = experiment(setting_overrides(args, 3.0), run_name="audit-test")
    assert (cfg.privacy.mode, cfg.privacy.noise_multiplier) == ("dp_fedavg", 3.0)
    assert row_of({"audit": audit, "utility": {}, "delta": 0.01, "epsilon_user_level": 4.4},
                  "dp_fedavg z=3")["epsilon"] == 4.4
    args.mode = "dp_sgd"
    # --personalization: each setting once per method; the row adds the personal figures
    args.heterogeneity, args.canaries, args.num_topics = 1.0, 0, 7
    cfg = experiment(setting_overrides(args, 1.1, "split"), run_name="audit-test")
    assert (cfg.personalization.method, cfg.data.heterogeneity, cfg.audit.canaries) == ("split", 1.0, 0)
    assert cfg.data.num_topics == 7
    personal = {**audit, "audit_mia_personal_loss_auc": 0.55, "audit_mia_personal_calibrated_auc": 0.7,
                "audit_mia_personal_calibrated_tpr_at_1pct_fpr": 0.05, "audit_eps_lower_bound_personal": 0.9,
                "audit_mia_personal_clients": 3}
    row = personal_row_of({"audit": personal, "utility": {}, "delta": 1e-3, "epsilon_sample_level": 7.5},
                          {"global_perplexity_mean": 9.0, "personal_perplexity_mean": 7.5, "gain_mean": 16.0,
                           "gain_sem": 3.0}, "dp_sgd z=1.1", "split")
    assert (row["method"], row["epsilon"], row["gain"], row["gain_sem"], row["personal_ppl"]) == (
        "split", 7.5, 16.0, 3.0, 7.5)
    assert (row["p_auc_cal"], row["p_tpr1%_cal"], row["p_eps_lb"], row["p_clients"]) == (0.7, 0.05, 0.9, 3)


def test_tasks_tiny_compares_federated_and_centralized_per_task(tmp_path: Path) -> None:
    result = run("tasks", tmp_path, "--tiny")
    rows = {r["setting"]: r for r in result["comparison"]}
    assert set(rows) == {"synthetic-causal_lm-iid", "synthetic-classify-iid",
                         "synthetic-classify-skew", "synthetic-instruct-iid"}
    assert {rows[k]["metric"] for k in rows} == {"perplexity", "macro_f1"}
    assert all(r["federated"] is not None and r["centralized"] is not None for r in rows.values())
    assert "personal_gain_mean" in rows["synthetic-classify-skew"]
    assert [c["task"] for c in result["step_cost"]] == ["causal_lm", "instruct", "classify"]
    assert result["step_cost"][0]["vs_causal_lm"] == 1.0


def test_fuzz_bench_runs_a_few_cases_and_finds_nothing_unexpected(tmp_path: Path, capsys) -> None:
    out = tmp_path / "fuzz.json"
    assert main(["fuzz", "--cases", "60", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cases"] == 60 and result["unexpected"] == 0 and result["replies"] >= 180
    assert main(["fuzz", "--cases", "0"]) == 2


@pytest.mark.parametrize("dp", ["", "hooks", "ghost"])
def test_realsize_loops_train_the_lora_weights_on_fixed_batches(dp: str) -> None:
    """The realsize bench's like-for-like DP row: FedSLM's private setup (Opacus clipping and
    noise) on the same fixed batches as the other loops, timed in wall and CPU seconds."""
    import torch

    from fedslm.config import ModelConfig
    from fedslm.simulations.bench.realsize import batches, build, fedslm_loop

    model = build(ModelConfig().name_or_path, ["auto"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    timing = fedslm_loop(model, batches(6, 16), batch_size=2, dp=dp)
    assert timing.wall > 0 and timing.cpu > 0
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
