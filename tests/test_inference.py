"""Using a model: `lmforge generate` over a dataset and `lmforge chat` in a terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.cli import main
from lmforge.config.errors import ConfigError
from lmforge.data.templates import end_of_turn_ids, render_prompt
from lmforge.eval.suite import read_records
from lmforge.inference.chat import chat_loop
from lmforge.rollout.generate import generate


def test_generate_answers_every_record_in_file_order(base, world_dir, tmp_path):
    out = tmp_path / "answers.jsonl"
    data = world_dir / "rl" / "eval.jsonl"
    assert main(["generate", str(base), "--data", str(data), "--out", str(out), "--max-samples", "12",
                 "--max-new-tokens", "12", "--batch-size", "5"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    records = read_records(str(data), "prompt", 12)
    assert [line["prompt"] for line in lines] == [r["prompt"] for r in records]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    one_by_one = [generate(model, tokenizer, [r["prompt"]], max_new_tokens=12)[0].text for r in records]
    assert [line["response"] for line in lines] == one_by_one  # sorting and batching change nothing
    assert all(line["reference"] for line in lines)
    assert main(["generate", str(base), "--data", str(data), "--out", str(out)]) == 2  # never overwritten


def test_chat_keeps_history_and_obeys_commands(base):
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    typed = iter(["What is 2 plus 3?", "And 4 plus 4?", "/system Be brief.", "/reset", "/nope", "/exit"])
    written: list[str] = []
    chat_loop(model, tokenizer, max_new_tokens=10, temperature=0.0, read=lambda _: next(typed),
              write=written.append)
    out = "".join(written)
    first = generate(model, tokenizer, [[{"role": "user", "content": "What is 2 plus 3?"}]], max_new_tokens=10)[0]
    second = generate(model, tokenizer, [[{"role": "user", "content": "What is 2 plus 3?"},
                                          {"role": "assistant", "content": first.text.strip()},
                                          {"role": "user", "content": "And 4 plus 4?"}]], max_new_tokens=10)[0]
    assert out.count("bot> ") == 2
    assert f"bot> {first.text}" in out.replace("\n", " ") or first.text.strip() in out
    assert second.text.strip() in out  # the second turn saw the first
    assert "system prompt set" in out and "conversation cleared" in out and "unknown command /nope" in out


def test_chat_command_streams_in_a_terminal(base):
    """The real command in a pseudo-terminal: a two-turn exchange, then /exit."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "chat", str(base), "--temperature", "0",
                                "--max-new-tokens", "8"], stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    seen = b""

    def read_until(marker: bytes, count: int, timeout: float = 120) -> None:
        nonlocal seen
        deadline = time.time() + timeout
        while seen.count(marker) < count and time.time() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    seen += os.read(leader, 4096)
                except OSError:
                    break

    read_until(b"you> ", 1)
    os.write(leader, b"Where does Ansa live?\n")
    read_until(b"you> ", 2)
    os.write(leader, b"And her age?\n")
    read_until(b"you> ", 3)
    os.write(leader, b"/exit\n")
    assert process.wait(timeout=60) == 0
    os.close(leader)
    assert seen.count(b"bot> ") == 2 and b"/reset" in seen


def test_held_out_answers_equal_transformers_greedy(base, world_dir):
    """The engine answers exactly what HF `generate` answered greedily (the demo figures rest on it),
    whatever the rows it shares a step with."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)
    conversations = [r["prompt"] for r in read_records(str(world_dir / "rl" / "eval.jsonl"), "prompt", 5)]
    ours = generate(model, tokenizer, conversations, max_new_tokens=20, batch_size=2)
    stops = end_of_turn_ids(tokenizer)
    for conversation, answer in zip(conversations, ours):
        ids = tokenizer(render_prompt(tokenizer, conversation), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            row = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        assert answer.token_ids == (row if cut is None else row[:cut])
        assert answer.stopped == (cut is not None)
        assert answer.text == tokenizer.decode(answer.token_ids, skip_special_tokens=True).rstrip("\ufffd")


def test_chat_says_when_the_conversation_outgrows_the_model(base):
    """A turn that cannot fit the model's positions is refused in one line; the chat goes on."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    positions = model.config.max_position_embeddings
    typed = iter(["word " * positions, "/reset", "Hi", "/exit"])
    written: list[str] = []
    chat_loop(model, tokenizer, max_new_tokens=4, temperature=0.0, read=lambda _: next(typed), write=written.append)
    out = "".join(written)
    assert out.count("bot> ") == 2 and "max_len" in out and "/reset to start over" in out
    assert "Traceback" not in out


