"""What every stage shares: the run folder, the model it trains, and the artifact it saves."""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import yaml
from accelerate import PartialState
from accelerate.utils import DistributedType

from lmforge.artifacts import (
    MANIFEST,
    chain_adapter,
    input_manifest_digests,
    library_versions,
    parent_manifest_digest,
    write_json_atomic,
)
from lmforge.config.errors import ConfigError
from lmforge.config.load import to_dict
from lmforge.config.schema import StageConfig
from lmforge.data.build import data_cache_dir
from lmforge.data.errors import ErrorLog
from lmforge.data.templates import end_of_turn_ids
from lmforge.loop.checkpoint import check_room, checkpoint_dir, cleaned_up_on_failure
from lmforge.loop.diskspace import nested_tensors, tensor_bytes
from lmforge.loop.progress import QUIET_S, TaskBar
from lmforge.models.adapters import apply_finetuning, quantization_config
from lmforge.models.attention import VARLEN
from lmforge.models.attention import register as register_varlen
from lmforge.models.load import as_reward_model, count_parameters, load_model_and_tokenizer

INITIAL_ANSWERS = "initial_answers"
WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                "pytorch_model.bin.index.json", "adapter_model.*", "adapter_config.json")
"""Files of an earlier artifact that would be loaded beside (or instead of) a new one of another shape."""


@dataclass
class Run:
    cfg: StageConfig
    output_dir: Path
    errors: ErrorLog
    cache_dir: str
    started: float


def start_run(cfg: StageConfig) -> Run:
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: a resumed pipeline compares it with its config to decide whether to continue.
    config = out / "config.yaml.tmp"
    config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(config, out / "config.yaml")
    return Run(cfg, out, ErrorLog(cfg.data.on_error, cfg.data.max_bad_fraction), data_cache_dir(str(out)), time.time())


def tokenizing_bar(cfg: StageConfig, *tables) -> TaskBar:
    """The bar over tokenizing a stage's records (train and held-out): quiet for a small file, lines without
    a terminal, only on the main process. Streamed data has no length and is counted as it trains."""
    total = sum(len(t) for t in tables if t is not None and not isinstance(t, datasets.IterableDataset))
    return TaskBar("Tokenizing", total, cfg.log.progress and PartialState().is_main_process, quiet_s=QUIET_S)


def load_for_training(cfg: StageConfig, reward_head: bool = False, frozen_copy: bool = False):
    """(model with the fine-tuning method applied, tokenizer, parent model path or preset, and a frozen
    copy of the starting model when `frozen_copy` — the reference of preference losses)."""
    quant = quantization_config(cfg.model, cfg.lora)
    if reward_head and cfg.model.parent_adapter == "continue":
        raise ConfigError("a reward model gets a new head on merged weights: use model.parent_adapter=merge")
    model, tokenizer, path = load_model_and_tokenizer(cfg.model, seed=cfg.train.seed, quantization=quant)
    half = cfg.train.mixed_precision != "no" or model.dtype in (torch.bfloat16, torch.float16)
    if cfg.model.attn_implementation == "auto" and torch.cuda.is_available() and half:
        # packed documents kept apart without a dense mask (the flash kernel wants bf16/fp16); SDPA elsewhere
        register_varlen()
        model.set_attn_implementation(VARLEN)
    if reward_head:
        model = as_reward_model(model, cfg.train.seed)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        # checkpointing is apply_finetuning's (per block, non-reentrant), not peft's all-or-nothing switch
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    reference = None
    if frozen_copy:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    extra = ("score",) if reward_head else ()
    model = apply_finetuning(model, cfg.model, cfg.lora, extra, "SEQ_CLS" if reward_head else "CAUSAL_LM",
                             galore=cfg.galore, mod=cfg.mod, expand=cfg.expand, seed=cfg.train.seed)
    return model, tokenizer, path or f"scratch:{cfg.model.scratch}", reference


