"""Engines over token ids. Names are imported when first used, so that the lean runtime
(`tiercache.lean`), which runs without torch, can use `session` and `sample` alone."""
from __future__ import annotations

import importlib

_WHERE = {"Engine": "dense", "load_dense": "dense", "make_sampler": "sample",
          "Session": "session", "StepStats": "session", "generate_step": "session"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
