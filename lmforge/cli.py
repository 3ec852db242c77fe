"""The `lmforge` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from lmforge import __version__
from lmforge.cli_help import DefaultsFormatter, available_cores, leaf_parsers
from lmforge.cli_use import USE_COMMANDS, add_use_commands
from lmforge.config.schema import STAGES

console = Console()
INTERRUPTED = 130
"""Exit status after Ctrl-C, as a shell reports a process ended by SIGINT."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Train a language model through PT, SFT and beyond.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run one stage: lmforge train [STAGE] config.yaml train.lr=1e-4",
                           description="CONFIG is an lmforge, LLaMA-Factory or TRL YAML; STAGE may be left out "
                                       "when the file names its stage (a TRL file never does).")
    train.add_argument("stage", metavar="[STAGE]", help=f"one of {', '.join(STAGES)}; default: the file's `stage`")
    train.add_argument("config", nargs="?", help="a YAML file (optional when STAGE is given)")
    train.add_argument("overrides", nargs="*", help="dotted overrides: group.key=value")
    train.add_argument("--resume", metavar="PATH", help="continue from this checkpoint folder")

    convert = sub.add_parser("convert", help="write the lmforge YAML of a LLaMA-Factory or TRL config",
                             description="Map every key of a LLaMA-Factory or TRL YAML to lmforge's, and list "
                                         "the ones that cannot map in one message.")
    convert.add_argument("config", help="a LLaMA-Factory or TRL YAML file")
    convert.add_argument("-o", "--out", help="write here (default: print to the terminal)")
    convert.add_argument("--stage", choices=list(STAGES), help="the lmforge stage (required for TRL files, "
                                                                  "which name none; default: the file's)")

    run = sub.add_parser("run", help="run a pipeline: lmforge run examples/demo.yaml")
    run.add_argument("pipeline", help="a pipeline YAML (examples/demo.yaml)")
    run.add_argument("overrides", nargs="*", help="dotted overrides of the pipeline file: stages.sft.config.train.lr=1e-3")
    run.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and every later one again")
    run.add_argument("--only", metavar="STAGE", help="run only this stage (again)")
    run.add_argument("--no-report", action="store_true", help="skip the HTML report at the end")

    ev = sub.add_parser("eval", help="evaluate a model: lmforge eval runs/demo/ppo --suite eval.yaml")
    ev.add_argument("model", help="a model folder or artifact (a reward model gets --pairs accuracy)")
    ev.add_argument("--suite", help="a YAML file with the keys of a pipeline's eval block")
    for name, what in (("perplexity", "held-out text"), ("answers", "prompts with reference replies"),
                       ("choice", "multiple choice (C-Eval/CMMLU/MMLU layout)"), ("pairs", "preference pairs"),
                       ("prompts", "prompts for reward, KL, win-rate"), ("reward-model", "judge RM folder"),
                       ("reference", "KL reference model"), ("baseline", "win-rate against this model")):
        ev.add_argument(f"--{name}", help=what)
    ev.add_argument("--max-samples", type=int, help="records read from each data file (default: all)")
    ev.add_argument("--max-new-tokens", type=int, help="reply length for --answers and --prompts (default: the suite's)")
    ev.add_argument("--no-save", action="store_true", help="do not store the results in the artifact's manifest")

    add_use_commands(sub)

    report = sub.add_parser("report", help="write RUN_DIR/report.html for a pipeline run")
    report.add_argument("run_dir", help="the run folder of `lmforge run` (its run_dir)")

    score = sub.add_parser("score", help="reward of each prompt/response with a reward model")
    score.add_argument("model", help="an RM artifact (lmforge train rm)")
    score.add_argument("--data", required=True, help="pairs (chosen/rejected) or dialogues ending with a reply")
    score.add_argument("--out", help="write JSON lines here instead of printing")
    score.add_argument("--max-length", type=int, default=1024, help="tokens of prompt and reply scored; longer is cut")

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    demo = data.add_parser("demo", help="write the synthetic demo world")
    demo.add_argument("out_dir", help="a folder for the world's data files")
    demo.add_argument("--seed", type=int, default=0, help="the world's random seed")
    demo.add_argument("--sft-noise", type=float, default=0.0,
                      help="share of SFT replies given a rude or rambling style (for preference training)")
    demo.add_argument("--sft-noise-style", choices=("mixed", "habit"), default="mixed",
                      help="mixed: rude or rambling at random; habit: always the same rude remark")
    demo.add_argument("--arith-reps", type=int, default=1,
                      help="rounds of sums in the PT corpus (4 lets the tiny model learn sums GRPO can improve)")
    inspect = data.add_parser("inspect", help="show how records render and which tokens carry loss")
    inspect.add_argument("config", help="a stage config YAML (or a first override, with --stage)")
    inspect.add_argument("overrides", nargs="*", help="dotted overrides: group.key=value")
    inspect.add_argument("-n", "--num", type=int, default=3, help="records to show")
    inspect.add_argument("--stage", default=None, help="stage whose config this is (default: the file's)")

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tok_command", required=True)
    tok_train = tok.add_parser("train", help="train a byte-level BPE tokenizer with a chat template")
    tok_train.add_argument("--data", nargs="+", required=True, help="text or JSON-lines files to learn from")
    tok_train.add_argument("--vocab-size", type=int, default=4000, help="tokens in the vocabulary")
    tok_train.add_argument("--out", required=True, help="a folder for the tokenizer")
    tok_train.add_argument("--split-han-chars", action="store_true",
                           help="one pre-token per Chinese character (better for small models and corpora)")
    tok_extend = tok.add_parser("extend", help="add domain tokens; resize a model's embeddings")
    tok_extend.add_argument("tokenizer", help="a tokenizer (or model) folder")
    tok_extend.add_argument("--tokens", required=True, help="a file with one token or word per line")
    tok_extend.add_argument("--model", help="a model folder whose embeddings grow with the vocabulary")
    tok_extend.add_argument("--out", required=True, help="a folder for the extended tokenizer (and model)")
    for command in leaf_parsers(parser):
        command.formatter_class = DefaultsFormatter
        command.add_argument("--threads", type=int, default=available_cores(), metavar="N",
                             help="CPU threads torch uses: the cores this process may use (torch's own choice counts "
                                  "every core of the machine, which oversubscribes a container or a shared machine)")
    return parser


