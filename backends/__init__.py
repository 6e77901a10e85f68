"""Compute backends behind one small interface: torch (CPU, CUDA) and ONNX Runtime (any provider).

onnxruntime is imported only when an `ort` backend is asked for.
"""
from .base import Backend, QuantWeight
from .runner import auto_spec, get_backend, install, make_decode, make_prefill, phase_report
from .torch_backend import TorchBackend

__all__ = ["Backend", "QuantWeight", "TorchBackend", "auto_spec", "get_backend", "install",
           "make_decode", "make_prefill", "phase_report"]
