"""The Task interface: label masking, exact pooled classification metrics, what a
classification reply carries, every task through fit/evaluate, task-aware data loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from fedslm.client.task import evaluate, fit
from fedslm.adapters import parameter_role
from fedslm.config import ConfigError, DataConfig, ExperimentConfig
from fedslm.data import DataError, build_federated_texts
from fedslm.tasks import get_task, task_names
from fedslm.tasks.base import IGNORE_INDEX
from fedslm.tasks.classify import CONFUSION, scores_from_confusion
from fedslm.tasks.instruct import encode_example, render_prompt
from fedslm.server.experiment import initial_adapter

MESSAGES = [{"role": "user", "content": "Name the farmer's animal."},
            {"role": "assistant", "content": "the cattle"}]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_the_registry_finds_the_three_tasks():
    assert task_names() == ("causal_lm", "classify", "instruct")
    with pytest.raises(ConfigError, match="^task.name: unknown value 'nope'"):
        get_task("nope")


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE], ids=["default-template", "chat-template"])
def test_instruct_masks_the_prompt_and_keeps_the_response(tiny_base, template):
    _, tok = tiny_base
    tok.chat_template = template
    prompt_text = render_prompt(MESSAGES[:1], tok)
    if template:
        assert prompt_text == "<user>Name the farmer's animal.\n<assistant>"
    else:
        assert prompt_text == "### Instruction:\nName the farmer's animal.\n\n### Assistant:\n"
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    response = tok("the cattle", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, labels = encode_example(MESSAGES, tok, seq_len=64)
    assert ids == prompt + response
    assert labels == [IGNORE_INDEX] * len(prompt) + response


def test_instruct_batches_pad_with_ignored_labels(tiny_base):
    _, tok = tiny_base
    record = json.dumps({"messages": MESSAGES})
    short = json.dumps({"messages": [MESSAGES[0], {"role": "assistant", "content": "no"}]})
    cfg = ExperimentConfig.from_dict({"task": {"name": "instruct"}})
    ids, labels = get_task("instruct").encode([record, short], tok, cfg)
    n_short = len(encode_example(json.loads(short)["messages"], tok, seq_len=64)[0])
    assert (ids[1, n_short:] == tok.pad_token_id).all()
    assert (labels[1, n_short:] == IGNORE_INDEX).all()


def test_pooled_classification_metrics_equal_scikit_learn_on_the_pooled_predictions():
    # client A never sees class 2; client B never predicts class 0 correctly
    a = [[5, 1, 0], [2, 3, 0], [0, 0, 0]]
    b = [[0, 2, 1], [1, 4, 0], [0, 1, 6]]
    rows = [{CONFUSION: sum(a, [])}, {CONFUSION: sum(b, [])}]
    got = get_task("classify").pooled(rows, ["neg", "neu", "pos"])
    true, pred = [], []
    for cm in (a, b):
        for i, row in enumerate(cm):
            for j, count in enumerate(row):
                true += [i] * count
                pred += [j] * count
    p, r, f, _ = precision_recall_fscore_support(true, pred, zero_division=0)
    assert got["accuracy"] == pytest.approx(accuracy_score(true, pred), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(f.mean(), abs=1e-12)
    assert got["macro_precision"] == pytest.approx(p.mean(), abs=1e-12)
    assert got["macro_recall"] == pytest.approx(r.mean(), abs=1e-12)
    assert [got[f"f1_{n}"] for n in ("neg", "neu", "pos")] == pytest.approx(list(f), abs=1e-12)
    # an average of the clients' own F1s is not the pooled F1
    own = [scores_from_confusion(cm, ["neg", "neu", "pos"])["macro_f1"] for cm in (a, b)]
    assert abs(np.mean(own) - got["macro_f1"]) > 0.05


def test_the_head_trains_and_travels_by_the_role_rule():
    head = "base_model.model.score.modules_to_save.default.weight"
    assert parameter_role(head) == "shared"
    assert parameter_role("base_model.model.score.original_module.weight") == "frozen"
    assert parameter_role(head, personalization="local_only") == "personal"
    assert parameter_role(head, personalization="split") == "shared"


def _cfg(task: str, tmp_path, **extra) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "task": {"name": task, "eval_generations": 2, "max_new_tokens": 4},
        "federation": {"num_clients": 2}, "data": {"docs_per_client": 8},
        "training": {"local_steps": 2, "seq_len": 32, "batch_size": 4},
        "output_dir": str(tmp_path), **extra})


def test_a_classification_reply_is_exactly_lora_and_the_head(tmp_path):
    cfg = _cfg("classify", tmp_path)
    sent = initial_adapter(cfg)
    lora = [n for n in sent if ".lora_" in n]
    assert sorted(set(sent) - set(lora)) == ["base_model.model.score.weight"]
    assert len(lora) == 8 and sent["base_model.model.score.weight"].shape == (8, 64)
    assert sum(v.size for v in sent.values()) == 4 * (8 * 64 + 64 * 8) + 8 * 64
    got, metrics = fit(cfg, sent, partition_id=0, server_round=1, client_dir=tmp_path / "c0")
    assert list(got) == list(sent)
    assert not np.array_equal(got["base_model.model.score.weight"], sent["base_model.model.score.weight"])
    assert metrics["num-examples"] == 6


@pytest.mark.parametrize("task,extra", [
    ("causal_lm", {}),
    ("causal_lm", {"personalization": {"method": "split"}}),
    ("causal_lm", {"privacy": {"mode": "dp_sgd"}}),
    ("instruct", {}),
    ("instruct", {"personalization": {"method": "finetune", "finetune_steps": 1}}),
    ("instruct", {"privacy": {"mode": "dp_sgd"}}),
    ("classify", {}),
    ("classify", {"personalization": {"method": "local_only"}}),
    ("classify", {"privacy": {"mode": "dp_sgd"}}),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}" for k in v) or "plain")
def test_every_task_runs_a_round_in_process(tmp_path, task, extra):
    cfg = _cfg(task, tmp_path, **extra)
    sent = initial_adapter(cfg)
    got, train = fit(cfg, sent, partition_id=1, server_round=1, client_dir=tmp_path / "c1")
    assert set(got) == set(sent)
    changed = [n for n in sent if not np.array_equal(got[n], sent[n])]
    assert changed if cfg.personalization.method != "local_only" else not sent
    assert train["num-examples"] > 0 and train["steps"] == 2
    if cfg.privacy.mode == "dp_sgd":
        assert train["dp-steps"] == 2 and train["dp-epsilon"] > 0
    scores = evaluate(cfg, got, partition_id=1, server_round=1, client_dir=tmp_path / "c1")
    expected = {"causal_lm": {"loss", "perplexity", "accuracy"},
                "instruct": {"loss", "perplexity", "rouge_l", "exact_match", "generated"},
                "classify": {"loss", "accuracy", "macro_f1", CONFUSION}}[task]
    assert expected <= set(scores)
    if task == "classify":
        assert sum(scores[CONFUSION]) == scores["num-examples"] == 2
    if task == "instruct":
        assert scores["generated"] == 2
    if cfg.personalization.method != "none":
        assert "personal_gain" in scores


def test_classify_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="^personalization.method: dual cannot run with task.name=classify"):
        ExperimentConfig.from_dict({"task": {"name": "classify"}, "personalization": {"method": "dual"}})
    with pytest.raises(ConfigError, match="^task.name: classify needs labelled records"):
        ExperimentConfig.from_dict({"task": {"name": "classify"},
                                    "data": {"source": "shakespeare", "path": "/x"}})
    with pytest.raises(ConfigError, match="^data.partition_key: is required for data.partitioner=dirichlet"):
        ExperimentConfig.from_dict({"data": {"source": "text_files", "path": "/x", "partitioner": "dirichlet"}})
    ExperimentConfig.from_dict({"task": {"name": "classify"},  # the label is the default key
                                "data": {"source": "text_files", "path": "/x", "partitioner": "dirichlet"}})


# --- data in each task's format ------------------------------------------------------


def test_tsv_with_label_names_and_label_skew(tmp_path):
    rows = ["sentence\tlabel"] + [f"text number {i} is {'good' if i % 3 else 'bad'}\t{int(i % 3 > 0)}"
                                  for i in range(60)]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    data = DataConfig(source="text_files", path=str(tmp_path / "train.tsv"), text_key="sentence",
                      label_names=["negative", "positive"], partitioner="dirichlet", dirichlet_alpha=0.3)
    fed = build_federated_texts(data, num_clients=3, task="classify")
    records = [json.loads(r) for c in fed.clients for r in c.train + c.test]
    assert len(records) == 60
    assert {r["label"] for r in records} == {0, 1}
    assert all(r["label"] == int("good" in r["text"]) for r in records)


def test_alpaca_json_and_chat_messages_become_instruct_records(tmp_path):
    alpaca = [{"instruction": f"Say {i}", "input": "" if i % 2 else "loud", "output": f"{i}!"} for i in range(8)]
    (tmp_path / "a.json").write_text(json.dumps(alpaca))
    data = DataConfig(source="text_files", path=str(tmp_path / "a.json"))
    fed = build_federated_texts(data, num_clients=2, task="instruct")
    messages = sorted((json.loads(r)["messages"] for c in fed.clients for r in c.train + c.test),
                      key=lambda m: m[1]["content"])
    assert messages[0] == [{"role": "user", "content": "Say 0\n\nloud"}, {"role": "assistant", "content": "0!"}]
    assert messages[1][0] == {"role": "user", "content": "Say 1"}
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(6)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    chat = DataConfig(source="text_files", path=str(tmp_path / "c.jsonl"), text_key="messages")
    fed = build_federated_texts(chat, num_clients=2, task="instruct")
    assert sum(len(c.train) + len(c.test) for c in fed.clients) == 6
    with pytest.raises(DataError, match="^data.text_key: column 'messages' in .* holds lists"):
        build_federated_texts(chat, num_clients=2, task="causal_lm")


def test_natural_partitioning_says_what_it_drops(tmp_path):
    for name, n in (("big", 6), ("mid", 4), ("small", 2)):
        (tmp_path / f"{name}.txt").write_text("\n\n".join(f"{name} paragraph {i}" for i in range(n)))
    data = DataConfig(source="text_files", path=str(tmp_path), partitioner="natural",
                      partition_key="source_file")
    fed = build_federated_texts(data, num_clients=2)
    assert fed.notes == ("data: natural partitioning by 'source_file' keeps the 2 largest of 3 "
                         "groups: 10 of 12 records, 2 dropped (raise federation.num_clients to keep them)",)


def test_synthetic_records_per_task_are_deterministic():
    data = DataConfig(docs_per_client=8)
    from fedslm.data.synthetic import synthetic_client

    texts = synthetic_client(data, 3, "causal_lm")
    labelled = synthetic_client(data, 3, "classify")
    assert [json.loads(r)["text"] for r in labelled.train] == list(texts.train)
    assert synthetic_client(data, 3, "instruct") == synthetic_client(data, 3, "instruct")
    assert all(json.loads(r)["messages"][-1]["role"] == "assistant"
               for r in synthetic_client(data, 3, "instruct").train)


# --- any architecture: PEFT's own target modules ----------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, sentences=None):
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedslm.model import train_tokenizer
    from tests.conftest import synthetic_sentences

    out = tmp_path_factory.mktemp("gpt2")
    tok = train_tokenizer(synthetic_sentences(200), vocab_size=300)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


def test_auto_targets_take_peft_defaults_and_a_bad_list_fails_in_preflight(tiny_gpt2):
    from fedslm.config import PeftConfig
    from fedslm.model import ModelError, build_peft_model, load_base_model
    from fedslm.simulations.preflight import check_model_shape

    cfg = ExperimentConfig.from_dict({"model": {"name_or_path": tiny_gpt2}})
    check_model_shape(cfg, tiny_gpt2)  # auto: c_attn
    bad = ExperimentConfig.from_dict({"model": {"name_or_path": tiny_gpt2},
                                      "peft": {"target_modules": "q_proj,v_proj"}})
    with pytest.raises(ModelError, match="^peft.target_modules: 'q_proj' matches no module"):
        check_model_shape(bad, tiny_gpt2)
    base, _ = load_base_model(tiny_gpt2, dtype="float32")
    model = build_peft_model(base, PeftConfig(target_modules=["auto"]))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == 4 and all("c_attn.lora_" in n for n in trained)
    assert torch.is_tensor(model(input_ids=torch.tensor([[1, 2, 3]])).logits)
