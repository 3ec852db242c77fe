"""What a user switching from another toolkit hits first (issue 24): model and tokenizer paths that do not
exist (refused in one line naming the key and the command that makes the folder, before transformers
takes them for a hub id), template names that do not exist (refused when the config is read), and
prompt-only RL data shipped as `question` / `answer` records (read, the answer reaching the rewards)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.chaos


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a refused command; fails on a traceback or a zero exit."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_pt_demo_before_data_demo_names_the_tokenizer_key_and_the_commands(tmp_path):
    """examples/pt_demo.yaml in a fresh folder: data/demo/tokenizer is not there yet."""
    example = Path(__file__).resolve().parents[2] / "examples" / "pt_demo.yaml"
    config = write(tmp_path / "pt_demo.yaml", example.read_text(encoding="utf-8"))
    line = one_line_error(run_cli(tmp_path, "train", "pt", str(config)))
    assert "model.tokenizer" in line and "no such folder" in line and "data/demo/tokenizer" in line
    assert "lmforge data demo data/demo" in line and "lmforge tokenizer train" in line
    assert "Repo id" not in line


@pytest.mark.parametrize(("model_lines", "key", "words"), [
    ("  name_or_path: models/missing-model\n", "model.name_or_path", ["no such folder"]),
    ("  name_or_path: ./runs/sft\n", "model.name_or_path", ["no such folder", "lmforge train"]),
    ("  name_or_path: HuggingFaceTB/SmolLM2-135M\n", "model.name_or_path", ["never downloads", "--local-dir"]),
    ("  scratch: tiny\n  tokenizer: tokenizers/mine\n", "model.tokenizer", ["no such folder",
                                                                            "lmforge tokenizer train"]),
    ("  scratch: tiny\n  tokenizer: Qwen/Qwen2.5-0.5B\n", "model.tokenizer", ["never downloads"]),
    ("  scratch: tiny\n  tokenizer: notes.txt\n", "model.tokenizer", ["not a folder"]),
    ("  scratch: tiny\n  tokenizer: empty\n", "model.tokenizer", ["no tokenizer files"]),
])
def test_missing_model_or_tokenizer_folder_is_one_line(tmp_path, model_lines, key, words):
    write(tmp_path / "notes.txt", "not a tokenizer\n")
    (tmp_path / "empty").mkdir()
    write(tmp_path / "train.txt", "some text\n")
    config = write(tmp_path / "c.yaml", f"stage: pt\nmodel:\n{model_lines}data:\n  train: [train.txt]\n"
                                        "train:\n  output_dir: out\n")
    line = one_line_error(run_cli(tmp_path, "train", "pt", str(config)))
    assert key in line, line
    for word in words:
        assert word in line, line


@pytest.mark.parametrize("name, says", [("llama4", "is not a template"), ("Chatml", "is not a template"),
                                        ("llama-3", "is not a template"), ("../templates/chatml", "no such file"),
                                        ("chatml.jinja", "no such file")])
def test_unknown_template_is_refused_when_the_config_is_read(tmp_path, name, says):
    """Before: an unknown name passed validation and crashed with a traceback after the model loaded. A name
    with a slash or a .jinja suffix is a path to the user's own template, refused when it does not exist."""
    from lmforge.config.errors import ConfigError
    from lmforge.config.load import load_config

    with pytest.raises(ConfigError, match=rf"model\.template.*{says}.*auto, baichuan2, chatml"):
        load_config(None, [f"model.template={name}", "model.scratch=tiny", "data.train=x.jsonl",
                           f"train.output_dir={tmp_path}"], stage="sft")


def test_unknown_template_in_a_yaml_file_is_one_cli_line_before_any_loading(tmp_path):
    config = write(tmp_path / "c.yaml", "stage: sft\nmodel:\n  scratch: tiny\n  tokenizer: nowhere\n"
                                        "  template: llama4\ndata:\n  train: [x.jsonl]\ntrain:\n  output_dir: out\n")
    line = one_line_error(run_cli(tmp_path, "train", "sft", str(config)))
    assert "model.template" in line and "llama4" in line and "chatml" in line, line
    assert "no such folder" not in line  # refused when read, before the tokenizer folder is looked at


def test_known_templates_still_load():
    from lmforge.config.schema import ModelConfig

    assert [ModelConfig(scratch="tiny", template=name).template for name in ("auto", "chatml", "plain")] == [
        "auto", "chatml", "plain"]


