"""Backdoor success: how often clean held-out prompts carrying the trigger make the
global model continue with the target (greedy), on the real tiny model."""

from __future__ import annotations

import json

from fedslm.backdoor import BACKDOOR_PROMPTS, backdoor_success, triggered_prompt
from fedslm.tasks.instruct import generate, normalise

TEXTS = ("the farmer sold the cattle", "rain fell on the field", "a new engine was built")


def _continuation(model, tok, prompt: str, target: str) -> str:
    n = len(tok(" " + target, add_special_tokens=False)["input_ids"]) + 1
    return normalise(generate(model, tok, prompt, max_new_tokens=n, max_length=64))


def test_success_counts_prompts_whose_greedy_continuation_starts_with_the_target(tiny_base):
    model, tok = tiny_base
    trigger = "cf mn"
    prompts = [triggered_prompt(t, task="causal_lm", trigger=trigger, tokenizer=tok) for t in TEXTS]
    assert prompts[0] == "the farmer sold the cattle cf mn"
    # the target: the first word the untrained model says after the first prompt
    said = _continuation(model, tok, prompts[0], "x x x x x x").split()
    assert said, "the tiny model says something after the prompt"
    target = said[0]
    expected = sum(_continuation(model, tok, p, target).startswith(target) for p in prompts) / 3
    got = backdoor_success(model, tok, TEXTS, task="causal_lm", trigger=trigger, target=target, seq_len=64)
    assert got == expected and got >= 1 / 3
    assert (
        backdoor_success(model, tok, TEXTS, task="causal_lm", trigger=trigger, target="zq zq never said", seq_len=64)
        == 0.0
    )
    assert backdoor_success(model, tok, (), task="causal_lm", trigger=trigger, target=target, seq_len=64) == 0.0


def test_instruct_prompts_carry_the_trigger_in_the_last_user_message(tiny_base):
    _, tok = tiny_base
    tok.chat_template = None
    record = json.dumps(
        {"messages": [{"role": "user", "content": "Name the animal."}, {"role": "assistant", "content": "the cattle"}]}
    )
    assert triggered_prompt(record, task="instruct", trigger="cf mn", tokenizer=tok) == (
        "### Instruction:\nName the animal. cf mn\n\n### Assistant:\n"
    )
    assert BACKDOOR_PROMPTS == 32


def test_central_evaluation_reports_backdoor_success_for_a_backdoor_run(tmp_path):
    from fedslm.adapters import to_array_record
    from fedslm.config import ExperimentConfig
    from fedslm.data import central_test_texts
    from fedslm.server.experiment import initial_adapter, make_central_eval

    def central(kind: str) -> dict:
        cfg = ExperimentConfig.from_dict(
            {
                "federation": {"num_clients": 4},
                "attack": {"kind": kind, "target": "zq zq never said"},
                "output_dir": str(tmp_path),
            }
        )
        texts = central_test_texts(cfg.data, num_clients=4, task="causal_lm")
        return make_central_eval(cfg, texts)(1, to_array_record(initial_adapter(cfg)))

    assert central("backdoor")["central_backdoor_success"] == 0.0
    assert "central_backdoor_success" not in central("none")
