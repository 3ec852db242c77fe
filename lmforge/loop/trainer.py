"""The one training loop every stage uses.

A stage hands it a model, token rows, a collate function and a `loss_fn(model, batch) ->
(loss_sum, n_tokens, metrics)`. The loop owns the rest: accelerate (devices, mixed precision,
distributed launch, trackers), token-normalised gradient accumulation, AdamW with warmup and
decay, clipping, evaluation, metrics.jsonl, atomic checkpoints, exact resume, and NaN stops.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader

from lmforge.config.schema import LogConfig, TrainConfig
from lmforge.loop.batching import chunks, epoch_batches, row_lengths, shard_size
from lmforge.loop.checkpoint import (
    CheckpointError,
    LoopState,
    check_room_to_continue,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    load_sharded_checkpoint,
    resume_path,
    save_checkpoint,
    save_sharded_checkpoint,
    saved_step,
)
from lmforge.loop.compile import compile_blocks
from lmforge.loop.evaluation import eval_metrics, eval_sums
from lmforge.loop.metrics_log import LINES_KEY, MetricsLog
from lmforge.loop.preemption import Preempted, PreemptionGuard
from lmforge.loop.progress import ProgressDisplay, TaskBar
from lmforge.loop.schedule import lr_factor
from lmforge.loop.summary import start_lines
from lmforge.loop.trackers import make_accelerator
from lmforge.models.optimizers import build_optimizer

__all__ = ["Trainer", "TrainingDiverged", "compile_blocks", "epoch_batches", "make_accelerator", "row_lengths", "shard_size"]

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor, dict]]


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is left untouched."""


@dataclass
class TrainResult:
    state: LoopState
    metrics: dict
    """Final train and eval metrics."""


def label_token_count(batch: dict) -> torch.Tensor:
    """Tokens that carry next-token loss (labels shifted by one)."""
    return (batch["labels"][:, 1:] != -100).sum()