QA_ROWS = [{"question": "What is 2 plus 3?", "answer": "5"}, {"question": "Name the capital of France.",
                                                               "answer": "Paris"},
           {"question": "What is 4 times 4?", "answer": 16}, {"question": "Say yes.", "answer": "yes"}]
RECORDER = '''import json, os

def reward(prompts, responses, **columns):
    with open(os.environ["LMFORGE_TEST_REWARD_ROWS"], "a", encoding="utf-8") as out:
        for prompt, reference, answer in zip(prompts, columns["reference"], columns["answer"]):
            out.write(json.dumps({"prompt": prompt, "reference": reference, "answer": answer}) + "\\n")
    return [0.0] * len(responses)
'''


def test_question_answer_records_train_grpo_with_the_answer_reaching_the_rewards(base, tmp_path, monkeypatch):
    """The shape domain GRPO projects ship: {question, answer}. Before: "cannot tell the format from the
    keys (answer, question)". The question is the user prompt; the answer reaches exact/answer-match rows."""
    import json

    from lmforge.config.load import load_config
    from lmforge.stages import STAGE_RUNNERS

    data = write(tmp_path / "qa.jsonl", "".join(json.dumps(r) + "\n" for r in QA_ROWS))
    rows_file = tmp_path / "reward_rows.jsonl"
    monkeypatch.setenv("LMFORGE_TEST_REWARD_ROWS", str(rows_file))
    recorder = write(tmp_path / "recorder.py", RECORDER)
    cfg = load_config(None, [f"model.name_or_path={base}", f"data.train={data}", f"data.eval={data}",
                             "data.max_length=96", "rl.max_new_tokens=4", "rl.prompts_per_step=4",
                             "rl.num_generations=2", "rl.eval_prompts=4", "train.batch_size=8", "train.max_steps=1",
                             f"rl.rewards=[{{kind: function, function: '{recorder}:reward'}}, {{kind: answer_match}}]",
                             f"train.output_dir={tmp_path / 'out'}", "log.progress=false", "log.report_to=[]"],
                      stage="grpo")
    STAGE_RUNNERS["grpo"](cfg)
    seen = [json.loads(line) for line in rows_file.read_text(encoding="utf-8").splitlines()]
    expected = {r["question"]: str(r["answer"]) for r in QA_ROWS}
    assert len(seen) >= len(QA_ROWS) * 2  # the held-out pass and one training iteration of 4 prompts x 2
    for row in seen:
        question = row["prompt"][-1]["content"]
        assert row["prompt"][-1]["role"] == "user" and question in expected
        assert row["reference"] == expected[question] and row["answer"] == expected[question]
    assert {row["prompt"][-1]["content"] for row in seen} == set(expected)


def test_question_answer_records_read_as_a_dialogue_in_sft():
    """The same file read by SFT (and by `data inspect` of an SFT config): question = user, answer = reply."""
    from lmforge.data.formats import RowFormat, to_example

    row = {"question": "What is 4 times 4?", "answer": 16, "system": "Be brief."}
    assert to_example(row, RowFormat())["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 4 times 4?"},
        {"role": "assistant", "content": "16"}]
    assert to_example({"question": "Hi?", "response": "Hello."}, RowFormat())["messages"][-1]["content"] == "Hello."
    with pytest.raises(ValueError, match="'answer' must be a string"):
        to_example({"question": "Hi?", "answer": ["a", "b"]}, RowFormat())


def test_data_inspect_of_a_grpo_config_reads_prompts_as_grpo_does(base, tmp_path, capsys):
    """Before: `data inspect` read a GRPO file as SFT and refused {question, answer} records."""
    import json

    from lmforge.cli import main

    data = write(tmp_path / "qa.jsonl", "".join(json.dumps(r) + "\n" for r in QA_ROWS))
    config = write(tmp_path / "grpo.yaml", f"stage: grpo\nmodel:\n  name_or_path: {base}\ndata:\n  train: [{data}]\n"
                                           "rl:\n  num_generations: 2\n  rewards: [{kind: answer_match}]\n"
                                           f"train:\n  output_dir: {tmp_path / 'out'}\n")
    assert main(["data", "inspect", str(config), "-n", "4"]) == 0
    out = capsys.readouterr().out
    assert all(r["question"] in out for r in QA_ROWS), out
    assert "reference: Paris" in out and "reference: 16" in out, out
    assert "qa.jsonl:line 3" in out.replace("\n", ""), out
