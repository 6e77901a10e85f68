"""The offline planner: device profiles (presets and a probe), a cost model, a policy search.

    from planner import make_plan, preset
    plan = make_plan("path/to/store", preset("laptop-8gb-nvme"), ram="1.5G")

Reads store manifests (or estimates of unconverted HF/GGUF models) and device profiles, and
writes plans; it imports nothing from tiercache.cli or tiercache.engine.
"""
from .cost import CostModel, predict_mmap
from .estimate import estimate_from_source, load_model
from .profiles import DeviceProfile, list_presets, preset, resolve_device
from .search import load_plan, make_plan, sweep
from .units import parse_size


def this_machine(refresh: bool = False) -> DeviceProfile:
    """This machine's probed profile, cached at $TIERCACHE_HOME/device.json."""
    from .probe import this_machine as probed
    return probed(refresh)


__all__ = ["CostModel", "DeviceProfile", "estimate_from_source", "list_presets", "load_model",
           "load_plan", "make_plan", "parse_size", "predict_mmap", "preset", "resolve_device",
           "sweep", "this_machine"]
