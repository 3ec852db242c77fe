"""The model and prompts of bench/serve_load.py: a random-init Llama folder built here (no download) and
chat prompts whose token lengths are spread uniformly over a range, both seeded."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from sft_speed import MODELS  # noqa: E402  (the peer's shapes: A 349M, B 1.1B, T tiny)

VOCAB = 32000
"""The peer's vocabulary size: the tokenizer is trained to exactly this many tokens so the embedding and
the output layer have model A's shape."""
POSITIONS = 2048
"""Room for the longest prompt (512 tokens + the chat template) and its reply: the server's KV cache holds
this many positions per row, so a smaller number keeps memory close to what the workload needs."""
CONSONANTS, VOWELS = "bcdfghjklmnprstvwz", "aeiou"


def pseudo_text(lines: int, seed: int) -> list[str]:
    """Sentences of made-up words (syllables of 2-3 letters): enough distinct pairs for BPE to learn 32000
    tokens, and plain ASCII so every prompt survives decode -> encode unchanged."""
    rng = random.Random(seed)
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    syllables += [s + e for s in syllables for e in "nrst"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(60000)]
    return [" ".join(rng.choices(words, k=12)).capitalize() + "." for _ in range(lines)]


def build_random_model(shape: str, out_dir: Path, dtype: torch.dtype) -> Path:
    """A random-init Llama of `shape` (bench/sft_speed.py MODELS) with a ChatML byte-level BPE tokenizer of
    VOCAB tokens, saved as a Hugging Face folder. Random weights almost never pick an end-of-turn token,
    so replies run to their token limit."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmforge.models.tokenizer import train_tokenizer

    if shape not in MODELS:
        raise SystemExit(f"--model random-{shape}: no such shape; one of "
                         f"{', '.join('random-' + s for s in MODELS)} or a model folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(pseudo_text(40000, seed=0)) + "\n", encoding="utf-8")
    tokenizer = train_tokenizer([corpus], out_dir, vocab_size=VOCAB, min_frequency=1)
    corpus.unlink()
    if len(tokenizer) != VOCAB:
        raise SystemExit(f"the generated tokenizer has {len(tokenizer)} tokens, not {VOCAB}: the corpus "
                         "is too small to learn them (bench/serve_workload.py pseudo_text)")
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=POSITIONS, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODELS[shape])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir)
    (out_dir / "bench_model.json").write_text(json.dumps(
        {"shape": shape, **MODELS[shape], "vocab_size": VOCAB, "max_position_embeddings": POSITIONS,
         "saved_dtype": str(dtype).removeprefix("torch."), "init": "random, torch.manual_seed(0)",
         "parameters": sum(p.numel() for p in model.parameters())}) + "\n", encoding="utf-8")
    return out_dir


def mixed_prompts(tokenizer, count: int, low: int, high: int, seed: int) -> list[tuple[str, int]]:
    """`count` (user message, its token count) pairs; token counts drawn uniformly from [low, high].
    Each message is a window of a token stream decoded to text; its count is measured by encoding the
    text again (a cut word can merge differently, so it may differ from the draw by a token or two)."""
    if not 1 <= low <= high:
        raise SystemExit(f"--prompt-tokens {low},{high}: needs 1 <= low <= high")
    stream: list[int] = []
    for line in pseudo_text(400 + high // 4, seed=seed + 1):
        stream += tokenizer(" " + line, add_special_tokens=False).input_ids
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        length = rng.randint(low, high)
        start = rng.randrange(0, len(stream) - length)
        text = tokenizer.decode(stream[start:start + length]).strip()
        prompts.append((text, len(tokenizer(text, add_special_tokens=False).input_ids)))
    return prompts
