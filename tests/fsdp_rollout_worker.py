"""Run under torchrun by test_rollout_engine.py: rollouts from an FSDP2-sharded policy on two CPU processes."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.generation import Engine, Request, Sampling
from lmforge.rollout.gather import whole_parameters

PROMPTS = [[5, 9, 14, 3], [7, 7, 30, 41, 12, 8, 2], [60]]


def rollout(engine: Engine) -> list:
    requests = [Request(p, Sampling(temperature=0.8, seed=11), max_new_tokens=12, n=2, logprobs=True)
                for p in PROMPTS]
    return [(s.token_ids, s.logprobs) for r in engine.generate(requests) for s in r.samples]


def main(out: str, backend: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    whole = copy.deepcopy(model).eval()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.eval()
    expected = [rollout(Engine(whole, slots=6, max_len=32, eos_ids=[], backend=backend))]
    engine, got = None, []
    for _ in range(2):
        with whole_parameters(model):
            engine = engine or Engine(model, slots=6, max_len=32, eos_ids=[], backend=backend)
            got.append(rollout(engine))
        resharded = all(isinstance(p, DTensor) for p in model.parameters())
        with torch.no_grad():  # an in-place "optimizer step" on each shard and on the whole copy alike
            for sharded, plain in zip(model.parameters(), whole.parameters()):
                sharded.mul_(1.5)
                plain.mul_(1.5)
        if len(expected) < 2:
            expected.append(rollout(Engine(whole, slots=6, max_len=32, eos_ids=[], backend=backend)))
    if dist.get_rank() == 0:
        torch.save({"expected": expected, "got": got, "resharded": resharded,
                    "backend": type(engine.backend).__name__}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