def save_artifact(run: Run, trainer, tokenizer, parent: str, data_fingerprint: str, metrics: dict,
                  merge_adapter: bool = False, model=None) -> Path:
    """The final model (or adapter) as a plain Hugging Face folder, plus the lmforge.json manifest.
    `merge_adapter` folds LoRA into the weights (a reward model must load as one plain model);
    `model` saves a part of what the trainer trained (RL: the policy without its critic)."""
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    state_dict = None
    whole = accelerator.unwrap_model(trainer.prepared)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # Sharded weights: every process takes part in gathering the full state dict, the first one saves it.
        state_dict = accelerator.get_state_dict(trainer.prepared)
        if model is not None and state_dict:  # a part of what was trained: its own keys, unprefixed
            prefix = next(name for name, module in whole.named_modules() if module is model) + "."
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    model = model if model is not None else whole
    # A PiSSA adapter is relative to the residual weights it left in the base, not to the base folder it
    # would name: saved merged, it loads right anywhere.
    merge_adapter = merge_adapter or run.cfg.lora.init.startswith("pissa")
    if merge_adapter and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if accelerator.is_main_process:
        chain_adapter(model, run.cfg)
        model.config.use_cache = True
        stop = end_of_turn_ids(tokenizer)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = stop
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        write_model_files(run.output_dir, artifact_bytes(model, state_dict),
                          lambda folder: (model.save_pretrained(folder, state_dict=state_dict),
                                          tokenizer.save_pretrained(folder)))
        total, trainable = count_parameters(model)
        manifest = {
            "stage": run.cfg.stage,
            "parent": parent,
            "parent_manifest": parent_manifest_digest(run.cfg.model.name_or_path),
            "input_manifests": input_manifest_digests(run.cfg),
            "config": to_dict(run.cfg),
            "data_fingerprint": data_fingerprint,
            "data": run.errors.summary(),
            "metrics": metrics,
            "parameters": {"total": total, "trainable": trainable},
            "seconds": round(time.time() - run.started, 1),
            "versions": library_versions(),
        }
        write_json_atomic(run.output_dir / MANIFEST, manifest)
    shutil.rmtree(run.cache_dir, ignore_errors=True)
    trainer.end()
    return run.output_dir


def artifact_bytes(model, state_dict: dict | None) -> int:
    """At least what save_pretrained writes: an adapter's own weights, else the whole (deduplicated) state."""
    if hasattr(model, "peft_config"):
        return tensor_bytes(p for p in model.parameters() if p.requires_grad)
    return tensor_bytes(nested_tensors(state_dict if state_dict is not None else model.state_dict()))


def write_model_files(out: Path, need: int, write) -> None:
    """The model's files written into a temporary folder beside them and moved in once all are on disk, so
    a failure (a full disk, a SIGTERM) never leaves a half-written model that looks complete; the manifest,
    written after this, is what marks the folder complete. A failed write removes its partial folder."""
    for stale in out.glob(".tmp-artifact-*"):  # what a killed save left
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out / f".tmp-artifact-{os.getpid()}"
    kept = f"the checkpoints in {checkpoint_dir(out)} are intact"
    check_room(out, need, kept)
    with cleaned_up_on_failure(tmp, out, need, lambda: kept):
        tmp.mkdir()
        write(tmp)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is not a complete artifact until the end
    new = {p.name for p in tmp.iterdir()}
    for pattern in WEIGHT_FILES:
        for old in out.glob(pattern):
            if old.name not in new and old.is_file():
                old.unlink()
    for item in tmp.iterdir():
        if (out / item.name).is_dir():
            shutil.rmtree(out / item.name)
        os.replace(item, out / item.name)
    tmp.rmdir()


def keep_initial_answers(trainer, answer) -> None:
    """The starting model's held-out answers (`answer()`), kept in every checkpoint: a resumed run reports
    them without the starting model. Read them back with `initial_answers` after training."""
    if trainer.resume_from is None:
        trainer.state.extra[INITIAL_ANSWERS] = answer()


def initial_answers(trainer) -> dict:
    return trainer.state.extra.get(INITIAL_ANSWERS, {})
