"""fedslm.model: loading, LoRA wrapping (pinned trainable counts), the builtin tiny Llama."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from fedslm import model as model_mod
from fedslm.config import BUILTIN_MODEL, ModelConfig, PeftConfig
from fedslm.model import (
    BUILD_MARKER,
    ModelError,
    build_peft_model,
    count_parameters,
    default_cache_dir,
    ensure_builtin_model,
    load_base_model,
    max_sequence_length,
    resolve_model_path,
)
from tests.conftest import TINY

LAYERS, HIDDEN, INTER = TINY["num_hidden_layers"], TINY["hidden_size"], TINY["intermediate_size"]
IN_OUT = {  # (in_features, out_features) of each Llama projection
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, HIDDEN),
    "v_proj": (HIDDEN, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (HIDDEN, INTER),
    "up_proj": (HIDDEN, INTER),
    "down_proj": (INTER, HIDDEN),
}
ALL_LINEAR = list(IN_OUT)

# (r, target_modules, pinned trainable-parameter count): one row per variant.
COUNT_CASES = [
    (8, ["q_proj", "v_proj"], 4_096),
    (4, ["q_proj", "k_proj", "v_proj", "o_proj"], 4_096),
    (4, ALL_LINEAR, 9_760),
    (16, ["down_proj"], 7_552),
]


@pytest.mark.parametrize(("r", "targets", "pinned"), COUNT_CASES)
def test_trainable_parameter_count_is_exact(make_peft, tiny_base, r, targets, pinned):
    formula = LAYERS * sum(r * sum(IN_OUT[t]) for t in targets)  # A: r x in, B: out x r
    model = make_peft(r=r, target_modules=targets)
    trainable, total = count_parameters(model)
    assert trainable == formula == pinned
    vocab = len(tiny_base[1])
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN  # attn + mlp + 2 norms
    assert total - trainable == vocab * HIDDEN + LAYERS * per_layer + HIDDEN  # tied lm_head


def test_load_base_model_is_frozen_with_pad(tiny_model_dir):
    model, tokenizer = load_base_model(str(tiny_model_dir), dtype="float32")
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert next(model.parameters()).dtype == torch.float32


def test_load_base_model_bfloat16(tiny_model_dir):
    model, _ = load_base_model(str(tiny_model_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_pad_token_becomes_eos(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    no_pad = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>", bos_token="<s>"
    )
    assert no_pad.pad_token is None
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).save_pretrained(str(tmp_path))
    no_pad.save_pretrained(str(tmp_path))
    model, loaded = load_base_model(str(tmp_path), dtype="float32")
    assert loaded.pad_token == "</s>"
    assert model.config.pad_token_id == loaded.eos_token_id


def test_unloadable_name_is_one_line_model_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never wait on the network here
    with pytest.raises(ModelError) as err:
        load_base_model("no-such-org/no-such-model-xyz", dtype="float32")
    message = str(err.value)
    assert message.startswith("model.name_or_path: cannot load 'no-such-org/no-such-model-xyz': ")
    assert "\n" not in message
    with pytest.raises(ModelError, match="no such directory"):
        load_base_model("/nonexistent/fedslm-model", dtype="float32")
    with pytest.raises(ModelError, match="^model.name_or_path: "):
        max_sequence_length("no-such-org/no-such-model-xyz")


def test_bad_dtype_names_the_key(tiny_model_dir):
    with pytest.raises(ModelError, match=r"^model\.dtype: "):
        load_base_model(str(tiny_model_dir), dtype="float64")


def test_max_sequence_length_reads_config_only(tiny_model_dir):
    assert max_sequence_length(str(tiny_model_dir)) == 256


@pytest.mark.parametrize(
    ("targets", "fragment"),
    [
        (["q_proj", "qq_proj"], "'qq_proj' matches no module"),
        (["input_layernorm"], "'input_layernorm' is a LlamaRMSNorm"),
    ],
)
def test_bad_target_module_names_the_key(tiny_base, targets, fragment):
    base, _ = tiny_base
    with pytest.raises(ModelError) as err:
        build_peft_model(base, PeftConfig(target_modules=targets))
    assert str(err.value).startswith("peft.target_modules: ")
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


# --- builtin model -----------------------------------------------------------------


@pytest.fixture
def few_texts(sentences):
    return sentences[:60]


def test_builtin_model_builds_once_and_loads(tmp_path, few_texts, monkeypatch):
    start = time.perf_counter()
    path = ensure_builtin_model(tmp_path, public_texts=few_texts, pretrain_steps=3)
    build_seconds = time.perf_counter() - start
    assert path.parent == tmp_path and path.name.startswith("tiny-llama-")
    assert (path / BUILD_MARKER).is_file()
    mtime = path.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt although a complete build exists")

    monkeypatch.setattr(model_mod, "_build_builtin_model", no_rebuild)
    start = time.perf_counter()
    assert ensure_builtin_model(tmp_path, public_texts=few_texts, pretrain_steps=3) == path
    assert time.perf_counter() - start < build_seconds
    assert path.stat().st_mtime_ns == mtime

    model = AutoModelForCausalLM.from_pretrained(str(path))
    assert model.config.model_type == "llama"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 64)
    assert model.config.max_position_embeddings == 256
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert {"<pad>", "<s>", "</s>"} <= set(tokenizer.all_special_tokens)
    assert tokenizer.decode(tokenizer("the farmer repairs")["input_ids"]) == "the farmer repairs"


def test_builtin_hash_depends_on_texts_and_recipe(tmp_path, few_texts):
    a = ensure_builtin_model(tmp_path, public_texts=few_texts, pretrain_steps=1)
    b = ensure_builtin_model(tmp_path, public_texts=few_texts[:-1], pretrain_steps=1)
    c = ensure_builtin_model(tmp_path, public_texts=few_texts, pretrain_steps=2)
    assert len({a, b, c}) == 3


def test_builtin_ignores_stale_temp_and_incomplete_dirs(tmp_path, few_texts, monkeypatch):
    path = ensure_builtin_model(tmp_path, public_texts=few_texts, pretrain_steps=1)
    digest = path.name.removeprefix("tiny-llama-")
    # Simulate a crashed build (stale temp dir) and a final-named dir without its marker.
    stale = tmp_path / f".tiny-llama-{digest}.tmp-999-deadbeef"
    stale.mkdir()
    (stale / "config.json").write_text("{half written")
    (path / BUILD_MARKER).unlink()
    (path / "model.safetensors").write_bytes(b"garbage")

    resolved = ensure_builtin_model(tmp_path, public_texts=few_texts, pretrain_steps=1)
    assert resolved == path and (path / BUILD_MARKER).is_file()
    assert not stale.exists()
    AutoModelForCausalLM.from_pretrained(str(path))  # the garbage is gone
    assert not list(tmp_path.glob(".tiny-llama-*.tmp-*"))


def test_builtin_concurrent_callers_build_once(tmp_path, few_texts, monkeypatch):
    real_build = model_mod._build_builtin_model
    builds: list[int] = []

    def counting_build(*args, **kwargs):
        builds.append(threading.get_ident())
        time.sleep(0.2)  # widen the race window
        return real_build(*args, **kwargs)

    monkeypatch.setattr(model_mod, "_build_builtin_model", counting_build)
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                ensure_builtin_model(tmp_path, public_texts=few_texts, pretrain_steps=1)
            )
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert len(results) == 2 and results[0] == results[1]


def test_builtin_needs_texts(tmp_path):
    with pytest.raises(ModelError, match="^model.name_or_path: "):
        ensure_builtin_model(tmp_path, public_texts=["", "  "])


def test_resolve_model_path(tmp_path, few_texts, monkeypatch):
    calls: list[int] = []

    def texts():
        calls.append(1)
        return few_texts

    monkeypatch.setitem(model_mod.BUILTIN_RECIPE["pretrain"], "steps", 1)
    hub = ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M", cache_dir=str(tmp_path))
    assert resolve_model_path(hub, public_texts=texts) == "HuggingFaceTB/SmolLM2-135M"
    assert calls == []  # texts are only produced for the builtin model
    builtin = ModelConfig(name_or_path=BUILTIN_MODEL, cache_dir=str(tmp_path))
    resolved = resolve_model_path(builtin, public_texts=texts)
    assert calls == [1]
    assert os.path.isdir(resolved) and Path(resolved).parent == tmp_path
    assert max_sequence_length(resolved) == 256


def test_tests_build_the_builtin_model_in_a_dir_they_own(owned_cache_dir: Path) -> None:
    from fedslm.rundir import output_dir_for

    assert default_cache_dir(ModelConfig()) == owned_cache_dir
    assert output_dir_for("", 5) == owned_cache_dir / "runs" / "5"
    assert Path.home() not in owned_cache_dir.parents
