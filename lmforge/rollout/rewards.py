"""Rewards for online RL: each `RewardSpec` becomes a function of (prompts, responses, per-sample columns)
returning one float per response; `RewardSet` sums them with their weights and keeps each part for logging.

The per-sample columns (`rows`) are the prompt record's `reference` and `answer`, every field of its
`extra` JSON (the record's other columns, see `lmforge.data.prompts`), and from the rollout
`response_lengths` (tokens) and `stopped` (the reply ended its turn by itself).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import numbers
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Protocol

import torch

from lmforge.config.errors import ConfigError
from lmforge.config.schema import RewardSpec
from lmforge.data import grading
from lmforge.data.reasoning import is_think_then_answer
from lmforge.rollout.score import score_responses

# Columns the rollout itself provides or that name the call's arguments: an `extra` field of the same
# name must not shadow them.
RESERVED = ("reference", "answer", "response_lengths", "stopped", "prompts", "responses")


class RewardFn(Protocol):
    def __call__(self, prompts: list[list[dict]], responses: list[str], rows: dict[str, list]) -> list[float]: ...


def decode_rows(records: list[dict]) -> dict[str, list]:
    """Prompt-dataset rows (prompt, reference, answer, extra) → the per-sample `rows` columns, without the
    rollout's `response_lengths` and `stopped`. A field missing from a record's `extra` is None there."""
    extras = [json.loads(r.get("extra") or "{}") for r in records]
    rows: dict[str, list] = {"reference": [r.get("reference") or "" for r in records],
                             "answer": [r.get("answer") or "" for r in records]}
    for key in dict.fromkeys(k for extra in extras for k in extra):
        if key not in RESERVED:
            rows[key] = [extra.get(key) for extra in extras]
    return rows


def _column(rows: dict[str, list], key: str, kind: str) -> list:
    if key not in rows:
        raise ValueError(f"{kind} reward needs the per-sample column {key!r}, which the rollout did not pass")
    return rows[key]


# --------------------------------------------------------------------------- model


class ModelReward:
    """A reward-model artifact, loaded on first use; it renders each prompt with its own tokenizer and
    chat template, so a policy with another tokenizer is scored as the RM was trained."""

    def __init__(self, path: str, device=None):
        self.path, self.device = path, device
        self.model = self.tokenizer = None

    def load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from lmforge.models.load import local_folder, require_safetensors

        local_folder("rl.rewards (model)", self.path)
        require_safetensors(self.path)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(self.path, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"rl.rewards: cannot load the reward model at {self.path!r}: {exc}") from exc
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            # The score is read at the last non-pad token; without a pad id batches of >1 are refused.
            model.config.pad_token_id = tokenizer.pad_token_id
        if self.device is not None:
            model.to(self.device)
        model.eval().requires_grad_(False)
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, prompts: list[list[dict]], responses: list[str], rows: dict[str, list]) -> list[float]:
        if self.model is None:
            self.load()
        return score_responses(self.model, self.tokenizer, prompts, responses)


# --------------------------------------------------------------------------- exact and answer match


def exact_match(prompts: list[list[dict]], responses: list[str], rows: dict[str, list]) -> list[float]:
    """1 where the reply is the reference reply (`lmforge.data.grading.exact_match`)."""
    references = _column(rows, "reference", "exact_match")
    out = []
    for i, (response, reference) in enumerate(zip(responses, references)):
        if not grading.normalise(reference):
            raise ValueError(f"exact_match reward: sample {i} has no reference answer (the prompt data had no "
                             "reference reply or column)")
        out.append(float(grading.exact_match(response, reference)))
    return out


def answer_match(prompts: list[list[dict]], responses: list[str], rows: dict[str, list]) -> list[float]:
    """1 where the reply states the record's answer, else its reference's final answer, and none of its
    `distractors` (`lmforge.data.grading.answer_match`)."""
    answers = rows.get("answer") or [""] * len(responses)
    references = rows.get("reference") or [""] * len(responses)
    distractors = rows.get("distractors") or [None] * len(responses)
    out = []
    for i, response in enumerate(responses):
        expected = answers[i] or references[i]
        if not grading.final_answer(expected).strip():
            raise ValueError(f"answer_match reward: sample {i} has neither an answer nor a reference (the prompt "
                             "data had no answer column or reference reply)")
        question = next((m["content"] for m in reversed(prompts[i]) if m["role"] == "user"), "")
        wrong = distractors[i] if isinstance(distractors[i], list) else None
        out.append(float(grading.answer_match(response, expected, question, wrong)))
    return out


def think_format(prompts: list[list[dict]], responses: list[str], rows: dict[str, list]) -> list[float]:
    """1 where the reply is one closed `<think>` block with reasoning in it, then a non-empty answer
    (`lmforge.data.reasoning.is_think_then_answer`), else 0."""
    return [float(is_think_then_answer(response)) for response in responses]


# --------------------------------------------------------------------------- regex and length


def regex_reward(pattern: str) -> RewardFn:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"rl.rewards: regex pattern {pattern!r} does not compile ({exc})") from exc

    def reward(prompts: list[list[dict]], responses: list[str], rows: dict[str, list]) -> list[float]:
        return [float(compiled.search(r) is not None) for r in responses]

    return reward


def length_reward(target: int) -> RewardFn:
    def reward(prompts: list[list[dict]], responses: list[str], rows: dict[str, list]) -> list[float]:
        lengths = _column(rows, "response_lengths", "length")
        return [-max(0, int(n) - target) / target for n in lengths]

    return reward


# --------------------------------------------------------------------------- user functions


def load_function(target: str):
    """`package.module:function` or `path/to/file.py:function` → the function; ConfigError naming it."""
    module_name, sep, name = target.rpartition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"rl.rewards: function {target!r} must read package.module:function or "
                          "path/to/file.py:function")
    try:
        if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
            path = Path(module_name).resolve()
            if not path.is_file():
                raise ConfigError(f"rl.rewards: function {target!r}: no file {path}")
            # A name unique to the file: two reward files both called rewards.py must not collide.
            unique = f"lmforge_reward_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
            spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[unique] = module  # dataclasses and pickling look the module up by name
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as exc:  # whatever the user's module raises while importing, reported as config
        raise ConfigError(f"rl.rewards: cannot import {target!r} ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"rl.rewards: function {target!r}: {module_name} has no function {name!r}")
    return fn


def checked_rewards(values, n: int, name: str) -> list[float]:
    """A user function's output as n finite floats, or a ValueError saying what was wrong."""
    if isinstance(values, torch.Tensor) or hasattr(values, "ndim"):
        if values.ndim != 1:
            raise ValueError(f"reward function {name} returned a {values.ndim}-D array; expected one value per response")
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"reward function {name} returned {type(values).__name__}; expected a list of {n} numbers")
    if len(values) != n:
        raise ValueError(f"reward function {name} returned {len(values)} rewards for {n} responses")
    out = []
    for i, value in enumerate(values):
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"reward function {name} returned {value!r} for response {i}; expected a finite number")
        out.append(float(value))
    return out


