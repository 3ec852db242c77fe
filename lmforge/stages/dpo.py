"""DPO family: offline preference optimisation without a reward model.

Pairs (or KTO's unpaired records) → chosen and rejected in one forward pass (by default one packed row
[prompt, chosen, rejected] per pair, the prompt run once: models.shared_prompt) → the
configured loss (sigmoid DPO, IPO, hinge, robust, SimPO, ORPO, KTO) against reference log-probs
from a frozen copy, the adapter-disabled policy, or a cached pass → implicit-reward accuracy and
margins on held-out pairs, and greedy answers compared with the chosen replies before and after.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from lmforge.config.errors import ConfigError
from lmforge.config.schema import DPOConfig, StageConfig
from lmforge.data.build import load_splits, tokenize_preference
from lmforge.data.preference import collate_kto, collate_pairs
from lmforge.loop.trackers import make_accelerator
from lmforge.loop.trainer import Trainer, compile_blocks
from lmforge.losses.preference import dpo_loss, kto_kl_estimate, kto_loss, orpo_loss, simpo_loss
from lmforge.models.heads import policy_logps, use_fused_loss
from lmforge.models.reference import Reference, cache_key, precompute, reference_kind
from lmforge.models.shared_prompt import is_shared, unsupported_reason
from lmforge.rollout.evaluate import answer_eval
from lmforge.stages.common import (
    initial_answers,
    keep_initial_answers,
    load_for_training,
    save_artifact,
    start_run,
    tokenizing_bar,
)

REFERENCE_FREE = ("simpo", "orpo")


def preference_loss(model, batch: dict, cfg: DPOConfig, reference: Reference | None, fused: bool = False):
    """(loss × pairs, pairs, metrics) for one [2B, L] batch. `fused`: log-probs from the final hidden
    states in chunks, never the [2B, L, vocab] logits."""
    sums, lengths = policy_logps(model, batch, fused)
    half = sums.shape[0] // 2
    count = torch.tensor(half, device=sums.device)
    nll = -sums[:half].sum() / lengths[:half].sum().clamp(min=1)  # chosen replies, per token
    if cfg.loss == "orpo":
        avg = sums / lengths.clamp(min=1)
        loss, metrics = orpo_loss(avg[:half], avg[half:], nll, lam=cfg.orpo_lambda)
        return loss * half, count, metrics
    if cfg.loss == "simpo":
        avg = sums / lengths.clamp(min=1)
        loss, metrics = simpo_loss(avg[:half], avg[half:], beta=cfg.beta, gamma=cfg.simpo_gamma,
                                   label_smoothing=cfg.label_smoothing)
        return _with_sft_term(loss, metrics, nll, cfg) * half, count, metrics
    ref = _reference_logps(model, batch, reference)
    if cfg.loss == "kto":
        kl = kto_kl_estimate(sums[half:], ref[half:])
        loss, metrics = kto_loss(sums[:half], ref[:half], batch["label"], kl, beta=cfg.beta,
                                 desirable_weight=cfg.kto_desirable_weight,
                                 undesirable_weight=cfg.kto_undesirable_weight)
        return loss * half, count, metrics
    if cfg.loss == "ipo":  # IPO is defined on per-token averages
        sums, ref = sums / lengths.clamp(min=1), ref / lengths.clamp(min=1)
    loss, metrics = dpo_loss(sums[:half], sums[half:], ref[:half], ref[half:], beta=cfg.beta, loss_type=cfg.loss,
                             label_smoothing=cfg.label_smoothing)
    return _with_sft_term(loss, metrics, nll, cfg) * half, count, metrics


def preference_count(batch: dict) -> torch.Tensor:
    """Pairs (KTO: records) in a batch of either layout."""
    rows = batch["input_ids"].shape[0]
    return torch.tensor(rows if is_shared(batch) else rows // 2, device=batch["input_ids"].device)


preference_count.metric_name = "pairs"


def share_prompt(cfg: StageConfig, model_config) -> bool:
    """dpo.share_prompt resolved for this model: unset means on wherever the shared layout is exact."""
    reason = unsupported_reason(model_config, cfg.data.max_length, cfg.model.finetuning == "mod")
    if cfg.dpo.share_prompt and reason:
        raise ConfigError(f"dpo.share_prompt=true cannot be used here: {reason}; set dpo.share_prompt=false")
    return reason is None if cfg.dpo.share_prompt is None else cfg.dpo.share_prompt


def _with_sft_term(loss: torch.Tensor, metrics: dict, nll: torch.Tensor, cfg: DPOConfig) -> torch.Tensor:
    """RPO / CPO-SimPO: the chosen replies' NLL, weighted, added to the preference loss."""
    if not cfg.sft_weight:
        return loss
    metrics["nll"] = nll.detach()
    return loss + cfg.sft_weight * nll


def _reference_logps(model, batch: dict, reference: Reference | None) -> torch.Tensor:
    if "ref_chosen" in batch:
        return torch.cat([batch["ref_chosen"], batch["ref_rejected"]])
    if "ref_logps" in batch:
        return torch.cat([batch["ref_logps"], batch["ref_kl_logps"]])
    return reference.logps(model, batch).float()


