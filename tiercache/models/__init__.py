from .kv import KVCache
from .llama import Model, materialize, sanitize

__all__ = ["KVCache", "Model", "materialize", "sanitize"]
