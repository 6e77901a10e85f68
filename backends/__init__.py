"""Compute backends behind one small interface: torch (CPU, CUDA) and ONNX Runtime (any provider).

onnxruntime is imported only when an `ort` backend is asked for.
"""
from .base import Backend, QuantWeight
from .runner import (Phases, auto_spec, get_backend, make_decode, make_prefill, phase_report,
                     phases)
from .torch_backend import TorchBackend

__all__ = ["Backend", "Phases", "QuantWeight", "TorchBackend", "auto_spec", "get_backend",
           "make_decode", "make_prefill", "phase_report", "phases"]
