"""Held-out answers (SFT/DPO evaluation) and batch answers from the one generation engine
(`lmforge.generation`): prompts are rendered with the model's chat template and the model's turn ends at
its end-of-turn tokens."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from lmforge.data.templates import encode_prompts, end_of_turn_ids
from lmforge.generation import Engine, Request, Result, Sampling


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stopped: bool
    """True when the model ended its turn itself (an end-of-turn/EOS token), not at the length limit."""


@dataclass
class AnswerSettings:
    """How `lmforge generate` answers: the reply limit and the sampling settings (temperature 0: greedy)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0


def model_positions(model) -> int | None:
    """The most positions the model can attend over, when its config says."""
    config = model.config
    return next((getattr(config, k) for k in ("max_position_embeddings", "n_positions")
                 if isinstance(getattr(config, k, None), int)), None)


def answer_engine(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, slots: int) -> Engine:
    """An engine sized for these prompts (the cache holds the longest prompt and its reply, within the
    model's positions: a longer one is refused by the request's own one-line error)."""
    positions = model_positions(model)
    needed = max((len(p) for p in prompt_ids), default=1) + max_new_tokens
    max_len = min(needed, positions) if positions else needed
    return Engine(model, slots=max(1, min(slots, len(prompt_ids))), max_len=max_len,
                  eos_ids=end_of_turn_ids(tokenizer))


def fitted(prompt_ids: list[list[int]], max_new_tokens: int, max_len: int) -> list[tuple[list[int], int]]:
    """(prompt, reply limit) within the model's positions. A held-out answer at the end of a stage must not
    stop the run for one over-long prompt: the reply limit shrinks to the room left, and a prompt with
    less room than a quarter of the reply limit keeps its end (where the template opens the model's turn)."""
    floor = max(1, min(max_new_tokens, max_len // 4))
    fitted = []
    for prompt in prompt_ids:
        if len(prompt) > max_len - floor:
            prompt = prompt[len(prompt) - (max_len - floor):]
        fitted.append((prompt, min(max_new_tokens, max_len - len(prompt))))
    return fitted


def run_all(engine: Engine, requests: list[Request], advance: Callable[[int], None] | None = None) -> list[Result]:
    """Every request's result, in order. At most twice the engine's rows are in flight at a time, so rows
    that free up are refilled at the next step (continuous batching) while a step only checks a bounded
    list for finished requests."""
    results: list[Result | None] = [None] * len(requests)
    queue, flying = deque(enumerate(requests)), []
    while queue or flying:
        while queue and len(flying) < 2 * engine.slots:
            index, request = queue.popleft()
            flying.append((index, engine.submit(request)))
        engine.step()
        finished = [(i, h) for i, h in flying if h.done]
        if finished:
            flying = [(i, h) for i, h in flying if not h.done]
            for index, handle in finished:
                results[index] = handle.result()
            if advance is not None:
                advance(len(finished))
    return results


def to_generation(tokenizer, token_ids: list[int], finish_reason: str | None) -> Generation:
    """The reply without its stop token, decoded as a whole (as the text was before the engine)."""
    if finish_reason == "stop":
        ids = token_ids[:-1]
        return Generation(tokenizer.decode(ids, skip_special_tokens=True), ids, True)
    # Cut at the length limit, the last token can hold half a multi-byte character: drop the fragment.
    return Generation(tokenizer.decode(token_ids, skip_special_tokens=True).rstrip("\ufffd"), list(token_ids), False)


def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 16,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> list[Generation]:
    """Answer each conversation (a list of messages ending with a user turn); greedy by default."""
    if not conversations:
        return []
    prompt_ids = encode_prompts(tokenizer, conversations)
    engine = answer_engine(model, tokenizer, prompt_ids, max_new_tokens, batch_size)
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k)
    requests = [Request(p, sampling, n) for p, n in fitted(prompt_ids, max_new_tokens, engine.max_len)]
    results = run_all(engine, requests)
    return [to_generation(tokenizer, r.samples[0].token_ids, r.samples[0].finish_reason) for r in results]
