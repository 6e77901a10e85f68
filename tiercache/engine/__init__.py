from .dense import Engine, load_dense
from .sample import make_sampler
from .session import Session, StepStats, generate_step

__all__ = ["Engine", "Session", "StepStats", "generate_step", "load_dense", "make_sampler"]
