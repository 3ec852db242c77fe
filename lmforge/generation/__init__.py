"""One generation engine for RL rollouts, evaluation, batch generation, chat and the server
(see engine.py for how a request flows)."""

from lmforge.generation.engine import Engine
from lmforge.generation.request import GenerationError, Request, RequestError, Result, Sample, Sampling
from lmforge.generation.sequence import Handle, TokenEvent

__all__ = ["Engine", "GenerationError", "Handle", "Request", "RequestError", "Result", "Sample", "Sampling", "TokenEvent"]
