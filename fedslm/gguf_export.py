"""GGUF (llama.cpp's file format) for merged Llama-architecture models, with the ``gguf``
package: its writer, its HF -> GGUF tensor-name map and its quantizers, following the
conventions of llama.cpp's ``convert_hf_to_gguf.py`` (Q/K rows permuted for its rotary
layout, tied output weight omitted, BPE vocab as ``gpt2`` tokens + merges).

``read_back`` dequantizes the file's tensors into a transformers model of the same
config, so the quality of exactly what is in the file can be measured without llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

GGUF_TYPES = ("f32", "f16", "q8_0")


class GGUFError(ValueError):
    """The model cannot be written as GGUF; the message says why."""


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> llama.cpp row order of a Q or K projection (``LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(config, hf_name: str) -> int | None:
    if hf_name.endswith("self_attn.q_proj.weight"):
        return config.num_attention_heads
    if hf_name.endswith("self_attn.k_proj.weight"):
        return config.num_key_value_heads or config.num_attention_heads
    return None


def _tensor_map(config):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)


def _encode(data: np.ndarray, qtype: str):
    """(array to write, its GGML type); Q8_0 needs rows that are a multiple of 32 long,
    else the tensor falls back to F16 as llama.cpp's converter does; 1-D tensors stay F32."""
    import gguf

    T = gguf.GGMLQuantizationType
    if data.ndim == 1 or qtype == "f32":
        return data.astype(np.float32), T.F32
    if qtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return gguf.quants.quantize(data.astype(np.float32), T.Q8_0), T.Q8_0
    return data.astype(np.float16), T.F16


def write_gguf(merged, tokenizer, path: Path, *, qtype: str = "q8_0", name: str = "fedslm") -> Path:
    import gguf

    config = merged.config
    if config.model_type != "llama":
        raise GGUFError(f"--format gguf: only Llama-architecture models are written here, "
                        f"this one is {config.model_type!r}")
    if qtype not in GGUF_TYPES:
        raise GGUFError(f"--gguf-type: unknown value {qtype!r}; expected one of {', '.join(GGUF_TYPES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    head_dim = config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") \
        or getattr(config, "rope_theta", 10000.0)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    _add_vocab(writer, tokenizer, config.vocab_size)
    names = _tensor_map(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in merged.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd when output.weight is absent
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise GGUFError(f"--format gguf: no GGUF name for tensor {hf_name}")
        data = tensor.detach().float().cpu().numpy()
        heads = _heads(config, hf_name)
        if heads:
            data = _permute(data, heads)
        encoded, ggml_type = _encode(data, qtype)
        writer.add_tensor(target, encoded, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_vocab(writer, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE as llama.cpp's ``gpt2`` tokenizer model: tokens by id, types, merges,
    special token ids."""
    import json

    import gguf

    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if merges:
        writer.add_token_merges(merges)
    for key, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                       ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the file by GGUF name, dequantized to float32 in numpy (row-major) shape."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
    return out


def read_fields(path: Path) -> dict[str, object]:
    """Scalar and string metadata of the file (arrays reported by length)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields: dict[str, object] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.contents()
        fields[name] = len(value) if isinstance(value, list) else value
    return fields


def read_back(path: Path, template) -> torch.nn.Module:
    """``template`` (a transformers Llama of the same config) with the file's tensors."""
    names = _tensor_map(template.config)
    tensors = read_tensors(path)
    state = {}
    for hf_name, current in template.state_dict().items():
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if hf_name == "lm_head.weight" and target not in tensors:
            target = names.get_name("model.embed_tokens.weight", try_suffixes=(".weight",))
        data = tensors[target]
        heads = _heads(template.config, hf_name)
        if heads:
            data = _unpermute(data, heads)
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(data)).to(current.dtype)
    template.load_state_dict(state)
    template.eval()
    return template
