"""Training stages; each is a short module with a `run(cfg) -> metrics` function."""

from __future__ import annotations


def _pt(cfg):
    from lmforge.stages import pt

    return pt.run(cfg)


def _sft(cfg):
    from lmforge.stages import sft

    return sft.run(cfg)


def _rm(cfg):
    from lmforge.stages import rm

    return rm.run(cfg)


def _dpo(cfg):
    from lmforge.stages import dpo

    return dpo.run(cfg)


STAGE_RUNNERS = {"pt": _pt, "sft": _sft, "rm": _rm, "dpo": _dpo}
