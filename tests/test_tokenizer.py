"""Tests for lmforge.models.tokenizer: BPE training, exact round-trips, the chat template, extension."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lmforge.models.tokenizer import (
    extend_tokenizer,
    iter_corpus,
    read_token_list,
    train_tokenizer,
)

VOCAB_SIZE = 600
EN_WORDS = (
    "the model learns from data and the training loop updates every weight with a small step "
    "tokenizer vocabulary merges frequent pairs of bytes into longer tokens so text gets shorter "
    "language models predict the next token given all previous tokens in the sequence"
).split()
ZH_WORDS = [
    "机器学习",
    "我们",
    "今天",
    "模型",
    "训练",
    "数据",
    "语言",
    "中文",
    "分词器",
    "词表",
    "学习",
    "很好",
]
ROUND_TRIP = [
    "The tokenizer learns merges from data.",
    "我们今天学习机器学习，模型训练需要数据。",
    "Mixed 中文 and English: 分词器 tokenizer 123!",
    "emoji 🤗🚀 and a family 👨‍👩‍👧 plus é, ß, Ω",
    "  leading spaces\n\n\ttabs\t and trailing   \r\n",
    "unseen script: Привет, こんにちは, 안녕하세요, العربية",
    "",
]


def _corpus_lines(n: int = 400, seed: int = 0) -> list[str]:
    """Random English and Chinese sentences, enough for every requested merge to appear twice."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 2:
            lines.append("".join(rng.choices(ZH_WORDS, k=8)) + "。")
        else:
            lines.append(" ".join(rng.choices(EN_WORDS, k=10)).capitalize() + ".")
    return lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(_corpus_lines()) + "\n", encoding="utf-8")
    out = root / "tokenizer"
    train_tokenizer([corpus], out, vocab_size=VOCAB_SIZE)
    return out


@pytest.fixture()
def tokenizer(trained):
    return AutoTokenizer.from_pretrained(str(trained))


def test_saved_folder_loads_with_exact_vocab_size(trained, tokenizer):
    assert (trained / "tokenizer.json").is_file()
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.model_max_length == 2048
    assert tokenizer.bos_token is None


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    # Byte-level BPE never needs an unknown token: at most one token per UTF-8 byte.
    assert len(ids) <= len(text.encode("utf-8"))


