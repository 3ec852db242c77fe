"""Train a byte-level BPE tokenizer from scratch, or extend an existing one with domain tokens.

Byte-level BPE starts from the 256 byte symbols, so every string (Chinese, emoji, control
characters) encodes without an unknown token and decodes back exactly; merges learned from the
corpus then shorten frequent words. Tokenizers are saved in the Hugging Face format so that
`AutoTokenizer.from_pretrained` (and so every other lmforge stage) can load them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmforge.config.templates import builtin_template
from lmforge.data.templates import CHATML_SPECIAL_TOKENS

EOS_TOKEN = "<|endoftext|>"
DEFAULT_SPECIAL_TOKENS = [EOS_TOKEN, *CHATML_SPECIAL_TOKENS]
DEFAULT_MODEL_MAX_LENGTH = 2048
# Keys of a conversation record in the chat formats lmforge reads (OpenAI-style and ShareGPT-style).
_CONVERSATION_KEYS = ("messages", "conversations")
_MESSAGE_TEXT_KEYS = ("content", "value")


def _jsonl_texts(record: Any) -> Iterator[str]:
    """The trainable text of one JSONL record: its "text" field or its messages' contents."""
    if not isinstance(record, dict):
        return
    if isinstance(record.get("text"), str):
        yield record["text"]
    for key in _CONVERSATION_KEYS:
        for message in record.get(key) or []:
            if not isinstance(message, dict):
                continue
            for text_key in _MESSAGE_TEXT_KEYS:
                if isinstance(message.get(text_key), str):
                    yield message[text_key]


def iter_corpus(files: Iterable[str | Path]) -> Iterator[str]:
    """Yield the training texts of plain-text files (one per line) and `.jsonl` files (per record)."""
    for file in files:
        path = Path(file)
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                if path.suffix != ".jsonl":
                    # The newline is kept so that BPE learns how line breaks sit next to text.
                    yield line
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
                yield from _jsonl_texts(record)