def test_bad_sampling_settings_are_one_line_errors(base, world_dir, tmp_path):
    data = str(world_dir / "rl" / "eval.jsonl")
    assert main(["generate", str(base), "--data", data, "--out", str(tmp_path / "a.jsonl"),
                 "--temperature", "-1"]) == 2
    assert main(["generate", str(base), "--data", data, "--out", str(tmp_path / "a.jsonl"),
                 "--max-new-tokens", "0"]) == 2
    assert not (tmp_path / "a.jsonl").exists()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    with pytest.raises(ConfigError, match="top_p"):
        chat_loop(model, tokenizer, temperature=0.7, top_p=0.0, read=lambda _: "/exit", write=lambda _: None)


def test_held_out_prompts_past_the_models_positions_are_answered_not_fatal():
    from lmforge.rollout.generate import fitted

    cases = fitted([[1] * 10, [2] * 60, [3] * 200], max_new_tokens=32, max_len=64)
    assert [(len(p), n) for p, n in cases] == [(10, 32), (48, 16), (48, 16)]
    assert cases[2][0] == [3] * 48  # the end of the prompt is kept: the template opens the model's turn there
    assert all(len(p) + n <= 64 for p, n in cases)


WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_chat_shows_reasoning_and_tool_calls_and_keeps_them_structured(world_tokenizer_dir, monkeypatch):
    """The model's replies are scripted: what matters is how chat shows them and renders the next turn."""
    import lmforge.inference.chat as chat

    tokenizer = AutoTokenizer.from_pretrained(world_tokenizer_dir)  # ChatML: Hermes tool calls
    replies = iter(['<think>\nNeed the weather.\n</think>\n\nChecking.\n<tool_call>\n{"name": "get_weather", '
                    '"arguments": {"city": "Paris"}}\n</tool_call>', "It is sunny."])
    prompts = []

    def scripted(model, tok, messages, *args, engine=None, tools=None):
        prompts.append(chat.chat_prompt(tok, messages, tools))
        text = next(replies)
        yield from (text[i:i + 4] for i in range(0, len(text), 4))

    monkeypatch.setattr(chat, "reply_stream", scripted)
    monkeypatch.setattr(chat, "chat_engine", lambda model, tok: None)
    typed = iter(["Weather in Paris?", "hello?", "/tool {\"sky\": \"sunny\"}", "/tool again", "/exit"])
    written: list[str] = []
    chat.chat_loop(None, tokenizer, read=lambda _: next(typed), write=written.append, tools=WEATHER)
    out = "".join(written)
    assert "bot> [thinking] Need the weather.\nChecking.\n[tool call] get_weather {\"city\": \"Paris\"}" in out
    assert "answer with /tool RESULT" in out and "answer with /tool RESULT first" in out  # "hello?" refused
    assert "no tool call is waiting" in out  # the second /tool: the call had its result
    trained = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "Checking.", "reasoning_content": "Need the weather.",
                "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": "{\"sky\": \"sunny\"}"}]
    assert len(prompts) == 2 and prompts[1] == render_prompt(tokenizer, trained, tools=WEATHER)
    assert "<tools>" in prompts[0] and "<tool_response>" in prompts[1]


def test_chat_tools_need_a_template_with_a_tool_format(base, tmp_path):
    from lmforge.inference.chat import read_tools

    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(ConfigError, match="no tool-call format"):
        chat_loop(model, tokenizer, tools=WEATHER, read=lambda _: "/exit", write=lambda _: None)
    bad = tmp_path / "tools.json"
    bad.write_text('[{"description": "no name"}]')
    with pytest.raises(ConfigError, match=r"--tools .*tools.json: tools\[0\] has no function name"):
        read_tools(str(bad))
    assert main(["chat", str(base), "--tools", str(tmp_path / "missing.json")]) == 2
