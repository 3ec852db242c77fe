"""The commands that use a trained model (export, generate, chat, serve) and the web UI."""

from __future__ import annotations

import os

from rich.console import Console

console = Console()


def add_use_commands(sub) -> None:
    export = sub.add_parser("export", help="merge adapters and write a plain Hugging Face folder (or a GGUF file)")
    export.add_argument("model", help="a model folder or artifact (a LoRA adapter is merged into its base)")
    export.add_argument("--out", required=True, help="a new folder")
    export.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast the weights (default: as loaded)")
    export.add_argument("--max-shard-size", default="2GB", help="split safetensors files above this size")
    export.add_argument("--gguf", action="store_true",
                        help="also write OUT/model-<dtype>.gguf for llama.cpp and Ollama (Llama-style models)")

    gen = sub.add_parser("generate", help="answer every prompt of a dataset: lmforge generate MODEL --data F --out F")
    gen.add_argument("model", help="a model folder or artifact (a LoRA adapter is merged into its base)")
    gen.add_argument("--data", required=True, help="prompts in any SFT, prompt or preference format")
    gen.add_argument("--out", required=True, help="a new JSON-lines file")
    chat = sub.add_parser("chat", help="talk to a model in the terminal (/reset, /system TEXT, /exit)")
    chat.add_argument("model", help="a model folder or artifact (a LoRA adapter is merged into its base)")
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--tools", help="a JSON file listing the functions the model may call (OpenAI schemas); "
                                      "answer its calls with /tool RESULT")
    for sampler in (gen, chat):
        sampler.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens")
        sampler.add_argument("--temperature", type=float, default=0.0 if sampler is gen else 0.7,
                             help="sampling temperature; 0 is greedy")
        sampler.add_argument("--top-p", type=float, default=1.0 if sampler is gen else 0.9,
                             help="nucleus sampling: the smallest set of tokens holding this much probability")
    gen.add_argument("--batch-size", type=int, default=16, help="prompts answered together")
    gen.add_argument("--max-samples", type=int, help="answer only the first N prompts (default: all)")

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP API: lmforge serve MODEL --port 8000")
    serve.add_argument("model", help="a model folder or artifact (a LoRA adapter is merged into its base)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    serve.add_argument("--name", help="the model id clients send (default: the folder's name)")
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY (default: $LMFORGE_API_KEY if set)")
    serve.add_argument("--max-batch-size", type=int, default=16,
                       help="requests decoded together (1 turns batching off)")
    serve.add_argument("--queue-size", type=int, default=64, help="requests allowed to wait; more get 503")
    serve.add_argument("--max-tokens", type=int, default=256, help="reply length when a request sets none")
    serve.add_argument("--request-timeout", type=float, default=20.0,
                       help="seconds a client has to send a whole request (headers and body); slower ones are cut")
    serve.add_argument("--max-connections", type=int, default=256,
                       help="connections served at once; requests beyond them get 503")
    serve.add_argument("--no-access-log", dest="access_log", action="store_false",
                       help="do not write a line per request (time, client, route, status, tokens, seconds) to stderr")

    web = sub.add_parser("webui", help="a local web app to train, watch runs, chat and export")
    web.add_argument("--root", default=".", help="the folder whose files the app may read and write")
    web.add_argument("--runs", default="runs", help="where runs are listed (under --root)")
    web.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default: this machine only; any other needs --auth)")
    web.add_argument("--port", type=int, default=7860, help="TCP port to listen on")
    web.add_argument("--auth", help="USER:PASSWORD to require a login (default: $LMFORGE_WEBUI_AUTH if set)")
    web.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                     help="a Host name to answer besides loopback and --host (e.g. behind a proxy); repeatable")
    web.add_argument("--allow-remote-code", action="store_true",
                     help="let configs run from the UI set model.trust_remote_code and use function rewards "
                          "(code from files under --root runs); off by default")


def cmd_export(args) -> int:
    from lmforge.models.export import export_model

    out = export_model(args.model, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, gguf=args.gguf)
    console.print(f"exported {args.model} to {out} (loads with transformers alone: "
                  f"AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    for gguf in sorted(out.glob("*.gguf")):
        console.print(f"  GGUF for llama.cpp / Ollama: {gguf}")
    return 0


def cmd_generate(args) -> int:
    from lmforge.eval.suite import read_records
    from lmforge.inference.generate import generate_file
    from lmforge.models.load import load_for_inference
    from lmforge.rollout.generate import AnswerSettings

    records = read_records(args.data, "prompt", args.max_samples)
    model, tokenizer = load_for_inference(args.model)
    params = AnswerSettings(args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    written = generate_file(model, tokenizer, records, args.out, params, batch_size=args.batch_size)
    console.print(f"{written} replies written to {args.out}")
    return 0


def cmd_chat(args) -> int:
    from lmforge.inference.chat import chat_loop, read_tools
    from lmforge.models.load import load_for_inference

    tools = read_tools(args.tools) if args.tools else None  # a bad file is refused before the model loads
    model, tokenizer = load_for_inference(args.model)
    chat_loop(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens,
              temperature=args.temperature, top_p=args.top_p, tools=tools)
    return 0


def cmd_serve(args) -> int:
    from lmforge.serve.server import serve

    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    serve(args.model, host=args.host, port=args.port, name=args.name, api_key=api_key,
          max_batch_size=args.max_batch_size, queue_size=args.queue_size, default_max_tokens=args.max_tokens,
          request_timeout=args.request_timeout, max_connections=args.max_connections,
          access_log=args.access_log)
    return 0


def cmd_webui(args) -> int:
    from lmforge.webui.hosts import check_exposure, login

    check_exposure(args.host, login(args.auth))  # before Gradio loads: a refused start fails fast
    try:
        from lmforge.webui.app import launch
    except ImportError as error:
        from lmforge.config.errors import ConfigError

        raise ConfigError(f"the web UI needs Gradio: pip install 'lmforge[webui]' ({error})") from None

    launch(args.root, args.runs, host=args.host, port=args.port, auth=args.auth, allow_code=args.allow_remote_code,
           allowed_hosts=args.allowed_host)
    return 0


USE_COMMANDS = {"export": cmd_export, "generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve,
                "webui": cmd_webui}
