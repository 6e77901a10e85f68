"""The dense engine: every weight loaded into RAM from the store. The naive reference path."""
from __future__ import annotations

import torch

from ..errors import StoreError
from ..models import Model, materialize
from ..models.kv import kv_dtype
from ..store.format import Store
from .session import Session


class Engine:
    """Runs a `Model` over token ids; subclasses change where the FFN weights come from."""

    backend = "torch"
    cpu_only = False  # whether its modules compute on the CPU only (the tiered engine's do)
    kv = "f32"  # the KV cache's dtype (models.kv.DTYPES)

    def __init__(self, store: Store, model: Model, context: int | None = None, kv: str = "f32",
                 backends=None):
        self.store, self.model, self.args = store, model, model.args
        self.context = context_limit(model.args, context)
        self.kv = kv
        self.phases = self._bind(backends)

    def _bind(self, backends) -> dict:
        """The phases the backends handed over run ("prefill", "decode": callables
        (session, ids) -> logits [V]; see backends.phases); none: torch, here."""
        if backends is None:
            return {}
        return backends.bind(self.model, self.store, cpu_only=self.cpu_only)

    @property
    def device(self) -> torch.device:
        """Where the model computes (a backend may have moved it): ids go there."""
        return self.model.model.norm.weight.device

    def new_session(self) -> Session:
        return Session(self, self.model.make_cache(dtype=kv_dtype(self.kv)), limit=self.context)

    @torch.no_grad()  # called directly (not through generate_step), it built autograd graphs
    def forward_ids(self, session: Session, ids: list[int]) -> torch.Tensor:
        """Run new ids through the model (torch); -> logits [V] of the last position."""
        session.check(len(ids))
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits = self.model(x, session.caches, last_only=True)
        session.tokens.extend(ids)
        return logits[0, -1]

    @torch.no_grad()  # here, not in generate_step: the lean runtime has no torch
    def prefill(self, session: Session, ids: list[int]) -> torch.Tensor:
        """The prompt's new ids, through the prefill backend where one was handed over."""
        run = self.phases.get("prefill")
        if run is None:
            return self.forward_ids(session, ids)
        session.check(len(ids))
        return run(session, ids)

    @torch.no_grad()
    def decode(self, session: Session, token: int) -> torch.Tensor:
        run = self.phases.get("decode")
        return self.forward_ids(session, [token]) if run is None else run(session, [token])

    @torch.inference_mode()
    def logits(self, session: Session, ids: list[int]) -> torch.Tensor:
        """All positions' logits [T, V] (for evaluation and parity tests)."""
        session.check(len(ids))
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(x, session.caches)
        session.tokens.extend(ids)
        return out[0]


def context_limit(args, context: int | None) -> int:
    """Positions a session may hold: the asked context, never past the model's own."""
    limit = args.max_position_embeddings
    return limit if context is None else min(context, limit)


def load_dense(store: Store, dtype=torch.float32, context: int | None = None,
               kv: str = "f32", backends=None) -> Engine:
    """The reference: every weight in `dtype`, the KV cache in f32 unless asked. backends:
    what runs the phases (backends.phases(...)); None: torch on the CPU."""
    kv_dtype(kv)  # refuse an unknown name before loading
    with torch.device("meta"):
        model = Model(store.args)
    model = materialize(model, dtype)
    model.inv_freq = _rope(store)
    loaded = model.load_weights(store.weights(dtype))
    missing = model.missing(loaded)
    if missing:
        raise StoreError(f"{store.path}: store lacks {len(missing)} weights, e.g. {missing[0]}")
    return Engine(store, model.eval(), context, kv, backends)


def _rope(store: Store):
    from ..models.llama import rope_inv_freq
    return rope_inv_freq(store.args)