def _byte_level_bpe(split_han_chars: bool = False) -> Tokenizer:
    """An untrained byte-level BPE pipeline (GPT-2 style, without the leading-space trick)."""
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: a prompt's first word must encode the same way it was written,
    # otherwise decode(encode(text)) would gain a space.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_han_chars:
        # Chinese has no spaces, so a whole clause is one pre-token and BPE fuses characters of
        # neighbouring words ("达最"). One pre-token per Han character keeps a name spelled the
        # same in every context: small models on small corpora learn it far faster.
        han = pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([han, byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offset mappings exact (spaces belong to the token that carries them).
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def train_tokenizer(
    files: list[str | Path],
    out_dir: str | Path,
    vocab_size: int = 4000,
    min_frequency: int = 2,
    special_tokens: list[str] | None = None,
    split_han_chars: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `files` and save it (with the ChatML template) to `out_dir`.

    The vocabulary holds the special tokens (ids 0..), the 256 byte symbols and the learned merges;
    it can end up smaller than `vocab_size` when the corpus has too few frequent pairs.
    `<|endoftext|>` is always present: it is the EOS and the padding token.
    """
    specials = list(
        dict.fromkeys([EOS_TOKEN, *(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)])
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(
            f"vocab_size {vocab_size} is too small: the byte alphabet and special tokens alone need "
            f"{len(alphabet) + len(specials)}"
        )
    if not files:
        raise ValueError("train_tokenizer needs at least one training file")
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer training files not found: {', '.join(missing)}")

    tokenizer = _byte_level_bpe(split_han_chars)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        # All 256 byte symbols, even those absent from the corpus, so any input stays encodable.
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_corpus(files), trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        # Registered as special so that skip_special_tokens drops them and the chat tools find them.
        additional_special_tokens=[t for t in specials if t != EOS_TOKEN],
        model_max_length=DEFAULT_MODEL_MAX_LENGTH,
        # Byte-level decoding is already exact; the legacy clean-up would delete spaces before punctuation.
        clean_up_tokenization_spaces=False,
        chat_template=builtin_template("chatml"),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out)
    return wrapped


def read_token_list(path: str | Path) -> list[str]:
    """Tokens or words from a file, one per line; blank lines and `#` comments are skipped."""
    tokens = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        token = line.strip()
        if token and not token.startswith("#"):
            tokens.append(token)
    return tokens


@dataclass
class ExtendResult:
    """What `extend_tokenizer` did: the new tokenizer, which tokens it added or skipped, the resized model."""

    tokenizer: PreTrainedTokenizerBase
    added: int
    added_tokens: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    model: Any = None


def _is_known(tokenizer: PreTrainedTokenizerBase, token: str, vocab: dict[str, int]) -> bool:
    """Whether `token` already has a single id of its own, alone or as a space-led word.

    A byte-level vocabulary stores "你好" in its byte-symbol spelling, so looking the string up is
    not enough: a token that already encodes to one id is known too. A word the vocabulary knows
    only with its leading space ("Ġword") counts as known as well: adding the bare word would
    split " word" into a space plus the new token and change how existing text tokenizes.
    """
    if token in vocab:
        return True
    return any(len(tokenizer.encode(text, add_special_tokens=False)) == 1 for text in (token, " " + token))


def extend_tokenizer(
    tokenizer_dir: str | Path,
    new_tokens: list[str],
    out_dir: str | Path,
    model: Any = None,
    special: bool = False,
) -> ExtendResult:
    """Add the tokens of `new_tokens` that the tokenizer lacks, save it to `out_dir`, resize `model`.

    Duplicates and tokens that already have a single id are skipped (listed in `skipped`).
    When `model` (a transformers `PreTrainedModel`) is given, its embeddings are resized and the new
    rows set to the mean of the old ones; the model is returned unsaved so the caller picks where.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    old_len = len(tokenizer)
    vocab = tokenizer.get_vocab()
    to_add: list[str] = []
    skipped: list[str] = []
    for token in new_tokens:
        if token in to_add or _is_known(tokenizer, token, vocab):
            skipped.append(token)
        else:
            to_add.append(token)
    if to_add:
        tokenizer.add_tokens(to_add, special_tokens=special)
    added = len(tokenizer) - old_len
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    if model is not None and added:
        new_ids = tokenizer.convert_tokens_to_ids(to_add)
        resize_embeddings_mean(model, len(tokenizer), old_len, new_ids)
    return ExtendResult(tokenizer, added, to_add, skipped, model)


@torch.no_grad()
def resize_embeddings_mean(model: Any, new_vocab: int, old_vocab: int, new_ids: list[int]) -> None:
    """Grow `model`'s embeddings to `new_vocab` rows and set `new_ids` rows to the mean of the old rows.

    The mean of the trained rows keeps the new tokens' logits and hidden states in the range the
    model already produces; random rows can dominate the softmax and wreck the first steps of
    training. Done by hand (mean_resizing=False) so the rule is explicit and reproducible.
    Embedding matrices already larger than the tokenizer (padded vocabularies) are not shrunk.
    """
    input_emb = model.get_input_embeddings()
    rows_before = input_emb.weight.shape[0]
    # Only rows that belonged to real tokens are averaged (not the padding rows of a padded vocabulary).
    trained = min(old_vocab, rows_before)
    output_emb = model.get_output_embeddings()
    input_mean = input_emb.weight[:trained].mean(dim=0)
    output_mean = None
    if output_emb is not None and output_emb.weight.data_ptr() != input_emb.weight.data_ptr():
        output_mean = output_emb.weight[:trained].mean(dim=0)

    if new_vocab > rows_before:
        model.resize_token_embeddings(new_vocab, mean_resizing=False)
    ids = torch.tensor(new_ids, dtype=torch.long)
    model.get_input_embeddings().weight[ids] = input_mean.to(model.get_input_embeddings().weight.dtype)
    if output_mean is not None:
        out_weight = model.get_output_embeddings().weight
        out_weight[ids] = output_mean.to(out_weight.dtype)
