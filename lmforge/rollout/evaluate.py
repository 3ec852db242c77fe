"""Answer-based evaluation: generate greedy replies to held-out prompts and compare with references."""

from __future__ import annotations

from lmforge.data.grading import exact_match
from lmforge.rollout.generate import generate


def answer_eval(model, tokenizer, prompts: list[list[dict]], references: list[str], max_new_tokens: int) -> dict:
    """Exact match (`lmforge.data.grading.exact_match`, the rule `lmforge eval` and the rewards use) of
    greedy replies against the references, and how often the model ends its turn by itself. Empty when
    there is nothing to answer."""
    if not prompts:
        return {}
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    exact = sum(exact_match(o.text, ref) for o, ref in zip(outputs, references))
    return {"exact_match": exact / len(prompts), "stopped_rate": sum(o.stopped for o in outputs) / len(prompts),
            "answered": len(prompts), "sample": {"prompt": prompts[0][-1]["content"], "reply": outputs[0].text}}
