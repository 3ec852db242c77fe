"""Reference log-probs: DPO and its family's implicit reward, and RL's KL penalty to the starting model.

Three sources, chosen by config:
- `copy`: a frozen copy of the starting model (one more model in memory);
- `adapter`: the policy itself with its LoRA adapter switched off (no second copy: the default
  under LoRA, since the frozen base *is* the starting model);
- cached: one pass over the training data before the first step, saved to disk and reused, after
  which no reference model is kept at all (`precompute_ref`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from lmforge.config.methods import LORA_METHODS
from lmforge.config.schema import LoraConfig, ModelConfig
from lmforge.models.shared_prompt import batch_logps as output_logps
from lmforge.models.shared_prompt import model_inputs


def _unwrap(model):
    return getattr(model, "module", model)  # DDP keeps the real model in .module


@torch.no_grad()
def batch_logps(model, batch: dict) -> torch.Tensor:
    """Summed log-probs of each sequence's labelled tokens, [N] (a shared-prompt batch: [2B] from B rows,
    the prompt run once — without gradients a pure saving)."""
    return output_logps(model(**model_inputs(_unwrap(model), batch)).logits, batch)[0]


class Reference:
    def __init__(self, kind: str, frozen: torch.nn.Module | None = None):
        if kind not in ("copy", "adapter"):
            raise ValueError(f"unknown reference kind {kind!r}")
        if kind == "copy" and frozen is None:
            raise ValueError("a `copy` reference needs the frozen model")
        self.kind, self.frozen = kind, frozen

    def to(self, device) -> Reference:
        if self.frozen is not None:
            self.frozen.to(device)
        return self

    @contextmanager
    def model(self, policy):
        """The model that computes reference outputs: the frozen copy, or the policy with its adapter off."""
        if self.kind == "copy":
            yield self.frozen
        else:
            with _unwrap(policy).disable_adapter():
                yield policy

    def logps(self, policy, batch: dict) -> torch.Tensor:
        with self.model(policy) as model:
            return batch_logps(model, batch)


def cache_key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def reference_kind(setting: str, model: ModelConfig, lora: LoraConfig) -> str | None:
    """What `dpo.reference` / `rl.reference` resolve to: `copy` (a frozen copy of the starting model),
    `adapter` (the policy with its adapter switched off: the default under LoRA), or None (`none`)."""
    if setting == "none":
        return None
    # A continued parent adapter cannot be switched off to get the parent back: that would be its base.
    # A PiSSA adapter switched off leaves the residual base, not the starting model: that needs a copy.
    switchable = model.finetuning in LORA_METHODS and model.parent_adapter == "merge" \
        and not lora.init.startswith("pissa")
    return setting if setting != "auto" else ("adapter" if switchable else "copy")


def precompute(reference: Reference, policy, rows, collate: Callable, batch_size: int, device,
               cache_file: Path, names: tuple[str, str]):
    """Add reference log-prob columns (`names`: first half, second half of each [2B] batch) to `rows`,
    reading them from `cache_file` when a previous run with the same key wrote it."""
    if cache_file.is_file():
        cached = load_file(str(cache_file))
    else:
        was_training = policy.training
        policy.eval()
        first, second = [], []
        for batch in DataLoader(rows, batch_size=batch_size, collate_fn=collate, shuffle=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            logps = reference.logps(policy, batch).float().cpu()
            half = logps.shape[0] // 2
            first.append(logps[:half])
            second.append(logps[half:])
        policy.train(was_training)
        cached = {names[0]: torch.cat(first), names[1]: torch.cat(second)}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        save_file(cached, str(tmp))
        tmp.replace(cache_file)
    for name in names:
        rows = rows.add_column(name, cached[name].tolist())
    return rows
