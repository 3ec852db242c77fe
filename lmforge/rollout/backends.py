"""The rollout backends `rl.backend` names."""

from lmforge.rollout.decode import LMForgeBackend
from lmforge.rollout.sample import HFBackend


def make_backend(name: str, static_cache: bool = False, compile: bool = False):
    """hf: transformers generate (`static_cache` pre-allocates its cache); lmforge: our decoder
    (`compile`: the decoding step through torch.compile before it is captured)."""
    if name == "lmforge":
        return LMForgeBackend(compile=compile)
    return HFBackend(static_cache=static_cache)
