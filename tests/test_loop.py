"""The training loop: equivalences, exact resume after SIGKILL, atomic checkpoints, NaN stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.config.schema import LogConfig, TrainConfig
from lmforge.data.packing import collate, pack_samples, pack_stream
from lmforge.loop.checkpoint import LoopState, latest_checkpoint, list_checkpoints, save_checkpoint
from lmforge.loop.schedule import lr_factor
from lmforge.loop.trainer import Trainer, TrainingDiverged
from lmforge.models.heads import lm_loss

NO_LOG = LogConfig(report_to=[], progress=False)


def tiny_model(seed: int = 0, vocab: int = 50) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def random_rows(n: int, seed: int = 0, vocab: int = 50) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(6, 20, (1,), generator=g))
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        labels = [-100] * (length // 3) + ids[length // 3:]  # a masked prompt, then a reply
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def train_weights(tmp_path: Path, batch_size: int, grad_accum: int, rows: list[dict]) -> dict:
    model = tiny_model()
    cfg = TrainConfig(output_dir=str(tmp_path), batch_size=batch_size, grad_accum=grad_accum, max_steps=3,
                      lr=1e-2, warmup_ratio=0.0, scheduler="constant", max_grad_norm=1e9, logging_steps=1)
    Trainer(model, rows, partial(collate, pad_id=0), lm_loss, cfg, NO_LOG).train()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_grad_accum_1x8_equals_8x1(tmp_path):
    # Same 8 rows per optimizer step: one micro-batch of 8, or 8 micro-batches of 1 (uneven lengths,
    # so a per-micro-batch mean would differ; the token-normalised sum must not).
    rows = random_rows(24)
    one_big = train_weights(tmp_path / "a", batch_size=8, grad_accum=1, rows=rows)
    many_small = train_weights(tmp_path / "b", batch_size=1, grad_accum=8, rows=rows)
    changed = 0
    for name, value in one_big.items():
        assert torch.allclose(value, many_small[name], atol=2e-6), name
        changed += not torch.equal(value, tiny_model().state_dict()[name])
    assert changed > 10  # the weights did move


def test_packed_loss_equals_one_by_one():
    model = tiny_model().eval()
    rows = random_rows(6, seed=3)
    with torch.no_grad():
        total, count = 0.0, 0
        for row in rows:
            batch = collate([row], pad_id=0)
            loss_sum, n, _ = lm_loss(model, batch)
            total, count = total + float(loss_sum), count + int(n)
        packed = pack_samples(rows, max_length=64)
        assert len(packed) < len(rows)  # several documents share a row
        loss_sum, n, _ = lm_loss(model, collate(packed, pad_id=0))
    assert int(n) == count
    assert float(loss_sum) == pytest.approx(total, rel=1e-5)


def test_padded_batch_equals_one_by_one():
    model = tiny_model().eval()
    rows = random_rows(5, seed=4)
    with torch.no_grad():
        single = sum(float(lm_loss(model, collate([r], pad_id=0))[0]) for r in rows)
        batched = float(lm_loss(model, collate(rows, pad_id=0))[0])
    assert batched == pytest.approx(single, rel=1e-5)


def test_pack_stream_rows_and_positions():
    docs = [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 10, 0]]
    rows = list(pack_stream(docs, block_size=5))
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 0, 4], [5, 0, 6, 7, 8], [9, 10, 0]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 1, 2]]
    # the first token of each attention span is never a target
    assert rows[0]["labels"] == [-100, 2, 3, 0, -100]


def test_lr_schedule_warmup_then_cosine_to_floor():
    factors = [lr_factor(s, total=10, warmup=2, kind="cosine", floor=0.1) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 7 / 8)).item()))
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss_sum, n, metrics = lm_loss(model, batch)
        return (loss_sum * float("nan") if calls["n"] > 4 else loss_sum), n, metrics

    cfg = TrainConfig(output_dir=str(tmp_path), batch_size=4, max_steps=10, save_steps=2, lr=1e-3)
    trainer = Trainer(tiny_model(), random_rows(40), partial(collate, pad_id=0), poisoned, cfg, NO_LOG)
    with pytest.raises(TrainingDiverged, match="step 5.*checkpoint-4"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    assert load_file(str(tmp_path / "checkpoints" / "checkpoint-4" / "trainable.safetensors"))


def test_half_written_checkpoint_is_ignored_and_pruned(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, LoopState(step=step), model, optimizer, scheduler, keep=2)
    broken = tmp_path / "checkpoints" / "checkpoint-9"
    broken.mkdir()  # a crash mid-copy (no trainer_state.json) must never be picked up
    (tmp_path / "checkpoints" / ".tmp-checkpoint-10-1").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-2", "checkpoint-3"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"


def test_checkpoint_checksums_cover_every_file_and_catch_an_edited_state(tmp_path):
    from lmforge.loop.checkpoint import CHECKSUMS, CheckpointError, load_checkpoint, verify_checksums

    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    folder = save_checkpoint(tmp_path, LoopState(step=3, tokens=99), model, optimizer, scheduler, keep=0)
    listed = json.loads((folder / CHECKSUMS).read_text())
    assert sorted(listed) == sorted(p.name for p in folder.iterdir() if p.name != CHECKSUMS)
    assert load_checkpoint(folder, model, optimizer, scheduler).tokens == 99
    state = folder / "trainer_state.json"
    state.write_text(state.read_text().replace("99", "98"))  # still valid JSON: only the checksum can tell
    with pytest.raises(CheckpointError, match="trainer_state.json is corrupted"):
        load_checkpoint(folder, model, optimizer, scheduler)
    (folder / "rng.pt").unlink()
    with pytest.raises(CheckpointError, match="rng.pt is missing"):
        verify_checksums(folder)


def test_pruning_renames_before_deleting_and_sweeps_what_a_kill_left(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    root = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, LoopState(step=1), model, optimizer, scheduler, keep=1)
    left = root / ".trash-checkpoint-0-999999"  # a run killed while deleting an old checkpoint
    left.mkdir()
    (left / "optimizer.pt").write_bytes(b"half")
    save_checkpoint(tmp_path, LoopState(step=2), model, optimizer, scheduler, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2"]


def _pt_command(world_dir: Path, tokenizer_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmforge.cli", "train", "pt", "model.scratch=test", f"model.tokenizer={tokenizer_dir}",
            f"data.train={world_dir / 'pt' / 'train.txt'}", "data.eval_split=0", "pt.block_size=64",
            "train.batch_size=4", "train.max_steps=40", "train.save_steps=4", "train.lr=3e-3",
            "log.report_to=[]", "log.progress=false", f"train.output_dir={out}", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_weights(tmp_path, world_dir, world_tokenizer_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_pt_command(world_dir, world_tokenizer_dir, straight), check=True, env=env,
                   capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_pt_command(world_dir, world_tokenizer_dir, killed), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_checkpoint(killed) is None or latest_checkpoint(killed).name == "checkpoint-4":
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "lmforge.json").exists()  # it really died mid-run
    resumed_from = latest_checkpoint(killed).name
    subprocess.run(_pt_command(world_dir, world_tokenizer_dir, killed, "train.resume=true"), check=True,
                   env=env, capture_output=True)

    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resuming from {resumed_from}"


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    from lmforge.config.schema import LoraConfig, ModelConfig
    from lmforge.models.adapters import apply_finetuning

    rows = random_rows(16)
    plain = train_weights(tmp_path / "plain", batch_size=4, grad_accum=1, rows=rows)
    model = apply_finetuning(tiny_model(), ModelConfig(scratch="test", gradient_checkpointing=True), LoraConfig())
    assert model.is_gradient_checkpointing
    cfg = TrainConfig(output_dir=str(tmp_path / "ckpt"), batch_size=4, max_steps=3, lr=1e-2, warmup_ratio=0.0,
                      scheduler="constant", max_grad_norm=1e9)
    Trainer(model, rows, partial(collate, pad_id=0), lm_loss, cfg, NO_LOG).train()
    for name, value in model.state_dict().items():
        assert torch.allclose(value, plain[name], atol=1e-6), name


def test_group_by_length_batches_similar_lengths_and_keeps_every_row_once():
    from lmforge.loop.trainer import epoch_batches

    lengths = [10 if i % 4 else 150 for i in range(400)]  # a quarter long, spread through the data
    grouped = epoch_batches(400, 8, seed=0, epoch=0, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(400))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in grouped)
    shuffled = sum(len(b) * max(lengths[i] for i in b) for b in epoch_batches(400, 8, seed=0, epoch=0))
    assert padded < shuffled / 2.5  # far less padding than random batches
    assert grouped == epoch_batches(400, 8, seed=0, epoch=0, lengths=lengths)  # a resume sees the same order
    assert grouped != epoch_batches(400, 8, seed=0, epoch=1, lengths=lengths)


# -- what a resume keeps ------------------------------------------------------------------------------------
class Crash(Exception):
    """A run dying between two checkpoints (as SIGKILL would, with the steps after the save logged)."""


def tagged_run(out: Path, tag: int, crash_at: int | None = None, **train) -> Trainer:
    """A trainer whose every logged step carries `tag` (which run wrote the line), dying at `crash_at`."""
    calls = {"n": 0}

    def loss(model, batch):
        if model.training:
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise Crash()
        loss_sum, n, _ = lm_loss(model, batch)
        return loss_sum, n, {"run": torch.tensor(float(tag))}

    cfg = TrainConfig(output_dir=str(out), batch_size=4, max_steps=8, save_steps=3, logging_steps=1, eval_steps=2,
                      lr=1e-2, **train)
    rows = random_rows(40)
    return Trainer(tiny_model(), rows, partial(collate, pad_id=0), loss, cfg, NO_LOG, eval_rows=rows[:8])


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_after_a_resume_have_each_step_once_written_by_the_resumed_run(tmp_path):
    with pytest.raises(Crash):
        tagged_run(tmp_path, tag=1, crash_at=8).train()  # checkpoint-6 saved, step 7 logged, died in step 8
    assert [r["step"] for r in metric_rows(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6, 7]
    tagged_run(tmp_path, tag=2, resume=True).train()
    straight = tmp_path / "straight"
    tagged_run(straight, tag=2).train()

    rows, reference = metric_rows(tmp_path), metric_rows(straight)
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == list(range(1, 9))  # every step once
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4, 6, 8, 8]  # before, every 2, final
    assert [r["run"] for r in rows if "loss" in r] == [1] * 6 + [2] * 2  # steps 7-8: the resumed run's
    same = lambda row: {k: v for k, v in row.items() if k not in ("run", "eval_run", "tokens_per_s")}  # noqa: E731
    for got, want in zip(rows, reference):  # and the same numbers as a run never interrupted
        assert same(got) == same(want)
    assert len(rows) == len(reference)


def test_a_resume_from_a_checkpoint_without_the_line_count_keeps_the_steps_up_to_it(tmp_path):
    with pytest.raises(Crash):
        tagged_run(tmp_path, tag=1, crash_at=8).train()
    state_file = tmp_path / "checkpoints" / "checkpoint-6" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["extra"]["metrics_lines"]  # as written before the count was kept
    state_file.write_text(json.dumps(state))
    (state_file.parent / "checksums.json").unlink()
    tagged_run(tmp_path, tag=2, resume=True).train()
    assert [r["step"] for r in metric_rows(tmp_path) if "loss" in r] == list(range(1, 9))


def test_sigterm_in_the_final_evaluation_stops_at_once_and_the_resume_trains_nothing(tmp_path):
    from lmforge.loop.preemption import EXIT_STATUS, Preempted

    steps = {"n": 0}

    def loss(model, batch):
        if model.training:
            steps["n"] += 1
        elif steps["n"] == 6 and not steps.get("signalled"):  # the final evaluation (no eval in between)
            steps["signalled"] = True
            os.kill(os.getpid(), signal.SIGTERM)
        return lm_loss(model, batch)

    rows = random_rows(40)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=4, max_steps=6, save_steps=4, lr=1e-2)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stop:
        Trainer(tiny_model(), rows, partial(collate, pad_id=0), loss, cfg, NO_LOG, eval_rows=rows[:16]).train()
    final = tmp_path / "run" / "checkpoints" / "checkpoint-6"
    assert stop.value.code == EXIT_STATUS
    assert str(stop.value) == (f"SIGTERM after the last step: the trained weights are saved in {final}; "
                               "train.resume=true evaluates and writes the model without training again")
    assert signal.getsignal(signal.SIGTERM) is before
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint-4", "checkpoint-6"]

    steps["n"] = 100  # the resume must run no training step at all
    cfg.resume = True
    resumed = Trainer(tiny_model(), rows, partial(collate, pad_id=0), loss, cfg, NO_LOG, eval_rows=rows[:16])
    result = resumed.train()
    assert steps["n"] == 100
    straight_cfg = TrainConfig(output_dir=str(tmp_path / "straight"), batch_size=4, max_steps=6, save_steps=4,
                               lr=1e-2)
    straight = Trainer(tiny_model(), rows, partial(collate, pad_id=0), lm_loss, straight_cfg, NO_LOG,
                       eval_rows=rows[:16]).train()
    assert {k: v for k, v in result.metrics.items() if "tokens_per_s" not in k} == \
        {k: v for k, v in straight.metrics.items() if "tokens_per_s" not in k}


def test_ctrl_c_during_the_evaluation_before_training_stops_before_step_1_and_saves_nothing(tmp_path):
    from lmforge.loop.preemption import INTERRUPT_STATUS, Preempted

    steps = {"n": 0}

    def loss(model, batch):
        if model.training:
            steps["n"] += 1
        elif not steps.get("signalled"):  # the evaluation before training
            steps["signalled"] = True
            os.kill(os.getpid(), signal.SIGINT)
        return lm_loss(model, batch)

    rows = random_rows(40)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=4, max_steps=6, save_steps=2)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Preempted) as stop:
        Trainer(tiny_model(), rows, partial(collate, pad_id=0), loss, cfg, NO_LOG, eval_rows=rows[:8]).train()
    assert stop.value.code == INTERRUPT_STATUS == 130 and stop.value.interrupted
    assert str(stop.value) == "Ctrl-C: stopped before step 1; nothing was trained or saved"
    assert steps["n"] == 0 and not (tmp_path / "run" / "checkpoints").exists()
    assert signal.getsignal(signal.SIGINT) is before
