"""What a caller asks the generation engine for, and what it gets back.

One request type serves every consumer: RL rollouts (token ids in, token ids and log-probs out, `n`
samples of one prompt), evaluation and `lmforge generate` (greedy or sampled answers), chat and the
server (streamed text, stop strings, `top_logprobs`). Every value is checked when the request is built,
and a bad one raises `RequestError` naming the field.

Log-probs: `Sample.logprobs[i]` is the log-probability of the i-th sampled token under the model's own
distribution, `log_softmax` of the raw logits — before repetition/presence penalties, temperature and
top-k/top-p/min-p. That is the policy's log-prob that RL's importance ratios and KL terms need (the
"old log-probs" of PPO/GRPO), and it is what a teacher-forced forward pass over the same tokens gives.
`top_logprobs` ranks the same distribution. `tempered_logprobs` divides the logits by the sampling
temperature first (RL trains the tempered policy).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

FINISH_REASONS = ("stop", "length", "cancelled")
MAX_TOP_LOGPROBS = 20
"""The OpenAI API's bound: more would make every step sort the vocabulary for little use."""


class RequestError(ValueError):
    """A request value is invalid, or the request cannot fit the engine; the message names the field."""


class GenerationError(RuntimeError):
    """A step could not produce tokens (the model's output is unusable); the engine must be reset."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    """0 means greedy (arg-max of the penalised logits); above 0 divides the logits before sampling."""
    top_p: float = 1.0
    """Nucleus: keep the most likely tokens until their probability mass reaches top_p (1 keeps all)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 keeps all)."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one (0 keeps all)."""
    seed: int | None = None
    """Sample i of a request draws from the noise stream of seed + i (mod 2**63), so a sample's tokens do not
    depend on which other requests share the batch; None draws a fresh seed (reported in the result)."""
    repetition_penalty: float = 1.0
    """CTRL-style: a token already in the prompt or the reply has its positive logit divided by this, its
    negative logit multiplied (1 is off)."""
    presence_penalty: float = 0.0
    """OpenAI-style: subtracted from the logit of every token already in the reply (0 is off)."""

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_int("top_k", self.top_k, low=0)
        _check_number("min_p", self.min_p, low=0.0, high=1.0, high_open=True)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**63 - 1)
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        _check_number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    max_new_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)
    """Tokens that end a sample besides the engine's own `eos_ids`; the stop token is kept in the reply's
    token ids (RL scores the policy for stopping) and left out of its text."""
    stop_strings: list[str] = field(default_factory=list)
    """Text that ends a sample (needs the engine's tokenizer); the text is cut before it, the token ids
    keep every token up to the one that completed it."""
    logprobs: bool = False
    """Return each sampled token's log-prob (see the module docstring for which distribution)."""
    top_logprobs: int = 0
    """Also return this many most likely tokens and their log-probs at each step (0..20)."""
    tempered_logprobs: bool = False
    """Log-probs (and top_logprobs) of logits / sampling.temperature instead of the raw logits: the tempered
    policy that RL's importance ratios and KL terms score (still before penalties and top-k/top-p/min-p);
    greedy (temperature 0) keeps the raw ones."""
    n: int = 1
    """Samples of the same prompt; the prompt is prefilled once and its cache copied to each."""
    session: bool = False
    """Keep each finished sample's cache rows so `Engine.continue_session` can extend it; the caller then
    frees them with `Engine.release`."""

    def __post_init__(self) -> None:
        if hasattr(self.prompt_ids, "keys") and "input_ids" in self.prompt_ids.keys():
            # transformers 5's apply_chat_template returns a BatchEncoding by default
            raise RequestError("request.prompt_ids: got a tokenizer's output (a mapping); pass its ['input_ids']")
        if isinstance(self.prompt_ids, (str, bytes)) or not hasattr(self.prompt_ids, "__len__"):
            raise RequestError(f"request.prompt_ids: must be a list of token ids, got {type(self.prompt_ids).__name__}")
        if len(self.prompt_ids) == 0:
            raise RequestError("request.prompt_ids: empty prompt; give at least one token id")
        object.__setattr__(self, "prompt_ids", check_token_ids("prompt_ids", self.prompt_ids))
        object.__setattr__(self, "stop_token_ids", check_token_ids("stop_token_ids", self.stop_token_ids))
        if not isinstance(self.sampling, Sampling):
            raise RequestError(f"request.sampling: must be a Sampling, got {type(self.sampling).__name__}")
        _check_int("max_new_tokens", self.max_new_tokens, low=1)
        _check_int("top_logprobs", self.top_logprobs, low=0, high=MAX_TOP_LOGPROBS)
        _check_int("n", self.n, low=1)
        for name in ("logprobs", "tempered_logprobs", "session"):
            if not isinstance(getattr(self, name), bool):
                raise RequestError(f"request.{name}: must be true or false, got {getattr(self, name)!r}")
        stops = list(self.stop_strings)
        if isinstance(self.stop_strings, str) or not all(isinstance(s, str) and s for s in stops):
            raise RequestError("request.stop_strings: must be a list of non-empty strings")
        object.__setattr__(self, "stop_strings", stops)


@dataclass
class Sample:
    """One sample of a request (or one continuation of a session)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    """Per step: (token id, log-prob) of the most likely tokens, most likely first."""
    text: str | None = None
    """The reply's text, cut before a stop string (None without a tokenizer)."""
    finish_reason: str | None = None
    """"stop" (a stop token or stop string), "length" (max_new_tokens) or "cancelled"."""
    stop_string: str | None = None
    """The stop string that ended the sample, if one did."""


@dataclass
class Result:
    samples: list[Sample]
    prompt_tokens: int
    seed: int
    """The seed sample 0 drew with (sample i used seed + i): pass it back to reproduce the result."""

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)


def _check_number(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False,
                  high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"request.{name}: must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}" if high is not None \
            else f"{'>' if low_open else '>='} {low}"
        raise RequestError(f"request.{name}: must be {'in ' if high is not None else ''}{span}, got {value!r}")


def _check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"request.{name}: must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(f"request.{name}: must be {bound}, got {value}")


def check_token_ids(name: str, values) -> list[int]:
    """`values` as a list of ints, or a RequestError naming `name` and the bad entry."""
    if isinstance(values, (str, bytes)):
        raise RequestError(f"request.{name}: must be a list of token ids, got a string")
    ids = []
    for i, value in enumerate(values):
        try:  # numpy and torch integers are token ids too; floats and bools are not
            token = None if isinstance(value, bool) else operator.index(value)
        except TypeError:
            token = None
        if token is None or token < 0:
            raise RequestError(f"request.{name}[{i}]: must be a non-negative integer token id, got {value!r}")
        ids.append(token)
    return ids
