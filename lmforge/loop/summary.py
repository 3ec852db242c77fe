"""What a run is about to do, said between model load and step 1: rows and tokens, steps per epoch and in
all, and one training row as the model sees it with the tokens that carry loss marked.

The per-file record counts (read, kept, skipped, cut) are said earlier, when the data is read
(lmforge.data.build.say_data_counts); this is what the loop makes of the rows that were kept.
"""

from __future__ import annotations

import math

import datasets
import pyarrow.compute as pc

from lmforge.data.inspect import plain_marked
from lmforge.data.tokenize import IGNORE

EXAMPLE_CHARS = 400
"""The example row is cut after this many characters: enough to see the template and the mask."""
EXAMPLE_SEARCH = 64
"""The example is the shortest row with loss among the first this many (a short one shows whole)."""


def token_totals(rows) -> dict | None:
    """{"rows", "tokens", "loss_tokens"} of a table or list of token rows, or None when the rows have no
    length to count (streamed data). Preference rows count the prompt once and each response."""
    if isinstance(rows, datasets.IterableDataset) or rows is None:
        return None
    if isinstance(rows, datasets.Dataset):
        table = rows.data
        columns = {name: table.column(name) for name in table.column_names if name.endswith(("ids", "labels"))}
        lengths = {name: int(pc.sum(pc.list_value_length(col)).as_py() or 0) for name, col in columns.items()}
        labels = columns.get("labels")
        masked = int(pc.sum(pc.equal(pc.list_flatten(labels), IGNORE)).as_py() or 0) if labels is not None else 0
    else:
        names = [n for n in (rows[0] if len(rows) else {}) if n.endswith(("ids", "labels"))]
        lengths = {n: sum(len(r[n]) for r in rows) for n in names}
        masked = sum(label == IGNORE for r in rows for label in r.get("labels", ()))
    if "input_ids" in lengths:
        tokens = lengths["input_ids"]
        loss = lengths.get("labels", tokens) - masked
    else:  # preference or KTO rows: the responses carry the loss
        responses = sum(n for name, n in lengths.items() if name != "prompt_ids")
        tokens, loss = lengths.get("prompt_ids", 0) + responses, responses
    return {"rows": len(rows), "tokens": tokens, "loss_tokens": loss}


def example_row(rows) -> tuple[list[int], list[int]] | None:
    """(ids, labels) of the shortest row with loss among the first EXAMPLE_SEARCH; a preference row shows
    its prompt (masked) and chosen response."""
    if rows is None or isinstance(rows, datasets.IterableDataset) or len(rows) == 0:
        return None
    candidates = []
    for row in (rows[i] for i in range(min(EXAMPLE_SEARCH, len(rows)))):
        if "input_ids" in row:
            ids, labels = list(row["input_ids"]), list(row.get("labels") or row["input_ids"])
        elif "prompt_ids" in row:
            answer = list(row.get("chosen_ids") or row.get("completion_ids") or [])
            ids, labels = list(row["prompt_ids"]) + answer, [IGNORE] * len(row["prompt_ids"]) + answer
        else:
            return None
        if any(label != IGNORE for label in labels):
            candidates.append((len(ids), ids, labels))
    if not candidates:
        return None
    _, ids, labels = min(candidates, key=lambda c: c[0])
    return ids, labels


def start_lines(trainer) -> list[str]:
    """The lines a Trainer says before step 1."""
    rows, tokenizer, cfg = trainer.train_rows, trainer.tokenizer, trainer.cfg
    per_epoch = trainer.steps_per_epoch()
    lines = []
    totals = token_totals(rows)
    if totals is not None:
        share = totals["loss_tokens"] / max(totals["tokens"], 1)
        lines.append(f"train rows: {totals['rows']:,}, {totals['tokens']:,} tokens, {totals['loss_tokens']:,} "
                     f"with loss ({share:.0%}), {totals['tokens'] / max(totals['rows'], 1):,.0f} per row")
    else:
        lines.append("train rows: streamed (counted as they are read)")
    epoch = f"{math.ceil(per_epoch):,} per epoch, " if per_epoch else ""
    rows_per_step = cfg.batch_size * cfg.grad_accum * trainer.accelerator.num_processes
    lines.append(f"optimizer steps: {epoch}{trainer.total_steps:,} in all ({rows_per_step} rows per step: "
                 f"batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {trainer.accelerator.num_processes} "
                 "processes)")
    example = example_row(rows) if tokenizer is not None else None
    if example is not None:
        text = plain_marked(tokenizer, *example)
        cut = f" ... ({len(text) - EXAMPLE_CHARS:,} more characters)" if len(text) > EXAMPLE_CHARS else ""
        lines.append(f"example row ({len(example[0])} tokens; [[...]] carries loss): "
                     f"{text[:EXAMPLE_CHARS]!r}{cut}")
    return lines


def rl_plan_lines(tokenizer, prompts: list[list[int]], held_out: int, rl, iterations: int, steps_per_iteration: int,
                  samples_per_step: int) -> list[str]:
    """What an online RL run (ppo, grpo, rloo) says before its first iteration, as an offline stage says its
    rows and steps: prompts and their tokens, rollouts per iteration and in all, optimizer steps, one prompt as
    the policy sees it. `rl` is the run's RLConfig."""
    lengths = [len(p) for p in prompts]
    rollouts = rl.prompts_per_step * rl.num_generations
    lines = [f"prompts: {len(prompts):,} train ({sum(lengths):,} tokens, {sum(lengths) / max(len(lengths), 1):,.0f} "
             f"per prompt, {max(lengths, default=0):,} at most), {held_out:,} held out",
             f"iterations: {iterations:,} ({iterations * rl.prompts_per_step / max(len(prompts), 1):.2g} epochs over "
             f"the prompts), each {rl.prompts_per_step} prompts x {rl.num_generations} replies = {rollouts} rollouts "
             f"of up to {rl.max_new_tokens} new tokens; {iterations * rollouts:,} rollouts in all",
             f"optimizer steps: {steps_per_iteration} per iteration ({rl.ppo_epochs} epochs x "
             f"{steps_per_iteration // max(rl.ppo_epochs, 1)} minibatches of {samples_per_step} rollouts), "
             f"{iterations * steps_per_iteration:,} in all"]
    if prompts:
        text = tokenizer.decode(prompts[0])
        cut = f" ... ({len(text) - EXAMPLE_CHARS:,} more characters)" if len(text) > EXAMPLE_CHARS else ""
        lines.append(f"example prompt ({len(prompts[0])} tokens): {text[:EXAMPLE_CHARS]!r}{cut}")
    return lines
