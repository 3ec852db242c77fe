"""`lmforge data inspect`: show how records render, token by token, with the loss-carrying ones marked.

This is the tool to reach for when a template or a mask looks wrong.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from lmforge.data.preference import PromptTooLong, encode_pair, pair_rows
from lmforge.data.tokenize import IGNORE, encode_sft, encode_text, messages_as_text
from lmforge.data.tools import example_messages, parse_tools


def render_record(tokenizer, example: dict, max_length: int, train_on_prompt: bool = False,
                  mask_history: bool = False, as_pretraining: bool = False, plain: bool = False) -> tuple[Text, dict]:
    """(coloured text, counts) for one example; tokens with loss are green, masked ones dim.

    `as_pretraining` shows what PT trains on: the text (or a dialogue's turns joined by newlines)
    plus EOS, every token with loss, cut at the block size."""
    if as_pretraining:
        ids = encode_text(tokenizer, example["text"] or messages_as_text(example["messages"]))[:max_length]
        labels = list(ids)
    elif example["messages"]:
        # as the trainer renders it: tool calls from the `chat` column, the record's tools to the template
        encoded = encode_sft(tokenizer, example_messages(example), max_length, train_on_prompt, mask_history,
                             tools=parse_tools(example.get("tools")) or None)
        if encoded is None:
            return Text("(dropped: nothing left to learn after truncation)", style="red"), {"tokens": 0, "loss_tokens": 0}
        ids, labels = encoded["input_ids"], encoded["labels"]
    else:
        ids = encode_text(tokenizer, example["text"])[:max_length]
        labels = list(ids)
    counts = {"tokens": len(ids), "loss_tokens": sum(label != IGNORE for label in labels)}
    return styled(tokenizer, ids, labels, plain), counts


def loss_runs(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """(text, carries loss) for each run of tokens that share a mask. A run is decoded whole: a
    byte-level token can hold half a Chinese character, which decodes to U+FFFD on its own."""
    runs, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (labels[end] != IGNORE) != (labels[start] != IGNORE):
            runs.append((tokenizer.decode(ids[start:end]), labels[start] != IGNORE))
            start = end
    return runs


LOSS_OPEN, LOSS_CLOSE = "[[", "]]"
"""Plain-text marking of loss-carrying tokens, where colour is not shown (a file, a pipe, a log)."""
PLAIN_LEGEND = f"legend: {LOSS_OPEN}...{LOSS_CLOSE} carries loss, the rest is masked (-100)"


def plain_marked(tokenizer, ids: list[int], labels: list[int]) -> str:
    """The row's text with each run of loss-carrying tokens between [[ and ]]."""
    return "".join(f"{LOSS_OPEN}{piece}{LOSS_CLOSE}" if has_loss else piece
                   for piece, has_loss in loss_runs(tokenizer, ids, labels))


def styled(tokenizer, ids: list[int], labels: list[int], plain: bool = False) -> Text:
    """Loss-carrying tokens green, masked ones dim; `plain`: marked with [[ ]] instead of colour."""
    if plain:
        return Text(plain_marked(tokenizer, ids, labels))
    text = Text()
    for piece, has_loss in loss_runs(tokenizer, ids, labels):
        text.append(piece, style="bold green" if has_loss else "dim")
    return text


def is_plain(console: Console) -> bool:
    """Colour does not reach the reader: output to a file or pipe, or NO_COLOR."""
    return not console.is_terminal or console.no_color


def heading(console: Console, title: str) -> None:
    """A record's header line. A rule is cut to the console width (80 columns without a terminal), which
    would clip a long file:line: without a terminal the header is printed whole."""
    if is_plain(console):
        console.print(Text(f"--- {title}"), soft_wrap=True)
    else:
        console.rule(Text(title, style="bold"))


def legend(console: Console) -> None:
    if is_plain(console):
        console.print(PLAIN_LEGEND)
    else:
        console.print("[dim]legend:[/] [bold green]carries loss[/]  [dim]masked (-100)[/]")


def inspect_pairs(tokenizer, pairs, limit: int, max_length: int, console: Console | None = None) -> None:
    """Preference pairs as the rm and dpo stages see them: the prompt once, each response with loss."""
    console = console or Console()
    for index, pair in enumerate(pairs):
        if index >= limit:
            break
        try:
            encoded = encode_pair(tokenizer, pair, max_length)
        except PromptTooLong as exc:
            heading(console, pair.get("source", f"record {index}"))
            console.print(Text(f"(dropped: {exc})", style="red"))
            continue
        for name, (ids, labels) in zip(("chosen", "rejected"), pair_rows(encoded)):
            heading(console, f"{pair.get('source', f'record {index}')}  {name}: {len(ids)} tokens")
            console.print(styled(tokenizer, ids, labels, is_plain(console)))
    legend(console)


def inspect_examples(tokenizer, examples, limit: int, max_length: int, train_on_prompt: bool,
                     mask_history: bool, console: Console | None = None, as_pretraining: bool = False) -> list[dict]:
    console = console or Console()
    summaries = []
    for index, example in enumerate(examples):
        if index >= limit:
            break
        text, counts = render_record(tokenizer, example, max_length, train_on_prompt, mask_history, as_pretraining,
                                     is_plain(console))
        heading(console, f"{example.get('source', f'record {index}')}  "
                         f"{counts['tokens']} tokens, {counts['loss_tokens']} with loss")
        console.print(text)
        summaries.append({"source": example.get("source"), **counts})
    legend(console)
    return summaries


def inspect_prompts(tokenizer, prompts, limit: int, console: Console | None = None) -> None:
    """RL prompt records as ppo, grpo and rloo read them: the prompt as rendered for sampling (ending
    where the reply starts) and the reference the exact/answer-match rewards compare replies with."""
    # Imported on use: only prompt stages need the rollout code.
    from lmforge.data.templates import encode_prompts

    console = console or Console()
    for index, record in enumerate(prompts):
        if index >= limit:
            break
        ids = encode_prompts(tokenizer, [record["prompt"]])[0]
        heading(console, f"{record.get('source', f'record {index}')}  prompt: {len(ids)} tokens")
        console.print(Text(tokenizer.decode(ids), style="dim"))
        console.print(Text(f"reference: {record['reference'] or '(none)'}", style="bold green"))
        if record["answer"] and record["answer"] != record["reference"]:
            console.print(Text(f"answer: {record['answer']}", style="bold green"))
    console.print("[dim]the reply is sampled after the prompt; rewards compare it with the reference[/]")
