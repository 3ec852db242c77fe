"""Row formats → messages (`lmforge.data.formats`), mixing, and hints for shapes no format reads
(LLaMA-Factory `dataset_info.json` entries: test_dataset_info.py)."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from lmforge.config.schema import DataConfig, DatasetSpec
from lmforge.data.build import load_examples
from lmforge.data.errors import DataError, ErrorLog
from lmforge.data.formats import RowFormat, to_example


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def tool(text: str) -> dict:
    return {"role": "tool", "content": text}


def load(specs: list[DatasetSpec], cache_root: Path, **cfg):
    config = DataConfig(**cfg)
    errors = ErrorLog(config.on_error)
    dataset, _ = load_examples(specs, config, errors, tempfile.mkdtemp(dir=cache_root))
    return dataset, errors


# --------------------------------------------------------------------------- alpaca


def test_alpaca_with_system_history_and_input():
    row = {
        "instruction": "Translate to French.",
        "input": "cheese",
        "output": "fromage",
        "system": "You translate.",
        "history": [["Hi", "Hello!"], ["Who are you?", "A translator."]],
    }
    assert to_example(row, RowFormat()) == {
        "text": "",
        "messages": [
            system("You translate."),
            user("Hi"), assistant("Hello!"),
            user("Who are you?"), assistant("A translator."),
            user("Translate to French.\ncheese"), assistant("fromage"),
        ],
        "tools": "",
        "chat": "",
    }


def test_alpaca_without_input_or_system():
    example = to_example({"instruction": "Say hi.", "input": "", "output": "Hi!", "system": ""}, RowFormat())
    assert example["messages"] == [user("Say hi."), assistant("Hi!")]


def test_alpaca_remapped_columns_are_detected_and_read():
    fmt = RowFormat(columns={"prompt": "question", "query": "context", "response": "answer",
                             "system": "persona", "history": "past"})
    row = {"question": "2+2?", "context": "Be exact.", "answer": "4", "persona": "A calculator.",
           "past": [["1+1?", "2"]]}
    assert to_example(row, fmt)["messages"] == [
        system("A calculator."), user("1+1?"), assistant("2"), user("2+2?\nBe exact."), assistant("4"),
    ]


@pytest.mark.parametrize(("history", "problem"), [
    ("not a list", "field 'history' must be a list of [question, answer] pairs"),
    ([["only question"]], "history[0] must be a [question, answer] pair of strings"),
    ([["q", 3]], "history[0] must be a [question, answer] pair of strings"),
])
def test_alpaca_malformed_history(history, problem):
    with pytest.raises(ValueError) as info:
        to_example({"instruction": "q", "output": "a", "history": history}, RowFormat())
    assert str(info.value) == problem


# --------------------------------------------------------------------------- sharegpt and openai


def test_sharegpt_maps_every_tag_to_a_role():
    row = {"conversations": [
        {"from": "system", "value": "You check the weather."},
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp_c": 20}'},
        {"from": "gpt", "value": "It is 20 degrees in Paris."},
    ]}
    example = to_example(row, RowFormat())
    # `messages` keeps {role, content}, a call as its JSON text; `chat` holds the call itself
    assert example["messages"] == [
        system("You check the weather."),
        user("Weather in Paris?"),
        assistant('{"name": "weather", "arguments": {"city": "Paris"}}'),
        tool('{"temp_c": 20}'),
        assistant("It is 20 degrees in Paris."),
    ]
    assert example["tools"] == "" and example["text"] == ""
    call = json.loads(example["chat"])[2]
    assert call["content"] == "" and json.loads(call["tool_calls"]) == [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]


def test_sharegpt_system_column_and_tools_string_stay_apart_for_the_template():
    tools = '[{"name": "weather", "parameters": {"city": "string"}}]'
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
           "system": "Be kind.", "tools": tools}
    example = to_example(row, RowFormat(formatting="sharegpt"))
    assert example["messages"] == [system("Be kind."), user("Hi"), assistant("Hello")]  # no preamble
    assert json.loads(example["tools"]) == [{"type": "function", "function": json.loads(tools)[0]}]


def test_tools_as_a_list_are_serialised_without_ascii_escapes():
    row = {"messages": [user("天气?"), assistant("晴")], "tools": [{"name": "天气", "parameters": {}}]}
    example = to_example(row, RowFormat())
    assert example["tools"] == '[{"type": "function", "function": {"name": "天气", "parameters": {}}}]'
    assert example["messages"] == row["messages"]


def test_empty_tool_list_adds_no_system_prompt():
    row = {"messages": [user("Hi"), assistant("Hello")], "tools": []}
    assert to_example(row, RowFormat()) == {"text": "", "messages": [user("Hi"), assistant("Hello")], "tools": "",
                                            "chat": ""}


def test_empty_tool_list_as_json_string_adds_no_system_prompt():
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "tools": "[]"}
    assert to_example(row, RowFormat(formatting="sharegpt"))["messages"] == [user("Hi"), assistant("Hello")]


def test_openai_messages_with_tool_turns():
    row = {"messages": [
        system("Use tools."), user("Time?"),
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]},
        tool("12:00"), assistant("It is noon."),
    ]}
    example = to_example(row, RowFormat())
    assert example["messages"] == [*row["messages"][:2], assistant('{"name": "clock", "arguments": {}}'),
                                   *row["messages"][3:]]
    assert json.loads(json.loads(example["chat"])[2]["tool_calls"]) == [
        {"type": "function", "function": {"name": "clock", "arguments": {}}, "id": "c1"}]
    assert example["text"] == "" and example["tools"] == ""


def test_messages_column_with_from_value_is_read_as_sharegpt():
    row = {"messages": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert to_example(row, RowFormat())["messages"] == [user("Q"), assistant("A")]


def test_remapped_column_and_tags():
    fmt = RowFormat(formatting="sharegpt", columns={"messages": "dialog"},
                    tags={"role_tag": "speaker", "content_tag": "text", "user_tag": "Q", "assistant_tag": "A"})
    row = {"dialog": [{"speaker": "Q", "text": "2+2?"}, {"speaker": "A", "text": "4"},
                      {"speaker": "Q", "text": "3+3?"}, {"speaker": "A", "text": "6"}]}
    assert to_example(row, fmt)["messages"] == [user("2+2?"), assistant("4"), user("3+3?"), assistant("6")]
    with pytest.raises(ValueError, match=r"turn 0 has unknown role 'human' \(known: Q, A, system, observation"):
        to_example({"dialog": [{"speaker": "human", "text": "x"}]}, fmt)


def test_llamafactory_style_role_content_tags_under_sharegpt():
    # dataset_info.json entries such as kto_en_demo: formatting sharegpt with OpenAI-style keys.
    fmt = RowFormat(formatting="sharegpt", columns={"messages": "messages"},
                    tags={"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"})
    row = {"messages": [user("Q"), assistant("A")], "label": True}
    assert to_example(row, fmt)["messages"] == [user("Q"), assistant("A")]


def test_turn_content_must_be_a_string():
    with pytest.raises(ValueError, match="^turn 1 content must be a string, got NoneType$"):
        to_example({"messages": [user("Q"), {"role": "assistant", "content": None}]}, RowFormat())


# --------------------------------------------------------------------------- replacements and text


def test_replacements_fill_every_string_field():
    fmt = RowFormat(replacements={"{{name}}": "Forge", "{{author}}": "LMForge Team"})
    row = {"instruction": "Who is {{name}}?", "output": "I am {{name}}, built by {{author}}. {{name}}!"}
    assert to_example(row, fmt)["messages"] == [
        user("Who is Forge?"), assistant("I am Forge, built by LMForge Team. Forge!"),
    ]
    nested = {"conversations": [{"from": "human", "value": "name?"}, {"from": "gpt", "value": "{{name}}"}]}
    assert to_example(nested, fmt)["messages"][1] == assistant("Forge")


def test_text_rows():
    assert to_example({"text": "A document."}, RowFormat()) == {"text": "A document.", "messages": [], "tools": "",
                                                                 "chat": ""}
    body = RowFormat(formatting="text", columns={"prompt": "body"})
    assert to_example({"body": "Other column.", "text": "ignored"}, body)["text"] == "Other column."
    with pytest.raises(ValueError, match="^field 'text' is empty$"):
        to_example({"text": "   "}, RowFormat())
    with pytest.raises(ValueError, match="^field 'body' must be a string, got int$"):
        to_example({"body": 7}, body)


def test_forced_formatting_overrides_detection():
    row = {"text": "doc", "instruction": "q", "output": "a"}
    assert to_example(row, RowFormat())["messages"] == [user("q"), assistant("a")]  # alpaca wins in auto
    assert to_example(row, RowFormat(formatting="text"))["text"] == "doc"


# --------------------------------------------------------------------------- mixing


def write_alpaca(path: Path, tag: str, n: int) -> Path:
    rows = [json.dumps({"instruction": f"{tag} question {i}", "output": f"{tag} answer {i}"}) for i in range(n)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def origin(source: str) -> tuple[str, int]:
    """`/x/a.jsonl:line 3` → ("a", 2): the file's stem and the 0-based record index."""
    file, where = source.rsplit(":", 1)
    return Path(file).stem, int(where.split()[1]) - 1