def test_special_tokens_are_single_ids(tokenizer):
    for token, expected_id in (("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)):
        assert tokenizer.encode(token, add_special_tokens=False) == [expected_id]
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.encode("hi", add_special_tokens=False)[:1] != [0]  # no BOS/EOS added implicitly
    ids = tokenizer.encode("<|im_start|>user\n你好<|im_end|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\n你好"


def test_chatml_template_renders_exactly(tokenizer):
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"


def test_frequent_chinese_word_is_merged(tokenizer):
    word = "机器学习"
    ids = tokenizer.encode(word, add_special_tokens=False)
    assert len(word.encode("utf-8")) == 12
    assert len(ids) <= 2
    sentence = "我们今天训练模型"
    assert len(tokenizer.encode(sentence, add_special_tokens=False)) < len(sentence)


def test_small_corpus_gives_smaller_vocab(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("abc abc abc\n", encoding="utf-8")
    tok = train_tokenizer([corpus], tmp_path / "out", vocab_size=4000)
    assert 256 + 3 <= len(tok) < 4000
    assert tok.decode(tok.encode("中文 🤗", add_special_tokens=False)) == "中文 🤗"


def test_vocab_smaller_than_alphabet_is_rejected(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer([corpus], tmp_path / "out", vocab_size=100)


def test_jsonl_text_and_messages_are_read(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [
        {"text": "plain text"},
        {"messages": [{"role": "user", "content": "量子计算"}, {"role": "assistant", "content": "好的"}]},
        {"conversations": [{"from": "human", "value": "sharegpt turn"}]},
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n", encoding="utf-8")
    assert list(iter_corpus([path])) == ["plain text", "量子计算", "好的", "sharegpt turn"]

    path.write_text(
        "\n".join(json.dumps(records[1], ensure_ascii=False) for _ in range(50)), encoding="utf-8"
    )
    tok = train_tokenizer([path], tmp_path / "out", vocab_size=300)
    assert len(tok.encode("量子计算", add_special_tokens=False)) == 1


def test_read_token_list(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text(
        "# domain words\n量子纠缠\n\n  lmforge  \n# another comment\n<|tool|>\n", encoding="utf-8"
    )
    assert read_token_list(path) == ["量子纠缠", "lmforge", "<|tool|>"]


def test_extend_adds_only_new_tokens(trained, tokenizer, tmp_path):
    # Preconditions: "机器学习" is one token; "the" is one token only as the word " the".
    assert len(tokenizer.encode("机器学习", add_special_tokens=False)) == 1
    assert len(tokenizer.encode(" the", add_special_tokens=False)) == 1
    old_len = len(tokenizer)
    new_tokens = ["量子纠缠", "lmforge", "量子纠缠", "机器学习", "the", "<|im_end|>"]
    result = extend_tokenizer(trained, new_tokens, tmp_path / "ext")
    assert result.added == 2
    assert result.added_tokens == ["量子纠缠", "lmforge"]
    assert result.skipped == ["量子纠缠", "机器学习", "the", "<|im_end|>"]

    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "ext"))
    assert len(reloaded) == old_len + 2
    assert reloaded.encode("量子纠缠", add_special_tokens=False) == [old_len]
    assert reloaded.encode("lmforge", add_special_tokens=False) == [old_len + 1]
    text = "我们研究量子纠缠 with lmforge, the end."
    ids = reloaded.encode(text, add_special_tokens=False)
    assert old_len in ids and old_len + 1 in ids
    assert reloaded.decode(ids) == text
    # The template and the special tokens survive the round trip through disk.
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded.eos_token_id == reloaded.pad_token_id == 0


def test_extend_special_tokens_are_skippable(trained, tmp_path):
    result = extend_tokenizer(trained, ["<|tool|>"], tmp_path / "ext", special=True)
    tok = result.tokenizer
    ids = tok.encode("a<|tool|>b", add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<|tool|>") in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


@pytest.mark.parametrize("tied", [True, False])
def test_extend_resizes_model_with_mean_rows(trained, tokenizer, tmp_path, tied):
    torch.manual_seed(0)
    old_len = len(tokenizer)
    config = LlamaConfig(
        vocab_size=old_len,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    result = extend_tokenizer(trained, ["量子纠缠", "lmforge", "域名词"], tmp_path / "ext", model=model)
    assert result.added == 3 and result.model is model
    new_in = model.get_input_embeddings().weight.detach()
    new_out = model.get_output_embeddings().weight.detach()
    assert new_in.shape == (old_len + 3, 32)
    assert new_out.shape == (old_len + 3, 32)
    assert model.config.vocab_size == old_len + 3
    assert torch.equal(new_in[:old_len], old_in)
    assert torch.allclose(new_in[old_len:], old_in.mean(dim=0).expand(3, -1), atol=1e-6)
    assert torch.equal(new_out[:old_len], old_out)
    assert torch.allclose(new_out[old_len:], old_out.mean(dim=0).expand(3, -1), atol=1e-6)
    if tied:
        assert new_out.data_ptr() == new_in.data_ptr()
    else:
        assert not torch.allclose(old_in.mean(dim=0), old_out.mean(dim=0))

    ids = result.tokenizer("研究量子纠缠 lmforge", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], old_len + 3)
    assert torch.isfinite(logits).all()


def test_extend_without_new_tokens_leaves_model_alone(trained, tokenizer, tmp_path):
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    )
    result = extend_tokenizer(trained, ["<|im_start|>", "the"], tmp_path / "ext", model=model)
    assert result.added == 0
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert (tmp_path / "ext" / "tokenizer.json").is_file()
