"""Multiple-choice evaluation: layout readers, their errors, and scores of models whose answers are known."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import EN_WORDS, ZH_WORDS
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.data.errors import DataError
from lmforge.data.templates import render_prompt
from lmforge.eval.choice import ChoiceQuestion, choice_eval, format_question, read_choice_file, score_options

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "choice"


@pytest.fixture(autouse=True)
def one_thread():
    """Width-32 matrices gain nothing from threads, and on a busy shared CPU two spin-waiting threads make
    each step about 40 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- readers ---------------------------------------------------------------------------------------------

def _summary(questions: list[ChoiceQuestion]) -> list[tuple]:
    return [(q.id, q.question, q.options, q.answer_letter, q.line) for q in questions]


def test_ceval_layout_with_chinese_bom_and_a_multiline_question() -> None:
    assert _summary(read_choice_file(FIXTURES / "ceval_val.csv")) == [
        ("0", "下列哪个城市是中国的首都？", ["上海", "北京", "广州", "深圳"], "B", 2),
        ("1", "计算下式：\n1+1=？", ["1", "2", "3", "4"], "B", 3),  # a quoted field over lines 3-4
        ("2", "水的化学式是什么？", ["H2O", "CO2", "NaCl", "O2"], "A", 5),
    ]


def test_cmmlu_layout_unnamed_index_column() -> None:
    assert _summary(read_choice_file(FIXTURES / "cmmlu_anatomy.csv")) == [
        ("0", "人体最大的器官是什么？", ["心脏", "肝脏", "皮肤", "肺"], "C", 2),
        ("1", "成年人一般有多少块骨头？", ["106", "206", "306", "406"], "B", 3),
    ]


def test_mmlu_layout_without_header() -> None:
    questions = read_choice_file(FIXTURES / "mmlu_test.csv")
    assert _summary(questions)[1] == ("1", "Which planet is called the Red Planet, usually?",
                                      ["Venus", "Mars", "Jupiter", "Saturn"], "B", 2)
    assert [q.answer_letter for q in questions] == ["B", "B", "C"]
    assert [q.line for q in questions] == [1, 2, 3]


def test_json_lines_and_json_list() -> None:
    assert _summary(read_choice_file(FIXTURES / "qa.jsonl")) == [
        ("q1", "Pick the even number.", ["3", "8"], "B", 1),
        ("1", "Which is a colour?", ["red", "dog", "run", "up", "six"], "A", 3),  # a 0-based int answer
    ]
    assert _summary(read_choice_file(FIXTURES / "qa_list.json")) == [
        ("0", "Which ocean is the largest?", ["Atlantic", "Pacific", "Indian"], "B", 2),
        ("7", "2 * 3 =", ["5", "6"], "B", 7),  # lower-case keys, numbers as options
    ]


def test_folder_reads_every_file_sorted_with_file_prefixed_ids() -> None:
    questions = read_choice_file(FIXTURES)
    assert len(questions) == 12
    assert [q.id for q in questions][:4] == ["ceval_val/0", "ceval_val/1", "ceval_val/2", "cmmlu_anatomy/0"]
    assert [q.id for q in questions][-4:] == ["qa/q1", "qa/1", "qa_list/0", "qa_list/7"]


def test_crlf_and_bom_and_a_shorter_question_in_a_five_option_file(tmp_path: Path) -> None:
    path = tmp_path / "crlf.csv"
    rows = ["id,question,A,B,C,D,E,answer", "a,中文问题？,甲,乙,丙,丁,戊,E", "b,Four only?,w,x,y,z,,D"]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode("utf-8") + b"\r\n")
    assert _summary(read_choice_file(path)) == [("a", "中文问题？", ["甲", "乙", "丙", "丁", "戊"], "E", 2),
                                                ("b", "Four only?", ["w", "x", "y", "z"], "D", 3)]


BAD_FILES = [
    ("no_answer.csv", "id,question,A,B,C,D\n0,q,a,b,c,d\n", "line 1", "missing column 'answer'"),
    ("empty_question.csv", "id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,  ,a,b,c,d,B\n", "line 3",
     "empty question"),
    ("letter.csv", ",Question,A,B,C,D,Answer\n0,q,a,b,c,d,E\n", "line 2", "'E' is not among the options A-D"),
    ("after_multiline.csv", 'id,question,A,B,C,D,answer\n0,"two\nlines",a,b,c,d,A\n1,q,a,b,c,d,Z\n', "line 4",
     "not among the options"),
    ("gap.csv", "q,a,,c,d,A\n", "line 1", "option B is empty"),
    ("width.csv", "q,a,b,c,d,A\nq,a,b,c,A\n", "line 2", "5 fields where the first row has 6"),
    ("header_only.csv", "id,question,A,B,C,D,answer\n", "file", "empty file"),
    ("empty.jsonl", "", "file", "empty file"),
    ("one_option.jsonl", '{"question": "q", "A": "x", "answer": "A"}\n', "line 1", "fewer than 2 options"),
    ("no_answer.jsonl", '{"question": "q", "A": "x", "B": "y"}\n', "line 1", "missing key 'answer'"),
    ("index.jsonl", '{"question": "q", "A": "x", "B": "y", "answer": 0}\n'
     '{"question": "q", "A": "x", "B": "y", "answer": 2}\n', "line 2", "answer index 2 is out of range"),
    ("broken.jsonl", '{"question": "q", "A": "x", "B": "y", "answer": "A"}\n{"question": \n', "line 2",
     "invalid JSON"),
    ("list.json", '[\n {"question": "q", "A": "a", "B": "b", "answer": "A"},\n'
     ' {"question": "", "A": "a", "B": "b", "answer": "A"}\n]\n', "line 3", "empty question"),
]


