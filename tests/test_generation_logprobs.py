"""Log-probs only for the rows that ask, tempered log-probs for RL, and token bytes that rebuild the text."""

from __future__ import annotations

import torch
from test_generation_engine import model_of, prompts

from lmforge.generation import Engine, Request, Sampling
from lmforge.serve.logprobs import TokenText, byte_alphabet


def forced_logps(model, prompt: list[int], reply: list[int], temperature: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1)


def test_rows_that_ask_get_logprobs_and_the_others_neither_pay_nor_change():
    model = model_of("llama")
    sampling = Sampling(temperature=0.8, top_p=0.9, seed=4)
    asking = Request(prompts()[1], sampling, max_new_tokens=12, logprobs=True, top_logprobs=4)
    plain = Request(prompts()[3], sampling, max_new_tokens=12)
    engine = Engine(model, slots=4, max_len=64, eos_ids=[])
    together = engine.generate([plain, asking, plain])
    alone = Engine(model, slots=4, max_len=64, eos_ids=[]).generate([plain])[0].samples[0]
    for result in (together[0], together[2]):
        sample = result.samples[0]
        assert sample.logprobs is None and sample.top_logprobs is None
        assert sample.token_ids == alone.token_ids  # another row's log-probs change nothing here
    sample = together[1].samples[0]
    forced = forced_logps(model, prompts()[1], sample.token_ids)
    expected = forced.gather(-1, torch.tensor(sample.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4)
    best = forced.topk(4, dim=-1)
    assert [[t for t, _ in step] for step in sample.top_logprobs] == best.indices.tolist()


def test_tempered_logprobs_are_those_of_the_sampling_distribution():
    model = model_of("qwen3")
    raw, tempered = (Engine(model, slots=2, max_len=64, eos_ids=[]).generate(
        [Request(prompts()[2], Sampling(temperature=1.7, seed=9), max_new_tokens=10, n=2, logprobs=True,
                 tempered_logprobs=t)])[0] for t in (False, True))
    for plain, hot in zip(raw.samples, tempered.samples):
        assert plain.token_ids == hot.token_ids  # the draw is the same; only what is reported differs
        index = torch.tensor(hot.token_ids)[:, None]
        cooled = forced_logps(model, prompts()[2], hot.token_ids, 1.7).gather(-1, index).squeeze(-1)
        assert torch.allclose(torch.tensor(hot.logprobs), cooled, atol=1e-4)
        assert not torch.allclose(torch.tensor(plain.logprobs), cooled, atol=1e-3)
    greedy = Engine(model, slots=1, max_len=64, eos_ids=[]).generate(
        [Request(prompts()[2], Sampling(temperature=0), max_new_tokens=5, logprobs=True, tempered_logprobs=True)])
    sample = greedy[0].samples[0]
    expected = forced_logps(model, prompts()[2], sample.token_ids).gather(
        -1, torch.tensor(sample.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4)  # greedy: the raw distribution


def test_token_bytes_rebuild_chinese_split_across_byte_level_tokens(tok):
    text = "我们今天学习模型。猫与鱼 hello there"  # 猫与鱼 are not in its vocabulary: split into bytes
    ids = tok(text, add_special_tokens=False)["input_ids"]
    text_of = TokenText(tok)
    assert text_of.byte_level
    pieces = [text_of(i) for i in ids]
    assert bytes(b for _, data in pieces for b in data).decode("utf-8") == text
    assert any("\ufffd" in piece for piece, _ in pieces)  # some token holds part of a character
    alphabet = byte_alphabet()
    assert len(alphabet) == 256 and sorted(alphabet.values()) == list(range(256))
    assert alphabet["!"] == ord("!") and alphabet["\u0120"] == ord(" ")  # byte-level BPE's space
