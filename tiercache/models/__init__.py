from .kv import KVCache
from .llama import Model, sanitize

__all__ = ["KVCache", "Model", "sanitize"]
