"""Chat templates: the tokenizer's own Jinja template, a named one shipped in lmforge/templates/, or a
user's .jinja file.

A conversation is rendered into *segments*: each is a run of text and whether it is an
assistant reply (which carries loss) or context (which is masked). Rendering turn by turn
with the template itself keeps lmforge faithful to any Jinja template instead of re-implementing
each model family's format by hand.

A template lmforge ships (or a user's file) opens with a `{#- lmforge-template ... -#}` comment
holding YAML: `stop` (the strings that end a reply, so generation stops on them), `special` (the
tokens it prints, which the tokenizer must have), `add_missing` (add those tokens when missing
instead of refusing) and `about`. Being a Jinja comment, it travels inside the tokenizer's
`chat_template` into every artifact without changing what the template renders.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2

from lmforge.config.errors import ConfigError
from lmforge.config.templates import HEADER, template_info, template_text
from lmforge.data.reasoning import CLOSE, OPEN, split_block
from lmforge.data.tools import chat_messages, has_tool_content

# End-of-turn markers used by common template families, most specific first: for templates
# without a header (a model's own), the ones that occur in the template and the vocabulary stop it.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|user|>",
                     "<|observation|>", "</s>", "<|endoftext|>")
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
def missing_tokens(tokenizer, tokens) -> list[str]:
    """Tokens of `tokens` that the tokenizer does not read as one token of its vocabulary."""
    vocab = tokenizer.get_vocab()
    return [t for t in tokens if t not in vocab or tokenizer.encode(t, add_special_tokens=False) != [vocab[t]]]


def apply_template_choice(tokenizer, choice: str | None) -> str:
    """Set `tokenizer.chat_template` from the config's choice and return the name used.

    `auto` (or None) keeps the tokenizer's own template and falls back to ChatML when it has none;
    a name or a .jinja path replaces it. A template's special tokens must be in the vocabulary: a
    family template on a tokenizer without them is refused (its rows would be untrained and the model
    has never seen the format), while one whose header says `add_missing` (ChatML) has them added as
    special tokens; the caller must then resize the model's embeddings (`len(tokenizer)`).
    """
    choice = choice or "auto"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding never carries loss or attention
    if choice == "auto" and getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    name = "chatml" if choice == "auto" else choice
    text = template_text(name)
    info = template_info(text, where=f"model.template ({name})")
    missing = missing_tokens(tokenizer, info.special)
    if missing and not info.add_missing:
        hint = ("model.template=auto keeps the tokenizer's own template" if getattr(tokenizer, "chat_template", None)
                else "model.template=chatml adds its two tokens")
        tokens = f"{', '.join(missing)} token{'s' if len(missing) > 1 else ''}"
        raise ConfigError(f"model.template={name}: the tokenizer has no {tokens}, so it is not of the family this "
                          f"template is for; pick the model's template ({hint})")
    tokenizer.chat_template = text
    tokenizer._lmforge_template = name
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return name


def end_of_turn_markers(tokenizer) -> list[str]:
    """Strings that close an assistant turn for this tokenizer, used to stop generation.

    A template with a header declares them (`stop`); for one without, the known markers that occur
    in both the template and the vocabulary. EOS always ends a turn. Called for every sample while
    tokenizing, and `get_vocab()` builds the whole vocabulary (about 30 ms for 49k tokens): the
    answer is kept on the tokenizer per template and EOS."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    key = (template, tokenizer.eos_token, len(tokenizer))
    cached = getattr(tokenizer, "_lmforge_end_of_turn", None)
    if cached is not None and cached[0] == key:
        return list(cached[1])
    vocab = tokenizer.get_vocab()
    declared = template_info(template).stop if HEADER.match(template) else None
    if declared is not None:
        found = [m for m in declared if m in vocab]
    else:
        found = [m for m in KNOWN_END_OF_TURN if m in vocab and m in template]
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


REWRITES = ("the chat template does not render turns as a growing prefix (it rewrites earlier turns, or a reply "
            "does not follow its generation prompt); choose another template with model.template")
