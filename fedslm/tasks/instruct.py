"""``instruct``: instruction / chat tuning with the loss on response tokens only.

A record is ``{"messages": [{"role": ..., "content": ...}, ...]}`` ending with the
assistant's response; Alpaca-style rows (``instruction``, ``input``, ``output``) become a
user message (instruction, a blank line, input) and the assistant's output. The prompt
is every message before the last one, rendered with the tokenizer's own chat template
(``apply_chat_template(..., add_generation_prompt=True)``) when it has one, else with
``DEFAULT_TEMPLATE``; the response is the last message's content followed by eos.
Labels are -100 on prompt and pad positions and the token ids on the response.

Evaluation: response loss/perplexity on the test split, and on a bounded sample
(``task.eval_generations`` records, ``task.max_new_tokens``) greedy generations scored
with ROUGE-L (Google's ``rouge-score``) and exact match. Clients send sums and counts;
only the server's central evaluation keeps (prompt, reference, generated) examples, from
its own held-out split, never from a client's data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

from fedslm.tasks.base import IGNORE_INDEX, Batch, Metrics, Record, Task, pad_right
from fedslm.tasks.causal_lm import per_example_token_loss, token_ghost_inputs, token_statistics
from fedslm.tasks.registry import register_task

# Used when the tokenizer has no chat template (the builtin one has none).
DEFAULT_TEMPLATE = "### {role}:\n{content}\n\n"
RESPONSE_HEADER = "### Assistant:\n"
ROLE_NAMES = {"system": "System", "user": "Instruction", "assistant": "Assistant"}


def messages_of(record: Record) -> list[dict[str, str]]:
    return json.loads(record)["messages"]


def render_prompt(messages: Sequence[dict[str, str]], tokenizer: Any) -> str:
    """The text before the response: chat template with a generation prompt, or the default."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    parts = [DEFAULT_TEMPLATE.format(role=ROLE_NAMES.get(m["role"], m["role"].title()),
                                     content=m["content"]) for m in messages]
    return "".join(parts) + RESPONSE_HEADER