def test_equal_weights_concatenate_in_order(tmp_path):
    a = write_alpaca(tmp_path / "a.jsonl", "A", 30)
    b = write_alpaca(tmp_path / "b.jsonl", "B", 10)
    mixed, _ = load([DatasetSpec(path=str(a), weight=2.0), DatasetSpec(path=str(b), weight=2.0)], tmp_path)
    assert len(mixed) == 40
    assert [origin(s) for s in mixed["source"]] == [("a", i) for i in range(30)] + [("b", i) for i in range(10)]
    assert mixed[30]["messages"] == [user("B question 0"), assistant("B answer 0")]


def test_unequal_weights_interleave_by_probability(tmp_path):
    a = write_alpaca(tmp_path / "a.jsonl", "A", 200)
    b = write_alpaca(tmp_path / "b.jsonl", "B", 200)
    specs = [DatasetSpec(path=str(a), weight=3.0), DatasetSpec(path=str(b), weight=1.0)]
    mixed, _ = load(specs, tmp_path)
    origins = [origin(s) for s in mixed["source"]]
    counts = Counter(name for name, _ in origins)
    # all_exhausted: the mix ends when the rarer source has been read once in full; the other repeats.
    assert counts["b"] == 200
    assert 0.70 < counts["a"] / len(mixed) < 0.80
    assert len(mixed) == counts["a"] + counts["b"]
    for name in ("a", "b"):
        indices = [i for n, i in origins if n == name]
        assert indices == [k % 200 for k in range(len(indices))]  # each source is read in order, cycling
    # A record keeps its content through the mix.
    first_b = next(k for k, (n, _) in enumerate(origins) if n == "b")
    assert mixed[first_b]["messages"] == [user("B question 0"), assistant("B answer 0")]
    # The mix is reproducible for a seed and changes with it.
    again, _ = load(specs, tmp_path)
    assert again["source"] == mixed["source"]
    other, _ = load(specs, tmp_path, seed=7)
    assert other["source"] != mixed["source"]