PROBE_TOOL = {"type": "function", "function": {"name": "lmforge_probe_tool", "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}
PROBE_CALL = [{"type": "function", "function": {"name": "lmforge_probe_call", "arguments": {"lmforge_probe_arg": 1}}}]


def _features(tokenizer) -> tuple[bool, bool]:
    """(renders tools and tool calls, renders `reasoning_content`) for the tokenizer's template, found by
    rendering a probe conversation once per template: a template that drops them says nothing."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    cached = getattr(tokenizer, "_lmforge_features", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    probe = [{"role": "user", "content": "q"},
             {"role": "assistant", "content": "", "tool_calls": PROBE_CALL},
             {"role": "tool", "content": "lmforge_probe_result"},
             {"role": "assistant", "content": "a", "reasoning_content": "lmforge_probe_thought"}]
    try:
        text = tokenizer.apply_chat_template(probe, tools=[PROBE_TOOL], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe has no tool format
        text = ""
    found = (all(s in text for s in ("lmforge_probe_tool", "lmforge_probe_call", "lmforge_probe_arg",
                                     "lmforge_probe_result")), "lmforge_probe_thought" in text)
    tokenizer._lmforge_features = (template, found)
    return found


def template_label(tokenizer) -> str:
    """How the user chose the tokenizer's template, for error messages."""
    return getattr(tokenizer, "_lmforge_template", None) or "auto (the tokenizer's own template)"


def prepare_messages(tokenizer, messages: list[dict], tools: list | None) -> list[dict]:
    """Messages as the template gets them: stored fields cleaned (`chat_messages`); tool data refused when
    the template has no tool format (it would drop it silently); reasoning the template does not print
    written into the reply as a leading `<think>` block, the form thinking models emit."""
    messages = chat_messages(messages)
    renders_tools, renders_reasoning = _features(tokenizer)
    if has_tool_content(messages, tools) and not renders_tools:
        raise ValueError(f"this record has tools or tool calls, but the chat template (model.template="
                         f"{template_label(tokenizer)}) has no tool format and would drop them; use a template "
                         "that has one (qwen, qwen3, chatml) or leave tool records out")
    if not renders_reasoning:
        messages = [_fold_reasoning(m) for m in messages]
    return messages


def _fold_reasoning(message: dict) -> dict:
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
        return message
    rest = {k: v for k, v in message.items() if k != "reasoning_content"}
    if not reasoning.strip():
        return rest
    return {**rest, "content": f"{OPEN}\n{reasoning.strip()}\n{CLOSE}\n\n{message['content'].lstrip()}"}


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`data.system_prompt` applied to a record's messages: None leaves them; a string becomes the system turn
    of a conversation without one ("" included: an empty system message, which renders as no system prompt)."""
    if system_prompt is None or not messages or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _apply(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list | None,
           template_kwargs: dict | None = None) -> str:
    kwargs = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs, **(template_kwargs or {})
        )
    except jinja2.TemplateError as exc:
        # A template's own rules (Gemma 2's "System role not supported", roles that must alternate) refuse
        # a record: a ValueError, so the data pipeline counts it as a bad record instead of a traceback.
        raise ValueError(f"the chat template refused this conversation: {exc}") from exc


def render_template(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list | None,
            template_kwargs: dict | None = None) -> str:
    """The template's text for the messages. An empty system message first means no system prompt at all:
    neither an empty system turn nor the default some templates add to a conversation without one (SmolLM2's
    English one would otherwise open every Chinese dialogue); how to get that from this template is probed once."""
    messages = chat_messages(messages)
    if not (messages and messages[0]["role"] == "system" and messages[0]["content"] == ""):
        return _apply(tokenizer, messages, add_generation_prompt, tools, template_kwargs)
    way = _no_system_way(tokenizer, tools, template_kwargs)
    if way == "drop":
        return _apply(tokenizer, messages[1:], add_generation_prompt, tools, template_kwargs)
    full = _apply(tokenizer, messages, add_generation_prompt, tools, template_kwargs)
    if way == "strip":
        empty = _apply(tokenizer, messages[:1], False, tools, template_kwargs)
        if full.startswith(empty):
            bare = _bare(tokenizer, tools, template_kwargs, empty)
            return bare + full[len(empty):]
    return full


def _no_system_way(tokenizer, tools: list | None, template_kwargs: dict | None) -> str:
    """How this template renders a conversation with no system prompt: `drop` the empty system message (a
    template without a default), `strip` the empty system turn it prints (one with a default), or `keep` it
    (neither works). The shortest rendering of a probe conversation wins: it has the least system text."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    key = (template, bool(tools), repr(template_kwargs))
    known = tokenizer.__dict__.setdefault("_lmforge_no_system", {})
    if key in known:
        return known[key]
    talk = [{"role": "user", "content": "lmforge probe"}, {"role": "assistant", "content": "lmforge reply"}]
    empty = [{"role": "system", "content": ""}]
    found = {}
    for way, render in (("drop", lambda: _apply(tokenizer, talk, False, tools, template_kwargs)),
                        ("strip", lambda: _stripped(tokenizer, empty, talk, tools, template_kwargs)),
                        ("keep", lambda: _apply(tokenizer, empty + talk, False, tools, template_kwargs))):
        try:
            text = render()
        except (ValueError, TypeError, IndexError):
            continue
        if text is not None:
            found[way] = text
    way = min(found, key=lambda w: len(found[w])) if found else "keep"  # ties: the first, the simplest
    known[key] = way
    return way


def _bare(tokenizer, tools: list | None, template_kwargs: dict | None, alone: str) -> str:
    """What the template prints before any turn (a BOS, say): its text for no messages (apply_chat_template
    refuses an empty list) when the empty system turn `alone` starts with it, else nothing (a template that
    prints its default system turn for no messages, as qwen's does)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template([[]], tools=tools or None, chat_template=tokenizer.chat_template,
                                            **tokenizer.special_tokens_map, **(template_kwargs or {}))
    except jinja2.TemplateError as exc:
        raise ValueError(f"the chat template cannot render an empty conversation: {exc}") from exc
    return rendered[0] if alone.startswith(rendered[0]) else ""


def _stripped(tokenizer, empty: list[dict], talk: list[dict], tools, template_kwargs) -> str | None:
    """The probe with the empty system turn cut out, when the template prints one of its own."""
    alone = _apply(tokenizer, empty, False, tools, template_kwargs)
    full = _apply(tokenizer, empty + talk, False, tools, template_kwargs)
    bare = _bare(tokenizer, tools, template_kwargs, alone)
    if alone == bare or not full.startswith(alone):
        return None
    return bare + full[len(alone):]


def render_prompt(tokenizer, messages: list[dict], tools: list | None = None,
                  template_kwargs: dict | None = None) -> str:
    """The text a model sees before it answers: the conversation plus the generation prompt.
    `tools` (OpenAI function schemas) reach the template's own `tools` argument; `template_kwargs`
    reach it as variables (qwen3's `enable_thinking`)."""
    return render_template(tokenizer, prepare_messages(tokenizer, messages, tools), True, tools, template_kwargs)



def encode_prompts(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """Each conversation rendered for the model to answer (the template's generation prompt), as token ids."""
    return [tokenizer(render_prompt(tokenizer, c), add_special_tokens=False)["input_ids"] for c in conversations]

def render_segments(tokenizer, messages: list[dict], tools: list | None = None, template_kwargs: dict | None = None,
                    reasoning_loss: bool = True) -> list[Segment]:
    """Split the rendered conversation into context and assistant-reply segments.

    For each assistant turn i, the text rendered for messages[:i] with the generation prompt
    must be a prefix of the text for messages[:i+1]; what follows is the reply. The reply's
    end-of-turn marker belongs to the reply (the model must learn to stop); anything the
    template prints after it (a newline) is context. A template that rewrites earlier turns at
    inference (Qwen3's own drops earlier replies' reasoning) is followed exactly: the conversation is
    its final rendering, and only replies that it prints as they were written carry loss (the others
    are context, as at inference). With `reasoning_loss` false a reply's leading think block is context.
    """
    messages = prepare_messages(tokenizer, messages, tools)
    turns = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render_template(tokenizer, messages[:i], True, tools, template_kwargs)
            full = render_template(tokenizer, messages[: i + 1], False, tools, template_kwargs)
            if not full.startswith(prompt):
                raise ValueError(REWRITES)
            turns.append((prompt, full, message))
    final = render_template(tokenizer, messages, False, tools, template_kwargs)
    markers = end_of_turn_markers(tokenizer)
    segments: list[Segment] = []
    done = ""
    for prompt, full, message in turns:
        if not (prompt.startswith(done) and final.startswith(full)):
            continue  # the template prints this reply otherwise later on: it is context there
        segments.append(Segment(prompt[len(done):], False))
        segments += _reply_segments(tokenizer, full[len(prompt):], message, markers, reasoning_loss)
        done = full
    if not any(s.is_assistant for s in segments) and turns:
        raise ValueError(REWRITES)
    rest = final[len(done):]
    if rest:
        segments.append(Segment(rest, False))
    return [s for s in segments if s.text]


def _reply_segments(tokenizer, reply: str, message: dict, markers: list[str], reasoning_loss: bool) -> list[Segment]:
    out = []
    if not reasoning_loss:
        block = split_block(reply)
        if block.has_block and block.closed:
            out.append(Segment(reply[: block.end], False))
            reply = reply[block.end:]
    cut = reply_end(reply, message["content"], markers)
    if cut is None:
        # Templates that print no end marker (rare): append EOS so the model learns to stop.
        return [*out, Segment(reply + (tokenizer.eos_token or ""), True)]
    return [*out, Segment(reply[:cut], True), Segment(reply[cut:], False)]


def reply_end(reply: str, content: str, markers: list[str]) -> int | None:
    """Index just past the end-of-turn marker that follows the reply's content."""
    start = reply.find(content) + len(content) if content and content in reply else 0
    best = None
    for marker in markers:
        pos = reply.find(marker, start)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, pos + len(marker))
    return None if best is None else best[1]
