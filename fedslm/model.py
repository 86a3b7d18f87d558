"""The frozen base model and its LoRA wrapper, for the builtin tiny Llama and real checkpoints.

``builtin:tiny-llama`` is built once per (recipe, texts) on this machine: a byte-level
BPE tokenizer and a 2-layer Llama briefly pre-trained on public texts, saved with
``save_pretrained`` so that from there on it loads through exactly the same
``AutoModelForCausalLM`` / ``AutoTokenizer`` path as a hub checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedslm.errors import ModelError  # noqa: F401 - raised here, importable without torch
from fedslm.adapters import (GLOBAL_ADAPTER, PERSONAL_ADAPTER, apply_roles, lora_config, sync_tree,
                             target_modules)
from fedslm.builtin_model import (BUILD_MARKER, BUILTIN_RECIPE,
                                  builtin_model_dir, builtin_model_hash, default_cache_dir,
                                  usable_texts)
from fedslm.config import BUILTIN_MODEL, SHAPE_PREFIX, ModelConfig, PeftConfig


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}



# --- builtin tiny Llama ----------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], *, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts`` (any input encodes: no unknown bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    pad, bos, eos, unk = BUILTIN_RECIPE["tokenizer"]["special_tokens"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[pad, bos, eos, unk],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        model_max_length=BUILTIN_RECIPE["llama"]["max_position_embeddings"],
    )


def tiny_llama_config(tokenizer: PreTrainedTokenizerBase, **overrides: Any) -> LlamaConfig:
    """The builtin architecture sized to ``tokenizer``."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**BUILTIN_RECIPE["llama"], **overrides},
    )


