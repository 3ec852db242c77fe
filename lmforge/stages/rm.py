"""RM: reward modelling. Ranked pairs → the SFT model with a scalar head scores chosen and rejected in
one pass → Bradley–Terry loss → pairwise accuracy and margin on held-out pairs. Saved as a plain
`AutoModelForSequenceClassification` folder (LoRA merged in)."""

from __future__ import annotations

from functools import partial

import torch

from lmforge.config.schema import RMConfig, StageConfig
from lmforge.data.build import load_splits, tokenize_preference
from lmforge.data.preference import collate_pairs
from lmforge.loop.trainer import Trainer, pair_count
from lmforge.losses.preference import bradley_terry_loss
from lmforge.stages.common import load_for_training, save_artifact, start_run, tokenizing_bar


def pairwise_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards of chosen, rewards of rejected) from the [2B, L] batch."""
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    scores = scores.squeeze(-1).float()
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def rm_loss(model, batch: dict, cfg: RMConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    chosen, rejected = pairwise_rewards(model, batch)
    margin = torch.full_like(chosen, cfg.margin) if cfg.margin else None
    loss, metrics = bradley_terry_loss(chosen, rejected, margin=margin, center_coef=cfg.center_coef)
    pairs = torch.tensor(chosen.shape[0], device=chosen.device)
    return loss * pairs, pairs, metrics


def run(cfg: StageConfig) -> dict:
    run_ = start_run(cfg)
    model, tokenizer, parent, _ = load_for_training(cfg, reward_head=True)
    model.config.pad_token_id = tokenizer.pad_token_id

    train_pairs, eval_pairs, fingerprint = load_splits(cfg.data, run_.errors, run_.cache_dir, kind="pair")
    with tokenizing_bar(cfg, train_pairs, eval_pairs) as bar:
        train_rows = tokenize_preference(train_pairs, tokenizer, cfg.data, run_.errors, "pair", bar.advance)
        eval_rows = tokenize_preference(eval_pairs, tokenizer, cfg.data, run_.errors, "pair", bar.advance) \
            if eval_pairs is not None else None

    trainer = Trainer(model, train_rows, partial(collate_pairs, pad_id=tokenizer.pad_token_id),
                      partial(rm_loss, cfg=cfg.rm), cfg.train, cfg.log, eval_rows=eval_rows, perplexity=False,
                      count_fn=pair_count, tokenizer=tokenizer)
    with trainer.preemption:  # SIGTERM after the last step: the final checkpoint holds everything
        result = trainer.train()
        save_artifact(run_, trainer, tokenizer, parent, fingerprint, result.metrics, merge_adapter=True)
    return result.metrics
