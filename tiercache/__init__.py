"""tiercache: run language models larger than RAM/VRAM from a tiered LMDB store."""
__version__ = "0.1.0"
