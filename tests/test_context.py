"""Positions are bounded: the prompt plus the tokens to generate must fit the context
(--context, never past the model's max_position_embeddings), refused up front in one line;
evaluation holds its logits to a bounded working space and scores as one pass would."""
import math
import subprocess
import sys

import pytest
import torch

from tiercache import evaluate
from tiercache.engine import generate_step, load_dense, make_sampler
from tiercache.engine.tiered import TierConfig, load_tiered
from tiercache.errors import ContextError
from tiercache.store.format import Store


def _ids(n, seed=0):
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prompt_plus_new_tokens_must_fit_the_context(stores):
    eng = load_tiered(Store(stores("llama", "q4", 64)), TierConfig(context=64))
    assert eng.context == 64
    s = eng.new_session()
    # 55 + 10: 64 positions (the last token generated is never fed back)
    assert len(list(generate_step(s, _ids(55), make_sampler(), 10))) == 10
    with pytest.raises(ContextError, match=r"exceed the context of 64 tokens; at most 9 new"):
        next(generate_step(eng.new_session(), _ids(56), make_sampler(), 10))
    s = eng.new_session()
    with pytest.raises(ContextError, match="context of 64"):
        eng.prefill(s, _ids(65))
    assert s.tokens == [] and s.caches[0].offset == 0  # refused before anything ran


def test_empty_prompt_is_refused_in_one_line(stores):
    from tiercache.errors import TiercacheError
    eng = load_dense(Store(stores("qwen2")))
    with pytest.raises(TiercacheError, match="empty prompt"):
        next(generate_step(eng.new_session(), [], make_sampler(), 4))


def test_model_positions_are_a_hard_limit(stores):
    """The tiny models allow 4096 positions: a larger --context is capped there."""
    eng = load_dense(Store(stores("llama3")), context=10_000)
    assert eng.context == 4096
    with pytest.raises(ContextError, match="the model's 4096"):
        next(generate_step(eng.new_session(), _ids(4090), make_sampler(), 8))


def test_cli_refuses_a_prompt_past_the_context_in_one_line(stores):
    r = subprocess.run([sys.executable, "-m", "tiercache", "generate", str(stores("llama")),
                        "-p", "x" * 300, "-n", "4", "--context", "64", "--no-chat-template"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-500:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "context of 64 tokens" in lines[0], r.stderr[-500:]


def test_eval_in_pieces_equals_one_pass(stores, monkeypatch):
    import gc
    gc.collect()  # the engine of the test before may still hold this store open
    eng = load_dense(Store(stores("qwen2")))
    ids = _ids(40, seed=3)
    logits = eng.logits(eng.new_session(), ids[:-1])
    want = math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item())
    monkeypatch.setattr(evaluate, "EVAL_LOGIT_BYTES", 8 * eng.args.vocab_size * 7)  # 7 rows
    got = evaluate.perplexity(eng, ids, chunk=len(ids))
    assert abs(got - want) < 1e-4 * want, (got, want)
