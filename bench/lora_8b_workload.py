"""The workload of bench/lora_8b.py that both sides share: the 8B-shape checkpoint, its documents, and
the measurement helpers (peak memory, out-of-memory messages, the longest-sequence sweep)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

SHAPES = {
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024),
}
PAD, R, ALPHA = 3, 16, 32
LENGTHS = (4096, 8192, 16384, 32768, 65536)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_checkpoint(folder: Path, shape: str) -> None:
    """A random-init Llama of `shape` in bf16 (seed 0) and a word-level tokenizer ('tK' is id K), saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    dims = SHAPES[shape]
    config = LlamaConfig(max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1,
                         eos_token_id=2, pad_token_id=PAD, tie_word_embeddings=False, **dims)
    torch.manual_seed(0)
    with torch.device(device()):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {**{s: i for i, s in enumerate(specials)}, **{f"t{i}": i for i in range(4, dims["vocab_size"])}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    # A template of its own, as a released chat model's tokenizer has: lmforge would otherwise add ChatML's
    # tokens, grow the vocabulary and train the embeddings and head beside the adapter.
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    tokenizer.save_pretrained(folder)


def documents(tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random documents of 200-2000 tokens (ids in [4, vocab)), at least `tokens` in all."""
    g = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < tokens:
        n = int(torch.randint(200, 2001, (1,), generator=g))
        docs.append(torch.randint(4, vocab, (n,), generator=g).tolist())
        total += n
    return docs


def long_document(length: int, vocab: int) -> list[int]:
    return torch.randint(4, vocab, (length,), generator=torch.Generator().manual_seed(1)).tolist()


def peak() -> dict:
    if device() != "cuda":
        return {}
    return {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def oom_message(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def free() -> None:
    gc.collect()
    if device() == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sweep_lengths(lengths: list[int], one_step) -> list[dict]:
    """Train one step at each length, longest last, and stop at the first that fails (out of memory)."""
    tried = []
    for length in lengths:
        free()
        try:
            tried.append({"seq": length, "ok": True, "step_s": round(one_step(length), 2), **peak()})
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            tried.append({"seq": length, "ok": False, "error": oom_message(exc), **peak()})
        print(json.dumps(tried[-1]), flush=True)
        if not tried[-1]["ok"]:
            break
    return tried


def longest_row(who: str, args, tried: list[dict], model) -> dict:
    ok = [t["seq"] for t in tried if t["ok"]]
    return {"who": who, "method": args.method, "row": "longest", "batch": 1, "activation_checkpointing": True,
            "longest_seq": max(ok) if ok else 0, "tried": tried, "trainable": trainable(model),
            "not_tried_beyond": None if not tried or not tried[-1]["ok"] else tried[-1]["seq"]}
