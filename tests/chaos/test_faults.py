"""Faults during training: the disk filling up in a save, a NaN in the middle of a run, SIGTERM
(preemption), and a checkpoint whose bytes changed on disk. Each is injected at a real point (the file
write, the model's embedding layer, the process's signal, the checkpoint file) on a tiny model trained
in-process; a SIGTERM sent to a real `lmforge train` process is part of the full run. CI makes one
trial of each; LMFORGE_CHAOS=full makes 20 with random steps, files and byte offsets and records the
figures in results/faults.json."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from kill_harness import FULL, child_command, child_env, record_results, run_once, trials
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.config.schema import LogConfig, TrainConfig
from lmforge.data.packing import collate
from lmforge.loop import checkpoint
from lmforge.loop.checkpoint import CheckpointError, list_checkpoints, verify_checksums
from lmforge.loop.preemption import EXIT_STATUS, Preempted
from lmforge.loop.trainer import Trainer, TrainingDiverged
from lmforge.models.heads import lm_loss

RESULTS = Path(__file__).parent / "results" / "faults.json"
NO_LOG = LogConfig(report_to=[], progress=False)
STEPS = 8


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64))


def rows(n: int = 48) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 50, (int(torch.randint(6, 16, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def trainer(out: Path, model=None, loss_fn=lm_loss, **train) -> Trainer:
    settings = {"batch_size": 4, "max_steps": STEPS, "save_steps": 2, "save_total_limit": 0, "lr": 1e-2, **train}
    cfg = TrainConfig(output_dir=str(out), **settings)
    return Trainer(model or tiny_model(), rows(), partial(collate, pad_id=0), loss_fn, cfg, NO_LOG)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 32-wide model gains nothing from threads, and on a busy 2-core machine they spin (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of the run every fault test compares with."""
    run = trainer(tmp_path_factory.mktemp("straight"))
    run.train()
    return {k: v.clone() for k, v in run.model.state_dict().items()}


def assert_same(model, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), \
        [k for k in expected if not torch.equal(got[k], expected[k])][:3]


def assert_loads(folder: Path) -> dict[str, torch.Tensor]:
    verify_checksums(folder)
    weights = load_file(str(folder / "trainable.safetensors"))
    assert all(t.isfinite().all() for t in weights.values()), f"{folder} holds non-finite weights"
    return weights


def figures(results: list[bool]) -> dict:
    return {"injected": len(results), "survived": sum(results)}


# -- disk full ------------------------------------------------------------------------------------------
def fill_disk_at(monkeypatch, step: int, victim: str) -> list[Path]:
    """The save of `step` runs out of space half-way through `victim`: the file is cut where the disk
    filled and the write fails with ENOSPC, as it would from the kernel. Returns the paths hit."""
    real_write, hit = checkpoint._write, []

    def write(path: Path, writer) -> None:
        real_write(path, writer)
        if path.name == victim and path.parent.name.startswith(f".tmp-checkpoint-{step}-"):
            os.truncate(path, path.stat().st_size // 2)
            hit.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "_write", write)
    return hit


def disk_full_trial(out: Path, monkeypatch, rng: random.Random, expected: dict) -> bool:
    step = rng.choice(range(4, STEPS + 1, 2))  # a save with an earlier checkpoint before it
    victim = rng.choice(["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json",
                         checkpoint.CHECKSUMS])
    with monkeypatch.context() as patch:
        hit = fill_disk_at(patch, step, victim)
        with pytest.raises(CheckpointError) as failure:
            trainer(out).train()
    message, previous = str(failure.value), out / "checkpoints" / f"checkpoint-{step - 2}"
    assert hit and message.startswith(f"disk full while saving {out / 'checkpoints' / f'checkpoint-{step}'}")
    assert str(hit[0].parent) in message and f"the last complete checkpoint, {previous}, is intact" in message
    assert isinstance(failure.value.__cause__, OSError) and failure.value.__cause__.errno == errno.ENOSPC
    # Nothing half-written is left, the checkpoint before is whole, and the run continues from it.
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == previous.name
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert_loads(previous)
    resumed = trainer(out, resume_from=str(previous))
    resumed.train()
    assert_same(resumed.model, expected)
    return True


def test_disk_full_in_a_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, uninterrupted):
    rng = random.Random(0)
    results = [disk_full_trial(tmp_path / f"t{i}", monkeypatch, rng, uninterrupted) for i in range(trials(1, 20))]
    if FULL:
        record_results(RESULTS, "disk_full", figures(results))


# -- NaN ------------------------------------------------------------------------------------------------
def poison_embedding_at(model, step: int) -> None:
    """A forward pre-hook that, on the `step`-th training forward pass, turns the embedding rows of that
    batch's tokens to NaN (memory corruption, or an overflow upstream): the loss of that step is NaN."""
    calls = {"n": 0}
    embeddings = model.get_input_embeddings()

    def hook(module, args):
        if module.training:
            calls["n"] += 1
            if calls["n"] == step:
                with torch.no_grad():
                    module.weight[args[0].unique()] = float("nan")

    embeddings.register_forward_pre_hook(hook)


def nan_trial(out: Path, rng: random.Random) -> bool:
    step = rng.randint(3, STEPS)
    model = tiny_model()
    poison_embedding_at(model, step)
    run = trainer(out, model=model)
    with pytest.raises(TrainingDiverged) as failure:
        run.train()
    last = out / "checkpoints" / f"checkpoint-{(step - 1) // 2 * 2}"
    assert str(failure.value) == (f"training diverged at step {step}: loss is nan; stopped; "
                                  f"the last good checkpoint is {last}")
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == last.name  # nothing saved after
    assert_loads(last)
    return True