# --------------------------------------------------------------------------- hints for unknown shapes

RP_SEED = "你是孙悟空，说话豪爽。"
# (row, the setting the hint must name, the row format that setting is, the messages it must then read)
READABLE_SHAPES = [
    ({"query": "头痛怎么办？", "response": "多休息。"}, "formatting: alpaca, columns: {prompt: query, response: response}",
     RowFormat("alpaca", {"prompt": "query", "response": "response"}), [user("头痛怎么办？"), assistant("多休息。")]),
    ({"kind": "Summary", "input": "长文", "target": "摘要"}, "formatting: alpaca, columns: {prompt: input, response: target}",
     RowFormat("alpaca", {"prompt": "input", "response": "target"}), [user("长文"), assistant("摘要")]),
    ({"content": "一篇新闻", "summary": "新闻摘要"}, "columns: {prompt: content, response: summary}",
     RowFormat("alpaca", {"prompt": "content", "response": "summary"}), [user("一篇新闻"), assistant("新闻摘要")]),
    ({"title": "标题", "content": "正文"}, "columns: {prompt: title, response: content}",
     RowFormat("alpaca", {"prompt": "title", "response": "content"}), [user("标题"), assistant("正文")]),
    ({"questions": "发烧怎么办", "answers": "多喝水"}, "columns: {prompt: questions, response: answers}",
     RowFormat("alpaca", {"prompt": "questions", "response": "answers"}), [user("发烧怎么办"), assistant("多喝水")]),
    ({"prompt": "Hi", "completion": "Hello"}, "columns: {prompt: prompt, response: completion}",
     RowFormat("alpaca", {"prompt": "prompt", "response": "completion"}), [user("Hi"), assistant("Hello")]),
    ({"character": "孙悟空", "seed": RP_SEED,
      "dialogue": [{"speaker": "游客", "text": "你是谁？"}, {"speaker": "孙悟空", "text": "俺老孙是也！"}]},
     "formatting: sharegpt, columns: {messages: dialogue, system: seed}, tags: {role_tag: speaker, content_tag: "
     "text, user_tag: 游客, assistant_tag: 孙悟空}",
     RowFormat("sharegpt", {"messages": "dialogue", "system": "seed"},
               {"role_tag": "speaker", "content_tag": "text", "user_tag": "游客", "assistant_tag": "孙悟空"}),
     [system(RP_SEED), user("你是谁？"), assistant("俺老孙是也！")]),
]