def held_out_answers(model, tokenizer, pairs, limit: int, max_new_tokens: int) -> dict:
    """Greedy replies to held-out prompts, compared with the chosen replies."""
    if pairs is None or limit <= 0:
        return {}
    rows = pairs.select(range(min(limit, len(pairs))))
    if "chosen" not in rows.column_names:  # KTO: the desirable completions are the references
        rows = [r for r in rows if r["label"]]
        return answer_eval(model, tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows],
                           max_new_tokens)
    return answer_eval(model, tokenizer, rows["prompt"], rows["chosen"], max_new_tokens)


def run(cfg: StageConfig) -> dict:
    run_ = start_run(cfg)
    kind_of_reference = None if cfg.dpo.loss in REFERENCE_FREE else reference_kind(cfg.dpo.reference, cfg.model, cfg.lora)
    # Before the first step the policy *is* the reference: a cached pass needs no copy of it.
    needs_copy = kind_of_reference == "copy" and not cfg.dpo.precompute_ref
    model, tokenizer, parent, frozen = load_for_training(cfg, frozen_copy=needs_copy)
    reference = None if kind_of_reference is None else Reference(kind_of_reference, frozen if needs_copy else model)
    if frozen is not None and cfg.train.compile:
        compile_blocks(frozen)

    kind = "kto" if cfg.dpo.loss == "kto" else "pair"
    train_pairs, eval_pairs, fingerprint = load_splits(cfg.data, run_.errors, run_.cache_dir, kind=kind)
    with tokenizing_bar(cfg, train_pairs, eval_pairs) as bar:
        train_rows = tokenize_preference(train_pairs, tokenizer, cfg.data, run_.errors, kind, bar.advance)
        eval_rows = tokenize_preference(eval_pairs, tokenizer, cfg.data, run_.errors, kind, bar.advance) \
            if eval_pairs is not None else None
    collate = partial(collate_kto if kind == "kto" else collate_pairs, pad_id=tokenizer.pad_token_id,
                      share_prompt=share_prompt(cfg, model.config))

    accelerator = make_accelerator(cfg.train, cfg.log, str(run_.output_dir))
    if reference is not None and cfg.dpo.precompute_ref:
        # One pass of the starting model (which is the reference before the first step) writes the
        # reference log-probs into the rows; training then needs no reference at all.
        train_rows, eval_rows = _precomputed(cfg, accelerator, model, reference, collate, fingerprint, kind,
                                             train_rows, eval_rows)
        reference = None
    if reference is not None:
        reference.to(accelerator.device)
    loss_fn = partial(preference_loss, cfg=cfg.dpo, reference=reference, fused=use_fused_loss(cfg))
    trainer = Trainer(model, train_rows, collate, loss_fn, cfg.train, cfg.log, eval_rows=eval_rows,
                      accelerator=accelerator, perplexity=False, count_fn=preference_count, tokenizer=tokenizer)

    # SIGTERM: after the last step, the final checkpoint holds everything and the run stops at once.
    with trainer.preemption:
        keep_initial_answers(trainer, lambda: held_out_answers(model, tokenizer, eval_pairs, cfg.dpo.eval_generate,
                                                               cfg.dpo.max_new_tokens))
        result = trainer.train()
        metrics = dict(result.metrics)
        after = held_out_answers(trainer.accelerator.unwrap_model(trainer.prepared), tokenizer, eval_pairs,
                                 cfg.dpo.eval_generate, cfg.dpo.max_new_tokens)
        metrics.update({f"eval_{k}": v for k, v in after.items()})
        metrics.update({f"initial_eval_{k}": v for k, v in initial_answers(trainer).items()})
        save_artifact(run_, trainer, tokenizer, parent, fingerprint, metrics)
    return metrics


def _precomputed(cfg: StageConfig, accelerator, model, reference: Reference, collate, fingerprint: str, kind: str,
                 train_rows, eval_rows):
    """The rows with their reference log-prob columns, from the cache of an earlier run with the same key.
    Computed before the model is prepared: on the accelerator's device and under its autocast, the numerics
    the prepared model's forward has."""
    names = ("ref_logps", "ref_kl_logps") if kind == "kto" else ("ref_chosen", "ref_rejected")
    cache_dir = Path(cfg.train.output_dir) / "reference_cache"
    model.to(accelerator.device)
    out = []
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        if rows is None:
            out.append(None)
            continue
        key = cache_key(split, fingerprint, cfg.model.name_or_path, cfg.model.scratch, cfg.model.template,
                        cfg.model.dtype, cfg.data.max_length, cfg.data.seed, cfg.data.eval_split,
                        [s.__dict__ for s in cfg.data.train], len(rows), kind)
        with accelerator.autocast():
            out.append(precompute(reference, model, rows, collate, cfg.train.batch_size, accelerator.device,
                                  cache_dir / f"{split}-{key}.safetensors", names))
    return out