def test_nan_in_a_batch_stops_with_the_last_good_checkpoint_intact(tmp_path):
    rng = random.Random(1)
    results = [nan_trial(tmp_path / f"t{i}", rng) for i in range(trials(1, 20))]
    if FULL:
        record_results(RESULTS, "nan_loss", figures(results))


def test_non_finite_weights_are_never_saved(tmp_path):
    """A finite loss with weights gone bad (an update that overflowed): the save refuses."""
    calls = {"n": 0}

    def overflowing(model, batch):
        calls["n"] += 1
        loss = lm_loss(model, batch)
        if calls["n"] == 4:  # after step 4's forward pass: its loss and gradients stay finite
            with torch.no_grad():
                model.get_input_embeddings().weight[7] = float("inf")
        return loss

    with pytest.raises(TrainingDiverged, match=r"at step 4: weight .*embed_tokens.weight is not finite; .*"
                                               r"the last good checkpoint is .*checkpoint-2$"):
        trainer(tmp_path, loss_fn=overflowing).train()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-2"]
    assert_loads(tmp_path / "checkpoints" / "checkpoint-2")


# -- SIGTERM --------------------------------------------------------------------------------------------
def sigterm_trial(out: Path, rng: random.Random, expected: dict) -> bool:
    step = rng.randint(1, STEPS - 1)
    calls = {"n": 0}

    def preempted_during(model, batch):  # the signal arrives in the middle of step `step`
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return lm_loss(model, batch)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stop:
        trainer(out, loss_fn=preempted_during).train()
    assert stop.value.code == EXIT_STATUS == 143
    saved = out / "checkpoints" / f"checkpoint-{step}"
    assert str(stop.value) == f"SIGTERM: stopped at step {step} and saved {saved}; train.resume=true continues"
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the loop's only while it runs
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == saved.name
    assert_loads(saved)
    resumed = trainer(out, resume=True)
    resumed.train()
    assert_same(resumed.model, expected)
    return True


def test_sigterm_saves_then_exits_and_resumes_to_the_same_weights(tmp_path, uninterrupted):
    rng = random.Random(2)
    results = [sigterm_trial(tmp_path / f"t{i}", rng, uninterrupted) for i in range(trials(1, 20))]
    if FULL:
        record_results(RESULTS, "sigterm", figures(results))


@pytest.mark.skipif(not FULL, reason="two lmforge processes: LMFORGE_CHAOS=full (CI sends SIGTERM in-process)")
def test_sigterm_to_a_real_training_process(tmp_path, world_dir, world_tokenizer_dir):
    def args(out: Path) -> list[str]:
        return ["train", "pt", "model.scratch=test", f"model.tokenizer={world_tokenizer_dir}",
                f"data.train={world_dir}/pt/train.txt", "data.eval_split=0", "pt.block_size=64", "train.batch_size=4",
                "train.max_steps=120", "train.save_steps=0", "train.logging_steps=1", "log.report_to=[]",
                "log.progress=false",
                f"train.output_dir={out}"]

    log, straight = tmp_path / "children.log", tmp_path / "straight"
    run_once(args(straight), log)
    rng, results = random.Random(3), []
    for trial in range(trials(1, 5)):
        out = tmp_path / f"t{trial}"
        with open(tmp_path / f"t{trial}.out", "w+") as output:
            process = subprocess.Popen(child_command(args(out)), stdout=output, stderr=subprocess.STDOUT,
                                       env=child_env())
            while not (out / "metrics.jsonl").is_file() and process.poll() is None:  # training has begun
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.5))  # well inside the 120 steps
            process.send_signal(signal.SIGTERM)
            assert process.wait() == 143
            output.seek(0)
            printed = output.read()
        assert "SIGTERM: stopped at step" in printed and not (out / "model.safetensors").exists()
        assert_loads(list_checkpoints(out / "checkpoints")[-1])  # saved although save_steps=0
        run_once([*args(out), "train.resume=true"], log)
        expected, got = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
        assert all(torch.equal(expected[k], got[k]) for k in expected)
        results.append(True)
    if FULL:
        record_results(RESULTS, "sigterm_process", figures(results))


# -- corrupted checkpoint files -------------------------------------------------------------------------
def corruption_trial(out: Path, rng: random.Random) -> bool:
    run = trainer(out, max_steps=2)
    run.train()
    folder = out / "checkpoints" / "checkpoint-2"
    victim = folder / rng.choice(["trainable.safetensors", "optimizer.pt"])
    data = bytearray(victim.read_bytes())
    offset = rng.randrange(len(data) // 2, len(data) - 8)  # past the header: the file still parses
    data[offset] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(victim))} is corrupted \(sha256 .*refusing to resume"):
        trainer(out, resume_from=str(folder)).train()
    return True


def test_flipped_byte_in_a_checkpoint_is_refused(tmp_path):
    rng = random.Random(4)
    results = [corruption_trial(tmp_path / f"t{i}", rng) for i in range(trials(2, 20))]
    if FULL:
        record_results(RESULTS, "corrupted_file", figures(results))


def test_without_the_checksum_the_flipped_weights_would_have_loaded(tmp_path):
    """Why the checksum is needed: a flipped byte in the tensor data parses as a valid safetensors file."""
    trainer(tmp_path, max_steps=2).train()
    victim = tmp_path / "checkpoints" / "checkpoint-2" / "trainable.safetensors"
    original = load_file(str(victim))
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x40
    victim.write_bytes(bytes(data))
    flipped = load_file(str(victim))  # no error from safetensors
    assert any(not torch.equal(original[k], flipped[k]) for k in original)
    with pytest.raises(CheckpointError, match="trainable.safetensors is corrupted"):
        verify_checksums(victim.parent)