@pytest.mark.parametrize("row, setting, fmt, messages", READABLE_SHAPES, ids=lambda v: "" if not isinstance(v, dict)
                         else ",".join(v)[:40])
def test_an_unknown_shape_gets_the_setting_that_reads_it(row, setting, fmt, messages):
    with pytest.raises(ValueError) as info:
        to_example(row, RowFormat())
    message = str(info.value)
    assert message.startswith(f"cannot tell the format from the keys ({', '.join(sorted(row))}); set ")
    assert setting in message and "\n" not in message
    assert to_example(row, fmt)["messages"] == messages  # the hinted setting really reads the record


@pytest.mark.parametrize("row, says", [
    ({"question": "q", "response_chosen": "a", "response_rejected": "b"}, "preference pairs: train them with rm or dpo"),
    ({"head": "感冒", "relation": "症状", "tail": "发热"}, "knowledge-graph triples"),
    ({"system": "你是医生", "conversation": [{"human": "头痛", "assistant": "休息"}]},
     "each turn of conversation holds a whole exchange (assistant, human)"),
    ({"data": ["问：头痛怎么办", "答：多休息"]}, "data is a list of strings"),
    ({"document": "一段很长的文字"}, "formatting: text, columns: {prompt: document}"),
    ({"id": 3, "score": 0.5}, "set formatting and columns"),
])
def test_shapes_no_setting_reads_say_what_they_look_like(row, says):
    with pytest.raises(ValueError, match="cannot tell the format") as info:
        to_example(row, RowFormat())
    assert says in str(info.value)


def test_the_hint_reaches_the_user_with_file_and_line(tmp_path):
    path = tmp_path / "summaries.jsonl"
    path.write_text('{"content": "文章", "summary": "摘要"}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load([DatasetSpec(path=str(path))], tmp_path, on_error="raise")
    assert str(info.value) == (f"{path}:line 1: cannot tell the format from the keys (content, summary); set "
                               "formatting: alpaca, columns: {prompt: content, response: summary}")
