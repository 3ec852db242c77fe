"""A sharded policy's parameters gathered once for a rollout.

The generation engine calls the policy's modules outside the wrapped root's forward and token by token.
Under FSDP or DeepSpeed ZeRO-3 each module holds a shard of its parameters between forwards; resharding
after every block would gather it again for every token, and the own decoder, which calls the layers'
projections directly, would see shards. So a rollout gathers every parameter once, runs the engine on
the whole model, and gives the memory back when it ends. Elsewhere (one process, DDP, ZeRO-1/2) this is
a no-op.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch


@contextmanager
def whole_parameters(prepared: torch.nn.Module):
    """`prepared` (the model as accelerate wrapped it) with whole, read-only parameters inside the block."""
    with ExitStack() as stack:
        if _zero3_parameters(prepared):
            import deepspeed  # present whenever a parameter carries ZeRO-3's partition id

            stack.enter_context(deepspeed.zero.GatheredParameters(_zero3_parameters(prepared), modifier_rank=None))
        elif _fsdp1_root(prepared) is not None:
            from torch.distributed.fsdp import FullyShardedDataParallel

            stack.enter_context(FullyShardedDataParallel.summon_full_params(_fsdp1_root(prepared), writeback=False))
        else:
            stack.enter_context(_fsdp2_unsharded(prepared))
        yield


def _zero3_parameters(model: torch.nn.Module) -> list:
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def _fsdp1_root(model: torch.nn.Module):
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    return next((m for m in model.modules() if isinstance(m, FullyShardedDataParallel)), None)


@contextmanager
def _fsdp2_unsharded(model: torch.nn.Module):
    """FSDP2: every `fully_shard`ed module unsharded and told not to reshard after its forward, then put back."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        yield
        return
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    resharding = [_reshards_after_forward(m) for m in sharded]
    for module in sharded:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module, reshard in zip(sharded, resharding):
            module.reshard()
            module.set_reshard_after_forward(reshard, recurse=False)


def _reshards_after_forward(module) -> bool:
    """The module's own setting (torch keeps it on the parameter group; it has no public getter)."""
    try:
        group = module._get_fsdp_state()._fsdp_param_group
        return group is None or group.post_forward_mesh_info is not None
    except AttributeError:
        return True