def cmd_train(args) -> int:
    from lmforge.config.foreign import load_stage_config, report_lines
    from lmforge.stages import STAGE_RUNNERS

    stage, config, overrides = _train_arguments(args.stage, args.config, args.overrides)
    if args.resume:
        overrides.append(f"train.resume_from={args.resume}")
    cfg, conversion = load_stage_config(config, overrides, stage)
    if conversion is not None:
        for line in report_lines(conversion, config):
            console.print(line, highlight=False, soft_wrap=True)
    metrics = STAGE_RUNNERS[cfg.stage](cfg)
    _print_summary(cfg.train.output_dir, metrics)
    return 0


def _train_arguments(first: str, config: str | None, overrides: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(stage, config, overrides) of `lmforge train STAGE [CONFIG] ...` or `lmforge train CONFIG ...`."""
    from lmforge.config.errors import ConfigError

    if first in STAGES:
        return (first, *_split_config(config, overrides))
    if first == "kto":
        raise ConfigError("kto is a DPO-family loss in lmforge: lmforge train dpo CONFIG dpo.loss=kto "
                          "(a LLaMA-Factory file with `stage: kto` needs no stage: lmforge train CONFIG)")
    if not Path(first).is_file():
        what = "an override, and there is no config file to name the stage" if "=" in first else "no such file"
        raise ConfigError(f"{first!r} is neither a stage ({', '.join(STAGES)}) nor a config file ({what}): "
                          "lmforge train STAGE [CONFIG] [group.key=value ...] or lmforge train CONFIG")
    return (None, *_split_config(first, [config, *overrides] if config is not None else overrides))


def _split_config(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """The optional YAML path may be left out: `lmforge train pt model.scratch=tiny ...`."""
    if config is not None and "=" in config and not Path(config).is_file():
        config, overrides = None, [config, *overrides]
    # `resume=true` is what LLaMA-Factory users type; it means train.resume.
    return config, [f"train.{item}" if item.startswith(("resume=", "resume_from=")) else item for item in overrides]


def cmd_convert(args) -> int:
    from lmforge.config.errors import ConfigError
    from lmforge.config.foreign import convert_foreign, detect_format, render_yaml, stage_config
    from lmforge.config.load import read_yaml

    raw = read_yaml(args.config)
    fmt = detect_format(raw, args.config)
    if fmt is None:
        raise ConfigError(f"{args.config} is already an lmforge config (only `stage` and lmforge groups); "
                          "nothing to convert")
    conversion = convert_foreign(raw, fmt, args.config, args.stage)
    stage_config(conversion, args.config)  # the written file must load
    text = render_yaml(conversion, args.config)
    if not args.out:
        print(text, end="")
        return 0
    out = Path(args.out)
    if out.resolve() == Path(args.config).resolve():
        raise ConfigError(f"-o {args.out} is the file being converted; write to another file")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    console.print(f"{len(conversion.mapped)} {conversion.name} keys mapped, {len(conversion.defaults)} of its "
                  f"defaults kept, {len(conversion.ignored)} ignored: {out} (run it: lmforge train {out})",
                  highlight=False, soft_wrap=True)
    return 0


def cmd_run(args) -> int:
    from lmforge.pipeline.run import load_pipeline, run_pipeline

    pipeline = load_pipeline(args.pipeline, args.overrides)
    run_pipeline(pipeline, console, start=args.start, only=args.only, report=not args.no_report)
    for stage in pipeline.stages:
        _print_data_counts(Path(pipeline.run_dir) / stage.name)
    return 0


def cmd_eval(args) -> int:
    from lmforge.artifacts import MANIFEST
    from lmforge.config.load import from_dict, read_yaml
    from lmforge.eval.spec import EvalSpec
    from lmforge.eval.suite import evaluate_model, is_reward_model, record_eval, wanted_suites

    raw = read_yaml(args.suite) if args.suite else {}
    for key in ("perplexity", "answers", "choice", "pairs", "prompts", "reward_model", "reference", "baseline",
                "max_samples", "max_new_tokens"):
        if getattr(args, key) is not None:
            raw[key] = getattr(args, key)
    spec = from_dict(EvalSpec, raw, where=args.suite or "eval options")
    manifest = Path(args.model) / MANIFEST
    previous = json.loads(manifest.read_text(encoding="utf-8")).get("eval") if manifest.is_file() else None
    # Suites not asked for this time stay in the manifest; those asked for run unless already up to date.
    if not wanted_suites(spec, is_reward_model(args.model)):
        console.print("[yellow]nothing to evaluate: give --suite or data options (see lmforge eval -h); "
                      "a reward model takes --pairs[/]")
        return 2
    wanted = wanted_suites(spec, is_reward_model(args.model))
    result = evaluate_model(args.model, spec, previous, log=lambda m: console.print(f"[dim]{m}[/]"),
                            keep_others=True)
    console.rule(f"[bold]{args.model}")
    # The suites asked for this time; the others stay stored in the manifest, not shown as this run's.
    _print_metrics({k: v for name in wanted for k, v in result["suites"][name]["metrics"].items()})
    if manifest.is_file() and not args.no_save:
        record_eval(args.model, result)
        others = sorted(set(result["suites"]) - set(wanted))
        kept = f" (with the earlier {', '.join(others)} results, not run now)" if others else ""
        console.print(f"  saved in {manifest}{kept}", soft_wrap=True)
    return 0


def cmd_report(args) -> int:
    from lmforge.report.html import summary_lines, write_report

    path = write_report(args.run_dir)
    for line in summary_lines(args.run_dir):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"report: {path}", soft_wrap=True)
    return 0


def cmd_score(args) -> int:
    import tempfile

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmforge.config.schema import DataConfig, DatasetSpec
    from lmforge.data.build import load_examples
    from lmforge.data.errors import DataError, ErrorLog
    from lmforge.models.load import inference_device, require_safetensors
    from lmforge.rollout.score import score_responses

    require_safetensors(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, use_safetensors=True)
    model.to(inference_device())
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    cfg = DataConfig()
    with tempfile.TemporaryDirectory() as cache:
        try:
            rows, _ = load_examples([DatasetSpec(path=args.data)], cfg, ErrorLog(), cache, kind="pair")
            fields = {"reward_chosen": "chosen", "reward_rejected": "rejected"}
        except DataError:
            rows, _ = load_examples([DatasetSpec(path=args.data)], cfg, ErrorLog(), cache, kind="sft")
            rows = rows.map(lambda r: {"prompt": r["messages"][:-1], "response": r["messages"][-1]["content"]})
            fields = {"reward": "response"}
        results = [{"source": r["source"]} for r in rows]
        for name, column in fields.items():
            scores = score_responses(model, tokenizer, rows["prompt"], rows[column], args.max_length)
            for result, value in zip(results, scores):
                result[name] = round(value, 6)
    lines = [json.dumps(r, ensure_ascii=False) for r in results]
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
        console.print(f"{len(lines)} rewards written to {args.out}")
    else:
        print("\n".join(lines))
    if "reward_chosen" in fields:
        right = sum(r["reward_chosen"] > r["reward_rejected"] for r in results)
        console.print(f"chosen ranked above rejected: {right}/{len(results)} ({right / max(1, len(results)):.1%})")
    return 0


def cmd_data(args) -> int:
    if args.data_command == "demo":
        from lmforge.demo.write import write_demo_world

        files = write_demo_world(Path(args.out_dir), seed=args.seed, sft_noise=args.sft_noise,
                                 arith_reps=args.arith_reps, sft_noise_style=args.sft_noise_style)
        for name, path in files.items():
            console.print(f"{name:>12}  {path}")
        return 0
    import tempfile

    from lmforge.config.load import load_config
    from lmforge.data.build import load_examples
    from lmforge.data.errors import ErrorLog
    from lmforge.data.inspect import inspect_examples
    from lmforge.models.load import load_tokenizer, resolve_model_path

    cfg = load_config(*_split_config(args.config, args.overrides), stage=args.stage)
    model_path = None if cfg.model.scratch else resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(cfg.model, model_path)
    errors = ErrorLog(cfg.data.on_error, cfg.data.max_bad_fraction)
    with tempfile.TemporaryDirectory() as cache:
        if cfg.stage in ("rm", "dpo") and cfg.dpo.loss != "kto":
            from lmforge.data.inspect import inspect_pairs

            pairs, _ = load_examples(cfg.data.train, cfg.data, errors, cache, kind="pair")
            inspect_pairs(tokenizer, pairs, args.num, cfg.data.max_length, console)
            return 0
        if cfg.stage in ("ppo", "grpo", "rloo", "distill"):  # prompt data, read as the online RL and distill stages read it
            from lmforge.data.inspect import inspect_prompts

            prompts, _ = load_examples(cfg.data.train, cfg.data, errors, cache, kind="prompt")
            inspect_prompts(tokenizer, prompts, args.num, console)
            return 0
        examples, _ = load_examples(cfg.data.train, cfg.data, errors, cache)
        pt = cfg.stage == "pt"
        inspect_examples(tokenizer, examples, args.num, cfg.pt.block_size if pt else cfg.data.max_length,
                         cfg.data.train_on_prompt, cfg.data.mask_history, console, as_pretraining=pt)
    if errors.total_skipped:
        console.print(f"[yellow]{errors.total_skipped} bad records skipped[/]: {errors.examples[:3]}")
    return 0


def cmd_tokenizer(args) -> int:
    from lmforge.models.tokenizer import extend_tokenizer, read_token_list, train_tokenizer

    if args.tok_command == "train":
        tokenizer = train_tokenizer(args.data, args.out, vocab_size=args.vocab_size,
                                    split_han_chars=args.split_han_chars)
        console.print(f"tokenizer with {len(tokenizer)} tokens saved to {args.out}")
        return 0
    model = None
    if args.model:
        from transformers import AutoModelForCausalLM

        from lmforge.models.load import require_safetensors

        require_safetensors(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True)
    result = extend_tokenizer(args.tokenizer, read_token_list(args.tokens), args.out, model=model)
    if result.model is not None:
        result.model.save_pretrained(args.out)
    console.print(f"added {result.added} tokens ({len(result.skipped)} skipped); saved to {args.out}")
    return 0


def _print_metrics(metrics: dict) -> None:
    for key, value in metrics.items():
        if isinstance(value, float):
            console.print(f"  {key:<28} {value:.4f}")
        elif not isinstance(value, dict):
            console.print(f"  {key:<28} {value}")


def _print_summary(output_dir: str, metrics: dict) -> None:
    console.rule("[bold]done")
    _print_metrics(metrics)
    _print_data_counts(Path(output_dir))
    console.print(f"  artifact: {output_dir}")


def _print_data_counts(output_dir: Path) -> None:
    manifest = output_dir / "lmforge.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text(encoding="utf-8"))["data"]
        if data["skipped_records"] or data["dropped_too_long"]:
            console.print(f"  [yellow]skipped {data['skipped_records']} bad records, dropped "
                          f"{data['dropped_too_long']} too long[/] (see {manifest})")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow an option (`lmforge run demo.yaml --only ppo train.lr=1e-4`).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one to watch
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: give 1 or more")
    import torch

    torch.set_num_threads(args.threads)  # before any work: the pools are sized on first use
    from lmforge.config.errors import ConfigError
    from lmforge.data.errors import DataError
    from lmforge.loop.checkpoint import CheckpointError
    from lmforge.loop.trainer import TrainingDiverged

    handlers = {"train": cmd_train, "convert": cmd_convert, "run": cmd_run, "data": cmd_data, "tokenizer": cmd_tokenizer, "score": cmd_score,
                "eval": cmd_eval, "report": cmd_report, **USE_COMMANDS}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, TrainingDiverged, CheckpointError, FileNotFoundError) as exc:
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)  # a wrapped path cannot be copied
        return 2
    except KeyboardInterrupt:  # outside the training steps (which stop cleanly on Ctrl-C and say how to resume)
        console.print("[yellow]Ctrl-C: stopped[/]; checkpoints already written are kept "
                      "(train.resume=true continues from the newest)", soft_wrap=True)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
