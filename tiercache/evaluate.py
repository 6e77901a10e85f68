"""Perplexity of an engine on token ids, in numpy: `tiercache eval` on the lean runtime keeps
torch out of the process (importing it for a cross-entropy put ~142 MiB beside a budget that
was sized without it)."""
from __future__ import annotations

import math

import numpy as np

EVAL_LOGIT_BYTES = 8 << 20  # logits [rows, V] (float64) scored at a time


def chunks(ids: list[int], size: int) -> list[list[int]]:
    """The windows scored, each from an empty cache (a last one of one token has no target)."""
    return [ids[i:i + size] for i in range(0, len(ids) - 1, size) if len(ids[i:i + size]) > 1]


def perplexity(engine, ids: list[int], chunk: int = 256, progress: bool = False) -> float:
    """exp(mean NLL) of each chunk's next tokens, each chunk from an empty cache."""
    from tqdm import tqdm
    nll, n = 0.0, 0
    # logits [rows, V] and their log-softmax stay within EVAL_LOGIT_BYTES (a whole chunk's
    # were 50 MB each on SmolLM2: past a RAM budget's working space, OOM-killed under a cap)
    rows = max(1, EVAL_LOGIT_BYTES // (8 * engine.args.vocab_size))
    for c in tqdm(chunks(ids, chunk), desc="eval", unit="chunk", disable=not progress):
        session = engine.new_session()
        for lo in range(0, len(c) - 1, rows):
            z = _numpy(engine.logits(session, c[lo:min(lo + rows, len(c) - 1)]))
            target = np.asarray(c[lo + 1:lo + 1 + len(z)])
            z -= z.max(-1, keepdims=True)
            lse = np.log(np.exp(z).sum(-1))
            nll += float((lse - z[np.arange(len(target)), target]).sum())
        n += len(c) - 1
    return math.exp(nll / n)


def _numpy(logits) -> np.ndarray:
    """An engine's logits (numpy, or a torch tensor on any device) as float64 numpy."""
    if hasattr(logits, "detach"):
        logits = logits.detach().float().cpu().numpy()
    return np.asarray(logits, dtype=np.float64)