def encode_example(messages: Sequence[dict[str, str]], tokenizer: Any, *,
                   seq_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one conversation; the prompt is cut from the left if the
    whole does not fit, keeping at least half of ``seq_len`` for the response."""
    prompt = tokenizer(render_prompt(messages[:-1], tokenizer), add_special_tokens=False,
                       verbose=False)["input_ids"]
    response = tokenizer(messages[-1]["content"], add_special_tokens=False, verbose=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    response = response[: max(1, seq_len - min(len(prompt), seq_len // 2))]
    prompt = prompt[max(0, len(prompt) - (seq_len - len(response))):]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


class Instruct(Task):
    name = "instruct"
    peft_task_type = "CAUSAL_LM"
    headline = "perplexity"
    higher_is_better = False
    report_keys = ("perplexity", "rouge_l")

    def check(self, cfg) -> None:
        from fedslm.config import ConfigError

        if cfg.data.source == "shakespeare":
            raise ConfigError("task.name: instruct needs (instruction, output) records or chat "
                              "messages; data.source=shakespeare is plain text")

    # --- data -----------------------------------------------------------------------
    def dataset_records(self, dataset, data, *, where: str):
        from fedslm.data.core import DataError

        cols = dataset.column_names
        if data.messages_key in cols:
            records = [_from_messages(m, where=where, key=data.messages_key) for m in dataset[data.messages_key]]
        elif data.instruction_key in cols and data.output_key in cols:
            inputs = dataset[data.input_key] if data.input_key in cols else [""] * len(dataset)
            records = [_from_alpaca(i, x, o) for i, x, o in
                       zip(dataset[data.instruction_key], inputs, dataset[data.output_key])]
        else:
            raise DataError(f"data.instruction_key: {where} has neither a {data.messages_key!r} column "
                            f"(chat messages) nor {data.instruction_key!r} and {data.output_key!r} "
                            f"columns (columns: {', '.join(cols) or 'none'})")
        keep = [i for i, r in enumerate(records) if r is not None]
        if not keep:
            raise DataError(f"data.output_key: no record in {where} has a non-empty response")
        dataset = dataset.select(keep) if len(keep) < len(dataset) else dataset
        if "text" in dataset.column_names:
            dataset = dataset.remove_columns("text")
        return dataset.add_column("text", [records[i] for i in keep])

    def synthetic_records(self, documents, data, *, stream: str) -> tuple[Record, ...]:
        from fedslm.data.synthetic import TOPIC_NAMES

        rng = random.Random(f"fedslm-instruct:{stream}")
        out = []
        for text, topic in documents:
            sentences = [s.strip() + "." for s in text.replace("!", ".").replace("?", ".").split(".") if s.strip()]
            kind = rng.randrange(3)
            if kind == 0:
                q, x, a = "What is this text about?", sentences[0], f"It is about the {TOPIC_NAMES[topic]}."
            elif kind == 1:
                q, x, a = f"Write a sentence about the {TOPIC_NAMES[topic]}.", "", sentences[0]
            else:
                q, x, a = "Continue the text.", sentences[0], sentences[1] if len(sentences) > 1 else sentences[0]
            out.append(_from_alpaca(q, x, a))
        return tuple(r for r in out if r is not None)

    def encode(self, records: Sequence[Record], tokenizer: Any, cfg) -> Batch:
        pairs = [encode_example(messages_of(r), tokenizer, seq_len=cfg.training.seq_len) for r in records]
        length = max(len(ids) for ids, _ in pairs)
        input_ids = pad_right([p[0] for p in pairs], pad=tokenizer.pad_token_id, length=length)
        labels = pad_right([p[1] for p in pairs], pad=IGNORE_INDEX, length=length)
        return input_ids, labels

    # --- loss -----------------------------------------------------------------------
    def loss(self, model, batch: Batch):
        ids, labels = batch
        return model(input_ids=ids, labels=labels).loss

    def per_example_loss(self, model, batch: Batch):
        ids, labels = batch
        return per_example_token_loss(model, ids, labels)

    def ghost_inputs(self, model, batch: Batch):
        ids, labels = batch
        return token_ghost_inputs(model, ids, labels)

    # --- evaluation -----------------------------------------------------------------
    def evaluate(self, model, tensors: Batch, *, batch_size: int, max_batches: int = 0) -> Metrics:
        ids, labels = tensors
        return token_statistics(model, ids, labels, batch_size=batch_size, max_batches=max_batches)

    def generation_metrics(self, model, records, tokenizer, cfg) -> tuple[Metrics, list[dict[str, str]]]:
        """Greedy generations on the first ``task.eval_generations`` records."""
        from rouge_score import rouge_scorer

        sample = list(records)[: cfg.task.eval_generations]
        if not sample:
            return {}, []
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        examples, rouge_sum, exact_sum = [], 0.0, 0
        for record in sample:
            messages = messages_of(record)
            prompt = render_prompt(messages[:-1], tokenizer)
            generated = generate(model, tokenizer, prompt, max_new_tokens=cfg.task.max_new_tokens,
                                 max_length=cfg.training.seq_len)
            reference = messages[-1]["content"]
            rouge_sum += scorer.score(reference, generated)["rougeL"].fmeasure
            exact_sum += int(normalise(generated) == normalise(reference))
            examples.append({"prompt": prompt, "reference": reference, "generated": generated})
        n = len(sample)
        return ({"rouge_l": rouge_sum / n, "exact_match": exact_sum / n, "rouge_l_sum": rouge_sum,
                 "exact_match_sum": exact_sum, "generated": n}, examples)

    def pooled(self, rows: Sequence[dict[str, Any]], names=None) -> dict[str, float]:
        gen = [r for r in rows if r.get("generated")]
        total = sum(int(r["generated"]) for r in gen)
        if not total:
            return {}
        return {"rouge_l": sum(float(r["rouge_l_sum"]) for r in gen) / total,
                "exact_match": sum(float(r["exact_match_sum"]) for r in gen) / total}


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int, max_length: int) -> str:
    """Greedy continuation of ``prompt`` (cut from the left to fit ``max_length``)."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids[:, -max(1, max_length - max_new_tokens):].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:].cpu(), skip_special_tokens=True).strip()


def _from_alpaca(instruction: Any, inputs: Any, output: Any) -> str | None:
    instruction, inputs, output = (str(v).strip() if v is not None else "" for v in (instruction, inputs, output))
    if not output or not instruction:
        return None
    user = f"{instruction}\n\n{inputs}" if inputs else instruction
    return json.dumps({"messages": [{"role": "user", "content": user},
                                    {"role": "assistant", "content": output}]})


def _from_messages(messages: Any, *, where: str, key: str) -> str | None:
    from fedslm.data.core import DataError

    if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"data.messages_key: {key!r} in {where} must hold lists of "
                        "{role, content} messages")
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        return None
    return json.dumps({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})


register_task(Instruct())