def ensure_builtin_model(
    cache_dir: Path, *, public_texts: Sequence[str], pretrain_steps: int | None = None
) -> Path:
    """Return the builtin model dir for these texts, building it once if needed.

    Safe under concurrency: builders serialise on an ``fcntl`` lock per hash, build
    into a temp dir and ``os.rename`` it into place, so a dir under the final name is
    always complete (it also carries ``fedslm-build.json``, written last). Leftover temp
    dirs of crashed builds are ignored and removed by the next builder.
    ``pretrain_steps`` overrides the recipe (tests); it is part of the hash.
    """
    texts = usable_texts(public_texts)
    if not texts:
        raise ModelError(f"model.name_or_path: {BUILTIN_MODEL} needs public texts, got none")
    recipe = json.loads(json.dumps(BUILTIN_RECIPE))
    if pretrain_steps is not None:
        recipe["pretrain"]["steps"] = int(pretrain_steps)
    digest = builtin_model_hash(texts, recipe)
    cache_dir = Path(cache_dir).expanduser()
    final = builtin_model_dir(cache_dir, digest)
    if (final / BUILD_MARKER).is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".tiny-llama-{digest}.lock"):
        if (final / BUILD_MARKER).is_file():  # another process built it while we waited
            return final
        for stale in cache_dir.glob(f".tiny-llama-{digest}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # no marker: not ours or incomplete; never use it
            shutil.rmtree(final)
        tmp = cache_dir / f".tiny-llama-{digest}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _build_builtin_model(tmp, texts, recipe, digest)
            sync_tree(tmp)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_builtin_model(out: Path, texts: list[str], recipe: dict[str, Any], digest: str) -> None:
    start = time.perf_counter()
    pre = recipe["pretrain"]
    with torch.random.fork_rng(devices=[]):  # deterministic, and the caller's RNG is untouched
        torch.manual_seed(pre["seed"])
        tokenizer = train_tokenizer(texts, vocab_size=recipe["tokenizer"]["vocab_size"])
        model = LlamaForCausalLM(tiny_llama_config(tokenizer, **recipe["llama"]))
        loss = _pretrain(model, _token_blocks(texts, tokenizer, pre["seq_len"]), pre)
    out.mkdir(parents=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    marker = {
        "hash": digest,
        "recipe": recipe,
        "num_texts": len(texts),
        "final_loss": loss,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    (out / BUILD_MARKER).write_text(json.dumps(marker, indent=2))


def _token_blocks(texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """Texts joined with eos, cut into blocks (one shorter block if there is little text)."""
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(row)
        ids.append(tokenizer.eos_token_id)
    seq_len = min(seq_len, len(ids))
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _pretrain(model: LlamaForCausalLM, blocks: torch.Tensor, pre: dict[str, Any]) -> float:
    """Full-parameter AdamW with linear warm-up and decay; returns the last loss."""
    steps, warmup = pre["steps"], pre["warmup_steps"]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=pre["learning_rate"], weight_decay=pre["weight_decay"]
    )
    generator = torch.Generator().manual_seed(pre["seed"])
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        factor = (step + 1) / warmup if step < warmup else (steps - step) / max(1, steps - warmup)
        for group in optimizer.param_groups:
            group["lr"] = pre["learning_rate"] * min(1.0, factor)
        batch = blocks[torch.randint(len(blocks), (pre["batch_size"],), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    return float(loss.detach())


# --- loading ---------------------------------------------------------------------------


def resolve_model_path(cfg: ModelConfig, *, public_texts: Callable[[], Sequence[str]]) -> str:
    """Builtin name -> its built dir (texts fetched only then); anything else unchanged."""
    if cfg.name_or_path == BUILTIN_MODEL:
        return str(ensure_builtin_model(default_cache_dir(cfg), public_texts=public_texts()))
    if cfg.name_or_path.startswith(SHAPE_PREFIX):
        tiny = ensure_builtin_model(default_cache_dir(cfg), public_texts=public_texts())
        return str(ensure_shape_model(default_cache_dir(cfg), cfg.name_or_path[len(SHAPE_PREFIX):],
                                      tokenizer_dir=tiny))
    return cfg.name_or_path


# --- builtin shapes: real SLM sizes, random weights (benchmarks only) -------------------

# The published configs of SmolLM2-135M and Qwen2.5-0.5B: same parameter count, layer
# shapes and vocabulary size, random weights. Token ids come from the builtin tokenizer
# (its 1,024 ids are a subset of the vocabulary), so the embedding and output layers
# have their real size and cost.
SHAPE_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "tie_word_embeddings": True,
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": True,
    },
}
SHAPE_MARKER = "fedslm-shape.json"
SHAPE_SEED = 0


def shape_config(name: str, tokenizer: PreTrainedTokenizerBase | None = None) -> Any:
    """The transformers config of builtin shape ``name`` (special ids from ``tokenizer``)."""
    if name not in SHAPE_CONFIGS:
        raise ModelError(f"model.name_or_path: unknown builtin shape {name!r}; expected one of "
                         f"{', '.join(SHAPE_PREFIX + n for n in SHAPE_CONFIGS)}")
    spec = dict(SHAPE_CONFIGS[name])
    ids = {}
    if tokenizer is not None:
        ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    return AutoConfig.for_model(spec.pop("model_type"), **spec, **ids)


def ensure_shape_model(cache_dir: Path, name: str, *, tokenizer_dir: Path) -> Path:
    """The dir of builtin shape ``name``: its config, random weights (seed ``SHAPE_SEED``,
    float32) and the builtin tokenizer, written once like the tiny model (lock, temp
    dir, rename), so every process loads the same base through ``from_pretrained``."""
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / f"shape-{name}-{Path(tokenizer_dir).name.rsplit('-', 1)[-1]}"
    if (final / SHAPE_MARKER).is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".shape-{name}.lock"):
        if (final / SHAPE_MARKER).is_file():
            return final
        if final.exists():
            shutil.rmtree(final)
        tmp = cache_dir / f".shape-{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            start = time.perf_counter()
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(SHAPE_SEED)
                model = AutoModelForCausalLM.from_config(shape_config(name, tokenizer),
                                                         dtype=torch.float32)
            tmp.mkdir(parents=True)
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            (tmp / SHAPE_MARKER).write_text(json.dumps({
                "shape": name, "seed": SHAPE_SEED, "parameters": sum(p.numel() for p in model.parameters()),
                "note": "random weights: for measuring cost only",
                "build_seconds": round(time.perf_counter() - start, 3)}, indent=2))
            del model
            sync_tree(tmp)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _from_pretrained(loader: Callable[..., Any], path: str, **kwargs: Any) -> Any:
    """Local dir or HF cache first; the hub only when not offline. One-line ModelError."""
    looks_local = path.startswith(("/", ".", "~")) or os.path.isdir(os.path.expanduser(path))
    if looks_local:
        local = os.path.expanduser(path)
        if not os.path.isdir(local):
            raise ModelError(f"model.name_or_path: cannot load {path!r}: no such directory")
        attempts = [{"local_files_only": True}]
        path = local
    else:
        from huggingface_hub import constants

        attempts = [{"local_files_only": True}]
        if not constants.HF_HUB_OFFLINE:
            attempts.append({})
    error: Exception | None = None
    for extra in attempts:
        try:
            return loader(path, **kwargs, **extra)
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot load"
            error = exc
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    raise ModelError(f"model.name_or_path: cannot load {path!r}: {reason}") from error


HEAD_INIT_SEED = 1234  # a new task head gets the same random init in every process


def load_base_model(path: str, *, dtype: str, auto_model: Any = AutoModelForCausalLM,
                    **model_kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Frozen base model and its tokenizer, same code for builtin and real checkpoints.

    ``auto_model`` is the task's Auto class (``fedslm.tasks``): causal LM, or sequence
    classification with ``num_labels``, whose new head is initialised from a fixed seed
    so the server and every client start from the same head. A missing pad token is set
    to eos, and ``model.config.pad_token_id`` always follows the tokenizer: training and
    evaluation mask label positions holding it, and classification pools the last
    non-pad token.
    """
    if dtype not in DTYPES:
        raise ModelError(f"model.dtype: unknown value {dtype!r}; expected one of {', '.join(DTYPES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_INIT_SEED)
        model = _from_pretrained(auto_model.from_pretrained, path, dtype=DTYPES[dtype], **model_kwargs)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"model.name_or_path: {path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    return model, tokenizer


def max_sequence_length(path: str) -> int:
    """Longest input the model takes, from its config alone (no weights loaded)."""
    config = _from_pretrained(AutoConfig.from_pretrained, path)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelError(f"model.name_or_path: {path!r} config states no maximum sequence length")


def prepare_for_training(base: PreTrainedModel, *, gradient_checkpointing: bool,
                         quantized: bool) -> PreTrainedModel:
    """Before LoRA wraps it: a quantized base goes through PEFT's
    ``prepare_model_for_kbit_training`` (norms in float32, input gradients on); gradient
    checkpointing (non-reentrant) needs the embeddings' output to require grad, or a
    frozen base would give the checkpointed blocks no gradient path to LoRA."""
    if quantized:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if gradient_checkpointing:
        base.config.use_cache = False  # a cache is useless and warned about while checkpointing
    return base


def check_target_modules(base: torch.nn.Module, peft_cfg: PeftConfig) -> None:
    """ModelError naming ``peft.target_modules`` if a name matches no LoRA-able layer
    (works on a model built on the meta device, so preflight checks it in seconds)."""
    modules = [(name, module) for name, module in base.named_modules() if name]
    targetable = sorted({n.rsplit(".", 1)[-1] for n, m in modules if _is_targetable(m)})
    targets = target_modules(peft_cfg, getattr(getattr(base, "config", None), "model_type", None))
    if targets is None:
        raise ModelError("peft.target_modules: auto has no PEFT default for this architecture "
                         f"({getattr(base.config, 'model_type', '?')}); name them "
                         f"(targetable: {', '.join(targetable)})")
    if isinstance(targets, str):  # all-linear
        return
    for target in targets:
        matched = [m for n, m in modules if n == target or n.endswith("." + target)]
        if not matched:
            problem = "matches no module of the base model"
        elif not any(_is_targetable(m) for m in matched):
            problem = f"is a {type(matched[0]).__name__}, not a layer LoRA can wrap"
        else:
            continue
        raise ModelError(f"peft.target_modules: {target!r} {problem} (targetable: {', '.join(targetable)})")


def build_peft_model(
    base: PreTrainedModel, peft_cfg: PeftConfig, *, personalization: str = "none",
    task_type: str = "CAUSAL_LM",
) -> PeftModel:
    """Wrap ``base`` (modified in place) with a fresh LoRA adapter; trainability from adapters.

    ``task_type`` is the task's PEFT type (``SEQ_CLS`` also trains a copy of the head).
    ``personalization="dual"`` adds a second LoRA adapter of the same shape named
    ``personal``; both are active (their updates add up) and ``parameter_role`` keeps
    the second one on the client.
    """
    check_target_modules(base, peft_cfg)
    model_type = getattr(base.config, "model_type", None)
    try:
        model = get_peft_model(base, lora_config(peft_cfg, task_type=task_type, model_type=model_type))
    except ValueError as exc:
        raise ModelError(f"peft.target_modules: {' '.join(str(exc).split())[:200]}") from exc
    if personalization == "dual":
        model.add_adapter(PERSONAL_ADAPTER, lora_config(peft_cfg, task_type="CAUSAL_LM",
                                                        model_type=model_type))
        model.base_model.set_adapter([GLOBAL_ADAPTER, PERSONAL_ADAPTER])
    apply_roles(model, personalization)
    return model


def _is_targetable(module: torch.nn.Module) -> bool:
    """Layer types LoRA wraps (PEFT supports a few more; these cover causal LMs)."""
    from transformers.pytorch_utils import Conv1D  # GPT-2 style projections

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    return isinstance(module, kinds)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


__all__ = [
    "BUILTIN_RECIPE",
    "ModelError",
    "build_peft_model",
    "count_parameters",
    "ensure_builtin_model",
    "load_base_model",
    "max_sequence_length",
    "prepare_for_training",
    "resolve_model_path",
    "shape_config",
    "train_tokenizer",
]
