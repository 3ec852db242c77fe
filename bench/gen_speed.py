"""Decoding speed of the generation engine beside transformers' `generate` (static cache, its compiled
decoding step) and beside the memory-bandwidth bound, on one GPU (issue 20's table).

Workload (the peer's gen_speed.py shape): prompts of 128 random tokens, 256 sampled tokens each, no stop
token, random-init models. For each model and batch size: ms per decoding step and decoded tokens/s of
  - `engine`: lmforge.generation.Engine, own decoder, CUDA graphs, `compile=False`;
  - `engine-compile`: the same with `compile=True` (the engine's default on a GPU: the decoding step, forward
    and draw, through torch.compile before it is captured);
  - `hf-static`: model.generate with cache_implementation="static" (transformers compiles its step);
and `bound`: bytes read per step (bf16 weights + the live KV cache at the step's mean length) over the
copy bandwidth measured on this GPU in the same run. Prefill is excluded from every figure: each side is
timed over its decoding steps only (the engine by driving its steps; generate as the difference between
256 and 1 new tokens).

    python bench/gen_speed.py --models A,8b --batches 1,16,64,128 --out bench/results/gen_speed_h100.json

`--ops` also counts the aten operators the host dispatches per decoding step (torch.profiler, CPU side): on
the CPU that is the step's host work (`--models T --batches 16 --sides engine --ops`, model T is tiny);
on a GPU with CUDA graphs it is what runs outside the captured graph.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))
from common import write_result  # noqa: E402
from sft_speed import MODELS  # noqa: E402

SHAPES = {**MODELS, "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, intermediate_size=14336)}
VOCAB = {"8b": 128256}


def build(name: str, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB.get(name, 32000), max_position_embeddings=4096, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False,
                         **SHAPES[name])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    return model


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    if device != "cuda":
        return float("nan")
    source = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    sync()
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    sync()
    seconds = (time.perf_counter() - started) / 10
    del source, target
    return 2 * 2 * 1024**3 / seconds


def bytes_per_step(model, batch: int, prompt: int, new: int) -> float:
    """bf16 weights + the live KV cache (keys and values of every layer at the mean decoded length)."""
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    return weights + batch * (prompt + new / 2) * per_token


def time_engine(model, prompts: list[list[int]], new: int, compile_step: bool, count_ops: bool = False
                ) -> tuple[float, float | None]:
    """Seconds per decoding step, all rows decoding (prefill not counted), and aten ops per step if asked."""
    from lmforge.generation import Engine, Request, Sampling

    engine = Engine(model, slots=len(prompts), max_len=len(prompts[0]) + new + 1, eos_ids=[],
                    prefill_chunk=16384, compile=compile_step)

    def run(profile: bool = False) -> tuple[float, float | None]:
        handles = [engine.submit(Request(prompt_ids=p, max_new_tokens=new, sampling=Sampling(temperature=1.0,
                                                                                               seed=i)))
                   for i, p in enumerate(prompts)]
        while engine.decoding < len(prompts):  # admission and prefill
            engine.step()
        sync()
        started, steps, ops = time.perf_counter(), 0, None
        while not all(h.done for h in handles):
            if profile and steps == 8:  # a few steps in: past any capture
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    for _ in range(4):
                        engine.step()
                steps += 4
                ops = sum(e.name.startswith("aten::") for e in prof.events()) / 4
                continue
            engine.step()
            steps += 1
        sync()
        assert all(len(h.result().samples[0].token_ids) == new for h in handles)
        return (time.perf_counter() - started) / steps, ops

    run()  # warm-up: graph capture (and compilation)
    seconds = run()[0]
    return seconds, (run(profile=True)[1] if count_ops else None)


def time_hf_static(model, prompts: list[list[int]], new: int) -> float:
    ids = torch.tensor(prompts, device=model.device)

    def generate(count: int) -> float:
        sync()
        started = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=count,
                       min_new_tokens=count, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                       cache_implementation="static", pad_token_id=0)
        sync()
        return time.perf_counter() - started

    generate(new)  # warm-up: compilation
    return (generate(new) - generate(1)) / (new - 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="A,8b")
    parser.add_argument("--batches", default="1,16,64,128")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--sides", default="engine,engine-compile,hf-static")
    parser.add_argument("--ops", action="store_true", help="also count aten ops per engine decoding step")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = copy_bandwidth(device)
    print(json.dumps({"copy_bandwidth_tb_s": round(bandwidth / 1e12, 3)}), flush=True)
    workload = {**vars(args), "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3)}
    models = {name: build(name, device) for name in args.models.split(",")}
    rows = []
    # Side-major: the engine's compiled step is shape-dynamic, so it compiles once per model rather than per
    # batch; dynamo is reset only when the side changes. Rows are written as they come, so a run cut off by a
    # time limit keeps what it measured.
    for side in args.sides.split(","):
        for name, model in models.items():
            for batch in [int(b) for b in args.batches.split(",")]:
                g = torch.Generator().manual_seed(batch)
                prompts = torch.randint(4, model.config.vocab_size, (batch, args.prompt), generator=g).tolist()
                bound_s = bytes_per_step(model, batch, args.prompt, args.new) / bandwidth
                try:
                    seconds, ops = (time_hf_static(model, prompts, args.new), None) if side == "hf-static" \
                        else time_engine(model, prompts, args.new, side == "engine-compile", args.ops)
                except Exception as error:  # one side failing must not lose the others' figures
                    rows.append({"model": name, "batch": batch, "side": side, "error": str(error)[-500:]})
                else:
                    rows.append({"model": name, "batch": batch, "side": side,
                                 "ms_per_step": round(seconds * 1e3, 3), "tokens_per_s": round(batch / seconds),
                                 "bound_ms": round(bound_s * 1e3, 3), "share_of_bound": round(bound_s / seconds, 3),
                                 **({"aten_ops_per_step": ops} if ops is not None else {})})
                print(json.dumps(rows[-1]), flush=True)
                write_result(args.out, workload, rows)
            if side == "hf-static":
                torch._dynamo.reset()  # its compiled steps are per shape: free them before the next model
        torch._dynamo.reset()
    write_result(args.out, workload, rows)

if __name__ == "__main__":
    main()
