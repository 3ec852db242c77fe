"""DPO's activation memory with and without the shared prompt, on the CPU, by count rather than by RSS.

Every tensor autograd saves for backward during one DPO forward pass (policy log-probs from hidden states
in chunks) is recorded through saved_tensors_hooks and its storage counted once; the parameters are left
out, so the figure is the activations alone, free of allocator caching and of other processes' load.
Also the median time of forward + backward over interleaved repeats. Model S of dpo_speed.py (fp32), 8
pairs a batch, random ids.

    python bench/dpo_activations.py --out bench/results/dpo_activations_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))
from common import machine_and_versions  # noqa: E402
from dpo_speed import make_model  # noqa: E402


def saved_activation_bytes(fn, parameters: set[int]):
    """fn()'s result and the bytes of the distinct non-parameter storages autograd saved while it ran."""
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, sum(seen.values())


def measure(model, prompt: int, reply: int, pairs: int, repeats: int) -> list[dict]:
    from lmforge.data.preference import collate_pairs
    from lmforge.models.heads import policy_logps

    g = torch.Generator().manual_seed(0)

    def words(n):
        return torch.randint(4, 32000, (n,), generator=g).tolist()

    rows = [{"prompt_ids": words(prompt), "chosen_ids": words(reply), "rejected_ids": words(reply)} for _ in range(pairs)]
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    out = {share: {"prompt": prompt, "reply": reply, "pairs": pairs, "share_prompt": share, "seconds": []}
           for share in (False, True)}
    for _ in range(repeats):
        for share in (False, True):  # interleaved, so a busy machine slows both alike
            batch = collate_pairs(rows, 0, share_prompt=share)
            started = time.perf_counter()
            (sums, _), saved = saved_activation_bytes(lambda b=batch: policy_logps(model, b, True), parameters)
            (-F.logsigmoid(0.1 * (sums[:pairs] - sums[pairs:]))).mean().backward()
            out[share]["seconds"].append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
            out[share].update(tokens=int(batch["attention_mask"].sum()), activations_mib=round(saved / 2**20, 1))
    for row in out.values():
        row["forward_backward_s"] = round(statistics.median(row.pop("seconds")), 3)
    return list(out.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="256x64,64x256", help="prompt x reply lengths")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    model = make_model("S", torch.float32, "cpu")
    model.config.use_cache = False
    rows = []
    for shape in args.shapes.split(","):
        prompt, reply = (int(n) for n in shape.split("x"))
        rows += measure(model, prompt, reply, args.pairs, args.repeats)
        for row in rows[-2:]:
            print(json.dumps(row), flush=True)
    if args.out:
        result = {**machine_and_versions(), "threads": torch.get_num_threads(), "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
