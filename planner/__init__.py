"""The offline planner: device profiles (presets and a probe), a cost model, a policy search.

    from planner import make_plan, preset
    plan = make_plan("path/to/store", preset("laptop-8gb-nvme"), ram="1.5G")

Reads store manifests (or estimates of unconverted HF/GGUF models) and device profiles, and
writes plans; it imports nothing from tiercache.cli or tiercache.engine.
"""
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .profiles import DeviceProfile

# names load their module when first used: `planner.units` alone (the lean runtime's --ram)
# must not import the estimator, which imports torch
_WHERE = {"CostModel": "cost", "predict_mmap": "cost", "estimate_from_source": "estimate",
          "load_model": "estimate", "DeviceProfile": "profiles", "list_presets": "profiles",
          "preset": "profiles", "resolve_device": "profiles", "load_plan": "search",
          "make_plan": "search", "sweep": "search", "parse_size": "units"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


def this_machine(refresh: bool = False) -> "DeviceProfile":
    """This machine's probed profile, cached at $TIERCACHE_HOME/device.json."""
    from .probe import this_machine as probed
    return probed(refresh)


__all__ = ["CostModel", "DeviceProfile", "estimate_from_source", "list_presets", "load_model",
           "load_plan", "make_plan", "parse_size", "predict_mmap", "preset", "resolve_device",
           "sweep", "this_machine"]
