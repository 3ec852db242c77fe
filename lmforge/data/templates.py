"""Chat templates: the tokenizer's own Jinja template, or a built-in one for tokenizers without.

A conversation is rendered into *segments*: each is a run of text and whether it is an
assistant reply (which carries loss) or context (which is masked). Rendering turn by turn
with the template itself keeps lmforge faithful to any Jinja template instead of re-implementing
each model family's format by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

# End-of-turn markers used by common template families, most specific first.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")


def builtin_template(name: str) -> str:
    """The Jinja text of a template shipped with lmforge (`chatml`, `plain`)."""
    path = resources.files("lmforge") / "templates" / f"{name}.jinja"
    if not path.is_file():
        available = sorted(p.name.removesuffix(".jinja") for p in (resources.files("lmforge") / "templates").iterdir())
        raise ValueError(f"unknown chat template {name!r}; built-in templates: {', '.join(available)}")
    return path.read_text(encoding="utf-8")


def template_names() -> tuple[str, ...]:
    """What `model.template` accepts: `auto` and every template shipped in lmforge/templates/."""
    folder = resources.files("lmforge") / "templates"
    return ("auto", *sorted(p.name.removesuffix(".jinja") for p in folder.iterdir() if p.name.endswith(".jinja")))


def apply_template_choice(tokenizer, choice: str | None) -> str:
    """Set `tokenizer.chat_template` from the config's choice and return the name used.

    `auto` (or None) keeps the tokenizer's own template and falls back to ChatML when it has none;
    a built-in name replaces it. ChatML's special tokens are added when missing: the caller must
    then resize the model's embeddings (`len(tokenizer)`).
    """
    choice = choice or "auto"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding never carries loss or attention
    if choice == "auto" and getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    name = "chatml" if choice == "auto" else choice
    tokenizer.chat_template = builtin_template(name)
    if name == "chatml":
        missing = [t for t in CHATML_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return name


def end_of_turn_markers(tokenizer) -> list[str]:
    """Strings that close an assistant turn for this tokenizer, used to stop generation.

    Called for every sample while tokenizing, and `get_vocab()` builds the whole vocabulary
    (about 30 ms for 49k tokens): the answer is kept on the tokenizer per template and EOS."""
    key = (tokenizer.chat_template, tokenizer.eos_token, len(tokenizer))
    cached = getattr(tokenizer, "_lmforge_end_of_turn", None)
    if cached is not None and cached[0] == key:
        return list(cached[1])
    vocab = tokenizer.get_vocab()
    found = [m for m in KNOWN_END_OF_TURN if m in vocab and m in (tokenizer.chat_template or "")]
    if tokenizer.eos_token and tokenizer.eos_token not in found:
        found.append(tokenizer.eos_token)
    tokenizer._lmforge_end_of_turn = (key, tuple(found))
    return found


def end_of_turn_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(m) for m in end_of_turn_markers(tokenizer)]


@dataclass
class Segment:
    text: str
    is_assistant: bool


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list | None) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def render_prompt(tokenizer, messages: list[dict], tools: list | None = None) -> str:
    """The text a model sees before it answers: the conversation plus the generation prompt."""
    return _render(tokenizer, messages, True, tools)


def render_segments(tokenizer, messages: list[dict], tools: list | None = None) -> list[Segment]:
    """Split the rendered conversation into context and assistant-reply segments.

    For each assistant turn i, the text rendered for messages[:i] with the generation prompt
    must be a prefix of the text for messages[:i+1]; what follows is the reply. The reply's
    end-of-turn marker belongs to the reply (the model must learn to stop); anything the
    template prints after it (a newline) is context.
    """
    markers = end_of_turn_markers(tokenizer)
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, tools)
        full = _render(tokenizer, messages[: i + 1], False, tools)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                "the chat template does not render turns as a growing prefix (it rewrites earlier "
                "turns); choose another template with model.template"
            )
        segments.append(Segment(prompt[len(done) :], False))
        reply = full[len(prompt) :]
        cut = _reply_end(reply, message["content"], markers)
        if cut is None:
            # Templates that print no end marker (rare): append EOS so the model learns to stop.
            segments.append(Segment(reply + (tokenizer.eos_token or ""), True))
        else:
            segments.append(Segment(reply[:cut], True))
            if reply[cut:]:
                segments.append(Segment(reply[cut:], False))
        done = full
    rest = _render(tokenizer, messages, False, tools)[len(done) :]
    if rest:
        segments.append(Segment(rest, False))
    return [s for s in segments if s.text]


def _reply_end(reply: str, content: str, markers: list[str]) -> int | None:
    """Index just past the end-of-turn marker that follows the reply's content."""
    start = reply.find(content) + len(content) if content and content in reply else 0
    best = None
    for marker in markers:
        pos = reply.find(marker, start)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, pos + len(marker))
    return None if best is None else best[1]
