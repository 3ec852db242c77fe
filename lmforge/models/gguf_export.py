"""Write a model as a GGUF file for llama.cpp and Ollama, with the `gguf` package.

Llama-architecture models with a byte-level BPE tokenizer (GPT-2 style: SmolLM2, the demo's own
tokenizer) are supported; anything else gets an error saying what is missing. Weights stay
unquantised (f32, f16 or bf16; norms always f32, as llama.cpp expects): quantise afterwards with
llama.cpp's `llama-quantize`.

Two details of the format: llama.cpp applies rotary embeddings to interleaved pairs while
Hugging Face Llama rotates the two halves of each head, so the query and key projections are
reordered row-wise per head; and a tied output layer is left out (llama.cpp reuses the embeddings).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from lmforge.config.errors import ConfigError

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM"}
FILE_TYPES = {torch.float32: ("f32", "ALL_F32"), torch.float16: ("f16", "MOSTLY_F16"),
              torch.bfloat16: ("bf16", "MOSTLY_BF16")}


def gguf_name(dtype: torch.dtype) -> str:
    return f"model-{FILE_TYPES[dtype][0]}.gguf"


def write_gguf(model, tokenizer, path: str | Path, name: str | None = None, source: Path | None = None) -> Path:
    """Write `path`. `name` is the model's name (general.name; default: the file's folder); `source`, the GGUF
    the weights first came from, lends its tokenizer identity when the vocabulary is still its own."""
    import gguf  # imported on use: only this export needs it

    config = model.config
    architecture = (config.architectures or [type(model).__name__])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"GGUF export supports {', '.join(sorted(SUPPORTED_ARCHITECTURES))}; this model is "
                          f"{architecture}. Export the HF folder and convert it with llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported")
    dtype = model.dtype
    if dtype not in FILE_TYPES:
        raise ConfigError(f"GGUF export: weights in {dtype} (expected fp32, fp16 or bf16)")
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name or path.parent.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype][1]))
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    writer.add_vocab_size(vocab_rows)
    _add_tokenizer(writer, tokenizer, vocab_rows, gguf, source)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ConfigError(f"GGUF export: no GGUF name for tensor {name}")
        tensor = tensor.detach().cpu()
        if name.endswith("q_proj.weight"):
            tensor = _interleave_rotary(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = _interleave_rotary(tensor, config.num_key_value_heads)
        if tensor.dim() == 1:
            writer.add_tensor(target, tensor.float().numpy())
        elif tensor.dtype == torch.bfloat16:
            writer.add_tensor(target, tensor.view(torch.int16).numpy().view(np.uint16),
                              raw_shape=list(tensor.shape), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(target, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


def _interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from [first half | second half] order to interleaved pairs (llama.cpp's rope)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def source_identity(source: Path | None, tokens: list[str]) -> dict:
    """The source GGUF's tokenizer identity (`tokenizer.ggml.pre`, which picks llama.cpp's pre-tokenizer
    rules, and `general.basename`) when `tokens` still start with its vocabulary; else nothing (a new or
    changed tokenizer is described from itself)."""
    if source is None or not Path(source).is_file():
        return {}
    from gguf import GGUFReader

    reader = GGUFReader(source)
    vocab = reader.fields.get("tokenizer.ggml.tokens")
    theirs = [bytes(vocab.parts[i]).decode("utf-8", "replace") for i in vocab.data] if vocab else []
    if not theirs or tokens[:len(theirs)] != theirs:
        return {}
    found = {}
    for key in ("tokenizer.ggml.pre", "general.basename"):
        field = reader.fields.get(key)
        if field is not None:
            found[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
    return found


def _add_tokenizer(writer, tokenizer, vocab_rows: int, gguf, source: Path | None = None) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise ConfigError("GGUF export supports byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and "
                          "lmforge's own); convert this model with llama.cpp's convert_hf_to_gguf.py")
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    identity = source_identity(source, tokens)
    special = set(tokenizer.all_special_ids)
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special} | special
    types = [gguf.TokenType.CONTROL if i in added else
             gguf.TokenType.USER_DEFINED if i in tokenizer.added_tokens_decoder else gguf.TokenType.NORMAL
             for i in range(len(tokens))]
    for i in range(len(tokens), vocab_rows):  # embedding rows past the vocabulary (padding for speed)
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    # A plain byte-level pre-tokenizer splits text with GPT-2's rules, which llama.cpp calls "gpt2"; a source
    # GGUF's own name for its rules (SmolLM2's "smollm") is kept, as llama.cpp splits text by it.
    writer.add_tokenizer_pre(identity.get("tokenizer.ggml.pre", "gpt2"))
    if "general.basename" in identity:
        writer.add_basename(identity["general.basename"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            setter(token_id)
    writer.add_add_bos_token(False)  # lmforge's templates write every special token themselves
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
