"""A disk that really fills up: a small tmpfs mounted for the test, filled by a real file, so every
failure is the kernel's ENOSPC as torch.save (a RuntimeError from its zip writer, with no errno),
safetensors (a SafetensorError) and plain writes (OSError) report it. Nothing is injected. Where this
machine cannot mount a file system the tests are skipped with the reason; test_faults.py keeps the
injected-ENOSPC trials, which run anywhere."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from test_faults import rows, tiny_model

from lmforge.artifacts import MANIFEST
from lmforge.cli import main as cli_main
from lmforge.config.schema import LogConfig, TrainConfig
from lmforge.data.packing import collate
from lmforge.loop import checkpoint
from lmforge.loop.checkpoint import (
    CheckpointError,
    checkpoint_bytes,
    cleaned_up_on_failure,
    list_checkpoints,
    verify_checksums,
)
from lmforge.loop.diskspace import folder_bytes, free_bytes
from lmforge.loop.trainer import Trainer
from lmforge.models.heads import lm_loss as plain_lm_loss
from lmforge.stages.common import write_model_files

NO_LOG = LogConfig(report_to=[], progress=False)
STEPS = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SmallDisk:
    """A tmpfs of `size` at `path`; `fill(leave)` writes a real file until `leave` bytes are free."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / f"filler-{uuid.uuid4().hex[:6]}"

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)

    def fill(self, leave: int) -> None:
        extra = free_bytes(self.path) - leave
        assert extra > 0, f"only {free_bytes(self.path)} bytes free, asked to leave {leave}"
        with open(self.filler, "ab") as handle:
            handle.write(b"\0" * extra)  # written, not sparse: tmpfs allocates the pages

    def fill_completely(self) -> None:
        with open(self.filler, "ab", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:  # ENOSPC: not a byte more
                pass

    def make_room(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MiB tmpfs (mount needs root or a user namespace with mount rights)."""
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs on this machine ({(mounted.stderr or mounted.stdout).strip()}): "
                    "a real full disk needs mount rights; test_faults.py injects ENOSPC instead")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def trainer(out: Path, loss_fn=plain_lm_loss, **train) -> Trainer:
    settings = {"batch_size": 4, "max_steps": STEPS, "save_steps": 2, "save_total_limit": 0, "lr": 1e-2, **train}
    cfg = TrainConfig(output_dir=str(out), **settings)
    return Trainer(tiny_model(), rows(), partial(collate, pad_id=0), loss_fn, cfg, NO_LOG)


# -- a checkpoint save that fills the disk ---------------------------------------------------------------
def test_checkpoint_on_a_really_full_disk_is_cleaned_up_and_resumes_once_there_is_room(small_disk, tmp_path):
    straight = trainer(tmp_path / "straight")
    straight.train()
    out = small_disk.path / "run"
    calls = {"n": 0}

    def fills_the_disk_before_step_4s_save(model, batch):
        calls["n"] += 1
        if calls["n"] == 4:  # room for less than checkpoint-4 but more than its weights and optimizer tensors
            need = checkpoint_bytes(model, run.optimizer)
            small_disk.fill(leave=need + 16 * 1024)
        return plain_lm_loss(model, batch)

    run = trainer(out, loss_fn=fills_the_disk_before_step_4s_save)
    with pytest.raises(CheckpointError) as failure:
        run.train()
    message, final = str(failure.value), out / "checkpoints" / "checkpoint-4"
    previous = out / "checkpoints" / "checkpoint-2"
    # The write was stopped by the kernel: torch.save's own RuntimeError, or safetensors', never injected.
    assert type(failure.value.__cause__) in (RuntimeError, SafetensorError, OSError), failure.value.__cause__
    assert message.startswith(f"disk full while saving {final}: it needs at least 255.5 KiB and ")
    assert f"the partial folder was removed and the last complete checkpoint, {previous}, is intact" in message
    assert "\n" not in message and message.endswith("free some space, then train.resume=true continues")
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the partial folder is gone, its space given back
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]
    verify_checksums(previous)

    # Resuming on the still-full disk: the same kind of one-line refusal, before any step is spent.
    with pytest.raises(CheckpointError, match=rf"^disk full while resuming from {previous}: the next checkpoint "
                                              r"needs about 286\.\d KiB and .* is free on that disk; nothing was "
                                              rf"written and {previous} is intact; free some space"):
        trainer(out, resume=True).train()

    small_disk.make_room()
    resumed = trainer(out, resume=True)
    resumed.train()
    assert all(torch.equal(v, straight.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())


def test_a_save_that_cannot_fit_is_refused_before_writing(small_disk):
    """The pre-check: less free space than the weights and optimizer state alone need."""
    out = small_disk.path / "run"
    run = trainer(out, max_steps=2, save_steps=0)
    run.train()  # its final checkpoint, checkpoint-2, is written
    saved = out / "checkpoints" / "checkpoint-2"
    files = {p.name: p.read_bytes() for p in saved.iterdir()}
    small_disk.fill(leave=100 * 1024)
    with pytest.raises(CheckpointError, match=rf"^disk full while saving {saved}: it needs at least 255\.5 KiB "
                                              r"and \d+\.\d KiB is free on that disk; nothing was written and the "
                                              rf"last complete checkpoint, {saved}, is intact"):
        run.save_checkpoint()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == files


# -- the writers' own errors on ENOSPC -------------------------------------------------------------------
@pytest.mark.parametrize("writer, raised", [
    (lambda p: torch.save({"w": torch.ones(1 << 20)}, p / "optimizer.pt"), RuntimeError),
    (lambda p: save_file({"w": torch.ones(1 << 20)}, str(p / "trainable.safetensors")), SafetensorError),
    (lambda p: (p / "state.json").write_bytes(b"x" * (4 << 20)), OSError),
], ids=["torch.save", "safetensors", "plain-write"])
def test_each_writers_enospc_is_reported_as_disk_full(small_disk, writer, raised):
    root = small_disk.path / "checkpoints"
    root.mkdir()
    free_before = free_bytes(root)
    tmp, final = root / ".tmp-checkpoint-3-1", root / "checkpoint-3"
    with pytest.raises(CheckpointError) as failure:
        with cleaned_up_on_failure(tmp, final, 0, lambda: "no earlier checkpoint exists"):
            tmp.mkdir()
            writer(tmp)
    assert type(failure.value.__cause__) is raised  # what the writer itself raises on a full disk
    assert str(failure.value).startswith(f"disk full while saving {final}: ")
    assert not tmp.exists() and free_bytes(root) == free_before


def test_an_unrelated_runtime_error_in_a_save_is_not_called_a_full_disk(small_disk):
    root = small_disk.path / "checkpoints"
    root.mkdir()
    tmp = root / ".tmp-checkpoint-3-1"
    with pytest.raises(RuntimeError, match="^a bug, not the disk$") as failure:
        with cleaned_up_on_failure(tmp, root / "checkpoint-3", 1024, lambda: ""):
            tmp.mkdir()
            (tmp / "part").write_bytes(b"x" * 1000)
            raise RuntimeError("a bug, not the disk")
    assert type(failure.value) is RuntimeError and not tmp.exists()


# -- the final model ---------------------------------------------------------------------------------------
def test_a_model_write_that_fills_the_disk_leaves_the_previous_model_whole(small_disk):
    out = small_disk.path / "artifact"
    out.mkdir()
    model = tiny_model()
    write_model_files(out, 0, lambda folder: model.save_pretrained(folder))
    (out / MANIFEST).write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    small_disk.fill(leave=40 * 1024)  # less than the 88 KiB of weights
    with pytest.raises(CheckpointError) as failure:
        write_model_files(out, 0, lambda folder: model.save_pretrained(folder))
    assert str(failure.value).startswith(f"disk full while saving {out}: ")
    assert not list(out.glob(".tmp-artifact-*"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, manifest included


# -- a whole run from the command line ---------------------------------------------------------------------
def test_a_stage_on_a_full_disk_says_so_in_one_line_and_resumes(small_disk, world_dir, world_tokenizer_dir, capsys,
                                                                 monkeypatch):
    out, straight = small_disk.path / "pt", small_disk.path / "straight"
    args = ["train", "pt", "model.scratch=test", f"model.tokenizer={world_tokenizer_dir}",
            f"data.train={world_dir}/pt/train.txt", "data.eval_split=0", "pt.block_size=64", "train.batch_size=4",
            "train.max_steps=4", "train.save_steps=2", "log.report_to=[]", "log.progress=false"]
    small_disk.resize("64m")
    assert cli_main([*args, f"train.output_dir={straight}"]) == 0
    size = folder_bytes(straight / "checkpoints" / "checkpoint-2")
    shutil.rmtree(straight / "checkpoints")
    args.append(f"train.output_dir={out}")

    real_prune = checkpoint.prune_checkpoints

    def fill_after_the_first_save(root, keep):  # the disk fills up while the run trains on
        real_prune(root, keep)
        if not small_disk.filler.exists():
            small_disk.fill(leave=size // 2)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "prune_checkpoints", fill_after_the_first_save)
        capsys.readouterr()
        assert cli_main(args) == 2
    printed = capsys.readouterr().out.strip()
    # the run's plan (data counts, steps) comes first; the failure is its last line, and the only error line
    *before, last = printed.splitlines()
    assert last.startswith(f"error: disk full while saving {out / 'checkpoints' / 'checkpoint-4'}: it needs "), \
        printed
    assert not any(line.startswith("error") or "Traceback" in line for line in before), printed
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]
    assert not list((out / "checkpoints").glob(".tmp-*")) and not (out / MANIFEST).exists()

    assert cli_main([*args, "train.resume=true"]) == 2  # still full: refused, one line
    *before, last = capsys.readouterr().out.strip().splitlines()
    assert last.startswith("error: disk full ") and not any(line.startswith("error") for line in before), last

    small_disk.fill_completely()  # not even room for the run's config: the whole-run guard names the folder
    assert cli_main([*args, "train.resume=true"]) == 2
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"error: disk full under {out}: ") and len(printed.splitlines()) == 1, printed

    small_disk.make_room()
    assert cli_main([*args, "train.resume=true"]) == 0
    expected, got = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert json.loads((out / MANIFEST).read_text())["stage"] == "pt" and not list(out.glob(".tmp-artifact-*"))


def test_resuming_a_finished_run_on_a_full_disk_needs_no_room_for_a_checkpoint(small_disk):
    """Stopped after its last step (the final checkpoint is written): the resume only evaluates and writes
    the model, so a disk with no room for another checkpoint does not stop it."""
    out = small_disk.path / "run"
    trainer(out, max_steps=2, save_steps=0).train()
    small_disk.fill(leave=64 * 1024)  # far less than a checkpoint
    resumed = trainer(out, max_steps=2, save_steps=0, resume=True)
    resumed.train()
    assert resumed.state.step == 2 and [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]
