"""Prompt-only data for online RL (`lmforge.data.prompts`, `load_examples(kind="prompt")`) and the rewards
that score sampled replies (`lmforge.rollout.rewards`)."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
from conftest import SHARED_DATA

from lmforge.config.errors import ConfigError
from lmforge.config.schema import DataConfig, DatasetSpec, RewardSpec
from lmforge.data.build import load_examples
from lmforge.data.errors import DataError, ErrorLog
from lmforge.data.formats import RowFormat
from lmforge.data.prompts import to_prompt
from lmforge.rollout.rewards import RewardSet, build_reward, decode_rows
from lmforge.rollout.score import score_responses

USER = [{"role": "user", "content": "What is 7 plus 8?"}]
SYSTEM = {"role": "system", "content": "Answer briefly."}


def prompt_of(row: dict, **fmt) -> dict:
    out = to_prompt(row, RowFormat(**fmt))
    return {**out, "extra": json.loads(out["extra"])}


# --------------------------------------------------------------------------- record forms


def test_trl_string_prompt_with_a_numeric_solution():
    row = {"prompt": "What is 7 plus 8?", "solution": 15, "id": 3, "meta": {"nested": 1}}
    assert prompt_of(row) == {"prompt": USER, "reference": "15", "answer": "", "extra": {"id": 3}}


def test_trl_reference_is_the_first_present_column_and_answer_is_kept_apart():
    row = {"prompt": "What is 7 plus 8?", "ground_truth": "7 plus 8 equals 15.", "answer": 15}
    assert prompt_of(row) == {"prompt": USER, "reference": "7 plus 8 equals 15.", "answer": "15", "extra": {}}
    assert prompt_of({"prompt": "What is 7 plus 8?", "answer": "15"})["reference"] == "15"


def test_trl_messages_with_system_and_a_conversational_completion():
    row = {"prompt": [SYSTEM, *USER], "completion": [{"role": "assistant", "content": "15"}], "lang": "en"}
    assert prompt_of(row) == {"prompt": [SYSTEM, *USER], "reference": "15", "answer": "", "extra": {"lang": "en"}}
    # ShareGPT turns and a separate system column: the system turn is put in front.
    sharegpt = {"prompt": [{"from": "human", "value": "What is 7 plus 8?"}], "system": "Answer briefly."}
    assert prompt_of(sharegpt)["prompt"] == [SYSTEM, *USER]


def test_medicalgpt_question_answer():
    row = {"question": "What is 7 plus 8?", "system": "Answer briefly.", "answer": "It is 15."}
    assert prompt_of(row) == {"prompt": [SYSTEM, *USER], "reference": "It is 15.", "answer": "It is 15.",
                              "extra": {}}
    assert prompt_of({"question": "What is 7 plus 8?", "response": "15"})["reference"] == "15"


def test_alpaca_with_and_without_output():
    row = {"instruction": "Add the numbers.", "input": "7 and 8", "output": "15", "category": "math"}
    assert prompt_of(row) == {"prompt": [{"role": "user", "content": "Add the numbers.\n7 and 8"}],
                              "reference": "15", "answer": "", "extra": {"category": "math"}}
    assert prompt_of({"instruction": "Add 7 and 8."})["reference"] == ""


def test_sharegpt_multi_turn_last_reply_is_the_reference():
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                             {"from": "human", "value": "What is 7 plus 8?"}, {"from": "gpt", "value": "15"}]}
    out = prompt_of(row)
    assert out["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, *USER]
    assert out["reference"] == "15"


def test_openai_messages_ending_with_assistant_or_user():
    ending_with_reply = {"messages": [SYSTEM, *USER, {"role": "assistant", "content": "15"}]}
    assert prompt_of(ending_with_reply)["prompt"] == [SYSTEM, *USER]
    assert prompt_of(ending_with_reply)["reference"] == "15"
    ending_with_user = {"messages": [SYSTEM, *USER]}
    assert prompt_of(ending_with_user) == {"prompt": [SYSTEM, *USER], "reference": "", "answer": "", "extra": {}}


def test_demo_world_record_keeps_answer_and_grading_columns():
    row = {"messages": [*USER, {"role": "assistant", "content": "7 plus 8 equals 15."}], "answer": "15",
           "lang": "en", "kind": "arith", "id": "train-en-arith-0", "subject": "7 + 8", "distractors": []}
    out = prompt_of(row)
    assert (out["prompt"], out["reference"], out["answer"]) == (USER, "7 plus 8 equals 15.", "15")
    assert out["extra"] == {"lang": "en", "kind": "arith", "id": "train-en-arith-0", "subject": "7 + 8",
                            "distractors": []}


def test_preference_records_use_the_chosen_reply_and_false_kto_labels_none():
    assert prompt_of({"prompt": "What is 7 plus 8?", "chosen": "15", "rejected": "16"})["reference"] == "15"
    kto = {"messages": [*USER, {"role": "assistant", "content": "16"}], "label": False}
    assert prompt_of(kto, columns={"kto_tag": "label"})["reference"] == ""
    assert prompt_of({**kto, "label": True}, columns={"kto_tag": "label"})["reference"] == "16"


@pytest.mark.parametrize(("row", "problem"), [
    ({"prompt": "  "}, "turn 0 (user) is empty"),
    ({"prompt": [*USER, {"role": "assistant", "content": "15"}]}, "the prompt must end with a user turn"),
    ({"messages": [SYSTEM]}, "the prompt must end with a user turn"),
    ({"prompt": 5}, "prompt must be a string or a non-empty list of messages"),
    ({"prompt": "q", "answer": [15]}, "field 'answer' must be a string or a number, got list"),
    ({"prompt": "q", "system": 1}, "field 'system' must be a string, got int"),
    ({"id": 1}, "no prompt found in the keys (id)"),
])
def test_bad_prompt_records(row, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        to_prompt(row, RowFormat())


# --------------------------------------------------------------------------- loading


def load(specs, **cfg):
    errors = ErrorLog(cfg.pop("on_error", "raise"))
    config = DataConfig(dataset_dir=str(SHARED_DATA), **cfg)
    with tempfile.TemporaryDirectory() as cache:
        dataset, _ = load_examples(specs, config, errors, cache, kind="prompt")
        return list(dataset), errors


def shared(name: str) -> list[dict]:
    return json.loads((SHARED_DATA / name).read_text(encoding="utf-8"))


def test_llamafactory_alpaca_by_name_and_by_path():
    raw = shared("alpaca_en_demo.json")
    by_name, _ = load([DatasetSpec(name="alpaca_en_demo")])
    by_path, _ = load([DatasetSpec(path=str(SHARED_DATA / "alpaca_en_demo.json"))])
    assert len(by_name) == len(by_path) == len(raw)
    assert by_name[1]["prompt"] == [{"role": "user", "content": raw[1]["instruction"]}]
    assert by_name[1]["reference"] == raw[1]["output"] == "The car accelerated rapidly."
    assert by_path[1] == {**by_name[1], "source": by_path[1]["source"]}
    assert by_name[1]["source"].endswith("alpaca_en_demo.json:record 1")


def test_llamafactory_sharegpt_tool_calls():
    raw = shared("glaive_toolcall_en_demo.json")
    rows, _ = load([DatasetSpec(name="glaive_toolcall_en_demo")])
    assert len(rows) == len(raw)
    turns = raw[0]["conversations"]
    assert rows[0]["prompt"][0] == {"role": "user", "content": turns[0]["value"]}  # tools are no system preamble
    assert json.loads(rows[0]["tools"])[0]["function"]["name"] == "search_recipes"  # for the template's tools=
    assert rows[0]["prompt"][-1] == {"role": "user", "content": turns[-2]["value"]}
    assert rows[0]["reference"] == turns[-1]["value"]


def test_llamafactory_ranking_entry_serves_as_prompts_with_the_chosen_reference():
    raw = shared("dpo_en_demo.json")
    rows, _ = load([DatasetSpec(name="dpo_en_demo")])
    assert len(rows) == len(raw)
    assert rows[0]["prompt"][-1]["content"] == raw[0]["conversations"][-1]["value"]
    assert rows[0]["reference"] == raw[0]["chosen"]["value"]
    assert json.loads(rows[0]["extra"]) == {}


def test_folder_of_prompt_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "What is 7 plus 8?", "answer": 15}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"question": "What is 2 plus 2?", "answer": "4"}) + "\n")
    rows, _ = load([DatasetSpec(path=str(tmp_path))])
    assert sorted((r["prompt"][-1]["content"], r["answer"]) for r in rows) == [
        ("What is 2 plus 2?", "4"), ("What is 7 plus 8?", "15")]


def test_bad_prompt_record_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    good = json.dumps({"prompt": "What is 7 plus 8?"})
    path.write_text("\n".join([good, good, json.dumps({"prompt": [*USER, {"role": "assistant", "content": "x"}]})])
                    + "\n")
    with pytest.raises(DataError) as caught:
        load([DatasetSpec(path=str(path))])
    assert (caught.value.source, caught.value.where, caught.value.problem) == (
        str(path), "line 3", "the prompt must end with a user turn")
    rows, errors = load([DatasetSpec(path=str(path))], on_error="skip")
    assert len(rows) == 2 and errors.skipped == {str(path): 1}


# --------------------------------------------------------------------------- rewards


def rows_for(*records: dict, lengths=None) -> tuple[list[list[dict]], dict[str, list]]:
    """(prompts, rows) for prompt records, as an RL stage would pass them."""
    normal = [to_prompt(r, RowFormat()) for r in records]
    rows = decode_rows(normal)
    rows["response_lengths"] = lengths or [1] * len(records)
    rows["stopped"] = [True] * len(records)
    return [n["prompt"] for n in normal], rows


def score(spec: RewardSpec, records: list[dict], responses: list[str], **kw) -> list[float]:
    prompts, rows = rows_for(*records, **kw)
    return build_reward(spec)(prompts, responses, rows)


def test_decode_rows_fills_missing_extra_fields_with_none():
    _, rows = rows_for({"prompt": "a", "kind": "arith", "answer": 1}, {"prompt": "b", "lang": "zh"})
    assert rows == {"reference": ["1", ""], "answer": ["1", ""], "kind": ["arith", None], "lang": [None, "zh"],
                    "response_lengths": [1, 1], "stopped": [True, True]}


def test_exact_match_ignores_whitespace_and_refuses_missing_references():
    record = {"prompt": "What is 7 plus 8?", "reference": "The answer is 15."}
    replies = ["  The answer\n is   15. ", "The answer is 16.", "the answer is 15.", "Ｔｈｅ answer is １５．"]
    assert score(RewardSpec(kind="exact_match"), [record] * 4, replies) == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="sample 1 has no reference answer"):
        score(RewardSpec(kind="exact_match"), [record, {"prompt": "q"}], ["x", "y"])
    with pytest.raises(ValueError, match="sample 0 has no reference answer"):  # blank is missing, not a match
        score(RewardSpec(kind="exact_match"), [{"prompt": "q", "reference": " \u200b "}], [""])


def test_answer_match_reads_gsm8k_solutions_and_boxed_answers():
    gsm8k = {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
             "answer": "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72"}
    replies = ["She sold 48/2 = 24, so 48+24 = 72.\n#### 72", "#### 24", "The answer is 72.", "\\boxed{72}",
               "She sold 24 and 72"]
    assert score(RewardSpec(kind="answer_match"), [gsm8k] * 5, replies) == [1.0, 0.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="sample 0 has neither an answer nor a reference"):
        score(RewardSpec(kind="answer_match"), [{"prompt": "q", "answer": "#### "}], ["x"])


def test_answer_match_numbers_words_and_chinese():
    arith = {"prompt": "What is 7 plus 8?", "answer": 15}
    replies = ["7 plus 8 equals 15.", "7 plus 8 equals 16.", "16 or 15", "It is 15.0", "15", "I don't know."]
    assert score(RewardSpec(kind="answer_match"), [arith] * 6, replies) == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    zh_sum = {"prompt": "7 加 8 等于多少？", "answer": "15"}
    assert score(RewardSpec(kind="answer_match"), [zh_sum] * 2, ["7 加 8 等于 15。", "等于16"]) == [1.0, 0.0]
    colour = {"prompt": "What colour is Nobe?", "answer": "red", "distractors": ["blue", "green"]}
    replies = ["Nobe is red.", "Nobe is reddish.", "Red or blue."]
    assert score(RewardSpec(kind="answer_match"), [colour] * 3, replies) == [1.0, 0.0, 0.0]
    zh = {"prompt": "Nobe 是什么颜色？", "answer": "红色", "distractors": ["蓝色"]}
    assert score(RewardSpec(kind="answer_match"), [zh] * 3, ["Nobe 是红色的。", "是蓝色。", "红色或蓝色"]) == [1.0, 0.0, 0.0]
    # Without an answer column the reference is the answer.
    assert score(RewardSpec(kind="answer_match"), [{"prompt": "Capital?", "reference": "Paris"}],
                 ["It is Paris."]) == [1.0]


def test_regex_reward_and_bad_pattern():
    assert score(RewardSpec(kind="regex", pattern=r"^\d+$"), [{"prompt": "q"}] * 2, ["15", "fifteen"]) == [1.0, 0.0]
    with pytest.raises(ConfigError, match=r"regex pattern '\(unclosed' does not compile"):
        build_reward(RewardSpec(kind="regex", pattern="(unclosed"))


def test_length_penalty_past_the_target():
    spec = RewardSpec(kind="length", target_length=10)
    assert score(spec, [{"prompt": "q"}] * 4, ["a"] * 4, lengths=[5, 10, 15, 30]) == [0.0, 0.0, -0.5, -2.0]


REWARD_FILE = '''
import math

def kind_bonus(prompts, responses, kind, **rows):
    return [1.0 if k == "arith" else 0.0 for k in kind]

def one_value(prompts, responses, **rows):
    return [1.0]

def not_finite(prompts, responses, **rows):
    return [math.nan] * len(responses)
'''


def test_function_reward_from_a_file_receives_extra_columns(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FILE)
    records = [{"prompt": "a", "kind": "arith"}, {"prompt": "b", "kind": "colour"}, {"prompt": "c"}]
    spec = RewardSpec(kind="function", function=f"{path}:kind_bonus")
    assert score(spec, records, ["x", "y", "z"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"reward function .*my_rewards.py:one_value returned 1 rewards for 3"):
        score(RewardSpec(kind="function", function=f"{path}:one_value"), records, ["x", "y", "z"])
    with pytest.raises(ValueError, match=r"not_finite returned nan for response 0; expected a finite number"):
        score(RewardSpec(kind="function", function=f"{path}:not_finite"), records[:1], ["x"])


def test_function_reward_from_a_module_and_import_failures(tmp_path, monkeypatch):
    (tmp_path / "lmforge_test_reward_mod.py").write_text(REWARD_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = RewardSpec(kind="function", function="lmforge_test_reward_mod:kind_bonus")
    assert score(spec, [{"prompt": "a", "kind": "arith"}], ["x"]) == [1.0]
    (tmp_path / "broken.py").write_text("import no_such_package_xyz\n")
    cases = {"no_such_module_xyz:f": "cannot import 'no_such_module_xyz:f'",
             f"{tmp_path}/missing.py:f": "no file",
             f"{tmp_path}/broken.py:f": "ModuleNotFoundError",
             "lmforge_test_reward_mod:nope": "has no function 'nope'",
             "no_colon": "must read package.module:function"}
    for target, problem in cases.items():
        with pytest.raises(ConfigError, match=problem):
            build_reward(RewardSpec(kind="function", function=target))


@pytest.fixture()
def tiny_rm(tmp_path, tok):
    """A 2-layer Llama with a scalar head, saved with its ChatML tokenizer, as the RM stage writes one."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm", model, tok


