"""Where the builtin tiny Llama lives, found without importing torch or transformers.

The launcher checks a run before any engine starts. For the builtin model (the default
run's, and every test's) that check needs only the model's directory and the recipe's
own numbers, while importing transformers' modelling code to learn them costs about
3 CPU-seconds in every launcher. Building the model (``fedslm.model``) needs them all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedslm.config import ModelConfig

# Everything that changes the built model is in here, so it is in the directory hash.
BUILTIN_RECIPE: dict[str, Any] = {
    "recipe_version": 1,
    "tokenizer": {"vocab_size": 1024, "special_tokens": ["<pad>", "<s>", "</s>", "<unk>"]},
    "llama": {
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
    "pretrain": {
        "steps": 300,
        "batch_size": 16,
        "seq_len": 128,
        "learning_rate": 3e-3,
        "weight_decay": 0.01,
        "warmup_steps": 20,
        "seed": 0,
    },
}
BUILD_MARKER = "fedslm-build.json"


def builtin_model_hash(public_texts: Sequence[str], recipe: dict[str, Any]) -> str:
    """Short content hash of the build recipe and the texts (names the cache dir)."""
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for text in public_texts:
        data = text.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:12]


def usable_texts(public_texts: Sequence[str]) -> list[str]:
    """The texts the builtin model is built from (and hashed over): the non-blank ones."""
    return [t for t in public_texts if t.strip()]


def builtin_model_dir(cache_dir: Path, digest: str) -> Path:
    """The directory of the builtin model whose recipe and texts hash to ``digest``."""
    return Path(cache_dir).expanduser() / f"tiny-llama-{digest}"


def built_builtin_model(cfg: ModelConfig, public_texts: Sequence[str]) -> Path | None:
    """The builtin model's directory if a complete build is there (its marker is written
    last), else None: the caller builds it through ``fedslm.model``."""
    digest = builtin_model_hash(usable_texts(public_texts), BUILTIN_RECIPE)
    final = builtin_model_dir(default_cache_dir(cfg), digest)
    return final if (final / BUILD_MARKER).is_file() else None


def default_cache_dir(cfg: ModelConfig) -> Path:
    from fedslm.rundir import cache_root

    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root()
