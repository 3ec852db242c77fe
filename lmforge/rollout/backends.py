"""The rollout backends `rl.backend` names."""

from lmforge.rollout.decode import LMForgeBackend, UnsupportedModel, decoder_parts
from lmforge.rollout.sample import HFBackend


def make_backend(name: str, model, on_gpu: bool, sharded: bool = False, static_cache: bool = False,
                 compile: bool = False):
    """hf: transformers generate (`static_cache` pre-allocates its cache); lmforge: our decoder
    (`compile`: the decoding step through torch.compile before it is captured); auto: lmforge on a
    GPU for the models it supports, with whole (not FSDP/ZeRO-3 sharded) parameters, else hf."""
    if name == "auto":
        name = "lmforge" if on_gpu and not sharded and supports(model) else "hf"
    if name == "lmforge":
        if sharded:
            raise UnsupportedModel("rl.backend=lmforge needs whole parameters; under FSDP or ZeRO-3 use rl.backend=hf")
        decoder_parts(model)  # an unsupported model is a clear error now, not at the first rollout
        return LMForgeBackend(compile=compile)
    return HFBackend(static_cache=static_cache)


def supports(model) -> bool:
    try:
        decoder_parts(model)
    except UnsupportedModel:
        return False
    return True