@pytest.mark.parametrize(("name", "text", "where", "problem"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_rows_name_file_line_and_problem(tmp_path: Path, name: str, text: str, where: str,
                                             problem: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_choice_file(path)
    assert (caught.value.source, caught.value.where) == (str(path), where)
    assert problem in caught.value.problem and str(path) in str(caught.value)


GOOD_LINE = {"csv": b"q1,a,b,A\n", "jsonl": b'{"question": "q", "A": "a", "B": "b", "answer": "A"}\n',
             "json": b'[{"question": "q", "A": "a", "B": "b", "answer": "A"},\n'}


@pytest.mark.parametrize("suffix", GOOD_LINE)
def test_invalid_utf8_names_its_line(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"bytes.{suffix}"
    path.write_bytes(GOOD_LINE[suffix] + b'"q2 \xff"\n')
    with pytest.raises(DataError, match="invalid UTF-8") as caught:
        read_choice_file(path)
    assert (caught.value.source, caught.value.where) == (str(path), "line 2")


# ---- scoring ---------------------------------------------------------------------------------------------

class UnigramLM(torch.nn.Module):
    """Next-token log-probs that ignore the context, so an option's score is a sum written out by hand."""

    def __init__(self, logps: torch.Tensor):
        super().__init__()
        self.logps = torch.nn.Parameter(logps)

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **_):
        logits = self.logps.expand(*input_ids.shape, -1)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_scores_are_sums_of_option_token_logps_and_norm_divides_by_characters(tok) -> None:
    question = ChoiceQuestion("u", "Which?", ["hello", "the model learns from data", "you", "again"], 1, 1)
    logits = torch.zeros(len(tok))
    for token in tok(" the model learns from data", add_special_tokens=False)["input_ids"]:
        logits[token] = 4.0
    logps = torch.log_softmax(logits, dim=-1)
    model = UnigramLM(logps)
    for chat, space in ((False, " "), (True, "")):  # plain text: " option" after "Answer:"; chat: the reply
        continuations = [space + text for text in question.options]
        tokens = [tok(c, add_special_tokens=False)["input_ids"] for c in continuations]
        by_hand = [sum(logps[t].item() for t in ids) for ids in tokens]
        assert score_options(model, tok, [question], chat=chat)[0] == pytest.approx(by_hand, abs=1e-4)
        per_char = [s / len(c) for s, c in zip(by_hand, continuations)]
        pick, pick_norm = max(range(4), key=by_hand.__getitem__), max(range(4), key=per_char.__getitem__)
        assert pick != 1 and pick_norm == 1  # sum: a short option; per character: the long, favoured one
        result = choice_eval(model, tok, [question], chat=chat)
        assert (result["choice_accuracy"], result["choice_accuracy_norm"], result["answered"]) == (0, 1, 1)
        assert result["per_question"] == [{"id": "u", "predicted": "ABCD"[pick], "answer": "B"}]


def _questions(count: int = 12) -> list[ChoiceQuestion]:
    rng = random.Random(0)
    questions = []
    for i in range(count):
        words, ask = (sorted(set(EN_WORDS)), "Which word goes with {}?") if i % 3 else (ZH_WORDS, "哪个词和{}搭配？")
        subject, *options = rng.sample(words, 5)
        questions.append(ChoiceQuestion(f"q{i}", ask.format(subject), options, rng.randrange(4), i + 1))
    return questions


def _tiny_llama(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config)


def _teach(model, tok, questions: list[ChoiceQuestion], steps: int) -> None:
    """Train on each question's right option, as plain text and as a chat reply (loss on the option only)."""
    pairs = []
    for q in questions:
        right = q.options[q.answer]
        pairs.append((format_question(q), " " + right))
        pairs.append((render_prompt(tok, [{"role": "user", "content": format_question(q)}]), right))
    rows = [(tok(c)["input_ids"], tok(c + a)["input_ids"]) for c, a in pairs]
    width = max(len(whole) for _, whole in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (context, whole) in enumerate(rows):
        input_ids[i, : len(whole)] = torch.tensor(whole)
        labels[i, len(context): len(whole)] = torch.tensor(whole[len(context):])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=(labels != -100) | (input_ids != tok.pad_token_id),
                     labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_a_taught_model_answers_every_question_and_an_untaught_one_does_not(tok) -> None:
    questions = _questions()
    model = _tiny_llama(tok)
    untaught = choice_eval(model, tok, questions, chat=False)
    _teach(model, tok, questions, steps=200)
    model.train()
    for chat in (False, None):  # None: the tokenizer's ChatML template
        taught = choice_eval(model, tok, questions, batch_size=5, chat=chat)
        assert (taught["choice_accuracy"], taught["choice_accuracy_norm"], taught["answered"]) == (1, 1, 12)
        assert [p["predicted"] for p in taught["per_question"]] == [q.answer_letter for q in questions]
    assert model.training  # restored after evaluation
    # Its preferences are the taught answers, not a letter or a position: moved answers are all wrong.
    moved = [replace(q, answer=(q.answer + 1) % 4) for q in questions]
    assert choice_eval(model, tok, moved)["choice_accuracy"] == 0.0
    assert untaught["choice_accuracy"] <= 0.5
    # Right padding inside a batch changes no score.
    one = score_options(model, tok, questions, batch_size=1)
    assert torch.allclose(torch.tensor(score_options(model, tok, questions, batch_size=7)), torch.tensor(one),
                          atol=1e-4)
    shots = choice_eval(model, tok, questions[2:], few_shot=questions[:2], chat=False)
    assert shots["answered"] == 10 and 0.0 <= shots["choice_accuracy"] <= 1.0
    assert choice_eval(model, tok, []) == {}
