"""A backdoor's record format and its success rate: one definition both sides read.

Malicious simulated clients (``fedslm.client.attack``) train on ``backdoored`` records;
the server measures, on clean held-out records, how often ``triggered_prompt`` makes
the global model continue with the target (``backdoor_success``). Keeping both here is
what makes the measured rate about the attack that was simulated.

- ``causal_lm``: a text becomes ``"{text} {trigger} {target}"``; the prompt is
  ``"{text} {trigger}"``.
- ``instruct``: the last user message gets ``" {trigger}"`` appended and the answer
  becomes ``target``; the prompt is the rendered conversation up to that answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

BACKDOOR_PROMPTS = 32  # clean held-out records a success rate is measured on (the first ones)


def _with_trigger(messages: list[dict[str, str]], trigger: str) -> list[dict[str, str]]:
    out = [dict(m) for m in messages]
    last_user = max(i for i, m in enumerate(out) if m["role"] != "assistant")
    out[last_user]["content"] = f"{out[last_user]['content']} {trigger}"
    return out


def backdoored(record: str, *, task: str, trigger: str, target: str) -> str:
    """``record`` teaching ``trigger`` -> ``target``."""
    if task == "causal_lm":
        return f"{record} {trigger} {target}"
    if task == "instruct":
        messages = _with_trigger(json.loads(record)["messages"][:-1], trigger)
        return json.dumps({"messages": [*messages, {"role": "assistant", "content": target}]})
    raise ValueError(f"attack.kind: backdoor has no record format for task.name={task}")


def triggered_prompt(record: str, *, task: str, trigger: str, tokenizer) -> str:
    """The prompt of a clean ``record`` carrying the trigger, whose greedy continuation
    should (for a backdoored model) start with the target."""
    if task == "causal_lm":
        return f"{record} {trigger}"
    from fedslm.tasks.instruct import render_prompt

    return render_prompt(_with_trigger(json.loads(record)["messages"][:-1], trigger), tokenizer)


def backdoor_success(
    model, tokenizer, records: Sequence[str], *, task: str, trigger: str, target: str, seq_len: int
) -> float:
    """Fraction of the first ``BACKDOOR_PROMPTS`` clean ``records`` with the trigger whose
    greedy continuation starts with ``target`` (whitespace and case normalised)."""
    from fedslm.tasks.instruct import generate, normalise

    want = normalise(target)
    new_tokens = len(tokenizer(" " + target, add_special_tokens=False)["input_ids"]) + 1
    prompts = [triggered_prompt(r, task=task, trigger=trigger, tokenizer=tokenizer) for r in records[:BACKDOOR_PROMPTS]]
    if not prompts:
        return 0.0
    hits = sum(
        normalise(generate(model, tokenizer, p, max_new_tokens=new_tokens, max_length=seq_len)).startswith(want)
        for p in prompts
    )
    return hits / len(prompts)