def function_reward(target: str) -> RewardFn:
    fn = load_function(target)

    def reward(prompts: list[list[dict]], responses: list[str], rows: dict[str, list]) -> list[float]:
        return checked_rewards(fn(prompts, responses, **rows), len(responses), target)

    return reward


# --------------------------------------------------------------------------- building and summing


def build_reward(spec: RewardSpec, device=None) -> RewardFn:
    if spec.kind == "model":
        return ModelReward(spec.path, device)
    if spec.kind == "exact_match":
        return exact_match
    if spec.kind == "answer_match":
        return answer_match
    if spec.kind == "think_format":
        return think_format
    if spec.kind == "regex":
        return regex_reward(spec.pattern)
    if spec.kind == "length":
        return length_reward(spec.target_length)
    if spec.kind == "function":
        return function_reward(spec.function)
    raise ConfigError(f"rl.rewards: unknown reward kind {spec.kind!r}")


class RewardSet:
    """Several rewards summed with their weights; each part is kept, unweighted, under a readable name
    (the kind, with `_2`, `_3` for repeats)."""

    def __init__(self, specs: list[RewardSpec], device=None):
        if not specs:
            raise ConfigError("rl.rewards: no rewards given (set rl.reward_model or rl.rewards)")
        seen: Counter = Counter()
        self.names, self.weights, self.fns = [], [], []
        for spec in specs:
            seen[spec.kind] += 1
            self.names.append(spec.kind if seen[spec.kind] == 1 else f"{spec.kind}_{seen[spec.kind]}")
            self.weights.append(spec.weight)
            self.fns.append(build_reward(spec, device))

    def __call__(self, prompts: list[list[dict]], responses: list[str],
                 rows: dict[str, list]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = len(responses)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} responses")
        for key, column in rows.items():
            if len(column) != n:
                raise ValueError(f"rows[{key!r}] has {len(column)} entries for {n} responses")
        total = torch.zeros(n, dtype=torch.float32)
        components: dict[str, torch.Tensor] = {}
        for name, weight, fn in zip(self.names, self.weights, self.fns):
            values = torch.tensor(fn(prompts, responses, rows), dtype=torch.float32).reshape(-1)
            if values.shape[0] != n:
                raise ValueError(f"reward {name} gave {values.shape[0]} values for {n} responses")
            components[name] = values
            total += weight * values
        return total, components
