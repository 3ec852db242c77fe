"""The rollout backends `rl.backend` names."""

from lmforge.rollout.decode import LMForgeBackend
from lmforge.rollout.sample import HFBackend

BACKENDS = {"hf": HFBackend, "lmforge": LMForgeBackend}
