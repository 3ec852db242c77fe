"""One generation engine for RL rollouts, evaluation, batch generation, chat and the server
(see engine.py for how a request flows)."""

from lmforge.generation.engine import Engine
from lmforge.generation.request import Request, RequestError, Result, Sample, Sampling
from lmforge.generation.sequence import Handle, TokenEvent

__all__ = ["Engine", "Handle", "Request", "RequestError", "Result", "Sample", "Sampling", "TokenEvent"]
