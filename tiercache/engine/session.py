"""A session owns the KV caches of one conversation and the token ids they hold."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import ContextError, TiercacheError
from .sample import Sampler


@dataclass
class Session:
    engine: "object"
    caches: list
    tokens: list[int] = field(default_factory=list)
    limit: int = 1 << 62  # positions the KV cache may hold: the context

    def check(self, new: int, generate: int = 0) -> None:
        """Refuse, before any compute, `new` positions and `generate` tokens to follow them
        (the last never fed back) that would take the cache past its context."""
        have = len(self.tokens)
        if have + new + max(0, generate - 1) <= self.limit:
            return
        what = f"{have} cached + " if have else ""
        fits = (f"; at most {self.limit - have - new + 1} new tokens fit"
                if generate and have + new < self.limit else "")
        raise ContextError(f"{what}{new} prompt tokens + {generate} to generate exceed the "
                           f"context of {self.limit} tokens{fits} (a larger --context, up to "
                           f"the model's {self.engine.args.max_position_embeddings}, costs "
                           f"KV memory)")

    def reuse_prefix(self, ids: list[int]) -> list[int]:
        """Keep the cached prefix shared with `ids`; return the ids still to be prefilled."""
        n = 0
        limit = min(len(ids) - 1, len(self.tokens))  # always recompute at least one position
        while n < limit and self.tokens[n] == ids[n]:
            n += 1
        drop = len(self.tokens) - n
        for c in self.caches:
            c.trim(drop)
        del self.tokens[n:]
        return ids[n:]

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)


@dataclass
class StepStats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


def generate_step(session: Session, prompt: list[int], sampler: Sampler, max_tokens: int,
                  stats: StepStats | None = None) -> Iterator[int]:
    """Prefill `prompt` (reusing the session's cached prefix), then yield sampled token ids.

    The caller stops the iteration (EOS, stop strings); the last yielded token is not yet in
    the KV cache, so a following turn re-feeds it through `reuse_prefix`.
    """
    engine = session.engine
    stats = stats if stats is not None else StepStats()
    if not prompt:
        raise TiercacheError("empty prompt: generation needs at least one token to start from")
    new = session.reuse_prefix(prompt)
    session.check(len(new), max_tokens)
    t0 = time.perf_counter()
    logits = engine.prefill(session, new)
    stats.prompt_tokens, stats.prefill_s = len(new), time.perf_counter() - t0
    for i in range(max_tokens):
        token = sampler(logits)
        yield token
        if i + 1 == max_tokens:
            break
        t0 = time.perf_counter()
        logits = engine.decode(session, token)
        stats.decode_s += time.perf_counter() - t0
        stats.decode_tokens += 1
