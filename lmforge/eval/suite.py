"""`lmforge eval MODEL`: run every evaluation an `EvalSpec` and the model allow, and keep the results.

A causal LM gets perplexity, answers, multiple choice, the reward of its replies, KL to a reference
and a win-rate against a baseline; a reward model gets its pairwise accuracy. A suite whose inputs
are unchanged since the last evaluation (same spec fields, same judge artifacts) is not run again.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.artifacts import MANIFEST, parent_manifest_digest, write_json_atomic
from lmforge.config.errors import ConfigError
from lmforge.config.schema import DataConfig, DatasetSpec
from lmforge.data.build import load_examples
from lmforge.data.errors import ErrorLog
from lmforge.eval import metrics
from lmforge.eval.spec import EvalSpec
from lmforge.loop.progress import QUIET_S, TaskBar
from lmforge.models.load import inference_device, load_for_inference


def is_reward_model(path: str) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


@dataclass
class EvalCache:
    """What one process keeps between evaluations: a pipeline judges several stages against the same
    baseline and reward model, whose replies and weights need loading only once."""
    judges: dict = field(default_factory=dict)
    baseline_replies: dict = field(default_factory=dict)


def read_records(path: str, kind: str, limit: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as cache:
        rows, _ = load_examples([DatasetSpec(path=path, max_samples=limit)], DataConfig(), ErrorLog(), cache,
                                kind=kind)
        return list(rows)


def _judge(path: str, cache: EvalCache):
    from lmforge.rollout.rewards import ModelReward

    key = (path, parent_manifest_digest(path))
    if key not in cache.judges:
        judge = ModelReward(path, device=inference_device())
        judge.load()
        cache.judges = {key: judge}  # one judge at a time: a pipeline's RM does not change mid-run
    return cache.judges[key]


def wanted_suites(spec: EvalSpec, reward_model: bool) -> list[str]:
    if reward_model:
        return ["rm_accuracy"] if spec.pairs else []
    wanted = [name for name, source in (("perplexity", spec.perplexity), ("answers", spec.answers),
                                        ("choice", spec.choice)) if source]
    if spec.prompt_file and spec.reward_model:
        wanted.append("reward")
    if spec.prompt_file and spec.reference:
        wanted.append("kl")
    if spec.prompt_file and spec.reward_model and spec.baseline:
        wanted.append("win_rate")
    return wanted


def evaluate_model(path: str, spec: EvalSpec, previous: dict | None = None, cache: EvalCache | None = None,
                   log=print, keep_others: bool = False) -> dict:
    """{"suites": {name: {"key", "metrics"}}, "metrics": every suite's numbers, "samples", "seconds"}.
    `keep_others` keeps earlier results of suites this spec does not ask for (`lmforge eval` adds to a
    manifest; a pipeline's eval block is the whole list)."""
    started = time.time()
    cache = cache or EvalCache()
    previous = previous or {}
    reward_model = is_reward_model(path)
    judges = {role: parent_manifest_digest(getattr(spec, role)) for role in ("reward_model", "reference", "baseline")
              if getattr(spec, role)}
    wanted = wanted_suites(spec, reward_model)
    suites = {name: result for name, result in (previous.get("suites") or {}).items()
              if keep_others or name in wanted}
    todo = [s for s in wanted if suites.get(s, {}).get("key") != spec.suite_key(s, judges)]
    samples = previous.get("samples") or []
    if todo:
        log(f"evaluating {path}: {', '.join(todo)}")
        # suites done out of those asked (quiet under QUIET_S; lines every 30 s without a terminal)
        with TaskBar("Evaluating", len(todo), quiet_s=QUIET_S) as bar:
            if reward_model:
                judge = _judge(path, cache)
                pairs = read_records(spec.pairs, "pair", spec.max_samples)
                suites["rm_accuracy"] = {"metrics": metrics.rm_accuracy(judge.model, judge.tokenizer, pairs)}
                bar.advance()
            else:
                new, samples = _causal_suites(path, spec, todo, cache, samples, bar.advance)
                suites.update(new)
        for name in todo:
            suites[name]["key"] = spec.suite_key(name, judges)
    flat = {k: v for result in suites.values() for k, v in result["metrics"].items()}
    return {"suites": suites, "metrics": flat, "samples": samples,
            "seconds": round(previous.get("seconds", 0.0) + (time.time() - started if todo else 0.0), 2)}


def _causal_suites(path: str, spec: EvalSpec, todo: list[str], cache: EvalCache, samples: list[dict],
                   done: Callable[[int], None]) -> tuple[dict, list[dict]]:
    """The suites of a causal LM in `todo`; `done(n)` as each n finish."""
    model, tokenizer = load_for_inference(path)
    out: dict[str, dict] = {}
    if "perplexity" in todo:
        texts = [r["text"] or "\n".join(m["content"] for m in r["messages"])
                 for r in read_records(spec.perplexity, "sft", spec.max_samples)]
        out["perplexity"] = {"metrics": metrics.perplexity(model, tokenizer, texts, spec.block_size,
                                                           max_tokens=spec.perplexity_tokens)}
        done(1)
    if "choice" in todo:
        from lmforge.eval.choice import choice_eval, read_choice_file

        questions = read_choice_file(spec.choice)[:spec.max_samples]
        result = choice_eval(model, tokenizer, questions)
        out["choice"] = {"metrics": {k: v for k, v in result.items() if isinstance(v, (int, float))}}
        done(1)
    greedy: dict[str, list[str]] = {}  # file -> greedy replies, shared by the suites that read it
    if "answers" in todo:
        records = read_records(spec.answers, "prompt", spec.max_samples)
        replies = metrics.greedy_replies(model, tokenizer, records, spec.max_new_tokens)
        greedy[spec.answers] = replies.texts
        out["answers"] = {"metrics": metrics.answer_metrics(records, replies)}
        samples = _samples(records, replies.texts, spec.show_samples)
        done(1)
    policy_suites = [s for s in ("reward", "kl", "win_rate") if s in todo]
    if policy_suites:
        records = read_records(spec.prompt_file, "prompt", spec.max_samples)
        if "kl" in todo:
            reference, _ = load_for_inference(spec.reference)
            out["kl"] = {"metrics": metrics.kl_to_reference(model, reference, tokenizer, records,
                                                            spec.max_new_tokens, spec.seed)}
            del reference
            done(1)
        if "reward" in todo or "win_rate" in todo:
            texts = greedy.get(spec.prompt_file) or \
                metrics.greedy_replies(model, tokenizer, records, spec.max_new_tokens).texts
            judge = _judge(spec.reward_model, cache)
            scores = metrics.reward_of(judge.model, judge.tokenizer, records, texts)
            if not spec.answers:  # no reference answers to show: show these replies instead
                samples = _samples(records, texts, spec.show_samples)
            out["reward"] = {"metrics": {"reward": sum(scores) / len(scores)}}
            if "win_rate" in todo:
                out["win_rate"] = {"metrics": _win_rate(spec, cache, judge, records, texts, scores)}
            if "reward" not in todo:
                del out["reward"]
            done(("reward" in todo) + ("win_rate" in todo))
    return out, samples


def _samples(records: list[dict], texts: list[str], limit: int) -> list[dict]:
    """The first held-out prompts with the reply, for the report's side-by-side table."""
    return [{"id": str(json.loads(r["extra"] or "{}").get("id", i)), "prompt": r["prompt"][-1]["content"],
             "reference": r["reference"], "reply": text} for i, (r, text) in enumerate(zip(records[:limit], texts))]


def _win_rate(spec: EvalSpec, cache: EvalCache, judge, records: list[dict], texts: list[str],
              scores: list[float]) -> dict:
    key = (spec.baseline, parent_manifest_digest(spec.baseline), spec.prompt_file, spec.max_samples,
           spec.max_new_tokens)
    if key not in cache.baseline_replies:
        baseline, tokenizer = load_for_inference(spec.baseline)
        cache.baseline_replies[key] = metrics.greedy_replies(baseline, tokenizer, records, spec.max_new_tokens).texts
        del baseline
    baseline_texts = cache.baseline_replies[key]
    result = metrics.win_rate(scores, metrics.reward_of(judge.model, judge.tokenizer, records, baseline_texts))
    truth = metrics.ground_truth(records, texts)
    if truth is not None:
        result.update(metrics.win_rate(truth, metrics.ground_truth(records, baseline_texts), prefix="gt_"))
    return result


def record_eval(artifact: str | Path, result: dict) -> None:
    """Store the result in the artifact's manifest (under "eval"), which stays the one record of it."""
    manifest_path = Path(artifact) / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(f"{artifact} has no {MANIFEST}: evaluation results go into an lmforge artifact")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["eval"] = result
    write_json_atomic(manifest_path, manifest)
