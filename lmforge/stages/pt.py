"""PT: (continued) pretraining. Documents → tokens + EOS → packed block_size rows (documents kept
apart) → next-token loss on every token → held-out perplexity."""

from __future__ import annotations

from functools import partial

from lmforge.config.schema import StageConfig
from lmforge.data.build import load_splits, tokenize_pt
from lmforge.data.packing import collate
from lmforge.loop.trainer import Trainer
from lmforge.models.heads import lm_loss, use_fused_loss
from lmforge.stages.common import load_for_training, save_artifact, start_run


def run(cfg: StageConfig) -> dict:
    run_ = start_run(cfg)
    model, tokenizer, parent, _ = load_for_training(cfg)

    train_docs, eval_docs, fingerprint = load_splits(cfg.data, run_.errors, run_.cache_dir)
    block = cfg.pt.block_size
    train_rows = tokenize_pt(train_docs, tokenizer, block, cfg.data.streaming, run_.cache_dir)
    eval_rows = tokenize_pt(eval_docs, tokenizer, block, False, run_.cache_dir) if eval_docs is not None else None

    trainer = Trainer(model, train_rows, partial(collate, pad_id=tokenizer.pad_token_id),
                      partial(lm_loss, fused=use_fused_loss(cfg)),
                      cfg.train, cfg.log, eval_rows=eval_rows, tokenizer=tokenizer)
    with trainer.preemption:  # SIGTERM after the last step: the final checkpoint holds everything
        result = trainer.train()
        save_artifact(run_, trainer, tokenizer, parent, fingerprint, result.metrics)
    return result.metrics