def test_model_reward_loads_lazily_and_scores_like_score_responses(tiny_rm):
    path, model, tok = tiny_rm
    reward = build_reward(RewardSpec(kind="model", path=str(path)))
    assert reward.model is None  # nothing loaded until the first rollout is scored
    records = [{"prompt": "hello there"}, {"prompt": "我们 今天 学习"}, {"prompt": "the model learns"}]
    prompts, rows = rows_for(*records)
    replies = ["hi you are forge", "好的", "from data and the training loop"]
    got = reward(prompts, responses=replies, rows=rows)
    assert got == pytest.approx(score_responses(model, tok, prompts, replies), abs=1e-5)
    # Batched with padding equals one at a time.
    assert got == pytest.approx([score_responses(model, tok, [p], [r])[0] for p, r in zip(prompts, replies)],
                                abs=1e-5)
    assert len(set(got)) == 3


def test_reward_set_total_is_the_weighted_sum_of_named_components(tiny_rm):
    path, _, _ = tiny_rm
    specs = [RewardSpec(kind="model", path=str(path), weight=0.5), RewardSpec(kind="exact_match", weight=1.0),
             RewardSpec(kind="answer_match", weight=2.0), RewardSpec(kind="regex", pattern="15", weight=-1.0),
             RewardSpec(kind="regex", pattern="^7", weight=0.25), RewardSpec(kind="length", target_length=2,
                                                                              weight=0.1)]
    rewards = RewardSet(specs)
    records = [{"prompt": "What is 7 plus 8?", "reference": "7 plus 8 equals 15.", "answer": 15}] * 2
    prompts, rows = rows_for(*records, lengths=[3, 8])
    total, parts = rewards(prompts, ["7 plus 8 equals 15.", "It is 16."], rows)
    assert list(parts) == ["model", "exact_match", "answer_match", "regex", "regex_2", "length"]
    assert parts["exact_match"].tolist() == [1.0, 0.0] and parts["answer_match"].tolist() == [1.0, 0.0]
    assert parts["regex"].tolist() == [1.0, 0.0] and parts["regex_2"].tolist() == [1.0, 0.0]
    assert parts["length"].tolist() == [-0.5, -3.0]
    expected = sum(s.weight * parts[name] for s, name in zip(specs, parts))
    assert total.dtype == torch.float32 and total.shape == (2,)
    assert torch.allclose(total, expected)
    assert total[1].item() == pytest.approx(0.5 * parts["model"][1].item() + 0.1 * -3.0)
    with pytest.raises(ValueError, match=r"rows\['stopped'\] has 1 entries for 2 responses"):
        rewards(prompts, ["a", "b"], {**rows, "stopped": [True]})
