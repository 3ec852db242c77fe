"""Run under torchrun by test_distributed.py: train the tiny model on two CPU processes."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_loop import NO_LOG, random_rows, tiny_model  # noqa: E402

from lmforge.config.schema import TrainConfig  # noqa: E402
from lmforge.data.packing import collate  # noqa: E402
from lmforge.loop.trainer import Trainer  # noqa: E402
from lmforge.models.heads import lm_loss  # noqa: E402


def main(out: str) -> None:
    model = tiny_model()
    cfg = TrainConfig(output_dir=out, batch_size=4, grad_accum=1, max_steps=3, lr=1e-2, warmup_ratio=0.0,
                      scheduler="constant", max_grad_norm=1e9)
    trainer = Trainer(model, random_rows(48), partial(collate, pad_id=0), lm_loss, cfg, NO_LOG)
    trainer.train()
    if trainer.accelerator.is_main_process:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, Path(out) / "weights.pt")
    # As the stages do: the process group is torn down before exit. Left to the interpreter's exit,
    # gloo's threads sometimes outlive it and the process aborts ("terminate called ...").
    trainer.end()


if __name__ == "__main__":
    main(sys.argv[1])
