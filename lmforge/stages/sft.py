"""SFT: supervised fine-tuning. Dialogues → chat template → loss on assistant replies only →
held-out loss, then held-out answers generated and compared with the references (exact match)."""

from __future__ import annotations

from functools import partial

from lmforge.config.schema import StageConfig
from lmforge.data.build import load_splits, tokenize_sft
from lmforge.data.packing import collate
from lmforge.loop.trainer import Trainer
from lmforge.models.heads import lm_loss, use_fused_loss
from lmforge.models.neftune import add_neftune_noise
from lmforge.rollout.evaluate import answer_eval
from lmforge.stages.common import (
    initial_answers,
    keep_initial_answers,
    load_for_training,
    save_artifact,
    start_run,
    tokenizing_bar,
)


def held_out_answers(model, tokenizer, eval_examples, limit: int, max_new_tokens: int) -> dict:
    """Greedy replies to held-out dialogues (all turns but the last) against their last reply."""
    rows = [e for e in eval_examples.select(range(min(limit, len(eval_examples)))) if e["messages"]]
    return answer_eval(model, tokenizer, [r["messages"][:-1] for r in rows],
                       [r["messages"][-1]["content"] for r in rows], max_new_tokens)


def run(cfg: StageConfig) -> dict:
    run_ = start_run(cfg)
    model, tokenizer, parent, _ = load_for_training(cfg)
    noise = add_neftune_noise(model, cfg.sft.neftune_alpha) if cfg.sft.neftune_alpha > 0 else None

    train_examples, eval_examples, fingerprint = load_splits(cfg.data, run_.errors, run_.cache_dir)
    with tokenizing_bar(cfg, train_examples, eval_examples) as bar:
        train_rows = tokenize_sft(train_examples, tokenizer, cfg.data, run_.errors, cfg.data.packing, bar.advance)
        eval_rows = tokenize_sft(eval_examples, tokenizer, cfg.data, run_.errors, False, bar.advance) \
            if eval_examples is not None else None

    trainer = Trainer(model, train_rows, partial(collate, pad_id=tokenizer.pad_token_id),
                      partial(lm_loss, fused=use_fused_loss(cfg)),
                      cfg.train, cfg.log, eval_rows=eval_rows, tokenizer=tokenizer)
    answers = eval_examples is not None and cfg.sft.eval_generate > 0
    # SIGTERM: after the last step, the final checkpoint holds everything and the run stops at once.
    with trainer.preemption:
        if answers:
            keep_initial_answers(trainer, lambda: held_out_answers(model, tokenizer, eval_examples,
                                                                   cfg.sft.eval_generate, cfg.sft.max_new_tokens))
        result = trainer.train()
        if noise is not None:
            noise.remove()  # training only: evaluation, the saved model and later stages see clean embeddings
        metrics = dict(result.metrics)
        if answers:
            after = held_out_answers(trainer.accelerator.unwrap_model(trainer.prepared), tokenizer, eval_examples,
                                     cfg.sft.eval_generate, cfg.sft.max_new_tokens)
            metrics.update({f"eval_{k}": v for k, v in after.items()})
            metrics.update({f"initial_eval_{k}": v for k, v in initial_answers(trainer).items()})
            trainer.log({k: v for k, v in metrics.items() if k.startswith(("eval_exact", "eval_stopped"))})
        save_artifact(run_, trainer, tokenizer, parent, fingerprint, metrics)
    return metrics