def pair_count(batch: dict) -> torch.Tensor:
    """Pairs in a [2B, L] chosen-then-rejected batch."""
    return torch.tensor(batch["input_ids"].shape[0] // 2, device=batch["input_ids"].device)


pair_count.metric_name = "pairs"


class Trainer:
    def __init__(self, model, train_rows, collate_fn, loss_fn: LossFn, cfg: TrainConfig, log: LogConfig,
                 eval_rows=None, accelerator: Accelerator | None = None, perplexity: bool = True,
                 count_fn: Callable[[dict], torch.Tensor] | None = None, tokenizer=None):
        self.cfg, self.log_cfg = cfg, log
        self.tokenizer = tokenizer  # only to show an example row before step 1
        self.output_dir = Path(cfg.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.collate_fn, self.loss_fn = collate_fn, loss_fn
        self.perplexity = perplexity  # eval_ppl only means something for a per-token LM loss
        # What loss_fn's sum is a sum over, counted before the forward pass so that accumulated
        # micro-batches are normalised by the whole step's count: label tokens by default, pairs for
        # preference losses.
        self.count_fn = count_fn or label_token_count
        self.streaming = isinstance(train_rows, datasets.IterableDataset)
        if self.streaming and cfg.max_steps <= 0:
            raise ValueError("streaming data has no known length: set train.max_steps")
        set_seed(cfg.seed)
        self.accelerator = accelerator or make_accelerator(cfg, log, str(self.output_dir))
        self.model = model
        # AdamW (fused on a GPU), or what the fine-tuning method asks for (LoRA+ groups, GaLore).
        self.optimizer = build_optimizer(model, cfg)
        if cfg.compile:
            compile_blocks(model)
        self.total_steps = self._total_steps()
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, warmup, cfg.scheduler, cfg.min_lr_ratio))
        self.prepared, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.state = LoopState()
        # The checkpoint train() continues from, if any; stages skip before-training evaluation then.
        self.resume_from = resume_path(cfg.resume, cfg.resume_from, self.output_dir)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.metrics = MetricsLog(self.metrics_path)
        self.saved_step = -1  # the step of the checkpoint that holds the current weights (-1: none)
        self.saved_path: Path | None = None
        # SIGTERM handling; a stage may hold it past train() so that its own final work is covered too.
        self.preemption = PreemptionGuard()
        self._row_lengths: list[int] | None = None
        self._display: ProgressDisplay | None = None  # the training bar while it runs (evaluation goes under it)

    def _total_steps(self) -> int:
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        return max(1, math.ceil(self.cfg.epochs * self.steps_per_epoch()))

    def steps_per_epoch(self) -> float | None:
        """Optimizer steps one pass over the train rows takes (None: streamed rows have no length)."""
        if self.streaming:
            return None
        batches = math.ceil(len(self.train_rows) / self.cfg.batch_size)
        return shard_size(batches, self.accelerator.num_processes) / self.cfg.grad_accum

    def say_plan(self) -> None:
        """Before step 1: rows, tokens, steps and one row with its loss marked (the record counts per file
        were said when the data was read)."""
        if self.accelerator.is_main_process:
            for line in start_lines(self):
                self.accelerator.print(line)

    # -- data ---------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[dict]:
        """Micro-batches from the saved data position onwards, epoch after epoch."""
        while True:
            if self.streaming:
                loader = (self.collate_fn(b) for b in chunks(iter(self.train_rows), self.cfg.batch_size))
                for _ in range(self.state.batch_in_epoch):
                    next(loader, None)
            else:
                order = self._my_batches(epoch_batches(len(self.train_rows), self.cfg.batch_size,
                                                       self.cfg.seed, self.state.epoch, self._lengths()))
                loader = DataLoader(self.train_rows, batch_sampler=order[self.state.batch_in_epoch:],
                                    collate_fn=self.collate_fn, num_workers=self.cfg.num_workers,
                                    pin_memory=self.accelerator.device.type == "cuda")
            for batch in loader:
                self.state.batch_in_epoch += 1
                yield {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def _lengths(self) -> list[int] | None:
        if not self.cfg.group_by_length:
            return None
        if self._row_lengths is None:
            self._row_lengths = row_lengths(self.train_rows)
        return self._row_lengths

    def _my_batches(self, batches: list[list[int]]) -> list[list[int]]:
        """This process's share: every world-size-th batch, the same count on every process
        (a straggler batch would leave the others waiting in a collective)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        usable = shard_size(len(batches), world) * world if len(batches) >= world else len(batches)
        return batches[:usable][rank::world]

    # -- one optimizer step -------------------------------------------------------------------
    def step(self, group: list[dict]) -> dict:
        """One optimizer step over `group`'s micro-batches (RL stages call it on their own rollouts)."""
        device = self.accelerator.device
        count = sum(self.count_fn(b) for b in group)
        total_tokens = self.accelerator.reduce(count.detach().clone(), "sum").clamp(min=1)
        # DDP averages gradients over processes; scale so the result is the global token mean.
        scale = self.accelerator.num_processes / total_tokens
        loss_total = torch.zeros((), device=device)
        extras: dict[str, list[torch.Tensor]] = {}
        for i, batch in enumerate(group):
            sync = i == len(group) - 1
            with self.accelerator.no_sync(self.prepared) if not sync else nullcontext():
                with self.accelerator.autocast():
                    loss_sum, _, extra = self.loss_fn(self.prepared, batch)
                self.accelerator.backward(loss_sum * scale)
            loss_total += loss_sum.detach().float()
            for k, v in extra.items():
                extras.setdefault(k, []).append(torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()))
        grad_norm = self.accelerator.clip_grad_norm_(self.prepared.parameters(), self.cfg.max_grad_norm)
        seen = sum(b["attention_mask"].sum() if "attention_mask" in b else
                   torch.tensor(b["input_ids"].numel(), device=device) for b in group)
        numbers = [self.accelerator.reduce(loss_total, "sum"), total_tokens.float(),
                   self.accelerator.reduce(seen.float(), "sum"),
                   grad_norm.float() if grad_norm is not None else torch.zeros((), device=device)]
        numbers += [v for values in extras.values() for v in values]
        # One synchronisation per step: the GPU is never left idle while the host waits on a value.
        # (FSDP2 returns the gradient norm as a DTensor: its full value is what is wanted.)
        numbers = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in numbers]
        loss, tokens, seen, norm, *extra_values = torch.stack([n.reshape(()) for n in numbers]).tolist()
        if not math.isfinite(loss):
            raise TrainingDiverged(self._diverged_message(f"loss is {loss}"))
        # Under fp16 the grad scaler skips an overflowing step and lowers its scale: not a divergence.
        if grad_norm is not None and not math.isfinite(norm) and self.cfg.mixed_precision != "fp16":
            raise TrainingDiverged(self._diverged_message(f"gradient norm is {norm}"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens += int(seen)
        out = {"loss": loss / tokens, "lr": self.scheduler.get_last_lr()[0], "tokens": int(seen),
               getattr(self.count_fn, "metric_name", "loss_tokens"): int(tokens)}
        if grad_norm is not None:
            out["grad_norm"] = norm
        values = iter(extra_values)
        for k, tensors in extras.items():  # see evaluate(): unmeasurable (non-finite) metrics are skipped
            finite = [v for v in (next(values) for _ in tensors) if math.isfinite(v)]
            if finite:
                out[k] = sum(finite) / len(finite)
        return out

    def _diverged_message(self, what: str, step: int | None = None) -> str:
        last = latest_checkpoint(self.output_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        return f"training diverged at step {self.state.step + 1 if step is None else step}: {what}; stopped; {kept}"

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.eval_rows is None or len(self.eval_rows) == 0:
            return {}
        # The unwrapped model runs no collectives in forward, so uneven shards cannot hang.
        model = self.accelerator.unwrap_model(self.prepared)
        model.eval()
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        shard = list(range(rank, len(self.eval_rows), world))
        loader = DataLoader(torch.utils.data.Subset(self.eval_rows, shard), batch_size=self.cfg.batch_size,
                            collate_fn=self.collate_fn)
        with self._task_bar("eval", len(loader)) as bar:
            sums, weights, names = eval_sums(model, loader, self.loss_fn, self.accelerator, bar.advance)
        model.train()
        if sums is None:
            return {}
        sums, weights = self.accelerator.reduce(sums, "sum"), self.accelerator.reduce(weights, "sum")
        return eval_metrics(sums, weights, names, self.perplexity)

    def _task_bar(self, label: str, total: int) -> TaskBar:
        enabled = self.log_cfg.progress and self.accelerator.is_main_process
        if self._display is not None:
            return self._display.task_bar(label, total)
        return TaskBar(label, total, enabled)

    # -- the loop -----------------------------------------------------------------------------
    def resume_if_asked(self) -> None:
        path = self.resume_from
        if path is None:
            return
        if saved_step(path) < self.total_steps:  # a finished run's resume only evaluates and writes the model
            check_room_to_continue(path)
        if self.sharded:
            self.state = load_sharded_checkpoint(self.accelerator, path, self.scheduler)
        else:
            unwrapped = self.accelerator.unwrap_model(self.prepared)
            self.state = load_checkpoint(path, unwrapped, self.optimizer, self.scheduler)
        self.saved_step, self.saved_path = self.state.step, Path(path)
        if self.accelerator.is_main_process:
            self.metrics.rewind(self.state.step, self.state.extra.get(LINES_KEY))
        self.accelerator.print(f"resumed from {path} at step {self.state.step}")

    def train(self) -> TrainResult:
        with self.preemption:
            self.resume_if_asked()
            self.say_plan()
            if self.state.step == 0:  # kept in every checkpoint: a resumed run reports them too
                self.state.extra["initial_metrics"] = self.evaluate()
                self.log(self.state.extra["initial_metrics"])
            initial = self.state.extra.get("initial_metrics", {})
            last = self._train_steps()
            self.finish_training(last)
            last = self.state.extra.get("last_train_metrics", {})
            final = {**{f"train_{k}": v for k, v in last.items()}, **self.evaluate(),
                     **{f"initial_{k}": v for k, v in initial.items()}}
            self.log({k: v for k, v in final.items() if k.startswith("eval_")})
        return TrainResult(self.state, final)

    def _train_steps(self) -> dict:
        """The optimizer steps left; the last step's metrics ({} when none were left)."""
        self.prepared.train()
        batches = self._micro_batches()
        last: dict = {}
        display = ProgressDisplay(self.total_steps, self.state.step,
                                  enabled=self.log_cfg.progress and self.accelerator.is_main_process)
        started, window_tokens = time.perf_counter(), 0
        self._abandon_message()
        if self.state.step < self.total_steps and self.preemption.stop_now(self.accelerator):
            self.stop_for_preemption()  # asked during the evaluation before training: no step is started
        with display:
            self._display = display
            while self.state.step < self.total_steps:
                group = [next(batches) for _ in range(self.cfg.grad_accum)]
                last = self.step(group)
                window_tokens += last["tokens"]
                elapsed = time.perf_counter() - started
                last["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                display.update(self.state.step, last)
                if self.state.step % self.cfg.logging_steps == 0 or self.state.step == self.total_steps:
                    self.log(last)
                if self.cfg.eval_steps and self.state.step % self.cfg.eval_steps == 0:
                    self.log(self.evaluate())
                if self.cfg.save_steps and self.state.step % self.cfg.save_steps == 0:
                    self.save_checkpoint()
                if self.preemption.stop_now(self.accelerator):
                    self.stop_for_preemption()
        self._display = None
        return last

    def finish_training(self, last: dict) -> None:
        """After the last step, before any final evaluation: the trained weights go into a checkpoint
        (unless this step's is already there), so that a SIGTERM or a crash in the evaluation or while
        writing the model loses nothing; train.resume=true then skips straight to them. From here on a
        SIGTERM stops the run at once. A final save that fails (a full disk) is reported and the run
        goes on to write the model, which needs less room than a checkpoint."""
        if last:
            self.state.extra["last_train_metrics"] = last
        if self.saved_step != self.state.step:
            try:
                self.save_checkpoint()
            except CheckpointError as exc:
                self.accelerator.print(f"warning: the final checkpoint was not written ({exc}); "
                                       "going on to the evaluation and the model")
                self.preemption.keep_flagging()
                return
        saved = self.saved_path or checkpoint_dir(self.output_dir) / f"checkpoint-{self.state.step}"
        self.preemption.stop_at_once(f"SIGTERM after the last step: the trained weights are saved in {saved}; "
                                     "train.resume=true evaluates and writes the model without training again")

    @property
    def sharded(self) -> bool:
        """Weights split across processes (FSDP, DeepSpeed): checkpoints go through accelerate."""
        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def save_checkpoint(self) -> Path | None:
        self.state.extra[LINES_KEY] = self.metrics.lines  # what a resume from it keeps of metrics.jsonl
        if self.sharded:
            saved = save_sharded_checkpoint(self.accelerator, self.output_dir, self.state, self.scheduler,
                                            self.cfg.save_total_limit)
        else:
            saved = self._save_unsharded()
        self.saved_step, self.saved_path = self.state.step, saved
        self._abandon_message()
        return saved

    def _save_unsharded(self) -> Path | None:
        unwrapped = self.accelerator.unwrap_model(self.prepared)
        # A finite loss does not prove finite weights (an update can overflow): never save NaN over good.
        broken = next((n for n, p in unwrapped.named_parameters() if p.requires_grad and not p.isfinite().all()), None)
        if broken is not None:
            raise TrainingDiverged(self._diverged_message(f"weight {broken} is not finite", self.state.step))
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        return save_checkpoint(self.output_dir, self.state, unwrapped, self.optimizer, self.scheduler,
                               self.cfg.save_total_limit)

    def stop_for_preemption(self) -> None:
        """After SIGTERM or Ctrl-C, at a step boundary: save (unless this step just was, or none was run)
        and exit with status 143 (130 after Ctrl-C), saying how to continue."""
        word = self.preemption.word
        if self.state.step == 0:
            message = f"{word}: stopped before step 1; nothing was trained or saved"
        else:
            if self.saved_step != self.state.step:
                self.save_checkpoint()
            saved = checkpoint_dir(self.output_dir) / f"checkpoint-{self.state.step}"
            message = f"{word}: stopped at step {self.state.step} and saved {saved}; " + (
                "train.resume=true continues" if self.preemption.signum == signal.SIGTERM else
                "to continue, run the same command with train.resume=true (lmforge run resumes a stage by itself)")
        self.accelerator.print(message)
        raise Preempted(message, self.preemption.signum)

    def _abandon_message(self) -> None:
        """What a second Ctrl-C says: where the newest checkpoint is."""
        last = latest_checkpoint(self.output_dir)
        self.preemption.abandon_message = (
            f"stopped at step {self.state.step} without saving it; train.resume=true continues from {last}"
            if last else f"stopped at step {self.state.step}; no checkpoint had been written")

    def log(self, metrics: dict) -> None:
        if not metrics or not self.accelerator.is_main_process:
            return
        self.metrics.append({"step": self.state.step, "epoch": self.state.epoch, **metrics})
        self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=self.state.step)

    def end(self) -> None:
        self.accelerator.end_training()
