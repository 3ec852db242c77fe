"""A domain data set no one here wrote: Chinese medical files in the shapes MedicalGPT and LLaMA-Factory users
ship (ShareGPT dialogues, MedicalGPT preference pairs, GRPO question/answer records, hard-wrapped
pretraining text), generated here with a known number of hostile records (empty turns, wrong role order,
very long turns, full-width punctuation, BOM, CRLF, broken JSON). Every count the run reports must equal
the number built in, `lmforge data inspect` must read each file, and sft, dpo, pt and grpo must train on
them for a few steps on a tiny model.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.config.load import load_config
from lmforge.config.schema import DataConfig
from lmforge.data.build import load_splits, tokenize_sft
from lmforge.data.errors import ErrorLog

SYMPTOMS = ["头痛", "发热", "咳嗽", "腹泻", "失眠", "胸闷", "腰痛", "皮疹", "咽喉痛", "头晕"]
ADVICE = ["多喝温水，注意休息", "清淡饮食，避免辛辣", "按时服药，一周后复诊", "如持续不缓解，请尽快就医",
          "保持规律作息，适量运动"]
DIALOGUES = 300
EMPTY_TURN, WRONG_ORDER, LONG_TURN, BROKEN_JSON = (5, 17, 40), (10, 77), (3, 150, 299), (123,)
LONG = "患者自述" + "反复头痛伴恶心呕吐，夜间加重，" * 120  # ~1,800 characters: far over max_length


def medical_sft(path: Path) -> dict:
    """ShareGPT dialogues with a BOM, CRLF line ends and known bad rows; returns the expected counts."""
    rng = random.Random(0)
    lines = []
    for i in range(DIALOGUES):
        symptom, advice = rng.choice(SYMPTOMS), rng.choice(ADVICE)
        turns = [{"from": "human", "value": f"医生您好！我最近{symptom}，怎么办？（已经三天了）"},
                 {"from": "gpt", "value": f"您好：{advice}。"}]
        if i % 4 == 0:  # multi-turn, with ASCII and full-width punctuation mixed
            turns += [{"from": "human", "value": "需要吃药吗?要去医院吗？"},
                      {"from": "gpt", "value": "症状轻可先观察;若加重，请到医院检查。"}]
        if i in EMPTY_TURN:
            turns[1]["value"] = "  "
        if i in WRONG_ORDER:
            turns = turns[1:] + turns[:1]
        if i in LONG_TURN:
            turns[0]["value"] = LONG
        record = {"conversations": turns, "system": "你是一名耐心的全科医生。"} if i % 3 == 0 else {"conversations": turns}
        line = json.dumps(record, ensure_ascii=False)
        lines.append(line[:-2] if i in BROKEN_JSON else line)
        if i % 50 == 49:
            lines.append("")  # blank lines are not records
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    bad = len(EMPTY_TURN) + len(WRONG_ORDER) + len(BROKEN_JSON)
    return {"read": DIALOGUES, "kept": DIALOGUES - bad, "skipped": bad,
            "skipped_by_reason": {"invalid JSON": 1, "roles out of order: turn N is 'assistant' first": 2,
                                  "turn N is empty": 3}}


def medical_pairs(path: Path, n: int = 120) -> None:
    """MedicalGPT's reward-data shape: question, response_chosen, response_rejected."""
    rng = random.Random(1)
    rows = [{"question": f"{rng.choice(SYMPTOMS)}应该注意什么？", "response_chosen": f"{rng.choice(ADVICE)}。",
             "response_rejected": "不用管，自己会好的！"} for _ in range(n)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")


def grpo_sample(path: Path, n: int = 40) -> None:
    rows = [{"question": f"成人每天饮水约{k}升，{k + 1}天共多少升？", "answer": k * (k + 1)} for k in range(1, n + 1)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")


PARAGRAPHS = 30


def pt_text(path: Path) -> None:
    """Hard-wrapped prose: paragraphs of 3 short lines separated by blank lines, CRLF."""
    rng = random.Random(2)
    paragraphs = []
    for _ in range(PARAGRAPHS):
        paragraphs.append("\r\n".join(f"{rng.choice(SYMPTOMS)}是常见症状，" for _ in range(2)) + "\r\n"
                          + f"{rng.choice(ADVICE)}。")
    path.write_bytes(("\r\n\r\n".join(paragraphs) + "\r\n").encode("utf-8"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("medical")
    out = {"sft": root / "medical_sft.jsonl", "pairs": root / "medical_pairs.jsonl", "grpo": root / "grpo.jsonl",
           "pt": root / "medical_pt.txt"}
    out["expected"] = medical_sft(out["sft"])
    medical_pairs(out["pairs"])
    grpo_sample(out["grpo"])
    pt_text(out["pt"])
    return out


def test_counts_of_the_hostile_file_equal_what_was_built_in(files, tok, capsys):
    cfg = DataConfig(on_error="skip", eval_split=0, max_length=1024)
    errors = ErrorLog("skip")
    with tempfile.TemporaryDirectory() as cache:
        cfg.train = load_config(None, ["model.scratch=test", f"data.train={files['sft']}"]).data.train
        train, _, _ = load_splits(cfg, errors, cache)
        said = capsys.readouterr().out
        tokenize_sft(train, tok, cfg, errors, pack=False)
    expected = files["expected"]
    counts = errors.by_file()[str(files["sft"])]
    assert {k: counts[k] for k in expected} == expected
    assert len(train) == expected["kept"]
    assert counts["prompt_cut"] == len(LONG_TURN)  # the long first turns are cut, never silently
    assert errors.summary()["by_file"][str(files["sft"])] == counts  # what the manifest records
    assert said == (f"data (read): {files['sft']}: 300 read, 294 kept, 6 skipped (1 invalid JSON, 2 roles out of "
                    "order: turn N is 'assistant' first, 3 turn N is empty)\n")
    assert errors.examples[0] == f"{files['sft']}:line 6: turn 1 (assistant) is empty"  # line 6: record 5


@pytest.mark.parametrize("split, documents, short", [("line", 3 * PARAGRAPHS, True), ("blank", PARAGRAPHS, False),
                                                     ("file", 1, False)])
def test_pretraining_text_reports_its_split(files, capsys, split, documents, short):
    cfg = DataConfig(eval_split=0, text_split=split)
    cfg.train = load_config(None, ["model.scratch=test", f"data.train={files['pt']}"]).data.train
    errors = ErrorLog()
    with tempfile.TemporaryDirectory() as cache:
        train, _, _ = load_splits(cfg, errors, cache)
    said = capsys.readouterr().out
    assert len(train) == documents and not any("\r" in t for t in train["text"])
    assert f"{documents} read, {documents} kept (text_split={split}: {documents} documents" in said
    assert ("hard-wrapped text?" in said) is short


def run_cli(args: list[str], capsys) -> str:
    assert main(args) == 0
    return capsys.readouterr().out


def test_data_inspect_reads_every_file(files, world_tokenizer_dir, capsys):
    common = ["model.scratch=test", f"model.tokenizer={world_tokenizer_dir}", "data.on_error=skip"]
    out = run_cli(["data", "inspect", "--stage", "sft", "-n", "2", *common, f"data.train={files['sft']}"], capsys)
    assert f"{files['sft']}:line 1" in out and "医生您好" in out
    out = run_cli(["data", "inspect", "--stage", "dpo", "-n", "1", *common, f"data.train={files['pairs']}"], capsys)
    assert out.count("应该注意什么？") == 2 and "不用管，自己会好的！" in out  # the prompt under each reply
    out = run_cli(["data", "inspect", "--stage", "grpo", "-n", "1", *common, "rl.rewards=[{kind: answer_match}]",
                   "rl.num_generations=2",
                   f"data.train={files['grpo']}"], capsys)
    assert "reference: 2" in out
    out = run_cli(["data", "inspect", "--stage", "distill", "-n", "1", *common, "distill.teacher=teacher",
                   f"data.train={files['grpo']}"], capsys)
    assert "reference: 2" in out  # distill reads prompts as the RL stages do, not as SFT dialogues
    out = run_cli(["data", "inspect", "--stage", "pt", "-n", "1", *common, "data.text_split=blank",
                   f"data.train={files['pt']}"], capsys)
    assert f"{files['pt']}:line 1" in out


def train(stage: str, files_key: str, files: dict, tokenizer_dir: Path, out: Path, *extra: str) -> dict:
    from lmforge.stages import STAGE_RUNNERS

    cfg = load_config(None, ["model.scratch=test", f"model.tokenizer={tokenizer_dir}", f"data.train={files[files_key]}",
                             "data.on_error=skip", "data.eval_split=0", "data.max_length=128", "train.max_steps=2",
                             "train.batch_size=4", f"train.output_dir={out}", "log.report_to=[]",
                             "log.progress=false", *extra], stage=stage)
    STAGE_RUNNERS[stage](cfg)
    return json.loads((out / "lmforge.json").read_text(encoding="utf-8"))


def test_sft_trains_on_the_hostile_file_and_its_manifest_counts_it(files, world_tokenizer_dir, tmp_path):
    manifest = train("sft", "sft", files, world_tokenizer_dir, tmp_path, "sft.eval_generate=0")
    counts = manifest["data"]["by_file"][str(files["sft"])]
    assert {k: counts[k] for k in files["expected"]} == files["expected"]
    assert manifest["data"]["skipped_records"] == 6 and manifest["metrics"]["train_loss"] > 0


def test_dpo_and_pt_train_on_the_chinese_files(files, world_tokenizer_dir, tmp_path):
    dpo = train("dpo", "pairs", files, world_tokenizer_dir, tmp_path / "dpo", "dpo.eval_generate=0")
    assert dpo["data"]["by_file"][str(files["pairs"])]["kept"] == 120
    pt = train("pt", "pt", files, world_tokenizer_dir, tmp_path / "pt", "data.text_split=blank", "pt.block_size=64")
    assert pt["data"]["by_file"][str(files["pt"])] == {"read": PARAGRAPHS, "kept": PARAGRAPHS, "skipped": 0,
                                                      "skipped_by_reason": {}}
