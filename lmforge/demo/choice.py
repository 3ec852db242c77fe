"""The demo world's multiple-choice file: its held-out SFT questions, each with four options.

`choice/eval.csv` is in the C-Eval layout (`id,question,A,B,C,D,answer`), so the demo's models are scored
by the same reader and the same log-likelihood measure as a real benchmark (`lmforge.eval.choice`). A
question's options are its answer and three of its `distractors` (the attribute's other values), in a
seeded random order; sums have no distractors and are left out.
"""

from __future__ import annotations

import csv
import io
import random

from lmforge.demo.world import World

CHOICE_FILE = "choice/eval.csv"
OPTION_LETTERS = "ABCD"


def _csv_line(cells: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(cells)  # quotes a question that holds a comma
    return out.getvalue()


def choice_rows(world: World, sft_eval: list[dict]) -> list[list[str]]:
    """The header and one row per held-out question that has at least three distractors."""
    rng = random.Random(f"demo-choice:{world.seed}")
    rows = [["id", "question", *OPTION_LETTERS, "answer"]]
    for record in sft_eval:
        if len(record["distractors"]) < len(OPTION_LETTERS) - 1:
            continue
        options = [record["answer"], *rng.sample(record["distractors"], len(OPTION_LETTERS) - 1)]
        rng.shuffle(options)
        question = next(m["content"] for m in record["messages"] if m["role"] == "user")
        rows.append([record["id"], question, *options, OPTION_LETTERS[options.index(record["answer"])]])
    return rows


def choice_files(world: World, sft_eval: list[dict]) -> dict[str, tuple[str, list[str]]]:
    """name -> (path under the world directory, CSV lines)."""
    return {"choice_eval": (CHOICE_FILE, [_csv_line(row) for row in choice_rows(world, sft_eval)])}
