"""SFT: supervised fine-tuning. Dialogues → chat template → loss on assistant replies only →
held-out loss, then held-out answers generated and compared with the references (exact match)."""

from __future__ import annotations

from functools import partial

from lmforge.config.schema import StageConfig
from lmforge.data.build import load_splits, tokenize_sft
from lmforge.data.packing import collate
from lmforge.loop.checkpoint import latest_checkpoint
from lmforge.loop.trainer import Trainer
from lmforge.rollout.generate import generate
from lmforge.stages.common import lm_loss, load_for_training, save_artifact, start_run


def answer_eval(model, tokenizer, eval_examples, limit: int, max_new_tokens: int) -> dict:
    """Exact match of generated replies against the final reference reply, and how often the model
    ends its turn by itself."""
    rows = [e for e in eval_examples.select(range(min(limit, len(eval_examples)))) if e["messages"]]
    if not rows:
        return {}
    prompts = [r["messages"][:-1] for r in rows]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    exact = sum(o.text.strip() == r["messages"][-1]["content"].strip() for o, r in zip(outputs, rows))
    stopped = sum(o.stopped for o in outputs)
    return {"exact_match": exact / len(rows), "stopped_rate": stopped / len(rows), "answered": len(rows),
            "sample": {"prompt": prompts[0][-1]["content"], "reply": outputs[0].text}}


def run(cfg: StageConfig) -> dict:
    run_ = start_run(cfg)
    model, tokenizer, parent = load_for_training(cfg)

    train_examples, eval_examples, fingerprint = load_splits(cfg.data, run_.errors, run_.cache_dir)
    train_rows = tokenize_sft(train_examples, tokenizer, cfg.data, run_.errors, pack=cfg.data.packing)
    eval_rows = tokenize_sft(eval_examples, tokenizer, cfg.data, run_.errors, pack=False) \
        if eval_examples is not None else None

    trainer = Trainer(model, train_rows, partial(collate, pad_id=tokenizer.pad_token_id), lm_loss,
                      cfg.train, cfg.log, eval_rows=eval_rows)
    resuming = cfg.train.resume_from or (cfg.train.resume and latest_checkpoint(cfg.train.output_dir))
    before = answer_eval(model, tokenizer, eval_examples, cfg.sft.eval_generate, cfg.sft.max_new_tokens) \
        if eval_examples is not None and cfg.sft.eval_generate > 0 and not resuming else {}
    result = trainer.train()
    metrics = dict(result.metrics)
    if eval_examples is not None and cfg.sft.eval_generate > 0:
        after = answer_eval(trainer.accelerator.unwrap_model(trainer.prepared), tokenizer, eval_examples,
                            cfg.sft.eval_generate, cfg.sft.max_new_tokens)
        metrics.update({f"eval_{k}": v for k, v in after.items()})
        metrics.update({f"initial_eval_{k}": v for k, v in before.items()})
        trainer.log({k: v for k, v in metrics.items() if k.startswith(("eval_exact", "eval_stopped"))})

    save_artifact(run_, trainer, tokenizer, parent, fingerprint, metrics)
    return metrics
